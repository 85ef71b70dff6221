"""End-to-end throughput of codit-generate on a workload whose response lengths vary as real ones do.

    python bench/throughput.py                   # 128 prompts, up to 512 new tokens, batch 16
    python bench/throughput.py --record          # ... and append the table to bench/RESULTS.md

One random Llama-family pair is built (numpy weights, the demo's byte-level
tokenizer and ChatML template, saved in the Hugging Face layout). The
post-trained model's lm_head row of the end token <|im_end|> is scaled by
--end_scale, so that greedy CoDIT responses stop after lengths spread over a
wide range, roughly geometrically, while some rows never stop and run to
--max_new_tokens, as degenerate real responses do. Then, on the same prompts,
greedy, float32:
  - codit-generate of this checkout (continuous batching), a subprocess, as a
    user runs it: on a CPU host of 2+ cores it makes two host devices and steps
    one model on each (pair_parallel left unset);
  - the same with pair_parallel=False: both models on one host device, one core
    (skip with --skip_one_device);
  - codit-generate of the static-batch engine (--static_commit, the commit
    before continuous batching, extracted with git archive), a subprocess;
  - a plain batched Hugging Face PyTorch CoDIT loop (this file with
    --hf_worker: load both models, template and tokenize the prompts, decode
    static batches of --batch prompts sorted by length, each batch stopping
    when all its rows have; codit_jax.decoding.torch_reference), a subprocess.
Each is timed end to end, as a user runs it: wall seconds of the whole command,
imports, loading and compiling included. The two codit-generate runs are done
twice with one compilation cache: cold (compiles) and warm (a rerun, what a
resumed or repeated job sees). Prints seconds, generated tokens/s (end tokens
included), slot utilization (useful slot-steps over slot-steps run; for the
static runs computed from their batch plan and response lengths), the ratios,
and how many rows the three agree on token for token.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

_WORDS = ("write explain list three why the sea poem robot coffee story moon summarize a short text about "
          "history science cooking travel programming steps ideas tips for better sleep translate sentence "
          "answer question capital France water boils oven flour eggs").split()


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--prompts", type=int, default=128)
  parser.add_argument("--max_new_tokens", type=int, default=512)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--intermediate", type=int, default=768)
  parser.add_argument("--end_scale", type=float, default=3.0, help="scale of the end token's lm_head row")
  parser.add_argument("--static_commit", default="34f1b65", help="the static-batch engine to compare with")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument("--skip_static", action="store_true")
  parser.add_argument("--skip_torch", action="store_true")
  parser.add_argument("--skip_one_device", action="store_true",
                      help="no run with pair_parallel=False (both models on one host device)")
  parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
  parser.add_argument("--hf_worker", nargs=3, metavar=("POST", "PRE", "OUT"), help=argparse.SUPPRESS)
  parser.add_argument("--prompts_file", help=argparse.SUPPRESS)
  return parser.parse_args()


def build_pair(args, root: Path) -> tuple[str, str]:
  """A random pair in the Hugging Face layout, the post-trained end-token row scaled."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from codit_jax import demo  # pylint: disable=g-import-not-at-top
  tokenizer = demo._tokenizer()  # pylint: disable=protected-access
  end = tokenizer.convert_tokens_to_ids("<|im_end|>")
  heads = max(4, args.hidden // 64)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
      max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
  folders = []
  for name, seed in (("post", 0), ("pre", 1)):
    folder = root / name
    folder.mkdir(parents=True)
    tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, tokenizer.eos_token_id]}))
    rng = np.random.default_rng(seed)
    weights = {}
    for tensor, shape in _shapes(config).items():
      weights[tensor] = np.ones(shape, np.float32) if len(shape) == 1 else \
          (rng.standard_normal(shape) * 0.05).astype(np.float32)
    if name == "post":
      weights["lm_head.weight"][end] *= args.end_scale
    safetensors.numpy.save_file(weights, str(folder / "model.safetensors"))
    folders.append(str(folder))
  return folders[0], folders[1]


def _shapes(config) -> dict[str, tuple[int, ...]]:
  h, f = config.hidden_size, config.intermediate_size
  d = h // config.num_attention_heads
  q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
  shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "lm_head.weight": (config.vocab_size, h),
            "model.norm.weight": (h,)}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)})
  return shapes


def write_prompts(path: Path, n: int) -> None:
  rng = np.random.default_rng(0)
  with path.open("w") as f:
    for i in range(n):
      words = rng.choice(_WORDS, size=int(rng.integers(3, 40)))
      f.write(json.dumps({"id": f"q{i}", "instruction": " ".join(words)}) + "\n")


