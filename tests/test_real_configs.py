"""The config.json files of the published teacher checkpoints, read as codit-jax reads them.

The tiny test checkpoints (tiny_checkpoints.py) are written by transformers 5 and shrink every size;
the real files on the Hub were written by transformers 4.x, and some fields only matter at their real
values: a minimal Gemma 3 text_config that leaves vocabulary, rope bases and layer pattern to the
defaults, Qwen3-30B-A3B's all-MoE layers, OLMo 3's yarn rope on its full-attention layers only,
131072 positions. The dicts below are those files' architecture fields as published (tokenizer and
training fields left out); no weights are needed.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRotaryEmbedding

from codit_jax import checkpoints
from codit_jax.models import decoder

_QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 12288, "max_position_embeddings": 40960, "max_window_layers": 36,
    "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_sliding_window": False, "vocab_size": 151936}
_QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_sliding_window": False,
    "vocab_size": 151936}
_GEMMA3_27B_IT = {  # the multimodal checkpoint: its text tower's config is minimal
    "architectures": ["Gemma3ForConditionalGeneration"], "eos_token_id": [1, 106], "model_type": "gemma3",
    "text_config": {"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504,
                    "model_type": "gemma3_text", "num_attention_heads": 32, "num_hidden_layers": 62,
                    "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}
_LLAMA31_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.0.dev0", "vocab_size": 128256}
_LLAMA32_1B = dict(
    _LLAMA31_8B_INSTRUCT, eos_token_id=128001, head_dim=64, hidden_size=2048, intermediate_size=8192,
    num_hidden_layers=16, tie_word_embeddings=True, transformers_version="4.45.0.dev0",
    rope_scaling=dict(_LLAMA31_8B_INSTRUCT["rope_scaling"], factor=32.0))
_OLMO3_7B_INSTRUCT = {
    "architectures": ["Olmo3ForCausalLM"], "attention_bias": False, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 11008,
    "layer_types": ["full_attention" if i % 4 == 3 else "sliding_attention" for i in range(32)],
    "max_position_embeddings": 65536, "model_type": "olmo3", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
    "rope_scaling": {"attention_factor": 1.2079441541679836, "beta_fast": 32.0, "beta_slow": 1.0,
                     "factor": 8.0, "original_max_position_embeddings": 8192, "rope_type": "yarn"},
    "rope_theta": 500000, "sliding_window": 4096, "tie_word_embeddings": False, "dtype": "bfloat16",
    "transformers_version": "4.57.0", "vocab_size": 100278}

REAL_CONFIGS = {
    "Qwen/Qwen3-8B": _QWEN3_8B, "Qwen/Qwen3-30B-A3B": _QWEN3_30B_A3B, "google/gemma-3-27b-it": _GEMMA3_27B_IT,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B_INSTRUCT, "meta-llama/Llama-3.2-1B": _LLAMA32_1B,
    "allenai/Olmo-3-7B-Instruct": _OLMO3_7B_INSTRUCT,
}

# What each file means, from the model cards and the papers (not from transformers' parsing):
# layers, kv heads, head_dim, query scale, tied embeddings, full-attention layers (the rest sliding, of
# `window`), MoE layers, rope scale of the full-attention layers.
EXPECTED = {
    "Qwen/Qwen3-8B": dict(vocab=151936, layers=36, kv_heads=8, head_dim=128, query_scale=128 ** -0.5,
                          tied=False, full=range(36), window=None, moe_layers=0, full_rope_scale=1.0),
    "Qwen/Qwen3-30B-A3B": dict(vocab=151936, layers=48, kv_heads=4, head_dim=128, query_scale=128 ** -0.5,
                               tied=False, full=range(48), window=None, moe_layers=48, full_rope_scale=1.0),
    "google/gemma-3-27b-it": dict(vocab=262208, layers=62, kv_heads=16, head_dim=128,
                                  query_scale=168 ** -0.5, tied=True, full=range(5, 62, 6), window=1024,
                                  moe_layers=0, full_rope_scale=1.0),
    "meta-llama/Llama-3.1-8B-Instruct": dict(vocab=128256, layers=32, kv_heads=8, head_dim=128,
                                             query_scale=128 ** -0.5, tied=False, full=range(32), window=None,
                                             moe_layers=0, full_rope_scale=1.0),
    "meta-llama/Llama-3.2-1B": dict(vocab=128256, layers=16, kv_heads=8, head_dim=64, query_scale=64 ** -0.5,
                                    tied=True, full=range(16), window=None, moe_layers=0, full_rope_scale=1.0),
    "allenai/Olmo-3-7B-Instruct": dict(vocab=100278, layers=32, kv_heads=32, head_dim=128,
                                       query_scale=128 ** -0.5, tied=False, full=range(3, 32, 4), window=4096,
                                       moe_layers=0, full_rope_scale=1.2079441541679836),
}

ROTARY = {"llama": LlamaRotaryEmbedding, "qwen3": Qwen3RotaryEmbedding, "qwen3_moe": Qwen3MoeRotaryEmbedding,
          "gemma3_text": Gemma3RotaryEmbedding, "olmo3": Olmo3RotaryEmbedding}


def _load(tmp_path, name):
  (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[name]))
  return checkpoints.load_config(tmp_path)


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_a_published_config_is_read_as_its_model_card_describes(tmp_path, name):
  _, cfg = _load(tmp_path, name)
  want = EXPECTED[name]
  assert (cfg.vocab_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, cfg.tie_word_embeddings) == (
      want["vocab"], want["layers"], want["kv_heads"], want["head_dim"], want["tied"])
  assert cfg.query_scale == pytest.approx(want["query_scale"], rel=1e-12)
  windows = [cfg.window_for(i) for i in range(cfg.num_layers)]
  assert [i for i, w in enumerate(windows) if w is None] == list(want["full"])
  assert {w for w in windows if w is not None} <= {want["window"]}
  assert len(cfg.moe_layers) == want["moe_layers"]
  full_layer = want["full"][0]
  _, scale = cfg.rope_for(cfg.layer_types[full_layer])
  assert scale == pytest.approx(want["full_rope_scale"], rel=1e-12)


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_rope_of_a_published_config_equals_transformers_up_to_its_last_position(tmp_path, name):
  # An ulp of an inverse frequency turns the angle at position 100k by ~5e-3 (numpy's float32 power
  # gave that much); equal inverse frequencies leave only the cos/sin's own rounding.
  hf_config, cfg = _load(tmp_path, name)
  reference = ROTARY[cfg.model_type](hf_config.get_text_config())
  positions = np.array([0, 1, 777, 4095, 8191, 8192, 20000, 40959, cfg.max_position_embeddings - 1])
  for layer_type in sorted(set(cfg.layer_types)):
    kwargs = {"layer_type": layer_type} if cfg.model_type in ("gemma3_text", "olmo3") else {}
    want_cos, want_sin = reference(torch.zeros(1, len(positions), 8), torch.tensor(positions)[None], **kwargs)
    inv_freq, scale = cfg.rope_for(layer_type)
    cos, sin = decoder.rotary_cos_sin(jnp.asarray(positions)[None], inv_freq, scale, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), want_cos.numpy(), atol=2e-6, err_msg=f"{name} {layer_type}")
    np.testing.assert_allclose(np.asarray(sin), want_sin.numpy(), atol=2e-6, err_msg=f"{name} {layer_type}")
