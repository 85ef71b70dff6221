"""codit-train: masked loss by hand, loss falls, kill -9 and resume, Hugging Face export, filters, errors."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import tensorflow_datasets as tfds
import torch
import transformers
from flax import nnx

import tiny_checkpoints
from codit_jax import checkpoints
from codit_jax.config_files import sibling_config
from codit_jax.data import writer
from codit_jax.errors import CoditError
from codit_jax.models import decoder
from codit_jax.train import data, export, metrics, steps, trainer

REPO = Path(__file__).resolve().parent.parent
SFT_DEFAULT = str(REPO / "configs" / "sft_default.py")
_WORDS = ["sea", "poem", "fox", "sky", "blue", "light", "bake", "cake", "model", "river", "village", "boat"]


@functools.lru_cache(maxsize=None)
def _student(family: str) -> str:
  root = Path(os.environ.get("PYTEST_TMP", "/tmp")) / f"train-student-{os.getpid()}"
  return tiny_checkpoints.make_checkpoint(root / family, family)


def _records(n: int, seed: int = 0) -> list[dict]:
  rng = np.random.default_rng(seed)
  records = []
  for i in range(n):
    instruction = "Write about the " + " ".join(rng.choice(_WORDS, size=int(rng.integers(1, 4))))
    response = " ".join(rng.choice(_WORDS, size=int(rng.integers(3, 9)))) + "."
    records.append({"id": f"e{i}", "instruction": instruction, "response": response,
                    "finish_reason": "stop" if i % 4 else "length", "repetitive": False})
  return records


def _write_jsonl(path: Path, records: list[dict]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(path)


def _write_codit_dataset(folder: Path, records: list[dict]) -> str:
  """A TFDS folder as codit-generate writes it."""
  dataset = writer.DatasetWriter(str(folder), {"test": True})
  dataset.claim()
  for r in records:
    dataset.add(dict(r, response_tokens=[1, 2], post_logprobs=[-0.5, -0.1], pre_logprobs=[-1.0, -2.0],
                     codit_logprobs=[-0.5, -0.1], end_codit_logprob=-0.2 if r["finish_reason"] == "stop" else None),
                "digest")
  dataset.finish(metadata={}, description="")
  return str(folder)


def _config(**settings):
  config = sibling_config(SFT_DEFAULT, "sft_default.py")
  config.update(dict(dtype="float32", compute_dtype="float32", compilation_cache_dir="", warmup_steps=1))
  config.update(settings)
  return config


def _flags(settings: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in settings.items()]


def _final_params(output_dir: Path) -> dict:
  """The parameters of the run's last checkpoint, as numpy arrays by name."""
  step = max(int(p.name) for p in (output_dir / "checkpoints").iterdir() if p.name.isdigit())
  state = ocp.StandardCheckpointer().restore(output_dir / "checkpoints" / str(step) / "state")
  return {k: np.asarray(v) for k, v in state["params"].items()}


def _jax_logits(student: str, params: dict, tokens: np.ndarray) -> np.ndarray:
  _, cfg = checkpoints.load_config(Path(student))
  layout, _ = steps.ParamLayout.of(nnx.eval_shape(lambda: decoder.Decoder(cfg, rngs=nnx.Rngs(0))))
  model = layout.model({k: jax.numpy.asarray(v) for k, v in params.items()})
  logits, _ = decoder.forward(model, tokens, np.ones_like(tokens))
  return np.asarray(logits)


