"""Llama 3.2 3B pair of the paper (tied embeddings). Gated: `huggingface-cli login`.

Runs on one 40 GB+ GPU or a TPU v5e-4.

    python -m codit_jax.generate --config=configs/llama32_3b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-llama32-3b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "meta-llama/Llama-3.2-3B-Instruct"
  config.pre_trained = "meta-llama/Llama-3.2-3B"
  config.batch_size = 64
  return config
