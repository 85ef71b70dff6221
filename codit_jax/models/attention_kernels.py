"""Decode attention (one query per row, each row its own visible slot range) through the
kernels JAX ships, for continuous batching on accelerators.

A decode step's query of row r sees the contiguous cache slots [start[r], end[r]):
start is 0 (every row's sequence starts at slot 0), or index - window + 1 for a
sliding-window layer, whichever is later; end = index + 1 (exclusive, as the
kernel's `kv_seq_len`): `decoder.visible_range`.

Cache layouts (chosen once per backend, at trace time: `cache_layout()`):
  * "transposed" (CPU): keys (b, kv_heads, head_dim, L), values (b, kv_heads, L, head_dim),
    the layout `decoder.attend_step` is tuned for on XLA:CPU.
  * "kernel" (GPU, TPU): keys and values both (b, kv_heads, L, head_dim). This is the
    layout `jax.experimental.pallas.ops.gpu.decode_attention` works on inside: its
    `gqa` takes (b, L, kv_heads, d) and swaps axes 1 and 2 itself, so we hand it
    swapaxes(cache, 1, 2) and XLA folds the two transposes away (no copy of the
    cache; `test_no_cache_transpose_in_hlo`). The transposed key layout cannot be
    given to the kernel without a copy of the whole cache each step.

`jax.lax.platform_dependent` traces every branch, so its branches must accept the
same shapes: the layout is picked by the caller at trace time, and
platform_dependent only chooses, within the kernel layout, between the Pallas GPU
kernel (cuda), the Pallas TPU kernel (tpu) and the pure-jnp reference (cpu, others).

On TPU, `jax.experimental.pallas.ops.tpu.paged_attention` reads each row's keys
[0, length) page by page, skipping rows of length 0. The kernel layout needs no
copy to be paged: folding the kv heads into the rows, a cache (b, kv_heads, L, d)
is reshaped for free into b * kv_heads sequences of L / page pages of (page, d),
sequence r's pages r * L/page ... (r + 1) * L/page - 1 (`tpu_kernel_decode_attention`).
The kernel casts the cache it loads to bfloat16 whatever its dtype, so a float32
cache (CPU tests, --dtype=float32 runs) keeps the reference, which computes in
float32; and it reads from slot 0, so a layer whose window is shorter than the
cache keeps it too (such a layer has a ring buffer, which no kernel reads:
decoder.Attention). `ops.tpu.ragged_paged_attention` would take windows, but
wants K and V interleaved on the head axis of one combined cache: a copy.

On a mesh (a model loaded with one: `decoder.use_sharded_decode_attention`), the
kernel runs under jax.shard_map (`shard_over_mesh`): XLA cannot partition its
custom call, and left to itself gathers the whole cache onto every device at every
step, each device then running the whole batch. Shard_mapped, each device runs the
kernel on its own rows (batch over 'data') and, where 'model' divides the kv heads,
its own heads, with no collective. vmap (pair_parallel's, over the 'pair' axis)
adds its axis to the shard_map; under it, the TPU kernel takes the pair's rows as
more rows of one call (`_pair_axis_as_rows`). The reference needs no shard_map: XLA
partitions it.

Tests run either kernel on CPU in Pallas interpret mode (`interpret=`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.gpu import decode_attention as gpu_decode_attention
from jax.sharding import Mesh, PartitionSpec as P

from codit_jax import parallel

TRANSPOSED = "transposed"
KERNEL = "kernel"

# Same value and role as decoder._MASKED (not imported: the decoder will import this module).
_MASKED = float(np.finfo(np.float32).min)
# Same as decoder.DECODE_BLOCK: the reference reads the cache in blocks of this many slots.
REFERENCE_BLOCK = 256

# The GPU kernel's tiles (Triton): query heads padded to blocks of 16 per kv head;
# each of k_splits parallel pieces of the cache is read block_k slots at a time.
# Triton block shapes must be powers of two, hence the constraints in `gpu_kernel_fits`.
GPU_BLOCK_H = 16
GPU_BLOCK_K = 128
GPU_MAX_SPLIT = 512  # slots per split at most: at L = 4096, 8 splits per (row, kv head)

# The TPU kernel's pages: each is one DMA of (page, head_dim) from HBM into VMEM, double-buffered.
# (8, 128) tiles want head_dim a multiple of 128 and a page a multiple of 16 rows for bfloat16; pages
# of 128 to 512 slots, a power of two, as JetStream and MaxText use. One page per compute block: a
# row's last block then reads at most page - 1 slots past its length.
TPU_MIN_PAGE = 128
TPU_MAX_PAGE = 512

# Where `kernel_layout_decode_attention` runs a kernel in Pallas interpret mode on any platform (tests).
INTERPRET_MODES = (None, "gpu", "tpu")


def cache_layout(backend: str | None = None) -> str:
  """The decode cache layout for `backend` (default: jax.default_backend())."""
  backend = backend or jax.default_backend()
  return TRANSPOSED if backend == "cpu" else KERNEL


def key_slot_axis(layout: str) -> int:
  """The slot axis of the key cache (b, kv_heads, ., .) in `layout`: write_slot's axis for keys."""
  return 3 if layout == TRANSPOSED else 2


