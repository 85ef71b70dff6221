"""Orbax checkpoints of a training run, and the guard that a resumed run is the same run.

A checkpoint (output_dir/checkpoints/<step>) holds the parameters, the
optimizer state and a small JSON record: the step and the data position (how
many micro-batches the run has consumed). Orbax writes each one to a temporary
folder and renames it when complete, so a run killed mid-save leaves the
previous checkpoint as the latest. The data order follows from the seed, so
the step is all a resumed run needs to continue with the very next batch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from codit_jax.errors import CoditError
from codit_jax.train import metrics

RUN_FILE = "train_run.json"


class Checkpoints:
  """The checkpoints of one run in `directory`."""

  def __init__(self, directory: Path, max_to_keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                         item_names=("state", "progress"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params, opt_state, progress: dict[str, Any]) -> None:
    """Starts an asynchronous save; training goes on while it is written.

    A Ctrl-C is delivered once the save has started: raised inside orbax's synchronous part, it
    left the background commit waiting for a signal that never came (close() then hung for
    orbax's 300 s timeout, with tracebacks); after it, close() finishes the checkpoint.
    """
    with metrics.interrupts_held():
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
          progress=ocp.args.JsonSave(progress)), force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state):
    """(params, opt_state, progress) of checkpoint `step`, placed as the abstract arrays' shardings."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore({"params": abstract_params, "opt_state": abstract_opt_state}),
        progress=ocp.args.JsonRestore()))
    return restored.state["params"], restored.state["opt_state"], dict(restored.progress)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def abstract_like(tree, shardings):
  """ShapeDtypeStructs with the given shardings: what orbax restores into."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def claim(output_dir: Path, settings: dict[str, Any], has_checkpoints: bool) -> None:
  """Records the settings that decide the run; refuses to resume checkpoints written with others."""
  run_file = output_dir / RUN_FILE
  if run_file.is_file() and has_checkpoints:
    previous, current = _comparable(json.loads(run_file.read_text())), _comparable(settings)
    if previous != current:
      changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
      details = "; ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
      raise CoditError(
          f"{output_dir} holds checkpoints of a run with other settings ({details}). Rerun with the same "
          "config to resume it, or choose another output_dir.")
  output_dir.mkdir(parents=True, exist_ok=True)
  temporary = run_file.with_name(run_file.name + ".tmp")
  temporary.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
  temporary.replace(run_file)


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
  """Settings as a resume compares them: a dataset path with a trailing slash or ~ names the same data."""
  def paths(value: str) -> str:
    return ",".join(os.path.expanduser(p.strip()).rstrip("/") or "/" for p in value.split(",") if p.strip())
  return {k: paths(v) if k in ("datasets", "eval_datasets") and isinstance(v, str) else v for k, v in settings.items()}
