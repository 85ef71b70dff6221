"""Instruction readers: JSONL (the seed format), JSON arrays, Parquet and TFDS.

Every reader yields `Instruction(id, instruction, source, line)` records. Bad
input never stops a run by default and is never dropped silently: each bad
record is logged (absl warning) with its file and position, skipped, and
counted by kind in an `InputReport`. `strict=True` turns the first bad record
into a `CoditError` instead.

Positions: JSONL records carry their 1-based line number (blank lines count,
so it is the line an editor shows); JSON arrays, Parquet tables and TFDS
splits carry their 0-based record index. A record without an id (no id
field, or null) gets its position as text as its id: line 5 of a JSONL file
gets "5", the first row of a Parquet file "0". Ids are then stable when a
run is resumed or the file grows at its end. (The authors' code numbers such
records `conv_{i}` from 0, so their ids differ from these, and with them the
per-example sampling keys.) Such an id can equal an explicit id of another record
(line 3 without an id and a record with id "3", or 3): whichever comes
second is reported as duplicate_id and skipped, and the message says which
side's id is its position.

Kinds of bad record (the keys of `InputReport.counts`):
  malformed_json          a JSONL line that is not JSON (or not UTF-8)
  not_an_object           a record that is not a JSON object / mapping
  missing_instruction     no instruction field, or null
  empty_instruction       an instruction that is empty or only whitespace
  instruction_not_string  an instruction that is not text (or holds a lone surrogate)
  bad_id                  an id that is neither text nor an integer, or empty, or a lone surrogate
  duplicate_id            an id already seen earlier in the same input (explicit or a position, see above)
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from absl import logging

from codit_jax import runtime
from codit_jax.errors import CoditError

FORMATS = ("jsonl", "json", "parquet", "tfds")
TFDS_PREFIX = "tfds:"  # `tfds:name` or `tfds:name/config:1.0.0` reads a prepared TFDS dataset by name
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".jsonlines": "jsonl", ".json": "json",
                   ".parquet": "parquet", ".pq": "parquet"}
_DEFAULT_ID_FIELD = "id"


@dataclasses.dataclass(frozen=True)
class Instruction:
  """One instruction to answer. `line`: JSONL line number (1-based) or record index (0-based)."""
  id: str
  instruction: str
  source: str
  line: int
  position_word: str = dataclasses.field(default="line", compare=False)  # "line" (JSONL) or "record"

  @property
  def where(self) -> str:
    """Where an editor finds it: 'seeds.jsonl line 5 (id 'x7')'."""
    return f"{self.source} {self.position_word} {self.line} (id {self.id!r})"


@dataclasses.dataclass(frozen=True)
class FieldMap:
  """Which field of an input record holds the instruction and which the id."""
  instruction: str = "instruction"
  id: str = _DEFAULT_ID_FIELD

  @classmethod
  def parse(cls, spec: str) -> FieldMap:
    """'instruction=prompt,id=uid' -> FieldMap('prompt', 'uid'); unnamed keys keep their default."""
    fields = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
      key, sep, value = (s.strip() for s in item.partition("="))
      if not sep or key not in ("instruction", "id") or not value:
        raise CoditError(
            f"field mapping {spec!r}: cannot read {item!r}. Write it as comma-separated "
            "key=field pairs with keys 'instruction' and 'id', e.g. 'instruction=prompt,id=uid'.")
      fields[key] = value
    return cls(**fields)


class InputReport:
  """Counts of bad records by kind, with the first few described in full."""

  def __init__(self, source: str = "", max_examples: int = 5):
    self.source = source
    self.max_examples = max_examples
    self.records_read = 0  # good records handed on
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: list[str] = []
    self._skipping_kinds: set[str] = set()

  def add(self, kind: str, where: str, message: str, *, skipped: bool = True) -> None:
    """Records one problem; `skipped=False` for records kept in altered form (e.g. truncated)."""
    self.counts[kind] += 1
    if skipped:
      self._skipping_kinds.add(kind)
    if len(self.examples) < self.max_examples:
      self.examples.append(f"{where}: {message}")

  @property
  def skipped(self) -> int:
    return sum(n for kind, n in self.counts.items() if kind in self._skipping_kinds)

  def summary(self) -> str:
    head = f"{self.source}: " if self.source else ""
    text = (f"{head}{self.records_read} instruction{'' if self.records_read == 1 else 's'} read, "
            f"{self.skipped} record{'' if self.skipped == 1 else 's'} skipped")
    if not self.counts:
      return text + "."
    kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(self.counts.items()))
    return f"{text} ({kinds}). First problems: " + "; ".join(self.examples)


@dataclasses.dataclass(frozen=True)
class _Problem:
  kind: str
  message: str


def read_instructions(source: str | Path, *, format: str | None = None,  # pylint: disable=redefined-builtin
                      fields: FieldMap = FieldMap(), split: str = "train",
                      tfds_data_dir: str | None = None, strict: bool = False,
                      report: InputReport | None = None) -> Iterator[Instruction]:
  """Yields the good instructions of `source`; bad records go to `report` (or raise if strict).

  `format` is one of FORMATS, or None to tell by the name: *.jsonl / *.ndjson,
  *.json (a JSON array if it starts with '[', else JSONL), *.parquet, a folder
  holding dataset_info.json (TFDS), or 'tfds:<name>' (a TFDS dataset already
  prepared under `tfds_data_dir`; nothing is ever downloaded). `split` is used
  by TFDS only.
  """
  source = str(source)
  report = report if report is not None else InputReport(source)
  report.source = report.source or source
  format = format or detect_format(source)
  # Opened here, not lazily, so that a missing file or column fails at the call.
  raw_records = _raw_records(source, format, fields, split, tfds_data_dir)
  position_word = "line" if format == "jsonl" else "record"
  return _good_instructions(raw_records, source, position_word, fields, strict, report)


def _good_instructions(raw_records: Iterator[tuple[int, Any]], source: str, position_word: str,
                       fields: FieldMap, strict: bool, report: InputReport) -> Iterator[Instruction]:
  seen_ids: dict[str, tuple[int, bool]] = {}  # id -> (position, whether the id is that position)
  named_id_found, first_fields = fields.id == _DEFAULT_ID_FIELD, None
  for position, raw in raw_records:
    if isinstance(raw, Mapping):
      named_id_found = named_id_found or fields.id in raw
      first_fields = first_fields if first_fields is not None else list(raw)
    result = raw if isinstance(raw, _Problem) else _to_instruction(raw, position, fields, source, position_word)
    numbered = isinstance(raw, Mapping) and raw.get(fields.id) is None
    if isinstance(result, Instruction) and result.id in seen_ids:
      result = _duplicate(result.id, numbered, *seen_ids[result.id], position_word)
    if isinstance(result, _Problem):
      _report_problem(report, f"{source} {position_word} {position}", result, strict)
      continue
    seen_ids[result.id] = (position, numbered)
    report.records_read += 1
    yield result
  if not named_id_found and first_fields is not None:
    # A mistyped id field would number every record by its position, silently.
    raise CoditError(f"{source}: prompt_fields names the id field {fields.id!r}, which no record has (the first "
                     f"record's fields: {', '.join(first_fields)}). Fix --config.prompt_fields, or leave id out "
                     "of it to number the records by position.")


def _duplicate(record_id: str, numbered: bool, first_position: int, first_numbered: bool,
               position_word: str) -> _Problem:
  """A duplicate id; when one side's id is its position (it has none), the message says so."""
  message = f"id {record_id!r} already appeared earlier in this input"
  if numbered:
    message = f"no id, so numbered by its {position_word}, but {message}"
  first = f"{position_word} {first_position}"
  if first_numbered:
    first += f", which has no id and is numbered by its {position_word}"
  return _Problem("duplicate_id", f"{message} ({first})")


