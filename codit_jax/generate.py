"""codit-generate: synthesize an instruction-tuning dataset by CoDIT (or direct) decoding.

    python -m codit_jax.generate --config=configs/demo.py
    python -m codit_jax.generate --config=configs/qwen3_8b.py \
        --config.prompts=seed.jsonl --config.output_dir=/data/codit-qwen3-8b

The run checks everything it can before touching output_dir or loading a
model (settings, checkpoint folders, tokenizers, the prompts), then claims
output_dir, skips the ids whose rows are already written and decodes the rest
through the continuously batched engine, handing each row to the writer as it
finishes. Rerunning the same command after a crash or Ctrl-C finishes the
dataset; its records by id equal an uninterrupted run's. A prompt that changed
under an id already written is refused, never passed off as done. With several
processes (a TPU pod; or --coordinator_address, --num_processes, --process_id),
every process reads the prompts, makes the same admit decisions, feeds one
global mesh and writes its own shards; `output_dir` must then be shared (gs://).
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import json
import math
import os
import time

import jax
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from codit_jax import __version__, checkpoints, memory, parallel, runtime
from codit_jax.data import instructions, prompts, repetition
from codit_jax.data import writer as writer_lib
from codit_jax.decoding import engine as engine_lib
from codit_jax.decoding import repetition_stop
from codit_jax.errors import CoditError
from codit_jax.models.decoder import cache_length

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
# Config keys that change how fast or how verbosely a run goes, or where it writes, but no record
# of the dataset: a resumed run may change them. Every other key decides the content and must be
# repeated (run.json, the resume guard). The prompts are guarded by their content (each row's id
# and prompt digest), not by the file's path.
_NOT_CONTENT_KEYS = frozenset({
    "output_dir", "prompts", "batch_size", "model_parallelism", "pair_parallel", "compilation_cache_dir",
    "log_every_seconds", "chunk_steps", "admit_tokens", "rows_per_shard", "strict_input", "kv_cache_gib",
    "profile_dir", "profile_chunks"})
# What direct mode does not read: its dataset is the same whatever these are, so a resumed run may change them.
_UNUSED_IN_DIRECT_MODE = frozenset({"alpha", "beta", "pre_trained"})
# Prompts up to this many tokens run in the main pass; longer ones (up to max_prompt_len) after it,
# in fewer slots sized for them, within the same memory.
MAIN_PROMPT_LEN = 2048
_REQUIRED = ("post_trained", "prompts", "output_dir")
_LONG_PROMPT_POLICIES = ("skip", "truncate")


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
  """Refuses a config that cannot run, before anything is read, loaded or written."""
  missing = [key for key in _REQUIRED if not config.get(key)]
  if config.mode == "codit" and not config.pre_trained:
    missing.append("pre_trained")
  if missing:
    raise CoditError(f"the config leaves {', '.join(missing)} empty. Set them in the config file or with "
                     f"--config.{missing[0]}=..., e.g. --config=configs/default.py "
                     "--config.post_trained=Qwen/Qwen3-0.6B --config.pre_trained=Qwen/Qwen3-0.6B-Base "
                     "--config.prompts=seed.jsonl --config.output_dir=out.")
  engine_lib.check_sampling(config.mode, config.alpha, config.beta, config.temperature, config.top_p,
                            config.top_k, config.max_new_tokens)
  if config.dtype not in checkpoints.DTYPES:
    raise CoditError(f"dtype {config.dtype!r} is not supported: set --config.dtype to one of "
                     f"{', '.join(checkpoints.DTYPES)}.")
  for key in ("batch_size", "chunk_steps", "admit_tokens", "rows_per_shard", "min_bucket", "profile_chunks"):
    if config[key] < 1:
      raise CoditError(f"{key} must be at least 1; got {config[key]}.")
  if config.max_prompt_len < 0:
    raise CoditError(f"max_prompt_len must be >= 0 (0: from the model's context); got {config.max_prompt_len}.")
  if config.long_prompts not in _LONG_PROMPT_POLICIES:
    raise CoditError(f"long_prompts {config.long_prompts!r} is not one of {', '.join(_LONG_PROMPT_POLICIES)}.")
  if "://" in config.profile_dir:
    raise CoditError(f"profile_dir {config.profile_dir!r} must be a local folder (jax.profiler writes with the "
                     "local file system): profile to one, then copy it (gcloud storage cp -r).")
  if config.get("pair_parallel") and config.mode != "codit":
    raise CoditError("pair_parallel splits the devices between the two models of a CoDIT pair; "
                     f"mode {config.mode!r} runs one model: set pair_parallel=False.")


@dataclasses.dataclass(frozen=True)
class Prompt:
  id: str
  instruction: str  # as the model read it (shortened if truncated)
  ids: tuple[int, ...]

  @property
  def digest(self) -> str:
    """What the row of this id is answered from: a rerun refuses a row whose prompt changed."""
    text = json.dumps([self.instruction, list(self.ids)], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_prompts(config, tokenizer, max_prompt_len: int, enable_thinking):
  """The prompts to answer in input order, and the report of what was skipped or truncated."""
  fields = instructions.FieldMap.parse(config.prompt_fields)
  report = instructions.InputReport(config.prompts)
  started = time.perf_counter()
  records = list(instructions.read_instructions(
      config.prompts, format=config.prompts_format or None, fields=fields, split=config.tfds_split,
      tfds_data_dir=config.tfds_data_dir, strict=config.strict_input, report=report))
  fitted = prompts.fit_prompts(tokenizer, records, max_prompt_len, config.long_prompts,
                               system_prompt=config.system_prompt, enable_thinking=enable_thinking, report=report)
  result = [Prompt(record.id, fit.instruction, tuple(fit.ids)) for record, fit in zip(records, fitted)
            if fit.ids is not None]
  if not result:
    raise CoditError(f"{config.prompts} holds no usable prompt, so nothing was written. {report.summary()}")
  logging.info("%s: %d prompts read and tokenized in %.1f s.", config.prompts, len(result),
               time.perf_counter() - started)
  return result, report


def prompts_to_do(items: list[Prompt], finished: dict[str, str], output_dir: str) -> list[Prompt]:
  """The prompts whose ids have no row yet; refuses rows that these prompts would not have written.

  A rerun resumes by id: new ids (prompts appended to the input) are answered,
  ids already written are skipped, but only when their rows were written from
  the same prompts.
  """
  digests = {p.id: p.digest for p in items}
  changed = [i for i, digest in digests.items() if i in finished and finished[i] != digest]
  if changed:
    raise CoditError(
        f"{output_dir} holds rows written from other prompts: the prompt of id {changed[0]!r} has changed "
        f"since its row was written ({len(changed)} id(s) differ). Write to a new output_dir, or pass --force "
        "to delete this dataset and start over.")
  gone = sorted(set(finished) - set(digests))
  if gone:
    raise CoditError(
        f"{output_dir} holds rows of {len(gone)} id(s) that the prompts no longer have (first: {gone[0]!r}): "
        "it was written from other prompts. Write to a new output_dir, or pass --force to delete this "
        "dataset and start over.")
  return [p for p in items if p.id not in finished]


class Progress:
  """A periodic log line: prompts done, live slots, slot utilization, tokens/s, ETA."""

  def __init__(self, total_prompts: int, done_before: int, every_seconds: float, batch_size: int):
    self.total, self.done_before, self.every, self.batch_size = total_prompts, done_before, every_seconds, batch_size
    self.started = self.last = time.perf_counter()

  def update(self, stats, force: bool = False) -> None:
    now = time.perf_counter()
    if not force and now - self.last < self.every:
      return
    self.last = now
    done = self.done_before + stats.prompts_done
    rate = stats.prompts_done / max(now - self.started, 1e-9)
    eta = (self.total - done) / rate if rate else float("nan")
    waiting = stats.utilization_while_waiting  # NaN while no prompt ever waited (fewer prompts than slots)
    logging.info("prompts %d/%d (%.1f%%) | live slots %d/%d | slot utilization %.1f%%%s | %.0f tokens/s | elapsed %s "
                 "| ETA %s", done, self.total, 100 * done / max(self.total, 1), stats.live_slots, self.batch_size,
                 100 * stats.utilization, "" if math.isnan(waiting) else f" ({100 * waiting:.1f}% while prompts wait)",
                 stats.tokens_per_second, _clock(now - self.started), _clock(eta))


class ChunkProfiler:
  """A jax.profiler trace of `chunks` decode chunks (and the admits between them), written to
  `directory` as TensorBoard / XProf reads it, with a Perfetto trace beside it. It starts after the
  first chunk: before that the time goes to compiling, which a profile of the steady state would
  only blur. Ops are named by their block (jax.named_scope): step_post_trained/layer_3/attention,
  prefill_pre_trained/..., score, sample."""

  def __init__(self, directory: str, chunks: int):
    self.directory, self.chunks = directory, chunks
    self.seen, self.tracing = 0, False

  def on_chunk(self) -> None:
    self.seen += 1
    if self.seen == 1:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.tracing = True
    elif self.seen == 1 + self.chunks:
      self.stop()

  def stop(self) -> None:
    """Ends the trace (a run with fewer chunks ends it at its end) and writes it."""
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()
      logging.info("profile of %d decode chunks written to %s: open it with TensorBoard or XProf, or its "
                   "perfetto_trace.json.gz in ui.perfetto.dev.", min(self.seen - 1, self.chunks), self.directory)


def _clock(seconds: float) -> str:
  return "?" if seconds != seconds else str(datetime.timedelta(seconds=int(seconds)))


def run_settings(config) -> dict:
  """The settings that decide the dataset's content (run.json, the resume guard)."""
  return {key: value for key, value in config.items() if key not in _not_content_keys(config)}


