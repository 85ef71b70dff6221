"""Training metrics, each record to three places: output_dir/metrics.jsonl, the absl log, TensorBoard."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from pathlib import Path

from absl import logging

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
  """Appends {'step': ..., name: value, ...} records.

  A resumed run first drops the records past the step it resumes from: they
  belong to steps that the killed run did not checkpoint and that are run
  again, so the file then reads like one uninterrupted run's. A run that starts
  at step 0 (the killed one saved no checkpoint) drops them all: it writes the
  step-0 eval again.
  """

  def __init__(self, output_dir: Path, resume_step: int):
    self.path = output_dir / METRICS_FILE
    if self.path.is_file():
      kept = [line for line in self.path.read_text().splitlines()
              if resume_step and line.strip() and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow; TensorBoard event files only)
    from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._writer = tf.summary.create_file_writer(str(output_dir / TENSORBOARD_DIR))
    # What tensorboard.summary.scalar writes, without needing the tensorboard package (tensorflow-cpu
    # does not bring it): a float32 scalar tensor tagged for the scalars dashboard.
    self._scalar = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

  def write(self, step: int, **values: float) -> None:
    record = {"step": step, **{k: float(v) for k, v in values.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    logging.info("step %d | %s", step, " | ".join(f"{k} {_fmt(v)}" for k, v in record.items() if k != "step"))
    with interrupts_held(), self._writer.as_default(step=step):
      for name, value in record.items():
        if name != "step":
          self._tf.summary.write(name, self._tf.constant(value, self._tf.float32), metadata=self._scalar)
      self._writer.flush()

  def close(self) -> None:
    with interrupts_held():
      self._writer.close()


@contextlib.contextmanager
def interrupts_held():
  """Delivers a Ctrl-C (SIGINT) that arrives inside the block once the block is done.

  A KeyboardInterrupt raised while TensorFlow's eager C++ code is running (it checks for signals
  and calls back into Python) crashed codit-train with a segmentation fault, instead of the
  clean "interrupted; rerun the same command to resume" exit. Only the main thread receives
  signals; elsewhere the block runs as it is.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  pending = []
  previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous)
  if pending:
    raise KeyboardInterrupt


def _fmt(value: float) -> str:
  return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.0f}"


def read(output_dir: Path) -> list[dict]:
  path = Path(output_dir) / METRICS_FILE
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