# The run most tests look at: a tiny Llama on a JSONL file and a codit-generate folder, over a
# (data=4, model=2) mesh with FSDP, two micro-batches per step, packed rows.
_RUN = dict(max_steps=8, batch_size=4, grad_accumulation=2, max_length=320, learning_rate=5e-3, eval_fraction=0.15,
            model_parallelism=2, fsdp=True, packing=True, drop_unfinished=False, log_every=1, eval_every=4,
            checkpoint_every=100, seed=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp("trained")
  records = _records(24)
  datasets = ",".join([_write_jsonl(root / "a.jsonl", records[:12]),
                       _write_codit_dataset(root / "codit", records[12:])])
  settings = dict(_RUN, student=_student("llama"), datasets=datasets, output_dir=str(root / "out"))
  summary = trainer.train(_config(**settings))
  return settings, summary


def test_loss_falls_and_metrics_are_written(trained):
  settings, summary = trained
  out = Path(settings["output_dir"])
  assert summary["data"] == {"read": 24, "kept": 24, "truncated": 0, "dropped": {}}
  records = metrics.read(out)
  losses = [r["loss"] for r in records if "loss" in r]
  assert len(losses) == 8 and losses[-1] < 0.6 * losses[0], losses
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 4, 8] and evals[2]["eval_loss"] < evals[0]["eval_loss"]
  first = next(r for r in records if "loss" in r)
  assert {"learning_rate", "tokens_per_second", "grad_norm", "trained_tokens", "epoch"} <= set(first)
  second = [r for r in records if "loss" in r][1]
  assert first["learning_rate"] == 0.0 and second["learning_rate"] == pytest.approx(5e-3)  # warmup_steps=1
  assert list((out / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((out / "train_run.json").read_text())["learning_rate"] == 5e-3


def test_masked_loss_equals_hand_computation():
  student = _student("qwen3")
  tokenizer = transformers.AutoTokenizer.from_pretrained(student)
  fmt = data.ChatFormat.for_student(tokenizer, student)
  im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  assert fmt.end_ids == (im_end,)  # the template writes '<|im_end|>\n' after a turn: the newline is not trained
  stop = data.Example("Explain why the sky is blue.", "The sky looks blue because air scatters blue light.",
                      True, False, "test")
  cut = data.Example("Please write a short poem about the ocean.", "Once upon a time the sea", False, False, "test")
  tokenized = [data.tokenize(fmt, e, 256) for e in (stop, cut)]
  model = checkpoints.load_model(student)

  hand_total, hand_count = 0.0, 0
  for example, t in zip((stop, cut), tokenized):
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": example.instruction}],
                                                     tokenize=False, add_generation_prompt=True,
                                                     enable_thinking=False), add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    expected = prompt + response + ([im_end] if example.finished else [])
    assert t.tokens.tolist() == expected
    assert not t.targets[:len(prompt)].any() and t.targets[len(prompt):].all()
    logits, _ = decoder.forward(model, t.tokens[None], np.ones((1, len(t.tokens)), np.int32))
    logits = np.asarray(logits[0], np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    # Position j predicts token j + 1: the response (and end) tokens are predicted from len(prompt) - 1 on.
    hand_total -= sum(log_probs[j - 1, expected[j]] for j in range(len(prompt), len(expected)))
    hand_count += len(expected) - len(prompt)
  assert hand_count == len(tokenized[0].tokens) + len(tokenized[1].tokens) - sum(
      (~t.targets).sum() for t in tokenized)

  one_per_row = data.make_batch(tokenized, [[0], [1]], 192)
  packed = data.make_batch(tokenized, [[0, 1]], 192)
  for batch in (one_per_row, packed):
    total, count = steps.loss_sums(model, {k: jax.numpy.asarray(v) for k, v in batch.items()})
    assert float(count) == hand_count
    np.testing.assert_allclose(float(total), hand_total, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "llama_tied"])
def test_hf_export_loads_in_transformers_with_the_tuned_logits(trained, tmp_path, family):
  if family == "llama":
    settings, _ = trained
  else:  # a short run, one epoch in bfloat16 compute: tied embeddings must stay tied
    settings = dict(student=_student(family), datasets=_write_jsonl(tmp_path / "d.jsonl", _records(8)),
                    output_dir=str(tmp_path / "out"), max_steps=0, epochs=1, batch_size=2, max_length=160,
                    learning_rate=5e-3, eval_fraction=0.0, drop_unfinished=False, compute_dtype="bfloat16",
                    eval_datasets=_write_jsonl(tmp_path / "eval.jsonl", _records(3, seed=7)))
    summary = trainer.train(_config(**settings))
    assert summary["total_steps"] == 4 and np.isfinite(summary["final_loss"])  # 8 examples, one per row
    assert summary["data"]["kept"] == 8 and summary["eval_loss"] < summary["initial_eval_loss"]
  out = Path(settings["output_dir"])
  hf = out / "hf"
  params = _final_params(out)
  tensors = safetensors.numpy.load_file(str(hf / "model.safetensors"))
  original = safetensors.numpy.load_file(str(Path(settings["student"]) / "model.safetensors"))
  assert set(tensors) == set(original)  # every tensor, under the student's names
  assert ("lm_head.weight" in tensors) == (family == "llama")
  assert not np.array_equal(tensors["model.layers.0.self_attn.q_proj.weight"],
                            original["model.layers.0.self_attn.q_proj.weight"])  # tuned

  tokens = tiny_checkpoints.random_prompt_ids(80, seed=1).numpy()
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
  with torch.no_grad():
    torch_logits = torch_model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(_jax_logits(settings["student"], params, tokens), torch_logits, atol=1e-4, rtol=0)

  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf))
  student_tokenizer = transformers.AutoTokenizer.from_pretrained(settings["student"])
  assert tokenizer.chat_template == student_tokenizer.chat_template
  generation = transformers.GenerationConfig.from_pretrained(str(hf))
  assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in generation.eos_token_id


