"""The continuous-batching engine at a real model width, in bfloat16: tokens/s, slot utilization and the
fraction of the memory-bandwidth roofline that its decode steps reach. For an accelerator.

    python bench/real_width.py                          # Llama-3.1-8B dimensions, 4 layers, bfloat16
    python bench/real_width.py --layers=8 --batch=128 --record
    python bench/real_width.py --hidden=256 --heads=4 --kv_heads=2 --intermediate=768 --vocab=2048 \
        --layers=2 --prompts=24 --batch=8 --max_new_tokens=96    # a CPU-sized check that it runs

bench/throughput.py runs codit-generate end to end, which writes TFDS records and
so needs tensorflow; an accelerator image often has jax, flax and transformers
only. This drives the same engine (codit_jax.decoding.engine.Engine) in-process,
on random weights made on the device (no checkpoint files: at 8B width they
would be gigabytes), through the same Decoder the checkpoint loader builds.

Workload: --prompts random prompts, lengths uniform in [16, --prompt_len],
greedy CoDIT, --max_new_tokens at most. As in bench/throughput.py, the
post-trained model's lm_head column of the end token is scaled by --end_scale,
so that responses stop after lengths spread over a wide range while some run
to the cap; the length spread is printed. The default x3.0 was set on CPU at
8B width with one layer (x2.0: none of 8 greedy rows stopped within 64 tokens;
x3.0: 4 of 8 within 96); more layers change the dynamics, so check the spread.
Two runs on the same prompts: cold
(compiles the admit programs and the decode program) and warm (a new Engine
whose programs jax has compiled: what a long run is made of). Then
--alone_checks prompts are decoded again each alone in the warm engine (same
programs, every other slot empty): their tokens and log-probs must equal the
batch's bit for bit, which shows on the chip (its attention kernel included)
that a row does not depend on its neighbours.

Roofline: a decode step must read both models' weights once (the input
embedding tables aside: a step gathers a row per slot) and the keys and values
of every live row up to its length. From the prompt lengths and the tokens
each row emitted, the bytes all steps of the warm run had to read are summed
exactly; over the warm run's wall time that is the bandwidth reached, shown as
a fraction of the device's streaming bandwidth measured here (a jitted sum over
a 2 GiB array) and of the datasheet HBM bandwidth where the device is known.
The wall time includes the admits (prefill), so the fraction is a lower bound
on the decode steps' own.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

# Datasheet HBM bandwidth, bytes/s, by jax device_kind.
HBM_BANDWIDTH = {"NVIDIA H200": 4.8e12, "NVIDIA H100 80GB HBM3": 3.35e12, "NVIDIA A100-SXM4-80GB": 2.04e12,
                 "TPU v4": 1.2e12, "TPU v5 lite": 8.19e11, "TPU v5": 2.76e12, "TPU v6 lite": 1.64e12}
END = 2  # the end token's id in the random vocabulary


def parse_args():
  from decode import add_model_args  # pylint: disable=g-import-not-at-top  (this folder's decode.py)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(parser)  # the model's size and dtype, and --prompt_len: here the longest prompt
  # Llama-3.1-8B: hidden 4096, 32 heads of 128, 8 kv heads, MLP 14336, vocabulary 128256.
  parser.set_defaults(hidden=4096, heads=32, kv_heads=8, intermediate=14336, vocab=128256, layers=4,
                      dtype="bfloat16", batch=64, prompt_len=256)
  parser.add_argument("--prompts", type=int, default=256)
  parser.add_argument("--max_new_tokens", type=int, default=1024)
  parser.add_argument("--chunk_steps", type=int, default=32)
  parser.add_argument("--end_scale", type=float, default=3.0, help="scale of the end token's lm_head column")
  parser.add_argument("--alone_checks", type=int, default=3, help="prompts decoded again alone, to compare")
  parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
  return parser.parse_args()


def random_model(args, seed: int, end_scale: float = 1.0):
  """A Llama Decoder of the given size with random weights made on the default device: matrices
  normal with variance 1/fan-in (activations of order 1 through the layers), norms 1."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from codit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from codit_jax.models.config import ModelConfig  # pylint: disable=g-import-not-at-top
  cfg = ModelConfig.from_hf(transformers.LlamaConfig(
      vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
      num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
      head_dim=args.hidden // args.heads, max_position_embeddings=args.prompt_len + args.max_new_tokens,
      tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=500000.0))
  dtype = checkpoints.DTYPES[args.dtype]
  key = jax.random.key(seed)

  def make(path_parts, shape):
    name = ".".join(map(str, path_parts))
    if len(shape) == 1:
      return jnp.ones(shape, dtype)
    fan_in = shape[-1] if "embed_tokens" in name else shape[0]  # Linear kernels are (in, out)
    w = jax.random.normal(jax.random.fold_in(key, zlib.crc32(name.encode())), shape, jnp.float32) / np.sqrt(fan_in)
    if "lm_head" in name:
      w = w.at[:, END].multiply(end_scale)
    return w.astype(dtype)

  return checkpoints._decoder_from(cfg, args.dtype, make)  # pylint: disable=protected-access


