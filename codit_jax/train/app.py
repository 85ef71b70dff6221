"""codit-train: instruction-tune a student on a CoDIT (or direct) dataset, export it to Hugging Face format.

    python -m codit_jax.train --config=configs/sft_demo.py
    codit-train --config=configs/sft_default.py --config.student=Qwen/Qwen3-0.6B-Base \
        --config.chat_template=chatml --config.datasets=/data/codit-qwen3-8b \
        --config.output_dir=/data/sft-codit --config.learning_rate=1e-5

Rerunning the same command after a crash resumes from the latest checkpoint in
output_dir; the tuned student ends up in output_dir/hf.
"""

from ml_collections import config_flags

from codit_jax import runtime
from codit_jax.errors import CoditError
from codit_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/sft_*.py).",
                                          lock_config=True)

_HELP = """\
USAGE: codit-train --config=FILE [--config.KEY=VALUE ...] [flags]
       python -m codit_jax.train --config=FILE [--config.KEY=VALUE ...] [flags]

Instruction-tune a student on codit-generate datasets (or JSONL files) and export it to
output_dir/hf as a Hugging Face folder.

  --config=FILE        an ml_collections config file: configs/sft_demo.py (offline, seconds on CPU,
                       after the codit-generate demo), configs/sft_default.py
  --config.KEY=VALUE   override one key of that config, e.g. --config.student=Qwen/Qwen3-0.6B-Base
                       --config.datasets=/data/codit --config.output_dir=/data/sft-codit

Every key, its default and its meaning: configs/sft_default.py; README.md, "Tuning students".
Rerunning the same command after a crash or Ctrl-C resumes from the latest checkpoint."""


def main(argv) -> None:
  if len(argv) > 1:
    raise CoditError(f"unexpected arguments {argv[1:]}; settings go in --config.<key>=<value>.")
  trainer.train(_CONFIG.value)


def run() -> None:
  """Console script entry point (codit-train); errors a user can act on are one line."""
  runtime.run_app(main, "codit-train", _HELP, keys_file="configs/sft_default.py",
                  resume_hint="rerun the same command to resume from the latest checkpoint in output_dir",
                  out_of_memory_hint="Lower --config.batch_size (a higher --config.grad_accumulation keeps the "
                  "optimizer step's size) or --config.max_length, or use --config.dtype=bfloat16 or more devices "
                  "per model (--config.model_parallelism). These change the training: rerun with them into a new "
                  "output_dir")


if __name__ == "__main__":  # python -m codit_jax.train.app, as launch_tpu.sh --module= runs it
  run()