def run_generate(args, cwd: Path, post: str, pre: str, prompts: Path, out: Path, cache: Path,
                 **extra) -> tuple[float, str]:
  """codit-generate (the checkout at cwd) end to end: (wall seconds, its log)."""
  overrides = dict(post_trained=post, pre_trained=pre, prompts=prompts, output_dir=out, temperature=0.0,
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch, dtype="float32", max_prompt_len=128,
                   min_bucket=32, compilation_cache_dir=cache, log_every_seconds=1e9, **extra)
  command = [sys.executable, "-m", "codit_jax.generate", f"--config={cwd / 'configs' / 'default.py'}",
             *(f"--config.{k}={v}" for k, v in overrides.items())]
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}  # the devices it picks itself
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1")
  started = time.perf_counter()
  done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
  seconds = time.perf_counter() - started
  if done.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
  return seconds, done.stdout + done.stderr


def hf_worker(post: str, pre: str, out: str, prompts_file: str, batch: int, max_new_tokens: int, threads: int):
  """The plain PyTorch CoDIT loop, end to end: writes {id: tokens} to out."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from codit_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from codit_jax.decoding import torch_reference  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  models = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (post, pre)]
  tokenizer = transformers.AutoTokenizer.from_pretrained(post)
  end_ids = prompts_lib.end_token_ids(tokenizer, post)
  records = [json.loads(line) for line in Path(prompts_file).read_text().splitlines()]
  examples = [(r["id"], prompts_lib.build_prompt_ids(tokenizer, r["instruction"])) for r in records]
  examples.sort(key=lambda e: len(e[1]))
  results = {}
  for start in range(0, len(examples), batch):
    chunk = examples[start:start + batch]
    outs = torch_reference.generate(*models, [ids for _, ids in chunk], end_ids=end_ids,
                                    vocab_size=len(tokenizer.get_vocab()), max_new_tokens=max_new_tokens)
    results.update({i: [tokens, reason] for (i, _), (tokens, _, _, reason) in zip(chunk, outs)})
  Path(out).write_text(json.dumps(results))


def static_utilization(prompt_lengths: dict[str, int], rows: dict[str, tuple[list[int], str]], batch: int) -> float:
  """Useful slot-steps over slot-steps run of static batches (sorted by prompt length, then input order),
  each running until its longest row stops. A row's steps: its tokens, plus its end token if it stopped."""
  order = sorted(prompt_lengths, key=lambda i: (prompt_lengths[i], int(i[1:])))
  steps = {i: len(rows[i][0]) + (rows[i][1] == "stop") for i in order}
  useful = sum(steps.values())
  run = sum(batch * max(steps[i] for i in order[s:s + batch]) for s in range(0, len(order), batch))
  return useful / run


