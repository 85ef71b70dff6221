"""codit-generate end to end: the dataset, resume after kill -9, two processes, bad input, errors."""

import functools
import json
import logging
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
from codit_jax.data import prompts, repetition, writer
from codit_jax.decoding import engine as engine_lib
from codit_jax.decoding import torch_reference
from codit_jax.errors import CoditError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = str(REPO / "configs" / "default.py")
FEATURES = {"id", "instruction", "response", "finish_reason", "response_tokens", "post_logprobs",
            "pre_logprobs", "codit_logprobs", "repetitive"}
AUTHORS_KEYS = ["id", "is_completed", "instruction", "response", "res_metadata", "score"]


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
  """codit-generate in a subprocess on `devices` host devices (None: as many as it picks itself)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env_extra or {}))
  if devices is None:
    env.pop("XLA_FLAGS")
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
  scores = {}
  for line in prompts_file.read_text().splitlines():
    record = json.loads(line)
    ids = prompts.build_prompt_ids(tokenizer, record["instruction"])
    tokens, lp_post, lp_pre, reason, scores[record["id"]] = torch_reference.generate(
        torch_post, torch_pre, [ids], end_ids=end_ids, vocab_size=len(tokenizer), max_new_tokens=12,
        with_scores=True)[0]
    got = records[record["id"]]
    assert got["instruction"] == record["instruction"]
    assert got["response_tokens"] == tokens and got["finish_reason"] == reason
    assert got["response"] == tokenizer.decode(tokens, skip_special_tokens=True)
    np.testing.assert_allclose(got["post_logprobs"], lp_post, atol=1e-4)
    np.testing.assert_allclose(got["pre_logprobs"], lp_pre, atol=1e-4)
    np.testing.assert_allclose(got["codit_logprobs"], scores[record["id"]][:len(tokens)], atol=1e-4)

  # tf.data reads the shards directly; the JSONL export holds the reference layout.
  files = tf.io.gfile.glob(f"{settings['output_dir']}/codit-train.tfrecord-*")
  assert sum(1 for _ in tf.data.TFRecordDataset(files)) == 7
  lines = [json.loads(l) for l in (Path(settings["output_dir"]) / "codit.jsonl").read_text().splitlines()]
  assert {l["id"] for l in lines} == set(records)
  for line in lines:  # the authors' layout; score: the contrastive log-probs, the end token's included
    assert list(line) == AUTHORS_KEYS
    got = records[line["id"]]
    assert line["is_completed"] == (got["finish_reason"] == "stop") and line["response"] == got["response"]
    assert len(line["score"]) == len(got["response_tokens"]) + line["is_completed"]
    np.testing.assert_allclose(line["score"][:len(got["codit_logprobs"])], got["codit_logprobs"], atol=1e-6)
    np.testing.assert_allclose(line["score"], scores[line["id"]], atol=1e-4)  # PyTorch's, end token included
    assert line["res_metadata"]["expert_model_id"] == post and line["res_metadata"]["contrastive_decoding"]


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


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pair_parallel is left off on one core")
def test_cli_on_a_cpu_host_runs_an_equal_pair_one_model_per_core(tmp_path):
  """pair_parallel left unset (None): codit-generate, on a CPU host of 2 cores where nobody set the
  device count, makes two host devices and runs the pair on them; the same dataset as
  pair_parallel=False, which keeps one device. A pair of other shapes stays on one device."""
  equal = _pair("llama")  # embeddings padded differently: still stackable
  unequal = tuple(tiny_checkpoints.make_checkpoint(tmp_path / name, "llama", seed=seed, pre_trained=name == "pre",
                                                   config_overrides={"intermediate_size": size})
                  for name, seed, size in (("post", 0, 64), ("pre", 1, 96)))
  prompts_file = str(_write_prompts(tmp_path / "seed.jsonl", 5))
  runs = {}
  for name, pair, extra in (("auto", equal, {}), ("off", equal, {"pair_parallel": False}),
                            ("unequal", unequal, {})):
    settings = _overrides(tmp_path, prompts=prompts_file, post_trained=pair[0], pre_trained=pair[1],
                          output_dir=str(tmp_path / name), **extra)
    run = _cli(_flags(settings), devices=None)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
    runs[name] = err, _records(settings["output_dir"])
  assert "pair_parallel on: CPU host, one model per core (two host devices)" in runs["auto"][0]
  assert "per half (pair_parallel)" in runs["auto"][0]  # the memory plan
  assert "pair_parallel on" not in runs["off"][0] and "per half" not in runs["off"][0]
  assert "pair_parallel off: they differ in intermediate_size" in runs["unequal"][0]
  assert "per half" not in runs["unequal"][0] and "data_parallel 1;" in runs["unequal"][0]
  auto, off = runs["auto"][1], runs["off"][1]
  assert auto.keys() == off.keys() and len(auto) == 5
  for key, row in off.items():
    assert auto[key]["response_tokens"] == row["response_tokens"]
    np.testing.assert_allclose(auto[key]["pre_logprobs"], row["pre_logprobs"], atol=1e-5)


def test_direct_mode_records_no_pre_logprobs(tmp_path):
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 3)), mode="direct",
                        pre_trained="")
  generate_app.generate(_config(**settings))
  records = _records(settings["output_dir"])
  assert all(r["pre_logprobs"] == [] and r["response_tokens"] for r in records.values())
  # What direct mode does not read does not guard its dataset: it resumes (complete), not refused.
  more = dict(settings, prompts=str(_write_prompts(tmp_path / "more.jsonl", 4)), alpha=0.5, beta=2.0,
              pre_trained="org/some-base")
  summary = generate_app.generate(_config(**more))
  assert summary["rows"] == 4 and summary["new_rows"] == 1
  assert {k: v for k, v in _records(settings["output_dir"]).items() if k in records} == records
  with pytest.raises(CoditError, match="mode: 'direct' -> 'codit'"):
    generate_app.generate(_config(**dict(more, mode="codit", pre_trained=settings["post_trained"])))


def test_profile_dir_records_a_trace_whose_ops_are_named_by_block(tmp_path):
  """--config.profile_dir: a jax.profiler trace of decode chunks, its ops named by model, layer and block,
  and the dataset written as without it."""
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 6)), pair_parallel=False,
                        chunk_steps=2, profile_dir=str(tmp_path / "profile"), profile_chunks=3)
  assert generate_app.generate(_config(**settings))["rows"] == 6
  runs = list((tmp_path / "profile" / "plugins" / "profile").iterdir())
  assert len(runs) == 1, runs
  assert (runs[0] / "perfetto_trace.json.gz").is_file()
  (xplane,) = runs[0].glob("*.xplane.pb")
  trace = xplane.read_bytes()
  for name in (b"step_post_trained/layer_0/attention", b"step_pre_trained/layer_1/mlp", b"score", b"sample"):
    assert name in trace, name
  # The first chunk (compiling) is left out; the admits of the traced chunks are in.
  assert b"prefill_post_trained/layer_0/attention" in trace


def _finished_parts(out_dir: Path) -> int:
  return len(list((out_dir / "parts").glob("*.index.json")))


def test_kill_9_then_rerun_equals_uninterrupted(tmp_path):
  """Rows are written as they finish (a part every 2 rows); SIGKILL twice part-way, then the same command:
  the same records by id as an uninterrupted run, every id once."""
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 40, seed=1)
  common = _overrides(tmp_path, prompts=str(prompts_file), batch_size=4, max_new_tokens=16, temperature=1.0,
                      top_p=0.9, seed=5, rows_per_shard=2, write_jsonl=True)
  whole = dict(common, output_dir=str(tmp_path / "whole"))
  killed = dict(common, output_dir=str(tmp_path / "killed"))
  reference = _cli(_flags(whole))
  _, err = reference.communicate(timeout=600)
  assert reference.returncode == 0, err

  out_dir = Path(killed["output_dir"])
  for kill_after in (3, 9):
    run = _cli(_flags(killed))
    while run.poll() is None and _finished_parts(out_dir) < kill_after:
      time.sleep(0.005)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    assert kill_after <= _finished_parts(out_dir) < 20, "the run should have been killed part-way"
    assert not (out_dir / "dataset_info.json").exists()
  resumed = _cli(_flags(killed))
  _, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err
  assert "already written" in err
  ids = [r["id"] for r in writer.read_examples(killed["output_dir"])]
  assert len(ids) == len(set(ids)) == 40
  assert _records(killed["output_dir"]) == _records(whole["output_dir"])
  jsonl = [json.loads(l)["id"] for l in (out_dir / "codit.jsonl").read_text().splitlines()]
  assert sorted(jsonl) == sorted(ids)
  assert not list(out_dir.rglob("*.tmp-*"))


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
  # A profile on the side: each process writes its own (it changes no record).
  multi = dict(common, output_dir=str(tmp_path / "multi"), pair_parallel=pair_parallel,
               profile_dir=str(tmp_path / "profile"), profile_chunks=1)
  one = _cli(_flags(single))
  _, err = one.communicate(timeout=600)
  assert one.returncode == 0, err
  port = _free_port()
  runs = [_cli(_flags(multi) + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}"], devices=2) for i in range(2)]
  for run in runs:
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err
  writers = {p.name[:6] for p in (Path(multi["output_dir"]) / "parts").glob("*.index.json")}
  # Each process writes the rows of its devices; with pair_parallel both hold every row and the
  # post-trained half (process 0) writes them.
  assert writers == ({"p00000"} if pair_parallel else {"p00000", "p00001"})
  assert len(list(writer.read_examples(multi["output_dir"]))) == 11  # no row twice
  for i in range(2):
    assert len(list((tmp_path / "profile" / f"process_{i}").glob("plugins/profile/*/*.xplane.pb"))) == 1
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
    (dict(pair_parallel=True), "pair_parallel needs an even device count; there are 1"),
    (dict(pair_parallel=True, mode="direct"), "set pair_parallel=False"),
    (dict(pre_trained="NO_TOKENIZER"), "pre_trained: the checkpoint folder"),
])
def test_user_errors_exit_nonzero_without_traceback(tmp_path, change, message):
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 2)))
  if change.get("pre_trained") == "qwen3":
    change = dict(pre_trained=_pair("qwen3")[1])
  if change.get("pre_trained") == "NO_TOKENIZER":  # config.json and weights, no tokenizer files
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for f in Path(settings["pre_trained"]).iterdir():
      if f.name.endswith((".safetensors", ".index.json")) or f.name in ("config.json", "generation_config.json"):
        (folder / f.name).write_bytes(f.read_bytes())
    change = dict(pre_trained=str(folder))
  run = _cli(_flags(dict(settings, **change)))
  _, err = run.communicate(timeout=600)
  assert run.returncode != 0
  assert message in err and "Traceback" not in err
  assert err.count("codit-generate: error:") == 1
  assert not Path(settings["output_dir"]).exists()  # refused before output_dir is touched


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
  # A run.json of an earlier version, which recorded pair_parallel (it decides no record): resumed.
  run_file = Path(settings["output_dir"]) / "run.json"
  run_file.write_text(json.dumps(dict(json.loads(run_file.read_text()), pair_parallel=False)))
  assert generate_app.generate(_config(**dict(settings, alpha=0.05, pair_parallel=False)))["rows"] == 2


def test_long_prompts_are_answered_in_a_second_pass(tmp_path, monkeypatch):
  """Prompts over the main pass's length (here 128 tokens) run after it in slots sized for them: the
  same rows as a run where the main pass takes every prompt."""
  prompts_file = tmp_path / "seed.jsonl"
  with prompts_file.open("w") as f:
    for i, words in enumerate([1, 8, 2, 15, 1]):
      f.write(json.dumps({"id": f"p{i}", "instruction": " ".join(["robot sea"] * words)}) + "\n")
  one_pass = _overrides(tmp_path, prompts=str(prompts_file), output_dir=str(tmp_path / "one"))
  generate_app.generate(_config(**one_pass))
  monkeypatch.setattr(generate_app, "MAIN_PROMPT_LEN", 128)
  two_passes = dict(one_pass, output_dir=str(tmp_path / "two"))
  summary = generate_app.generate(_config(**two_passes))
  assert summary["rows"] == 5 and summary["skipped_inputs"] == {}
  tokenizer = transformers.AutoTokenizer.from_pretrained(one_pass["post_trained"])
  lengths = {r["id"]: len(prompts.build_prompt_ids(tokenizer, r["instruction"]))
             for r in map(json.loads, prompts_file.read_text().splitlines())}
  assert sum(n > 128 for n in lengths.values()) == 2 and max(lengths.values()) <= 256, lengths
  a, b = _records(one_pass["output_dir"]), _records(two_passes["output_dir"])
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key]["response_tokens"] == b[key]["response_tokens"]
    np.testing.assert_allclose(a[key]["post_logprobs"], b[key]["post_logprobs"], atol=1e-5)


def _looping_pair(root: Path) -> tuple[str, str]:
  """The demo pair with the post-trained model rewired into a loop: its layers add nothing, and its
  lm_head maps the current token to the next of the cycle 'x' 'y' 'z' (any other token to 'x'), so
  sharply that the plausibility set holds that token alone and CoDIT must follow it."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  from codit_jax import demo  # pylint: disable=g-import-not-at-top
  post, pre = demo.build_pair(root)
  tokenizer = transformers.AutoTokenizer.from_pretrained(post)
  cycle = [tokenizer.convert_tokens_to_ids(c) for c in "xyz"]
  weights = safetensors.numpy.load_file(f"{post}/model.safetensors")
  for name in weights:
    if name.endswith(("o_proj.weight", "down_proj.weight")):
      weights[name][:] = 0
  embed = weights["model.embed_tokens.weight"]
  unit = embed / np.linalg.norm(embed, axis=1, keepdims=True)
  head = np.zeros_like(weights["lm_head.weight"])
  head[cycle[0]] = unit.sum(axis=0) - unit[cycle[0]] - unit[cycle[1]]  # every other token: into the loop
  for i, token in enumerate(cycle):
    head[cycle[(i + 1) % 3]] = unit[token] * 8.0
  weights["lm_head.weight"] = head * 20.0
  safetensors.numpy.save_file(weights, f"{post}/model.safetensors")
  return post, pre


