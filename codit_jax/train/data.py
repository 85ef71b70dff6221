"""Training data of codit-train: read, filter, format with the student's chat template, pack.

Inputs (one or several, in order, comma-separated):
  - a codit-generate output folder or any TFDS folder (`dataset_info.json`);
  - a JSONL file (one object a line) or a Parquet file;
  - a Hub dataset folder as a user downloads it (`huggingface-cli download
    --repo-type dataset`, `snapshot_download`, or a git clone with LFS): every
    *.parquet and *.jsonl file under it, in path order (e.g.
    data/train-00000-of-00002.parquet, data/train-00001-of-00002.parquet).
    README.md, .gitattributes and other files, and hidden folders (.cache,
    .git), are ignored. Where file or folder names show Hub splits
    (train-*, test-*, validation-*, or train/, test/, ...) and a train split
    is there, only the train split is read. A folder holding both Parquet and
    JSONL files is refused (often the same data twice): name the files.

Fields: `instruction` and `response` (the reference layout's `output` is
read as the response). Whether a response finished: `finish_reason` ('stop' |
'length' | 'repetitive', as codit-generate writes it; only 'stop' is finished,
'repetitive' being a row stop_repetitive cut short) or else `is_completed` (true | false,
the authors' layout: their JSONL and their released CoDIT-Gemma3 /
CoDIT-Qwen3-8B / CoDIT-Qwen3-30B datasets); a record with neither counts as
finished. `repetitive` (true | false) is read if present, else computed from
the response with the reference's flag (codit_jax.data.repetition), the same
one codit-generate writes. Other fields (`id`, `res_metadata`, `score`,
`response_tokens`, log-probs, ...) are not read; in Parquet their columns are
not even loaded.

Bad rows: a row whose instruction or response is missing, null, empty or only
whitespace is skipped and counted in the DataReport (missing_instruction,
empty_instruction, missing_response, empty_response), and the first few are
logged with file and line (JSONL, 1-based) or row (Parquet and TFDS,
0-based). A file in which no row has a response field at all, a field of the
wrong type, an unknown finish_reason or a line that is not JSON stop the run
with a CoditError naming the file and line: those mean a wrong or corrupt
file, not a bad row.

Each example becomes one token sequence in the student's own format:

    prompt   = chat template of one user turn, add_generation_prompt=True
    response = tokenizer(response, add_special_tokens=False)
    end      = what the template writes after an assistant turn, up to and
               including its end-of-turn token (only when finish_reason is 'stop')

The prompt is rendered exactly as codit-generate renders prompts (no system
turn; Qwen3 templates get enable_thinking=False) and, like there, tokenized
without adding special tokens again. The loss is taken on response and end
tokens only.

Rows: examples are shuffled per epoch by (seed, epoch) and packed greedily in
that order into rows of `max_length` tokens (or one per row without packing);
each example is its own segment, with positions from 0 and attention within
the segment. A batch is `batch_size` consecutive rows; the rows left over at
the end of an epoch are dropped, so every batch has the same shape. The whole
plan follows from the data and the seed, so a resumed run finds its place from
the step alone.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from codit_jax.data import prompts, repetition
from codit_jax.errors import CoditError

FINISH_REASONS = ("stop", "length", "repetitive")  # only 'stop' is finished
# A Jinja ChatML template for students that have none (base models): `chat_template='chatml'`.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_RESPONSE_SENTINEL = "CODITRESPONSEENDSHERE"


@dataclasses.dataclass(frozen=True)
class Example:
  instruction: str
  response: str
  finished: bool  # finish_reason == 'stop': the response ends with the end-of-turn token
  repetitive: bool
  where: str  # 'file:line' or 'folder record i', for messages


@dataclasses.dataclass
class DataReport:
  """What was read and what was left out, per reason."""
  read: int = 0
  kept: int = 0  # after the filters and the length check
  truncated: int = 0  # kept, with the response cut to max_length (and so without its end token)
  dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def as_dict(self) -> dict:
    return {"read": self.read, "kept": self.kept, "truncated": self.truncated,
            "dropped": dict(sorted(self.dropped.items()))}


# ----------------------------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------------------------


def dataset_paths(datasets) -> list[str]:
  """`datasets` as a list: a comma-separated string, or a list/tuple of paths."""
  items = datasets.split(",") if isinstance(datasets, str) else list(datasets or ())
  return [str(p).strip() for p in items if str(p).strip()]


_ACCEPTED = ("a codit-generate output folder, a TFDS folder, a Hub dataset folder (*.parquet or *.jsonl files) "
             "or a JSONL or Parquet file with the fields instruction and response")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
# The fields read; a Parquet file's other columns (res_metadata, score, ...) are never loaded.
_FIELDS = ("instruction", "response", "output", "finish_reason", "is_completed", "repetitive")
# Hub split names, as the first word of a data file's name or a folder's name (data/train-00000-of-00002.parquet).
_SPLIT = re.compile(r"^(train|test|validation|valid|val|dev|eval)(?:[-_.]|$)", re.IGNORECASE)
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"
_PROBLEMS_LOGGED = 5


def read_dataset(path: str, report: DataReport | None = None) -> list[Example]:
  """All good examples of one dataset (see the module docstring), in file order.

  Rows skipped as bad are counted in `report.dropped` and `report.read`; the
  examples returned are not counted there (read_datasets does that).
  """
  local = Path(path).expanduser()
  if not local.exists():
    raise CoditError(f"dataset {path!r} does not exist. Give {_ACCEPTED}.")
  report = report if report is not None else DataReport()
  if not local.is_dir():
    return _read_file(local, report)
  if (local / "dataset_info.json").is_file() or (local / "run.json").is_file():
    return _read_tfds_folder(local, report)
  examples = []
  for file in data_files(local):
    examples.extend(_read_file(file, report))
  return examples


def data_files(folder: Path) -> list[Path]:
  """The data files of a Hub dataset folder (see the module docstring), in path order."""
  files = sorted(p for p in folder.rglob("*")
                 if p.suffix.lower() in _PARQUET_SUFFIXES + _JSONL_SUFFIXES and p.is_file()
                 and not any(part.startswith(".") for part in p.relative_to(folder).parts))
  if not files:
    raise CoditError(f"{folder} holds no data files: no dataset_info.json (TFDS) and no *.parquet or *.jsonl "
                     f"files under it. Give {_ACCEPTED}.")
  splits = {p: _split_of(p.relative_to(folder)) for p in files}
  if "train" in splits.values() and set(splits.values()) != {"train"}:
    left_out = [p for p in files if splits[p] != "train"]
    logging.info("%s: reading its train split only; left out: %s", folder,
                 ", ".join(str(p.relative_to(folder)) for p in left_out))
    files = [p for p in files if splits[p] == "train"]
  kinds = {"Parquet" if p.suffix.lower() in _PARQUET_SUFFIXES else "JSONL" for p in files}
  if len(kinds) > 1:
    shown = ", ".join(str(p.relative_to(folder)) for p in files[:4]) + (", ..." if len(files) > 4 else "")
    raise CoditError(f"{folder} holds both Parquet and JSONL files ({shown}), often the same data twice. Give "
                     "the files to read, separated by commas.")
  return files


def _split_of(relative: Path) -> str | None:
  for part in reversed(relative.parts):  # the file's name first, then its folders
    if match := _SPLIT.match(part):
      return match.group(1).lower()
  return None


def _read_file(path: Path, report: DataReport) -> list[Example]:
  with path.open("rb") as f:
    if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
      raise CoditError(f"{path} is a Git LFS pointer, not the data: fetch the files (`git lfs pull` in the "
                       "clone, or download the dataset with `huggingface-cli download --repo-type dataset`).")
  if path.suffix.lower() in _PARQUET_SUFFIXES:
    return _read_parquet(path, report)
  return _read_jsonl(path, report)


def _read_jsonl(path: Path, report: DataReport) -> list[Example]:
  examples, rows, with_response = [], 0, 0
  with path.open("rb") as f:
    for number, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(raw)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CoditError(f"{where} is not a JSON object ({e}). Each line of a JSONL dataset is one "
                         "object with the fields instruction and response.") from None
      if not isinstance(record, dict):
        raise CoditError(f"{where} is not a JSON object; each line needs the fields instruction and response.")
      rows += 1
      with_response += "response" in record or "output" in record
      _keep(_example(record, where), examples, report, where)
  if rows and not with_response:
    raise CoditError(f"{path}: no line has the field 'response' (or 'output'). codit-train needs the fields "
                     "instruction and response.")
  return examples


def _read_parquet(path: Path, report: DataReport) -> list[Example]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only for Parquet input)
  try:
    table = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for unreadable files
    raise CoditError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e}).") from None
  names = table.schema_arrow.names
  missing = [f for f in ("instruction", "response") if f not in names and not (f == "response" and "output" in names)]
  if missing:
    raise CoditError(f"{path}: the Parquet file has no column {missing[0]!r} (its columns: {', '.join(names)}). "
                     "codit-train needs instruction and response.")
  examples, row = [], 0
  for batch in table.iter_batches(columns=[f for f in _FIELDS if f in names]):
    for record in batch.to_pylist():
      where = f"{path} row {row}"
      _keep(_example(record, where), examples, report, where)
      row += 1
  return examples


def _read_tfds_folder(folder: Path, report: DataReport) -> list[Example]:
  if not (folder / "dataset_info.json").is_file():
    raise CoditError(f"{folder} is a codit-generate output that is not finished (no dataset_info.json). "
                     "Rerun the same codit-generate command to finish it.")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (slow; only for TFDS input)
  try:
    builder = tfds.builder_from_directory(str(folder))
  except Exception as e:  # corrupt metadata: all the user can do is regenerate or point elsewhere
    raise CoditError(f"{folder} could not be read as a TFDS dataset ({type(e).__name__}: {e}).") from None
  fields = set(builder.info.features.keys())
  for field in ("instruction", "response"):
    if field not in fields:
      raise CoditError(f"{folder}: the TFDS dataset has no field {field!r} (its fields: "
                       f"{', '.join(sorted(fields))}). codit-train needs instruction and response.")
  if "train" not in builder.info.splits:
    raise CoditError(f"{folder}: the TFDS dataset has no 'train' split (splits: "
                     f"{', '.join(builder.info.splits)}).")
  examples = []
  dataset = builder.as_dataset(split="train", shuffle_files=False)
  for i, record in enumerate(tfds.as_numpy(dataset)):
    record = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in record.items() if k in _FIELDS}
    where = f"{folder} record {i}"
    _keep(_example(record, where), examples, report, where)
  return examples


def _keep(result: Example | str, examples: list[Example], report: DataReport, where: str) -> None:
  """Appends a good example; counts (and logs the first few of) the rows skipped as bad."""
  if isinstance(result, Example):
    examples.append(result)
    return
  report.read += 1
  report.dropped[result] += 1
  if sum(report.dropped[k] for k in _BAD_ROWS) <= _PROBLEMS_LOGGED:
    logging.warning("%s: %s; row skipped.", where, _BAD_ROWS[result])


_BAD_ROWS = {"missing_instruction": "no instruction (missing or null)",
             "empty_instruction": "the instruction is empty",
             "missing_response": "no response (missing or null)",
             "empty_response": "the response is empty"}


def _example(record: dict, where: str) -> Example | str:
  """The record as an Example, or the kind of bad row it is (a key of _BAD_ROWS)."""
  response_field = "response" if "response" in record or "output" not in record else "output"
  for field in ("instruction", response_field):
    if record.get(field) is not None and not isinstance(record[field], str):
      raise CoditError(f"{where}: field {field!r} must be text, not {type(record[field]).__name__}.")
  instruction, response = record.get("instruction"), record.get(response_field)
  if instruction is None:
    return "missing_instruction"
  if not instruction.strip():
    return "empty_instruction"
  if response is None:
    return "missing_response"
  if not response.strip():
    return "empty_response"
  repetitive = record.get("repetitive")
  if repetitive is None:  # not in the file: the flag codit-generate would have written
    repetitive = repetition.is_repetitive(response)
  elif not isinstance(repetitive, (bool, np.bool_)):
    raise CoditError(f"{where}: field 'repetitive' must be true or false, not {repetitive!r}.")
  return Example(instruction, response, _finished(record, where), bool(repetitive), where)


def _finished(record: dict, where: str) -> bool:
  """finish_reason == 'stop', else is_completed (the authors' layout), else True."""
  finish_reason = record.get("finish_reason")
  if finish_reason:
    if finish_reason not in FINISH_REASONS:
      raise CoditError(f"{where}: field 'finish_reason' is {finish_reason!r}; it must be 'stop', 'length' or 'repetitive'.")
    return finish_reason == "stop"
  is_completed = record.get("is_completed")
  if is_completed is None:
    return True
  if not isinstance(is_completed, (bool, np.bool_)):
    raise CoditError(f"{where}: field 'is_completed' must be true or false, not {is_completed!r}.")
  return bool(is_completed)


def read_datasets(datasets, *, drop_repetitive: bool, drop_unfinished: bool,
                  report: DataReport | None = None) -> list[Example]:
  """The examples of every dataset in order, without the bad and filtered ones (counted in `report`)."""
  paths = dataset_paths(datasets)
  if not paths:
    raise CoditError("no datasets: set --config.datasets to one or more codit-generate output folders "
                     "(or TFDS or Hub dataset folders, or JSONL or Parquet files), separated by commas.")
  report = report if report is not None else DataReport()
  kept = []
  for path in paths:
    for example in read_dataset(path, report):
      report.read += 1
      if drop_repetitive and example.repetitive:
        report.dropped["repetitive"] += 1
      elif drop_unfinished and not example.finished:
        report.dropped["unfinished"] += 1
      else:
        kept.append(example)
  report.kept = len(kept)
  return kept


# ----------------------------------------------------------------------------------------------------------------
# The student's format.
# ----------------------------------------------------------------------------------------------------------------


def set_chat_template(tokenizer, chat_template: str, student: str) -> None:
  """Gives the tokenizer `chat_template` ('chatml', a Jinja string, or '' to keep its own)."""
  if chat_template:
    tokenizer.chat_template = CHATML_TEMPLATE if chat_template == "chatml" else chat_template
  if not getattr(tokenizer, "chat_template", None):
    raise CoditError(f"the student {student!r} has no chat template (a base model?). Give it one with "
                     "--config.chat_template=chatml or a Jinja template string.")
  try:
    tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
  except Exception as e:  # pylint: disable=broad-except  (jinja2's errors, and what the template raises)
    where = "--config.chat_template" if chat_template else f"the chat template of the student {student!r}"
    line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
    raise CoditError(f"{where} cannot render a user turn{line}: {type(e).__name__}: {e}. Fix the template, or "
                     "use --config.chat_template=chatml.") from None


def assistant_end_ids(tokenizer, stop_ids: Sequence[int]) -> list[int]:
  """The tokens the chat template writes after an assistant message, up to its end-of-turn token.

  Rendering a conversation that ends in an assistant turn shows what the
  template closes that turn with ('<|im_end|>\\n', '<|eot_id|>',
  '<end_of_turn>\\n', '</s>'). Training on that end-of-turn token, rather
  than on the tokenizer's eos, teaches the student to close its turns the way
  its template writes them (Gemma's eos is not its end of turn; a Qwen base
  model given ChatML has '<|im_end|>' in its vocabulary but eos
  '<|endoftext|>'). The end-of-turn token is the first one of the closing text
  that is a stop token or a special token. What follows it (a newline) is never
  generated, so it is left out. A template whose closing text holds no such
  token (ChatML on a tokenizer where '<|im_end|>' is plain text) falls back to
  the eos token.
  """
  stop_ids = set(int(i) for i in stop_ids)
  special_ids = set(tokenizer.all_special_ids) | {
      int(i) for i, token in tokenizer.added_tokens_decoder.items() if token.special}
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _RESPONSE_SENTINEL}]
  try:
    text = tokenizer.apply_chat_template(messages, tokenize=False)
  except Exception as e:  # templates that refuse a closing assistant turn: fall back to eos
    logging.warning("the chat template cannot render an assistant turn (%s); the end token is eos.", e)
    text = ""
  if _RESPONSE_SENTINEL in text:
    after = text[text.rindex(_RESPONSE_SENTINEL) + len(_RESPONSE_SENTINEL):]
    ids = list(tokenizer(after, add_special_tokens=False)["input_ids"])
    for i, token in enumerate(ids):
      if token in stop_ids or token in special_ids:
        return ids[:i + 1]
  if tokenizer.eos_token_id is None:
    raise CoditError("the student's tokenizer has no eos token and its chat template no end-of-turn token, "
                     "so a response could never end. Use a tokenizer with an eos token.")
  return [int(tokenizer.eos_token_id)]


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """How one example becomes tokens for the student."""
  tokenizer: object
  end_ids: tuple[int, ...]
  enable_thinking: bool | None

  @classmethod
  def for_student(cls, tokenizer, generation_config_source) -> ChatFormat:
    """`generation_config_source`: the student's folder (for generation_config.json eos ids), or None."""
    stop_ids = prompts.end_token_ids(tokenizer, generation_config_source)
    return cls(tokenizer, tuple(assistant_end_ids(tokenizer, stop_ids)), prompts.default_enable_thinking(tokenizer))

  def prompt_ids(self, instruction: str) -> list[int]:
    return prompts.build_prompt_ids(self.tokenizer, instruction, enable_thinking=self.enable_thinking)

  def response_ids(self, response: str) -> list[int]:
    return list(self.tokenizer(response, add_special_tokens=False)["input_ids"])


