"""The codit-train job: read the data, tune the student, checkpoint, export it to Hugging Face format.

Everything the run writes lives in `output_dir`:

    train_run.json     the settings that decide the weights (a resumed run must repeat them)
    checkpoints/<step> orbax: params, optimizer state, step and data position
    metrics.jsonl      one JSON record per log line (loss, learning_rate, ...) and per eval
    tensorboard/       the same metrics as TensorBoard events
    hf/                the tuned student, a Hugging Face folder (written at the end)

Steps count optimizer updates; each takes `grad_accumulation` micro-batches
of `batch_size` rows. Rerunning the same command after a crash resumes from
the latest checkpoint with the next batch of the same data order, and ends
with the weights of an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np
from absl import logging
from flax import nnx

from codit_jax import checkpoints, parallel, runtime
from codit_jax.errors import CoditError
from codit_jax.models.decoder import Decoder, use_expert_parallelism
from codit_jax.train import checkpointing, data, export, metrics, steps

_REQUIRED = ("student", "datasets", "output_dir")
# Settings that do not change the weights a run ends with; a resumed run may change these.
_OPERATIONAL_KEYS = ("output_dir", "checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
                     "export_dtype", "compilation_cache_dir")
CHECKPOINT_DIR = "checkpoints"
HF_DIR = "hf"


def validate(config) -> None:
  missing = [key for key in _REQUIRED if not config.get(key)]
  if missing:
    raise CoditError(f"the config leaves {', '.join(missing)} empty. Set them in the config file or with "
                     f"--config.{missing[0]}=..., e.g. --config=configs/sft_default.py "
                     "--config.student=Qwen/Qwen3-0.6B-Base --config.chat_template=chatml "
                     "--config.datasets=/data/codit-qwen3-8b --config.output_dir=/data/sft-qwen3-0.6b.")
  positive = ("batch_size", "grad_accumulation", "log_every", "checkpoint_every", "model_parallelism")
  for key in positive:
    if config[key] < 1:
      raise CoditError(f"{key} must be at least 1; got {config[key]}.")
  for key in ("keep_checkpoints", "eval_every", "warmup_steps"):
    if config[key] < 0:
      raise CoditError(f"{key} must be >= 0; got {config[key]}.")
  if not 0 < config.learning_rate < math.inf:  # written so that NaN is refused too
    raise CoditError(f"learning_rate must be a finite number > 0; got {config.learning_rate}.")
  if config.export_dtype and config.export_dtype not in export.EXPORT_DTYPES:
    raise CoditError(f"export_dtype {config.export_dtype!r} is not supported; use '' (the student's own dtypes) "
                     f"or one of {', '.join(export.EXPORT_DTYPES)}.")
  output_dir = Path(config.output_dir).expanduser()
  if output_dir.exists() and not output_dir.is_dir():
    raise CoditError(f"output_dir {output_dir} is an existing file, not a folder. Choose a new folder, or the "
                     "folder of the run to resume.")
  if config.max_length < 2:
    raise CoditError(f"max_length must be at least 2; got {config.max_length}.")
  if config.max_steps < 0 or (config.max_steps == 0 and config.epochs < 1):
    raise CoditError("set max_steps (optimizer steps) or epochs to a positive number.")
  if config.dtype not in checkpoints.DTYPES:
    raise CoditError(f"dtype {config.dtype!r} is not supported; use one of {', '.join(checkpoints.DTYPES)}.")
  if config.compute_dtype not in steps.COMPUTE_DTYPES:
    raise CoditError(f"compute_dtype {config.compute_dtype!r} is not supported; use one of "
                     f"{', '.join(steps.COMPUTE_DTYPES)}.")


def run_settings(config) -> dict:
  return {k: v for k, v in config.to_dict().items() if k not in _OPERATIONAL_KEYS}


def prepare_data(config, fmt: data.ChatFormat, report: data.DataReport):
  """(train examples, eval examples), tokenized in the student's format."""
  examples = data.read_datasets(config.datasets, drop_repetitive=config.drop_repetitive,
                                drop_unfinished=config.drop_unfinished, report=report)
  tokenized = [t for e in examples if (t := data.tokenize(fmt, e, config.max_length, report)) is not None]
  report.kept = len(tokenized)
  if not tokenized:
    raise CoditError(f"no training examples are left of {report.read} read (dropped: {dict(report.dropped)}). "
                     "Check the filters (drop_repetitive, drop_unfinished) and max_length.")
  if config.eval_datasets:  # one fixed eval set, so that students tuned on different data compare
    eval_report = data.DataReport()
    eval_examples = data.read_datasets(config.eval_datasets, drop_repetitive=config.drop_repetitive,
                                       drop_unfinished=config.drop_unfinished, report=eval_report)
    eval_set = [t for e in eval_examples if (t := data.tokenize(fmt, e, config.max_length, eval_report)) is not None]
    eval_report.kept = len(eval_set)
    logging.info("eval data (%s): %s.", config.eval_datasets, eval_report.as_dict())
    if not eval_set:
      raise CoditError(f"eval_datasets {config.eval_datasets} leaves no eval example of {eval_report.read} read "
                       f"(dropped: {dict(eval_report.dropped)}). Check the filters (drop_repetitive, drop_unfinished) "
                       "and max_length, or leave eval_datasets empty to hold out eval_fraction of the training data.")
    return tokenized, eval_set
  train_ids, eval_ids = data.split_eval(len(tokenized), config.eval_fraction, config.seed)
  return [tokenized[i] for i in train_ids], [tokenized[i] for i in eval_ids]


