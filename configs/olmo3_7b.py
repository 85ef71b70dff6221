"""OLMo 3 7B pair of the paper (post-norm blocks, q/k norm, sliding window). Use allenai/Olmo-3-7B-Instruct-SFT for the SFT-only teacher.

Runs on one H100/H200, or a TPU slice (automatic model_parallelism; docs/memory.md).

    python -m codit_jax.generate --config=configs/olmo3_7b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-olmo3-7b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "allenai/Olmo-3-7B-Instruct"
  config.pre_trained = "allenai/Olmo-3-1025-7B"
  config.batch_size = 64
  return config
