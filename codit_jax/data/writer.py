"""The output of codit-generate: a TFDS dataset written as rows finish, keyed by example id.

Rows finish in any order, one at a time, in several processes. Each process
buffers its finished rows and writes them as a shard every `rows_per_shard`
rows and when it flushes (at the end, on Ctrl-C). A rerun asks `finished()`
for the ids already written and decodes only the rest. At the end process 0
calls `finish()`, which turns the folder into a TFDS dataset over every shard
written so far, by any process and any earlier run.

Layout of `output_dir` (all files go through etils.epath: a local folder, with plain os calls, so
that a local run never imports TensorFlow; or gs://, through tf.io.gfile):

    run.json                            the settings that decide the dataset (resume guard)
    .codit-lock                         held (flock) by process 0 of the run writing here (local folders)
    parts/<part>.tfrecord               a shard's records, until finish() gives it its TFDS name
    parts/<part>.jsonl                  its records in the authors' JSONL layout (write_jsonl)
    parts/<part>.parquet                its records as Parquet, until finish() moves it (write_parquet)
    parts/<part>.index.json             its ids and prompt digests; written last: the shard's commit
    shards.json                         finish()'s plan: the part of each TFDS shard index, in order
    codit-train.tfrecord-00000 ...      the TFDS shards (after finish)
    dataset_info.json, features.json    TFDS metadata (after finish)
    parquet/train-00000.parquet ...     the Parquet files, one per TFDS shard (after finish, write_parquet)
    codit.jsonl                         every JSONL part in shard order (after finish, write_jsonl)

`<part>` is `p{process:05d}-{run start, ms:013d}-{random}-{count:05d}`: unique between
processes, and between a run and its resumptions, without any coordination.

Kill safety. A shard is committed by its index file alone, and the index is
written (to a temporary name, then renamed) only after the part's TFRecord,
JSONL and Parquet files are whole and closed. So at any kill point a shard is
either committed with all its files, or it is an orphan whose rows no index
names: `finished()` does not report them, the rerun decodes them again into a
new part, and `finish()` deletes the orphan. A row is never lost once its index
exists, and never counted twice, because each id is in exactly one index (the
engine only decodes ids `finished()` does not list; `finish()` refuses, naming
them, if two indexes ever hold one id).
`finish()` first extends the plan in shards.json (written atomically: old
entries keep their indices, new parts are appended), then renames each planned
part to its TFDS name. A rename is idempotent: where the part is gone and its
TFDS name exists it was done already (a rename on gs:// is copy-then-delete,
and both may exist: the copy is whole, so it is overwritten again). A killed
finish() is completed by calling it again. Index files never move, so
`finished()` reads the same ids before, during and after finish(): it lists
parts/ and reads its small index files, never the TFRecords.

Record order. Within a shard, rows are in the order `add()` received them (the
order rows finished on that process). Shards are in the order of shards.json:
the shards an earlier finish() placed keep their indices; those new since are
appended sorted by part name, i.e. by process, then run start, then write order
within the run. codit.jsonl and parquet/ follow the same order. The order of a
resumed dataset therefore differs from an uninterrupted run's; the records of
each id do not.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import posixpath
import re
import struct
import sys
import time
import uuid
from typing import Any, Iterator, Mapping, Sequence

import google_crc32c
import numpy as np
import tensorflow_datasets as tfds  # imports without TensorFlow; only its read-back (tf.data) needs TF
from etils import epath

from codit_jax import runtime
from codit_jax.errors import CoditError

DATASET_NAME = "codit"
SPLIT = "train"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
# 'stop': ended with an end token; 'length': cut at max_new_tokens; 'repetitive': stopped early by
# stop_repetitive's rule (codit_jax.decoding.repetition_stop). Only 'stop' is is_completed.
FINISH_REASONS = ("stop", "length", "repetitive")
RUN_FILE = "run.json"
LOCK_FILE = runtime.LOCK_FILE
PLAN_FILE = "shards.json"
JSONL_FILE = "codit.jsonl"
PARTS_DIR = "parts"
PARQUET_DIR = "parquet"
LEGACY_JSONL_DIR = "jsonl"  # JSONL parts of the writer before this one (deleted by --force)
TFDS_METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")

_INDEX_SUFFIX = ".index.json"
_PART_SUFFIXES = (".tfrecord", ".jsonl", ".parquet", _INDEX_SUFFIX)
_PART_RE = re.compile(r"^p\d{5}-\d{13}-[0-9a-f]{8}-\d{5}")
_SHARD_RE = re.compile(rf"^{DATASET_NAME}-{SPLIT}\.tfrecord-\d{{5,}}$")
_PARQUET_RE = re.compile(rf"^{SPLIT}-\d{{5,}}\.parquet$")
_LEGACY_JSONL_RE = re.compile(r"^\d{5,}\.jsonl$")
_TMP = ".tmp-"
_READ_THREADS = 16


def features() -> tfds.features.FeaturesDict:
  """The features of one example (README, 'Output schema')."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "instruction": tfds.features.Text(),
      "response": tfds.features.Text(),
      "finish_reason": tfds.features.Text(),  # 'stop' | 'length' | 'repetitive' (stop_repetitive)
      "response_tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),  # end token excluded
      "post_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "pre_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),  # empty in direct mode
      # log_softmax of the masked CoDIT score (before temperature and top-p): what the
      # authors' vLLM reports; the post-trained log-probability in direct mode.
      "codit_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "repetitive": tfds.features.Scalar(dtype=np.bool_),
  })