def _device_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """The batch split over 'data'; each device gets only its rows of the host arrays."""
  return {k: jax.make_array_from_callback(v.shape, parallel.batch_sharding(mesh, v.shape), lambda i, v=v: v[i])
          for k, v in batch.items()}


def evaluate(eval_step, params, batches, mesh) -> float:
  """Mean loss per trained token over the whole eval set."""
  sums = [eval_step(params, _device_batch(b, mesh)) for b in batches]
  total, count = np.sum(np.asarray(jax.device_get(sums), np.float64), axis=0)
  return float(total / max(count, 1.0))


def train(config) -> dict:
  """Runs (or resumes) the job of `config`; returns a summary."""
  try:
    return _train(config)
  finally:
    runtime.release_folder_locks()  # output_dir's lock, which process 0 takes before it writes there


def _train(config) -> dict:
  if config is None:
    raise CoditError("no config: pass --config=configs/<file>.py (configs/sft_demo.py runs offline).")
  validate(config)
  started = time.perf_counter()
  if config.compilation_cache_dir:
    from codit_jax.decoding import engine  # pylint: disable=g-import-not-at-top
    engine.enable_compilation_cache(str(Path(config.compilation_cache_dir).expanduser()))
  output_dir = Path(config.output_dir).expanduser().absolute()

  student_path = checkpoints.resolve(config.student)
  _, cfg = checkpoints.load_config(student_path)
  if cfg.moe_layers and jax.default_backend() == "cpu":
    raise CoditError(
        f"{config.student} is a mixture-of-experts model; its CPU expert kernel (a loop over tiles) cannot be "
        "differentiated, so MoE students train on TPU or GPU (jax.lax.ragged_dot) only.")
  tokenizer = checkpoints.load_tokenizer(student_path, "student")
  data.set_chat_template(tokenizer, config.chat_template, config.student)
  _check_vocabulary(tokenizer, cfg, config.student)
  fmt = data.ChatFormat.for_student(tokenizer, student_path)
  logging.info("end of an assistant turn: %s", tokenizer.convert_ids_to_tokens(list(fmt.end_ids)))
  report = data.DataReport()
  train_set, eval_set = prepare_data(config, fmt, report)
  logging.info("data: %s; %d train and %d eval examples.", report.as_dict(), len(train_set), len(eval_set))
  plan = data.BatchPlan(train_set, config.batch_size, config.max_length, config.packing, config.seed)
  accumulation = config.grad_accumulation
  total_steps = config.max_steps or plan.batches_for_epochs(config.epochs) // accumulation
  if total_steps < 1:
    raise CoditError(f"{config.epochs} epoch(s) of {plan.batches_in_epoch(0)} batches make no optimizer step of "
                     f"grad_accumulation={accumulation} batches; set max_steps or more epochs.")

  mesh = parallel.make_mesh(config.model_parallelism)
  if config.batch_size % mesh.shape[parallel.DATA]:
    logging.warning("batch_size %d does not split over %d data-parallel replicas: every replica computes the "
                    "whole batch. Use a multiple of %d.", config.batch_size, mesh.shape[parallel.DATA],
                    mesh.shape[parallel.DATA])
  if jax.process_index() == 0:  # before anything is written: a second run on the folder stops here
    runtime.lock_folder(str(output_dir), "codit-train")
  manager = checkpointing.Checkpoints(output_dir / CHECKPOINT_DIR, config.keep_checkpoints)
  start = manager.latest_step() or 0
  # The data's size too: a dataset that changed under a run would silently change the data order.
  settings = dict(run_settings(config), train_examples=len(train_set), train_tokens=sum(plan.lengths))
  checkpointing.claim(output_dir, settings, has_checkpoints=start > 0)

  state = _initial_state(config, cfg, student_path, mesh, manager, start, total_steps)
  layout, params, opt_state, tx, schedule, shardings, opt_shardings = state
  if start >= total_steps:
    logging.info("already trained to step %d of %d (checkpoint in %s): exporting %s again.", start, total_steps,
                 output_dir / CHECKPOINT_DIR, output_dir / HF_DIR)
  elif start:
    logging.info("resuming from step %d of %d (checkpoint in %s).", start, total_steps, output_dir / CHECKPOINT_DIR)

  train_step = steps.make_train_step(layout, tx, config.compute_dtype, shardings, opt_shardings)
  eval_step = steps.make_eval_step(layout, config.compute_dtype)
  eval_batches = data.eval_batches(eval_set, config.batch_size, config.max_length, config.packing)
  log = metrics.MetricsLog(output_dir, start)
  summary = {"start_step": start, "total_steps": total_steps, "data": report.as_dict()}
  if start == 0 and eval_batches:  # the student before tuning: the baseline of eval_loss
    summary["initial_eval_loss"] = evaluate(eval_step, params, eval_batches, mesh)
    log.write(0, eval_loss=summary["initial_eval_loss"])
  try:
    if start < total_steps:
      summary.update(_loop(config, params, opt_state, start, total_steps, plan, train_step, eval_step,
                           eval_batches, schedule, mesh, manager, log))
      params = summary.pop("params")
    manager.wait()
  finally:
    manager.close()
    log.close()
  hf_dir = export.export(params, student_path, tokenizer, output_dir / HF_DIR, tied=cfg.tie_word_embeddings,
                         end_ids=list(fmt.end_ids), export_dtype=config.export_dtype)
  summary.update(hf_dir=str(hf_dir), wall_seconds=time.perf_counter() - started)
  logging.info("done: %s", summary)
  return summary


