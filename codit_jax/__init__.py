"""codit-jax: CoDIT contrastive decoding and instruction tuning in JAX."""

__version__ = "0.1.0"