def shard_name(index: int) -> str:
  """The TFDS name of shard `index` (after finish())."""
  return f"{DATASET_NAME}-{SPLIT}.tfrecord-{index:05d}"


def parquet_name(index: int) -> str:
  return f"{SPLIT}-{index:05d}.parquet"


def reference_record(example: Mapping[str, Any], settings: Mapping[str, Any]) -> dict:
  """One example exactly as the authors' vllm_expert.py writes it to its JSONL output.

  Their `score` is `[lp.logprob for lp in output.logprobs]`: vLLM (logprobs=0) reports the
  sampled token's log-probability for every output token, and a request that stops on an end
  token keeps that token in its output (only its text is dropped), so the list has one more
  entry than the response's tokens when is_completed. A 'repetitive' row (stopped early by
  stop_repetitive, which the authors do not have) is written as they write a cut one ('length'):
  is_completed false, no end token entry. Their baseline (direct) run passes
  `--amateur-model-id ""` and CD_PLAUSIBLE_ALPHA = CD_CONTRASTIVE_BETA = 0.
  """
  codit = settings["mode"] == "codit"
  score = [float(x) for x in example["codit_logprobs"]]
  if example["finish_reason"] == "stop":
    score.append(float(example["end_codit_logprob"]))
  return {
      "id": example["id"],
      "is_completed": example["finish_reason"] == "stop",
      "instruction": example["instruction"],
      "response": example["response"],
      "res_metadata": {
          "temperature": float(settings["temperature"]),
          "top_p": float(settings["top_p"]),
          "max_tokens": int(settings["max_new_tokens"]),
          "contrastive_decoding": codit,
          "alpha": float(settings["alpha"]) if codit else 0.0,
          "beta": float(settings["beta"]) if codit else 0.0,
          "expert_model_id": settings["post_trained"],
          "amateur_model_id": settings["pre_trained"] if codit else "",
      },
      "score": score,
  }


