"""Llama 3.2 1B pair of the paper (tied embeddings). Gated: `huggingface-cli login`.

Runs on any 24 GB GPU or a single TPU chip.

    python -m codit_jax.generate --config=configs/llama32_1b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-llama32-1b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "meta-llama/Llama-3.2-1B-Instruct"
  config.pre_trained = "meta-llama/Llama-3.2-1B"
  config.batch_size = 64
  return config
