"""ModelConfig: everything the decoder needs, read from a Hugging Face config.

Family differences live here as plain fields, so `decoder.py` has one code
path. `ModelConfig.from_hf` reads a `transformers.PretrainedConfig` (as
AutoConfig returns it, which already normalises old `rope_theta`/`rope_scaling`
configs into `rope_parameters`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from codit_jax.errors import CheckpointError

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "qwen3_moe",
    "gemma3_text",
    "gemma3",  # the multimodal checkpoint: we read its text tower only
    "olmo2",
    "olmo3",
)

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static description of one decoder. Hashable, so it can be a jit static."""

  model_type: str
  vocab_size: int  # rows of the embedding matrix (often padded past the tokenizer)
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  max_position_embeddings: int
  # Family differences.
  activation: str = "silu"  # 'silu' | 'gelu_tanh'
  norm_plus_one: bool = False  # Gemma stores RMSNorm weights as w - 1: scale by (1 + w)
  block_norms: str = "pre"  # 'pre' (llama), 'sandwich' (gemma3), 'post' (olmo2/3)
  qk_norm: str = "none"  # 'none' | 'head' (qwen3, gemma3) | 'projection' (olmo2/3)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  embed_scale: float = 1.0  # gemma3: sqrt(hidden_size), rounded to the weight dtype
  query_scale: float = 0.0  # multiplier on q.k; head_dim**-0.5 unless the family says otherwise
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  tie_word_embeddings: bool = False
  # Per layer: 'full_attention' or 'sliding_attention' (a window of `sliding_window`
  # keys ending at the query, as transformers' masks define it).
  layer_types: tuple[str, ...] = ()
  sliding_window: int | None = None
  # Rotary embedding per layer type: (layer_type, inverse frequencies, cos/sin scale).
  rope: tuple[tuple[str, tuple[float, ...], float], ...] = ()
  # Mixture of experts (qwen3_moe). The layers listed in `moe_layers` replace the
  # MLP by a router over `num_experts` SwiGLU experts of width
  # `moe_intermediate_size`, of which each token uses `num_experts_per_tok`;
  # every other layer keeps the dense MLP of width `intermediate_size`.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False  # renormalise the top-k router probabilities to sum to 1
  moe_layers: tuple[int, ...] = ()

  def rope_for(self, layer_type: str) -> tuple[np.ndarray, float]:
    for name, inv_freq, scale in self.rope:
      if name == layer_type:
        return np.asarray(inv_freq, np.float32), scale
    raise KeyError(layer_type)

  def window_for(self, layer_index: int) -> int | None:
    if self.layer_types[layer_index] == SLIDING_ATTENTION:
      return self.sliding_window
    return None

  @classmethod
  def from_hf(cls, hf_config: Any) -> ModelConfig:
    """Builds a ModelConfig from a transformers config object."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise CheckpointError(
          f"model_type {model_type!r} is not supported by codit-jax. Supported model types: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}. Check `model_type` in the checkpoint's config.json, "
          "or pick a checkpoint of a supported family."
      )
    if model_type == "gemma3":
      hf_config = hf_config.text_config
      model_type = "gemma3_text"
    return cls(**_family_fields(model_type, hf_config))


def _family_fields(model_type: str, c: Any) -> dict[str, Any]:
  head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
  num_layers = c.num_hidden_layers
  sliding_window = getattr(c, "sliding_window", None)
  layer_types = getattr(c, "layer_types", None)
  if layer_types is None:
    # Mistral: one window for every layer when the config sets one.
    layer_type = SLIDING_ATTENTION if sliding_window else FULL_ATTENTION
    layer_types = [layer_type] * num_layers
  layer_types = tuple(layer_types)
  if len(layer_types) != num_layers:
    raise CheckpointError(
        f"config.json lists {len(layer_types)} layer_types for {num_layers} layers (num_hidden_layers); "
        "fix one of the two fields."
    )
  if SLIDING_ATTENTION in layer_types and not sliding_window:
    raise CheckpointError("config.json has sliding_attention layers but no sliding_window; set sliding_window.")
  attention_bias = bool(getattr(c, "attention_bias", False))
  fields = dict(
      model_type=model_type,
      vocab_size=c.vocab_size,
      hidden_size=c.hidden_size,
      intermediate_size=c.intermediate_size,
      num_layers=num_layers,
      num_heads=c.num_attention_heads,
      num_kv_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
      head_dim=head_dim,
      rms_norm_eps=c.rms_norm_eps,
      max_position_embeddings=c.max_position_embeddings,
      qkv_bias=attention_bias,
      o_bias=attention_bias,
      query_scale=head_dim**-0.5,
      tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
      layer_types=layer_types,
      sliding_window=sliding_window if SLIDING_ATTENTION in layer_types else None,
      rope=_rope_tables(c, head_dim, sorted(set(layer_types))),
  )
  if model_type == "llama":
    fields["mlp_bias"] = bool(getattr(c, "mlp_bias", False))
  elif model_type == "qwen2":
    fields.update(qkv_bias=True, o_bias=False)
  elif model_type == "qwen3":
    fields["qk_norm"] = "head"
  elif model_type == "qwen3_moe":
    fields.update(qk_norm="head", **_moe_fields(c, num_layers))
  elif model_type == "gemma3_text":
    fields.update(
        activation=_activation(c.hidden_activation),
        norm_plus_one=True,
        block_norms="sandwich",
        qk_norm="head",
        embed_scale=c.hidden_size**0.5,
        query_scale=c.query_pre_attn_scalar**-0.5,
        attn_logit_softcap=getattr(c, "attn_logit_softcapping", None),
        final_logit_softcap=getattr(c, "final_logit_softcapping", None),
    )
  elif model_type in ("olmo2", "olmo3"):
    fields.update(block_norms="post", qk_norm="projection")
  if model_type != "gemma3_text":
    fields["activation"] = _activation(c.hidden_act)
  return fields


def _moe_fields(c: Any, num_layers: int) -> dict[str, Any]:
  """Which layers are sparse, by transformers' rule (Qwen3MoeDecoderLayer): layer i is a
  mixture of experts unless listed in mlp_only_layers, and only every
  decoder_sparse_step-th layer counting from 1 ((i + 1) % step == 0) is."""
  mlp_only = set(getattr(c, "mlp_only_layers", None) or ())
  step = getattr(c, "decoder_sparse_step", 1) or 1
  num_experts = c.num_experts
  moe_layers = tuple(i for i in range(num_layers)
                     if num_experts > 0 and i not in mlp_only and (i + 1) % step == 0)
  if moe_layers and not 0 < c.num_experts_per_tok <= num_experts:
    raise CheckpointError(
        f"config.json sets num_experts_per_tok={c.num_experts_per_tok} for {num_experts} experts; "
        "it must be between 1 and num_experts.")
  return dict(num_experts=num_experts, num_experts_per_tok=c.num_experts_per_tok,
              moe_intermediate_size=c.moe_intermediate_size, norm_topk_prob=bool(c.norm_topk_prob),
              moe_layers=moe_layers)


def _activation(name: str) -> str:
  if name == "silu":
    return "silu"
  if name in ("gelu_pytorch_tanh", "gelu_tanh"):
    return "gelu_tanh"
  raise CheckpointError(f"activation {name!r} in config.json is not supported (supported: silu, gelu_pytorch_tanh).")


def _rope_tables(c: Any, head_dim: int, layer_types: list[str]) -> tuple:
  params = getattr(c, "rope_parameters", None) or {}
  per_type = bool(params) and all(isinstance(v, dict) for v in params.values())
  tables = []
  for layer_type in layer_types:
    p = params[layer_type] if per_type else params
    inv_freq, scale = rope_inverse_frequencies(p, head_dim, c.max_position_embeddings)
    tables.append((layer_type, tuple(float(f) for f in inv_freq), float(scale)))
  return tuple(tables)


def rope_inverse_frequencies(p: dict, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  """Inverse frequencies and cos/sin scale of one rope config, as transformers computes them.

  Covers the rope types of the supported families: default, linear (gemma3
  global layers), llama3 (Llama 3.1/3.2) and yarn (OLMo 3 long context).
  """
  rope_type = p.get("rope_type", "default")
  base = p.get("rope_theta", 10000.0)
  dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
  if dim != head_dim:
    raise CheckpointError("partial_rotary_factor < 1 in config.json is not supported.")
  inv_freq = np.float32(1) / _rope_powers(base, dim)
  if rope_type == "default":
    return inv_freq, 1.0
  if rope_type == "linear":
    return inv_freq / p["factor"], 1.0
  if rope_type == "llama3":
    return _llama3_scaling(inv_freq, p), 1.0
  if rope_type == "yarn":
    return _yarn(p, base, dim, max_position_embeddings)
  raise CheckpointError(
      f"rope_type {rope_type!r} in config.json is not supported (supported: default, linear, llama3, yarn)."
  )


def _rope_powers(base: float, dim: int) -> np.ndarray:
  """base ** (2i / dim), i < dim / 2, in float32 as transformers' (torch's) float32 power gives it.

  numpy's float32 power is an ulp off in up to a fifth of these, and an ulp of an inverse frequency
  turns the angle at position 100k by ~5e-3. The power of the same float32 exponents taken in
  float64 and rounded once equals torch's in all but 0-3 of 128 (its own last-ulp errors).
  """
  exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
  return (base ** exponents.astype(np.float64)).astype(np.float32)


def _llama3_scaling(inv_freq: np.ndarray, p: dict) -> np.ndarray:
  factor = p["factor"]
  low, high = p["low_freq_factor"], p["high_freq_factor"]
  old_context = p["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
  smooth = (old_context / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _yarn(p: dict, base: float, dim: int, max_position_embeddings: int) -> tuple[np.ndarray, float]:
  original = p["original_max_position_embeddings"]
  factor = p.get("factor") or max_position_embeddings / original

  def mscale(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attention_factor = p.get("attention_factor")
  if attention_factor is None:
    if p.get("mscale") and p.get("mscale_all_dim"):
      attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
    else:
      attention_factor = mscale(factor)
  beta_fast = p.get("beta_fast") or 32
  beta_slow = p.get("beta_slow") or 1

  def correction_dim(rotations):
    return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

  low, high = correction_dim(beta_fast), correction_dim(beta_slow)
  if p.get("truncate", True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrapolation = 1 - ramp
  pos_freqs = _rope_powers(base, dim)
  inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)