def load_instructions(source: str | Path, **kwargs) -> tuple[list[Instruction], InputReport]:
  """All good instructions of `source` and the report of what was skipped (see read_instructions)."""
  report = kwargs.pop("report", None) or InputReport(str(source))
  instructions = list(read_instructions(source, report=report, **kwargs))
  return instructions, report


def detect_format(source: str) -> str:
  """The input format named by `source`: see read_instructions."""
  if source.startswith(TFDS_PREFIX):
    return "tfds"
  path = Path(source).expanduser()
  if path.is_dir():
    if (path / "dataset_info.json").is_file():
      return "tfds"
    raise CoditError(
        f"input {source!r} is a folder without dataset_info.json, so it is not a TFDS dataset. "
        "Give a JSONL, JSON or Parquet file, a TFDS dataset folder, or 'tfds:<name>'.")
  if not path.is_file():
    raise CoditError(f"input file {source!r} does not exist. Check the path.")
  format = _SUFFIX_FORMATS.get(path.suffix.lower())
  if format is None:
    raise CoditError(
        f"input file {source!r}: cannot tell its format from the suffix {path.suffix!r}. Use one "
        f"of {', '.join(sorted(_SUFFIX_FORMATS))} or name the format with --config.prompts_format "
        f"({', '.join(FORMATS)}).")
  if format == "json" and _first_char(path) != "[":
    return "jsonl"  # many seed files named *.json hold one object per line
  return format


