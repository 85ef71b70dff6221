"""Decode attention through JAX's kernels (models/attention_kernels.py), on CPU.

The Pallas GPU kernel (jax.experimental.pallas.ops.gpu.decode_attention.gqa) runs
here in Pallas interpret mode and is checked against the pure-jnp reference and
against the decoder's own `attend` / `attend_step` on the equivalent masks.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from codit_jax import checkpoints, parallel
from codit_jax.models import attention_kernels as ak
from codit_jax.models import decoder

# bfloat16: the kernel rounds each split's partial output to bf16 before combining them
# (decode_attention.decode_attn_unbatched), the reference rounds once: a few bf16 ulps.
TOLERANCE = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _inputs(b, heads, kv_heads, head_dim, slots, dtype, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (b, 1, heads, head_dim), jnp.float32).astype(dtype)
  keys = jax.random.normal(kk, (b, kv_heads, slots, head_dim), jnp.float32).astype(dtype)
  values = jax.random.normal(kv, (b, kv_heads, slots, head_dim), jnp.float32).astype(dtype)
  return q, keys, values


def _rows(slots, window):
  """index (b,): the query slots of a continuous batch's rows, each on its own clock."""
  index = np.array([slots - 1, 40, slots - 2, slots // 2 + 5, 0, 20])
  if window is not None:
    index[3] = min(slots - 1, index[3] + window)  # a row past its window: start = index - window + 1
  return jnp.asarray(index, jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "softcap"))
def _project_attend(q, keys, values, start, end, scale, softcap=None):
  """decoder.attend on the CPU layout with the mask of slots [start, end)."""
  slots = jnp.arange(keys.shape[2])
  mask = (slots[None, :] >= start[:, None]) & (slots[None, :] < end[:, None])
  return decoder.attend(q, jnp.swapaxes(keys, 2, 3), values, mask[:, None, :], scale, softcap)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "block"))
def _reference(q, keys, values, start, end, scale, softcap=None, block=ak.REFERENCE_BLOCK):
  return ak.reference_decode_attention(q, keys, values, start, end, scale=scale, softcap=softcap, block=block)


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "window", "interpret"))
def _kernel_layout(q, keys, values, start, end, scale, softcap=None, window=None, interpret="gpu"):
  return ak.kernel_layout_decode_attention(q, keys, values, start, end, scale=scale, softcap=softcap,
                                           window=window, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("window", "scale"))
def _attend_step(q, keys, values, index, window, scale):
  """The decoder's CPU decode-step attention, the cache split into its blocks as the decoder keeps it."""
  first, last = decoder.step_block_range(index, window)
  key_blocks = decoder._split(jnp.swapaxes(keys, 2, 3), 3)  # pylint: disable=protected-access
  value_blocks = decoder._split(values, 2)  # pylint: disable=protected-access
  assert len(key_blocks) > 1 or keys.shape[2] <= decoder.DECODE_BLOCK  # long caches take the blocked path
  return decoder.attend_step(q, key_blocks, value_blocks, decoder.StepMask(index, window, None, first, last),
                             scale, None)


def _f32(x):
  return np.asarray(x.astype(jnp.float32))


CASES = [  # (heads, kv_heads, head_dim, slots, window)
    (4, 2, 64, 512, None),
    (8, 2, 128, 512, 100),
    (8, 4, 64, 768, None),    # 768 = 3 x 256: splits of 256 slots (a power of two)
    (16, 4, 128, 256, 64),
    (8, 2, 64, 1024, 300),
]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,slots,window", CASES)
def test_interpreted_gpu_kernel_matches_reference_and_attend(heads, kv_heads, head_dim, slots, window, dtype):
  index = _rows(slots, window)
  start, end = decoder.visible_range(index, window)
  q, keys, values = _inputs(len(index), heads, kv_heads, head_dim, slots, dtype)
  scale = head_dim ** -0.5
  assert ak.gpu_kernel_fits(q[:, 0].shape, keys.shape)
  out = _kernel_layout(q, keys, values, start, end, scale)
  assert out.shape == q.shape and out.dtype == dtype
  reference = _reference(q[:, 0], keys, values, start, end, scale)
  np.testing.assert_allclose(_f32(out[:, 0]), _f32(reference), **TOLERANCE[dtype])
  project = _project_attend(q, keys, values, start, end, scale)
  np.testing.assert_allclose(_f32(out), _f32(project), **TOLERANCE[dtype])
  # ... and the decoder's decode-step path, on its own mask (index, window)
  step = _attend_step(q, keys, values, index, window, scale)
  np.testing.assert_allclose(_f32(out), _f32(step), **TOLERANCE[dtype])