def keys_to_layout(keys_bkld, layout: str):
  """Keys (b, kv_heads, L, d) (the kernel layout) in `layout`."""
  return jnp.swapaxes(keys_bkld, 2, 3) if layout == TRANSPOSED else keys_bkld


def _power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def gpu_split(slots: int) -> int | None:
  """Slots per split of the GPU kernel for a cache of `slots`: the largest power of two
  that divides it, at most GPU_MAX_SPLIT; None if under 16 (the kernel's minimum)."""
  split = min(slots & -slots, GPU_MAX_SPLIT)
  return split if split >= 16 else None


def gpu_kernel_fits(q_shape, kv_shape) -> bool:
  """Whether the Pallas GPU decode kernel takes these shapes: head_dim a power of two
  >= 16 (Triton tiles), kv_heads dividing heads, a cache length with a split (`gpu_split`)."""
  _, h, d = q_shape
  _, kv_heads, slots, d_kv = kv_shape
  return (d == d_kv and _power_of_two(d) and d >= 16 and h % kv_heads == 0
          and gpu_split(slots) is not None)


def gpu_kernel_decode_attention(q, keys, values, start, end, *, scale: float, interpret: bool = False):
  """The Pallas GPU kernel (`decode_attention.gqa`) on the kernel layout.

  q: (b, h, d); keys, values: (b, kv_heads, L, d); start, end: (b,) int32, keys [start, end).
  Rows with start >= end give 0s. No soft cap. q is cast to the cache dtype (Triton's dots
  take one input dtype); the result is in values' dtype.
  """
  slots = keys.shape[2]
  split = gpu_split(slots)
  out = gpu_decode_attention.gqa(
      q.astype(keys.dtype), jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2),
      start.astype(jnp.int32), end.astype(jnp.int32),
      sm_scale=float(scale), block_h=GPU_BLOCK_H, block_k=min(GPU_BLOCK_K, split),
      k_splits=slots // split, interpret=interpret)
  return out.astype(values.dtype)


def tpu_page(slots: int) -> int | None:
  """Slots per page of the TPU kernel for a cache of `slots`: the largest power of two that divides
  it, at most TPU_MAX_PAGE; None if under TPU_MIN_PAGE."""
  page = min(slots & -slots, TPU_MAX_PAGE)
  return page if page >= TPU_MIN_PAGE else None


def tpu_kernel_fits(q_shape, kv_shape, dtype, window: int | None = None) -> bool:
  """Whether the Pallas TPU paged-attention kernel computes this decode attention as the reference
  does: head_dim a multiple of 128, kv_heads dividing heads, a cache of whole pages (`tpu_page`) in
  bfloat16 (the kernel casts what it loads to bfloat16: a float32 cache would lose precision), and
  no window shorter than the cache (the kernel reads every row from slot 0)."""
  _, h, d = q_shape
  _, kv_heads, slots, d_kv = kv_shape
  return (d == d_kv and d % 128 == 0 and h % kv_heads == 0 and jnp.dtype(dtype) == jnp.bfloat16
          and tpu_page(slots) is not None and (window is None or window >= slots))


