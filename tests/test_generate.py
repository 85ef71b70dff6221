"""codit-generate end to end: the dataset, resume after kill -9, two processes, bad input, errors."""

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
import transformers

import tiny_checkpoints
from codit_jax import generate as generate_app
from codit_jax.config_files import sibling_config
from codit_jax.data import prompts, writer
from codit_jax.decoding import torch_reference
from codit_jax.errors import CoditError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = str(REPO / "configs" / "default.py")
FEATURES = {"id", "instruction", "response", "finish_reason", "response_tokens", "post_logprobs",
            "pre_logprobs", "repetitive"}


@functools.lru_cache(maxsize=None)
def _pair(family="llama"):
  return tiny_checkpoints.make_pair(Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"gen-pair-{family}-{os.getpid()}",
                                    family)


def _write_prompts(path: Path, n: int, seed: int = 0) -> Path:
  rng = np.random.default_rng(seed)
  words = ["sea", "poem", "robot", "coffee", "list", "three", "explain", "why", "moon", "story", "write"]
  with path.open("w") as f:
    for i in range(n):
      text = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
      f.write(json.dumps({"id": f"p{i}", "instruction": text}) + "\n")
  return path


def _overrides(tmp_path: Path, **kw) -> dict:
  post, pre = _pair(kw.pop("family", "llama"))
  settings = dict(post_trained=post, pre_trained=pre, output_dir=str(tmp_path / "out"), dtype="float32",
                  max_new_tokens=12, batch_size=4, max_prompt_len=256, min_bucket=128, temperature=0.0,
                  compilation_cache_dir="", log_every_seconds=0.0)
  settings.update(kw)
  return settings


def _config(**settings):
  config = sibling_config(DEFAULT_CONFIG, "default.py")
  config.update(settings)
  return config


def _records(output_dir) -> dict:
  """The dataset read back with TFDS, by id, as plain Python values."""
  return {r["id"]: {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}
          for r in writer.read_examples(str(output_dir))}


