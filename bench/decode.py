"""Decode throughput: the engine in CoDIT and direct mode against a plain PyTorch CoDIT, side by side.

    python bench/decode.py                       # defaults: batch 16, prompt 64, 64 new tokens
    python bench/decode.py --hidden=1024 --layers=16 --batch=16 --new_tokens=128

One random Llama-family pair of the given size is built (transformers, saved
with save_pretrained, loaded by both sides from the same files). Every
prompt is decoded greedily to exactly --new_tokens tokens (no end token), by
  - the engine, CoDIT mode (both models in one jitted loop; every row of the batch is admitted
    at once and runs to the end, so this is the decode loop's speed, not continuous batching's:
    bench/throughput.py measures that),
  - the engine, direct mode (post-trained model alone),
  - with --pair_parallel, the engine in CoDIT mode with each model on its own
    device, both stepping at once (on CPU: two host devices, one per core),
  - torch_reference.generate: transformers' PyTorch models with KV caches, a
    left-padded batch, the CoDIT rule per step in eager PyTorch.
Times are end to end per call (prefill, decode loop, results on the host),
after one warm-up call, best of --repeats. The engine's first-call time
(compilation included) is printed too. Greedy tokens of the engine and
PyTorch are compared. Prints a table and the ratios; --record appends them to
bench/RESULTS.md with the machine and date.

Memory-bandwidth roofline: a decode step of batch-16 decoding is bound by
reading memory. Each run is also timed with one new token (the prefill alone);
(end to end - prefill) / (new_tokens - 1) is the time of a decode step, and
the bytes a step must read (every weight once, the input embedding table
aside, and the keys/values of the tokens so far, averaged over the run) over
that time is the bandwidth it reaches, shown against the machine's streaming
read bandwidth measured here (a jitted sum over a 512 MiB array).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def add_model_args(parser: argparse.ArgumentParser) -> None:
  """The random Llama-family model's size and dtype (shared with decode_cache.py)."""
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--kv_heads", type=int, default=4)
  parser.add_argument("--intermediate", type=int, default=768)
  parser.add_argument("--vocab", type=int, default=8192)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(parser)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
  parser.add_argument("--skip_torch", action="store_true", help="accelerator runs: engine only")
  parser.add_argument("--pair_parallel", action="store_true",
                      help="also time CoDIT with the two models on two devices at once (CPU: 2 host devices)")
  parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
  return parser.parse_args()


def build_pair(args, directory: Path) -> tuple[str, str]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      max_position_embeddings=max(2048, args.prompt_len + args.new_tokens), tie_word_embeddings=False)
  folders = []
  for name, seed in (("post", 0), ("pre", 1)):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
      for p in model.parameters():
        p.normal_(0.0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    model.save_pretrained(directory / name)
    folders.append(str(directory / name))
  return folders[0], folders[1]


def timed(fn, repeats: int) -> tuple[float, float, object]:
  """(first call seconds, best of `repeats` later calls, last result)."""
  started = time.perf_counter()
  result = fn()
  first = time.perf_counter() - started
  best = float("inf")
  for _ in range(repeats):
    started = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - started)
  return first, best, result