def _not_content_keys(config) -> frozenset:
  return _NOT_CONTENT_KEYS | (_UNUSED_IN_DIRECT_MODE if config.mode == "direct" else frozenset())


def main(argv) -> None:
  if len(argv) > 1:
    raise CoditError(f"unexpected arguments {argv[1:]}; settings go in --config.<key>=<value>.")
  if _CONFIG.value is not None:
    split_host_for_pair(_CONFIG.value, bool(FLAGS.num_processes or FLAGS.coordinator_address
                                            or any(os.environ.get(name) for name in _CLUSTER_MARKERS)))
  initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  generate(_CONFIG.value, force=FLAGS.force)


# Whether this process made JAX's CPU backend two devices for pair_parallel (split_host_for_pair).
_HOST_SPLIT_FOR_PAIR = False


def split_host_for_pair(config, multi_process) -> bool:
  """Makes JAX's CPU backend two devices when codit-generate may run the pair on them.

  XLA:CPU runs the ops of a program one after another, so one CPU device steps the two models
  of a CoDIT pair on one core. With two host devices, pair_parallel steps each model on a core of
  its own, at the same time (the same tokens; 1.3x the decoding speed on 2 cores). Done when
  pair_parallel is left to codit-generate (None), in CoDIT mode, as one process, on two or more
  cores, and when nobody chose the CPU device count (XLA_FLAGS, jax_num_cpu_devices): before JAX
  starts its backends, when it does not know yet whether it will run on CPU. On a GPU or TPU host
  the CPU devices go unused. Returns whether it did.
  """
  global _HOST_SPLIT_FOR_PAIR
  if (config.get("pair_parallel") is not None or config.get("mode") != "codit" or multi_process
      or len(os.sched_getaffinity(0)) < 2 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
      or jax.config.jax_num_cpu_devices != -1):
    return False
  jax.config.update("jax_num_cpu_devices", 2)
  _HOST_SPLIT_FOR_PAIR = True
  return True