def test_stop_repetitive_stops_a_looping_row_and_changes_nothing_else(tmp_path):
  """Issue 17.4: with stop_repetitive a row caught in a loop stops with 'repetitive' well before
  max_new_tokens, and the reference text rule flags it; without it the row runs to the limit, with the
  stopped row's tokens as its beginning."""
  post, pre = _looping_pair(tmp_path / "pair")
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 3)
  datasets = {}
  for stop in (False, True):
    settings = _overrides(tmp_path, prompts=str(prompts_file), post_trained=post, pre_trained=pre, max_new_tokens=300,
                          stop_repetitive=stop, output_dir=str(tmp_path / f"out-{stop}"), write_jsonl=True)
    datasets[stop] = _records(settings["output_dir"]) if generate_app.generate(_config(**settings)) else None
  for key, stopped in datasets[True].items():
    full = datasets[False][key]
    assert full["finish_reason"] == "length" and len(full["response_tokens"]) == 300
    assert set(full["response"][-30:]) == set("xyz") and full["repetitive"]
    assert stopped["finish_reason"] == "repetitive" and len(stopped["response_tokens"]) < 150
    assert full["response_tokens"][:len(stopped["response_tokens"])] == stopped["response_tokens"]
    assert repetition.is_repetitive(stopped["response"]) and stopped["repetitive"]
  lines = [json.loads(l) for l in (tmp_path / "out-True" / "codit.jsonl").read_text().splitlines()]
  assert not any(line["is_completed"] for line in lines)


