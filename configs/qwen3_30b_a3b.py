"""Qwen3-30B-A3B pair of the paper: mixture of experts, 128 experts, top 8 (thinking off).

Both models take about 122 GB in bf16 (30.5B parameters each), and the KV cache
96 KiB per token per model: 72 GiB for both at batch 64 x (4096 new + 2048
prompt) slots (docs/moe.md has the arithmetic). The experts are split over the
'model' mesh axis (expert parallelism), so model_parallelism should divide 128.

model_parallelism is automatic (0, from device memory; docs/memory.md):
  * TPU v6e-8 (8 chips x 32 GB): 8 (about 12 slots: the weights leave little room).
  * TPU v5p-8 (4 chips x 95 GB): 2, and the whole batch fits.
  * one H200: 1, about 5 slots, with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (JAX's default 75% is too little).
  * TPU v5e-8 (128 GB) cannot hold both models: use v5e-16 or larger.

    python -m codit_jax.generate --config=configs/qwen3_30b_a3b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-qwen3-30b-a3b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "Qwen/Qwen3-30B-A3B"
  config.pre_trained = "Qwen/Qwen3-30B-A3B-Base"
  config.enable_thinking = False  # CODIT.md: Qwen3 templates get enable_thinking=False
  config.batch_size = 64
  return config
