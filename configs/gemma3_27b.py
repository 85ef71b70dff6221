"""Gemma 3 27B pair of the paper: the text tower of the multimodal checkpoints.

Both models take about 108 GB in bf16. Runs on a TPU v6e-8 (model_parallelism=8,
the default here), a v5p-8 (4 chips: --config.model_parallelism=4), or one H200
(--config.model_parallelism=1 at a small batch).

    python -m codit_jax.generate --config=configs/gemma3_27b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-gemma3-27b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "google/gemma-3-27b-it"
  config.pre_trained = "google/gemma-3-27b-pt"
  config.model_parallelism = 8
  config.batch_size = 32
  return config
