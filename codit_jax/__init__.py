"""codit-jax: CoDIT contrastive decoding and instruction tuning in JAX."""

from codit_jax import runtime as _runtime

__version__ = "0.1.0"

# `python -m codit_jax.generate` and the console scripts import this package before anything of
# TensorFlow, JAX or transformers, which read their logging and platform settings at import time.
_runtime.quiet_environment()
_runtime.hide_unused_torch()