def _pair_parallel(config, post_cfg, pre_cfg) -> bool:
  """pair_parallel as set; left None, on where codit-generate split the CPU host for it
  (`split_host_for_pair`) and the pair can be stacked (logged either way)."""
  if config.get("pair_parallel") is not None:
    return bool(config.pair_parallel)
  if not (_HOST_SPLIT_FOR_PAIR and jax.default_backend() == "cpu" and jax.device_count() == 2):
    return False
  problem = checkpoints.pair_problem(post_cfg, pre_cfg)
  if problem:
    logging.info("pair_parallel off: %s.", problem)
    return False
  logging.info("pair_parallel on: CPU host, one model per core (two host devices).")
  return True


def _run_devices(pair_parallel: bool) -> list:
  """The devices a run uses: all, but one of the two host devices made for a pair that does not use them."""
  devices = jax.devices()
  unused = _HOST_SPLIT_FOR_PAIR and not pair_parallel and jax.default_backend() == "cpu" and jax.process_count() == 1
  return devices[:1] if unused else devices




def generate(config, force: bool = False) -> dict:
  """Runs the job of `config`; returns the summary (also logged) on process 0, {} on the others.

  force: delete a dataset in output_dir written with other settings or prompts (only the files
  that codit-generate wrote).
  """
  try:
    return _generate(config, force)
  finally:
    runtime.release_folder_locks()  # output_dir's lock, which process 0 takes when it claims the folder