def _edit_prompts(path: Path, edit) -> None:
  lines = [json.loads(l) for l in path.read_text().splitlines()]
  path.write_text("".join(json.dumps(edit(r)) + "\n" for r in lines))


def test_rerun_with_changed_prompts_refused_appended_prompts_answered(tmp_path, capsys):
  """Issue 15.1: a rerun whose prompts changed under the same ids is refused, naming the first id; prompts
  appended to the file are answered alone; --force starts over."""
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 3)
  settings = _overrides(tmp_path, prompts=str(prompts_file))
  first = _records(settings["output_dir"]) if generate_app.generate(_config(**settings)) else None
  capsys.readouterr()
  again = generate_app.generate(_config(**settings))
  assert again["new_rows"] == 0 and again["rows"] == 3
  assert f"codit-generate: already complete: 3 rows in {settings['output_dir']}" in capsys.readouterr().out
  with prompts_file.open("a") as f:
    f.write(json.dumps({"id": "new", "instruction": "write a story about the moon"}) + "\n")
  appended = generate_app.generate(_config(**settings))
  assert appended["new_rows"] == 1 and appended["rows"] == 4
  assert f"wrote 1 row to {settings['output_dir']}, 4 in all" in capsys.readouterr().out
  records = _records(settings["output_dir"])
  assert {k: records[k] for k in first} == first  # the old rows untouched

  _edit_prompts(prompts_file, lambda r: dict(r, instruction=r["instruction"] + " again"))
  with pytest.raises(CoditError, match=r"the prompt of id 'p0' has changed.*\(4 id\(s\) differ\).*--force"):
    generate_app.generate(_config(**settings))
  assert _records(settings["output_dir"]) == records  # a refusal changes nothing
  _edit_prompts(prompts_file, lambda r: dict(r, instruction=r["instruction"].removesuffix(" again")))
  lines = prompts_file.read_text().splitlines()
  prompts_file.write_text("\n".join(lines[1:]) + "\n")  # p0 removed: its row is stale
  with pytest.raises(CoditError, match=r"1 id\(s\) that the prompts no longer have \(first: 'p0'\)"):
    generate_app.generate(_config(**settings))
  forced = generate_app.generate(_config(**settings), force=True)
  assert forced["rows"] == 3 and forced["new_rows"] == 3
  assert sorted(_records(settings["output_dir"])) == ["new", "p1", "p2"]


