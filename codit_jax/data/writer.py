"""The output of codit-generate: a TFDS dataset written shard by shard, resumably.

Layout of `output_dir`:

    run.json                          the settings that decide the dataset (resume guard)
    codit-train.tfrecord-00000 ...    one shard per (batch, process), written atomically
    jsonl/00000.jsonl ...             the same records in the reference layout (optional)
    dataset_info.json, features.json, metadata.json    TFDS metadata, written at the end
    codit.jsonl                       all JSONL parts in shard order (optional, at the end)

A shard is the unit of finished work. It is written to a temporary name and
renamed into place, so a shard either exists whole or not at all, whatever
moment the run is killed at. Batches are planned deterministically from the
input, so a rerun recomputes exactly the missing shards and the finished
dataset equals an uninterrupted run's. Shard k of a run with P processes holds
process k % P's rows of batch k // P.

Files go through tf.io.gfile, so `output_dir` can be a local folder or gs://.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from codit_jax.errors import CoditError

DATASET_NAME = "codit"
SPLIT = "train"
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
RUN_FILE = "run.json"
JSONL_DIR = "jsonl"
JSONL_FILE = "codit.jsonl"
_SHARD_RE = re.compile(rf"^{DATASET_NAME}-{SPLIT}\.tfrecord-(\d{{5,}})$")


def features() -> tfds.features.FeaturesDict:
  """The features of one example (README, 'Output schema')."""
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(),
      "instruction": tfds.features.Text(),
      "response": tfds.features.Text(),
      "finish_reason": tfds.features.Text(),  # 'stop' | 'length'
      "response_tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "post_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),
      "pre_logprobs": tfds.features.Tensor(shape=(None,), dtype=np.float32),  # empty in direct mode
      "repetitive": tfds.features.Scalar(dtype=np.bool_),
  })


def shard_name(index: int) -> str:
  return f"{DATASET_NAME}-{SPLIT}.tfrecord-{index:05d}"


def reference_record(example: Mapping[str, Any], settings: Mapping[str, Any]) -> dict:
  """One example in the layout of the reference implementation's JSONL output."""
  return {
      "id": example["id"],
      "instruction": example["instruction"],
      "output": example["response"],
      "is_completed": example["finish_reason"] == "stop",
      "finish_reason": example["finish_reason"],
      "repetitive": bool(example["repetitive"]),
      "logprobs": [float(x) for x in example["post_logprobs"]],
      "pre_logprobs": [float(x) for x in example["pre_logprobs"]],
      "generation_config": dict(settings),
  }


