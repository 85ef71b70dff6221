"""Mixture-of-experts routing (Qwen3-MoE) as pure functions; `decoder.SparseMoeBlock` holds the weights.

Tokens go to their experts rather than every expert to every token. Each
token's top-k (token, expert) assignments are sorted by expert, so that every
expert's rows are contiguous, and a grouped matmul runs each expert on its own
rows only: the work is top_k / num_experts of the dense form (8 / 128 for
Qwen3-30B-A3B), in prefill and in decode alike. Nothing is dropped (no capacity
factor), so the output is transformers' Qwen3MoeSparseMoeBlock for any routing.
Capacity-based dispatch (GShard's (experts, capacity, hidden) buffers) was the
alternative: it either drops the tokens past an expert's capacity, which changes
the teacher's output, or, with a capacity that can never overflow (every token
on one expert), costs as much as the dense form.

The grouped matmul is `jax.lax.ragged_dot` on TPU and GPU, where XLA lowers it
to a grouped-GEMM kernel. XLA:CPU has no ragged-dot instruction and JAX
emulates it there by masking every group against every row, top_k times the
dense form's work; so on CPU the same sorted rows go through a loop over
fixed-size tiles instead, each tile holding rows of one expert, whose work also
scales with the rows routed. bench/moe.py measures all three on CPU.

Expert parallelism (`expert_parallel`): the stacked expert weights are split
over the mesh's 'model' axis. Tokens are already replicated across 'model'
(tensor parallelism all-reduces the attention output), so each device routes
its tokens, runs the assignments that chose one of its own experts, and a psum
over 'model' adds the partial outputs: no all-to-all is needed.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from codit_jax import parallel


def route(x, router_kernel, top_k: int, norm_topk_prob: bool):
  """Each token's top-k experts, (weights float32 (T, k), experts int32 (T, k)), for x (T, hidden).

  As Qwen3MoeTopKRouter: logits in the weights' dtype, softmax in float32 over
  all experts, top-k, renormalised to sum to 1 when `norm_topk_prob`, rounded to
  the activation dtype.
  """
  logits = x @ router_kernel
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  return weights.astype(x.dtype).astype(jnp.float32), experts


def moe_block(x, router_kernel, gate, up, down, *, top_k: int, norm_topk_prob: bool, act: Callable,
              first_expert=0, grouped_mlp: Callable | None = None):
  """float32 output of the sparse MLP for x (..., hidden).

  gate, up: (local experts, hidden, inter); down: (local experts, inter, hidden),
  holding experts first_expert, first_expert + 1, ...: assignments to other
  experts add nothing here (another device holds them).
  """
  shape = x.shape
  tokens = x.reshape(-1, shape[-1])
  weights, experts = route(tokens, router_kernel, top_k, norm_topk_prob)
  out = routed_experts(tokens, weights, experts - first_expert, gate, up, down, act, grouped_mlp)
  return out.reshape(shape)


def routed_experts(x, weights, experts, gate, up, down, act: Callable, grouped_mlp: Callable | None = None):
  """sum_j weights[t, j] * expert_{experts[t, j]}(x[t]), float32 (T, hidden); ids outside [0, local experts) add 0."""
  num_tokens, top_k = experts.shape
  num_experts = gate.shape[0]
  expert_of_row = experts.reshape(-1)  # one row per assignment: row t * top_k + j
  is_local = (expert_of_row >= 0) & (expert_of_row < num_experts)
  # Other devices' assignments sort last, outside every group (bincount drops the id num_experts).
  group_key = jnp.where(is_local, expert_of_row, num_experts)
  order = jnp.argsort(group_key, stable=True)
  group_sizes = jnp.bincount(group_key, length=num_experts).astype(jnp.int32)
  grouped_mlp = grouped_mlp or grouped_expert_mlp
  out_sorted = grouped_mlp(x[order // top_k], group_sizes, gate, up, down, act=act)
  inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
  out = out_sorted[inverse].astype(jnp.float32)
  combine = jnp.where(is_local, weights.reshape(-1), 0.0)
  out = jnp.where(is_local[:, None], out, 0.0) * combine[:, None]  # where, not *: never trust rows outside groups
  return out.reshape(num_tokens, top_k, -1).sum(axis=1)


def grouped_expert_mlp(rows, group_sizes, gate, up, down, *, act: Callable):
  """Expert g's SwiGLU on rows sum(group_sizes[:g]) ... + group_sizes[g] - 1 of `rows` (sorted by expert)."""
  return jax.lax.platform_dependent(
      rows, group_sizes, gate, up, down,
      cpu=functools.partial(tiled_expert_mlp, act=act),
      default=functools.partial(ragged_expert_mlp, act=act))


