"""The kernel library (the repository's top-level `kernels/` folder) under the name trainer imports it by.

A source checkout imports the folder as `kernels`; the installed distribution ships it as `contrastive_kernels`
(setup.py's package_dir), so that it neither shadows nor overwrites Hugging Face's `kernels` package, which
transformers probes for by that name (`is_kernels_available`). trainer/ imports the library only from here:
`from trainer import kernels`, `from trainer.kernels.family import check_number`. This module replaces itself by
the library in `sys.modules` and registers the library's submodules as `trainer.kernels.<name>`, as `os` does
with `os.path`, so each of those names is the library's own module object, not a copy.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

INSTALLED_NAME = "contrastive_kernels"
CHECKOUT_NAME = "kernels"


def _library() -> ModuleType:
    """The library beside this trainer package: the checkout's `kernels/` (when a setup.py says this is a
    checkout), else the installed `contrastive_kernels` (also what an editable install maps to `kernels/`)."""
    root = Path(__file__).resolve().parents[1]
    # Outside a checkout a `kernels` beside trainer/ is Hugging Face's (both live in site-packages): never ours.
    names = (CHECKOUT_NAME, INSTALLED_NAME) if (root / "setup.py").is_file() else (INSTALLED_NAME,)
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin and Path(spec.origin).resolve().parents[1] == root:
            return importlib.import_module(name)
    raise ImportError(f"the kernel library is missing: no {' or '.join(names)} package beside {root / 'trainer'}")


_lib = _library()
# The submodules trainer imports (the Triton ones are reached through `dispatch` only; importing them as
# `trainer.kernels.triton_op` would load a second copy).
for _name in ("chunked", "dispatch", "family", "reference"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{_lib.__name__}.{_name}")
sys.modules[__name__] = _lib