def weight_bytes(model) -> int:
  """Bytes a decode step reads of `model`'s weights: all, the input embedding table aside."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
  return total - model.embed_tokens.embedding[...].nbytes


def kv_bytes_read(args, prompt_lengths, emitted) -> int:
  """Bytes of keys and values all decode steps of both models read. A row that emitted E tokens (its
  end token included) ran E - 1 decode steps after its first token (drawn at admission); the step
  that takes its t-th token reads its prompt and t slots."""
  per_slot = 2 * args.layers * args.kv_heads * (args.hidden // args.heads) * (2 if args.dtype == "bfloat16" else 4)
  slot_reads = sum((e - 1) * p + (e - 1) * e // 2 for p, e in zip(prompt_lengths, emitted))
  return 2 * per_slot * slot_reads  # both models


def attention_path(args, cache_len: int) -> str:
  """Which decode attention the engine's steps run on this device (attention_kernels' own tests)."""
  import jax  # pylint: disable=g-import-not-at-top
  from codit_jax.models import attention_kernels as kernels  # pylint: disable=g-import-not-at-top
  q_shape = (args.batch, args.heads, args.hidden // args.heads)
  kv_shape = (args.batch, args.kv_heads, cache_len, args.hidden // args.heads)
  platform = jax.devices()[0].platform
  if platform == "gpu" and kernels.gpu_kernel_fits(q_shape, kv_shape):
    return "the Pallas GPU decode kernel"
  if platform == "tpu" and kernels.tpu_kernel_fits(q_shape, kv_shape, args.dtype):
    return "the Pallas TPU paged-attention kernel"
  return "XLA (no kernel on this platform for these shapes)"


def alone_equal_batch(engine, examples, completions, count: int) -> tuple[int, int]:
  """(how many of `count` examples, decoded alone in `engine`, equal their batch completion in tokens,
  finish reason and every log-prob, bit for bit; count). The examples are those of median response
  length: long enough to run many steps beside changing neighbours in the batch."""
  by_length = sorted(examples, key=lambda e: len(completions[e[0]].tokens))
  middle = max(0, len(by_length) // 2 - count // 2)
  picked = by_length[middle:middle + count]
  same = 0
  for example in picked:
    (alone,) = list(engine.run([example]))
    batch = completions[example[0]]
    same += (alone.tokens, alone.finish_reason, alone.post_logprobs, alone.pre_logprobs, alone.codit_logprobs) == \
        (batch.tokens, batch.finish_reason, batch.post_logprobs, batch.pre_logprobs, batch.codit_logprobs)
  return same, len(picked)


def main():
  args = parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  from decode import machine, print_and_record, streaming_bandwidth  # pylint: disable=g-import-not-at-top
  from codit_jax.decoding.engine import DecodeSettings, Engine  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  post, pre = random_model(args, 0, args.end_scale), random_model(args, 1)
  jax.block_until_ready((post, pre))
  built = time.perf_counter() - started
  rng = np.random.default_rng(0)
  examples = [(f"q{i}", rng.integers(3, args.vocab, size=int(n)).tolist())
              for i, n in enumerate(rng.integers(16, args.prompt_len + 1, args.prompts))]
  settings = DecodeSettings(vocab_size=args.vocab, end_ids=(END,), temperature=0.0,
                            max_new_tokens=args.max_new_tokens)
  runs = {}
  for phase in ("cold", "warm"):
    engine = Engine(post, pre, settings, batch_size=args.batch, max_prompt_len=args.prompt_len,
                    chunk_steps=args.chunk_steps)
    began = time.perf_counter()
    engine.compile_ahead([len(ids) for _, ids in examples])
    completions = {c.id: c for c in engine.run(examples)}
    # A copy: the alone checks below run on the warm engine and add to its stats.
    runs[phase] = (time.perf_counter() - began, dataclasses.replace(engine.stats), completions)
  seconds, stats, completions = runs["warm"]
  assert [c.tokens for c in completions.values()] == [runs["cold"][2][c].tokens for c in completions]
  alone_same = alone_equal_batch(engine, examples, completions, args.alone_checks)
  lengths = np.array([len(completions[i].tokens) for i, _ in examples])
  at_cap = float(np.mean(lengths >= args.max_new_tokens))
  emitted = [len(completions[i].tokens) + (completions[i].finish_reason == "stop") for i, _ in examples]
  steps = stats.slot_steps // args.batch
  step_bytes = (weight_bytes(post) + weight_bytes(pre)) * steps + kv_bytes_read(
      args, [len(ids) for _, ids in examples], emitted)
  reached = step_bytes / seconds
  streaming = streaming_bandwidth(jax, mib=2048)  # 2 GiB: some 0.4 ms even at HBM speed, well over a launch
  kind = getattr(jax.devices()[0], "device_kind", "")
  datasheet = HBM_BANDWIDTH.get(kind)

  lines = [f"real-width engine benchmark, {datetime.date.today()}, {machine(jax)}",
           f"model: llama hidden={args.hidden} heads={args.heads}/{args.kv_heads} intermediate={args.intermediate} "
           f"vocab={args.vocab} layers={args.layers}, random weights made on the device in {built:.1f} s, "
           f"end-token column x{args.end_scale}; {args.dtype}, greedy CoDIT; {args.prompts} prompts of 16-"
           f"{args.prompt_len} tokens, batch {args.batch}, max_new_tokens {args.max_new_tokens}, "
           f"chunk_steps {args.chunk_steps}; cache of {engine.cache_len} slots, decode attention by "
           f"{attention_path(args, engine.cache_len)}",
           f"response lengths: median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, "
           f"p90 {np.percentile(lengths, 90):.0f}, {at_cap:.0%} of rows at the cap; "
           f"{sum(emitted)} tokens generated (end tokens included)",
           "",
           "| run | wall s | tokens/s | slot utilization | decode steps | ms per step |",
           "|---|---:|---:|---:|---:|---:|"]
  for phase, (wall, run_stats, _) in runs.items():
    waiting = run_stats.utilization_while_waiting
    lines.append(f"| {phase} | {wall:.1f} | {run_stats.generated_tokens / wall:.0f} | {run_stats.utilization:.1%} "
                 + (f"({waiting:.1%} while prompts wait) | " if waiting == waiting else "(no prompt waited) | ")
                 + f"{run_stats.slot_steps // args.batch} | {1e3 * wall / max(1, run_stats.slot_steps // args.batch):.2f} |")
  lines += ["",
            f"- bytes the warm run's decode steps had to read: {step_bytes / 1e9:.1f} GB "
            f"({(weight_bytes(post) + weight_bytes(pre)) / 1e9:.2f} GB of weights a step, both models); "
            f"over its wall time {reached / 1e9:.0f} GB/s",
            f"- decoded alone in the warm engine, {alone_same[0]} of {alone_same[1]} prompts (those with the "
            "median response lengths) gave the batch's tokens and log-probs bit for bit",
            f"- streaming read bandwidth measured here: {streaming / 1e9:.0f} GB/s; the warm run reached "
            f"{reached / streaming:.0%} of it"
            + (f"; datasheet HBM of {kind}: {datasheet / 1e12:.2f} TB/s, {reached / datasheet:.0%} of it"
               if datasheet else "")]
  print_and_record("\n".join(lines), args.record)


if __name__ == "__main__":
  main()
