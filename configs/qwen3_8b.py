"""Qwen3 8B pair of the paper (q/k RMSNorm; thinking off).

Runs on one H100/H200 (30.5 GiB of bf16 weights for both models) or a TPU slice; model_parallelism is
automatic (4 or 8 chips per model on v5e, 2 on v6e; docs/memory.md).

    python -m codit_jax.generate --config=configs/qwen3_8b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-qwen3-8b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "Qwen/Qwen3-8B"
  config.pre_trained = "Qwen/Qwen3-8B-Base"
  config.enable_thinking = False  # CODIT.md: Qwen3 templates get enable_thinking=False
  config.batch_size = 64
  return config
