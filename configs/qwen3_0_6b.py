"""The smallest real pair, for a first real run on a laptop or one GPU.

Runs on a laptop CPU (slow: start with --config.max_new_tokens=256) or any GPU.

    python -m codit_jax.generate --config=configs/qwen3_0_6b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-qwen3-0-6b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "Qwen/Qwen3-0.6B"
  config.pre_trained = "Qwen/Qwen3-0.6B-Base"
  config.enable_thinking = False  # CODIT.md: Qwen3 templates get enable_thinking=False
  config.batch_size = 8
  return config