def test_visible_range_is_the_step_mask():
  slots, window = 512, 100
  for w in (None, window):
    index = _rows(slots, w)
    start, end = decoder.visible_range(index, w)
    mask = decoder.StepMask(index, w, None, 0, 0).visible(0, slots)
    s = np.arange(slots)
    np.testing.assert_array_equal(np.asarray(mask), (s >= np.asarray(start)[:, None]) & (s < np.asarray(end)[:, None]))


def test_platform_dependent_wrapper_on_cpu_is_the_reference():
  slots, window = 1024, 300
  index = _rows(slots, window)
  start, end = decoder.visible_range(index, window)
  q, keys, values = _inputs(len(index), 8, 2, 64, slots, jnp.float32)
  out = _kernel_layout(q, keys, values, start, end, 0.125, interpret=None)
  reference = _reference(q[:, 0], keys, values, start, end, 0.125)
  np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(reference))
  dispatched = jax.jit(lambda *a: ak.decode_attention(*a, scale=0.125, layout=ak.cache_layout()))(
      q, jnp.swapaxes(keys, 2, 3), values, start, end)  # CPU: the transposed layout
  assert ak.cache_layout() == ak.TRANSPOSED and ak.cache_layout("gpu") == ak.KERNEL
  np.testing.assert_allclose(np.asarray(dispatched[:, 0]), np.asarray(reference), atol=2e-5, rtol=2e-5)


def test_empty_rows_give_zeros():
  q, keys, values = _inputs(3, 4, 2, 64, 512, jnp.float32)
  start, end = jnp.array([5, 300, 0], jnp.int32), jnp.array([5, 200, 512], jnp.int32)
  out = _kernel_layout(q, keys, values, start, end, 0.125)
  reference = _reference(q[:, 0], keys, values, start, end, 0.125)
  assert np.all(np.asarray(out[:2]) == 0) and np.all(np.asarray(reference[:2]) == 0)
  np.testing.assert_allclose(np.asarray(out[2, 0]), np.asarray(reference[2]), atol=2e-5, rtol=2e-5)


def test_softcap_and_unfit_shapes_run_the_reference():
  index = _rows(512, None)
  start, end = decoder.visible_range(index, None)
  q, keys, values = _inputs(len(index), 4, 2, 64, 512, jnp.float32)
  out = _kernel_layout(q, keys, values, start, end, 0.125, softcap=50.0)
  project = _project_attend(q, keys, values, start, end, 0.125, softcap=50.0)
  np.testing.assert_allclose(np.asarray(out), np.asarray(project), atol=2e-5, rtol=2e-5)
  # head_dim 80 (not a power of two) and a 200-slot cache (no split of 16 slots) do not fit
  assert not ak.gpu_kernel_fits((6, 4, 80), (6, 2, 512, 80))
  assert not ak.gpu_kernel_fits((6, 4, 64), (6, 2, 200, 64))
  short = _inputs(len(index), 4, 2, 80, 200, jnp.float32)
  start, end = jnp.minimum(start, 150), jnp.minimum(end, 200)
  out = _kernel_layout(*short, start, end, 0.1)
  np.testing.assert_allclose(np.asarray(out), np.asarray(_project_attend(*short, start, end, 0.1)), atol=2e-5, rtol=2e-5)


