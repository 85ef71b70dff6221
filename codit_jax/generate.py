"""codit-generate: synthesize an instruction-tuning dataset by CoDIT (or direct) decoding.

    python -m codit_jax.generate --config=configs/demo.py
    python -m codit_jax.generate --config=configs/qwen3_8b.py \
        --config.prompts=seed.jsonl --config.output_dir=/data/codit-qwen3-8b

The run reads every prompt, plans the batches deterministically (prompts sorted
by token length, then cut into batches of `batch_size`), skips the batches
whose shards already exist in `output_dir`, and decodes the rest. Rerunning the
same command after a crash finishes the dataset; the result equals an
uninterrupted run's. With several processes (a TPU pod; or --coordinator_address,
--num_processes, --process_id), every process reads the prompts, feeds its rows
of each batch into one global mesh and writes its own shards; `output_dir`
must then be shared (e.g. gs://).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import os
import sys
import time

import jax
import numpy as np
import tensorflow_datasets as tfds
import transformers
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from codit_jax import __version__, checkpoints, parallel, runtime
from codit_jax.data import instructions, prompts, repetition
from codit_jax.data import writer as writer_lib
from codit_jax.decoding import engine as engine_lib
from codit_jax.errors import CoditError

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file (configs/*.py).",
                                          lock_config=True)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_bool("force", False, "Delete an existing dataset in output_dir written with other settings.")

_HELP = """\
USAGE: codit-generate --config=FILE [--config.KEY=VALUE ...] [flags]
       python -m codit_jax.generate --config=FILE [--config.KEY=VALUE ...] [flags]

Synthesize an instruction-tuning dataset by CoDIT (or direct) decoding.

  --config=FILE        an ml_collections config file: configs/demo.py (offline, a minute on CPU),
                       configs/qwen3_8b.py and the other teacher pairs in configs/
  --config.KEY=VALUE   override one key of that config, e.g. --config.max_new_tokens=512
                       --config.prompts=seed.jsonl --config.output_dir=/data/codit

