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
  from codit_jax.decoding import engine  # pylint: disable=g-import-not-at-top
  from codit_jax.models import KVCache, decode_step, decoder  # pylint: disable=g-import-not-at-top

  args.new_tokens = args.max_new_tokens
  with tempfile.TemporaryDirectory() as tmp:
    post_path, _ = build_pair(args, Path(tmp))
    model = checkpoints.load_model(post_path, args.dtype)
  length = decoder.cache_length(args.prompt_len + args.max_new_tokens)

  def cache_at(fill: int, block: int) -> KVCache:
    """Every row at slot `fill`, the cache in blocks of `block` slots as the decoder keeps it then
    (zeros: a step's cost does not depend on the values)."""
    saved, decoder.DECODE_BLOCK = decoder.DECODE_BLOCK, block
    try:
      cache = engine._empty_cache(model, args.batch, length, stacked=False)  # pylint: disable=protected-access
    finally:
      decoder.DECODE_BLOCK = saved
    return cache._replace(index=jnp.full((args.batch,), fill, jnp.int32))

  def compiled_steps():
    """A new function each time: jit caches traces per function, and DECODE_BLOCK is read when tracing."""
    def steps(model, cache):
      def one(_, carry):
        token, cache = carry
        logits, cache = decode_step(model, token, cache)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache
      return jax.lax.fori_loop(0, args.steps, one, (jnp.zeros((args.batch,), jnp.int32), cache))[0]
    return jax.jit(steps)

  block, whole_block = decoder.DECODE_BLOCK, length + 1  # one block past the cache: read it whole
  blocked = compiled_steps()
  blocked(model, cache_at(args.prompt_len, block)).block_until_ready()
  saved, decoder.DECODE_BLOCK = decoder.DECODE_BLOCK, whole_block  # traced (once) reading the whole cache
  whole = compiled_steps()
  whole(model, cache_at(args.prompt_len, whole_block)).block_until_ready()
  decoder.DECODE_BLOCK = saved

  rows = []
  for fill in [int(f) for f in args.fills.split(",") if int(f) + args.steps <= length]:
    caches = {whole: cache_at(fill, whole_block), blocked: cache_at(fill, block)}
    times = [timed(lambda f=f: f(model, caches[f]).block_until_ready(), args.repeats)[1] / args.steps  # noqa: B023
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
