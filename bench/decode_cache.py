"""Decode-step time against how full the KV cache is: visible blocks only, against the whole cache.

    python bench/decode_cache.py                  # 7.3M-parameter model, batch 16, cache for 64 + 4096 tokens

The engine sizes a batch's cache for prompt + max_new_tokens (4096 by default),
but most responses end long before that, and the loop stops when the batch's
last row ends. A decode step reads the cache by DECODE_BLOCK-slot blocks, only
those that can hold a visible key (models/decoder.py); this times one step of
one model at several fill levels against the same step reading the whole cache
(DECODE_BLOCK set past the cache length, the earlier behaviour). Prints a table;
--record appends it to bench/RESULTS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args():
  from decode import add_model_args  # pylint: disable=g-import-not-at-top  (this folder's decode.py)
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_model_args(parser)
  parser.add_argument("--max_new_tokens", type=int, default=4096)
  parser.add_argument("--fills", default="128,512,1024,2048,4096", help="cache slots in use when timing")
  parser.add_argument("--steps", type=int, default=32, help="decode steps per timed call")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
  return parser.parse_args()


def main():
  args = parse_args()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from decode import build_pair, machine, parameters, print_and_record, timed  # pylint: disable=g-import-not-at-top
  from codit_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from codit_jax.models import KVCache, decode_step, decoder  # pylint: disable=g-import-not-at-top

  args.new_tokens = args.max_new_tokens
  with tempfile.TemporaryDirectory() as tmp:
    post_path, _ = build_pair(args, Path(tmp))
    model = checkpoints.load_model(post_path, args.dtype)
  cfg = model.cfg
  length = decoder.cache_length(args.prompt_len + args.max_new_tokens)
  dtype = jnp.float32 if args.dtype == "float32" else jnp.bfloat16

  def cache_at(fill: int) -> KVCache:
    shape_k = (args.batch, *decoder.key_cache_shape(cfg.num_kv_heads, cfg.head_dim, length))
    shape_v = (args.batch, cfg.num_kv_heads, length, cfg.head_dim)
    return KVCache(keys=tuple(jnp.zeros(shape_k, dtype) for _ in range(cfg.num_layers)),
                   values=tuple(jnp.zeros(shape_v, dtype) for _ in range(cfg.num_layers)),
                   key_valid=jnp.arange(length)[None, :].repeat(args.batch, 0) < fill,
                   next_position=jnp.full((args.batch,), fill, jnp.int32), index=jnp.full((args.batch,), fill, jnp.int32))

  def compiled_steps():
    """A new function each time: jit caches traces per function, and DECODE_BLOCK is read when tracing."""
    def steps(model, cache):
      def one(_, carry):
        token, cache = carry
        logits, cache = decode_step(model, token, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache
      return jax.lax.fori_loop(0, args.steps, one, (jnp.zeros((args.batch,), jnp.int32), cache))[0]
    return jax.jit(steps)

  blocked = compiled_steps()
  blocked(model, cache_at(args.prompt_len)).block_until_ready()
  saved, decoder.DECODE_BLOCK = decoder.DECODE_BLOCK, length + 1  # one block past the cache: read it whole
  whole = compiled_steps()
  whole(model, cache_at(args.prompt_len)).block_until_ready()
  decoder.DECODE_BLOCK = saved

  rows = []
  for fill in [int(f) for f in args.fills.split(",") if int(f) + args.steps <= length]:
    cache = cache_at(fill)
    times = [timed(lambda f=f: f(model, cache).block_until_ready(), args.repeats)[1] / args.steps  # noqa: B023
             for f in (whole, blocked)]
    rows.append((fill, *times))

  lines = [f"decode cache benchmark, {datetime.date.today()}, {machine(jax)}",
           f"model: llama hidden={args.hidden} layers={args.layers} heads={args.heads}/{args.kv_heads} "
           f"intermediate={args.intermediate} vocab={args.vocab} ({parameters(args) / 1e6:.1f}M parameters), "
           f"{args.dtype}; batch {args.batch}; cache {length} slots (prompt {args.prompt_len} + "
           f"{args.max_new_tokens} new, whole {decoder.DECODE_BLOCK}-slot blocks)",
           "", "| slots in use | whole cache ms/step | visible blocks ms/step | speed-up |", "|---:|---:|---:|---:|"]
  lines += [f"| {fill} | {w * 1e3:.2f} | {b * 1e3:.2f} | {w / b:.2f}x |" for fill, w, b in rows]
  print_and_record("\n".join(lines), args.record)


if __name__ == "__main__":
  main()