def test_output_dir_claims_only_empty_or_own_folders_and_force_keeps_user_files(tmp_path):
  """Issue 15.2: a non-empty folder without a dataset is refused (with --force too); in a dataset folder
  --force deletes only what codit-generate wrote."""
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 2)), write_jsonl=True)
  out = Path(settings["output_dir"])
  out.mkdir()
  (out / "important.txt").write_text("mine")
  (out / "notes").mkdir()
  (out / "notes" / "a.md").write_text("mine too")
  for force in (False, True):
    with pytest.raises(CoditError, match=r"is not empty and holds no codit-generate dataset.*important.txt"):
      generate_app.generate(_config(**settings), force=force)
  assert sorted(p.name for p in out.iterdir()) == ["important.txt", "notes"]  # nothing written
  (out / "important.txt").unlink()
  (out / "notes" / "a.md").unlink()
  (out / "notes").rmdir()
  generate_app.generate(_config(**settings))
  (out / "important.txt").write_text("mine")  # a user's file in the dataset folder
  generate_app.generate(_config(**dict(settings, alpha=0.05)), force=True)
  assert (out / "important.txt").read_text() == "mine"
  assert tfds.builder_from_directory(str(out)).info.metadata["alpha"] == 0.05


@pytest.mark.parametrize("content", ["", '{"id": "a"}\n{"id": "b", "instruction": ""}\n'])
def test_no_usable_prompt_is_one_message_and_writes_nothing(tmp_path, content):
  """Issue 15.3: an empty or all-invalid prompts file: one message counting what was skipped, exit 1, no
  output_dir; the fixed file then runs."""
  prompts_file = tmp_path / "seed.jsonl"
  prompts_file.write_text(content)
  settings = _overrides(tmp_path, prompts=str(prompts_file))
  run = _cli(_flags(settings))
  _, err = run.communicate(timeout=600)
  assert run.returncode == 1 and "Traceback" not in err, err
  assert "holds no usable prompt, so nothing was written" in err
  if content:
    assert "2 records skipped" in err and "missing_instruction: 1" in err and "empty_instruction: 1" in err
  assert not Path(settings["output_dir"]).exists()
  _write_prompts(prompts_file, 2)
  assert generate_app.generate(_config(**settings))["rows"] == 2


