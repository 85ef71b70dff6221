"""One decoder-only transformer in Flax NNX for every supported family.

Attribute names follow the Hugging Face module names (`self_attn.q_proj`,
`post_feedforward_layernorm`, ...) so that a parameter's path here is its
tensor name in the checkpoint; `checkpoints.py` relies on that.

Two entry points:
  * `forward(model, tokens, attention_mask)`: a whole (left-padded) sequence,
    for prefill and training; returns logits and each layer's keys/values.
  * `decode_step(model, tokens, cache)`: one new token per row against a
    preallocated `KVCache` whose shape is fixed by batch and maximum length.
`prefill` joins the two: a forward pass whose keys/values become the cache.

In a cache every row's sequence starts at slot 0: a prompt is prefilled
right-padded, and its first decoded token overwrites the slot after its last
prompt token. So a row's slot is its rope position, every slot before its write
index holds a real token, and a decode step's visible keys are one range
[0 or the window's start, index]: the per-row lengths that attention kernels take.

Mixture-of-experts layers (qwen3_moe: `cfg.moe_layers`) swap the MLP for a
`SparseMoeBlock`; how tokens reach their experts is in `moe.py`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from codit_jax import parallel
from codit_jax.models import attention_kernels, moe
from codit_jax.models.config import ModelConfig

# Large negative instead of -inf: a fully masked row (a left-pad query) then
# softmaxes to uniform instead of NaN; its output is never used.
_MASKED = float(np.finfo(np.float32).min)

# A decode step reads its cache in blocks of this many slots, and only the blocks
# that can hold a visible key: at step t of a batch whose cache is sized for
# prompt + max_new_tokens (4096 by default), it reads about prompt + t slots, not
# all of them (and a sliding-window layer about its window). Caches longer than
# one block are sized in whole blocks (`cache_length`). In the TRANSPOSED layout
# (CPU) each block is an array of its own (`cache_blocks`).
DECODE_BLOCK = 256


# The decode cache layout, read when a program is traced (`cache_layout`): None picks it by
# backend (attention_kernels.cache_layout: TRANSPOSED on CPU, KERNEL on GPU and TPU). Set
# through `use_cache_layout`.
CACHE_LAYOUT: str | None = None
# Tests: KERNEL-layout decode steps run the Pallas GPU kernel ("gpu") or TPU kernel ("tpu") in Pallas
# interpret mode on any platform (on CPU, jax.lax.platform_dependent picks the reference); None: the
# platform's choice. Set through `use_cache_layout`.
INTERPRET_KERNEL: str | None = None


def cache_layout() -> str:
  """The layout of the KV caches that programs traced now build and read (see attention_kernels):
  keys (b, kv_heads, head_dim, L) in TRANSPOSED (CPU), (b, kv_heads, L, head_dim) in KERNEL
  (GPU, TPU); values (b, kv_heads, L, head_dim) in both."""
  return CACHE_LAYOUT or attention_kernels.cache_layout()


@contextlib.contextmanager
def use_cache_layout(layout: str, *, interpret: str | None = None):
  """Traces inside use cache `layout` (and, with interpret "gpu" or "tpu", that Pallas kernel
  interpreted: tests).

  The layout is read at trace time, and jax reuses a trace of the same function on the same
  shapes (prefill's inputs do not show the layout), so jax's caches are cleared on entry and exit.
  """
  if layout not in (attention_kernels.TRANSPOSED, attention_kernels.KERNEL):
    raise ValueError(f"unknown cache layout {layout!r}")
  if interpret not in attention_kernels.INTERPRET_MODES:
    raise ValueError(f"interpret must be one of {attention_kernels.INTERPRET_MODES}, got {interpret!r}")
  global CACHE_LAYOUT, INTERPRET_KERNEL
  saved = CACHE_LAYOUT, INTERPRET_KERNEL
  jax.clear_caches()
  CACHE_LAYOUT, INTERPRET_KERNEL = layout, interpret
  try:
    yield
  finally:
    CACHE_LAYOUT, INTERPRET_KERNEL = saved
    jax.clear_caches()


def key_cache_shape(kv_heads: int, head_dim: int, entries: int, layout: str | None = None) -> tuple:
  """A layer's key cache shape after the batch axis, in `layout` (default `cache_layout()`)."""
  if (layout or cache_layout()) == attention_kernels.TRANSPOSED:
    return (kv_heads, head_dim, entries)
  return (kv_heads, entries, head_dim)


def cache_blocks(entries: int, layout: str | None = None) -> tuple[int, ...]:
  """The sizes of the arrays a layer's cache of `entries` slots is stored in.

  In the TRANSPOSED layout (CPU), a cache of more than one whole DECODE_BLOCK is one array per
  block: XLA:CPU copies any slice of an array out before it reduces over it (a dynamic slice, and a
  static one alike), and that copy of every block read took more of a decode step than the
  attention itself; a block that is an array of its own is read in place. Otherwise (the KERNEL
  layout, which the kernels read as one array, or a short cache) one array.
  """
  if (layout or cache_layout()) == attention_kernels.TRANSPOSED and entries > DECODE_BLOCK \
      and entries % DECODE_BLOCK == 0:
    return (DECODE_BLOCK,) * (entries // DECODE_BLOCK)
  return (entries,)


def cache_length(slots_needed: int) -> int:
  """The KV-cache length for `slots_needed` slots: rounded up to whole DECODE_BLOCKs past one block."""
  if slots_needed <= DECODE_BLOCK:
    return slots_needed
  return -(-slots_needed // DECODE_BLOCK) * DECODE_BLOCK


class Linear(nnx.Module):
  """y = x @ kernel (+ bias). The kernel is stored (in, out): the transpose of torch's weight."""

  def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

  def __call__(self, x):
    y = x @ self.kernel[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32, scaled by w (or 1 + w for Gemma), cast back to the input dtype."""

  def __init__(self, dim: int, *, eps: float, plus_one: bool, dtype):
    self.weight = nnx.Param(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype))
    self.eps = eps
    self.plus_one = plus_one

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.weight[...].astype(jnp.float32)
    if self.plus_one:
      return (normed * (1.0 + scale)).astype(x.dtype)
    # Llama-style: cast before scaling, as transformers does.
    return normed.astype(x.dtype) * self.weight[...]


def rotary_cos_sin(positions, inv_freq: np.ndarray, scale: float, dtype):
  """cos/sin of shape (batch, seq, head_dim) in `dtype`, computed in float32."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return (jnp.cos(angles) * scale).astype(dtype), (jnp.sin(angles) * scale).astype(dtype)


def apply_rotary(x, cos, sin):
  """x: (batch, seq, heads, head_dim); rotate-half convention of transformers."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer_index: int, *, dtype, rngs: nnx.Rngs):
    q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    self.q_proj = Linear(cfg.hidden_size, q_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.k_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.v_proj = Linear(cfg.hidden_size, kv_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
    self.o_proj = Linear(q_dim, cfg.hidden_size, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
    norm_dims = {"none": None, "head": (cfg.head_dim, cfg.head_dim), "projection": (q_dim, kv_dim)}[cfg.qk_norm]
    norm = dict(eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)
    self.q_norm = RMSNorm(norm_dims[0], **norm) if norm_dims else None
    self.k_norm = RMSNorm(norm_dims[1], **norm) if norm_dims else None
    self.cfg = cfg
    self.layer_type = cfg.layer_types[layer_index]
    # The mesh the decode kernel runs shard_mapped over (`use_sharded_decode_attention`); None: one call.
    self.kernel_mesh = None

  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    """x: (b, s, hidden). Returns (output, (keys, values)).

    Without a cache, mask is (b, s, keys) bool and the keys/values are this
    sequence's. With a cache (a decode step, s == 1: keys and values of
    max_len entries, in the `cache_layout()`, each a tuple of `cache_blocks`),
    each row's new entries are written at its own slot cache_index[row], and
    mask is a `StepMask`: attention reads the cache, by blocks where it is long
    (`attend_step`), or, in the KERNEL layout, through `attention_kernels` (the
    Pallas GPU or TPU kernel on each row's own slot range).

    Both layouts are heads-major so that attention reads the cache as stored
    (with (b, max_len, heads, d), XLA transposes the whole cache at every
    decode step). In the TRANSPOSED layout (CPU) keys are (b, kv_heads,
    head_dim, max_len), so that the scores of a decode step reduce over a
    leading axis and write the long key axis contiguously: on XLA:CPU that
    step is ~5x faster than reducing over head_dim, the innermost axis. The
    KERNEL layout (GPU, TPU) keeps keys (b, kv_heads, max_len, head_dim), the
    layout the kernel reads.
    """
    cfg = self.cfg
    b, s, _ = x.shape
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if cfg.qk_norm == "projection":  # OLMo: one norm over all heads of the projection
      q, k = self.q_norm(q), self.k_norm(k)
    q = q.reshape(b, s, cfg.num_heads, cfg.head_dim)
    k = k.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    v = v.reshape(b, s, cfg.num_kv_heads, cfg.head_dim)
    if cfg.qk_norm == "head":  # Qwen3, Gemma3: per-head norm before rope
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq, rope_scale = cfg.rope_for(self.layer_type)
    cos, sin = rotary_cos_sin(positions, inv_freq, rope_scale, x.dtype)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    layout = cache_layout()
    k = attention_kernels.keys_to_layout(k.transpose(0, 2, 1, 3), layout)  # (b, kv_heads, s, d) in the kernel layout
    v = v.transpose(0, 2, 1, 3)  # (b, kv_heads, s, d)
    scale, softcap = cfg.query_scale, cfg.attn_logit_softcap
    if cache is None:
      out = attend(q, k, v, mask, scale, softcap, layout)
    else:  # one decode step: each row writes its key/value at its own slot, then reads its cache
      slot = cache_index % sum(block.shape[2] for block in cache[1])  # a ring buffer (a sliding layer's) wraps
      reads_kernel = layout == attention_kernels.KERNEL and mask.ring is None
      if reads_kernel and self.kernel_mesh is not None:
        k, v = self._placed_as_cache(k), self._placed_as_cache(v)
      k = write_slot(cache[0], k, slot, axis=attention_kernels.key_slot_axis(layout))
      v = write_slot(cache[1], v, slot, axis=2)
      if reads_kernel:
        # Each row's visible slots are one range [start, stop): the kernel's per-row lengths.
        out = attention_kernels.kernel_layout_decode_attention(
            q, k[0], v[0], mask.start, mask.stop, scale=scale, softcap=softcap, window=mask.window,
            interpret=INTERPRET_KERNEL, mesh=self.kernel_mesh)
      else:  # TRANSPOSED, or a ring buffer (its visible entries are no slot range once it has wrapped)
        out = attend_step(q, k, v, mask, scale, softcap, layout)
    return self.o_proj(out.reshape(b, s, -1)), (k, v)

  def _placed_as_cache(self, entries):
    """A step's new keys or values (b, kv_heads, 1, d) placed as the cache is (rows over 'data', kv
    heads over 'model' where it divides them: `attention_kernels.mesh_specs`), so that writing them
    is local. Left to itself, XLA writes them where k_proj left them (kv_heads x head_dim split over
    'model', even where 'model' does not divide kv_heads), then gathers the whole cache back over
    'model' for the kernel, at every step."""
    specs = attention_kernels.mesh_specs(self.kernel_mesh, entries.shape[0], self.cfg.num_heads,
                                         self.cfg.num_kv_heads)
    return jax.lax.with_sharding_constraint(entries, NamedSharding(self.kernel_mesh, specs.cache))


def write_slot(blocks: tuple, new, slot, axis: int) -> tuple:
  """A layer's cache (a tuple of `cache_blocks`, slots on `axis`) with each row's `new` entry (size 1
  on `axis`) written at that row's own slot[row]: a scatter of one entry per row into the block
  that holds its slot (the other blocks drop it), so the cost does not grow with the cache length."""
  new = jnp.squeeze(new, axis)
  rows = jnp.arange(new.shape[0])
  written, first = [], 0
  for block in blocks:
    size = block.shape[axis]
    inside = (slot >= first) & (slot < first + size)
    where = [rows] + [slice(None)] * (block.ndim - 1)
    where[axis] = jnp.where(inside, slot - first, size)  # past the block: dropped
    written.append(block.at[tuple(where)].set(new.astype(block.dtype), mode="drop"))
    first += size
  return tuple(written)


# A longer sequence (a long prompt's prefill) computes attention for this many queries at a time,
# so that its scores take (QUERY_BLOCK x length) floats per head, not length^2: 162 GiB for one
# 36864-token Qwen3 prompt at once, 9 GiB by blocks.
QUERY_BLOCK = 2048


def attend(q, k, v, mask, scale, softcap, layout: str = attention_kernels.TRANSPOSED):
  """Grouped-query attention with float32 scores and softmax. q: (b,s,h,d); v: (b,kv,t,d);
  k: (b,kv,d,t) in the TRANSPOSED layout, (b,kv,t,d) in the KERNEL layout; mask: (b,s,t).
  Over QUERY_BLOCK queries, by blocks of queries (each query's row of scores is the same)."""
  s = q.shape[1]
  if s <= QUERY_BLOCK:
    return _attend(q, k, v, mask, scale, softcap, layout)
  blocks = -(-s // QUERY_BLOCK)
  pad = blocks * QUERY_BLOCK - s
  q_blocks = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(q.shape[0], blocks, QUERY_BLOCK, *q.shape[2:])
  mask_blocks = jnp.pad(mask, ((0, 0), (0, pad), (0, 0))).reshape(mask.shape[0], blocks, QUERY_BLOCK, -1)
  out = jax.lax.map(lambda qm: _attend(qm[0], k, v, qm[1], scale, softcap, layout),
                    (q_blocks.swapaxes(0, 1), mask_blocks.swapaxes(0, 1)))
  return out.swapaxes(0, 1).reshape(q.shape[0], blocks * QUERY_BLOCK, *q.shape[2:])[:, :s]


def _attend(q, k, v, mask, scale, softcap, layout: str):
  b, s, h, d = q.shape
  kv_heads = k.shape[1]
  q = q.reshape(b, s, kv_heads, h // kv_heads, d)
  kernel_layout = layout == attention_kernels.KERNEL
  if kernel_layout:
    scores = jnp.einsum("bskgd,bktd->bkgst", q, k, preferred_element_type=jnp.float32) * scale
  elif s == 1:  # a decode step: products and sums beat many tiny batched matmuls on CPU, same math
    scores = jnp.sum(q[:, 0, :, :, :, None].astype(jnp.float32) * k[:, :, None].astype(jnp.float32), axis=-2)
    scores = scores[:, :, :, None] * scale
  else:
    scores = jnp.einsum("bskgd,bkdt->bkgst", q, k, preferred_element_type=jnp.float32) * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None, None, :, :], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if s == 1 and not kernel_layout:
    out = jnp.sum(probs[:, :, :, 0, :, None] * v[:, :, None], axis=-2)[:, None]
  else:
    out = jnp.einsum("bkgst,bktd->bskgd", probs, v)
  return out.reshape(b, s, h, d)


class StepMask(NamedTuple):
  """Which cache slots the one query of each row sees in a decode step (a layer's window included).

  index: (b,) each row's query slot (every slot before it holds one of the row's
  tokens); window: the layer's sliding window or None; ring: the length of
  the layer's ring-buffer cache, or None when its cache holds every slot;
  first, end: the DECODE_BLOCKs [first, end) of the layer's cache that a step
  reads, the union over the live rows of the blocks that can hold a key visible
  to them (`step_block_range`). start, stop: (b,) in the KERNEL layout, for a
  layer without a ring, each row sees the slots [start, stop) (`visible_range`;
  empty for rows that are not live); else None.

  A sliding layer whose window is shorter than the cache keeps a ring buffer of
  `window` entries: slot s is stored at s % window, so the entries hold exactly
  the last `window` slots up to the query's (the window itself).
  """

  index: jax.Array
  window: int | None
  ring: int | None
  first: jax.Array
  end: jax.Array
  start: jax.Array | None = None
  stop: jax.Array | None = None

  def visible(self, start: int | jax.Array, size: int):
    """(b, size) which of the cache entries [start, start + size) each row's query sees."""
    entries = start + jnp.arange(size)
    if self.ring is not None:
      # The slot an entry holds: the latest slot <= index that maps to it (negative: none yet).
      return self.index[:, None] - (self.index[:, None] - entries[None, :]) % self.ring >= 0
    seen = entries[None, :] <= self.index[:, None]
    if self.window is not None:
      seen &= entries[None, :] > self.index[:, None] - self.window
    return seen


def visible_range(index, window: int | None):
  """(start, stop) per row: the slots [start, stop) that a decode step's query at slot index (b,) sees,
  its own key already written: from slot 0, or the window's first slot, to index."""
  index = index.astype(jnp.int32)
  start = jnp.zeros_like(index) if window is None else jnp.maximum(index - window + 1, 0)
  return start, index + 1


def step_block_range(index, window: int | None, live=None, ring: int | None = None):
  """[first, end) of the DECODE_BLOCK-slot cache blocks that can hold a key visible to a query at
  slot index[row] of any live row: from the block of the window's first slot (slot 0 without a
  window) to the block of the query. Rows that are not live (finished, or empty slots) do not
  widen it; their outputs are not used. A ring buffer is read from its start, up to the query's
  entry until it has wrapped around, then whole."""
  if ring is not None:
    index = jnp.minimum(index, ring - 1)
    window = None
  first_slot = jnp.zeros_like(index) if window is None else jnp.maximum(index - window + 1, 0)
  live = jnp.ones(index.shape, bool) if live is None else live
  big = jnp.iinfo(jnp.int32).max
  first = jnp.min(jnp.where(live, first_slot // DECODE_BLOCK, big))
  end = jnp.max(jnp.where(live, index // DECODE_BLOCK + 1, 0))
  return jnp.minimum(first, end), end


def attend_step(q, k: tuple, v: tuple, mask: StepMask, scale, softcap, layout: str = attention_kernels.TRANSPOSED):
  """attend() for a decode step (one query per row) against the whole cache.

  k, v: a layer's cache as a tuple of `cache_blocks`. A cache of one block (or not a
  whole number of blocks) is read whole. A longer one is read block by block over
  [mask.first, mask.end) only, with the softmax run online (a running maximum and sum,
  as in flash attention). A row's result does not depend on that range: a block with
  no key visible to the row leaves its running values exactly as they were (exp of the
  masked score underflows to 0, or, before the row's first visible block, is scaled to
  exactly 0 when that block comes), so neighbours that widen the range change no bit
  of it, and a step's cost follows the live rows' lengths, not the allocated cache length.
  q: (b,1,h,d); value blocks: (b,kv,t,d); key blocks: (b,kv,d,t) in the TRANSPOSED layout,
  (b,kv,t,d) in the KERNEL layout (there only for ring buffers: the other layers run
  attention_kernels).
  """
  kernel_layout = layout == attention_kernels.KERNEL
  key_axis = attention_kernels.key_slot_axis(layout)
  slots = sum(block.shape[2] for block in v)
  if len(v) == 1 and (slots <= DECODE_BLOCK or slots % DECODE_BLOCK):
    return attend(q, k[0], v[0], mask.visible(0, slots)[:, None, :], scale, softcap, layout)
  if len(v) == 1:  # one long array (a KERNEL-layout ring): static slices, which XLA:GPU/TPU fuse
    k = tuple(jax.lax.slice_in_dim(k[0], i, i + DECODE_BLOCK, axis=key_axis) for i in range(0, slots, DECODE_BLOCK))
    v = tuple(jax.lax.slice_in_dim(v[0], i, i + DECODE_BLOCK, axis=2) for i in range(0, slots, DECODE_BLOCK))
  b, _, h, d = q.shape
  kv_heads = k[0].shape[1]
  q = q.reshape(b, kv_heads, h // kv_heads, d).astype(jnp.float32)

  def block_update(block: int):
    def update(carry):
      top, total, out = carry  # running max and sum of exp(score - max), and the weighted values
      keys, values = k[block].astype(jnp.float32), v[block].astype(jnp.float32)
      if kernel_layout:
        scores = jnp.einsum("bkgd,bktd->bkgt", q, keys) * scale
      else:
        scores = jnp.sum(q[..., None] * keys[:, :, None], axis=-2) * scale  # (b, kv, g, block)
      if softcap:
        scores = jnp.tanh(scores / softcap) * softcap
      scores = jnp.where(mask.visible(block * DECODE_BLOCK, DECODE_BLOCK)[:, None, None, :], scores, _MASKED)
      new_top = jnp.maximum(top, jnp.max(scores, axis=-1))
      # Weights given while every key so far was masked are scaled to exactly 0 here once a
      # visible key arrives; the block of a row's query always has one (the new token's own).
      rescale = jnp.exp(top - new_top)
      probs = jnp.exp(scores - new_top[..., None])
      total = total * rescale + jnp.sum(probs, axis=-1)
      if kernel_layout:
        weighted = jnp.einsum("bkgt,bktd->bkgd", probs, values)
      else:
        weighted = jnp.sum(probs[..., None] * values[:, :, None], axis=-2)
      out = out * rescale[..., None] + weighted
      return new_top, total, out
    return update

  # Block i by a switch among the blocks, each its own array: no block is copied out to be read.
  updates = [block_update(block) for block in range(len(v))]
  init = (jnp.full(q.shape[:-1], _MASKED, jnp.float32), jnp.zeros(q.shape[:-1], jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  _, total, out = jax.lax.fori_loop(mask.first, mask.end, lambda i, carry: jax.lax.switch(i, updates, carry), init)
  return (out / total[..., None]).astype(v[0].dtype).reshape(b, 1, h, d)


class MLP(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    linear = dict(bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **linear)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, **linear)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, **linear)
    self.activation = cfg.activation

  def __call__(self, x):
    return self.down_proj(activate(self.gate_proj(x), self.activation) * self.up_proj(x))


def activate(x, activation: str):
  return jax.nn.silu(x) if activation == "silu" else jax.nn.gelu(x, approximate=True)


class Experts(nnx.Module):
  """SwiGLU weights of all experts of a layer, stacked (experts, in, out) like Linear kernels,
  so that one sharding rule can split the expert dimension over 'model'."""

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    self.gate_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype))
    self.up_proj = nnx.Param(init(rngs.params(), (e, h, i), dtype))
    self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), dtype))


class SparseMoeBlock(nnx.Module):
  """The MLP of a mixture-of-experts layer (Qwen3MoeSparseMoeBlock): a router (`gate`)
  picks `num_experts_per_tok` experts per token and sums their outputs, weighted.

  `expert_mesh`, set by `use_expert_parallelism`, is the mesh whose 'model' axis
  splits the experts; None runs all of them where the weights are.
  """

  def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
    self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False, dtype=dtype, rngs=rngs)
    self.experts = Experts(cfg, dtype=dtype, rngs=rngs)
    self.top_k = cfg.num_experts_per_tok
    self.norm_topk_prob = cfg.norm_topk_prob
    self.activation = cfg.activation
    self.expert_mesh = None

  def __call__(self, x):
    block = functools.partial(moe.moe_block, top_k=self.top_k, norm_topk_prob=self.norm_topk_prob,
                              act=functools.partial(activate, activation=self.activation))
    weights = (self.gate.kernel[...], self.experts.gate_proj[...], self.experts.up_proj[...],
               self.experts.down_proj[...])
    if self.expert_mesh is None:
      out = block(x, *weights)
    else:
      out = moe.expert_parallel(block, self.expert_mesh)(x, *weights)
    return out.astype(x.dtype)


def use_expert_parallelism(model: "Decoder", mesh) -> None:
  """Runs each mixture-of-experts layer of `model` expert-parallel over `mesh`'s 'model' axis.

  Only when that axis divides the number of experts: the same condition under
  which `parallel.param_spec` splits the stacked expert weights, so every device
  holds whole experts. Otherwise the weights are replicated and the layer runs
  as it would on one device.
  """
  model_devices = mesh.shape[parallel.MODEL]
  for layer in model.layers:
    if isinstance(layer.mlp, SparseMoeBlock):
      splits = model_devices > 1 and model.cfg.num_experts % model_devices == 0
      layer.mlp.expert_mesh = mesh if splits else None


def use_sharded_decode_attention(model: "Decoder", mesh) -> None:
  """Runs the decode kernel of `model`'s attention layers shard_mapped over `mesh`, each device on
  its own rows and heads (`attention_kernels.shard_over_mesh`): XLA cannot partition the kernel's
  custom call, and would otherwise gather the whole cache onto every device at every step. A mesh
  of one device changes nothing."""
  for layer in model.layers:
    layer.self_attn.kernel_mesh = mesh if mesh.size > 1 else None


class DecoderLayer(nnx.Module):
  """One block. `block_norms` picks where the RMSNorms sit:
  'pre' (llama): x + attn(norm(x)); 'sandwich' (gemma3): x + norm(attn(norm(x)));
  'post' (olmo2/3): x + norm(attn(x)). The MLP half mirrors the attention half.
  """

  def __init__(self, cfg: ModelConfig, layer_index: int, *, dtype, rngs: nnx.Rngs):
    self.self_attn = Attention(cfg, layer_index, dtype=dtype, rngs=rngs)
    if layer_index in cfg.moe_layers:
      self.mlp = SparseMoeBlock(cfg, dtype=dtype, rngs=rngs)
    else:
      self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
    norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)  # noqa: E731
    has_pre = cfg.block_norms in ("pre", "sandwich")
    has_post = cfg.block_norms in ("sandwich", "post")
    self.input_layernorm = norm() if has_pre else None
    # transformers calls the llama pre-MLP norm "post_attention_layernorm"; gemma3 and
    # olmo use that name for the norm on the attention output.
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm() if cfg.block_norms == "sandwich" else None
    self.post_feedforward_layernorm = norm() if has_post else None
    self.block_norms = cfg.block_norms

  def __call__(self, x, positions, mask, cache=None, cache_index=None):
    if self.block_norms == "pre":
      attn_in_norm, attn_out_norm = self.input_layernorm, None
      mlp_in_norm, mlp_out_norm = self.post_attention_layernorm, None
    else:
      attn_in_norm, attn_out_norm = self.input_layernorm, self.post_attention_layernorm
      mlp_in_norm, mlp_out_norm = self.pre_feedforward_layernorm, self.post_feedforward_layernorm
    with jax.named_scope("attention"):
      h = attn_in_norm(x) if attn_in_norm else x
      h, kv = self.self_attn(h, positions, mask, cache, cache_index)
      x = x + (attn_out_norm(h) if attn_out_norm else h)
    with jax.named_scope("moe" if isinstance(self.mlp, SparseMoeBlock) else "mlp"):
      h = mlp_in_norm(x) if mlp_in_norm else x
      h = self.mlp(h)
      x = x + (mlp_out_norm(h) if mlp_out_norm else h)
    return x, kv


class Embedding(nnx.Module):

  def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab_size, dim), dtype))

  def __call__(self, tokens):
    return jnp.take(self.embedding[...], tokens, axis=0)


class Decoder(nnx.Module):
  """The whole model: embeddings, blocks, final norm, language-model head."""

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs or nnx.Rngs(0)
    self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=dtype)
    self.lm_head = None if cfg.tie_word_embeddings else Linear(
        cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs)
    self.cfg = cfg

  def __call__(self, tokens, positions, query_slots, key_valid, segment_ids=None):
    """Hidden states after the final norm, and per-layer (keys, values), of whole sequences.

    tokens, positions: (b, s). query_slots: (s,) the key slot each query
    occupies. key_valid: (b, s) which slots hold real tokens.
    segment_ids: optional (b, s), rows packed with several documents
    (training); a query then sees only keys of its own segment.
    """
    masks = {window: attention_mask(query_slots, key_valid, window) for window in self._windows()}
    if segment_ids is not None:
      same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
      masks = {window: mask & same_segment for window, mask in masks.items()}
    return self._layers(tokens, positions, [masks[self.cfg.window_for(i)] for i in range(self.cfg.num_layers)])

  def step(self, tokens, cache_index, caches, live=None):
    """One decode step: tokens, cache_index: (b,), each row's own (its slot is its rope position);
    caches: per layer (keys, values), each a tuple of `cache_blocks`. live: (b,) rows whose results
    are used (None: all); only they decide which cache blocks the step reads."""
    kernel_layout = cache_layout() == attention_kernels.KERNEL
    masks = []
    for i, (_, values) in enumerate(caches):
      window = self.cfg.window_for(i)
      # A sliding layer's cache of exactly its window is a ring (`layer_cache_length`); were the window
      # the whole cache, it would never wrap, and the ring's rule still gives the window's keys.
      entries = sum(block.shape[2] for block in values)
      ring = entries if entries == window else None
      first, end = step_block_range(cache_index, window, live, ring)
      start = stop = None
      if kernel_layout and ring is None:
        start, stop = visible_range(cache_index, window)
        if live is not None:  # rows not live read nothing (their output, 0s, is not used)
          start = jnp.where(live, start, stop)
      masks.append(StepMask(cache_index, window, ring, first, end, start, stop))
    return self._layers(tokens[:, None], cache_index[:, None], masks, caches, cache_index)

  def _windows(self):
    return {self.cfg.window_for(i) for i in range(self.cfg.num_layers)}

  def _layers(self, tokens, positions, masks, caches=None, cache_index=None):
    cfg = self.cfg
    with jax.named_scope("embed"):
      x = self.embed_tokens(tokens)
      if cfg.embed_scale != 1.0:
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)  # rounded to the weight dtype, as transformers does
    new_kv = []
    for i, layer in enumerate(self.layers):
      cache = None if caches is None else caches[i]
      with jax.named_scope(f"layer_{i}"):  # profiles show each block's ops under its layer
        x, kv = layer(x, positions, masks[i], cache, cache_index)
      new_kv.append(kv)
    return self.norm(x), new_kv

  def logits(self, hidden):
    """float32 logits over the whole (padded) embedding vocabulary."""
    with jax.named_scope("logits"):
      if self.lm_head is None:
        kernel = self.embed_tokens.embedding[...].T
      else:
        kernel = self.lm_head.kernel[...]
      logits = jnp.einsum("...h,hv->...v", hidden, kernel, preferred_element_type=jnp.float32)
      if self.cfg.final_logit_softcap:
        cap = self.cfg.final_logit_softcap
        logits = jnp.tanh(logits / cap) * cap
    return logits