@dataclasses.dataclass(frozen=True)
class Tokenized:
  tokens: np.ndarray  # (n,) int32
  targets: np.ndarray  # (n,) bool: the tokens the loss is taken on (response and end)


def tokenize(fmt: ChatFormat, example: Example, max_length: int, report: DataReport | None = None):
  """The example as one sequence of at most max_length tokens, or None if its prompt alone fills it.

  A response cut to fit loses its end token: it is then trained as an
  unfinished one.
  """
  prompt = fmt.prompt_ids(example.instruction)
  response = fmt.response_ids(example.response) + (list(fmt.end_ids) if example.finished else [])
  if len(prompt) >= max_length:
    if report is not None:
      report.dropped["prompt_too_long"] += 1
    return None
  if len(prompt) + len(response) > max_length:
    response = response[:max_length - len(prompt)]
    if report is not None:
      report.truncated += 1
  tokens = np.asarray(prompt + response, np.int32)
  targets = np.zeros(len(tokens), bool)
  targets[len(prompt):] = True
  return Tokenized(tokens, targets)


# ----------------------------------------------------------------------------------------------------------------
# Splits, rows and batches.
# ----------------------------------------------------------------------------------------------------------------


def split_eval(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, eval indices), both sorted; the eval set is a seeded random eval_fraction."""
  if not 0.0 <= eval_fraction < 1.0:
    raise CoditError(f"eval_fraction must be in [0, 1); got {eval_fraction}.")
  n_eval = int(round(n * eval_fraction))
  if eval_fraction > 0 and n > 1:
    n_eval = min(max(n_eval, 1), n - 1)
  order = np.random.default_rng((seed, 0xE7A1)).permutation(n)  # a stream apart from the epoch shuffles
  return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def pack_rows(lengths: Sequence[int], order: Sequence[int], max_length: int, packing: bool) -> list[list[int]]:
  """Greedy packing in `order`: an example joins the current row while it fits, else starts the next one."""
  rows, current, used = [], [], 0
  for i in order:
    n = int(lengths[i])
    if packing and current and used + n <= max_length:
      current.append(int(i))
      used += n
    else:
      if current:
        rows.append(current)
      current, used = [int(i)], n
  if current:
    rows.append(current)
  return rows


def make_batch(examples: Sequence[Tokenized], rows: Sequence[Sequence[int]], max_length: int,
               num_rows: int | None = None) -> dict[str, np.ndarray]:
  """Arrays of `num_rows` (default len(rows)) rows of max_length; missing rows are all padding.

  tokens, positions: (b, L) int32; segment_ids: (b, L) int32, 1, 2, ... per
  example of a row and 0 for padding; targets: (b, L) int32, the next token;
  weights: (b, L) float32, 1 where the next token is a trained token of the
  same example.
  """
  num_rows = len(rows) if num_rows is None else num_rows
  tokens = np.zeros((num_rows, max_length), np.int32)
  positions = np.zeros((num_rows, max_length), np.int32)
  segment_ids = np.zeros((num_rows, max_length), np.int32)
  trained = np.zeros((num_rows, max_length), bool)
  for r, row in enumerate(rows):
    start = 0
    for segment, i in enumerate(row, start=1):
      example = examples[i]
      n = len(example.tokens)
      tokens[r, start:start + n] = example.tokens
      positions[r, start:start + n] = np.arange(n)
      segment_ids[r, start:start + n] = segment
      trained[r, start:start + n] = example.targets
      start += n
  targets = np.zeros_like(tokens)
  targets[:, :-1] = tokens[:, 1:]
  weights = np.zeros((num_rows, max_length), np.float32)
  same_segment = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
  weights[:, :-1] = (trained[:, 1:] & same_segment).astype(np.float32)
  return dict(tokens=tokens, positions=positions, segment_ids=segment_ids, targets=targets, weights=weights)


class BatchPlan:
  """The training batches of every epoch, decided by the data and the seed alone."""

  def __init__(self, examples: Sequence[Tokenized], batch_size: int, max_length: int, packing: bool, seed: int):
    self.examples = examples
    self.lengths = [len(e.tokens) for e in examples]
    self.batch_size, self.max_length, self.packing, self.seed = batch_size, max_length, packing, seed
    self._rows: dict[int, list[list[int]]] = {}
    if self.batches_in_epoch(0) == 0:
      raise CoditError(
          f"the training data fill only {len(self.rows(0))} rows of max_length={max_length}, fewer than "
          f"batch_size={batch_size}: lower batch_size (it counts rows, each holding one or more packed "
          "examples) or add data.")

  def rows(self, epoch: int) -> list[list[int]]:
    if epoch not in self._rows:
      order = np.random.default_rng((self.seed, epoch)).permutation(len(self.examples))
      self._rows = {epoch: pack_rows(self.lengths, order, self.max_length, self.packing)}  # keep one epoch
    return self._rows[epoch]

  def batches_in_epoch(self, epoch: int) -> int:
    return len(self.rows(epoch)) // self.batch_size

  def batches_for_epochs(self, epochs: int) -> int:
    return sum(self.batches_in_epoch(e) for e in range(epochs))

  def locate(self, position: int) -> tuple[int, int]:
    """(epoch, batch index in it) of the `position`-th batch overall."""
    epoch = 0
    while position >= (n := self.batches_in_epoch(epoch)):
      position -= n
      epoch += 1
    return epoch, position

  def batches(self, start: int = 0) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """(epoch, batch) from the `start`-th batch on, without end."""
    epoch, index = self.locate(start)
    while True:
      rows = self.rows(epoch)
      for b in range(index, len(rows) // self.batch_size):
        yield epoch, make_batch(self.examples, rows[b * self.batch_size:(b + 1) * self.batch_size],
                                self.max_length)
      epoch, index = epoch + 1, 0


def eval_batches(examples: Sequence[Tokenized], batch_size: int, max_length: int,
                 packing: bool) -> list[dict[str, np.ndarray]]:
  """Every eval example once, in order; the last batch is filled with padding rows."""
  rows = pack_rows([len(e.tokens) for e in examples], range(len(examples)), max_length, packing)
  return [make_batch(examples, rows[i:i + batch_size], max_length, batch_size)
          for i in range(0, len(rows), batch_size)]
