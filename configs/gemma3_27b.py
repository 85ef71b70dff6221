"""Gemma 3 27B pair of the paper: the text tower of the multimodal checkpoints.

Both models take 100.6 GiB (108 GB) in bf16; docs/memory.md has the slots per machine.
model_parallelism is automatic (0): 8 on a TPU v6e-8, 2 on a v5p-8 (4 chips); one H200
holds them with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 (about 11 slots).

    python -m codit_jax.generate --config=configs/gemma3_27b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-gemma3-27b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "google/gemma-3-27b-it"
  config.pre_trained = "google/gemma-3-27b-pt"
  config.batch_size = 32
  return config