def _generate(config, force: bool) -> dict:
  if config is None:
    raise CoditError("no config: pass --config=configs/<file>.py (configs/demo.py runs offline).")
  validate(config)
  if config.compilation_cache_dir:
    engine_lib.enable_compilation_cache(os.path.expanduser(config.compilation_cache_dir))
  process, num_processes = jax.process_index(), jax.process_count()
  if config.batch_size % num_processes:
    raise CoditError(f"batch_size {config.batch_size} is global and must split evenly over "
                     f"{num_processes} processes.")

  # Everything that needs no model weights is checked before output_dir is touched.
  codit = config.mode == "codit"
  post_path = checkpoints.resolve(config.post_trained)
  pre_path = checkpoints.resolve(config.pre_trained) if codit else None
  _, post_cfg = checkpoints.load_config(post_path)
  pre_cfg = checkpoints.load_config(pre_path)[1] if codit else None
  for path in (post_path, pre_path) if codit else (post_path,):
    checkpoints.SafetensorsFolder(path)  # the weights are there (reads the headers only)
  post_tokenizer = checkpoints.load_tokenizer(post_path, "post_trained")
  if codit:
    vocab_size = engine_lib.check_vocabularies(post_tokenizer, checkpoints.load_tokenizer(pre_path, "pre_trained"),
                                               config.post_trained, config.pre_trained)
  else:
    vocab_size = prompts.real_vocab_size(post_tokenizer, config.post_trained)
  end_ids = tuple(prompts.end_token_ids(post_tokenizer, post_path))
  context = post_cfg.max_position_embeddings
  if config.max_new_tokens >= context:
    raise CoditError(f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt in the context of "
                     f"{config.post_trained} ({context} positions). Lower it below {context}.")
  max_prompt_len = config.max_prompt_len or context - config.max_new_tokens
  if max_prompt_len + config.max_new_tokens > context:
    raise CoditError(
        f"max_prompt_len {max_prompt_len} + max_new_tokens {config.max_new_tokens} exceeds the context of "
        f"{config.post_trained} ({post_cfg.max_position_embeddings} positions). Lower one of them.")
  enable_thinking = (prompts.default_enable_thinking(post_tokenizer) if config.enable_thinking is None
                     else config.enable_thinking)
  decode_settings = engine_lib.DecodeSettings(
      vocab_size=vocab_size, end_ids=end_ids, mode=config.mode, alpha=config.alpha, beta=config.beta,
      temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
      max_new_tokens=config.max_new_tokens, pair_parallel=_pair_parallel(config, post_cfg, pre_cfg),
      stop_repetitive=repetition_stop.RepetitionRule() if config.stop_repetitive else None)
  items, report = read_prompts(config, post_tokenizer, max_prompt_len, enable_thinking)
  main_prompt_len = min(MAIN_PROMPT_LEN, max_prompt_len)
  has_long = any(len(p.ids) > main_prompt_len for p in items)
  memory_plan = _memory_plan(config, decode_settings, [post_cfg] + ([pre_cfg] if codit else []),
                             main_prompt_len, max_prompt_len if has_long else 0)
  if has_long and not memory_plan.slots_long:
    items = _skip_long(items, main_prompt_len, memory_plan, report)

  settings = run_settings(config)
  writer = writer_lib.DatasetWriter(config.output_dir, settings, process_index=process, num_processes=num_processes,
                                    rows_per_shard=config.rows_per_shard, write_jsonl=config.write_jsonl,
                                    write_parquet=config.write_parquet, not_content=_not_content_keys(config))
  writer.check_claimable(force=force)
  try:
    prompts_to_do(items, writer.finished(), config.output_dir)
    restart = False
  except CoditError:
    if not force:
      raise
    restart = True  # rows of other prompts: --force deletes the dataset
  if process == 0:
    writer.claim(force=force, restart=restart)
  _barrier("claimed")
  todo = prompts_to_do(items, writer.finished(), config.output_dir)
  _check_same_plan(todo)
  logging.info("%d prompts; %d already written, %d to do.", len(items), len(items) - len(todo), len(todo))

  if todo:
    mesh = parallel.make_mesh(memory_plan.model_parallelism, _run_devices(decode_settings.pair_parallel),
                              pair_parallel=decode_settings.pair_parallel)
    passes = [(main_prompt_len, memory_plan.slots_main, [p for p in todo if len(p.ids) <= main_prompt_len]),
              (max_prompt_len, memory_plan.slots_long, [p for p in todo if len(p.ids) > main_prompt_len])]
    passes = [(prompt_len, slots, group) for prompt_len, slots, group in passes if group]

    def compiling_engine(post, pre, prompt_len: int, slots: int, group: list[Prompt]) -> engine_lib.Engine:
      engine = engine_lib.Engine(post, pre, decode_settings, batch_size=slots, max_prompt_len=prompt_len,
                                 seed=config.seed, mesh=mesh, min_bucket=config.min_bucket,
                                 chunk_steps=config.chunk_steps, admit_tokens=config.admit_tokens)
      engine.compile_ahead([len(p.ids) for p in group])
      return engine

    # The first pass's programs compile from the models' shapes while their weights load.
    first = compiling_engine(*_load_models(config, decode_settings, post_path, pre_path, mesh, abstract=True),
                             *passes[0])
    loading = time.perf_counter()
    post, pre = _load_models(config, decode_settings, post_path, pre_path, mesh)
    logging.info("weights loaded in %.1f s.", time.perf_counter() - loading)
    first.use_models(post, pre)
    done = len(items) - len(todo)
    profiler = None
    if config.profile_dir:  # a folder per process: processes of one host would write the same file names
      profile_dir = os.path.expanduser(config.profile_dir)
      profiler = ChunkProfiler(os.path.join(profile_dir, f"process_{process}") if num_processes > 1 else profile_dir,
                               config.profile_chunks)
    try:
      for i, (prompt_len, slots, group) in enumerate(passes):
        if prompt_len > main_prompt_len:
          logging.info("long prompts: %d prompts over %d tokens, in %d slots sized for %d.", len(group),
                       main_prompt_len, slots, prompt_len)
        engine = first if i == 0 else compiling_engine(post, pre, prompt_len, slots, group)
        progress = Progress(len(items), done, config.log_every_seconds, slots)

        def on_chunk(stats, progress=progress):
          progress.update(stats)
          if profiler is not None:
            profiler.on_chunk()

        by_id = {p.id: p for p in group}
        for completion in engine.run([(p.id, p.ids) for p in group], on_chunk=on_chunk):
          prompt = by_id[completion.id]
          writer.add(_example(prompt, completion, post_tokenizer), prompt.digest)
        progress.update(engine.stats, force=True)
        done += len(group)
    finally:
      if profiler is not None:
        profiler.stop()
      writer.flush()  # on Ctrl-C too: the rows that finished are kept, and a rerun resumes after them

  _barrier("written")
  summary = {}
  if process == 0:
    writer.finish(_metadata(settings, config, vocab_size, end_ids, report), _description(config))
    summary = _summarize(writer.output_dir, report, new_rows=len(todo))
  _barrier("finished")
  return summary