def test_hf_export_of_mixture_of_experts_student(tmp_path):
  """Stacked experts go back to the student's one-tensor-per-expert layout (training MoE needs TPU/GPU)."""
  student = _student("qwen3_moe")
  _, params = steps.ParamLayout.of(checkpoints.load_model(student))
  params = {k: v * 1.01 if k.endswith("experts.up_proj") else v for k, v in params.items()}  # not the student's
  tokenizer = transformers.AutoTokenizer.from_pretrained(student)
  hf = export.export(params, Path(student), tokenizer, tmp_path / "hf", tied=False, end_ids=[0])
  tokens = tiny_checkpoints.random_prompt_ids(40, seed=2).numpy()
  torch_model = transformers.AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
  with torch.no_grad():
    torch_logits = torch_model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(_jax_logits(student, params, tokens), torch_logits, atol=1e-4, rtol=0)


def test_kill_9_then_resume_equals_uninterrupted(trained, tmp_path):
  reference, _ = trained
  killed = dict(reference, output_dir=str(tmp_path / "killed"), checkpoint_every=1)
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = subprocess.Popen([sys.executable, "-m", "codit_jax.train", f"--config={SFT_DEFAULT}",
                          *_flags(dict(killed, dtype="float32", compute_dtype="float32", compilation_cache_dir="",
                                       warmup_steps=1))],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  checkpoint_dir = Path(killed["output_dir"]) / "checkpoints"
  deadline = time.time() + 240
  while run.poll() is None and time.time() < deadline:
    if checkpoint_dir.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in checkpoint_dir.iterdir()):
      break
    time.sleep(0.02)
  run.send_signal(signal.SIGKILL)
  _, err = run.communicate()
  assert run.returncode == -signal.SIGKILL, err
  done = max(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())
  assert 2 <= done < reference["max_steps"] and not (Path(killed["output_dir"]) / "hf").exists()

  summary = trainer.train(_config(**killed))
  assert summary["start_step"] == done
  got, want = _final_params(Path(killed["output_dir"])), _final_params(Path(reference["output_dir"]))
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0, err_msg=name)
  # The metrics read as one run's: the records past the checkpoint were dropped and written again.
  steps_logged = [r["step"] for r in metrics.read(Path(killed["output_dir"])) if "loss" in r]
  assert steps_logged == list(range(1, reference["max_steps"] + 1))


def test_resume_with_other_settings_refused(trained):
  settings, _ = trained
  with pytest.raises(CoditError, match="learning_rate: 0.005 -> 0.001"):
    trainer.train(_config(**dict(settings, learning_rate=1e-3)))
  # The same data spelled another way is not another setting: the finished run is exported again.
  respelled = dict(settings, datasets=settings["datasets"].replace(",", " , ") + "/")
  assert trainer.train(_config(**respelled))["start_step"] == settings["max_steps"]


def test_filters_drop_repetitive_and_unfinished_rows(tmp_path):
  records = _records(8)
  records[1]["repetitive"] = True
  records[2]["finish_reason"] = "length"
  path = _write_jsonl(tmp_path / "d.jsonl", records)
  expected_unfinished = sum(r["finish_reason"] == "length" and not r["repetitive"] for r in records)

  report = data.DataReport()
  kept = data.read_datasets(path, drop_repetitive=True, drop_unfinished=True, report=report)
  assert report.dropped == {"repetitive": 1, "unfinished": expected_unfinished}
  assert len(kept) == 8 - 1 - expected_unfinished and all(e.finished and not e.repetitive for e in kept)
  assert len(data.read_datasets(path, drop_repetitive=False, drop_unfinished=False)) == 8
  # The codit-generate folder reads the same, and a reference-layout line ('output') reads too.
  folder = _write_codit_dataset(tmp_path / "codit", records)
  fields = lambda examples: [(e.instruction, e.response, e.finished, e.repetitive) for e in examples]  # noqa: E731
  assert fields(data.read_datasets(folder, drop_repetitive=True, drop_unfinished=True)) == fields(kept)
  reference = _write_jsonl(tmp_path / "ref.jsonl", [{"instruction": "a", "output": "b", "finish_reason": "stop"}])
  assert data.read_datasets(reference, drop_repetitive=True, drop_unfinished=True)[0].response == "b"