class DatasetWriter:
  """Writes one process's finished rows into `output_dir`; process 0 claims and finishes it."""

  def __init__(self, output_dir: str, run_settings: Mapping[str, Any], *, process_index: int = 0,
               num_processes: int = 1, rows_per_shard: int = 1000, write_jsonl: bool = False,
               write_parquet: bool = False, not_content: frozenset = frozenset()):
    if rows_per_shard < 1:
      raise ValueError(f"rows_per_shard must be at least 1, not {rows_per_shard}")
    self.output_dir = (output_dir if "://" in output_dir else os.path.expanduser(output_dir)).rstrip("/") or "/"
    if "://" in self.output_dir:
      # etils reaches gs:// through tf.io.gfile: import TF now, without its native start-up lines.
      runtime.import_tensorflow_quietly()
    self.run_settings = dict(run_settings)
    # Keys that do not decide the dataset: dropped from a run.json that an earlier version wrote
    # with them (pair_parallel was one), so that such a dataset still resumes.
    self.not_content = frozenset(not_content)
    self.process_index = process_index
    self.num_processes = num_processes
    self.rows_per_shard = rows_per_shard
    self.write_jsonl = write_jsonl
    self.write_parquet = write_parquet
    self._features = features()
    self._run_token = f"p{process_index:05d}-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
    self._parts_written = 0
    self._buffer: list[_Row] = []
    self._added: set[str] = set()

  def _path(self, *parts: str) -> str:
    return posixpath.join(self.output_dir, *parts) if "://" in self.output_dir else os.path.join(
        self.output_dir, *parts)

  # Claiming the folder.

  def check_claimable(self, force: bool = False) -> None:
    """Raises CoditError if output_dir cannot be claimed; changes nothing.

    Claimable: a folder that does not exist yet (in a writable place), an empty folder, or a
    folder holding this project's dataset of the same settings (resume) or, with force, of
    other settings. Never a folder of other files, with or without force: TFDS metadata files
    alone (another tool's dataset_info.json, metadata.json) do not make a folder this project's,
    nor does a run.json that is not codit-generate's.
    """
    with _as_codit_error(self.output_dir):
      if not _exists(self.output_dir):
        # gs:// has no folders: probe under the prefix itself, not in the bucket's root.
        self._check_writable(self.output_dir if "://" in self.output_dir
                             else _nearest_existing(self.output_dir))
        return
      if not _isdir(self.output_dir):
        raise CoditError(f"output_dir {self.output_dir} is an existing file, not a folder. Choose an "
                         "empty or new folder.")
      names = [n for n in _listdir(self.output_dir) if n != LOCK_FILE]
      if _exists(self._path(RUN_FILE)) and not self._run_file_is_ours():
        raise CoditError(f"output_dir {self.output_dir} holds a {RUN_FILE} that codit-generate did not write "
                         "(it is not a JSON object of codit-generate's settings). Choose an empty or new folder.")
      ours = self._project_files()
      if names and not any(_is_dataset_file(name) for name in ours):
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise CoditError(f"output_dir {self.output_dir} is not empty and holds no codit-generate "
                         f"dataset (it has {shown}). Choose an empty or new folder.")
      previous = self._previous_settings()
      if previous is None and ours and not force:
        raise CoditError(f"{self.output_dir} holds codit-generate files but no {RUN_FILE}, so it "
                         "cannot be resumed safely. Choose another output_dir, or pass --force to "
                         "delete those files.")
      if previous is not None and previous != self.run_settings and not force:
        changed = sorted(k for k in set(previous) | set(self.run_settings)
                         if previous.get(k) != self.run_settings.get(k))
        details = "; ".join(f"{k}: {previous.get(k)!r} -> {self.run_settings.get(k)!r}"
                            for k in changed)
        raise CoditError(
            f"{self.output_dir} already holds a dataset written with other settings ({details}). "
            "Rerun with the same config to resume it, choose another output_dir, or pass --force "
            "to delete it and start over.")
      self._check_writable(self.output_dir)

  def claim(self, force: bool = False, restart: bool = False) -> None:
    """Process 0 only: checks, then (with force, for another dataset) deletes only this project's
    files, creates the folder and records the settings in run.json.

    restart (with force): delete the dataset even if its settings are these, e.g. because it
    was written from other prompts.

    A local output_dir is locked first (its .codit-lock, flock): a second run on the folder
    stops here, before it writes rows beside this one's. The lock is this process's until
    runtime.release_folder_locks() (codit-generate calls it when the run ends) or until it ends,
    kill -9 included. gs:// has no such lock: there finish() refuses ids written twice.
    """
    self.check_claimable(force)  # a folder refused is left as it was: no lock file in it
    runtime.lock_folder(self.output_dir, "codit-generate")
    self.check_claimable(force)  # again, under the lock: another run may have claimed it meanwhile
    with _as_codit_error(self.output_dir):
      if _exists(self.output_dir):
        previous = self._previous_settings()
        if (previous != self.run_settings or (force and restart)) and self._project_files():
          self._delete_project_files()
        elif previous == self.run_settings:
          return
      _makedirs(self._path(PARTS_DIR))
      _write_atomically(self._path(RUN_FILE),
                        json.dumps(self.run_settings, indent=2, sort_keys=True) + "\n")

  def _previous_settings(self) -> dict | None:
    run_file = self._path(RUN_FILE)
    if not _exists(run_file):
      return None
    settings = _settings_in(run_file)
    if settings is None:
      raise CoditError(f"{run_file} was not written by codit-generate. Choose another output_dir.")
    return {key: value for key, value in settings.items() if key not in self.not_content}

  def _run_file_is_ours(self) -> bool:
    return _settings_in(self._path(RUN_FILE)) is not None

  def _check_writable(self, folder: str) -> None:
    """Writes and removes a probe file: the only reliable test (root ignores permissions)."""
    probe = posixpath.join(folder, f".codit-probe{_TMP}{uuid.uuid4().hex}")
    try:
      with _open(probe, "w") as f:
        f.write("")
      _remove(probe)
    except _file_errors() as e:
      raise CoditError(f"output_dir {self.output_dir} cannot be written ({_reason(e)}): a read-only "
                       "file system or no permission. Choose a writable folder.") from None

  def _project_files(self) -> list[str]:
    """Every file in output_dir that this project writes (relative paths)."""
    found = []
    for name in _listdir(self.output_dir):
      base = name.split(_TMP)[0]
      if name == RUN_FILE and not self._run_file_is_ours():
        continue
      if (base in (RUN_FILE, PLAN_FILE, JSONL_FILE) + TFDS_METADATA_FILES or _SHARD_RE.match(base)
          or (name.startswith(".codit-probe") and _TMP in name)):
        found.append(name)
    for name in _listdir(self._path(PARTS_DIR)):
      if _PART_RE.match(name) and name.split(_TMP)[0].endswith(_PART_SUFFIXES):
        found.append(posixpath.join(PARTS_DIR, name))
    for name in _listdir(self._path(PARQUET_DIR)):
      if _PARQUET_RE.match(name.split(_TMP)[0]):
        found.append(posixpath.join(PARQUET_DIR, name))
    for name in _listdir(self._path(LEGACY_JSONL_DIR)):
      if _LEGACY_JSONL_RE.match(name.split(_TMP)[0]):
        found.append(posixpath.join(LEGACY_JSONL_DIR, name))
    return found

  def _delete_project_files(self) -> None:
    for relative in self._project_files():
      _remove(self._path(relative))
    for folder in (PARTS_DIR, PARQUET_DIR, LEGACY_JSONL_DIR):  # only if nothing of the user's is inside
      path = self._path(folder)
      if _isdir(path) and not _listdir(path):
        epath.Path(path).rmtree()

  # Writing rows.

  def finished(self) -> dict[str, str]:
    """{example id: prompt digest} of every row in the committed shards of all processes."""
    digests = {}
    for index in self._read_indexes().values():
      digests.update(zip(index["ids"], index["digests"]))
    return digests

  def add(self, example: Mapping[str, Any], prompt_digest: str) -> None:
    """Buffers one finished row of this process; writes a shard when rows_per_shard are buffered."""
    example_id = example["id"]
    if example_id in self._added:
      raise ValueError(f"example {example_id!r} was added twice")
    self._buffer.append(self._encode(example, str(prompt_digest)))
    self._added.add(example_id)
    if len(self._buffer) >= self.rows_per_shard:
      self.flush()

  def flush(self) -> None:
    """Writes this process's buffered rows as a shard (nothing if none)."""
    if self._buffer:
      self._write_part(self._buffer)
      self._buffer = []

  def _encode(self, example: Mapping[str, Any], digest: str) -> _Row:
    """Serializes a row at once: far smaller than its Python lists of floats, and errors show early."""
    n = len(example["response_tokens"])
    per_token = ["post_logprobs", "codit_logprobs"] + (["pre_logprobs"] if len(example["pre_logprobs"]) else [])
    for key in per_token:
      if len(example[key]) != n:
        raise ValueError(f"example {example['id']!r}: {key} has {len(example[key])} entries for {n} tokens")
    if example["finish_reason"] not in FINISH_REASONS:
      raise ValueError(f"example {example['id']!r}: finish_reason {example['finish_reason']!r}")
    values = {
        "id": example["id"], "instruction": example["instruction"], "response": example["response"],
        "finish_reason": example["finish_reason"],
        "response_tokens": np.asarray(example["response_tokens"], np.int32).reshape(-1),
        "post_logprobs": np.asarray(example["post_logprobs"], np.float32).reshape(-1),
        "pre_logprobs": np.asarray(example["pre_logprobs"], np.float32).reshape(-1),
        "codit_logprobs": np.asarray(example["codit_logprobs"], np.float32).reshape(-1),
        "repetitive": bool(example["repetitive"]),
    }
    return _Row(
        id=example["id"], digest=digest, record=self._features.serialize_example(values),
        jsonl=(json.dumps(reference_record(example, self.run_settings), ensure_ascii=False) + "\n"
               if self.write_jsonl else None),
        values=values if self.write_parquet else None)

  def _write_part(self, rows: list[_Row]) -> str:
    """Writes one shard: its data files first, then its index, the commit (see the module doc)."""
    name = f"{self._run_token}-{self._parts_written:05d}"
    self._parts_written += 1
    with _as_codit_error(self.output_dir):
      _makedirs(self._path(PARTS_DIR))
      record_bytes = _write_tfrecord(self._path(PARTS_DIR, name + ".tfrecord"), [row.record for row in rows])
      if self.write_jsonl:
        with _open(self._path(PARTS_DIR, name + ".jsonl"), "w") as f:
          f.write("".join(row.jsonl for row in rows))
      if self.write_parquet:
        _write_parquet(self._path(PARTS_DIR, name + ".parquet"), [row.values for row in rows])
      index = {"process": self.process_index, "rows": len(rows),
               "bytes": record_bytes,
               "jsonl": self.write_jsonl, "parquet": self.write_parquet,
               "ids": [row.id for row in rows], "digests": [row.digest for row in rows]}
      _write_atomically(self._path(PARTS_DIR, name + _INDEX_SUFFIX), json.dumps(index) + "\n")
    return name

  def _read_indexes(self) -> dict[str, dict]:
    """{part name: its index} of every committed shard, read in parallel (gs:// latency)."""
    names = sorted(n[:-len(_INDEX_SUFFIX)] for n in _listdir(self._path(PARTS_DIR))
                   if n.endswith(_INDEX_SUFFIX) and _PART_RE.match(n))
    paths = [self._path(PARTS_DIR, n + _INDEX_SUFFIX) for n in names]
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
      texts = list(pool.map(_read_text, paths))
    return {n: json.loads(t) for n, t in zip(names, texts)}

  # Finishing the dataset.

  def finish(self, metadata: Mapping[str, Any], description: str) -> int:
    """Process 0 only, after every process has flushed: makes output_dir a TFDS dataset over all
    committed shards; returns the number of rows. Safe to call again, also after a resumed run."""
    self.flush()
    with _as_codit_error(self.output_dir):
      indexes = self._read_indexes()
      plan = self._read_plan()
      unknown = [n for n in plan if n not in indexes]
      if unknown:
        raise CoditError(f"{self._path(PLAN_FILE)} names shards whose index is missing from "
                         f"{self._path(PARTS_DIR)} ({', '.join(unknown[:3])}): the folder was changed "
                         "by hand. Pass --force to start over.")
      new = sorted(set(indexes) - set(plan))
      if not plan and not new:  # every input was skipped: still a (empty) dataset that TFDS reads
        new = [self._write_part([])]
        indexes = self._read_indexes()
      plan = plan + new
      self._check_ids_once(indexes)
      self._check_parts(plan, indexes)
      _write_atomically(self._path(PLAN_FILE), json.dumps({"shards": plan}, indent=0) + "\n")
      if self.write_parquet:
        _makedirs(self._path(PARQUET_DIR))
      for i, name in enumerate(plan):
        _place(self._path(PARTS_DIR, name + ".tfrecord"), self._path(shard_name(i)))
        if self.write_parquet:
          _place(self._path(PARTS_DIR, name + ".parquet"), self._path(PARQUET_DIR, parquet_name(i)))
      self._remove_leftovers(indexes)
      self._write_tfds_metadata([indexes[n]["rows"] for n in plan], sum(indexes[n]["bytes"] for n in plan),
                                metadata, description)
      if self.write_jsonl:
        self._join_jsonl(plan)
    return sum(indexes[n]["rows"] for n in plan)

  def _write_tfds_metadata(self, shard_lengths: list[int], num_bytes: int, metadata: Mapping[str, Any],
                           description: str) -> None:
    """dataset_info.json, features.json and metadata.json over the shards, as
    tfds.folder_dataset.write_metadata writes them, without its scan of the folder for shard files
    (another tool's *-train.tfrecord-* beside ours would stop it)."""
    name = posixpath.basename(self.output_dir)
    identity = tfds.core.DatasetIdentity(
        name=DATASET_NAME, version=tfds.core.Version(name if tfds.core.Version.is_valid(name) else "1.0.0"),
        data_dir=self.output_dir, module_name="")
    info = tfds.core.DatasetInfo(builder=identity, features=self._features, description=description,
                                 metadata=tfds.core.MetadataDict(metadata))
    info.set_file_format(tfds.core.FileFormat.TFRECORD)
    template = tfds.core.ShardedFileTemplate(data_dir=epath.Path(self.output_dir), template=FILENAME_TEMPLATE,
                                             dataset_name=DATASET_NAME, split=SPLIT, filetype_suffix="tfrecord")
    info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
        name=SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes, filename_template=template)]))
    info.write_to_directory(self.output_dir)

  def _read_plan(self) -> list[str]:
    path = self._path(PLAN_FILE)
    return json.loads(_read_text(path))["shards"] if _exists(path) else []

  def _check_ids_once(self, indexes: Mapping[str, dict]) -> None:
    seen, twice = set(), []
    for index in indexes.values():
      for example_id in index["ids"]:
        (twice.append if example_id in seen else seen.add)(example_id)
    if twice:
      raise CoditError(f"{self.output_dir}: ids {twice[:5]} are in more than one shard: two runs "
                       "wrote into this folder at once. Pass --force to start over.")

  def _check_parts(self, plan: list[str], indexes: Mapping[str, dict]) -> None:
    """Refuses, before anything moves, when an output asked for was not written with every shard."""
    for option, kind in (("write_jsonl", "jsonl"), ("write_parquet", "parquet")):
      lacking = [n for n in plan if getattr(self, option) and not indexes[n][kind]]
      if lacking:
        raise CoditError(f"{self.output_dir}: {len(lacking)} shards were written without {option} "
                         f"(e.g. {lacking[0]}), so the {kind} output cannot be complete. Finish with "
                         f"the {option} setting of the run that wrote them, or pass --force to start over.")

  def _remove_leftovers(self, indexes: Mapping[str, dict]) -> None:
    """Temporary files of killed writes, and parts whose index was never written."""
    for relative in self._project_files():
      name = posixpath.basename(relative)
      orphan = (relative.startswith(PARTS_DIR + "/") and _TMP not in name
                and _part_of(name) not in indexes)
      if _TMP in name or orphan:
        _remove(self._path(relative))

  def _join_jsonl(self, plan: list[str]) -> None:
    final = self._path(JSONL_FILE)
    temporary = f"{final}{_TMP}{uuid.uuid4().hex}"
    with _open(temporary, "w") as out:
      out.write("")  # on gs://, GFile creates the file on its first write, also of no rows
      for name in plan:
        with _open(self._path(PARTS_DIR, name + ".jsonl"), "r") as part:
          while chunk := part.read(1 << 24):
            out.write(chunk)
    _replace(temporary, final)