def _memory_plan(config, decode_settings, cfgs, main_prompt_len: int, long_prompt_len: int) -> memory.MemoryPlan:
  """Devices per model and slots of each pass, from the devices' memory; logged."""
  n = decode_settings.max_new_tokens
  len_main = cache_length(main_prompt_len + n)
  len_long = cache_length(long_prompt_len + n) if long_prompt_len else 0
  models = [memory.ModelMemory.from_config(cfg, config.dtype, len_main, len_long, name=name)
            for cfg, name in zip(cfgs, ("post_trained", "pre_trained"))]
  result = memory.plan(models, device_memory=memory.device_memory_bytes(),
                       device_count=len(_run_devices(decode_settings.pair_parallel)),
                       batch_size=config.batch_size, kv_cache_gib=config.kv_cache_gib,
                       model_parallelism=config.model_parallelism, pair_parallel=decode_settings.pair_parallel)
  weights = " + ".join(f"{m.weight_bytes / memory.GiB:.2f}" for m in models)
  logging.info("memory: weights %s GiB (%s); %s", weights, config.dtype, result.describe())
  return result


def _skip_long(items: list[Prompt], main_prompt_len: int, memory_plan, report) -> list[Prompt]:
  """Prompts over main_prompt_len when not one longer slot fits in memory: reported and left out."""
  for p in items:
    if len(p.ids) > main_prompt_len:
      report.add("prompt_too_long_for_memory", f"id {p.id!r}",
                 f"prompt of {len(p.ids)} tokens needs a slot of {memory_plan.slot_bytes_long / memory.GiB:.2f} GiB "
                 "per device, and none fits: use more devices per model or a smaller max_new_tokens")
  return [p for p in items if len(p.ids) <= main_prompt_len]