def _first_char(path: Path) -> str:
  with path.open("rb") as f:
    head = f.read(4096).decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
  return head[:1]


def _raw_records(source: str, format: str, fields: FieldMap, split: str,
                 tfds_data_dir: str | None) -> Iterator[tuple[int, Any]]:
  """(position, parsed record or _Problem) in input order."""
  if format not in FORMATS:
    raise CoditError(f"input format {format!r} is unknown. Use one of {', '.join(FORMATS)}.")
  if format != "tfds" and not Path(source).expanduser().is_file():
    raise CoditError(f"input file {source!r} does not exist. Check the path.")
  path = Path(source).expanduser()
  if format == "jsonl":
    return _jsonl_records(path)
  if format == "json":
    return _json_array_records(path)
  if format == "parquet":
    return _parquet_records(path, fields)
  return _tfds_records(source, fields, split, tfds_data_dir)


def _jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
  # Bytes, decoded line by line, so that one bad byte spoils one line only.
  with path.open("rb") as f:
    for line_number, raw_line in enumerate(f, start=1):
      try:
        text = raw_line.decode("utf-8")
      except UnicodeDecodeError as e:
        yield line_number, _Problem("malformed_json", f"not valid UTF-8 ({e.reason} at byte {e.start})")
        continue
      text = text.lstrip("\ufeff") if line_number == 1 else text
      if not text.strip():
        continue  # blank lines hold no record
      text = text.rstrip("\r\n")  # so that a line cut short errs at its own end, not at column 1 of the next
      try:
        yield line_number, json.loads(text)
      except json.JSONDecodeError as e:
        hint = (": the file looks like a JSON array, which needs the .json suffix or --config.prompts_format=json"
                if line_number == 1 and text.strip() == "[" else "")
        yield line_number, _Problem("malformed_json", f"not valid JSON ({e.msg} at column {e.colno}){hint}")