class _Row:
  __slots__ = ("id", "digest", "record", "jsonl", "values")

  def __init__(self, id, digest, record, jsonl, values):  # pylint: disable=redefined-builtin
    self.id, self.digest, self.record, self.jsonl, self.values = id, digest, record, jsonl, values


def _settings_in(run_file: str) -> dict | None:
  """The settings in a run.json, or None where it is not codit-generate's (not JSON, not its keys)."""
  try:
    settings = json.loads(_read_text(run_file))
  except (json.JSONDecodeError, UnicodeDecodeError):
    return None
  return settings if isinstance(settings, dict) and {"mode", "post_trained"} <= settings.keys() else None


def _is_dataset_file(relative: str) -> bool:
  """Whether a file of _project_files() shows the folder holds this project's dataset: any but the
  TFDS metadata files (other tools write those names too) and probes."""
  name = posixpath.basename(relative).split(_TMP)[0]
  return name not in TFDS_METADATA_FILES and not name.startswith(".codit-probe")


def _part_of(file_name: str) -> str:
  for suffix in _PART_SUFFIXES:
    if file_name.endswith(suffix):
      return file_name[:-len(suffix)]
  return file_name


def _place(part: str, final: str) -> None:
  """Renames a planned part to its final name; idempotent (see the module doc)."""
  if _exists(part):
    _replace(part, final)
  elif not _exists(final):
    raise CoditError(f"{part} is missing and {final} was not written: the folder was changed by "
                     "hand. Pass --force to start over.")