class DatasetWriter:
  """Writes the shards of one run into `output_dir` and finishes the dataset's metadata."""

  def __init__(self, output_dir: str, run_settings: Mapping[str, Any], *, write_jsonl: bool = False):
    self.output_dir = output_dir.rstrip("/")
    self.run_settings = dict(run_settings)
    self.write_jsonl = write_jsonl
    self._features = features()

  def _path(self, *parts: str) -> str:
    return os.path.join(self.output_dir, *parts)

  def claim(self, force: bool = False) -> None:
    """Records this run's settings in output_dir; refuses a folder written with different ones.

    With force, an existing dataset of other settings is deleted first.
    """
    run_file = self._path(RUN_FILE)
    if tf.io.gfile.exists(run_file):
      previous = json.loads(_read_text(run_file))
      if previous != self.run_settings:
        if not force:
          changed = sorted(k for k in set(previous) | set(self.run_settings)
                           if previous.get(k) != self.run_settings.get(k))
          details = "; ".join(f"{k}: {previous.get(k)!r} -> {self.run_settings.get(k)!r}" for k in changed)
          raise CoditError(
              f"{self.output_dir} already holds a dataset written with other settings ({details}). "
              "Rerun with the same config to resume it, choose another output_dir, or pass --force "
              "to delete it and start over.")
        self._delete_outputs()
    elif tf.io.gfile.exists(self.output_dir) and self.finished_shards():
      if not force:
        raise CoditError(
            f"{self.output_dir} holds shards but no {RUN_FILE}, so it cannot be resumed safely. "
            "Choose another output_dir, or pass --force to delete them.")
      self._delete_outputs()
    tf.io.gfile.makedirs(self.output_dir)
    if self.write_jsonl:
      tf.io.gfile.makedirs(self._path(JSONL_DIR))
    _write_atomically(run_file, json.dumps(self.run_settings, indent=2, sort_keys=True) + "\n")

  def _delete_outputs(self) -> None:
    for name in tf.io.gfile.listdir(self.output_dir):
      path = self._path(name.rstrip("/"))
      if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
      else:
        tf.io.gfile.remove(path)

  def finished_shards(self) -> set[int]:
    """Indices of the shards already written whole."""
    if not tf.io.gfile.exists(self.output_dir):
      return set()
    names = tf.io.gfile.listdir(self.output_dir)
    return {int(m.group(1)) for m in map(_SHARD_RE.match, names) if m}

  def write_shard(self, index: int, examples: Sequence[Mapping[str, Any]]) -> None:
    """Writes one shard atomically (its JSONL part first, so a shard never lacks its part)."""
    if self.write_jsonl:
      lines = "".join(json.dumps(reference_record(e, self.run_settings), ensure_ascii=False) + "\n"
                      for e in examples)
      _write_atomically(self._path(JSONL_DIR, f"{index:05d}.jsonl"), lines)
    final = self._path(shard_name(index))
    temporary = f"{final}.tmp-{uuid.uuid4().hex}"
    with tf.io.TFRecordWriter(temporary) as records:
      for example in examples:
        records.write(self._features.serialize_example(_as_feature_values(example)))
    tf.io.gfile.rename(temporary, final, overwrite=True)

  def finish(self, num_shards: int, metadata: Mapping[str, Any], description: str) -> None:
    """Writes the TFDS metadata (and the joined JSONL) once all `num_shards` shards exist."""
    if num_shards == 0:  # every input was skipped: still a (empty) dataset that TFDS reads
      self.write_shard(0, [])
      num_shards = 1
    missing = sorted(set(range(num_shards)) - self.finished_shards())
    if missing:
      raise CoditError(f"{self.output_dir}: shards {missing[:10]} are missing; rerun the same command to "
                       "write them.")
    folders = [self.output_dir] + ([self._path(JSONL_DIR)] if self.write_jsonl else [])
    for folder in folders:  # leftovers of writes that were killed
      for name in tf.io.gfile.listdir(folder):
        if ".tmp-" in name:
          tf.io.gfile.remove(os.path.join(folder, name))
    shard_lengths = [_count_records(self._path(shard_name(i))) for i in range(num_shards)]
    split = tfds.core.SplitInfo(
        name=SPLIT, shard_lengths=shard_lengths,
        num_bytes=sum(tf.io.gfile.stat(self._path(shard_name(i))).length for i in range(num_shards)),
        filename_template=tfds.core.ShardedFileTemplate(
            data_dir=self.output_dir, template=FILENAME_TEMPLATE, dataset_name=DATASET_NAME,
            split=SPLIT, filetype_suffix="tfrecord"))
    tfds.folder_dataset.write_metadata(
        data_dir=self.output_dir, features=self._features, split_infos=[split],
        filename_template=FILENAME_TEMPLATE, check_data=False, description=description,
        metadata=tfds.core.MetadataDict(metadata))
    if self.write_jsonl:
      parts = [self._path(JSONL_DIR, f"{i:05d}.jsonl") for i in range(num_shards)]
      _write_atomically(self._path(JSONL_FILE), "".join(_read_text(p) for p in parts))


def _as_feature_values(example: Mapping[str, Any]) -> dict:
  return {
      "id": example["id"], "instruction": example["instruction"], "response": example["response"],
      "finish_reason": example["finish_reason"],
      "response_tokens": list(example["response_tokens"]),
      "post_logprobs": list(example["post_logprobs"]),
      "pre_logprobs": list(example["pre_logprobs"]),
      "repetitive": bool(example["repetitive"]),
  }


def _count_records(path: str) -> int:
  return sum(1 for _ in tf.data.TFRecordDataset(path))


def _read_text(path: str) -> str:
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def _write_atomically(path: str, text: str) -> None:
  temporary = f"{path}.tmp-{uuid.uuid4().hex}"
  with tf.io.gfile.GFile(temporary, "w") as f:
    f.write(text)
  tf.io.gfile.rename(temporary, path, overwrite=True)


def read_examples(output_dir: str) -> Iterable[dict]:
  """The finished dataset's examples as Python values (TFDS read-back), in shard order."""
  builder = tfds.builder_from_directory(output_dir)
  for example in tfds.as_numpy(builder.as_dataset(split=SPLIT, shuffle_files=False)):
    yield {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}