def main():
  args = parse_args()
  if args.pair_parallel and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    # On CPU, two host devices (ignored by other platforms); set before jax starts.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
  import jax  # pylint: disable=g-import-not-at-top
  from codit_jax import parallel  # pylint: disable=g-import-not-at-top
  from codit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from codit_jax.decoding.engine import DecodeSettings, Engine  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  examples = [(f"ex{i}", rng.integers(0, args.vocab, size=args.prompt_len).tolist()) for i in range(args.batch)]
  never = (args.vocab + 7,)  # no real end token: every row decodes new_tokens tokens
  generated = args.batch * args.new_tokens
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    post_path, pre_path = build_pair(args, Path(tmp))
    post = checkpoints.load_model(post_path, args.dtype)
    pre = checkpoints.load_model(pre_path, args.dtype)
    runs = {"codit": (post, pre, None), "direct": (post, pre, None)}
    if args.pair_parallel:
      mesh = parallel.make_mesh(devices=jax.devices()[:2], pair_parallel=True)
      runs["codit, pair-parallel"] = (checkpoints.load_pair(post_path, pre_path, mesh, args.dtype), None, mesh)
    engine_tokens = {}
    for name, (first_model, second_model, mesh) in runs.items():
      times = []
      for new_tokens in (args.new_tokens, 1):
        settings = DecodeSettings(vocab_size=args.vocab, end_ids=never, mode=name.split(",")[0], temperature=0.0,
                                  max_new_tokens=new_tokens, pair_parallel=mesh is not None)
        engine = Engine(first_model, second_model, settings, batch_size=args.batch, max_prompt_len=args.prompt_len,
                        mesh=mesh)
        run = lambda: {c.id: c for c in engine.run(examples)}  # noqa: E731  pylint: disable=cell-var-from-loop
        first, best, out = timed(run, args.repeats)
        times.append((first, best))
        engine_tokens.setdefault(name, [out[i].tokens for i, _ in examples])
      rows.append((f"engine {name}", *times[0], times[1][1]))
    match = None
    if not args.skip_torch:
      import torch  # pylint: disable=g-import-not-at-top
      from codit_jax.decoding import torch_reference  # pylint: disable=g-import-not-at-top
      torch.set_num_threads(args.threads)
      torch_dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
      import transformers  # pylint: disable=g-import-not-at-top
      models = [transformers.AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype).eval()
                for p in (post_path, pre_path)]
      prompts = [ids for _, ids in examples]
      call = lambda n: torch_reference.generate(*models, prompts, end_ids=never, vocab_size=args.vocab,  # noqa: E731
                                                max_new_tokens=n)
      first, best, out = timed(lambda: call(args.new_tokens), max(1, args.repeats - 1))
      _, prefill_only, _ = timed(lambda: call(1), max(1, args.repeats - 1))
      rows.append(("pytorch codit", first, best, prefill_only))
      match = np.mean([a == r[0] for a, r in zip(engine_tokens["codit"], out)])

  bandwidth = streaming_bandwidth(jax)
  times = {name: best for name, _, best, _ in rows}
  lines = [f"decode benchmark, {datetime.date.today()}, {machine(jax)}",
           f"model: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
           f"intermediate={args.intermediate} vocab={args.vocab} ({parameters(args) / 1e6:.1f}M parameters "
           f"each), {args.dtype}; batch {args.batch}, prompt {args.prompt_len}, new tokens {args.new_tokens}",
           f"streaming read bandwidth of this machine (jnp.sum over 512 MiB): {bandwidth / 1e9:.1f} GB/s",
           "", "| run | first call s (compile incl.) | best s | tokens/s | prefill s | decode ms/step "
           "| MB read/step | GB/s | of streaming |", "|---|---|---|---|---|---|---|---|---|"]
  for name, first, best, prefill_only in rows:
    step = (best - prefill_only) / max(1, args.new_tokens - 1)
    step_bytes = bytes_per_step(args) * (1 if "direct" in name else 2)
    lines.append(f"| {name} | {first:.2f} | {best:.3f} | {generated / best:.0f} | {prefill_only:.3f} | "
                 f"{step * 1e3:.2f} | {step_bytes / 1e6:.1f} | {step_bytes / step / 1e9:.1f} | "
                 f"{step_bytes / step / bandwidth:.0%} |")
  lines.append("")
  lines.append(f"- CoDIT cost over direct (engine): {times['engine codit'] / times['engine direct']:.2f}x")
  if "pytorch codit" in times:
    lines.append(f"- engine CoDIT speed-up over PyTorch CoDIT: {times['pytorch codit'] / times['engine codit']:.2f}x")
    lines.append(f"- greedy CoDIT rows with identical tokens (engine vs PyTorch): {match:.0%}")
  if args.pair_parallel:
    pair_time = times["engine codit, pair-parallel"]
    lines.append(f"- pair-parallel CoDIT: {times['engine codit'] / pair_time:.2f}x the one-device engine, "
                 f"{pair_time / times['engine direct']:.2f}x direct's time"
                 + (f", {times['pytorch codit'] / pair_time:.2f}x PyTorch" if "pytorch codit" in times else "")
                 + f"; same greedy tokens as the one-device engine: "
                 f"{engine_tokens['codit, pair-parallel'] == engine_tokens['codit']}")
  print_and_record("\n".join(lines), args.record)


def print_and_record(text: str, record: bool) -> None:
  """Prints a benchmark's table; with --record also appends it, with its command, to bench/RESULTS.md."""
  print(text)
  if record:
    command = " ".join(["python", f"bench/{Path(sys.argv[0]).name}", *(a for a in sys.argv[1:] if a != "--record")])
    with (REPO / "bench" / "RESULTS.md").open("a") as f:
      f.write(f"\n```\n{command}\n```\n\n{text}\n")


def parameters(args) -> int:
  d = args.hidden // args.heads
  attention = args.hidden * d * (2 * args.heads + 2 * args.kv_heads)
  return args.layers * (attention + 3 * args.hidden * args.intermediate) + 2 * args.vocab * args.hidden


def bytes_per_step(args) -> int:
  """What one decode step of one model must read: its weights once (the input embedding table
  aside: a step gathers batch rows of it) and the keys/values of the tokens so far, averaged over the run."""
  itemsize = 4 if args.dtype == "float32" else 2
  weights = parameters(args) - args.vocab * args.hidden
  mean_length = args.prompt_len + args.new_tokens / 2
  kv = args.layers * 2 * args.batch * args.kv_heads * (args.hidden // args.heads) * mean_length
  return int((weights + kv) * itemsize)


def streaming_bandwidth(jax, mib: int = 512) -> float:
  """Bytes per second a jitted sum reads from a float32 array of `mib` MiB (best of 5)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  data = jnp.ones((mib * 2**18,), jnp.float32)
  total = jax.jit(jnp.sum)
  total(data).block_until_ready()
  best = float("inf")
  for _ in range(5):
    started = time.perf_counter()
    total(data).block_until_ready()
    best = min(best, time.perf_counter() - started)
  return data.nbytes / best


def cpu_model() -> str:
  """The CPU's model name (Linux: /proc/cpuinfo), else the architecture: VMs of one name differ by it."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine(jax) -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  return f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {cpu_model()}, " \
         f"jax {jax.__version__} on {device.platform} ({kind}), {len(jax.devices())} device(s)"


if __name__ == "__main__":
  main()