def _cli(args, env_extra=None, devices=1, **popen_kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
  return subprocess.Popen([sys.executable, "-m", "codit_jax.generate", f"--config={DEFAULT_CONFIG}", *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **popen_kw)


def _flags(settings: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in settings.items()]


def test_greedy_dataset_equals_torch_reference_and_reads_back(tmp_path):
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 7)
  settings = _overrides(tmp_path, prompts=str(prompts_file), write_jsonl=True)
  summary = generate_app.generate(_config(**settings))
  assert summary["rows"] == 7 and summary["skipped_inputs"] == {}

  builder = tfds.builder_from_directory(settings["output_dir"])
  assert set(builder.info.features.keys()) == FEATURES
  assert builder.info.metadata["post_trained"] == settings["post_trained"]
  assert builder.info.metadata["alpha"] == 0.01 and builder.info.metadata["mode"] == "codit"
  assert "codit_jax_version" in builder.info.metadata
  records = _records(settings["output_dir"])
  assert sorted(records) == [f"p{i}" for i in range(7)]

  post, pre = _pair()
  tokenizer = transformers.AutoTokenizer.from_pretrained(post)
  end_ids = prompts.end_token_ids(tokenizer, post)
  torch_post, torch_pre = (tiny_checkpoints.load_torch_model(p, "llama") for p in (post, pre))
  for line in prompts_file.read_text().splitlines():
    record = json.loads(line)
    ids = prompts.build_prompt_ids(tokenizer, record["instruction"])
    tokens, lp_post, lp_pre, reason = torch_reference.generate(
        torch_post, torch_pre, [ids], end_ids=end_ids, vocab_size=len(tokenizer), max_new_tokens=12)[0]
    got = records[record["id"]]
    assert got["instruction"] == record["instruction"]
    assert got["response_tokens"] == tokens and got["finish_reason"] == reason
    assert got["response"] == tokenizer.decode(tokens, skip_special_tokens=True)
    np.testing.assert_allclose(got["post_logprobs"], lp_post, atol=1e-4)
    np.testing.assert_allclose(got["pre_logprobs"], lp_pre, atol=1e-4)

  # tf.data reads the shards directly; the JSONL export holds the reference layout.
  files = tf.io.gfile.glob(f"{settings['output_dir']}/codit-train.tfrecord-*")
  assert sum(1 for _ in tf.data.TFRecordDataset(files)) == 7
  lines = [json.loads(l) for l in (Path(settings["output_dir"]) / "codit.jsonl").read_text().splitlines()]
  assert {l["id"] for l in lines} == set(records)
  assert {"instruction", "output", "is_completed", "logprobs", "generation_config"} <= set(lines[0])


def test_pair_parallel_writes_the_same_dataset(tmp_path):
  """pair_parallel (each model on half of the 8 devices) changes speed, not the data: same rows as one model after the other."""
  post, pre = (tiny_checkpoints.make_checkpoint(tmp_path / name, "llama", seed=seed, pre_trained=name == "pre")
               for name, seed in (("post", 0), ("pre", 1)))  # embeddings padded alike, as pair_parallel needs
  prompts_file = str(_write_prompts(tmp_path / "seed.jsonl", 6))
  datasets = []
  for pair_parallel in (False, True):
    settings = _overrides(tmp_path, prompts=prompts_file, post_trained=post, pre_trained=pre, temperature=1.0,
                          top_p=0.9, pair_parallel=pair_parallel, output_dir=str(tmp_path / f"out-{pair_parallel}"))
    generate_app.generate(_config(**settings))
    datasets.append(_records(settings["output_dir"]))
  assert datasets[0].keys() == datasets[1].keys() and len(datasets[0]) == 6
  for key, row in datasets[0].items():
    assert datasets[1][key]["response_tokens"] == row["response_tokens"]
    np.testing.assert_allclose(datasets[1][key]["pre_logprobs"], row["pre_logprobs"], atol=1e-5)


def test_direct_mode_records_no_pre_logprobs(tmp_path):
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 3)), mode="direct",
                        pre_trained="")
  generate_app.generate(_config(**settings))
  assert all(r["pre_logprobs"] == [] and r["response_tokens"] for r in _records(settings["output_dir"]).values())


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 40, seed=1)
  common = _overrides(tmp_path, prompts=str(prompts_file), batch_size=2, max_new_tokens=16, temperature=1.0,
                      top_p=0.9, seed=5)
  whole = dict(common, output_dir=str(tmp_path / "whole"))
  killed = dict(common, output_dir=str(tmp_path / "killed"))
  reference = _cli(_flags(whole))
  _, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, err

  # Kill twice at moments picked by the shard count, then let the third run finish.
  for kill_after in (3, 9):
    run = _cli(_flags(killed))
    out_dir = Path(killed["output_dir"])
    while run.poll() is None and len(list(out_dir.glob("codit-train.tfrecord-?????"))) < kill_after:
      time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    written = len(list(out_dir.glob("codit-train.tfrecord-?????")))
    assert kill_after <= written < 20, "the run should have been killed part-way"
    assert not (out_dir / "dataset_info.json").exists()
  resumed = _cli(_flags(killed))
  _, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err
  assert "already written" in err
  assert _records(killed["output_dir"]) == _records(whole["output_dir"])
  assert len(_records(whole["output_dir"])) == 40
  assert not list(Path(killed["output_dir"]).glob("*.tmp-*"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.parametrize("pair_parallel", [False, True])
def test_two_processes_equal_one(tmp_path, pair_parallel):
  """Two gloo processes of 2 devices each write the dataset of one process; with pair_parallel
  process 0 holds the post-trained model and process 1 the pre-trained one."""
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 11, seed=2)
  common = _overrides(tmp_path, prompts=str(prompts_file), batch_size=4)
  if pair_parallel:
    post, pre = (tiny_checkpoints.make_checkpoint(tmp_path / name, "llama", seed=seed, pre_trained=name == "pre")
                 for name, seed in (("post", 0), ("pre", 1)))
    common.update(post_trained=post, pre_trained=pre)
  single = dict(common, output_dir=str(tmp_path / "single"))
  multi = dict(common, output_dir=str(tmp_path / "multi"), pair_parallel=pair_parallel)
  one = _cli(_flags(single))
  _, err = one.communicate(timeout=600)
  assert one.returncode == 0, err
  port = _free_port()
  runs = [_cli(_flags(multi) + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}"], devices=2) for i in range(2)]
  for run in runs:
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
  shards = sorted(p.name for p in Path(multi["output_dir"]).glob("codit-train.tfrecord-*"))
  assert len(shards) == 2 * 3  # 3 batches of 4 (11 prompts), one shard per process each
  assert len(list(writer.read_examples(multi["output_dir"]))) == 11  # no row twice
  a, b = _records(single["output_dir"]), _records(multi["output_dir"])
  assert sorted(a) == sorted(b) == sorted(f"p{i}" for i in range(11))
  for key in a:
    assert a[key]["response_tokens"] == b[key]["response_tokens"]
    np.testing.assert_allclose(a[key]["post_logprobs"], b[key]["post_logprobs"], atol=1e-5)
    np.testing.assert_allclose(a[key]["pre_logprobs"], b[key]["pre_logprobs"], atol=1e-5)


BAD_LINES = [
    ('{"id": "a", "instruction": "write a poem"}', None),
    ('{"id": "b", "instruction": "list three', "malformed_json"),
    ('["not", "an", "object"]', "not_an_object"),
    ('{"id": "c"}', "missing_instruction"),
    ('{"id": "d", "instruction": "   "}', "empty_instruction"),
    ('{"id": "a", "instruction": "again"}', "duplicate_id"),
    ('{"instruction": "no id here"}', None),  # id becomes the line number: "7"
    ('{"id": "long", "instruction": "' + "robot " * 200 + '"}', "prompt_too_long"),
    ('{"id": "e", "instruction": "explain the moon"}', None),
]


def test_bad_input_reported_by_line_and_good_records_kept(tmp_path):
  prompts_file = tmp_path / "seed.jsonl"
  prompts_file.write_text("\n".join(line for line, _ in BAD_LINES) + "\n")
  settings = _overrides(tmp_path, prompts=str(prompts_file))
  run = _cli(_flags(settings))
  out, err = run.communicate(timeout=600)
  assert run.returncode == 0, err
  for number, (_, kind) in enumerate(BAD_LINES, start=1):
    if kind and kind != "prompt_too_long":
      assert f"seed.jsonl line {number}: " in err and kind in err, (number, kind)
  assert "id 'long'" in err and "over max_prompt_len=256" in err
  assert sorted(_records(settings["output_dir"])) == ["7", "a", "e"]
  assert "4 instructions read, 6 records skipped" in out  # "long" was read, then skipped
  for kind in ("malformed_json: 1", "not_an_object: 1", "missing_instruction: 1", "empty_instruction: 1",
               "duplicate_id: 1", "prompt_too_long: 1"):
    assert kind in out

  strict = _cli(_flags(dict(settings, output_dir=str(tmp_path / "strict"), strict_input=True)))
  _, err = strict.communicate(timeout=600)
  assert strict.returncode == 1
  assert "seed.jsonl line 2: not valid JSON" in err and "Traceback" not in err


def test_truncate_policy_keeps_long_prompts(tmp_path):
  prompts_file = tmp_path / "seed.jsonl"
  prompts_file.write_text(BAD_LINES[0][0] + "\n" + BAD_LINES[7][0] + "\n")
  settings = _overrides(tmp_path, prompts=str(prompts_file), long_prompts="truncate")
  generate_app.generate(_config(**settings))
  records = _records(settings["output_dir"])
  assert sorted(records) == ["a", "long"] and prompts.TRUNCATION_MARK in records["long"]["instruction"]


@pytest.mark.parametrize("change,message", [
    (dict(post_trained="/nonexistent/model"), "checkpoint folder '/nonexistent/model' does not exist"),
    (dict(pre_trained="no-such-org/no-such-model"), "could not download 'no-such-org/no-such-model'"),
    (dict(pre_trained="qwen3"), "disagree"),
    (dict(prompts="/nonexistent/seed.jsonl"), "input file '/nonexistent/seed.jsonl' does not exist"),
    (dict(output_dir=""), "leaves output_dir empty"),
    (dict(pair_parallel=True), "1 devices cannot be split into two halves"),
    (dict(pair_parallel=True, mode="direct"), "set pair_parallel=False"),
])
def test_user_errors_exit_nonzero_without_traceback(tmp_path, change, message):
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 2)))
  if change.get("pre_trained") == "qwen3":
    change = dict(pre_trained=_pair("qwen3")[1])
  run = _cli(_flags(dict(settings, **change)))
  _, err = run.communicate(timeout=600)
  assert run.returncode != 0
  assert message in err and "Traceback" not in err
  assert err.count("codit-generate: error:") == 1


