"""codit-train: instruction-tune a student on a CoDIT (or direct) dataset, export it to Hugging Face format.

    python -m codit_jax.train --config=configs/sft_demo.py
    codit-train --config=configs/sft_default.py --config.student=Qwen/Qwen3-0.6B-Base \
        --config.chat_template=chatml --config.datasets=/data/codit-qwen3-8b \
        --config.output_dir=/data/sft-codit --config.learning_rate=1e-5

Rerunning the same command after a crash resumes from the latest checkpoint in
output_dir; the tuned student ends up in output_dir/hf.
"""

import logging as std_logging
import sys

from absl import app, logging
from ml_collections import config_flags

from codit_jax.errors import CoditError
from codit_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/sft_*.py).",
                                          lock_config=True)


class _QuietOrbax(std_logging.Filter):
  """Orbax logs a dozen INFO lines per checkpoint; keep its warnings and errors only."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.<key>=<value>.")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  try:
    trainer.train(_CONFIG.value)
  except CoditError as e:
    print(f"codit-train: error: {e}", file=sys.stderr)
    sys.exit(1)


def run() -> None:
  """Console script entry point (codit-train)."""
  app.run(main)