def test_reference_block_loop_matches_dense():
  index = _rows(1024, 300)
  start, end = decoder.visible_range(index, 300)
  q, keys, values = _inputs(len(index), 8, 4, 64, 1024, jnp.float32)
  blocks = _reference(q[:, 0], keys, values, start, end, 0.125, softcap=30.0)
  dense = _reference(q[:, 0], keys, values, start, end, 0.125, softcap=30.0, block=1024)
  np.testing.assert_allclose(np.asarray(blocks), np.asarray(dense), atol=2e-5, rtol=2e-5)


def test_gpu_split_sizes():
  assert ak.gpu_split(4096) == 512 and ak.gpu_split(768) == 256 and ak.gpu_split(256) == 256
  assert ak.gpu_split(48) == 16 and ak.gpu_split(100) is None


def test_no_cache_transpose_in_hlo():
  """gqa swaps axes 1, 2 of the cache it is given and we give it swapaxes(cache, 1, 2): XLA folds
  the pair, so the compiled step reads the cache as stored (no transposed copy)."""
  q, keys, values = _inputs(4, 8, 2, 64, 1024, jnp.float32)
  start, end = jnp.zeros(4, jnp.int32), jnp.full(4, 1024, jnp.int32)
  run = jax.jit(lambda *a: ak.kernel_layout_decode_attention(*a, scale=0.125, interpret="gpu"))
  hlo = run.lower(q, keys, values, start, end).compile().as_text()
  assert "transpose(" not in hlo