def _parquet_schema():
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  return pa.schema([
      ("id", pa.string()), ("instruction", pa.string()), ("response", pa.string()),
      ("finish_reason", pa.string()), ("response_tokens", pa.list_(pa.int32())),
      ("post_logprobs", pa.list_(pa.float32())), ("pre_logprobs", pa.list_(pa.float32())),
      ("codit_logprobs", pa.list_(pa.float32())), ("repetitive", pa.bool_()),
  ])


def _write_parquet(path: str, rows: list[dict]) -> None:
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  schema = _parquet_schema()
  table = pa.table({field.name: pa.array([row[field.name] for row in rows], type=field.type)
                    for field in schema}, schema=schema)
  buffer = pa.BufferOutputStream()  # pyarrow cannot write through a GFile; a part fits in memory
  pq.write_table(table, buffer)
  with _open(path, "wb") as f:
    f.write(buffer.getvalue().to_pybytes())


# File operations: etils.epath, which runs plain os calls on a local path and imports a TF (or
# fsspec) backend only for gs://. Every write goes through _open and every rename through _replace
# (the tests kill a run inside them).

def _open(path: str, mode: str):
  return epath.Path(path).open(mode)


def _replace(source: str, target: str) -> None:
  """Renames, overwriting target: atomic on a local disk (os.replace); copy-then-delete on gs://."""
  epath.Path(source).replace(target)


