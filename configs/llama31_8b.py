"""Llama 3.1 8B pair of the paper (llama3 rope scaling, three end tokens). Gated on the Hub: `huggingface-cli login` first.

Runs on one H100/H200 (29.9 GiB of bf16 weights for both), or a TPU slice (automatic model_parallelism; docs/memory.md).

    python -m codit_jax.generate --config=configs/llama31_8b.py \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-llama31-8b
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "meta-llama/Llama-3.1-8B-Instruct"
  config.pre_trained = "meta-llama/Llama-3.1-8B"
  config.batch_size = 64
  return config
