"""The dataset writer: shards as rows finish, resume by id, kill safety, folder claims, outputs.

Synthetic example dicts only, no models. A kill is simulated by raising a
BaseException (nothing in the writer catches it) from inside a file operation,
after half of the data was written, and the run is resumed by a fresh writer.
"""

import errno
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from codit_jax import runtime
from codit_jax.data import writer
from codit_jax.errors import CoditError

SETTINGS = {"post_trained": "org/model-it", "pre_trained": "org/model-base", "mode": "codit",
            "alpha": 0.01, "beta": 1.0, "temperature": 1.0, "top_p": 0.9, "top_k": 0,
            "max_new_tokens": 8, "seed": 0}


def example(i: int, mode: str = "codit") -> dict:
  n = 1 + i % 4
  rng = np.random.default_rng(i)
  stop = i % 3 != 0
  return {
      "id": f"ex{i:03d}", "instruction": f"Say {i} ünïcode", "response": f"answer {i}",
      "finish_reason": "stop" if stop else "length",
      "response_tokens": list(range(i, i + n)),
      "post_logprobs": (-rng.random(n)).tolist(),
      "pre_logprobs": (-rng.random(n)).tolist() if mode == "codit" else [],
      "codit_logprobs": (-rng.random(n)).tolist(),
      "end_codit_logprob": -0.25 - i / 100 if stop else None,
      "repetitive": i % 5 == 0,
  }


def digest(i: int) -> str:
  return f"d{i:03d}"


def new_writer(folder, settings=SETTINGS, **options) -> writer.DatasetWriter:
  return writer.DatasetWriter(str(folder), settings, **options)


def add(w: writer.DatasetWriter, ids) -> None:
  for i in ids:
    w.add(example(i), digest(i))


def read_ids(folder) -> list[str]:
  return [e["id"] for e in writer.read_examples(str(folder))]


def jsonl_ids(folder) -> list[str]:
  with open(os.path.join(folder, writer.JSONL_FILE)) as f:
    return [json.loads(line)["id"] for line in f]


def parquet_ids(folder) -> list[str]:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(folder, "parquet", "*.parquet")))
  return [i for f in files for i in pq.read_table(f).column("id").to_pylist()]


def all_files(folder) -> set[str]:
  return {os.path.relpath(os.path.join(root, f), folder) for root, _, fs in os.walk(folder) for f in fs}


def assert_clean(folder) -> None:
  """No temporary file and no part without its index is left."""
  files = all_files(folder)
  assert not [f for f in files if ".tmp-" in f]
  indexed = {f[:-len(".index.json")] for f in files if f.endswith(".index.json")}
  parts = {f.rsplit(".", 1)[0] for f in files if f.startswith("parts/") and not f.endswith(".index.json")}
  assert parts <= indexed


def test_a_shard_every_rows_per_shard_rows(tmp_path):
  w = new_writer(tmp_path / "out", rows_per_shard=3)
  w.claim()
  add(w, range(7))
  assert len(w.finished()) == 6  # two shards written, one row buffered
  w.flush()
  w.flush()  # nothing buffered: no empty shard
  assert w.finished() == {f"ex{i:03d}": digest(i) for i in range(7)}
  assert w.finish({"k": 1}, "test") == 7
  shards = sorted(tf.io.gfile.glob(f"{tmp_path}/out/codit-train.tfrecord-*"))
  assert [os.path.basename(s) for s in shards] == [writer.shard_name(i) for i in range(3)]
  assert [sum(1 for _ in tf.data.TFRecordDataset(s)) for s in shards] == [3, 3, 1]
  assert read_ids(tmp_path / "out") == [f"ex{i:03d}" for i in range(7)]  # the order of add()
  assert_clean(tmp_path / "out")


