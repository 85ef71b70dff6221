"""The data layer: instruction readers, chat-template prompts, end tokens, the length guard, repetition.

Every expectation here is written out by hand (ids, line numbers, counts, n-gram shares), not recomputed with
the code under test.
"""

import json
from fractions import Fraction
from pathlib import Path

import pytest

import tiny_checkpoints
from codit_jax.data import instructions, prompts, repetition
from codit_jax.data.instructions import FieldMap, InputReport, Instruction
from codit_jax.errors import CoditError

# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list) -> Path:
  """Writes one line per item; dicts as JSON, str as UTF-8 text, bytes verbatim (for bad bytes)."""
  with path.open("wb") as f:
    for line in lines:
      if isinstance(line, dict):
        line = json.dumps(line)
      f.write((line.encode("utf-8") if isinstance(line, str) else line) + b"\n")
  return path


def _ids(records):
  return [r.id for r in records]


# ------------------------------------------------------------------------------------------------
# JSONL, the seed format.
# ------------------------------------------------------------------------------------------------


def test_jsonl_seed_format_keeps_ids_and_numbers_missing_ones_by_line(tmp_path):
  path = _write_lines(tmp_path / "seeds.jsonl", [
      {"id": "a", "instruction": "Say hi."},         # line 1
      {"instruction": "No id here."},                # line 2 -> id "2"
      "",                                            # line 3: blank, no record, but still counted
      {"id": 7, "instruction": "Integer id."},       # line 4 -> id "7"
      {"instruction": "Also no id.", "extra": 1},    # line 5 -> id "5"; unknown fields are ignored
  ])
  records, report = instructions.load_instructions(path)
  assert records == [
      Instruction("a", "Say hi.", str(path), 1),
      Instruction("2", "No id here.", str(path), 2),
      Instruction("7", "Integer id.", str(path), 4),
      Instruction("5", "Also no id.", str(path), 5),
  ]
  assert report.records_read == 4
  assert report.skipped == 0 and not report.counts
  assert report.summary() == f"{path}: 4 instructions read, 0 records skipped."


def test_a_line_number_id_colliding_with_an_explicit_id_is_reported(tmp_path):
  path = _write_lines(tmp_path / "seeds.jsonl", [
      {"id": "3", "instruction": "Explicit id 3."},    # line 1
      {"instruction": "No id: numbered 2."},           # line 2 -> id "2"
      {"instruction": "No id: numbered 3."},           # line 3 -> id "3", taken by line 1: skipped
      {"id": 2, "instruction": "Explicit id 2."},      # line 4 -> id "2", taken by line 2: skipped
  ])
  records, report = instructions.load_instructions(path)
  assert _ids(records) == ["3", "2"] and [r.line for r in records] == [1, 2]
  assert report.counts == {"duplicate_id": 2}
  assert report.examples == [
      f"{path} line 3: no id, so numbered by its line, but id '3' already appeared earlier in this input (line 1)",
      f"{path} line 4: id '2' already appeared earlier in this input (line 2, which has no id and is numbered by "
      "its line)"]


def test_jsonl_byte_order_mark_and_crlf_line_ends(tmp_path):
  # Files saved on Windows: a BOM before the first record and \r\n line ends.
  path = tmp_path / "windows.jsonl"
  path.write_bytes(b'\xef\xbb\xbf{"id": "x", "instruction": "First."}\r\n{"instruction": "Second."}\r\n')
  records, report = instructions.load_instructions(path)
  assert [(r.id, r.instruction, r.line) for r in records] == [("x", "First.", 1), ("2", "Second.", 2)]
  assert not report.counts


def test_other_jsonl_suffixes_and_json_files_holding_one_object_per_line(tmp_path):
  lines = [{"id": "q1", "instruction": "One."}, {"id": "q2", "instruction": "Two."}]
  for name in ("seeds.ndjson", "seeds.jsonlines", "seeds.json", "SEEDS.JSONL"):
    path = _write_lines(tmp_path / name, lines)
    assert instructions.detect_format(str(path)) == "jsonl", name
    assert _ids(instructions.load_instructions(path)[0]) == ["q1", "q2"], name


