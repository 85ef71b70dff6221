"""Routed mixture of experts against the dense form, one Qwen3-30B-A3B MoE layer, side by side.

    python bench/moe.py                    # the table recorded in bench/RESULTS.md
    python bench/moe.py --tokens=1,64 --reps=5

Shapes are the real layer's: hidden 2048, 128 experts of width 768, top 8, in
float32 (XLA:CPU has no fast bfloat16 matmul). Columns, for the same tokens and
router: `dense` runs every expert on every token and weights the outputs (0
outside the top 8); `routed` is what the model runs (models/moe.py: sort the
(token, expert) assignments by expert, grouped SwiGLU; on CPU a loop over
one-expert tiles); `ragged_dot` is the grouped matmul TPU and GPU get, which
XLA:CPU emulates densely (every expert against every assignment), shown to say
why CPU takes the tile loop. Decode is a batch of rows of one token each;
prefill is a batch of prompt tokens: to one MoE layer both are just tokens.
Each time is the median over --reps calls after one compiling call.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from codit_jax.models import moe  # noqa: E402
from decode import machine  # noqa: E402  (bench/, the script's folder)

HIDDEN, EXPERTS, EXPERT_WIDTH, TOP_K = 2048, 128, 768, 8


def _layer(key):
  k_router, k_gate, k_up, k_down = jax.random.split(key, 4)
  init = lambda k, shape: jax.random.normal(k, shape, jnp.float32) / np.sqrt(shape[-2])  # noqa: E731
  return (init(k_router, (HIDDEN, EXPERTS)), init(k_gate, (EXPERTS, HIDDEN, EXPERT_WIDTH)),
          init(k_up, (EXPERTS, HIDDEN, EXPERT_WIDTH)), init(k_down, (EXPERTS, EXPERT_WIDTH, HIDDEN)))


def _forms():
  act = jax.nn.silu

  def dense(x, router, gate, up, down):
    weights, experts = moe.route(x, router, TOP_K, True)
    return moe.dense_experts(x, weights, experts, gate, up, down, act)

  def routed(x, router, gate, up, down, grouped_mlp=None):
    weights, experts = moe.route(x, router, TOP_K, True)
    return moe.routed_experts(x, weights, experts, gate, up, down, act, grouped_mlp)

  return {"dense": jax.jit(dense), "routed": jax.jit(routed),
          "ragged_dot": jax.jit(functools.partial(routed, grouped_mlp=moe.ragged_expert_mlp))}


def _median_seconds(fn, args, reps):
  out = jax.block_until_ready(fn(*args))  # compiles
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tokens", default="1,8,64,512", help="token counts, comma separated")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--ragged_max_tokens", type=int, default=8,
                      help="time the ragged_dot column up to this many tokens (on CPU it costs 8x dense)")
  args = parser.parse_args()
  layer = _layer(jax.random.key(0))
  forms = _forms()
  print(f"# MoE layer: hidden {HIDDEN}, {EXPERTS} experts x {EXPERT_WIDTH}, top {TOP_K}, float32")
  print(f"# {datetime.date.today()}  {machine(jax)}  load average {os.getloadavg()[0]:.2f}")
  print(f"{'tokens':>7} {'dense ms':>10} {'routed ms':>10} {'dense/routed':>13} {'ragged_dot ms':>14} "
        f"{'max|routed-dense|':>18}")
  for tokens in [int(t) for t in args.tokens.split(",")]:
    x = jax.random.normal(jax.random.key(tokens), (tokens, HIDDEN), jnp.float32)
    dense_s, dense_out = _median_seconds(forms["dense"], (x, *layer), args.reps)
    routed_s, routed_out = _median_seconds(forms["routed"], (x, *layer), args.reps)
    ragged = "-"
    if tokens <= args.ragged_max_tokens:
      ragged_s, ragged_out = _median_seconds(forms["ragged_dot"], (x, *layer), args.reps)
      assert np.allclose(ragged_out, dense_out, atol=1e-3), "ragged_dot and dense disagree"
      ragged = f"{ragged_s * 1e3:.1f}"
    diff = float(jnp.max(jnp.abs(routed_out - dense_out)))
    print(f"{tokens:>7} {dense_s * 1e3:>10.1f} {routed_s * 1e3:>10.1f} {dense_s / routed_s:>12.1f}x "
          f"{ragged:>14} {diff:>18.2e}")


if __name__ == "__main__":
  main()