Every key, its default and its meaning: configs/default.py; README.md, "Synthesizing a dataset".
Rerunning the same command after a crash or Ctrl-C resumes the dataset."""

# Environment variables that mark a cluster where jax.distributed.initialize() finds its peers itself.
_CLUSTER_MARKERS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS",
                    "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")
# Settings that decide the dataset's content; a resumed run must repeat them.
_RUN_KEYS = ("post_trained", "pre_trained", "prompts", "mode", "alpha", "beta", "temperature", "top_p",
             "top_k", "max_new_tokens", "seed", "enable_thinking", "system_prompt", "prompt_fields",
             "prompts_format", "tfds_split", "max_prompt_len", "long_prompts", "dtype", "batch_size",
             "min_bucket", "write_jsonl")
_REQUIRED = ("post_trained", "prompts", "output_dir")


def initialize_distributed(coordinator_address, num_processes, process_id) -> None:
  """Starts jax.distributed when asked to or on a detected cluster; otherwise one process."""
  if coordinator_address or num_processes:
    if not (coordinator_address and num_processes and process_id is not None):
      raise CoditError("a multi-process run needs all of --coordinator_address, --num_processes and "
                       "--process_id (or none of them, for auto-detection on TPU pods and GPU clusters).")
    # Cross-process collectives of the CPU backend (tests, CPU clusters); accelerators have their own.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif any(os.environ.get(name) for name in _CLUSTER_MARKERS) or os.path.exists("/dev/accel0"):
    try:
      jax.distributed.initialize()
    except Exception as e:  # a single TPU VM or a lone GPU host: nothing to join
      logging.info("jax.distributed not started (%s); running as one process.", e)


def validate(config) -> None:
  missing = [key for key in _REQUIRED if not config.get(key)]
  if config.mode == "codit" and not config.pre_trained:
    missing.append("pre_trained")
  if missing:
    raise CoditError(f"the config leaves {', '.join(missing)} empty. Set them in the config file or with "
                     f"--config.{missing[0]}=..., e.g. --config=configs/default.py "
                     "--config.post_trained=Qwen/Qwen3-0.6B --config.pre_trained=Qwen/Qwen3-0.6B-Base "
                     "--config.prompts=seed.jsonl --config.output_dir=out.")
  if config.batch_size < 1:
    raise CoditError(f"batch_size must be at least 1; got {config.batch_size}.")
  if config.get("pair_parallel") and config.mode != "codit":
    raise CoditError("pair_parallel splits the devices between the two models of a CoDIT pair; "
                     f"mode {config.mode!r} runs one model: set pair_parallel=False.")


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  instruction: str  # as the model read it (shortened if truncated)
  ids: tuple[int, ...]


def read_prompts(config, tokenizer, max_prompt_len: int, enable_thinking):
  """The prompts to answer in input order, and the report of what was skipped or truncated."""
  fields = instructions.FieldMap.parse(config.prompt_fields)
  report = instructions.InputReport(config.prompts)
  records = instructions.read_instructions(
      config.prompts, format=config.prompts_format or None, fields=fields, split=config.tfds_split,
      tfds_data_dir=config.tfds_data_dir, strict=config.strict_input, report=report)
  result = []
  for record in records:
    fitted = prompts.fit_prompt(tokenizer, record, max_prompt_len, config.long_prompts,
                                system_prompt=config.system_prompt, enable_thinking=enable_thinking,
                                report=report)
    if fitted.ids is not None:
      result.append(Prompt(record.id, fitted.instruction, tuple(fitted.ids)))
  return result, report


def plan_batches(items: list[Prompt], batch_size: int) -> list[list[Prompt]]:
  """Batches of similar lengths, decided by the input alone, so that a rerun plans the same ones."""
  ordered = sorted(range(len(items)), key=lambda i: (len(items[i].ids), i))
  return [[items[i] for i in ordered[start:start + batch_size]] for start in range(0, len(ordered), batch_size)]


class Progress:
  """A periodic log line: prompts done, tokens/s, ETA."""

  def __init__(self, total_prompts: int, done_prompts: int, every_seconds: float):
    self.total, self.done, self.every = total_prompts, done_prompts, every_seconds
    self.started = self.last = time.perf_counter()
    self.done_at_start = done_prompts

  def update(self, prompts_done: int, engine, force: bool = False) -> None:
    self.done += prompts_done
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    rate = (self.done - self.done_at_start) / max(now - self.started, 1e-9)
    eta = (self.total - self.done) / rate if rate else float("nan")
    logging.info("prompts %d/%d (%.1f%%) | %.0f tokens/s | elapsed %s | ETA %s", self.done, self.total,
                 100 * self.done / max(self.total, 1), engine.tokens_per_second,
                 _clock(now - self.started), _clock(eta))


def _clock(seconds: float) -> str:
  return "?" if seconds != seconds else str(datetime.timedelta(seconds=int(seconds)))


def run_settings(config, num_processes: int) -> dict:
  settings = {key: config.get(key) for key in _RUN_KEYS}
  settings["num_processes"] = num_processes  # shard k holds process k % P's rows
  return settings


def main(argv) -> None:
  if len(argv) > 1:
    raise CoditError(f"unexpected arguments {argv[1:]}; settings go in --config.<key>=<value>.")
  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  generate(_CONFIG.value, force=FLAGS.force)


def generate(config, force: bool = False) -> dict:
  """Runs the job of `config`; returns the summary (also logged) on process 0, {} on the others.

  force: delete a dataset in output_dir that was written with other settings.
  """
  if config is None:
    raise CoditError("no config: pass --config=configs/<file>.py (configs/demo.py runs offline).")
  validate(config)
  if config.compilation_cache_dir:
    engine_lib.enable_compilation_cache(os.path.expanduser(config.compilation_cache_dir))
  process, num_processes = jax.process_index(), jax.process_count()
  if config.batch_size % num_processes:
    raise CoditError(f"batch_size {config.batch_size} is global and must split evenly over "
                     f"{num_processes} processes.")

  codit = config.mode == "codit"
  post_path = checkpoints.resolve(config.post_trained)
  pre_path = checkpoints.resolve(config.pre_trained) if codit else None
  post_tokenizer = transformers.AutoTokenizer.from_pretrained(post_path)
  if codit:
    vocab_size = engine_lib.check_vocabularies(post_tokenizer, transformers.AutoTokenizer.from_pretrained(pre_path),
                                               config.post_trained, config.pre_trained)
  else:
    vocab_size = len(post_tokenizer.get_vocab())
  _, post_cfg = checkpoints.load_config(post_path)
  end_ids = tuple(prompts.end_token_ids(post_tokenizer, post_path))
  max_prompt_len = config.max_prompt_len or min(2048, post_cfg.max_position_embeddings - config.max_new_tokens)
  if max_prompt_len < 1 or max_prompt_len + config.max_new_tokens > post_cfg.max_position_embeddings:
    raise CoditError(
        f"max_prompt_len {max_prompt_len} + max_new_tokens {config.max_new_tokens} exceeds the context of "
        f"{config.post_trained} ({post_cfg.max_position_embeddings} positions). Lower one of them.")
  enable_thinking = (prompts.default_enable_thinking(post_tokenizer) if config.enable_thinking is None
                     else config.enable_thinking)

  items, report = read_prompts(config, post_tokenizer, max_prompt_len, enable_thinking)
  batches = plan_batches(items, config.batch_size)
  settings = run_settings(config, num_processes)
  writer = writer_lib.DatasetWriter(config.output_dir, settings, write_jsonl=config.write_jsonl)
  if process == 0:
    writer.claim(force=force)
  _barrier("claimed")
  todo = _batches_to_do(writer, len(batches), process, num_processes)
  done_prompts = sum(len(b) for g, b in enumerate(batches) if g not in todo)
  logging.info("%d prompts in %d batches; %d batches already written, %d to do.", len(items), len(batches),
               len(batches) - len(todo), len(todo))

  if todo:
    pair_parallel = bool(config.get("pair_parallel"))
    mesh = parallel.make_mesh(config.model_parallelism, pair_parallel=pair_parallel)
    if pair_parallel:  # both models stacked, one per half of the devices
      post, pre = checkpoints.load_pair(post_path, pre_path, mesh, config.dtype), None
    else:
      post = checkpoints.load_model(post_path, config.dtype, mesh)
      pre = checkpoints.load_model(pre_path, config.dtype, mesh) if codit else None
    decode_settings = engine_lib.DecodeSettings(
        vocab_size=vocab_size, end_ids=end_ids, mode=config.mode, alpha=config.alpha, beta=config.beta,
        temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        max_new_tokens=config.max_new_tokens, pair_parallel=pair_parallel)
    engine = engine_lib.Engine(post, pre, decode_settings, batch_size=config.batch_size,
                               max_prompt_len=max_prompt_len, seed=config.seed, mesh=mesh,
                               min_bucket=config.min_bucket)
    progress = Progress(len(items), done_prompts, config.log_every_seconds)
    for g in todo:
      batch = batches[g]
      completions = engine.run_batch([(p.id, p.ids) for p in batch])
      by_id = {p.id: p for p in batch}
      writer.write_shard(g * num_processes + process,
                         [_example(by_id[c.id], c, post_tokenizer) for c in completions])
      progress.update(len(batch), engine)
    progress.update(0, engine, force=True)

  _barrier("written")
  summary = {}
  if process == 0:
    writer.finish(len(batches) * num_processes, _metadata(config, settings, vocab_size, end_ids),
                  _description(config))
    summary = _summarize(config.output_dir, report)
  _barrier("finished")
  return summary


def _batches_to_do(writer, num_batches: int, process: int, num_processes: int) -> list[int]:
  """Batches not yet written by every process (all processes must agree: a batch is one collective)."""
  finished = writer.finished_shards()
  mine = np.asarray([g * num_processes + process in finished for g in range(num_batches)], np.bool_)
  if num_processes > 1:
    mine = np.asarray(multihost_utils.process_allgather(mine)).reshape(num_processes, -1).all(axis=0)
  return [g for g in range(num_batches) if not mine[g]]


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"codit-generate-{name}")


def _example(prompt: Prompt, completion, tokenizer) -> dict:
  response = tokenizer.decode(completion.tokens, skip_special_tokens=True)
  return {
      "id": prompt.id, "instruction": prompt.instruction, "response": response,
      "finish_reason": completion.finish_reason, "response_tokens": completion.tokens,
      "post_logprobs": completion.post_logprobs, "pre_logprobs": completion.pre_logprobs,
      "repetitive": repetition.is_repetitive(response),
  }


def _metadata(config, settings: dict, vocab_size: int, end_ids) -> dict:
  return dict(settings, codit_jax_version=__version__, vocab_size=vocab_size, end_ids=list(end_ids))


def _description(config) -> str:
  source = f"{config.post_trained} contrasted with {config.pre_trained}" if config.mode == "codit" else \
      f"{config.post_trained} alone (direct mode)"
  return (f"Instruction-tuning responses to {config.prompts}, written by {source} with codit-jax "
          f"(alpha={config.alpha}, beta={config.beta}, temperature={config.temperature}, top_p={config.top_p}, "
          f"top_k={config.top_k}, max_new_tokens={config.max_new_tokens}, seed={config.seed}).")


def _summarize(output_dir: str, report) -> dict:
  """Rows by finish reason, the repetitive fraction, skipped inputs by kind; logged and returned."""
  builder = tfds.builder_from_directory(output_dir)
  decoders = tfds.decode.PartialDecoding({"finish_reason": True, "repetitive": True})
  reasons, repetitive, rows = collections.Counter(), 0, 0
  for example in tfds.as_numpy(builder.as_dataset(split=writer_lib.SPLIT, decoders=decoders)):
    reasons[example["finish_reason"].decode()] += 1
    repetitive += int(example["repetitive"])
    rows += 1
  summary = {"rows": rows, "finish_reason": dict(reasons), "repetitive_fraction": repetitive / max(rows, 1),
             "skipped_inputs": dict(report.counts), "output_dir": output_dir}
  logging.info("Dataset %s: %d rows (%s), repetitive %.1f%%.", output_dir, rows,
               ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())), 100 * summary["repetitive_fraction"])
  logging.info("Input: %s", report.summary())
  print(f"codit-generate: wrote {rows} rows to {output_dir} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}; repetitive "
        f"{100 * summary['repetitive_fraction']:.1f}%). {report.summary()}")
  return summary


def run() -> None:
  """Console script entry point (codit-generate); errors a user can act on are one line."""
  runtime.run_app(main, "codit-generate", _HELP, keys_file="configs/default.py",
                  resume_hint="rerun the same command to resume: the shards already written are kept")


if __name__ == "__main__":
  run()
