"""One streaming pass over a CoDIT dataset: the summary numbers, per-token contrast, a sample.

Memory is bounded whatever the number of rows: one int per row for the length
percentiles, two vocabulary-sized arrays for the per-token aggregates, a
fixed histogram of per-token contrast, and the sampled rows themselves.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import heapq
import os
import sys
import time
from typing import Any, Iterable, Mapping

import numpy as np
from absl import logging

from codit_jax.errors import CoditError

# Per-token contrast histogram: fixed bins (bounded memory), values outside are clipped to the ends.
CONTRAST_EDGES = np.linspace(-16.0, 16.0, 129)
_FLUSH_TOKENS = 1 << 20  # per-token aggregates are folded in with one bincount per ~1M tokens


@dataclasses.dataclass
class Row:
  """One response as read back from the dataset (numpy arrays, text decoded)."""
  id: str
  instruction: str
  response: str
  finish_reason: str
  repetitive: bool
  tokens: np.ndarray
  post: np.ndarray
  pre: np.ndarray | None      # None: not recorded (direct mode)
  codit: np.ndarray | None    # None: the dataset has no codit_logprobs feature

  @property
  def contrast(self) -> np.ndarray | None:
    return None if self.pre is None else self.post - self.pre


def row_from_example(example: Mapping[str, Any], has_codit: bool) -> Row:
  def text(key):
    value = example.get(key, b"")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
  tokens = np.asarray(example["response_tokens"], np.int64)
  post = np.asarray(example["post_logprobs"], np.float64)
  pre = np.asarray(example.get("pre_logprobs", np.zeros(0)), np.float64)
  codit = np.asarray(example["codit_logprobs"], np.float64) if has_codit else None
  n = len(tokens)
  return Row(id=text("id"), instruction=text("instruction"), response=text("response"),
             finish_reason=text("finish_reason") or "?", repetitive=bool(example.get("repetitive", False)),
             tokens=tokens, post=post if len(post) == n else np.full(n, np.nan),
             pre=pre if (n and len(pre) == n) else None,
             codit=codit if (codit is not None and len(codit) == n) else None)


class Stats:
  """Summary numbers of one dataset, accumulated row by row."""

  def __init__(self):
    self.rows = 0
    self.finish = collections.Counter()
    self.repetitive = 0
    self.lengths = array.array("q")
    self.tokens = 0
    self.tokens_with_pre = 0
    self.tokens_with_codit = 0
    self.sum_post = 0.0
    self.sum_contrast = 0.0
    self.sum_codit = 0.0
    self.contrast_hist = np.zeros(len(CONTRAST_EDGES) - 1, np.int64)
    self.token_sum = np.zeros(0, np.float64)   # per token id: sum of contrast
    self.token_count = np.zeros(0, np.int64)   # per token id: how often it was emitted (with a pre log-prob)
    self._ids: list[np.ndarray] = []
    self._contrasts: list[np.ndarray] = []
    self._buffered = 0

  def add(self, row: Row) -> None:
    n = len(row.tokens)
    self.rows += 1
    self.finish[row.finish_reason] += 1
    self.repetitive += int(row.repetitive)
    self.lengths.append(n)
    self.tokens += n
    self.sum_post += float(np.nansum(row.post))
    if row.codit is not None:
      self.tokens_with_codit += n
      self.sum_codit += float(row.codit.sum())
    contrast = row.contrast
    if contrast is not None and n:
      self.tokens_with_pre += n
      self.sum_contrast += float(contrast.sum())
      index = np.clip(np.searchsorted(CONTRAST_EDGES, contrast, side="right") - 1, 0, len(self.contrast_hist) - 1)
      self.contrast_hist += np.bincount(index, minlength=len(self.contrast_hist))
      self._ids.append(row.tokens)
      self._contrasts.append(contrast)
      self._buffered += n
      if self._buffered >= _FLUSH_TOKENS:
        self._flush()

  def _flush(self) -> None:
    if not self._ids:
      return
    ids = np.concatenate(self._ids)
    values = np.concatenate(self._contrasts)
    self._ids, self._contrasts, self._buffered = [], [], 0
    ids = np.where(ids < 0, 0, ids)
    size = max(len(self.token_count), int(ids.max()) + 1)
    if size > len(self.token_count):
      self.token_sum = np.pad(self.token_sum, (0, size - len(self.token_sum)))
      self.token_count = np.pad(self.token_count, (0, size - len(self.token_count)))
    self.token_sum += np.bincount(ids, weights=values, minlength=size)
    self.token_count += np.bincount(ids, minlength=size)

  def finish_reading(self) -> None:
    self._flush()

  # Derived numbers, as the page shows them.
  @property
  def has_pre(self) -> bool:
    return self.tokens_with_pre > 0

  @property
  def repetitive_fraction(self) -> float:
    return self.repetitive / self.rows if self.rows else 0.0

  def percentiles(self, qs=(10, 25, 50, 75, 90, 99)) -> dict[str, int]:
    if not self.rows:
      return {}
    lengths = np.frombuffer(self.lengths, np.int64)
    out = {f"p{q}": int(np.percentile(lengths, q, method="lower")) for q in qs}
    out["min"] = int(lengths.min())
    out["max"] = int(lengths.max())
    return out

  @property
  def mean_length(self) -> float:
    return self.tokens / self.rows if self.rows else 0.0

  def top_tokens(self, k: int, min_count: int) -> tuple[list[tuple[int, float, int]], list[tuple[int, float, int]]]:
    """(largest, smallest) mean contrast per token id among ids emitted at least min_count times."""
    self._flush()
    ids = np.nonzero(self.token_count >= max(min_count, 1))[0]
    if not len(ids):
      return [], []
    means = self.token_sum[ids] / self.token_count[ids]
    order = np.lexsort((ids, -means))  # ties: smaller id first
    largest = [(int(ids[i]), float(means[i]), int(self.token_count[ids[i]])) for i in order[:k]]
    order = np.lexsort((ids, means))
    smallest = [(int(ids[i]), float(means[i]), int(self.token_count[ids[i]])) for i in order[:k]]
    return largest, smallest


class Progress:
  """A stderr progress bar on long reads (a terminal), absl log lines otherwise."""

  def __init__(self, label: str, total: int, *, stream=None, after_seconds: float = 1.0,
               log_every_seconds: float = 10.0):
    self.label, self.total = label, total
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.start = time.monotonic()
    self.after, self.log_every = after_seconds, log_every_seconds
    self.last = self.start
    self.shown = False

  def update(self, done: int, force: bool = False) -> None:
    now = time.monotonic()
    if now - self.start < self.after and not force:
      return
    if not force and now - self.last < (0.25 if self.tty else self.log_every):
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    if self.total:
      frac = min(done / self.total, 1.0)
      eta = (self.total - done) / rate if rate > 0 else float("nan")
      bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
      text = (f"{self.label} [{bar}] {done}/{self.total} rows {100 * frac:5.1f}% | {rate:,.0f} rows/s"
              f" | ETA {eta:,.0f}s" if eta == eta else f"{self.label} [{bar}] {done}/{self.total}")
    else:
      text = f"{self.label}: {done} rows | {rate:,.0f} rows/s"
    if self.tty:
      self.stream.write("\r" + text)
      self.stream.flush()
      self.shown = True
    else:
      logging.info("%s", text)

  def close(self, done: int) -> None:
    if self.shown or time.monotonic() - self.start >= self.after:
      self.update(done, force=True)
    if self.shown:
      self.stream.write("\n")
      self.stream.flush()


@dataclasses.dataclass
class Dataset:
  """What the page needs from one dataset folder."""
  directory: str
  metadata: dict
  features: list[str]
  stats: Stats
  samples: list[Row]
  seconds: float = 0.0

  @property
  def has_codit(self) -> bool:
    return "codit_logprobs" in self.features

  @property
  def mode(self) -> str:
    mode = self.metadata.get("mode")
    if mode:
      return str(mode)
    return "codit" if self.stats.has_pre else "direct"


def sample_key(seed: int, row_id: str) -> bytes:
  """The seeded order in which rows are sampled: independent of the order the shards are read in."""
  return hashlib.blake2b(f"{seed}\x00{row_id}".encode(), digest_size=8).digest()


def open_builder(directory: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if "://" not in directory and not os.path.isdir(os.path.expanduser(directory)):
    what = "is a file, not a folder" if os.path.exists(os.path.expanduser(directory)) else "does not exist"
    raise CoditError(f"{directory!r} {what}. Give the output_dir of a finished codit-generate run.")
  try:
    builder = tfds.builder_from_directory(os.path.expanduser(directory))
  except Exception as e:  # missing folder, not a TFDS dataset: the user fixes the path
    raise CoditError(f"{directory!r} is not a readable TFDS dataset folder ({type(e).__name__}: {e}). "
                     "Give the output_dir of a finished codit-generate run.") from None
  splits = list(builder.info.splits.keys())
  if not splits:
    raise CoditError(f"{directory!r} has no split: is the codit-generate run finished?")
  split = "train" if "train" in splits else splits[0]
  return builder, split


def scan(directory: str, *, num_samples: int = 8, seed: int = 0, ids: Iterable[str] | None = None,
         label: str | None = None, progress_stream=None, batch_size: int = 64) -> Dataset:
  """Reads the dataset once with tf.data; `ids` (if given) are collected instead of a seeded sample."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  started = time.monotonic()
  builder, split = open_builder(directory)
  features = list(builder.info.features.keys())
  missing = {"id", "response_tokens", "post_logprobs"} - set(features)
  if missing:
    raise CoditError(f"{directory!r} lacks the features {sorted(missing)}: not a codit-generate dataset.")
  metadata = dict(builder.info.metadata or {})
  has_codit = "codit_logprobs" in features
  total = int(builder.info.splits[split].num_examples or 0)
  dataset = builder.as_dataset(split=split, shuffle_files=False,
                               read_config=tfds.ReadConfig(try_autocache=False))
  dataset = dataset.prefetch(tf.data.AUTOTUNE)
  stats = Stats()
  wanted = None if ids is None else list(dict.fromkeys(ids))
  wanted_set = None if wanted is None else set(wanted)
  found: dict[str, Row] = {}
  heap: list[tuple[bytes, str, int, Row]] = []  # the num_samples rows of smallest key (negated: a max-heap)
  bar = Progress(f"reading {label or directory}", total, stream=progress_stream)
  for example in tfds.as_numpy(dataset):
    row = row_from_example(example, has_codit)
    stats.add(row)
    if wanted_set is not None:
      if row.id in wanted_set and row.id not in found:
        found[row.id] = row
    elif num_samples > 0:
      key = bytes(255 - b for b in sample_key(seed, row.id))
      if len(heap) < num_samples:
        heapq.heappush(heap, (key, row.id, stats.rows, row))
      elif key > heap[0][0]:
        heapq.heapreplace(heap, (key, row.id, stats.rows, row))
    if stats.rows % batch_size == 0:
      bar.update(stats.rows)
  bar.close(stats.rows)
  stats.finish_reading()
  if wanted is not None:
    samples = [found[i] for i in wanted if i in found]
  else:
    samples = [row for *_, row in sorted(heap, key=lambda e: e[:3], reverse=True)]
  return Dataset(directory=directory, metadata=metadata, features=features, stats=stats, samples=samples,
                 seconds=time.monotonic() - started)
