"""Memory of each teacher pair: weights, KV cache per slot, and the slots that fit on common chips.

    python bench/memory_table.py            # prints the Markdown tables of docs/memory.md

Every number comes from the configs below, which copy the fields of the real
config.json files that decide shapes (sources in docs/memory.md), run through the
project's own ModelConfig, Decoder parameter shapes, sharding rules and
codit_jax.memory.plan: the same code that sizes a run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from codit_jax import memory  # noqa: E402
from codit_jax.errors import CoditError  # noqa: E402
from codit_jax.models.config import ModelConfig  # noqa: E402

# Shape-deciding fields of config.json (the post-trained and the pre-trained checkpoint of
# each pair share them; only max_position_embeddings differs, and the run's context is the
# post-trained model's).
QWEN3_8B = dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                max_position_embeddings=40960, tie_word_embeddings=False, rms_norm_eps=1e-6,
                rope_theta=1000000.0)
QWEN3_30B_A3B = dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                     moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1,
                     mlp_only_layers=[], norm_topk_prob=True, num_hidden_layers=48, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
                     tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0)
GEMMA3_27B = dict(model_type="gemma3", text_config=dict(
    model_type="gemma3_text", vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
    num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
    sliding_window=1024, max_position_embeddings=131072, rope_scaling={"factor": 8.0, "rope_type": "linear"}))
LLAMA31_8B = dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  rope_theta=500000.0, rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                     "original_max_position_embeddings": 8192,
                                                     "rope_type": "llama3"})
LLAMA32_3B = dict(LLAMA31_8B, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                  num_attention_heads=24, head_dim=128, tie_word_embeddings=True,
                  rope_scaling=dict(LLAMA31_8B["rope_scaling"], factor=32.0))
LLAMA32_1B = dict(LLAMA32_3B, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, head_dim=64)
OLMO3_7B = dict(model_type="olmo3", vocab_size=100278, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, sliding_window=4096,
                layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 8, max_position_embeddings=65536,
                tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=500000.0,
                rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192})

PAIRS = (
    ("Qwen3-8B / -Base", QWEN3_8B),
    ("Qwen3-30B-A3B / -Base", QWEN3_30B_A3B),
    ("gemma-3-27b-it / -pt", GEMMA3_27B),
    ("Llama-3.1-8B-Instruct / Llama-3.1-8B", LLAMA31_8B),
    ("Llama-3.2-3B-Instruct / Llama-3.2-3B", LLAMA32_3B),
    ("Llama-3.2-1B-Instruct / Llama-3.2-1B", LLAMA32_1B),
    ("Olmo-3-7B-Instruct / Olmo-3-1025-7B", OLMO3_7B),
)

# (name, memory JAX may use per chip, chips in the slice). bytes_limit, not the label: a GPU's
# default pool is XLA_PYTHON_CLIENT_MEM_FRACTION = 0.75 of it; a TPU gives programs about all its HBM.
H200 = 143771 * 2**20  # nvidia-smi's 143771 MiB ("141 GB")
MACHINES = (
    ("1 x H200 (default 75%)", int(0.75 * H200), 1),
    ("1 x H200 (MEM_FRACTION=0.95)", int(0.95 * H200), 1),
    ("1 x v5e (16 GiB)", 16 * memory.GiB, 1),
    ("v5e-8", 16 * memory.GiB, 8),
    ("1 x v5p (95 GiB)", 95 * memory.GiB, 1),
    ("v5p-8 (4 chips)", 95 * memory.GiB, 4),
    ("1 x v6e (32 GiB)", 32 * memory.GiB, 1),
    ("v6e-8", 32 * memory.GiB, 8),
)


def model_config(fields: dict) -> ModelConfig:
  import transformers  # pylint: disable=g-import-not-at-top

  fields = dict(fields)
  hf = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  return ModelConfig.from_hf(hf)


def pair_memory(fields: dict, max_new_tokens: int, dtype: str = "bfloat16"):
  cfg = model_config(fields)
  len_main, len_long = memory.cache_lengths(cfg.max_position_embeddings, max_new_tokens)
  one = memory.ModelMemory.from_config(cfg, dtype, len_main, len_long)
  return cfg, (one, one), len_main, len_long


def gib(b: float) -> str:
  return f"{b / memory.GiB:.1f}"


def tables(max_new_tokens: int, batch_size: int) -> str:
  out = [f"Bytes in bfloat16, GiB = 2^30 bytes; max_new_tokens {max_new_tokens}, prompts up to 2048 tokens in the "
         "main pass; the long pass holds prompts up to context - max_new_tokens.", "",
         "| pair | weights, both models | main L | cache per slot, both (no ring) | with ring buffers | "
         "long L | long slot, both (ring) |", "|---|---:|---:|---:|---:|---:|---:|"]
  rows = []
  for name, fields in PAIRS:
    cfg, models, len_main, len_long = pair_memory(fields, max_new_tokens)
    no_ring = 2 * memory.kv_bytes_per_slot(cfg, len_main, "bfloat16", ring_buffers=False)
    ring = 2 * memory.kv_bytes_per_slot(cfg, len_main, "bfloat16")
    long_ring = 2 * memory.kv_bytes_per_slot(cfg, len_long, "bfloat16") if len_long else 0
    out.append(f"| {name} | {gib(2 * models[0].weight_bytes)} | {len_main} | {gib(no_ring)} | {gib(ring)} | "
               f"{len_long or '-'} | {gib(long_ring) if len_long else '-'} |")
    rows.append((name, models))
  out += ["", f"Slots that fit (batch_size {batch_size} is the cap), with the model_parallelism that "
          "model_parallelism=0 picks: `mp / slots main / slots long`.", "",
          "| pair | " + " | ".join(m[0] for m in MACHINES) + " |", "|---|" + "---:|" * len(MACHINES)]
  for name, models in rows:
    cells = []
    for _, device_memory, chips in MACHINES:
      try:
        p = memory.plan(models, device_memory=device_memory, device_count=chips, batch_size=batch_size)
        cells.append(f"{p.model_parallelism} / {p.slots_main} / {p.slots_long}")
      except CoditError:
        cells.append("no")
    out.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max_new_tokens", type=int, default=4096)
  parser.add_argument("--batch_size", type=int, default=256, help="the cap on slots (high: show what fits)")
  args = parser.parse_args(argv)
  print(tables(args.max_new_tokens, args.batch_size))


if __name__ == "__main__":
  main()