def tpu_kernel_decode_attention(q, keys, values, start, end, *, scale: float, softcap: float | None = None):
  """The Pallas TPU kernel (`ops.tpu.paged_attention`) on the kernel layout.

  q: (b, h, d); keys, values: (b, kv_heads, L, d); start, end: (b,) int32, keys [start, end), where
  start is 0 for every row with start < end (`tpu_kernel_fits`: no window shorter than the cache).
  Rows with start >= end give 0s. Returns (b, h, d) in values' dtype.

  Each (row, kv head) is one of the kernel's sequences, with its query heads as the group: the
  cache reshaped to (1 kv head, b * kv_heads * L/page pages, page, d) is the same buffer, and
  sequence r's pages are r * L/page onwards. The kernel has no scale argument: q is scaled here, in
  float32, and stays float32 (the kernel computes scores in float32 against its bfloat16 keys).
  """
  # Imported here: Pallas' TPU module costs ~0.2 s at start-up, and only a TPU (or a test) traces this.
  from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention  # pylint: disable=g-import-not-at-top
  b, h, d = q.shape
  kv_heads, slots = keys.shape[1], keys.shape[2]
  page = tpu_page(slots)
  pages, sequences = slots // page, b * kv_heads
  q = (q.astype(jnp.float32) * scale).reshape(sequences, h // kv_heads, d)
  as_pages = lambda cache: cache.reshape(1, sequences * pages, page, d)  # noqa: E731
  lengths = jnp.repeat(jnp.where(start < end, end, 0).astype(jnp.int32), kv_heads)
  page_indices = jnp.arange(sequences * pages, dtype=jnp.int32).reshape(sequences, pages)
  out = paged_attention(q, as_pages(keys), as_pages(values), lengths, page_indices,
                        attn_logits_soft_cap=softcap, pages_per_compute_block=1)
  out = jnp.where((lengths > 0)[:, None, None], out, 0.0)  # empty rows: 0s, as the reference gives
  return out.reshape(b, h, d).astype(values.dtype)


def _pair_axis_as_rows(kernel):
  """`kernel(q, keys, values, start, end)` whose vmap (pair_parallel's, over the pair) is one call on
  the pairs' rows stacked: the rows are independent, and a Pallas call with scalar-prefetched lengths
  has no batching rule of its own that keeps it one kernel."""
  kernel = jax.custom_batching.custom_vmap(kernel)

  @kernel.def_vmap
  def _(axis_size, in_batched, *args):
    args = [x if batched else jnp.broadcast_to(x, (axis_size, *x.shape)) for x, batched in zip(args, in_batched)]
    out = kernel(*(x.reshape(axis_size * x.shape[1], *x.shape[2:]) for x in args))
    return out.reshape(axis_size, -1, *out.shape[1:]), True

  return kernel


def reference_decode_attention(q, keys, values, start, end, *, scale: float, softcap: float | None = None,
                               block: int = REFERENCE_BLOCK):
  """Pure-jnp decode attention on the kernel layout, float32 scores and softmax.

  q: (b, h, d); keys, values: (b, kv_heads, L, d); start, end: (b,), keys [start, end).
  A cache of more than one whole number of `block`s is read block by block, only over
  the blocks that hold a key some row sees (rows with start >= end do not count), with
  an online softmax: a step's cost follows the rows' ranges, not L (as decoder.attend_step).
  Rows with start >= end give 0s, as the GPU kernel does. Returns (b, h, d) in q's dtype.
  """
  b, h, d = q.shape
  kv_heads, slots = keys.shape[1], keys.shape[2]
  q = q.reshape(b, kv_heads, h // kv_heads, d).astype(jnp.float32)
  start, end = start.astype(jnp.int32), end.astype(jnp.int32)
  nonempty = start < end

  def scores_of(first_slot, size):
    k = jax.lax.dynamic_slice_in_dim(keys, first_slot, size, axis=2).astype(jnp.float32)
    s = jnp.einsum("bkgd,bktd->bkgt", q, k) * scale
    if softcap:
      s = jnp.tanh(s / softcap) * softcap
    slot = first_slot + jnp.arange(size)
    seen = (slot[None, :] >= start[:, None]) & (slot[None, :] < end[:, None])
    return jnp.where(seen[:, None, None, :], s, _MASKED)

  if slots <= block or slots % block:
    probs = jax.nn.softmax(scores_of(0, slots), axis=-1)
    out = jnp.einsum("bkgt,bktd->bkgd", probs, values.astype(jnp.float32))
  else:
    big = jnp.iinfo(jnp.int32).max
    first = jnp.min(jnp.where(nonempty, start // block, big))
    last = jnp.max(jnp.where(nonempty, (end - 1) // block + 1, 0))

    def one_block(i, carry):
      top, total, acc = carry
      s = scores_of(i * block, block)
      new_top = jnp.maximum(top, jnp.max(s, axis=-1))
      rescale = jnp.exp(top - new_top)
      p = jnp.exp(s - new_top[..., None])
      v = jax.lax.dynamic_slice_in_dim(values, i * block, block, axis=2).astype(jnp.float32)
      total = total * rescale + jnp.sum(p, axis=-1)
      acc = acc * rescale[..., None] + jnp.einsum("bkgt,bktd->bkgd", p, v)
      return new_top, total, acc

    init = (jnp.full(q.shape[:-1], _MASKED, jnp.float32), jnp.zeros(q.shape[:-1], jnp.float32),
            jnp.zeros(q.shape, jnp.float32))
    _, total, acc = jax.lax.fori_loop(jnp.minimum(first, last), last, one_block, init)
    out = acc / jnp.where(total > 0, total, 1.0)[..., None]
  out = jnp.where(nonempty[:, None, None, None], out, 0.0)
  return out.reshape(b, h, d).astype(values.dtype)


def kernel_layout_decode_attention(q, keys, values, start, end, *, scale: float,
                                   softcap: float | None = None, window: int | None = None,
                                   interpret: str | None = None, mesh: Mesh | None = None):
  """Decode attention on the kernel layout: the Pallas GPU kernel on CUDA, the Pallas TPU kernel on
  TPU, the reference elsewhere.

  q: (b, 1, h, d) (a decode step's query, as decoder.Attention has it) or (b, h, d);
  keys, values: (b, kv_heads, L, d); start, end: (b,) int, each row sees slots
  [start, end) (end exclusive: index + 1); window: the layer's sliding window, if any
  (start is then index - window + 1 where positive). Returns q's shape, in values' dtype.

  Where a kernel does not compute what the reference does (`gpu_kernel_fits`, and a soft
  cap, for the GPU kernel; `tpu_kernel_fits` for the TPU kernel), its platform runs the
  reference. interpret="gpu" or "tpu" runs that kernel in Pallas interpret mode on any
  platform, instead of the platform choice (tests). With a `mesh`, each device runs the
  kernel on its own rows and heads (`shard_over_mesh`).
  """
  if interpret not in INTERPRET_MODES:
    raise ValueError(f"interpret must be one of {INTERPRET_MODES}, got {interpret!r}")
  shape = q.shape
  q3 = q.reshape(shape[0], shape[-2], shape[-1])
  reference = functools.partial(reference_decode_attention, scale=scale, softcap=softcap)

  def on_mesh(kernel):
    # Only the kernels are shard_mapped: XLA cannot partition their custom calls, but it does
    # partition the reference (plain jnp), which so stays the same program as without a mesh.
    return kernel if mesh is None else shard_over_mesh(kernel, mesh, q3.shape, keys.shape)

  gpu, tpu = reference, reference
  if not softcap and gpu_kernel_fits(q3.shape, keys.shape):
    gpu = on_mesh(functools.partial(gpu_kernel_decode_attention, scale=scale, interpret=interpret == "gpu"))
  if tpu_kernel_fits(q3.shape, keys.shape, keys.dtype, window):
    tpu = on_mesh(_pair_axis_as_rows(functools.partial(tpu_kernel_decode_attention, scale=scale, softcap=softcap)))
  operands = (q3, keys, values, start, end)
  if interpret == "gpu":
    out = gpu(*operands)
  elif interpret == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top  (tests only)
    with pltpu.force_tpu_interpret_mode():  # read when the kernel's pallas_call is traced: now
      out = tpu(*operands)
  else:
    out = jax.lax.platform_dependent(*operands, cuda=gpu, tpu=tpu, default=reference)
  return out.astype(values.dtype).reshape(shape)


class MeshSpecs(NamedTuple):
  """Where the decode kernel's operands lie on a mesh, each device holding its own rows and heads."""

  query: P  # q (b, h, d)
  cache: P  # keys, values (b, kv_heads, L, d), and a step's new entries (b, kv_heads, 1, d)
  rows: P  # start, end (b,)


def mesh_specs(mesh: Mesh, batch: int, heads: int, kv_heads: int) -> MeshSpecs:
  """Rows over 'data' where 'data' divides the batch; heads over 'model' where it divides both the
  query heads and the kv heads, else all heads on every device (replicated over 'model').

  Split, device j holds query heads [j h/m, (j + 1) h/m) and kv heads [j kv/m, (j + 1) kv/m),
  as q_proj, k_proj and the engine's caches (`engine._state_specs`) place them, and those are
  the kv heads its query heads use (head i uses kv head i // (h / kv)).
  """
  rows = parallel.fit_spec((parallel.DATA,), (batch,), mesh)[0]
  model = mesh.shape[parallel.MODEL]
  heads_axis = parallel.MODEL if model > 1 and heads % model == 0 and kv_heads % model == 0 else None
  return MeshSpecs(query=P(rows, heads_axis, None), cache=P(rows, heads_axis, None, None), rows=P(rows))


def shard_over_mesh(kernel, mesh: Mesh, q_shape, kv_shape):
  """`kernel(q, keys, values, start, end)` under jax.shard_map, each device on its own rows and
  heads (`mesh_specs`): they need nothing of the other devices', so there is no collective."""
  (batch, heads, _), kv_heads = q_shape, kv_shape[1]
  specs = mesh_specs(mesh, batch, heads, kv_heads)
  # check_vma=False: the kernels' pallas_calls declare their outputs without the mesh axes they vary over.
  return jax.shard_map(kernel, mesh=mesh, in_specs=(specs.query, specs.cache, specs.cache, specs.rows, specs.rows),
                       out_specs=specs.query, check_vma=False)


def transposed_reference_decode_attention(q, keys, values, start, end, *, scale: float,
                                          softcap: float | None = None):
  """The same attention on the CPU ("transposed") layout, keys (b, kv_heads, d, L): dense, for
  `decode_attention`'s completeness; the decoder's CPU path is its own `attend_step`."""
  return reference_decode_attention(q, jnp.swapaxes(keys, 2, 3), values, start, end, scale=scale,
                                    softcap=softcap, block=keys.shape[-1])


def decode_attention(q, keys, values, start, end, *, scale: float, softcap: float | None = None,
                     window: int | None = None, layout: str, interpret: str | None = None):
  """Decode attention for a cache in `layout` (`cache_layout()`); see kernel_layout_decode_attention."""
  if layout == KERNEL:
    return kernel_layout_decode_attention(q, keys, values, start, end, scale=scale, softcap=softcap,
                                          window=window, interpret=interpret)
  if layout != TRANSPOSED:
    raise ValueError(f"unknown cache layout {layout!r}")
  shape = q.shape
  out = transposed_reference_decode_attention(q.reshape(shape[0], shape[-2], shape[-1]), keys, values,
                                              start, end, scale=scale, softcap=softcap)
  return out.reshape(shape)