def ragged_expert_mlp(rows, group_sizes, gate, up, down, *, act: Callable):
  """Grouped SwiGLU with jax.lax.ragged_dot: a grouped-GEMM kernel on TPU and GPU."""
  h = act(jax.lax.ragged_dot(rows, gate, group_sizes)) * jax.lax.ragged_dot(rows, up, group_sizes)
  return jax.lax.ragged_dot(h, down, group_sizes)


def tiled_expert_mlp(rows, group_sizes, gate, up, down, *, act: Callable, tile: int | None = None):
  """Grouped SwiGLU as a loop over tiles of `tile` rows, each of one expert (for XLA:CPU).

  Each group is padded to whole tiles in a buffer, so a tile never mixes
  experts; the loop runs over the tiles in use only, a number that depends on
  the routing, so the work follows the rows routed and not the experts held.
  (A while loop: fine for inference; training differentiates ragged_dot.)
  """
  num_rows, num_groups = rows.shape[0], group_sizes.shape[0]
  tile = tile or tile_rows(num_rows, num_groups)
  # Every non-empty group wastes less than one tile: a static bound on the tiles.
  max_tiles = -(-num_rows // tile) + min(num_groups, num_rows)
  group_tiles = (group_sizes + tile - 1) // tile
  tile_ends = jnp.cumsum(group_tiles)
  group_ends = jnp.cumsum(group_sizes)
  row = jnp.arange(num_rows)
  group_of_row = jnp.searchsorted(group_ends, row, side="right")  # num_groups for rows in no group
  group = jnp.minimum(group_of_row, num_groups - 1)
  slot = (tile_ends[group] - group_tiles[group]) * tile + row - (group_ends[group] - group_sizes[group])
  slot = jnp.where(group_of_row < num_groups, slot, max_tiles * tile)  # out of range: dropped / filled
  buffer = jnp.zeros((max_tiles * tile, rows.shape[1]), rows.dtype).at[slot].set(rows, mode="drop")
  group_of_tile = jnp.searchsorted(tile_ends, jnp.arange(max_tiles), side="right")

  def one_tile(t, out):
    g = group_of_tile[t]
    block = jax.lax.dynamic_slice_in_dim(buffer, t * tile, tile)
    h = act(block @ gate[g]) * (block @ up[g])
    return jax.lax.dynamic_update_slice_in_dim(out, h @ down[g], t * tile, axis=0)

  out = jax.lax.fori_loop(0, tile_ends[-1], one_tile, jnp.zeros((max_tiles * tile, down.shape[-1]), rows.dtype))
  return out.at[slot].get(mode="fill", fill_value=0)


def tile_rows(num_rows: int, num_groups: int) -> int:
  """Tile height: the mean rows per expert rounded up to a power of two, within [8, 256].

  Decode (few rows per expert) gets small tiles, so padding wastes little;
  prefill gets tall ones, so each step is a matmul worth its loop overhead.
  """
  mean = max(1, num_rows // max(1, num_groups))
  return min(256, max(8, 1 << (mean - 1).bit_length()))


def dense_experts(x, weights, experts, gate, up, down, act: Callable):
  """Every expert on every token, weighted by its routing weight (0 outside the top-k).

  The form routing is measured against (bench/moe.py), and a second opinion in
  tests: num_experts / top_k times the work of `routed_experts`.
  """
  combine = jnp.sum(jax.nn.one_hot(experts, gate.shape[0], dtype=jnp.float32) * weights[..., None], axis=1)
  h = act(jnp.einsum("th,ehi->eti", x, gate)) * jnp.einsum("th,ehi->eti", x, up)
  out = jnp.einsum("eti,eih->eth", h, down)
  return jnp.einsum("eth,te->th", out.astype(jnp.float32), combine)


def expert_parallel(block: Callable, mesh: Mesh) -> Callable:
  """`block(x, router_kernel, gate, up, down, first_expert=...)` with experts split over 'model'.

  The batch (x's first dimension) is split over 'data' where 'data' divides it,
  as `parallel.batch_sharding` places it; the router is replicated.
  """

  def local(x, router_kernel, gate, up, down):
    first_expert = jax.lax.axis_index(parallel.MODEL) * gate.shape[0]
    return jax.lax.psum(block(x, router_kernel, gate, up, down, first_expert=first_expert), parallel.MODEL)

  def run(x, router_kernel, gate, up, down):
    x_spec = parallel.fit_spec((parallel.DATA,), x.shape, mesh)
    experts = P(parallel.MODEL)
    return jax.shard_map(local, mesh=mesh, in_specs=(x_spec, P(), experts, experts, experts), out_specs=x_spec,
                         check_vma=False)(x, router_kernel, gate, up, down)

  return run