@pytest.mark.parametrize("change,message", [
    (dict(mode="contrast"), "mode 'contrast' is not one of codit, direct"),
    (dict(alpha=0.0), "alpha must be in (0, 1]"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=100000), "max_new_tokens 100000 leaves no room for a prompt in the context of"),
    (dict(dtype="float16"), "dtype 'float16' is not supported"),
    (dict(pre_trained="WEIGHTLESS"), "holds no *.safetensors weights"),
    (dict(profile_dir="gs://bucket/profile"), "profile_dir 'gs://bucket/profile' must be a local folder"),
])
def test_bad_values_refused_before_output_dir_is_touched(tmp_path, change, message):
  """Issue 15.4: checked before anything is written or loaded; the corrected command then runs without --force."""
  settings = _overrides(tmp_path, prompts=str(_write_prompts(tmp_path / "seed.jsonl", 2)))
  if change.get("pre_trained") == "WEIGHTLESS":
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    for f in Path(settings["pre_trained"]).iterdir():
      if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
        (weightless / f.name).write_bytes(f.read_bytes())
    change = dict(pre_trained=str(weightless))
  with pytest.raises(CoditError) as error:
    generate_app.generate(_config(**dict(settings, **change)))
  assert message in str(error.value)
  assert not Path(settings["output_dir"]).exists()
  assert generate_app.generate(_config(**settings))["rows"] == 2


