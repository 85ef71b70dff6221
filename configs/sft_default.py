"""Instruction tuning of a student on synthesized data (codit-train); set the student, data and output.

    python -m codit_jax.train --config=configs/sft_default.py \
      --config.student=Qwen/Qwen3-0.6B-Base --config.chat_template=chatml \
      --config.datasets=/data/codit-qwen3-8b --config.output_dir=/data/sft-codit \
      --config.learning_rate=1e-5

`datasets` takes one or more codit-generate output folders, TFDS folders,
JSONL or Parquet files (fields instruction and response; finish_reason or
is_completed, and repetitive, optional) and Hub dataset folders as downloaded,
separated by commas. The tuned student is written to
output_dir/hf as a Hugging Face folder; rerunning the same command resumes
from the latest checkpoint. Any key can be overridden with
--config.<key>=<value>; configs/sft_demo.py starts from this file.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()

  # What to tune, on what, and where it goes.
  config.student = ""  # HF folder, Hub id or builtin:demo-post; any supported family
  config.chat_template = ""  # '' the student's own; 'chatml' or a Jinja string for students without one
  config.datasets = ""  # comma-separated: codit-generate / TFDS folders, JSONL or Parquet files, Hub dataset folders
  config.output_dir = ""  # checkpoints, metrics.jsonl, tensorboard/, and hf/ (the tuned student)

  # Data.
  config.drop_repetitive = True  # leave out responses flagged repetitive (degenerate)
  config.drop_unfinished = True  # leave out unfinished responses: 'length' or 'repetitive', is_completed false
  config.max_length = 2048  # tokens per row (prompt + response + end token)
  config.packing = True  # several examples per row, each attending only to itself
  config.eval_fraction = 0.02  # held out (seeded) for eval_loss
  config.eval_datasets = ""  # instead: a fixed eval set (same formats), to compare students tuned on other data
  config.seed = 0  # eval split and per-epoch shuffle

  # Schedule.
  config.max_steps = 0  # optimizer steps; 0: `epochs` passes over the training rows
  config.epochs = 3
  config.batch_size = 64  # rows (of max_length tokens, packed) per micro-batch, global
  config.grad_accumulation = 1  # micro-batches per optimizer step
  config.learning_rate = 1e-5  # peak, after linear warmup; cosine decay to final_learning_rate
  config.warmup_steps = 50
  config.final_learning_rate = 0.0

  # AdamW.
  config.weight_decay = 0.0  # on matrices only (not norms, biases)
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.max_grad_norm = 1.0  # global-norm clipping; 0 turns it off

  # Compute.
  config.dtype = "float32"  # master weights and optimizer state: 'float32' | 'bfloat16' (halves memory)
  config.compute_dtype = "bfloat16"  # forward/backward: 'bfloat16' | 'float32'
  config.model_parallelism = 1  # devices per model replica (the 'model' mesh axis)
  config.fsdp = True  # also shard weights and optimizer state over the 'data' axis
  config.compilation_cache_dir = "~/.cache/codit_jax/xla"  # '' turns JAX's persistent cache off

  # Checkpoints, metrics, export.
  config.checkpoint_every = 500  # optimizer steps; the last step is always saved
  config.keep_checkpoints = 2  # the newest ones kept; 0 keeps all
  config.log_every = 10
  config.eval_every = 500  # 0: only at the end
  config.export_dtype = ""  # '' the student's own dtypes; or 'float32' | 'bfloat16'
  return config