def _check_vocabulary(tokenizer, cfg, student: str) -> None:
  """Refuses a tokenizer with ids past the model's embedding: they would train to NaN."""
  ids = list(tokenizer.get_vocab().values()) + list(getattr(tokenizer, "added_tokens_decoder", None) or {})
  if ids and max(ids) >= cfg.vocab_size:
    raise CoditError(f"the tokenizer of {student} has token ids up to {max(ids)}, but the model has {cfg.vocab_size} "
                     "embedding rows (config.json vocab_size): those ids would train to NaN. Use the student's own "
                     "tokenizer files.")


def _stop_if_not_finite(step_metrics: list[dict], step: int, manager) -> None:
  """Ends the run before a checkpoint or export of diverged weights."""
  bad = next((m for m in step_metrics if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))), None)
  if bad is not None:
    last = manager.latest_step()
    raise CoditError(
        f"training diverged: loss {float(bad['loss'])}, gradient norm {float(bad['grad_norm'])} by step {step}. "
        f"Nothing of these steps was saved or exported (the last checkpoint is {f'step {last}' if last else 'none'}). "
        "Lower learning_rate or raise warmup_steps (or use compute_dtype=float32), in a new output_dir.")


def _initial_state(config, cfg, student_path, mesh, manager, start: int, total_steps: int):
  """(layout, params, opt_state, optimizer, schedule, param shardings, optimizer-state shardings):
  the student's weights and a fresh optimizer, or checkpoint `start` when resuming."""
  abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=checkpoints.DTYPES[config.dtype], rngs=nnx.Rngs(0)))
  use_expert_parallelism(abstract, mesh)
  layout, shapes = steps.ParamLayout.of(abstract)
  shardings = steps.param_shardings(shapes, mesh, config.fsdp)
  tx, schedule = steps.make_optimizer(config, total_steps)
  opt_shapes = jax.eval_shape(tx.init, shapes)
  opt_shardings = steps.state_shardings(opt_shapes, shapes, shardings, mesh)
  if start:
    params, opt_state, progress = manager.restore(
        start, checkpointing.abstract_like(shapes, shardings), checkpointing.abstract_like(opt_shapes, opt_shardings))
    position = start * config.grad_accumulation
    if progress.get("data_position") != position:
      raise CoditError(f"checkpoint {start} records data position {progress.get('data_position')}, not "
                       f"{position}: it was written by another run. Choose another output_dir.")
  else:
    _, params = steps.ParamLayout.of(checkpoints.load_model(student_path, config.dtype, mesh, config.fsdp))
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return layout, params, opt_state, tx, schedule, shardings, opt_shardings