def test_rows_stopped_as_repetitive_are_unfinished(tmp_path):
  # finish_reason 'repetitive' (stop_repetitive): cut short, so unfinished, and no end token.
  records = _records(4)
  records[1].update(finish_reason="repetitive", repetitive=False)  # the flag decides only the other filter
  for path in (_write_jsonl(tmp_path / "d.jsonl", records), _write_codit_dataset(tmp_path / "codit", records)):
    everything = data.read_datasets(path, drop_repetitive=False, drop_unfinished=False)
    assert [e.finished for e in everything] == [r["finish_reason"] == "stop" for r in records]
    report = data.DataReport()
    kept = data.read_datasets(path, drop_repetitive=False, drop_unfinished=True, report=report)
    assert report.dropped == {"unfinished": 2} and [e.response for e in kept] == [records[2]["response"],
                                                                               records[3]["response"]]


_RES_METADATA = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 4096, "contrastive_decoding": True, "alpha": 0.01,
                 "beta": 1.0, "expert_model_id": "Qwen/Qwen3-8B", "amateur_model_id": "Qwen/Qwen3-8B-Base"}


def _authors_records(n: int, seed: int = 0) -> list[dict]:
  """Records in the authors' layout (their JSONL and their released CoDIT-* datasets)."""
  return [{"id": f"conv_{i}", "is_completed": r["finish_reason"] == "stop", "instruction": r["instruction"],
           "response": r["response"], "res_metadata": dict(_RES_METADATA), "score": [-0.25, -1.5, -0.0]}
          for i, r in enumerate(_records(n, seed))]