def attention_mask(query_slots, key_valid, window: int | None):
  """(b, s, t) bool: causal over key slots, only valid keys, and within the window if any.

  A sliding window of w keeps keys with slot > query_slot - w (the query itself
  and the w - 1 before it), the same rule as transformers' masks.
  """
  key_slots = jnp.arange(key_valid.shape[1])
  allowed = key_slots[None, :] <= query_slots[:, None]
  if window is not None:
    allowed &= key_slots[None, :] > query_slots[:, None] - window
  return allowed[None] & key_valid[:, None, :]


def positions_from_mask(attention_mask):
  """Rope positions of a left-padded batch: 0 at each row's first real token."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class KVCache(NamedTuple):
  """Static-shape cache of every layer's keys/values, one row per sequence, each row on its own clock.

  keys: per layer, a tuple of arrays (`cache_blocks`) that together are (b, kv_heads,
  head_dim, entries) in the TRANSPOSED layout (CPU), (b, kv_heads, entries, head_dim)
  in the KERNEL layout (GPU, TPU): `cache_layout()`, see Attention; values: per layer,
  blocks of (b, kv_heads, entries, head_dim). entries is max_len, or a sliding
  layer's window when that is shorter (a ring buffer: `layer_cache_length`).
  index: (b,) the slot each row's next token is written to, which is also its rope
  position: every row's sequence starts at slot 0 (rows of a continuous batch
  joined at different times, so each has its own).
  """

  keys: tuple
  values: tuple
  index: jax.Array


def forward(model: Decoder, tokens, attention_mask):
  """Full-sequence pass over a left-padded batch: (float32 logits (b, s, vocab), per-layer (k, v))."""
  hidden, kv = _forward_hidden(model, tokens, attention_mask)
  return model.logits(hidden), kv


def _forward_hidden(model, tokens, attention_mask):
  attention_mask = attention_mask.astype(bool)
  positions = positions_from_mask(attention_mask)
  query_slots = jnp.arange(tokens.shape[1])
  return model(tokens, positions, query_slots, attention_mask)


def prefill(model: Decoder, tokens, lengths, max_len: int, cache_dtype=None):
  """Runs right-padded prompts (tokens (b, s): row r's prompt in slots [0, lengths[r])); returns
  (float32 logits after each row's last prompt token (b, vocab), KVCache of length max_len whose
  row r continues at slot lengths[r]). The padding's keys sit past each prompt, where the row's
  next tokens overwrite them before any query can see them."""
  b, s = tokens.shape
  if s > max_len:
    raise ValueError(f"prompt length {s} exceeds the cache length {max_len}")
  lengths = lengths.astype(jnp.int32)
  slots = jnp.arange(s)
  hidden, kv = model(tokens, jnp.broadcast_to(slots, (b, s)), slots, slots[None, :] < lengths[:, None])
  last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
  dtype = cache_dtype or hidden.dtype
  key_axis = attention_kernels.key_slot_axis(cache_layout())

  def layer_cache(x, entries: int, axis: int):
    return _split(_cache_entries(x.astype(dtype), entries, lengths, axis), axis)

  lengths_per_layer = [layer_cache_length(model.cfg, i, max_len) for i in range(len(kv))]
  keys = tuple(layer_cache(k, n, key_axis) for (k, _), n in zip(kv, lengths_per_layer))
  values = tuple(layer_cache(v, n, 2) for (_, v), n in zip(kv, lengths_per_layer))
  return model.logits(last), KVCache(keys, values, lengths)


def _split(x, axis: int) -> tuple:
  """A layer's cache array as its `cache_blocks`."""
  blocks, first = [], 0
  for size in cache_blocks(x.shape[axis]):
    blocks.append(jax.lax.slice_in_dim(x, first, first + size, axis=axis))
    first += size
  return tuple(blocks)


def layer_cache_length(cfg, layer_index: int, max_len: int) -> int:
  """Cache entries of a layer for sequences of max_len slots: a sliding layer whose window is
  shorter keeps only its window (a ring buffer), every other layer all max_len slots."""
  window = cfg.window_for(layer_index)
  return window if window is not None and window < max_len else max_len


def _cache_entries(x, entries: int, lengths, axis: int):
  """A prompt's keys or values (s slots on `axis`, row r's prompt in [0, lengths[r])) as a cache of
  `entries`: padded after the prompt, or, for a ring buffer shorter than the prompt, entry e holding
  the row's latest prompt slot t with t % entries == e (a slot before 0 where there is none yet:
  its entry is never visible)."""
  s = x.shape[axis]
  if s <= entries:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, entries - s)
    return jnp.pad(x, pad)
  last = (lengths - 1)[:, None]
  held = last - (last - jnp.arange(entries)[None, :]) % entries  # (b, entries)
  shape = [x.shape[0]] + [1] * (x.ndim - 1)
  shape[axis] = entries
  return jnp.take_along_axis(x, jnp.maximum(held, 0).reshape(shape), axis=axis)


def decode_step(model: Decoder, tokens, cache: KVCache, live=None):
  """Appends one token per row (tokens: (b,)); returns (float32 logits (b, vocab), updated cache).

  live: optional (b,) bool, the rows being decoded; the others (finished rows,
  empty slots of a continuous batch) stay where they are: their cache index does
  not move and they do not widen the cache blocks a step reads.
  """
  hidden, kv = model.step(tokens, cache.index, list(zip(cache.keys, cache.values)), live)
  advance = 1 if live is None else live.astype(jnp.int32)
  new_cache = KVCache(keys=tuple(k for k, _ in kv), values=tuple(v for _, v in kv), index=cache.index + advance)
  return model.logits(hidden[:, 0]), new_cache