def _json_array_records(path: Path) -> Iterator[tuple[int, Any]]:
  # A broken array cannot be read past the break, so this one stops the run.
  try:
    records = json.loads(path.read_bytes().decode("utf-8-sig"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    where = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else f"byte {e.start}"
    raise CoditError(
        f"input file {str(path)!r} is not valid JSON ({where}: {e}). Fix the file, or write one "
        "JSON object per line (JSONL), where a bad line is skipped instead of stopping the run."
    ) from None
  if not isinstance(records, list):
    raise CoditError(
        f"input file {str(path)!r} holds a JSON {type(records).__name__}, not an array of records. "
        "Give a JSON array of objects, or JSONL with one object per line.")
  return enumerate(records)


def _parquet_records(path: Path, fields: FieldMap) -> Iterator[tuple[int, Any]]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (only for Parquet inputs)
  try:
    table_file = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises several types for unreadable files
    raise CoditError(f"input file {str(path)!r} is not a readable Parquet file ({e}).") from None
  columns = _columns_to_read(str(path), table_file.schema_arrow.names, fields, "column")
  rows = (row for batch in table_file.iter_batches(columns=columns) for row in batch.to_pylist())
  return enumerate(rows)


def _tfds_records(source: str, fields: FieldMap, split: str,
                  data_dir: str | None) -> Iterator[tuple[int, Any]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (only for TFDS inputs)
  runtime.import_tensorflow_quietly()  # TFDS reads through tf.data; codit-generate has not loaded TF
  builder = _tfds_builder(tfds, source, data_dir)
  if split not in builder.info.splits:
    raise CoditError(
        f"TFDS dataset {source!r} has no split {split!r}; it has {sorted(builder.info.splits)}. "
        "Choose one of those.")
  columns = _columns_to_read(source, list(builder.info.features.keys()), fields, "feature")
  # Decode only the fields read: a dataset may also hold images or audio.
  decoders = tfds.decode.PartialDecoding({name: True for name in columns})
  dataset = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)
  return enumerate(tfds.as_numpy(dataset))


def _tfds_builder(tfds, source: str, data_dir: str | None):
  path = Path(source).expanduser()
  try:
    if not source.startswith(TFDS_PREFIX) and path.is_dir():
      return tfds.builder_from_directory(str(path))
    name = source.removeprefix(TFDS_PREFIX)
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # unknown names, unreadable metadata: the user fixes the name or folder
    # First line only: for an unknown name TFDS appends its whole catalogue (over a thousand lines),
    # which would bury this message.
    reason = (str(e).strip().splitlines() or [""])[0]
    raise CoditError(
        f"TFDS dataset {source!r} could not be opened ({type(e).__name__}: {reason}). Give a folder "
        "holding dataset_info.json, or 'tfds:<name>' of a dataset prepared under the TFDS data dir."
    ) from None
  if not builder.is_prepared():
    raise CoditError(
        f"TFDS dataset {source!r} is not prepared in {builder.data_dir!r}, and this job never "
        "downloads. Prepare it first (`tfds build`), or point the TFDS data dir at a prepared copy.")
  return builder


def _columns_to_read(source: str, available: list[str], fields: FieldMap, word: str) -> list[str]:
  """The columns to read; an unknown instruction column (or explicitly named id column) is an error."""
  if fields.instruction not in available:
    raise CoditError(
        f"{source}: no {word} {fields.instruction!r} to read instructions from; its {word}s are "
        f"{available}. Name the instruction {word} in the field mapping, e.g. 'instruction=prompt'.")
  if fields.id in available:
    return [fields.instruction, fields.id]
  if fields.id != _DEFAULT_ID_FIELD:
    raise CoditError(
        f"{source}: no {word} {fields.id!r} to read ids from; its {word}s are {available}. Fix the "
        "id in the field mapping, or leave it out to number records by their position.")
  logging.info("%s has no %r %s: ids are record positions.", source, fields.id, word)
  return [fields.instruction]


def _to_instruction(raw: Any, position: int, fields: FieldMap, source: str,
                    position_word: str) -> Instruction | _Problem:
  if not isinstance(raw, Mapping):
    return _Problem("not_an_object", f"record is a {type(raw).__name__}, not an object")
  instruction = _as_text(raw.get(fields.instruction))
  if raw.get(fields.instruction) is None:
    return _Problem("missing_instruction", f"{fields.instruction!r} is null" if fields.instruction in raw
                    else f"no {fields.instruction!r} field")
  if not isinstance(instruction, str):
    return _Problem("instruction_not_string",
                    f"{fields.instruction!r} is a {type(raw[fields.instruction]).__name__}, not text")
  if not _is_unicode(instruction):
    return _Problem("instruction_not_string", f"{fields.instruction!r} {_LONE_SURROGATE}")
  if not instruction.strip():
    return _Problem("empty_instruction", f"{fields.instruction!r} is {'only whitespace' if instruction else 'empty'}")
  record_id = _record_id(raw.get(fields.id), position)
  if isinstance(record_id, _Problem):
    return record_id
  return Instruction(id=record_id, instruction=instruction, source=source, line=position, position_word=position_word)


def _record_id(raw_id: Any, position: int) -> str | _Problem:
  """Text and integer ids as text; no id -> the record's position."""
  if raw_id is None:
    return str(position)
  if hasattr(raw_id, "item") and getattr(raw_id, "shape", None) == ():
    raw_id = raw_id.item()  # numpy scalars from TFDS
  raw_id = _as_text(raw_id)
  if isinstance(raw_id, int) and not isinstance(raw_id, bool):
    return str(raw_id)
  if not isinstance(raw_id, str):
    return _Problem("bad_id", f"id is a {type(raw_id).__name__}; ids must be text or integers")
  if not raw_id.strip():
    return _Problem("bad_id", "id is empty")
  if not _is_unicode(raw_id):
    return _Problem("bad_id", f"id {_LONE_SURROGATE}")
  return raw_id


# JSON's \ud83d escapes parse to lone surrogates (often an emoji cut in half by a scraper): the str has
# no UTF-8 form, so the tokenizer and the writer would fail on it far from the input line.
_LONE_SURROGATE = "holds a lone surrogate (a \\uD800-\\uDFFF escape without its pair), so it is not valid text"


def _is_unicode(text: str) -> bool:
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:
    return False
  return True


def _as_text(value: Any) -> Any:
  """UTF-8 bytes (TFDS strings) as str; anything else unchanged."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError:
      return value
  return value


def _report_problem(report: InputReport, where: str, problem: _Problem, strict: bool) -> None:
  if strict:
    raise CoditError(
        f"{where}: {problem.message} ({problem.kind}). Fix or remove this record, or run without "
        "strict mode to skip bad records and count them in the input report.")
  logging.warning("%s: %s (%s); record skipped.", where, problem.message, problem.kind)
  report.add(problem.kind, where, problem.message)