def _exists(path: str) -> bool:
  return epath.Path(path).exists()


def _isdir(path: str) -> bool:
  return epath.Path(path).is_dir()


def _makedirs(path: str) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def _remove(path: str) -> None:
  epath.Path(path).unlink()


def _listdir(folder: str) -> list[str]:
  """The names in `folder`; [] if it is not a folder."""
  if not _isdir(folder):
    return []
  if "://" not in folder:
    # Not epath's listdir, which hides names ending in "~" (editor backups): a user's file must
    # count, or a folder of them would be claimed, or deleted as empty.
    return os.listdir(folder)
  return [p.name for p in epath.Path(folder).iterdir()]


def _file_errors() -> tuple[type[BaseException], ...]:
  """The errors of a file operation: OSError (what etils raises for a local path), and for gs://
  also TensorFlow's OpError, which tf.io.gfile raises through etils for some failures. TF is only
  looked up, never imported here: a local run has not loaded it and raises no OpError."""
  errors = getattr(sys.modules.get("tensorflow"), "errors", None)
  return (OSError,) if errors is None else (OSError, errors.OpError)


def _nearest_existing(path: str) -> str:
  while not _exists(path):
    parent = posixpath.dirname(path) if "://" in path else os.path.dirname(path)
    if parent in (path, ""):
      return "."
    path = parent
  return path