def test_other_settings_against_existing_output_refused_unless_forced(tmp_path):
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 2)))
  generate_app.generate(_config(**settings))
  with pytest.raises(CoditError, match=r"other settings \(alpha: 0.01 -> 0.05\).*--force"):
    generate_app.generate(_config(**dict(settings, alpha=0.05)))
  summary = generate_app.generate(_config(**dict(settings, alpha=0.05)), force=True)
  assert summary["rows"] == 2
  assert tfds.builder_from_directory(settings["output_dir"]).info.metadata["alpha"] == 0.05
  # The same settings again: nothing to do, the dataset stays.
  assert generate_app.generate(_config(**dict(settings, alpha=0.05)))["rows"] == 2


def test_plan_is_deterministic_and_sorted_by_length():
  items = [generate_app.Prompt(str(i), "", tuple(range(n))) for i, n in enumerate([5, 3, 9, 3, 1])]
  plan = generate_app.plan_batches(items, 2)
  assert [[p.id for p in b] for b in plan] == [["4", "1"], ["3", "0"], ["2"]]


def test_console_script_installed():
  script = Path(sys.executable).parent / "codit-generate"
  if not script.exists():
    pytest.skip("the package is not installed (pip install -e .), so there is no console script")
  run = subprocess.run([str(script), "--helpfull"], capture_output=True, text=True, timeout=300)
  assert "USAGE" in run.stdout and "--config" in run.stdout and "--coordinator_address" in run.stdout  # absl help exits 1