def test_field_mapping_reads_other_field_names(tmp_path):
  path = _write_lines(tmp_path / "seeds.jsonl", [
      {"uid": "u1", "prompt": "Name a fish.", "instruction": "not this one"},
      {"prompt": "Name a bird."},  # no uid: its line number
  ])
  records, _ = instructions.load_instructions(path, fields=FieldMap.parse("instruction=prompt,id=uid"))
  assert [(r.id, r.instruction) for r in records] == [("u1", "Name a fish."), ("2", "Name a bird.")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_an_id_field_that_no_record_has_is_refused(tmp_path, suffix):
  # A typo (uuid for uid) would otherwise number every record by its position, silently.
  rows = [{"uid": "u1", "prompt": "Name a fish."}, {"uid": "u2", "prompt": "Name a bird."}]
  path = tmp_path / f"seeds{suffix}"
  if suffix == ".json":
    path.write_text(json.dumps(rows))
  else:
    _write_lines(path, rows)
  with pytest.raises(CoditError, match=r"names the id field 'uuid', which no record has \(the first record's "
                                       r"fields: uid, prompt\)\. Fix --config.prompt_fields"):
    instructions.load_instructions(path, fields=FieldMap.parse("instruction=prompt,id=uuid"))
  records, _ = instructions.load_instructions(path, fields=FieldMap.parse("instruction=prompt,id=uid"))
  assert [r.id for r in records] == ["u1", "u2"]
  # The default id field may be absent from every record: they are numbered by position, as documented.
  records, _ = instructions.load_instructions(path, fields=FieldMap.parse("instruction=prompt"))
  assert [r.id for r in records] == (["1", "2"] if suffix == ".jsonl" else ["0", "1"])


def test_field_map_parse():
  assert FieldMap.parse("instruction=prompt,id=uid") == FieldMap("prompt", "uid")
  assert FieldMap.parse(" id = uid ") == FieldMap("instruction", "uid")
  assert FieldMap.parse("instruction=prompt") == FieldMap("prompt", "id")
  assert FieldMap.parse("") == FieldMap()
  for bad in ("prompt", "question=prompt", "instruction=", "instruction:prompt"):
    with pytest.raises(CoditError, match="key=field pairs"):
      FieldMap.parse(bad)


# ------------------------------------------------------------------------------------------------
# JSON arrays, Parquet and TFDS.
# ------------------------------------------------------------------------------------------------


def test_json_array_records_are_numbered_from_zero(tmp_path):
  path = tmp_path / "seeds.json"
  path.write_text(json.dumps([
      {"id": "a", "instruction": "First."},
      {"instruction": "Second, no id."},  # record 1 -> id "1"
      {"id": 3, "instruction": "Third."},
  ], indent=2))
  assert instructions.detect_format(str(path)) == "json"
  records, report = instructions.load_instructions(path)
  assert [(r.id, r.instruction, r.line) for r in records] == [
      ("a", "First.", 0), ("1", "Second, no id.", 1), ("3", "Third.", 2)]
  assert report.records_read == 3


def test_json_array_bad_records_are_skipped_with_their_index(tmp_path):
  path = tmp_path / "seeds.json"
  path.write_text(json.dumps([{"id": "a", "instruction": "Good."}, "a string", {"id": "c"}]))
  records, report = instructions.load_instructions(path)
  assert _ids(records) == ["a"]
  assert report.counts == {"not_an_object": 1, "missing_instruction": 1}
  assert report.examples == [f"{path} record 1: record is a str, not an object",
                             f"{path} record 2: no 'instruction' field"]


def test_parquet(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = tmp_path / "seeds.parquet"
  pq.write_table(pa.table({
      "prompt": ["Name a fish.", None, "Name a bird.", "   "],
      "uid": ["f", "g", "b", "e"],
      "unused": [1.0, 2.0, 3.0, 4.0],
  }), path)
  records, report = instructions.load_instructions(path, fields=FieldMap.parse("instruction=prompt,id=uid"))
  assert [(r.id, r.instruction, r.line) for r in records] == [("f", "Name a fish.", 0), ("b", "Name a bird.", 2)]
  assert report.counts == {"missing_instruction": 1, "empty_instruction": 1}
  assert report.examples[0] == f"{path} record 1: 'prompt' is null"

  # Integer ids as text; without an id column the record index is the id.
  pq.write_table(pa.table({"instruction": ["A.", "B."], "id": [10, 11]}), tmp_path / "int_ids.parquet")
  assert _ids(instructions.load_instructions(tmp_path / "int_ids.parquet")[0]) == ["10", "11"]
  pq.write_table(pa.table({"instruction": ["A.", "B."]}), tmp_path / "no_ids.pq")
  assert _ids(instructions.load_instructions(tmp_path / "no_ids.pq")[0]) == ["0", "1"]


def test_parquet_without_the_named_columns(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  path = tmp_path / "seeds.parquet"
  pq.write_table(pa.table({"prompt": ["A."], "uid": ["a"]}), path)
  # Opened at the call, not at the first next(): the error comes before any generation starts.
  with pytest.raises(CoditError, match=r"no column 'instruction'.*\['prompt', 'uid'\].*instruction=prompt"):
    instructions.read_instructions(path)
  with pytest.raises(CoditError, match="no column 'key' to read ids from"):
    instructions.read_instructions(path, fields=FieldMap("prompt", "key"))
  (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
  with pytest.raises(CoditError, match="not a readable Parquet file"):
    instructions.read_instructions(tmp_path / "broken.parquet")


@pytest.fixture(scope="module")
def tfds_folder(tmp_path_factory):
  """A tiny prepared TFDS dataset `seeds` 1.0.0 with text features 'prompt' and 'uid', built offline."""
  tf = pytest.importorskip("tensorflow")
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = tmp_path_factory.mktemp("tfds")
  folder = data_dir / "seeds" / "1.0.0"
  folder.mkdir(parents=True)
  features = tfds.features.FeaturesDict({"prompt": tfds.features.Text(), "uid": tfds.features.Text()})
  rows = {
      "train": [{"prompt": "Say hi.", "uid": "a"}, {"prompt": "", "uid": "b"},
                {"prompt": "Name a fish.", "uid": "c"}, {"prompt": "Again.", "uid": "a"}],
      "test": [{"prompt": "Only test.", "uid": "t"}],
  }
  for split, examples in rows.items():
    with tf.io.TFRecordWriter(str(folder / f"seeds-{split}.tfrecord-00000-of-00001")) as writer:
      for example in examples:
        writer.write(features.serialize_example(example))
  tfds.folder_dataset.write_metadata(data_dir=str(folder), features=features, split_infos=None)
  return data_dir, folder


def test_tfds_folder_with_field_mapping(tfds_folder):
  _, folder = tfds_folder
  assert instructions.detect_format(str(folder)) == "tfds"
  fields = FieldMap.parse("instruction=prompt,id=uid")
  records, report = instructions.load_instructions(folder, fields=fields)
  assert records == [Instruction("a", "Say hi.", str(folder), 0), Instruction("c", "Name a fish.", str(folder), 2)]
  assert report.counts == {"empty_instruction": 1, "duplicate_id": 1}
  assert report.examples == [f"{folder} record 1: 'prompt' is empty",
                             f"{folder} record 3: id 'a' already appeared earlier in this input (record 0)"]
  records, _ = instructions.load_instructions(folder, fields=fields, split="test")
  assert [(r.id, r.instruction) for r in records] == [("t", "Only test.")]
  with pytest.raises(CoditError, match=r"no split 'validation'; it has \['test', 'train'\]"):
    instructions.read_instructions(folder, fields=fields, split="validation")
  with pytest.raises(CoditError, match=r"no feature 'instruction'.*'prompt'"):
    instructions.read_instructions(folder)


def test_tfds_by_name_under_a_data_dir(tfds_folder):
  data_dir, _ = tfds_folder
  records, _ = instructions.load_instructions("tfds:seeds", tfds_data_dir=str(data_dir),
                                              fields=FieldMap.parse("instruction=prompt,id=uid"))
  assert [(r.id, r.source) for r in records] == [("a", "tfds:seeds"), ("c", "tfds:seeds")]
  with pytest.raises(CoditError) as error:
    instructions.read_instructions("tfds:no_such_dataset_here", tfds_data_dir=str(data_dir))
  message = str(error.value)
  assert "'tfds:no_such_dataset_here' could not be opened" in message
  # One paragraph a user can read, not TFDS's catalogue of every dataset it knows.
  assert "Available datasets" not in message and len(message) < 500, message


# ------------------------------------------------------------------------------------------------
# Bad records: reported with file and line, skipped, counted; strict mode stops at the first.
# ------------------------------------------------------------------------------------------------

# (line as written, kind, message) for each kind of bad record; line numbers follow from the order below.
_BAD_LINES = [
    ('{"id": "m", "instruction": "unclosed"', "malformed_json", "not valid JSON"),
    (b'{"id": "u", "instruction": "caf\xe9"}', "malformed_json", "not valid UTF-8"),
    ('["a", "list"]', "not_an_object", "record is a list, not an object"),
    ('"just a string"', "not_an_object", "record is a str, not an object"),
    ('{"id": "n1"}', "missing_instruction", "no 'instruction' field"),
    ('{"id": "n2", "instruction": null}', "missing_instruction", "'instruction' is null"),
    ('{"id": "e1", "instruction": ""}', "empty_instruction", "'instruction' is empty"),
    ('{"id": "e2", "instruction": " \\n\\t "}', "empty_instruction", "'instruction' is only whitespace"),
    ('{"id": "s1", "instruction": 42}', "instruction_not_string", "'instruction' is a int, not text"),
    ('{"id": "s2", "instruction": ["a", "b"]}', "instruction_not_string", "'instruction' is a list, not text"),
    # Valid JSON, but half an emoji: a str with no UTF-8 form, which the tokenizer would choke on.
    ('{"id": "s3", "instruction": "Half an emoji: \\ud83d."}', "instruction_not_string",
     "'instruction' holds a lone surrogate"),
    ('{"id": 1.5, "instruction": "Float id."}', "bad_id", "id is a float"),
    ('{"id": true, "instruction": "Bool id."}', "bad_id", "id is a bool"),
    ('{"id": {"k": 1}, "instruction": "Dict id."}', "bad_id", "id is a dict"),
    ('{"id": "  ", "instruction": "Blank id."}', "bad_id", "id is empty"),
    ('{"id": "x\\udc00", "instruction": "Surrogate id."}', "bad_id", "id holds a lone surrogate"),
    ('{"id": "good1", "instruction": "Same id again."}', "duplicate_id", "id 'good1' already appeared"),
]


def test_each_kind_of_bad_record_is_reported_skipped_and_counted(tmp_path):
  # Good records first, last, and between every bad one, so that skipping is seen to lose nothing.
  lines = [{"id": "good1", "instruction": "First good."}]
  for i, (bad, _, _) in enumerate(_BAD_LINES):
    lines += [bad, {"id": f"ok{i}", "instruction": f"Good number {i}."}]
  path = _write_lines(tmp_path / "mixed.jsonl", lines)
  report = InputReport(str(path), max_examples=100)
  records = list(instructions.read_instructions(path, report=report))

  assert _ids(records) == ["good1"] + [f"ok{i}" for i in range(len(_BAD_LINES))]
  assert [r.line for r in records] == [1] + [3 + 2 * i for i in range(len(_BAD_LINES))]
  assert report.records_read == 18
  assert report.counts == {"malformed_json": 2, "not_an_object": 2, "missing_instruction": 2,
                           "empty_instruction": 2, "instruction_not_string": 3, "bad_id": 5,
                           "duplicate_id": 1}
  assert report.skipped == 17
  # Bad record i sits on line 2 + 2 i.
  assert len(report.examples) == len(_BAD_LINES)
  for i, ((_, _, message), example) in enumerate(zip(_BAD_LINES, report.examples)):
    assert example.startswith(f"{path} line {2 + 2 * i}: {message}"), example
  summary = report.summary()
  assert summary.startswith(f"{path}: 18 instructions read, 17 records skipped (bad_id: 5, duplicate_id: 1, ")
  assert f"{path} line 2: not valid JSON" in summary


def test_report_keeps_only_the_first_examples(tmp_path):
  path = _write_lines(tmp_path / "bad.jsonl", ["{"] * 8 + [{"instruction": "Fine."}])
  records, report = instructions.load_instructions(path)
  assert _ids(records) == ["9"]
  assert report.counts == {"malformed_json": 8}
  assert [e.split(":")[0] for e in report.examples] == [f"{path} line {n}" for n in range(1, 6)]


@pytest.mark.parametrize("bad,kind,message", _BAD_LINES, ids=[f"{k}-{i}" for i, (_, k, _) in enumerate(_BAD_LINES)])
def test_strict_mode_raises_on_the_first_bad_record_naming_file_and_line(tmp_path, bad, kind, message):
  path = _write_lines(tmp_path / "seeds.jsonl", [
      {"id": "good1", "instruction": "Fine."}, "", bad, "{also bad", {"id": "last", "instruction": "Fine."}])
  records = instructions.read_instructions(path, strict=True)
  assert next(records).id == "good1"
  with pytest.raises(CoditError) as error:
    next(records)
  assert str(error.value).startswith(f"{path} line 3: {message}"), str(error.value)
  assert f"({kind})" in str(error.value)


def test_strict_mode_on_a_json_array_names_the_record(tmp_path):
  path = tmp_path / "seeds.json"
  path.write_text(json.dumps([{"instruction": "Fine."}, {"instruction": 3}]))
  with pytest.raises(CoditError, match=r"seeds\.json record 1: 'instruction' is a int, not text"):
    instructions.load_instructions(path, strict=True)


# ------------------------------------------------------------------------------------------------
# Inputs that cannot be read at all.
# ------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
  with pytest.raises(CoditError, match=r"input file '.*nope\.jsonl' does not exist"):
    instructions.read_instructions(tmp_path / "nope.jsonl")
  with pytest.raises(CoditError, match="does not exist"):
    instructions.read_instructions(tmp_path / "nope.txt", format="jsonl")


def test_unknown_suffix_and_unknown_format(tmp_path):
  path = tmp_path / "seeds.txt"
  path.write_text('{"instruction": "Hi."}\n')
  with pytest.raises(CoditError, match=r"cannot tell its format from the suffix '\.txt'.*\.jsonl"):
    instructions.read_instructions(path)
  # Naming the format reads any suffix.
  assert _ids(instructions.load_instructions(path, format="jsonl")[0]) == ["1"]
  with pytest.raises(CoditError, match="input format 'csv' is unknown"):
    instructions.read_instructions(path, format="csv")


def test_folder_without_dataset_info(tmp_path):
  with pytest.raises(CoditError, match="folder without dataset_info.json"):
    instructions.read_instructions(tmp_path)


def test_broken_json_array(tmp_path):
  path = tmp_path / "seeds.json"
  path.write_text('[\n  {"instruction": "One."},\n  {"instruction": "Two."\n]\n')
  with pytest.raises(CoditError, match=r"is not valid JSON \(line 4 column 1.*JSONL"):
    instructions.read_instructions(path)
  path.write_bytes(b'[{"instruction": "caf\xe9"}]')
  with pytest.raises(CoditError, match="is not valid JSON"):
    instructions.read_instructions(path)
  path.write_text('[1, 2')
  with pytest.raises(CoditError, match="is not valid JSON"):
    instructions.read_instructions(path)


def test_json_array_file_holding_something_else(tmp_path):
  path = tmp_path / "seeds.json"
  # Starts with '[' after whitespace, so it is read as an array; a JSONL file of arrays is not.
  path.write_text('  ["a"]\n["b"]\n')
  with pytest.raises(CoditError, match="is not valid JSON"):
    instructions.read_instructions(path)
  path.write_text('{"records": [{"instruction": "Hi."}]}')  # one object: read as JSONL, not an array
  assert instructions.detect_format(str(path)) == "jsonl"
  records, report = instructions.load_instructions(path)
  assert records == [] and report.counts == {"missing_instruction": 1}
  with pytest.raises(CoditError, match="holds a JSON dict, not an array"):
    instructions.read_instructions(path, format="json")


# ------------------------------------------------------------------------------------------------
# Prompts.
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
  """Tiny tokenizers. llama, gemma3 and mistral templates write the BOS, and their tokenizers add one too."""
  root = tmp_path_factory.mktemp("tokenizers")
  return {family: tiny_checkpoints.make_tokenizer(root / family, family)
          for family in ("llama", "qwen3", "gemma3", "mistral")}


_LLAMA_HEADER = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                 "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n")
_LLAMA_GENERATION_PROMPT = "<|start_header_id|>assistant<|end_header_id|>\n\n"
_QWEN3_GENERATION_PROMPT = "<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_render_prompt_is_the_chat_template_of_one_user_turn(tokenizers):
  assert prompts.render_prompt(tokenizers["llama"], "Why is the sky blue?") == (
      _LLAMA_HEADER + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhy is the sky blue?<|eot_id|>"
      + _LLAMA_GENERATION_PROMPT)
  assert prompts.render_prompt(tokenizers["gemma3"], "Hi") == (
      "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n")


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral"])
def test_build_prompt_ids_does_not_double_the_bos(tokenizers, family):
  tokenizer = tokenizers[family]
  text = prompts.render_prompt(tokenizer, "Explain why the sky is blue.")
  assert text.startswith(tokenizer.bos_token)  # the template writes the BOS itself ...
  doubled = tokenizer(text)["input_ids"]
  assert doubled[:2] == [tokenizer.bos_token_id] * 2  # ... and the tokenizer would add another: the known bug
  ids = prompts.build_prompt_ids(tokenizer, "Explain why the sky is blue.")
  assert ids == doubled[1:]
  assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
  assert tokenizer.decode(ids) == text


def test_system_prompt_is_included_when_given(tokenizers):
  llama = tokenizers["llama"]
  assert prompts.render_prompt(llama, "Hi", system_prompt="Be brief.") == (
      _LLAMA_HEADER + "Be brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
      + _LLAMA_GENERATION_PROMPT)
  qwen3 = tokenizers["qwen3"]
  assert prompts.render_prompt(qwen3, "Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  assert prompts.render_prompt(qwen3, "Hi", system_prompt="Be brief.") == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  ids = prompts.build_prompt_ids(qwen3, "Hi", system_prompt="Be brief.")
  assert qwen3.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_enable_thinking_reaches_qwen3_templates(tokenizers):
  qwen3, llama = tokenizers["qwen3"], tokenizers["llama"]
  assert prompts.default_enable_thinking(qwen3) is False
  assert prompts.default_enable_thinking(llama) is None
  no_thinking = prompts.render_prompt(qwen3, "Hi", enable_thinking=False)
  assert no_thinking == "<|im_start|>user\nHi<|im_end|>\n" + _QWEN3_GENERATION_PROMPT
  assert prompts.render_prompt(qwen3, "Hi", enable_thinking=True) == (
      "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
  ids = prompts.build_prompt_ids(qwen3, "Hi", enable_thinking=prompts.default_enable_thinking(qwen3))
  assert qwen3.decode(ids) == no_thinking
  # Templates that do not read it are unaffected.
  assert prompts.render_prompt(llama, "Hi", enable_thinking=None) == prompts.render_prompt(llama, "Hi")


def test_tokenizer_without_chat_template(tokenizers):
  class NoTemplate:
    chat_template = None
    name_or_path = "some/base-model"
  with pytest.raises(CoditError, match="'some/base-model' has no chat template"):
    prompts.build_prompt_ids(NoTemplate(), "Hi")


def test_end_token_ids_union_generation_config_and_tokenizer_eos(tokenizers, tmp_path):
  llama = tokenizers["llama"]
  eot, end_of_text, eom = (llama.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"))
  assert llama.eos_token_id == eot
  # A list, an int, an int that is the tokenizer's own eos, nothing.
  assert prompts.end_token_ids(llama, {"eos_token_id": [end_of_text, eom, eot]}) == sorted([end_of_text, eom, eot])
  assert prompts.end_token_ids(llama, {"eos_token_id": end_of_text}) == sorted([end_of_text, eot])
  assert prompts.end_token_ids(llama, {"eos_token_id": eot}) == [eot]
  assert prompts.end_token_ids(llama, {"bos_token_id": 1}) == [eot]
  assert prompts.end_token_ids(llama, None) == [eot]
  # From a generation_config.json file, and from a checkpoint folder holding one.
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eom]}))
  assert prompts.end_token_ids(llama, tmp_path / "generation_config.json") == sorted([end_of_text, eom, eot])
  assert prompts.end_token_ids(llama, str(tmp_path)) == sorted([end_of_text, eom, eot])
  # A folder without one: the tokenizer's eos only.
  (tmp_path / "bare").mkdir()
  assert prompts.end_token_ids(llama, tmp_path / "bare") == [eot]
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "generation_config.json").write_text("{eos_token_id: 3")
  with pytest.raises(CoditError, match="generation_config.json is not valid JSON"):
    prompts.end_token_ids(llama, tmp_path / "broken")


def test_end_token_ids_of_a_checkpoint_without_generation_config(tokenizers, tmp_path):
  # transformers' GenerationConfig.from_model_config: config.json's eos_token_id, else its text_config's
  # (a multimodal checkpoint); a generation_config.json, where there is one, is read instead.
  llama = tokenizers["llama"]
  eot, end_of_text, eom = (llama.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"))
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "config.json").write_text(json.dumps({"eos_token_id": [end_of_text, eom, eot]}))
  assert prompts.end_token_ids(llama, tmp_path / "plain") == sorted([end_of_text, eom, eot])
  (tmp_path / "multimodal").mkdir()
  (tmp_path / "multimodal" / "config.json").write_text(json.dumps({"text_config": {"eos_token_id": eom}}))
  assert prompts.end_token_ids(llama, tmp_path / "multimodal") == sorted([eom, eot])
  (tmp_path / "plain" / "generation_config.json").write_text(json.dumps({"eos_token_id": end_of_text}))
  assert prompts.end_token_ids(llama, tmp_path / "plain") == sorted([end_of_text, eot])
  (tmp_path / "broken_config").mkdir()
  (tmp_path / "broken_config" / "config.json").write_text("{")
  with pytest.raises(CoditError, match="config.json is not valid JSON"):
    prompts.end_token_ids(llama, tmp_path / "broken_config")


def test_end_token_ids_of_a_real_checkpoint_layout(tokenizers, tmp_path):
  # make_checkpoint's generation_config for qwen3 lists <|im_end|> and <|endoftext|>; the tokenizer's eos
  # is <|im_end|>. Written here the way transformers writes it, without building the model.
  qwen3 = tokenizers["qwen3"]
  im_end, endoftext = qwen3.convert_tokens_to_ids("<|im_end|>"), qwen3.convert_tokens_to_ids("<|endoftext|>")
  (tmp_path / "generation_config.json").write_text(json.dumps(
      {"bos_token_id": endoftext, "eos_token_id": [im_end, endoftext], "do_sample": True}))
  assert prompts.end_token_ids(qwen3, tmp_path) == sorted([im_end, endoftext])


def test_no_end_token_at_all_is_an_error():
  class NoEos:
    eos_token_id = None
  with pytest.raises(CoditError, match="no end token"):
    prompts.end_token_ids(NoEos(), {})


def test_real_vocab_size_is_the_highest_id_plus_one(tokenizers, tmp_path):
  for family, tokenizer in tokenizers.items():
    assert prompts.real_vocab_size(tokenizer, family) == len(tokenizer) == tiny_checkpoints.TOKENIZER_SIZE
  # Added tokens are part of the vocabulary (fast tokenizers list them in get_vocab()).
  grown = tiny_checkpoints.make_tokenizer(tmp_path / "grown", "qwen3")
  grown.add_tokens(["<|new_token|>"], special_tokens=True)
  assert prompts.real_vocab_size(grown, "grown") == tiny_checkpoints.TOKENIZER_SIZE + 1
  assert grown.get_vocab()["<|new_token|>"] == tiny_checkpoints.TOKENIZER_SIZE

  class Tokenizer:  # a tokenizer class that leaves its added tokens out of get_vocab(), and two names of id 1
    added_tokens_decoder = {3: "<added>"}

    def get_vocab(self):
      return {"a": 0, "b": 1, "also b": 1, "c": 2}
  assert prompts.real_vocab_size(Tokenizer(), "duck") == 4


def test_real_vocab_size_refuses_ids_with_holes():
  import tokenizers as hf_tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  vocab = {"<unk>": 0, "a": 1, "b": 2, "c": 6, "d": 9}  # 3, 4, 5, 7, 8 missing
  backend = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  holey = transformers.PreTrainedTokenizerFast(tokenizer_object=backend)
  assert len(holey.get_vocab()) == 5  # what len(get_vocab()) would take, cutting off ids 6 and 9
  with pytest.raises(CoditError, match=r"tokenizer of org/holey has holes in its token ids: 5 of the ids "
                                       r"0\.\.9 have no token \(first: 3, 4, 5, 7, 8\)"):
    prompts.real_vocab_size(holey, "org/holey")

  class Empty:
    def get_vocab(self):
      return {}
  with pytest.raises(CoditError, match="tokenizer of empty has no tokens"):
    prompts.real_vocab_size(Empty(), "empty")


_LONG_INSTRUCTION = (
    "Summarize the following story. Once upon a time, in a small village near the sea, there lived an old "
    "fisherman and his wife. Every morning the fisherman went out in his boat, and every evening he came back "
    "with fish for the market. The people of the village said that he knew the sea better than anyone, because "
    "he listened to the wind and watched the birds. What is the capital of France?")


def test_fit_prompt_within_the_limit_is_unchanged(tokenizers):
  llama = tokenizers["llama"]
  ids = prompts.build_prompt_ids(llama, "Say hi.")
  report = InputReport("seeds.jsonl")
  fitted = prompts.fit_prompt(llama, Instruction("a", "Say hi.", "seeds.jsonl", 1), len(ids), report=report)
  assert fitted == prompts.FittedPrompt(ids, "Say hi.", "ok", len(ids))
  assert not report.counts


def test_fit_prompt_skip_policy(tokenizers):
  llama = tokenizers["llama"]
  full = prompts.build_prompt_ids(llama, _LONG_INSTRUCTION)
  report = InputReport("seeds.jsonl")
  fitted = prompts.fit_prompt(llama, Instruction("x7", _LONG_INSTRUCTION, "seeds.jsonl", 3), len(full) - 1,
                              "skip", report=report)
  assert fitted == prompts.FittedPrompt(None, _LONG_INSTRUCTION, "skipped", len(full))
  assert report.counts == {"prompt_too_long": 1} and report.skipped == 1
  assert report.examples == [
      f"seeds.jsonl line 3 (id 'x7'): prompt is {len(full)} tokens, over max_prompt_len={len(full) - 1}"]


@pytest.mark.parametrize("family,generation_prompt", [("llama", _LLAMA_GENERATION_PROMPT),
                                                      ("qwen3", _QWEN3_GENERATION_PROMPT)])
@pytest.mark.parametrize("cut", [1, 40, 100])
def test_fit_prompt_truncate_policy(tokenizers, family, generation_prompt, cut):
  tokenizer = tokenizers[family]
  thinking = prompts.default_enable_thinking(tokenizer)
  full = prompts.build_prompt_ids(tokenizer, _LONG_INSTRUCTION, enable_thinking=thinking)
  max_len = len(full) - cut
  report = InputReport("seeds.jsonl")
  fitted = prompts.fit_prompt(tokenizer, Instruction("x7", _LONG_INSTRUCTION, "seeds.jsonl", 3), max_len,
                              "truncate", enable_thinking=thinking, report=report)
  assert fitted.status == "truncated" and fitted.original_length == len(full)
  assert len(fitted.ids) <= max_len
  # The cut is inside the instruction: the template, above all the generation prompt, is whole.
  generation_prompt_ids = tokenizer(generation_prompt, add_special_tokens=False)["input_ids"]
  assert fitted.ids[-len(generation_prompt_ids):] == generation_prompt_ids
  assert fitted.ids[0] == full[0]
  assert fitted.ids == prompts.build_prompt_ids(tokenizer, fitted.instruction, enable_thinking=thinking)
  # The instruction keeps its start and its end, with the mark where the middle was.
  head, mark, tail = fitted.instruction.partition(prompts.TRUNCATION_MARK)
  assert mark and _LONG_INSTRUCTION.startswith(head) and _LONG_INSTRUCTION.endswith(tail)
  assert len(head) + len(tail) < len(_LONG_INSTRUCTION)
  if cut == 40:  # enough left for both ends to say something
    assert head.startswith("Summarize") and tail.endswith("capital of France?")
  assert report.counts == {"prompt_truncated": 1} and report.skipped == 0
  assert report.examples == [
      f"seeds.jsonl line 3 (id 'x7'): prompt of {len(full)} tokens truncated to {len(fitted.ids)} "
      f"(max_prompt_len={max_len}) by cutting the middle of the instruction"]


def test_fit_prompt_plain_text_and_no_report(tokenizers):
  llama = tokenizers["llama"]
  full = prompts.build_prompt_ids(llama, _LONG_INSTRUCTION)
  fitted = prompts.fit_prompt(llama, _LONG_INSTRUCTION, len(full) - 10, "truncate")
  assert fitted.status == "truncated" and len(fitted.ids) <= len(full) - 10


@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_fit_prompts_tokenized_in_batches_equal_each_prompt_encoded_alone(tokenizers, monkeypatch, policy):
  """fit_prompts encodes ENCODE_BATCH prompts per tokenizer call; each prompt's ids are what the tokenizer
  gives its rendered text alone, in input order across batch borders, long ones skipped or truncated."""
  monkeypatch.setattr(prompts, "ENCODE_BATCH", 3)
  qwen3 = tokenizers["qwen3"]
  texts = ["Say hi.", _LONG_INSTRUCTION, "", "海の詩を書いて 🌊", "Write a list of three robots.",
           _LONG_INSTRUCTION[::-1], "Why?", "  spaces  around  "]
  alone = [qwen3.encode(prompts.render_prompt(qwen3, t, enable_thinking=False), add_special_tokens=False)
           for t in texts]
  max_len = max(len(ids) for i, ids in enumerate(alone) if texts[i] not in (_LONG_INSTRUCTION, _LONG_INSTRUCTION[::-1]))
  assert max_len < min(len(alone[1]), len(alone[5]))
  report = InputReport("seeds.jsonl")
  records = [Instruction(f"i{k}", text, "seeds.jsonl", k + 1) for k, text in enumerate(texts)]
  fitted = list(prompts.fit_prompts(qwen3, records, max_len, policy, enable_thinking=False, report=report))
  assert len(fitted) == len(texts)
  for text, ids, fit in zip(texts, alone, fitted):
    if len(ids) <= max_len:
      assert fit == prompts.FittedPrompt(ids, text, "ok", len(ids))
    elif policy == "skip":
      assert fit == prompts.FittedPrompt(None, text, "skipped", len(ids))
    else:
      assert fit.status == "truncated" and fit.original_length == len(ids) and len(fit.ids) <= max_len
      assert fit.ids == qwen3.encode(prompts.render_prompt(qwen3, fit.instruction, enable_thinking=False),
                                     add_special_tokens=False)
  kind = "prompt_too_long" if policy == "skip" else "prompt_truncated"
  assert report.counts == {kind: 2} and [e.split(":")[0] for e in report.examples] == [
      "seeds.jsonl line 2 (id 'i1')", "seeds.jsonl line 6 (id 'i5')"]


def test_fit_prompt_errors(tokenizers):
  llama = tokenizers["llama"]
  with pytest.raises(CoditError, match="prompt length policy 'cut' is unknown. Use one of skip, truncate"):
    prompts.fit_prompt(llama, "Hi", 100, "cut")
  with pytest.raises(CoditError, match="prompt length policy 'cut' is unknown"):
    prompts.fit_prompts(llama, ["Hi"], 100, "cut")  # at the call, before any prompt is taken
  template_only = len(prompts.build_prompt_ids(llama, ""))
  with pytest.raises(CoditError, match="leaves no room for any instruction text.*Raise max_prompt_len"):
    prompts.fit_prompt(llama, _LONG_INSTRUCTION, template_only, "truncate")


# ------------------------------------------------------------------------------------------------
# Repetition flag.
# ------------------------------------------------------------------------------------------------


def _distinct_chars(n: int, start: int = 0x4E00) -> str:
  """n characters that are all different (CJK ideographs), so every n-gram among them is unique."""
  return "".join(chr(start + i) for i in range(n))


def _with_bigram_repeated(times: int, length: int = 101) -> str:
  """`length` characters whose top bigram "xy" occurs `times` times and every other bigram once."""
  # "xy" + a fresh character, `times` times: bigrams xy (times), y? and ?x (each once); the rest fresh.
  fillers = _distinct_chars(length)
  text = "".join("xy" + fillers[i] for i in range(times))
  return text + fillers[times:times + length - len(text)]


def test_repetition_length_boundary():
  # One character repeated: every n-gram share is 1, but below 100 characters nothing is flagged.
  assert not repetition.is_repetitive("a" * 99)
  assert repetition.is_repetitive("a" * 100)
  assert not repetition.is_repetitive("")


def test_repetition_minimum_length_counts_the_stripped_text():
  # As the reference: `len(text.strip()) >= 100`. 99 repeated characters padded with whitespace to 103 raw
  # characters (every n-gram share far above its threshold) are too short; 100 with padding are flagged.
  padded = "\n " + "ab" * 49 + "a" + " \n"
  assert len(padded) == 103 and len(padded.strip()) == 99
  assert repetition.top_ngram_share(padded, 2) >= repetition.TOP_NGRAM_SHARE[2]
  assert not repetition.is_repetitive(padded)
  assert not repetition.is_repetitive(" " * 150)
  assert repetition.is_repetitive("\n " + "ab" * 50 + " \n")


def test_repetition_bigram_share_at_the_threshold_counts():
  # 101 characters have 100 bigrams: 16 of them "xy" is a share of exactly 16/100 = 0.16.
  at_threshold = _with_bigram_repeated(16)
  assert len(at_threshold) == 101 and at_threshold.count("xy") == 16
  assert repetition.top_ngram_share(at_threshold, 2) == repetition.TOP_NGRAM_SHARE[2] == Fraction(16, 100)
  # Trigrams "xy?" and 4-grams are all different: only the bigram rule can fire.
  assert repetition.top_ngram_count(at_threshold, 3) == 1
  assert repetition.is_repetitive(at_threshold)
  below = _with_bigram_repeated(15)  # 15/100
  assert len(below) == 101 and not repetition.is_repetitive(below)
  # 16 in 101 bigrams (102 characters) is below 0.16 too.
  assert not repetition.is_repetitive(_with_bigram_repeated(16, length=102))


def test_repetition_fourgram_share_and_the_thresholds():
  # The reference's thresholds, as exact fractions.
  assert repetition.TOP_NGRAM_SHARE == {2: Fraction(16, 100), 3: Fraction(18, 100), 4: Fraction(20, 100)}
  # "wxyz" + a fresh character, 20 times, in 103 characters: 100 4-grams, "wxyz" 20 of them = exactly 0.20.
  fillers = _distinct_chars(103)
  text = "".join("wxyz" + fillers[i] for i in range(20))
  text += fillers[20:20 + 103 - len(text)]
  assert len(text) == 103 and repetition.top_ngram_share(text, 4) == Fraction(20, 100)
  assert repetition.is_repetitive(text)
  # With these thresholds on character n-grams the 3- and 4-gram rules never fire alone: k repeats of a
  # trigram in L-2 trigrams are k repeats of its first bigram in L-1, and k >= 0.18 (L-2) gives
  # k / (L-1) >= 0.178 > 0.16 for L >= 100 (4-grams: >= 0.196). So this text has a bigram share of 20/102.
  assert repetition.top_ngram_share(text, 2) == Fraction(20, 102)


def test_repetition_long_ngram_repeats():
  # A 100-character unit of distinct characters, 10 times back to back (1000 characters): the 100-gram at
  # offset 0 occurs at 0, 100, ..., 900, ten times; every other 100-gram 9 times. Each bigram inside the unit
  # occurs 10 times in 999, about 1%, far below 0.16.
  unit = _distinct_chars(100)
  ten = unit * 10
  assert repetition.top_ngram_count(ten, 100) == 10
  assert repetition.top_ngram_share(ten, 2) == Fraction(10, 999)
  assert repetition.is_repetitive(ten)
  nine = unit * 9
  assert repetition.top_ngram_count(nine, 100) == 9
  assert not repetition.is_repetitive(nine)
  # Ten repeats need not be adjacent: separated by fresh text, they still count.
  spacers = _distinct_chars(10, start=0x3400)
  assert repetition.is_repetitive("".join(unit + s for s in spacers))
  assert not repetition.is_repetitive("".join(unit + s for s in spacers[:9]))


def test_normal_prose_is_not_flagged():
  prose = (
      "The sky looks blue because the air scatters blue light from the sun more strongly than red light. "
      "Sunlight holds every colour, and as it passes through the atmosphere the short wavelengths bounce off "
      "molecules of nitrogen and oxygen in all directions. When you look at any part of the sky away from the "
      "sun, you see this scattered light, which is mostly blue. At sunset the light crosses much more air, so "
      "most of the blue is scattered away before it reaches you, and the sky turns orange and red.")
  assert len(prose) > 400
  assert not repetition.is_repetitive(prose)
  # A list with a repeated pattern of its own is still fine.
  steps = "\n".join(f"{i}. Mix the flour, the sugar and egg number {i}." for i in range(1, 6))
  assert len(steps) > 100 and not repetition.is_repetitive(steps)


def test_malformed_jsonl_messages_point_at_the_line_itself(tmp_path):
  cut = _write_lines(tmp_path / "cut.jsonl", ['{"id": "a", "instruction": ', '{"id": "b", "instruction": "Hi."}'])
  _, report = instructions.load_instructions(cut)
  assert report.examples == [f"{cut} line 1: not valid JSON (Expecting value at column 28)"]
  assert report.summary() == (f"{cut}: 1 instruction read, 1 record skipped (malformed_json: 1). First problems: "
                              f"{cut} line 1: not valid JSON (Expecting value at column 28)")
  array = tmp_path / "array.jsonl"
  array.write_text(json.dumps([{"id": "a", "instruction": "Hi."}], indent=2) + "\n")
  _, report = instructions.load_instructions(array)
  assert report.examples[0].endswith("the file looks like a JSON array, which needs the .json suffix or "
                                     "--config.prompts_format=json")
