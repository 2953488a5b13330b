"""The installed distribution coexists with Hugging Face's `kernels` package and with transformers' probe for it.

The wheel is built from this checkout and installed with pip into a folder, beside a stand-in for HF `kernels`
(a wheel named kernels 0.18.5: the real one comes from PyPI, which tests do not reach). Then, in a Python that
sees only that folder and the environment's site-packages (no .pth files, so no editable install of the repo):
the two wheels share no file, transformers' probe (`_is_package_available("kernels")`, what
`is_kernels_available` asks) finds HF's package and version and, without it, finds nothing; trainer computes a
loss through its own library, installed as `contrastive_kernels`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HF_VERSION = "0.18.5"

PROBE = """
import importlib.util, json
import torch
from transformers.utils import import_utils
found, version = import_utils._is_package_available("kernels", return_version=True)
spec = importlib.util.find_spec("kernels")
import trainer, trainer.losses
from trainer import kernels as library
a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
loss = trainer.losses.infonce_loss(a, a)["loss"].item()
print(json.dumps({"found": found, "version": version, "origin": spec and spec.origin, "trainer": trainer.__file__,
                  "library": library.__name__, "library_file": library.__file__, "loss": loss}))
"""


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _fake_hf_kernels_wheel(folder: Path) -> Path:
    """A wheel named like Hugging Face's `kernels`, with its top-level package `kernels`."""
    info = f"kernels-{HF_VERSION}.dist-info"
    files = {
        "kernels/__init__.py": f'__version__ = "{HF_VERSION}"\n\ndef get_kernel(repo_id):\n    return repo_id\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: kernels\nVersion: {HF_VERSION}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},{_record_hash(text.encode())},{len(text.encode())}\n" for name, text in files.items())
    path = folder / f"kernels-{HF_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{info}/RECORD", record + f"{info}/RECORD,,\n")
    return path


def _our_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the checkout (the build leaves build/ and egg-info where it runs)."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("trainer", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "wheels"), str(src)], check=True, capture_output=True)
    return next((tmp_path / "wheels").glob("contrastive_trainer-*.whl"))


def _install(wheels: list[Path], target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    *map(str, wheels)], check=True, capture_output=True)


def _probe(target: Path, cwd: Path) -> dict:
    # -S: no site module, so no .pth file (the editable install of a checkout) adds the repository to the path.
    env = {"PYTHONPATH": f"{target}:{sysconfig.get_paths()['purelib']}", "PATH": "/usr/bin:/bin",
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _record(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/RECORD"))
        return {line.split(",")[0] for line in zf.read(name).decode().splitlines() if line}


@pytest.mark.slow
def test_installed_distribution_coexists_with_hf_kernels_and_the_transformers_probe(tmp_path):
    ours, hf = _our_wheel(tmp_path), _fake_hf_kernels_wheel(tmp_path)
    ours_files = _record(ours)
    assert {f.split("/")[0] for f in ours_files if not f.startswith("contrastive_trainer-")} == {
        "trainer", "contrastive_kernels"}
    assert not ours_files & _record(hf), "the two distributions would overwrite each other's files"

    alone = tmp_path / "alone"
    _install([ours], alone)
    seen = _probe(alone, tmp_path)
    assert (seen["found"], seen["version"]) == (False, "N/A"), "transformers mistakes our library for HF kernels"
    assert seen["library"] == "contrastive_kernels" and seen["library_file"].startswith(str(alone))

    both = tmp_path / "both"
    _install([ours, hf], both)
    seen = _probe(both, tmp_path)
    assert (seen["found"], seen["version"]) == (True, HF_VERSION)
    assert seen["origin"] == str(both / "kernels" / "__init__.py")
    assert "get_kernel" in (both / "kernels" / "__init__.py").read_text(), "HF's files are intact"
    assert seen["trainer"].startswith(str(both)) and seen["library_file"].startswith(str(both / "contrastive_kernels"))
    assert math.isfinite(seen["loss"])