def _reason(e: Exception) -> str:
  if isinstance(e, OSError) and e.errno is not None:
    return os.strerror(e.errno)
  return getattr(e, "message", None) or str(e)


class _as_codit_error:  # pylint: disable=invalid-name
  """Turns a file-system failure under output_dir into a one-line CoditError."""

  def __init__(self, output_dir: str):
    self.output_dir = output_dir

  def __enter__(self):
    return self

  def __exit__(self, kind, e, traceback):
    if e is None or isinstance(e, CoditError):
      return False
    if isinstance(e, _file_errors()):
      hint = (" (a read-only file system)" if getattr(e, "errno", None) == errno.EROFS else "")
      raise CoditError(f"file system error in output_dir {self.output_dir}{hint}: {_reason(e)}. "
                       "Fix it and rerun the same command to resume, or choose a writable folder.") from None
    return False


def _read_text(path: str) -> str:
  with _open(path, "r") as f:
    return f.read()


def _write_atomically(path: str, text: str) -> None:
  temporary = f"{path}{_TMP}{uuid.uuid4().hex}"
  with _open(temporary, "w") as f:
    f.write(text)
  _replace(temporary, path)


# TFRecord files, written and read without TensorFlow, byte for byte as tf.io.TFRecordWriter writes
# them (uncompressed). Each record is framed as
#   uint64 length, uint32 masked CRC-32C of those 8 bytes, the data, uint32 masked CRC-32C of the data
# all little-endian; google_crc32c is a C extension (a pure-Python CRC is too slow for GBs of shards).