def test_finished_sees_every_process(tmp_path):
  folder = tmp_path / "out"
  first = new_writer(folder, process_index=0, num_processes=2, rows_per_shard=2)
  second = new_writer(folder, process_index=1, num_processes=2, rows_per_shard=2)
  first.check_claimable()
  second.check_claimable()
  first.claim()
  add(first, [0, 2, 4])
  add(second, [1, 3, 5, 7])
  first.flush()
  second.flush()
  everything = {f"ex{i:03d}": digest(i) for i in [0, 1, 2, 3, 4, 5, 7]}
  for process in (0, 1):
    assert new_writer(folder, process_index=process, num_processes=2).finished() == everything
  assert first.finish({}, "") == 7
  assert sorted(read_ids(folder)) == sorted(everything)
  assert new_writer(folder, process_index=1, num_processes=2).finished() == everything  # after finish too
  names = os.listdir(folder / "parts")
  assert len({n.split(".")[0] for n in names}) == 4  # four shards, no name collided


class Killed(BaseException):
  """kill -9: nothing catches it, nothing after it runs."""


class Killer:
  """Counts file operations and kills the run at the n-th: a half-written file, or no rename."""

  def __init__(self, monkeypatch, at: int):
    self.at, self.calls = at, 0
    real_open, real_replace = writer._open, writer._replace  # every file the writer writes or renames

    def count():
      self.calls += 1
      return self.calls - 1 == self.at

    class HalfWritten:
      def __init__(self, f):
        self.f = f

      def write(self, data):
        self.f.write(data[:len(data) // 2])
        self.f.flush()
        raise Killed()

      def __getattr__(self, name):
        return getattr(self.f, name)

      def __enter__(self):
        return self

      def __exit__(self, *args):
        self.f.close()

    def open_(path, mode):
      if not count():
        return real_open(path, mode)
      if "w" in mode:
        return HalfWritten(real_open(path, mode))
      raise Killed()  # before a read

    def replace(source, target):
      if count():
        raise Killed()
      return real_replace(source, target)

    monkeypatch.setattr(writer, "_open", open_)
    monkeypatch.setattr(writer, "_replace", replace)


OUTPUTS = dict(write_jsonl=True, write_parquet=True)


def test_a_kill_at_any_point_of_a_shard_write_loses_and_repeats_nothing(tmp_path, monkeypatch):
  at, killed_at_some_point = 0, True
  while killed_at_some_point:
    folder = tmp_path / f"kill{at}"
    w = new_writer(folder, rows_per_shard=2, **OUTPUTS)
    w.claim()
    add(w, [0, 1])  # one whole shard before the kill
    with monkeypatch.context() as patch:
      killer = Killer(patch, at)
      try:
        add(w, [2, 3])
        killed_at_some_point = False
      except Killed:
        pass
    rerun = new_writer(folder, rows_per_shard=2, **OUTPUTS)
    done = rerun.finished()
    assert {"ex000", "ex001"} <= set(done) <= {f"ex{i:03d}" for i in range(4)}
    add(rerun, [i for i in range(5) if f"ex{i:03d}" not in done])
    assert rerun.finish({}, "") == 5
    want = [f"ex{i:03d}" for i in range(5)]
    assert sorted(read_ids(folder)) == sorted(jsonl_ids(folder)) == sorted(parquet_ids(folder)) == want
    assert_clean(folder)
    at += 1
  assert killer.calls >= 5  # TFRecord, JSONL, Parquet, index, its rename


def test_a_kill_at_any_point_of_finish_is_completed_by_the_next_finish(tmp_path, monkeypatch):
  at, killed_at_some_point = 0, True
  while killed_at_some_point:
    folder = tmp_path / f"kill{at}"
    w = new_writer(folder, rows_per_shard=2, **OUTPUTS)
    w.claim()
    add(w, range(3))
    w.flush()
    with monkeypatch.context() as patch:
      killer = Killer(patch, at)
      try:
        w.finish({}, "")
        killed_at_some_point = False
      except Killed:
        pass
    rerun = new_writer(folder, rows_per_shard=2, **OUTPUTS)
    assert set(rerun.finished()) == {"ex000", "ex001", "ex002"}  # whatever was renamed already
    add(rerun, [3])  # and the resumed run goes on
    assert rerun.finish({}, "") == 4
    want = [f"ex{i:03d}" for i in range(4)]
    assert sorted(read_ids(folder)) == sorted(jsonl_ids(folder)) == sorted(parquet_ids(folder)) == want
    assert_clean(folder)
    at += 1
  assert killer.calls >= 6


def test_finish_again_after_a_resumed_run(tmp_path):
  folder = tmp_path / "out"
  w = new_writer(folder, rows_per_shard=2, **OUTPUTS)
  w.claim()
  add(w, range(3))
  assert w.finish({}, "") == 3
  first_shards = {n: (folder / n).read_bytes() for n in os.listdir(folder) if n.startswith("codit-train")}
  resumed = new_writer(folder, rows_per_shard=2, **OUTPUTS)
  resumed.check_claimable()
  resumed.claim()
  assert set(resumed.finished()) == {"ex000", "ex001", "ex002"}
  add(resumed, range(3, 6))
  assert resumed.finish({}, "") == 6
  assert read_ids(folder) == jsonl_ids(folder) == parquet_ids(folder) == [f"ex{i:03d}" for i in range(6)]
  for name, data in first_shards.items():  # placed shards keep their index
    assert (folder / name).read_bytes() == data
  assert len(tf.io.gfile.glob(f"{folder}/codit-train.tfrecord-*")) == 4
  assert new_writer(folder).finish({}, "") == 6  # and nothing changes when called once more
  assert read_ids(folder) == [f"ex{i:03d}" for i in range(6)]


def test_zero_rows_is_an_empty_dataset_and_can_grow(tmp_path):
  folder = tmp_path / "out"
  w = new_writer(folder, **OUTPUTS)
  w.claim()
  assert w.finished() == {}
  assert w.finish({}, "") == 0
  assert not read_ids(folder)
  assert not list(writer.read_fields(str(folder), ["id"]))
  assert not jsonl_ids(folder)
  resumed = new_writer(folder, **OUTPUTS)
  add(resumed, [1, 2])
  assert resumed.finish({}, "") == 2
  assert read_ids(folder) == jsonl_ids(folder) == parquet_ids(folder) == ["ex001", "ex002"]


def test_codit_logprobs_and_every_feature_read_back_through_tfds(tmp_path):
  w = new_writer(tmp_path / "out")
  w.claim()
  add(w, range(4))
  w.finish({}, "")
  for got in writer.read_examples(str(tmp_path / "out")):
    want = example(int(got["id"][2:]))
    for key in ("instruction", "response", "finish_reason", "repetitive"):
      assert got[key] == want[key]
    np.testing.assert_array_equal(got["response_tokens"], want["response_tokens"])
    for key in ("post_logprobs", "pre_logprobs", "codit_logprobs"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-6)
      assert got[key].dtype == np.float32


def test_shards_are_byte_for_byte_what_tf_record_writer_writes(tmp_path):
  folder = tmp_path / "out"
  w = new_writer(folder, rows_per_shard=3)
  w.claim()
  add(w, range(7))
  w.finish({}, "")
  shards = sorted(folder.glob("codit-train.tfrecord-*"))
  assert len(shards) == 3
  for shard in shards:
    records = [r.numpy() for r in tf.data.TFRecordDataset(str(shard))]  # TF's reader checks both CRCs
    reference = tmp_path / "reference.tfrecord"
    with tf.io.TFRecordWriter(str(reference)) as f:
      for record in records:
        f.write(record)
    assert shard.read_bytes() == reference.read_bytes()
    assert list(writer._read_tfrecord(str(shard))) == records  # pylint: disable=protected-access
  # And the records are TFDS's: its read-back (tf.data) and ours (without TF) give the same examples.
  tfds_examples = list(writer.read_examples(str(folder)))
  ours = list(writer.read_fields(str(folder), sorted(writer.features().keys())))
  assert [e["id"] for e in tfds_examples] == [e["id"] for e in ours] == [f"ex{i:03d}" for i in range(7)]
  for got, mine in zip(tfds_examples, ours):
    assert got.keys() == mine.keys()
    for key, value in got.items():
      np.testing.assert_array_equal(value, mine[key])
      assert np.asarray(value).dtype == np.asarray(mine[key]).dtype, key


@pytest.mark.parametrize("sizes", [[], [0], [1, 0, 7], [1 << 20, 3]])
def test_tfrecord_framing_equals_tensorflow(tmp_path, sizes):
  rng = np.random.default_rng(len(sizes))
  records = [rng.bytes(n) for n in sizes]
  ours, theirs = tmp_path / "ours.tfrecord", tmp_path / "theirs.tfrecord"
  assert writer._write_tfrecord(str(ours), records) == sum(16 + n for n in sizes)  # pylint: disable=protected-access
  with tf.io.TFRecordWriter(str(theirs)) as f:
    for record in records:
      f.write(record)
  assert ours.read_bytes() == theirs.read_bytes()
  assert list(writer._read_tfrecord(str(theirs))) == records  # pylint: disable=protected-access


def test_a_changed_or_cut_tfrecord_is_refused_when_read(tmp_path):
  path = tmp_path / "a.tfrecord"
  writer._write_tfrecord(str(path), [b"first", b"second"])  # pylint: disable=protected-access
  whole = path.read_bytes()
  for broken in (whole[:-1], whole[:-30], whole[:5], whole[:8] + b"x" + whole[9:], whole.replace(b"second", b"secund")):
    path.write_bytes(broken)
    with pytest.raises(CoditError, match="is not a whole TFRecord file"):
      list(writer._read_tfrecord(str(path)))  # pylint: disable=protected-access


def test_jsonl_is_the_authors_record(tmp_path):
  w = new_writer(tmp_path / "out", write_jsonl=True)
  w.claim()
  add(w, [1, 3])  # 'stop' and 'length'
  w.finish({}, "")
  with open(tmp_path / "out" / writer.JSONL_FILE, encoding="utf-8") as f:
    stop, length = [json.loads(line) for line in f]
  assert list(stop) == ["id", "is_completed", "instruction", "response", "res_metadata", "score"]
  assert list(stop["res_metadata"]) == ["temperature", "top_p", "max_tokens", "contrastive_decoding",
                                        "alpha", "beta", "expert_model_id", "amateur_model_id"]
  assert stop["res_metadata"] == {"temperature": 1.0, "top_p": 0.9, "max_tokens": 8,
                                  "contrastive_decoding": True, "alpha": 0.01, "beta": 1.0,
                                  "expert_model_id": "org/model-it", "amateur_model_id": "org/model-base"}
  assert (stop["id"], stop["is_completed"], stop["instruction"], stop["response"]) == (
      "ex001", True, "Say 1 ünïcode", "answer 1")
  # vLLM keeps the end token's entry in a stopped request's logprobs; a cut row has none.
  assert stop["score"] == pytest.approx(example(1)["codit_logprobs"] + [example(1)["end_codit_logprob"]])
  assert (length["is_completed"], length["score"]) == (False, pytest.approx(example(3)["codit_logprobs"]))
  direct = writer.reference_record(example(2, "direct"), dict(SETTINGS, mode="direct", pre_trained=None))
  # The authors' baseline run: --amateur-model-id "" and alpha = beta = 0.
  assert direct["res_metadata"] == {"temperature": 1.0, "top_p": 0.9, "max_tokens": 8,
                                    "contrastive_decoding": False, "alpha": 0.0, "beta": 0.0,
                                    "expert_model_id": "org/model-it", "amateur_model_id": ""}


def test_a_repetitive_row_is_written_like_a_cut_one_and_unknown_reasons_are_refused(tmp_path):
  w = new_writer(tmp_path / "out", write_jsonl=True, write_parquet=True)
  w.claim()
  looped = dict(example(3), finish_reason="repetitive", repetitive=True)  # stopped by stop_repetitive
  w.add(looped, digest(3))
  with pytest.raises(ValueError, match="finish_reason 'eos'"):
    w.add(dict(example(4), finish_reason="eos"), digest(4))
  w.finish({}, "")
  (got,) = writer.read_examples(str(tmp_path / "out"))
  assert (got["finish_reason"], got["repetitive"]) == ("repetitive", True)
  np.testing.assert_allclose(got["codit_logprobs"], looped["codit_logprobs"], rtol=1e-6)
  with open(tmp_path / "out" / writer.JSONL_FILE, encoding="utf-8") as f:
    (record,) = [json.loads(line) for line in f]
  # The authors' layout has no such reason: unfinished, and no end token's entry in score.
  assert (record["is_completed"], record["score"]) == (False, pytest.approx(looped["codit_logprobs"]))
  assert parquet_ids(tmp_path / "out") == ["ex003"]


def test_parquet_reads_with_hugging_face_datasets(tmp_path):
  datasets = pytest.importorskip("datasets")
  folder = tmp_path / "out"
  w = new_writer(folder, rows_per_shard=2, write_parquet=True)
  w.claim()
  add(w, range(5))
  w.finish({}, "")
  files = sorted(glob.glob(str(folder / "parquet" / "*.parquet")))
  assert [os.path.basename(f) for f in files] == [writer.parquet_name(i) for i in range(3)]
  loaded = datasets.load_dataset("parquet", data_files=files, split="train",
                                 cache_dir=str(tmp_path / "hf_cache"))
  tfds_rows = {e["id"]: e for e in writer.read_examples(str(folder))}
  assert loaded["id"] == list(tfds_rows)
  for row in loaded:
    want = tfds_rows[row["id"]]
    for key in ("instruction", "response", "finish_reason", "repetitive"):
      assert row[key] == want[key]
    for key in ("response_tokens", "post_logprobs", "pre_logprobs", "codit_logprobs"):
      np.testing.assert_array_equal(np.asarray(row[key], want[key].dtype), want[key])


def make_dataset(folder, settings=SETTINGS) -> None:
  w = new_writer(folder, settings, rows_per_shard=2, **OUTPUTS)
  w.claim()
  add(w, range(3))
  w.finish({}, "")
  add(w, [4])  # and a part written after the finish
  w.flush()


def test_other_settings_are_refused_naming_them_and_force_deletes_only_project_files(tmp_path):
  folder = tmp_path / "out"
  make_dataset(folder)
  (folder / "notes.txt").write_text("mine")
  (folder / "parts" / "my-notes.txt").write_text("mine too")
  (folder / "jsonl").mkdir()  # the previous writer's JSONL parts
  (folder / "jsonl" / "00000.jsonl").write_text("{}\n")
  before = all_files(folder)
  assert {"codit.jsonl", "shards.json", "run.json", "dataset_info.json", "features.json",
          "parquet/train-00000.parquet", "codit-train.tfrecord-00000"} <= before
  other = new_writer(folder, dict(SETTINGS, alpha=0.1, top_p=1.0))
  with pytest.raises(CoditError, match=r"other settings \(alpha: 0.01 -> 0.1; top_p: 0.9 -> 1.0\)"):
    other.check_claimable()
  with pytest.raises(CoditError, match="alpha"):
    other.claim()
  assert all_files(folder) == before  # a refusal changes nothing
  other.check_claimable(force=True)
  assert all_files(folder) == before  # checking never changes anything
  other.claim(force=True)
  assert all_files(folder) == {"notes.txt", "parts/my-notes.txt", "run.json", ".codit-lock"}
  assert (folder / "notes.txt").read_text() == "mine"
  assert json.loads((folder / "run.json").read_text())["alpha"] == 0.1
  assert other.finished() == {}


def test_the_same_settings_resume_without_force(tmp_path):
  folder = tmp_path / "out"
  make_dataset(folder)
  (folder / "notes.txt").write_text("mine")
  before = all_files(folder)
  same = new_writer(folder)
  same.claim()
  assert all_files(folder) == before
  assert set(same.finished()) == {"ex000", "ex001", "ex002", "ex004"}


def test_a_folder_of_other_files_is_refused_even_with_force(tmp_path):
  folder = tmp_path / "photos"
  folder.mkdir()
  for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
    (folder / name).write_text("x")
  for force in (False, True):
    with pytest.raises(CoditError, match=r"not empty and holds no codit-generate dataset \(it has a.jpg, "
                                         r"b.jpg, c.jpg, ...\)\. Choose an empty or new folder"):
      new_writer(folder).claim(force=force)
  assert all_files(folder) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg"}


def test_a_folder_of_editor_backups_is_not_empty(tmp_path):
  # etils' listdir hides names ending in "~"; the writer must still see them as the user's files.
  folder = tmp_path / "notes"
  folder.mkdir()
  (folder / "draft.txt~").write_text("mine")
  with pytest.raises(CoditError, match=r"not empty and holds no codit-generate dataset \(it has draft.txt~\)"):
    new_writer(folder).claim(force=True)
  assert all_files(folder) == {"draft.txt~"}
  # Nor is parts/ deleted as empty when such a file is all that --force leaves in it.
  folder = tmp_path / "out"
  make_dataset(folder)
  (folder / "parts" / "draft.txt~").write_text("mine")
  new_writer(folder, dict(SETTINGS, alpha=0.1)).claim(force=True)
  assert all_files(folder) == {"parts/draft.txt~", "run.json", ".codit-lock"}


@pytest.mark.parametrize("layout", ["hugging_face_save_to_disk", "notes_and_metadata", "another_tools_run_json"])
def test_another_tools_metadata_files_do_not_make_a_folder_ours(tmp_path, layout):
  # dataset_info.json, metadata.json and run.json are names other tools write too: alone they must not
  # make a folder look like codit-generate's, or --force would delete (and finish() overwrite) them.
  folder = tmp_path / "theirs"
  folder.mkdir()
  files = {"hugging_face_save_to_disk": {"data-00000-of-00001.arrow": "arrow", "dataset_info.json": "{}",
                                         "state.json": "{}"},
           "notes_and_metadata": {"notes.txt": "mine", "metadata.json": '{"author": "me"}'},
           "another_tools_run_json": {"run.json": '{"lr": 0.1, "steps": 10}', "model.bin": "w"}}[layout]
  for name, text in files.items():
    (folder / name).write_text(text)
  for force in (False, True):
    with pytest.raises(CoditError, match="Choose an empty or new folder"):
      new_writer(folder).claim(force=force)
  assert {name: (folder / name).read_text() for name in all_files(folder)} == files


def test_a_run_json_that_is_not_json_is_not_ours(tmp_path):
  folder = tmp_path / "out"
  make_dataset(folder)
  (folder / "run.json").write_text("{broken")
  for force in (False, True):
    with pytest.raises(CoditError, match="holds a run.json that codit-generate did not write"):
      new_writer(folder).claim(force=force)
  assert (folder / "run.json").read_text() == "{broken"


def test_other_tfrecord_files_beside_the_shards_are_left_alone(tmp_path):
  # finish() names its own shards to TFDS: it does not scan the folder for *-<split>.tfrecord-* files.
  folder = tmp_path / "out"
  w = new_writer(folder)
  w.claim()
  add(w, range(3))
  w.finish({}, "test")
  for name in ("mybackup-train.tfrecord-00000", "codit-test.tfrecord-00000"):
    (folder / name).write_bytes((folder / writer.shard_name(0)).read_bytes())
  w = new_writer(folder)
  w.claim()
  add(w, range(3, 5))
  assert w.finish({}, "test") == 5
  assert sorted(read_ids(folder)) == [f"ex{i:03d}" for i in range(5)]
  assert (folder / "mybackup-train.tfrecord-00000").exists() and (folder / "codit-test.tfrecord-00000").exists()


def test_a_home_relative_output_dir_is_expanded(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  w = writer.DatasetWriter("~/out", SETTINGS)
  assert w.output_dir == str(tmp_path / "out")
  w.claim()
  assert (tmp_path / "out" / "run.json").exists() and not os.path.exists("~")


_HOLD_LOCK = """
import sys, time
from codit_jax.data import writer
writer.DatasetWriter(sys.argv[1], {settings!r}).claim()
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_second_run_on_the_folder_is_refused_until_the_first_ends(tmp_path):
  folder = tmp_path / "out"
  holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK.format(settings=SETTINGS), str(folder)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "claimed\n"
    before = {name: (folder / name).read_bytes() for name in all_files(folder)}
    for settings in (SETTINGS, dict(SETTINGS, alpha=0.5)):  # resuming it, or --force over it
      with pytest.raises(CoditError, match=rf"another codit-generate run \(pid {holder.pid} on .*\) is writing to"):
        new_writer(folder, settings).claim(force=True)
    assert {name: (folder / name).read_bytes() for name in all_files(folder)} == before
  finally:
    holder.kill()  # SIGKILL: the kernel releases its lock
    holder.wait()
  w = new_writer(folder)
  w.claim()
  add(w, [1])
  assert w.finish({}, "test") == 1
  runtime.release_folder_locks()  # codit-generate's end of run: another process may claim it now
  again = subprocess.run([sys.executable, "-c", _HOLD_LOCK.format(settings=SETTINGS).replace("time.sleep(600)", ""),
                          str(folder)], capture_output=True, text=True, check=False)
  assert again.stdout == "claimed\n", again.stderr


def test_project_files_without_run_json_need_force(tmp_path):
  folder = tmp_path / "out"
  make_dataset(folder)
  (folder / "run.json").unlink()
  (folder / "notes.txt").write_text("mine")
  with pytest.raises(CoditError, match="no run.json"):
    new_writer(folder).claim()
  new_writer(folder).claim(force=True)
  assert all_files(folder) == {"notes.txt", "run.json", ".codit-lock"}


def test_an_empty_or_new_folder_is_claimed(tmp_path):
  (tmp_path / "empty").mkdir()
  for folder in (tmp_path / "empty", tmp_path / "new" / "deeper"):
    w = new_writer(folder)
    w.check_claimable()
    w.claim()
    assert json.loads((folder / "run.json").read_text()) == SETTINGS


def test_output_dir_that_is_a_file(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text("{}\n")
  with pytest.raises(CoditError, match="is an existing file, not a folder") as e:
    new_writer(path).check_claimable(force=True)
  assert "\n" not in str(e.value)
  assert path.read_text() == "{}\n"


def test_an_unwritable_location(tmp_path, monkeypatch):
  # Root writes through permission bits; /sys refuses new files even to root (EPERM).
  with pytest.raises(CoditError, match="cannot be written .* read-only file system or no permission") as e:
    new_writer("/sys/codit-out").check_claimable()
  assert "\n" not in str(e.value) and e.value.__suppress_context__
  assert not os.path.exists("/sys/codit-out")

  def read_only(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

  monkeypatch.setattr(writer, "_open", read_only)
  with pytest.raises(CoditError, match=r"cannot be written \(Read-only file system\)"):
    new_writer(tmp_path / "out").claim()
  monkeypatch.undo()
  w = new_writer(tmp_path / "out")
  w.claim()
  add(w, [1])
  monkeypatch.setattr(writer, "_open", read_only)  # the disk turns read-only mid-run: the TFRecord first
  with pytest.raises(CoditError, match=r"error in output_dir .* \(a read-only file system\): Read-only"):
    w.flush()


def test_a_file_system_without_locks_runs_unlocked(tmp_path, monkeypatch, caplog):
  def no_locks(*args):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(runtime.fcntl, "flock", no_locks)
  w = new_writer(tmp_path / "out")
  w.claim()  # a warning, not an error
  add(w, [1])
  assert w.finish({}, "test") == 1
  assert "cannot be locked (No locks available)" in caplog.text