def test_cuda_lowering_uses_the_triton_kernel():
  """Lowered for CUDA (no GPU needed), the platform_dependent wrapper is the Pallas Triton call."""
  q = jax.ShapeDtypeStruct((4, 1, 16, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 4, 768, 128), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((4,), jnp.int32)
  run = jax.jit(lambda *a: ak.kernel_layout_decode_attention(*a, scale=128 ** -0.5))
  text = run.trace(q, kv, kv, rows, rows).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text


# ---- The Pallas TPU kernel (ops.tpu.paged_attention), in TPU interpret mode on CPU.

# (heads, kv_heads, head_dim, slots, window): pages of 512, 256 and 128 slots (`tpu_page`), 1 to 8
# query heads per kv head (8: the kernel's q tile path without a reshape), a window as long as the cache.
TPU_CASES = [
    (8, 2, 128, 512, None),
    (4, 4, 128, 768, None),
    (16, 2, 256, 1024, 1024),
    (8, 1, 128, 384, None),
]

# The kernel and the reference read the same bfloat16 keys and values and compute in float32 (the
# kernel's softmax by pages): they differ by float32 rounding, then one bfloat16 rounding of the output.
TPU_TOLERANCE = dict(atol=1e-2, rtol=1e-2)


def _tpu_rows(slots):
  """(start, end) of rows on their own clocks, every one from slot 0 (no window shorter than the
  cache), plus a row that is not live (start == end)."""
  end = jnp.asarray([slots, 41, slots - 1, slots // 2 + 5, 1, 21, 0], jnp.int32)
  return jnp.zeros_like(end), end


@pytest.mark.parametrize("softcap", [None, 30.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("heads,kv_heads,head_dim,slots,window", TPU_CASES)
def test_interpreted_tpu_kernel_matches_reference(heads, kv_heads, head_dim, slots, window, softcap):
  start, end = _tpu_rows(slots)
  q, keys, values = _inputs(len(end), heads, kv_heads, head_dim, slots, jnp.bfloat16)
  scale = head_dim ** -0.5
  assert ak.tpu_kernel_fits(q[:, 0].shape, keys.shape, keys.dtype, window)
  out = _kernel_layout(q, keys, values, start, end, scale, softcap=softcap, window=window, interpret="tpu")
  assert out.shape == q.shape and out.dtype == jnp.bfloat16
  reference = _reference(q[:, 0], keys, values, start, end, scale, softcap=softcap)
  np.testing.assert_allclose(_f32(out[:, 0]), _f32(reference), **TPU_TOLERANCE)
  assert np.all(_f32(out[-1]) == 0)  # the row that is not live
  # the kernel ran, not the reference: the traced program is the TPU Pallas call
  jaxpr = str(_kernel_layout.trace(q, keys, values, start, end, scale, softcap=softcap, window=window,
                                   interpret="tpu").jaxpr)
  assert "name=paged_attention" in jaxpr and "interpret=InterpretParams" in jaxpr and "platform_index" not in jaxpr


def test_tpu_kernel_fits_and_pages():
  assert ak.tpu_page(4096) == 512 and ak.tpu_page(768) == 256 and ak.tpu_page(384) == 128
  assert ak.tpu_page(200) is None and ak.tpu_page(64) is None
  q, kv = (6, 8, 128), (6, 2, 512, 128)
  assert ak.tpu_kernel_fits(q, kv, jnp.bfloat16) and ak.tpu_kernel_fits(q, kv, jnp.bfloat16, window=512)
  assert not ak.tpu_kernel_fits(q, kv, jnp.float32)  # the kernel would load the cache as bfloat16
  assert not ak.tpu_kernel_fits(q, kv, jnp.bfloat16, window=100)  # rows would start past slot 0
  assert not ak.tpu_kernel_fits((6, 8, 64), (6, 2, 512, 64), jnp.bfloat16)  # head_dim under 128
  assert not ak.tpu_kernel_fits((6, 8, 128), (6, 2, 200, 128), jnp.bfloat16)  # no page divides 200
  assert not ak.tpu_kernel_fits((6, 6, 128), (6, 4, 512, 128), jnp.bfloat16)  # 4 kv heads do not divide 6


def test_tpu_branch_runs_the_reference_where_the_kernel_does_not_fit():
  """A float32 cache, and a window shorter than the cache: bit for bit the reference, kernel or not."""
  slots, window = 512, 100
  index = _rows(slots, window)
  start, end = decoder.visible_range(index, window)
  q, keys, values = _inputs(len(index), 8, 2, 128, slots, jnp.float32)
  out = _kernel_layout(q, keys, values, start, end, 0.125, window=window, interpret="tpu")
  np.testing.assert_array_equal(np.asarray(out[:, 0]), np.asarray(_reference(q[:, 0], keys, values, start, end, 0.125)))
  bf16 = tuple(x.astype(jnp.bfloat16) for x in (q, keys, values))
  out = _kernel_layout(*bf16, start, end, 0.125, window=window, interpret="tpu")
  np.testing.assert_array_equal(_f32(out[:, 0]), _f32(_reference(bf16[0][:, 0], *bf16[1:], start, end, 0.125)))


def test_tpu_kernel_under_vmap_is_one_call_on_the_pairs_rows():
  """pair_parallel vmaps the decode step over the pair: the kernel then runs once, on both models'
  rows (`_pair_axis_as_rows`), and gives each model what it gives that model alone."""
  slots = 256
  pairs = [_inputs(4, 16, 4, 128, slots, jnp.bfloat16, seed=seed) for seed in (0, 1)]
  q, keys, values = (jnp.stack(x) for x in zip(*pairs))
  end = jnp.asarray([[slots, 3, 100, 0], [7, slots - 1, 1, 128]], jnp.int32)
  start = jnp.zeros_like(end)
  attend = lambda *a: ak.kernel_layout_decode_attention(*a, scale=128 ** -0.5, interpret="tpu")  # noqa: E731
  both = jax.jit(jax.vmap(attend))
  out = both(q, keys, values, start, end)
  assert str(both.trace(q, keys, values, start, end).jaxpr).count("pallas_call") == 1
  for i in range(2):
    np.testing.assert_array_equal(_f32(out[i]), _f32(jax.jit(attend)(q[i], keys[i], values[i], start[i], end[i])))


def test_tpu_kernel_pair_parallel_on_a_mesh_is_each_model_alone_without_collectives():
  """pair_parallel on a pod: the step vmapped over the pair with spmd_axis_name='pair' (as the engine
  does), the kernel shard_mapped over pair 2 x data 2 x model 2: each model's rows exactly as that
  model alone on one device, and a compiled program with no collective."""
  mesh = parallel.make_mesh(model_parallelism=2, pair_parallel=True)
  slots, b, heads, kv_heads = 256, 4, 8, 2
  pairs = [_inputs(b, heads, kv_heads, 128, slots, jnp.bfloat16, seed=seed) for seed in (0, 1)]
  q, keys, values = (jnp.stack(x) for x in zip(*pairs))
  end = jnp.asarray([slots, 3, 100, 0], jnp.int32)  # the rows' lengths: the same for both models
  start = jnp.zeros_like(end)
  specs = ak.mesh_specs(mesh, b, heads, kv_heads)
  place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  pair_spec = lambda spec: P(parallel.PAIR, *spec)  # noqa: E731
  placed = (place(q, pair_spec(P(*specs.query[:1], None, *specs.query[1:]))), place(keys, pair_spec(specs.cache)),
            place(values, pair_spec(specs.cache)))
  rows = (place(start, specs.rows), place(end, specs.rows))
  attend = lambda q, k, v, start, end: ak.kernel_layout_decode_attention(  # noqa: E731
      q, k, v, start, end, scale=128 ** -0.5, interpret="tpu", mesh=mesh)
  both = jax.jit(jax.vmap(attend, in_axes=(0, 0, 0, None, None), spmd_axis_name=parallel.PAIR))
  out = both(*placed, *rows)
  for i in range(2):
    alone = jax.jit(functools.partial(ak.kernel_layout_decode_attention, scale=128 ** -0.5, interpret="tpu"))
    np.testing.assert_array_equal(_f32(out[i]), _f32(alone(q[i], keys[i], values[i], start, end)))
  hlo = both.lower(*placed, *rows).compile().as_text()
  assert [c for c in COLLECTIVES if c + "(" in hlo or c + "-start(" in hlo] == []
  jaxpr = str(both.trace(*placed, *rows).jaxpr)
  assert "shard_map" in jaxpr and jaxpr.count("name=paged_attention") == 1  # one call for both models' rows


def test_tpu_lowering_uses_the_mosaic_kernel():
  """Lowered for TPU (no TPU needed), the platform_dependent wrapper is the Mosaic paged-attention call,
  on the cache as stored: b x kv_heads = 16 sequences of 3 pages of 256 slots, 4 query heads each."""
  q = jax.ShapeDtypeStruct((4, 1, 16, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4, 4, 768, 128), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((4,), jnp.int32)
  run = jax.jit(lambda *a: ak.kernel_layout_decode_attention(*a, scale=128 ** -0.5))
  text = run.trace(q, kv, kv, rows, rows).lower(lowering_platforms=("tpu",)).as_text()
  call = next(line for line in text.splitlines() if "@tpu_custom_call" in line)
  assert 'kernel_name = "paged_flash_attention_kernel_inline_seq_dim"' in call
  assert "tensor<1x48x256x128xbf16>" in call and "tensor<16x4x1x128xf32>" in call


# ---- On a mesh (8 simulated CPU devices): the kernel shard_mapped, each device on its own rows and heads.

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")


def _all_gathered_sizes(hlo: str) -> list[int]:
  """The element counts of the results of every all-gather in a compiled program's text."""
  sizes = []
  for line in hlo.splitlines():
    found = re.search(r"= \w+\[([\d,]*)\]\S* all-gather(?:-start)?\(", line)
    if found:
      sizes.append(int(np.prod([int(n) for n in found.group(1).split(",") if n])))
  return sizes


SHARDED_CASES = [  # (model_parallelism, heads, kv_heads, split heads over 'model')
    (4, 8, 4, True),    # data 2 x model 4
    (1, 8, 2, False),   # data 8 x model 1
    (4, 8, 2, False),   # data 2 x model 4, which does not divide the 2 kv heads: heads whole on each device
]


# The kernels' cases on a mesh: the GPU kernel with a window in float32, the TPU kernel (head_dim 128,
# a bfloat16 cache, no window shorter than the cache).
MESH_KERNELS = {"gpu": dict(head_dim=64, dtype=jnp.float32, window=100),
                "tpu": dict(head_dim=128, dtype=jnp.bfloat16, window=None)}


@pytest.mark.parametrize("kernel", list(MESH_KERNELS))
@pytest.mark.parametrize("model_parallelism,heads,kv_heads,splits_heads", SHARDED_CASES)
def test_sharded_kernel_equals_one_device_without_collectives(model_parallelism, heads, kv_heads, splits_heads,
                                                              kernel):
  """The interpreted kernel shard_mapped over the mesh, its operands placed as the engine places them:
  the one-device outputs, and a compiled program with no collective (XLA would otherwise gather
  the whole cache onto every device, as it must for a call it cannot partition)."""
  mesh = parallel.make_mesh(model_parallelism)
  case = MESH_KERNELS[kernel]
  slots, window, b, head_dim = 512, case["window"], 8, case["head_dim"]
  index = jnp.asarray([slots - 1, 40, slots - 2, 300, 0, 20, 7, 170], jnp.int32)
  start, end = decoder.visible_range(index, window)
  start = start.at[6].set(end[6])  # a row not live reads nothing
  q, keys, values = _inputs(b, heads, kv_heads, head_dim, slots, case["dtype"])
  specs = ak.mesh_specs(mesh, b, heads, kv_heads)
  heads_axis = parallel.MODEL if splits_heads else None
  assert specs.query == P(parallel.DATA, heads_axis, None) and specs.rows == P(parallel.DATA)
  assert specs.cache == P(parallel.DATA, heads_axis, None, None)
  place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  placed = (place(q, P(*specs.query[:1], None, *specs.query[1:])), place(keys, specs.cache),
            place(values, specs.cache), place(start, specs.rows), place(end, specs.rows))
  run = jax.jit(lambda *a: ak.kernel_layout_decode_attention(*a, scale=0.125, window=window, interpret=kernel,
                                                             mesh=mesh))
  out = run(*placed)
  one_device = _kernel_layout(q, keys, values, start, end, 0.125, window=window, interpret=kernel)
  np.testing.assert_array_equal(_f32(out), _f32(one_device))  # each device's rows, computed as on one
  assert np.all(_f32(out[6]) == 0)
  hlo = run.lower(*placed).compile().as_text()
  assert [c for c in COLLECTIVES if c + "(" in hlo or c + "-start(" in hlo] == []
  jaxpr = str(run.trace(*placed).jaxpr)
  assert "shard_map" in jaxpr and ("name=paged_attention" in jaxpr) == (kernel == "tpu")


def test_cuda_lowering_on_a_mesh_runs_the_triton_kernel_per_device():
  """Lowered for CUDA on a (data 2, model 4) mesh, the Triton call sits inside a manual computation
  over 'data' and 'model' whose operands are one device's rows and heads."""
  mesh = parallel.make_mesh(4)
  specs = ak.mesh_specs(mesh, 4, 16, 4)
  shape = lambda dims, spec: jax.ShapeDtypeStruct(dims, jnp.bfloat16, sharding=NamedSharding(mesh, spec))  # noqa: E731
  q = shape((4, 1, 16, 128), P(parallel.DATA, None, parallel.MODEL))
  kv = shape((4, 4, 768, 128), specs.cache)
  rows = jax.ShapeDtypeStruct((4,), jnp.int32, sharding=NamedSharding(mesh, specs.rows))
  run = jax.jit(lambda *a: ak.kernel_layout_decode_attention(*a, scale=128 ** -0.5, mesh=mesh))
  text = run.trace(q, kv, kv, rows, rows).lower(lowering_platforms=("cuda",)).as_text()
  assert "xla.gpu.triton" in text
  manual = next(line for line in text.splitlines() if "sdy.manual_computation" in line)
  assert 'manual_axes={"data", "model"}' in manual and "tensor<2x1x768x128xbf16>" in manual


# ---- The engine in the KERNEL layout (forced on CPU), against the TRANSPOSED layout and PyTorch.

import test_decoding  # noqa: E402  (its pair models, prompts and the bitwise independence harness)
from codit_jax.decoding import torch_reference  # noqa: E402
from codit_jax.decoding import engine as engine_lib  # noqa: E402
from codit_jax.decoding.engine import Engine  # noqa: E402


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_kernel_layout_engine_greedy_equals_transposed_and_torch(family):
  """CoDIT greedy decoding with 3 slots for 6 prompts (rows join mid-way), the full-attention layers
  through the interpreted Pallas GPU kernel: the same tokens as the CPU layout and the PyTorch reference."""
  post, pre, _ = test_decoding._jax_pair(family)
  torch_post, torch_pre = test_decoding._torch_pair(family)
  prompts = test_decoding._prompts(6)
  new = 8
  settings = test_decoding._settings(max_new_tokens=new)
  make = lambda: Engine(post, pre, settings, batch_size=3, max_prompt_len=64, min_bucket=16)  # noqa: E731
  transposed = test_decoding._generate(make(), prompts)
  with decoder.use_cache_layout(ak.KERNEL, interpret="gpu"):
    engine = make()
    kernel = test_decoding._generate(engine, prompts)
    empty = engine_lib._empty_cache(post, 3, engine.cache_len, stacked=False)
    for i, (keys, values) in enumerate(zip(empty.keys, empty.values)):
      entries = decoder.layer_cache_length(post.cfg, i, engine.cache_len)  # gemma3: rings of 16 on sliding layers
      assert [k.shape for k in keys] == [v.shape for v in values] == [(3, post.cfg.num_kv_heads, entries,
                                                                       post.cfg.head_dim)]
  for (_, ids), got, cpu in zip(prompts, kernel, transposed):
    tokens, lp_post, lp_pre, reason = torch_reference.generate(
        torch_post, torch_pre, [ids], end_ids=settings.end_ids, vocab_size=test_decoding.V, max_new_tokens=new,
        mode="codit")[0]
    assert got.tokens == cpu.tokens == tokens and got.finish_reason == reason
    np.testing.assert_allclose(got.post_logprobs, lp_post, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.pre_logprobs, lp_pre, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.codit_logprobs, cpu.codit_logprobs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_kernel_layout_row_is_independent_of_neighbours(temperature):
  """test_decoding's bitwise independence in the KERNEL layout with the interpreted kernel: a row's
  tokens and log-probs do not depend on its slot neighbours or admission time. The kernel reads each
  row's own [start, stop), in splits fixed by the cache length, so neighbours change no bit."""
  with decoder.use_cache_layout(ak.KERNEL, interpret="gpu"):
    alone, joined, engine, reasons = test_decoding._alone_and_joined(dict(batch_size=16), temperature=temperature)
  assert engine.cache_len == 2 * decoder.DECODE_BLOCK and reasons == {"stop", "length"}
  assert joined.tokens == alone.tokens and joined.finish_reason == alone.finish_reason
  for field in ("post_logprobs", "pre_logprobs", "codit_logprobs"):
    np.testing.assert_array_equal(getattr(joined, field), getattr(alone, field), err_msg=field)


def test_model_on_one_device_mesh_keeps_the_plain_call():
  post, _ = test_decoding._pair("llama")
  mesh = parallel.make_mesh(devices=jax.devices()[:1])
  assert all(layer.self_attn.kernel_mesh is None for layer in checkpoints.load_model(post, mesh=mesh).layers)
  assert all(layer.self_attn.kernel_mesh is None for layer in checkpoints.load_model(post).layers)


def _largest_cache_gather(engine, models, settings):
  """The most elements any all-gather of the compiled decode program returns, over one row's keys of
  one layer (kv_heads x cache length x head_dim): under 1, no all-gather moves any row's cache."""
  state = engine_lib.init_state(*models, settings=settings, slots=engine.batch_size, cache_len=engine.cache_len,
                                mesh=engine.mesh)
  program = engine_lib.decode_chunk.lower(*models, state, np.int32(0), np.int32(1), settings=settings,
                                          chunk_steps=2, mesh=engine.mesh)
  cfg = models[0].cfg
  return max(_all_gathered_sizes(program.compile().as_text()), default=0) / (
      cfg.num_kv_heads * engine.cache_len * cfg.head_dim)


def _kernel_layout_settings():
  """Greedy CoDIT, 16 new tokens after prompts of up to 64: a cache of 80 slots, which the kernel takes."""
  return test_decoding._settings(max_new_tokens=16)


@pytest.mark.parametrize("model_parallelism", [2, 4])  # data 4 x model 2 (kv heads split), data 2 x model 4 (not)
def test_kernel_layout_engine_on_a_mesh_equals_one_device(model_parallelism):
  """Greedy CoDIT through the interpreted kernel, shard_mapped over 8 devices: the one-device tokens,
  and no all-gather of the cache in the decode program."""
  examples = test_decoding._prompts(6)
  settings = _kernel_layout_settings()
  post, pre, _ = test_decoding._jax_pair("llama")
  post8, pre8, mesh = test_decoding._jax_pair("llama", model_parallelism)
  assert post8.layers[0].self_attn.kernel_mesh is mesh
  with decoder.use_cache_layout(ak.KERNEL, interpret="gpu"):
    single = test_decoding._generate(Engine(post, pre, settings, batch_size=4, max_prompt_len=64, min_bucket=16),
                                     examples)
    engine = Engine(post8, pre8, settings, batch_size=4, max_prompt_len=64, min_bucket=16, mesh=mesh)
    sharded = test_decoding._generate(engine, examples)
    cfg = post.cfg
    assert ak.gpu_kernel_fits((4, cfg.num_heads, cfg.head_dim), (4, cfg.num_kv_heads, engine.cache_len, cfg.head_dim))
    assert _largest_cache_gather(engine, (post8, pre8), settings) < 1
  for a, b in zip(single, sharded):
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    np.testing.assert_allclose(b.codit_logprobs, a.codit_logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model_parallelism", [2, 4])  # pair 2 x data 2 x model 2, pair 2 x data 1 x model 4
def test_kernel_layout_pair_parallel_equals_one_model_after_the_other(model_parallelism):
  """The engine vmaps each step over the pair (spmd_axis_name='pair'), which puts 'pair' into the
  kernel's shard_map: the same tokens as the two models in turn on one device, and no all-gather of
  the cache."""
  post_path, pre_path = test_decoding._same_shape_pair("llama")
  post, pre = (checkpoints.load_model(p) for p in (post_path, pre_path))
  mesh = parallel.make_mesh(model_parallelism=model_parallelism, pair_parallel=True)
  pair = checkpoints.load_pair(post_path, pre_path, mesh)
  assert pair.layers[0].self_attn.kernel_mesh is mesh
  examples = test_decoding._prompts(6)
  settings = _kernel_layout_settings()
  pair_settings = dataclasses.replace(settings, pair_parallel=True)
  with decoder.use_cache_layout(ak.KERNEL, interpret="gpu"):
    in_turn = test_decoding._generate(Engine(post, pre, settings, batch_size=4, max_prompt_len=64, min_bucket=16),
                                      examples)
    engine = Engine(pair, None, pair_settings, batch_size=4, max_prompt_len=64, min_bucket=16, mesh=mesh)
    side_by_side = test_decoding._generate(engine, examples)
    assert _largest_cache_gather(engine, (pair, None), pair_settings) < 1
  for a, b in zip(in_turn, side_by_side):
    assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
    np.testing.assert_allclose(b.pre_logprobs, a.pre_logprobs, atol=1e-5, rtol=0)
