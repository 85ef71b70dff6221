"""One Flax NNX decoder for every supported family; differences are config fields."""

from codit_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from codit_jax.models.decoder import Decoder, KVCache, decode_step, forward, prefill

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModelConfig",
    "Decoder",
    "KVCache",
    "decode_step",
    "forward",
    "prefill",
]