def _loop(config, params, opt_state, start, total_steps, plan, train_step, eval_step, eval_batches, schedule,
          mesh, manager, log) -> dict:
  accumulation = config.grad_accumulation
  batches = plan.batches(start * accumulation)
  window, timer_start, timed_tokens = [], None, 0
  epoch = loss = eval_loss = None
  for step in range(start + 1, total_steps + 1):
    for _ in range(accumulation):
      epoch, batch = next(batches)
      params, opt_state, step_metrics = train_step(params, opt_state, _device_batch(batch, mesh))
      if timer_start is None:  # the first step compiles: time the steps after it
        jax.block_until_ready(step_metrics)
        timer_start = time.perf_counter()
      else:
        timed_tokens += int(batch["tokens"].size - np.sum(batch["segment_ids"] == 0))
      window.append(step_metrics)
    if step % config.checkpoint_every == 0 or step == total_steps:
      _stop_if_not_finite([jax.device_get(window[-1])], step, manager)
      manager.save(step, params, opt_state, {"step": step, "data_position": step * accumulation, "epoch": epoch})
    if step % config.log_every == 0 or step == total_steps:
      host = jax.device_get(window)
      _stop_if_not_finite(host, step, manager)
      elapsed = time.perf_counter() - timer_start
      loss = float(np.mean([m["loss"] for m in host]))
      log.write(step, loss=loss, learning_rate=float(schedule(step - 1)),
                grad_norm=float(np.mean([m["grad_norm"] for m in host])),
                trained_tokens=float(np.sum([m["trained_tokens"] for m in host])),
                tokens_per_second=timed_tokens / elapsed if elapsed > 0 and timed_tokens else 0.0, epoch=epoch)
      window, timed_tokens = [], 0
    if eval_batches and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
      eval_loss = evaluate(eval_step, params, eval_batches, mesh)
      log.write(step, eval_loss=eval_loss)
    if not window:  # after a log line: time the next window from here, without logging and eval
      timer_start = time.perf_counter()
  return {"params": params, "final_loss": loss, "eval_loss": eval_loss, "epochs_started": epoch + 1}