def main():
  args = parse_args()
  if args.hf_worker:
    hf_worker(*args.hf_worker, args.prompts_file, args.batch, args.max_new_tokens, args.threads)
    return
  import jax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from decode import machine, print_and_record  # pylint: disable=g-import-not-at-top
  from codit_jax.data import prompts as prompts_lib  # pylint: disable=g-import-not-at-top
  from codit_jax.data import writer  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp_name:
    tmp = Path(tmp_name)
    post, pre = build_pair(args, tmp / "pair")
    prompts_file = tmp / "prompts.jsonl"
    write_prompts(prompts_file, args.prompts)
    tokenizer = transformers.AutoTokenizer.from_pretrained(post)
    lengths = {r["id"]: len(prompts_lib.build_prompt_ids(tokenizer, r["instruction"]))
               for r in map(json.loads, prompts_file.read_text().splitlines())}

    runs, rows, utilization = {}, {}, {}
    # name: (checkout, config overrides)
    variants = {"continuous (this checkout)": (REPO, {})}
    if not args.skip_one_device:
      # XLA:CPU runs one decode step's ops one after another, on one core: the default steps the two
      # models on two host devices at once (pair_parallel); this is both on one.
      variants["continuous, pair_parallel=False (one host device)"] = (REPO, {"pair_parallel": False})
    if not args.skip_static:
      static = tmp / "static"
      static.mkdir()
      archive = subprocess.run(["git", "-C", str(REPO), "archive", args.static_commit, "codit_jax", "configs"],
                               capture_output=True, check=True).stdout
      subprocess.run(["tar", "-x", "-C", str(static)], input=archive, check=True)
      variants[f"static ({args.static_commit})"] = (static, {})
    for name, (cwd, overrides) in variants.items():
      cache = tmp / f"xla-{len(runs)}"
      for phase in ("cold", "warm"):
        out = tmp / f"out-{len(runs)}-{phase}"
        seconds, log = run_generate(args, cwd, post, pre, prompts_file, out, cache, **overrides)
        runs[f"{name}, {phase}"] = seconds
      examples = list(writer.read_examples(str(out)))
      rows[name] = {e["id"]: (list(e["response_tokens"]), e["finish_reason"]) for e in examples}
      if cwd == REPO:
        match = re.findall(r"slot utilization ([\d.]+)% \(([\d.]+)% while prompts wait\)", log)
        utilization[name] = f"{float(match[-1][0]) / 100:.1%} ({float(match[-1][1]) / 100:.1%} while prompts wait)" \
            if match else "?"
      else:
        utilization[name] = f"{static_utilization(lengths, rows[name], args.batch):.1%}"
      if name == "continuous (this checkout)":
        # The same run with stop_repetitive (a first run compiles its decode program).
        for phase in ("compile", "warm"):
          out_stop = tmp / f"out-stop-{phase}"
          seconds, _ = run_generate(args, cwd, post, pre, prompts_file, out_stop, cache, stop_repetitive=True)
        stop_seconds = seconds
        stopped = {e["id"]: (list(e["response_tokens"]), e["finish_reason"])
                   for e in writer.read_examples(str(out_stop))}
    if not args.skip_torch:
      out = tmp / "hf.json"
      command = [sys.executable, __file__, "--hf_worker", post, pre, str(out), f"--prompts_file={prompts_file}",
                 f"--batch={args.batch}", f"--max_new_tokens={args.max_new_tokens}", f"--threads={args.threads}"]
      started = time.perf_counter()
      subprocess.run(command, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
      runs["Hugging Face PyTorch loop (static)"] = time.perf_counter() - started
      rows["Hugging Face PyTorch loop (static)"] = {i: (t, r) for i, (t, r) in json.loads(out.read_text()).items()}
      utilization["Hugging Face PyTorch loop (static)"] = \
          f"{static_utilization(lengths, rows['Hugging Face PyTorch loop (static)'], args.batch):.1%}"

  reference = rows["continuous (this checkout)"]
  tokens = sum(len(t) + (r == "stop") for t, r in reference.values())
  response_lengths = np.asarray([len(t) for t, _ in reference.values()])
  capped = np.mean([r == "length" for _, r in reference.values()])
  lines = [f"end-to-end throughput benchmark, {datetime.date.today()}, {machine(jax)}",
           f"model: llama hidden={args.hidden} layers={args.layers} intermediate={args.intermediate}, random "
           f"weights, end-token row x{args.end_scale}; float32, greedy CoDIT; {args.prompts} prompts, batch "
           f"{args.batch}, max_new_tokens {args.max_new_tokens}",
           f"response lengths: median {np.median(response_lengths):.0f}, mean {response_lengths.mean():.0f}, "
           f"p90 {np.percentile(response_lengths, 90):.0f}, {capped:.0%} of rows at the cap; "
           f"{tokens} tokens generated",
           "", "| run | wall s | tokens/s | slot utilization | vs PyTorch loop |", "|---|---:|---:|---:|---:|"]
  torch_seconds = runs.get("Hugging Face PyTorch loop (static)")
  for name, seconds in runs.items():
    base = name.rsplit(",", 1)[0] if name.endswith((", cold", ", warm")) else name
    ratio = f"{torch_seconds / seconds:.2f}x" if torch_seconds else "-"
    lines.append(f"| {name} | {seconds:.1f} | {tokens / seconds:.0f} | {utilization[base]} | {ratio} |")
  lines.append("")
  for name, other in rows.items():
    if name != "continuous (this checkout)":
      same = np.mean([other[i] == reference[i] for i in reference])
      lines.append(f"- rows with the same tokens and finish reason as the continuous engine: {name}: {same:.0%}")
  stop_tokens = sum(len(t) + (r == "stop") for t, r in stopped.values())
  looping = sum(r == "repetitive" for _, r in stopped.values())
  same = np.mean([stopped[i] == reference[i] for i in reference if stopped[i][1] != "repetitive"])
  lines.append(f"- stop_repetitive (continuous, warm): {looping} rows stopped 'repetitive' of "
               f"{sum(r == 'length' for _, r in reference.values())} at the cap; {stop_tokens} tokens instead of "
               f"{tokens} ({1 - stop_tokens / tokens:.0%} fewer), {stop_seconds:.1f} s instead of "
               f"{runs['continuous (this checkout), warm']:.1f} s; the other rows unchanged: {same:.0%}")
  one = "continuous, pair_parallel=False (one host device), warm"
  if one in runs:
    lines.append(f"- the default (pair_parallel on 2 host devices) over one host device (warm): "
                 f"{runs[one] / runs['continuous (this checkout), warm']:.2f}x")
  if f"static ({args.static_commit}), warm" in runs:
    lines.append(f"- continuous over static engine (warm): "
                 f"{runs[f'static ({args.static_commit}), warm'] / runs['continuous (this checkout), warm']:.2f}x")
  print_and_record("\n".join(lines), args.record)


if __name__ == "__main__":
  main()