def _load_models(config, decode_settings, post_path, pre_path, mesh, abstract: bool = False):
  """(post, pre or None): the model(s) loaded onto the mesh, or (abstract) their shapes and shardings."""
  if decode_settings.pair_parallel:  # both models stacked, one per half of the devices
    return checkpoints.load_pair(post_path, pre_path, mesh, config.dtype, abstract=abstract), None
  post = checkpoints.load_model(post_path, config.dtype, mesh, abstract=abstract)
  pre = checkpoints.load_model(pre_path, config.dtype, mesh, abstract=abstract) if decode_settings.mode == "codit" \
      else None
  return post, pre


def _check_same_plan(todo: list[Prompt]) -> None:
  """Every process must decode the same prompts, since all make the same admit decisions: they read
  the finished rows from one output_dir that they share."""
  if jax.process_count() == 1:
    return
  mine = np.frombuffer(hashlib.sha256("\n".join(p.id for p in todo).encode()).digest()[:8], np.uint8)
  everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), -1)
  if not (everyone == everyone[0]).all():
    raise CoditError("the processes see different finished rows in output_dir: it must be one folder that all "
                     "of them share (e.g. gs://...), not a local folder on each host.")


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"codit-generate-{name}")


def _example(prompt: Prompt, completion, tokenizer) -> dict:
  response = tokenizer.decode(completion.tokens, skip_special_tokens=True)
  return {
      "id": prompt.id, "instruction": prompt.instruction, "response": response,
      "finish_reason": completion.finish_reason, "response_tokens": completion.tokens,
      "post_logprobs": completion.post_logprobs, "pre_logprobs": completion.pre_logprobs,
      "codit_logprobs": completion.codit_logprobs, "end_codit_logprob": completion.end_codit_logprob,
      "repetitive": repetition.is_repetitive(response),
  }


def _metadata(settings: dict, config, vocab_size: int, end_ids, report) -> dict:
  return dict(settings, prompts=config.prompts, codit_jax_version=__version__, vocab_size=vocab_size,
              end_ids=list(end_ids), skipped_inputs=dict(report.counts))


def _description(config) -> str:
  source = f"{config.post_trained} contrasted with {config.pre_trained}" if config.mode == "codit" else \
      f"{config.post_trained} alone (direct mode)"
  return (f"Instruction-tuning responses to {config.prompts}, written by {source} with codit-jax "
          f"(alpha={config.alpha}, beta={config.beta}, temperature={config.temperature}, top_p={config.top_p}, "
          f"top_k={config.top_k}, max_new_tokens={config.max_new_tokens}, seed={config.seed}).")


def _summarize(output_dir: str, report, new_rows: int) -> dict:
  """Rows by finish reason, the repetitive fraction, skipped inputs by kind; logged and returned."""
  reasons, repetitive, rows = collections.Counter(), 0, 0
  # Read without TensorFlow (TFDS's tf.data read-back would import it: seconds of start-up).
  for example in writer_lib.read_fields(output_dir, ("finish_reason", "repetitive")):
    reasons[example["finish_reason"]] += 1
    repetitive += int(example["repetitive"])
    rows += 1
  summary = {"rows": rows, "new_rows": new_rows, "finish_reason": dict(reasons),
             "repetitive_fraction": repetitive / max(rows, 1), "skipped_inputs": dict(report.counts),
             "output_dir": output_dir}
  logging.info("Dataset %s: %d rows (%s), repetitive %.1f%%.", output_dir, rows,
               ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items())), 100 * summary["repetitive_fraction"])
  logging.info("Input: %s", report.summary())
  if not new_rows:
    what = f"already complete: {rows} rows in {output_dir}"
  else:
    what = f"wrote {new_rows} row{'' if new_rows == 1 else 's'} to {output_dir}" + (f", {rows} in all" if rows != new_rows else "")
  print(f"codit-generate: {what} "
        f"({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}; repetitive "
        f"{100 * summary['repetitive_fraction']:.1f}%). {report.summary()}")
  return summary




def run() -> None:
  """Console script entry point (codit-generate); errors a user can act on are one line."""
  runtime.run_app(main, "codit-generate", _HELP, keys_file="configs/default.py",
                  resume_hint="rerun the same command to resume: the shards already written are kept",
                  out_of_memory_hint="Plan less KV cache per device: --config.kv_cache_gib (the log's 'memory:' "
                  "line shows what was planned) or a smaller --config.batch_size, or spread each model over more "
                  "devices (--config.model_parallelism). None of these changes the dataset: rerun with them and "
                  "the shards already written are kept")


if __name__ == "__main__":
  run()