def _write_parquet(path: Path, records: list[dict]) -> str:
  """A Parquet file as the Hub's `datasets` writes one: nested res_metadata struct, score list, schema metadata."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pa.Table.from_pylist(records)
  table = table.replace_schema_metadata({b"huggingface": json.dumps({"info": {"features": {}}}).encode()})
  path.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(table, path, row_group_size=2)  # several row groups: read in batches
  return str(path)


def _fields(examples):
  return [(e.instruction, e.response, e.finished, e.repetitive) for e in examples]


def test_training_on_the_authors_layout_drops_unfinished_rows_and_loss_falls(tmp_path):
  """codit-train on a JSONL file in the authors' layout: drop_unfinished leaves out the rows with
  is_completed false, and the loss falls."""
  records = _authors_records(32)
  unfinished = sum(not r["is_completed"] for r in records)
  assert 0 < unfinished < len(records)
  settings = dict(_RUN, student=_student("llama"), datasets=_write_jsonl(tmp_path / "codit.jsonl", records),
                  output_dir=str(tmp_path / "out"), drop_unfinished=True, drop_repetitive=False)
  summary = trainer.train(_config(**settings))
  assert summary["data"]["read"] == 32 and summary["data"]["dropped"] == {"unfinished": unfinished}
  assert summary["data"]["kept"] == 32 - unfinished
  losses = [r["loss"] for r in metrics.read(Path(settings["output_dir"])) if "loss" in r]
  assert losses[-1] < 0.6 * losses[0], losses


def test_authors_layout_is_completed_decides_what_is_unfinished(tmp_path):
  records = _authors_records(8)
  records[3]["response"] = "ab" * 60  # degenerate: their records carry no flag, so it is computed
  path = _write_jsonl(tmp_path / "codit.jsonl", records)
  everything = data.read_datasets(path, drop_repetitive=False, drop_unfinished=False)
  assert [e.finished for e in everything] == [r["is_completed"] for r in records]
  assert [e.repetitive for e in everything] == [i == 3 for i in range(8)]
  report = data.DataReport()
  kept = data.read_datasets(path, drop_repetitive=True, drop_unfinished=True, report=report)
  unfinished = sum(not r["is_completed"] and i != 3 for i, r in enumerate(records))
  assert unfinished and report.dropped == {"repetitive": 1, "unfinished": unfinished}
  assert report.read == 8 and len(kept) == 8 - 1 - unfinished and all(e.finished for e in kept)
  # finish_reason, where a record has it, wins; a record with neither counts as finished.
  both = _write_jsonl(tmp_path / "both.jsonl", [{"instruction": "a", "response": "b", "finish_reason": "length",
                                                 "is_completed": True}, {"instruction": "c", "response": "d"}])
  assert [e.finished for e in data.read_datasets(both, drop_repetitive=True, drop_unfinished=False)] == [False, True]
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "response": "b", "is_completed": "yes"}])
  with pytest.raises(CoditError, match=rf"{bad}:1: field 'is_completed' must be true or false, not 'yes'"):
    data.read_datasets(bad, drop_repetitive=True, drop_unfinished=True)


def test_hub_dataset_folder_of_parquet_shards_reads_as_downloaded(tmp_path):
  records = _authors_records(10)
  snapshot = tmp_path / "snapshot"
  _write_parquet(snapshot / "data" / "train-00000-of-00002.parquet", records[:6])
  # As in the Hub cache: the snapshot's files are links to blobs.
  blob = Path(_write_parquet(tmp_path / "blobs" / "5f3a9c", records[6:]))
  (snapshot / "data" / "train-00001-of-00002.parquet").symlink_to(blob)
  _write_parquet(snapshot / "data" / "test-00000-of-00001.parquet", _authors_records(3, seed=1))  # another split
  (snapshot / "README.md").write_text("---\nlicense: apache-2.0\n---\n# CoDIT-Qwen3-8B\n")
  (snapshot / ".gitattributes").write_text("*.parquet filter=lfs diff=lfs merge=lfs -text\n")
  (snapshot / ".cache" / "huggingface").mkdir(parents=True)  # huggingface-cli download --local-dir leaves this
  _write_jsonl(snapshot / ".cache" / "huggingface" / "stale.jsonl", [{"instruction": "x", "response": "y"}])
  expected = _fields(data.read_datasets(_write_jsonl(tmp_path / "all.jsonl", records),
                                        drop_repetitive=False, drop_unfinished=False))

  read = functools.partial(data.read_datasets, drop_repetitive=False, drop_unfinished=False)
  assert _fields(read(str(snapshot))) == expected
  assert [p.name for p in data.data_files(snapshot)] == ["train-00000-of-00002.parquet",
                                                         "train-00001-of-00002.parquet"]
  # One file, or a comma-separated list of files, reads the same.
  shards = sorted(str(p) for p in (snapshot / "data").glob("train-*.parquet"))
  assert _fields(read(shards[0])) == expected[:6]
  assert _fields(read(",".join(shards))) == expected
  # drop_unfinished uses is_completed here too.
  kept = data.read_datasets(str(snapshot), drop_repetitive=True, drop_unfinished=True)
  assert _fields(kept) == [f for f in expected if f[2]] and len(kept) < len(expected)
  # A folder of JSONL files (their own output) reads too; without split names every file is read.
  jsonl_folder = tmp_path / "jsonl_folder"
  jsonl_folder.mkdir()
  _write_jsonl(jsonl_folder / "codit_a.jsonl", records[:4])
  _write_jsonl(jsonl_folder / "codit_b.jsonl", records[4:])
  (jsonl_folder / "README.md").write_text("# outputs\n")
  assert _fields(read(str(jsonl_folder))) == expected


def test_rows_without_a_response_are_skipped_and_counted(tmp_path):
  records = _authors_records(6)
  records[1]["response"] = None  # a null in Parquet
  records[2]["response"] = ""
  records[3]["response"] = " \n "
  records[4]["instruction"] = ""
  path = _write_parquet(tmp_path / "data" / "train-00000-of-00001.parquet", records)
  report = data.DataReport()
  kept = data.read_datasets(str(tmp_path), drop_repetitive=False, drop_unfinished=False, report=report)
  assert [e.where for e in kept] == [f"{path} row 0", f"{path} row 5"]
  assert report.read == 6 and report.kept == 2
  assert report.dropped == {"missing_response": 1, "empty_response": 2, "empty_instruction": 1}
  lines = _authors_records(3)
  del lines[0]["response"]
  jsonl = _write_jsonl(tmp_path / "lines.jsonl", lines)
  report = data.DataReport()
  assert len(data.read_datasets(jsonl, drop_repetitive=False, drop_unfinished=False, report=report)) == 2
  assert report.read == 3 and report.dropped == {"missing_response": 1}


def test_folders_without_usable_data_files_give_one_line_errors(tmp_path):
  read = functools.partial(data.read_datasets, drop_repetitive=True, drop_unfinished=True)
  readme_only = tmp_path / "readme_only"
  readme_only.mkdir()
  (readme_only / "README.md").write_text("# A dataset card\n")
  (readme_only / ".gitattributes").write_text("*.parquet filter=lfs\n")
  with pytest.raises(CoditError, match=rf"^{readme_only} holds no data files: no dataset_info.json \(TFDS\) and "
                                       r"no \*\.parquet or \*\.jsonl files under it\. [^\n]*$"):
    read(str(readme_only))
  clone = tmp_path / "clone"  # git clone without git-lfs: pointers instead of the data
  (clone / "data").mkdir(parents=True)
  pointer = clone / "data" / "train-00000-of-00001.parquet"
  pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 12345\n")
  with pytest.raises(CoditError, match=rf"{pointer} is a Git LFS pointer, not the data"):
    read(str(clone))
  mixed = tmp_path / "mixed"
  _write_parquet(mixed / "train.parquet", _authors_records(2))
  _write_jsonl(mixed / "train.jsonl", _authors_records(2))
  with pytest.raises(CoditError, match=rf"{mixed} holds both Parquet and JSONL files"):
    read(str(mixed))
  no_response = _write_parquet(tmp_path / "no_response.parquet", [{"instruction": "a", "answer": "b"}])
  with pytest.raises(CoditError, match=rf"{no_response}: the Parquet file has no column 'response' \(its "
                                       r"columns: instruction, answer\)"):
    read(no_response)
  broken = tmp_path / "broken.parquet"
  broken.write_bytes(b"PAR1 not really")
  with pytest.raises(CoditError, match=rf"{broken} is not a readable Parquet file"):
    read(str(broken))


def test_unfinished_responses_get_no_end_token():
  student = _student("llama")
  fmt = data.ChatFormat.for_student(transformers.AutoTokenizer.from_pretrained(student), student)
  finished, cut = (data.tokenize(fmt, data.Example("Hi", "Sure, here is a summary.", f, False, "t"), 128)
                   for f in (True, False))
  assert finished.tokens.tolist() == cut.tokens.tolist() + list(fmt.end_ids)
  truncated = data.tokenize(fmt, data.Example("Hi", "one two three four five six seven", True, False, "t"),
                            len(cut.tokens) - 2)
  assert truncated.tokens[-1] not in fmt.end_ids


@pytest.mark.parametrize("family, template, eos, end", [
    ("llama", "", None, "<|eot_id|>"),
    ("gemma3", "", None, "<end_of_turn>"),  # not the tokenizer's eos (<eos>)
    ("mistral", "", None, "</s>"),
    ("qwen3", "", None, "<|im_end|>"),
    ("qwen3", "chatml", "<|endoftext|>", "<|im_end|>"),  # a base model given ChatML: its own special token
    ("llama", "chatml", None, "<|eot_id|>"),  # '<|im_end|>' is plain text here: fall back to eos
])
def test_end_of_turn_token_is_what_the_template_writes(tmp_path, family, template, eos, end):
  tokenizer = tiny_checkpoints.make_tokenizer(tmp_path, family)
  if eos:
    tokenizer.eos_token = eos
  data.set_chat_template(tokenizer, template, family)
  fmt = data.ChatFormat.for_student(tokenizer, None)
  assert tokenizer.convert_ids_to_tokens(list(fmt.end_ids)) == [end]


def _tfds_folder_without_response(folder: Path) -> str:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({"instruction": tfds.features.Text(), "answer": tfds.features.Text()})
  folder.mkdir()
  shard = folder / writer.shard_name(0)
  with tf.io.TFRecordWriter(str(shard)) as records:
    records.write(features.serialize_example({"instruction": "a", "answer": "b"}))
  split = tfds.core.SplitInfo(
      name="train", shard_lengths=[1], num_bytes=shard.stat().st_size,
      filename_template=tfds.core.ShardedFileTemplate(data_dir=str(folder), template=writer.FILENAME_TEMPLATE,
                                                      dataset_name=writer.DATASET_NAME, split="train",
                                                      filetype_suffix="tfrecord"))
  tfds.folder_dataset.write_metadata(data_dir=str(folder), features=features, split_infos=[split],
                                     filename_template=writer.FILENAME_TEMPLATE, check_data=False)
  return str(folder)


def test_bad_datasets_give_clear_errors(tmp_path):
  read = functools.partial(data.read_datasets, drop_repetitive=True, drop_unfinished=True)
  missing = str(tmp_path / "nope.jsonl")
  with pytest.raises(CoditError, match=f"dataset '{missing}' does not exist"):
    read(missing)
  lacking = _write_jsonl(tmp_path / "lacking.jsonl", [{"instruction": "a", "answer": "b"}, {"instruction": "c"}])
  with pytest.raises(CoditError, match=rf"{lacking}: no line has the field 'response' \(or 'output'\)"):
    read(lacking)
  not_text = _write_jsonl(tmp_path / "not_text.jsonl", [{"instruction": "a", "response": ["b"]}])
  with pytest.raises(CoditError, match=rf"{not_text}:1: field 'response' must be text, not list"):
    read(not_text)
  bad_reason = _write_jsonl(tmp_path / "reason.jsonl", [{"instruction": "a", "response": "b", "finish_reason": "eos"}])
  with pytest.raises(CoditError, match=rf"{bad_reason}:1: field 'finish_reason' is 'eos'"):
    read(bad_reason)
  folder = _tfds_folder_without_response(tmp_path / "tfds")
  with pytest.raises(CoditError, match=rf"{folder}: the TFDS dataset has no field 'response'"):
    read(folder)
  unfinished = tmp_path / "unfinished"
  writer.DatasetWriter(str(unfinished), {"test": True}).claim()
  with pytest.raises(CoditError, match="not finished"):
    read(str(unfinished))
  with pytest.raises(CoditError, match="has no chat template"):
    tokenizer = transformers.AutoTokenizer.from_pretrained(_student("llama"))
    tokenizer.chat_template = None
    data.set_chat_template(tokenizer, "", "base-model")


def test_cli_user_error_exits_without_traceback(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  result = subprocess.run([sys.executable, "-m", "codit_jax.train", f"--config={SFT_DEFAULT}",
                           "--config.student=builtin:demo-post", f"--config.datasets={tmp_path / 'missing'}",
                           f"--config.output_dir={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "codit-train: error: dataset" in result.stderr and "Traceback" not in result.stderr


def test_batch_plan_is_deterministic_and_resumable():
  examples = [data.Tokenized(np.arange(n, dtype=np.int32), np.arange(n) > 1) for n in (5, 9, 3, 7, 4, 6, 8, 2, 5)]
  plan = data.BatchPlan(examples, batch_size=2, max_length=12, packing=True, seed=1)
  whole = [b for _, (_, b) in zip(range(9), plan.batches(0))]
  again = [b for _, (_, b) in zip(range(5), data.BatchPlan(examples, 2, 12, True, 1).batches(4))]
  for a, b in zip(whole[4:], again):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  rows = plan.rows(0)
  assert sorted(i for row in rows for i in row) == list(range(len(examples)))
  assert all(sum(len(examples[i].tokens) for i in row) <= 12 for row in rows)
  assert plan.rows(1) != rows  # reshuffled per epoch


def test_ctrl_c_inside_tensorboard_writes_is_delivered_after_them():
  """A SIGINT during MetricsLog's TensorFlow calls used to raise inside TF's eager C++ code and crash
  codit-train (a segfault); it now waits for the block to finish, then interrupts as usual."""
  from codit_jax.train import metrics  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGINT)
  ran = []
  with pytest.raises(KeyboardInterrupt):
    with metrics.interrupts_held():
      signal.raise_signal(signal.SIGINT)
      ran.append("the rest of the block")
  assert ran == ["the rest of the block"] and signal.getsignal(signal.SIGINT) is before
  with metrics.interrupts_held():  # no signal: nothing raised
    ran.append("quiet")
  assert ran[-1] == "quiet"


@pytest.mark.parametrize("change, message", [
    (dict(checkpoint_every=0), "checkpoint_every must be at least 1"),
    (dict(model_parallelism=0), "model_parallelism must be at least 1"),
    (dict(keep_checkpoints=-1), "keep_checkpoints must be >= 0"),
    (dict(learning_rate=float("nan")), "learning_rate must be a finite number > 0"),
    (dict(export_dtype="float16"), "export_dtype 'float16' is not supported"),
    (dict(output_dir="A_FILE"), "is an existing file, not a folder"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, change, message):
  # Each failed late before: a ZeroDivisionError after the first eval, orbax's own error, or (export_dtype)
  # after every step had run.
  if change.get("output_dir") == "A_FILE":
    (tmp_path / "a_file").write_text("x")
    change = dict(output_dir=str(tmp_path / "a_file"))
  settings = dict(student=_student("llama"), datasets=_write_jsonl(tmp_path / "a.jsonl", _records(4)),
                  output_dir=str(tmp_path / "out"))
  with pytest.raises(CoditError, match=message):
    trainer.validate(_config(**dict(settings, **change)))


def test_a_chat_template_that_cannot_render_is_one_error():
  tokenizer = transformers.AutoTokenizer.from_pretrained(_student("llama"))
  with pytest.raises(CoditError, match=r"--config.chat_template cannot render a user turn \(line 1\): "
                                       r"TemplateSyntaxError"):
    data.set_chat_template(tokenizer, "{% for m in messages %", "student")


def test_a_tokenizer_past_the_embedding_is_refused(tmp_path):
  # Its ids past the embedding gathered garbage and trained to NaN, and the run ended with exit 0.
  student = tmp_path / "student"
  student.mkdir()
  for f in Path(_student("llama")).iterdir():
    (student / f.name).write_bytes(f.read_bytes())
  config = json.loads((student / "config.json").read_text())
  (student / "config.json").write_text(json.dumps(dict(config, vocab_size=100)))
  settings = dict(student=str(student), datasets=_write_jsonl(tmp_path / "a.jsonl", _records(8)),
                  output_dir=str(tmp_path / "out"), max_steps=1, batch_size=2)
  with pytest.raises(CoditError, match=r"has token ids up to \d+, but the model has 100 embedding rows"):
    trainer.train(_config(**settings))
  assert not (tmp_path / "out").exists()


def test_a_diverged_run_stops_before_it_saves_or_exports(tmp_path):
  settings = dict(student=_student("llama"), datasets=_write_jsonl(tmp_path / "a.jsonl", _records(16)),
                  output_dir=str(tmp_path / "out"), max_steps=6, batch_size=4, max_length=128, learning_rate=1e12,
                  max_grad_norm=0.0, eval_fraction=0.0, log_every=1, checkpoint_every=100)
  with pytest.raises(CoditError, match=r"training diverged: loss .* by step \d\. Nothing of these steps was saved "
                                       r"or exported \(the last checkpoint is none\)"):
    trainer.train(_config(**settings))
  assert not (tmp_path / "out" / "hf").exists()
  assert not [p for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.isdigit()]


def test_an_eval_set_that_the_filters_empty_is_refused(tmp_path):
  records = [dict(r, finish_reason="length") for r in _records(3)]  # all unfinished: dropped
  settings = dict(student=_student("llama"), datasets=_write_jsonl(tmp_path / "a.jsonl", _records(8)),
                  eval_datasets=_write_jsonl(tmp_path / "eval.jsonl", records), output_dir=str(tmp_path / "out"),
                  max_steps=1, batch_size=2)
  with pytest.raises(CoditError, match=r"eval_datasets .*eval.jsonl leaves no eval example of 3 read \(dropped: "
                                       r"\{'unfinished': 3\}\)"):
    trainer.train(_config(**settings))


def test_a_run_killed_before_its_first_checkpoint_restarts_its_metrics(tmp_path):
  (tmp_path / metrics.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in [
      {"step": 0, "eval_loss": 6.0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]))
  metrics.MetricsLog(tmp_path, 0).close()  # a fresh start: it writes the step-0 eval again
  assert metrics.read(tmp_path) == []
  (tmp_path / metrics.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in [
      {"step": 0, "eval_loss": 6.0}, {"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}]))
  metrics.MetricsLog(tmp_path, 1).close()  # resumed from checkpoint 1
  assert metrics.read(tmp_path) == [{"step": 0, "eval_loss": 6.0}, {"step": 1, "loss": 5.0}]


def test_a_second_run_on_the_output_dir_is_refused(tmp_path):
  out = tmp_path / "out"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from codit_jax import runtime; "
                             "runtime.lock_folder(sys.argv[1], 'codit-train'); print('locked', flush=True); "
                             "time.sleep(600)", str(out)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "locked\n"
    settings = dict(student=_student("llama"), datasets=_write_jsonl(tmp_path / "a.jsonl", _records(24)),
                    output_dir=str(out), max_steps=1, batch_size=2, max_length=256)
    with pytest.raises(CoditError, match=rf"another codit-train run \(pid {holder.pid} on .*\) is writing to {out}"):
      trainer.train(_config(**settings))
    assert sorted(p.name for p in out.iterdir()) == [".codit-lock"]
  finally:
    holder.kill()
    holder.wait()
  assert trainer.train(_config(**settings))["total_steps"] == 1  # the holder is gone: its lock with it


def test_ctrl_c_during_a_checkpoint_save_keeps_that_checkpoint(tmp_path, monkeypatch):
  # Raised inside orbax's synchronous part of save(), the KeyboardInterrupt left its background commit
  # waiting: close() hung for orbax's 300 s timeout. It is delivered once the save has started.
  original = ocp.CheckpointManager.save

  def save_interrupted_at_step_2(self, step, *args, **kwargs):
    if step == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_interrupted_at_step_2)
  settings = dict(student=_student("llama"), datasets=_write_jsonl(tmp_path / "a.jsonl", _records(24)),
                  output_dir=str(tmp_path / "out"), max_steps=4, batch_size=2, max_length=256, checkpoint_every=2,
                  eval_fraction=0.0)
  started = time.perf_counter()
  with pytest.raises(KeyboardInterrupt):
    trainer.train(_config(**settings))
  assert time.perf_counter() - started < 120
  monkeypatch.undo()
  assert trainer.train(_config(**settings))["start_step"] == 2