def _masked_crc(data: bytes) -> bytes:
  crc = google_crc32c.value(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _write_tfrecord(path: str, records: Sequence[bytes]) -> int:
  """Writes `records` as a TFRecord file; returns its size in bytes."""
  size = 0
  with _open(path, "wb") as f:
    for record in records:
      length = struct.pack("<Q", len(record))
      f.write(length + _masked_crc(length) + record + _masked_crc(record))
      size += len(record) + 16
  return size


def _read_tfrecord(path: str) -> Iterator[bytes]:
  """The records of a TFRecord file, their checksums checked."""
  with _open(path, "rb") as f:
    while header := f.read(12):
      whole = len(header) == 12 and header[8:] == _masked_crc(header[:8])
      data = f.read(struct.unpack("<Q", header[:8])[0]) if whole else b""
      if not whole or f.read(4) != _masked_crc(data):
        raise CoditError(f"{path} is not a whole TFRecord file (a record is cut or its checksum is "
                         "wrong): it was changed after codit-generate wrote it.")
      yield data


def read_fields(output_dir: str, names: Sequence[str]) -> Iterator[dict]:
  """The features `names` of each example of the finished dataset, in shard order, read without
  TensorFlow (TFDS's own read-back, read_examples, goes through tf.data); strings as str."""
  builder = tfds.builder_from_directory(output_dir)
  features = builder.info.features
  for path in builder.info.splits[SPLIT].filepaths:
    for record in _read_tfrecord(os.fspath(path)):
      example = features.deserialize_example_np(record)
      yield {k: (example[k].decode() if isinstance(example[k], bytes) else example[k]) for k in names}


def read_examples(output_dir: str) -> Iterator[dict]:
  """The finished dataset's examples as Python values (TFDS read-back, through TensorFlow), in shard
  order."""
  builder = tfds.builder_from_directory(output_dir)
  if not builder.info.splits[SPLIT].num_examples:
    return  # TFDS refuses to read a split of no examples ("corresponds to no data")
  for example in tfds.as_numpy(builder.as_dataset(split=SPLIT, shuffle_files=False)):
    yield {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}