def test_unusable_output_dir_is_one_line(tmp_path):
  """Issue 15.5: output_dir an existing file, or where nothing can be written (/sys refuses even root)."""
  prompts_file = str(_write_prompts(tmp_path / "seed.jsonl", 2))
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  for output_dir, message in ((a_file, "is an existing file, not a folder"), ("/sys/codit-out", "/sys")):
    run = _cli(_flags(_overrides(tmp_path, prompts=prompts_file, output_dir=str(output_dir))))
    _, err = run.communicate(timeout=600)
    assert run.returncode == 1 and "Traceback" not in err, err
    assert err.count("codit-generate: error:") == 1 and message in err
  assert a_file.read_text() == "x"


def test_console_script_installed():
  script = Path(sys.executable).parent / "codit-generate"
  if not script.exists():
    pytest.skip("the package is not installed (pip install -e .), so there is no console script")
  run = subprocess.run([str(script), "--helpfull"], capture_output=True, text=True, timeout=300)
  assert "USAGE" in run.stdout and "--config" in run.stdout and "--coordinator_address" in run.stdout  # absl help exits 1


def test_a_local_run_imports_neither_tensorflow_nor_keras_nor_torch(tmp_path):
  """TensorFlow (and keras, which it imports) are seconds of start-up that a local output_dir does not
  need, and so is torch, which transformers imports whenever it is installed (as it is here: the tests'
  reference): the whole run, as the console script starts it (codit_jax/__init__'s start-up included),
  without any of them."""
  import torch  # noqa: F401  (installed, and so a run left to transformers would import it)
  prompts_file = _write_prompts(tmp_path / "seed.jsonl", 5)
  settings = _overrides(tmp_path, prompts=str(prompts_file), write_jsonl=True, write_parquet=True)
  script = ("import atexit, sys; sys.argv[0] = 'codit-generate'; "
            "atexit.register(lambda: print('loaded:', sorted({'tensorflow', 'keras', 'torch'} & "
            "{name for name, module in sys.modules.items() if module is not None}))); "
            "from codit_jax.generate import run; run()")
  env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, "-c", script, f"--config={DEFAULT_CONFIG}", *_flags(settings)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  assert f"codit-generate: wrote 5 rows to {settings['output_dir']}" in result.stdout, result.stdout
  assert "loaded: []" in result.stdout, result.stdout
  assert sorted(_records(settings["output_dir"])) == [f"p{i}" for i in range(5)]  # and TFDS reads it back


def test_the_progress_line_names_what_it_measured(caplog):
  stats = engine_lib.EngineStats(prompts_done=3, generated_tokens=300, seconds=2.0, slot_steps=400,
                                 live_slot_steps=100, live_slots=1)
  with caplog.at_level(logging.INFO):
    generate_app.Progress(3, 0, 0.0, 4).update(stats, force=True)
    stats.waiting_slot_steps, stats.waiting_live_slot_steps = 200, 150
    generate_app.Progress(3, 0, 0.0, 4).update(stats, force=True)
  few, many = [r.getMessage() for r in caplog.records if "slot utilization" in r.getMessage()]
  # Fewer prompts than slots: none ever waited, so there is no such utilization to show (not "nan%").
  assert "slot utilization 25.0% | 150 tokens/s" in few and "nan" not in few and "live slots 1/4" in few
  assert "slot utilization 25.0% (75.0% while prompts wait) | 150 tokens/s" in many
