"""The JAX decoder against transformers' PyTorch models, family by family, in float32.

Each tiny checkpoint is built offline by tests/tiny_checkpoints.py, saved with
save_pretrained and loaded back through codit_jax.checkpoints, the path real
checkpoints take. Prompts are 72 tokens: longer than the sliding windows (16)
and than llama3 rope scaling's original context (32).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny_checkpoints
from codit_jax import checkpoints, parallel
from codit_jax.models import decode_step, decoder, forward, prefill

FAMILIES = tiny_checkpoints.FAMILIES
PROMPT_LEN = 72
PAD = 9  # left padding of the second row
TOL = 1e-4


@functools.lru_cache(maxsize=None)
def _checkpoint(family):
  import tempfile  # pylint: disable=g-import-not-at-top
  folder = tempfile.mkdtemp(prefix=f"tiny-{family}-")
  # Several shards, so the index path of the loader is what every test uses.
  return tiny_checkpoints.make_checkpoint(folder, family, max_shard_size="40KB")


@functools.lru_cache(maxsize=None)
def _prompts(family):
  """A (2, PROMPT_LEN) batch: row 0 full, row 1 left-padded by PAD; and its mask."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, tiny_checkpoints.TOKENIZER_SIZE, size=(2, PROMPT_LEN)).astype(np.int32)
  tokens[1, :PAD] = 0
  mask = np.ones((2, PROMPT_LEN), np.int32)
  mask[1, :PAD] = 0
  return tokens, mask


def _right_aligned(tokens, mask, split):
  """The first `split` slots of a left-padded batch as prefill takes them: each row's real tokens
  from slot 0 (right-padded), and their lengths. Decoding then feeds the batch's later columns."""
  rows = np.zeros((tokens.shape[0], split), np.int32)
  for r in range(tokens.shape[0]):
    real = tokens[r, :split][mask[r, :split].astype(bool)]
    rows[r, :len(real)] = real
  return jnp.asarray(rows), jnp.asarray(mask[:, :split].sum(axis=1), jnp.int32)


@functools.lru_cache(maxsize=None)
def _reference_logits(family):
  """transformers' logits for each row alone, unpadded: [(PROMPT_LEN, V), (PROMPT_LEN - PAD, V)]."""
  path = _checkpoint(family)
  if family == "gemma3_multimodal":
    model = transformers.Gemma3ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
  else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager")
  tokens, mask = _prompts(family)
  rows = []
  with torch.no_grad():
    for row, row_mask in zip(tokens, mask):
      ids = torch.tensor(row[row_mask.astype(bool)], dtype=torch.long)[None]
      rows.append(model(input_ids=ids).logits[0].numpy())
  return rows


@functools.lru_cache(maxsize=None)
def _model(family):
  return checkpoints.load_model(_checkpoint(family), dtype="float32")


@functools.lru_cache(maxsize=None)
def _jax_logits(family):
  tokens, mask = _prompts(family)
  logits, _ = jax.jit(forward)(_model(family), jnp.asarray(tokens), jnp.asarray(mask))
  return np.asarray(logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_forward_equals_transformers(family):
  ours = _jax_logits(family)
  ref = _reference_logits(family)
  assert np.abs(ours[0] - ref[0]).max() < TOL
  assert np.abs(ours[1, PAD:] - ref[1]).max() < TOL
  # The comparison is meaningful only if logits are not tiny.
  assert ref[0].std() > 0.3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_long_sequence_attends_by_query_blocks(family, monkeypatch):
  """Over decoder.QUERY_BLOCK queries (here 16, so a 72-slot prompt takes 5 blocks, the last one padded)
  attention runs block by block, in bounded memory: still transformers' logits."""
  monkeypatch.setattr(decoder, "QUERY_BLOCK", 16)
  tokens, mask = _prompts(family)
  blocked = np.asarray(jax.jit(lambda m, t, a: forward(m, t, a)[0])(_model(family), jnp.asarray(tokens),
                                                                    jnp.asarray(mask)))
  ref = _reference_logits(family)
  assert np.abs(blocked[0] - ref[0]).max() < TOL
  assert np.abs(blocked[1, PAD:] - ref[1]).max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_row_equals_row_alone(family):
  tokens, mask = _prompts(family)
  alone, _ = jax.jit(forward)(_model(family), jnp.asarray(tokens[1:, PAD:]), jnp.asarray(mask[1:, PAD:]))
  # Two float32 programs of different shapes (a padded batch of 2, one row alone) sum in different
  # orders: olmo2's post-norm blocks reach 1.01e-5 on logits of magnitude ~3 with jax 0.10.2 (also at
  # the commit before this session's changes), so the bound is 2e-5, still 5x under TOL.
  np.testing.assert_allclose(_jax_logits(family)[1, PAD:], np.asarray(alone)[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decode_equals_full_forward(family):
  """Prefill 40 slots (the second row's 31 real tokens from slot 0), then feed the remaining 32 tokens
  one by one through the static cache."""
  model = _model(family)
  tokens, mask = _prompts(family)
  split = 40
  logits, cache = jax.jit(prefill, static_argnums=3)(model, *_right_aligned(tokens, mask, split), PROMPT_LEN + 8)
  entries = decoder.layer_cache_length(model.cfg, 0, PROMPT_LEN + 8)  # the window for mistral's sliding layers
  assert [k.shape for k in cache.keys[0]] == [(2, tiny_checkpoints.NUM_KV_HEADS, tiny_checkpoints.HEAD_DIM, entries)]
  assert [v.shape for v in cache.values[0]] == [(2, tiny_checkpoints.NUM_KV_HEADS, entries, tiny_checkpoints.HEAD_DIM)]
  full = _jax_logits(family)
  np.testing.assert_allclose(np.asarray(logits), full[:, split - 1], atol=TOL, rtol=0)
  step = jax.jit(decode_step, donate_argnums=2)
  for t in range(split, PROMPT_LEN):
    logits, cache = step(model, jnp.asarray(tokens[:, t]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=TOL, rtol=0, err_msg=f"slot {t}")
  np.testing.assert_array_equal(np.asarray(cache.index), [PROMPT_LEN, PROMPT_LEN - PAD])  # slot = position


@pytest.mark.parametrize("family", ["gemma3", "olmo3", "mistral"])
def test_sliding_layers_keep_a_ring_of_their_window(family):
  """Sliding layers cache only their window (16 slots of 80) and stay exact far past it: 60 tokens
  decoded one by one after a 12-slot prompt (the second row left-padded by 9) give the full
  forward's logits, and so does a prompt longer than the window (40 slots)."""
  model = _model(family)
  cfg = model.cfg
  tokens, mask = _prompts(family)
  max_len = PROMPT_LEN + 8
  full = _jax_logits(family)
  step = jax.jit(decode_step, donate_argnums=2)
  for split in (12, 40):
    _, cache = jax.jit(prefill, static_argnums=3)(model, *_right_aligned(tokens, mask, split), max_len)
    windows = [cfg.window_for(i) for i in range(cfg.num_layers)]
    assert any(windows) and tiny_checkpoints.SLIDING_WINDOW == 16
    for window, keys, values in zip(windows, cache.keys, cache.values):
      assert sum(k.shape[-1] for k in keys) == sum(v.shape[-2] for v in values) == (window or max_len)
    for t in range(split, PROMPT_LEN):
      logits, cache = step(model, jnp.asarray(tokens[:, t]), cache)
      np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=TOL, rtol=0, err_msg=f"slot {t}")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decode_past_one_cache_block_equals_full_forward(family):
  """A cache of 4 DECODE_BLOCKs: decode steps on both sides of the first block boundary read only the
  one or two blocks that can hold visible keys (gemma3's sliding layers skip blocks behind their
  window) and still give the full forward's logits; with left padding in the second row."""
  block = decoder.DECODE_BLOCK
  length, split = block + 24, block - 8
  assert decoder.cache_length(length) == 2 * block and decoder.cache_length(block) == block
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, tiny_checkpoints.TOKENIZER_SIZE, size=(2, length)).astype(np.int32)
  mask = np.ones((2, length), np.int32)
  mask[1, :PAD] = 0
  model = _model(family)
  full, _ = jax.jit(forward)(model, jnp.asarray(tokens), jnp.asarray(mask))
  logits, cache = jax.jit(prefill, static_argnums=3)(model, *_right_aligned(tokens, mask, split), 4 * block)
  # On CPU each block of a full layer's cache is an array of its own (decoder.cache_blocks).
  full_layers = [keys for i, keys in enumerate(cache.keys)
                 if decoder.layer_cache_length(model.cfg, i, 4 * block) == 4 * block]
  assert full_layers and all([k.shape[-1] for k in keys] == [block] * 4 for keys in full_layers)
  step = jax.jit(decode_step)
  for t in range(split, length):
    logits, cache = step(model, jnp.asarray(tokens[:, t]), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, t], atol=TOL, rtol=0, err_msg=f"slot {t}")


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_equals_unsharded(family):
  assert jax.device_count() == 8
  mesh = parallel.make_mesh(model_parallelism=4)  # ('data': 2, 'model': 4)
  model = checkpoints.load_model(_checkpoint(family), dtype="float32", mesh=mesh)
  q_kernel = model.layers[0].self_attn.q_proj.kernel[...]
  assert q_kernel.sharding.spec == jax.sharding.PartitionSpec(None, "model")
  assert len(q_kernel.addressable_shards) == 8
  tokens, mask = _prompts(family)
  batch = parallel.batch_sharding(mesh, tokens.shape)
  logits, _ = jax.jit(forward)(model, jax.device_put(tokens, batch), jax.device_put(mask, batch))
  np.testing.assert_allclose(np.asarray(logits), _jax_logits(family), atol=5e-5, rtol=0)  # float32 sums in another order across shards


# ---- The KERNEL cache layout (GPU, TPU: keys (b, kv_heads, L, head_dim)), forced on CPU.

@pytest.fixture(params=["reference", "interpreted_kernel"])
def kernel_layout(request):
  """Programs traced in the test use the KERNEL layout; its full-attention layers run the pure-jnp
  reference (what CPU runs, and TPU with a float32 cache) or the Pallas GPU kernel in interpret mode
  (what GPU runs; the tiny models' head_dim 16 is no TPU kernel shape: tests/test_attention_kernels.py)."""
  from codit_jax.models import attention_kernels  # pylint: disable=g-import-not-at-top
  interpret = "gpu" if request.param == "interpreted_kernel" else None
  with decoder.use_cache_layout(attention_kernels.KERNEL, interpret=interpret):
    yield request.param


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_kernel_layout_cached_decode_equals_full_forward(family, kernel_layout):
  """As test_cached_decode_equals_full_forward, with the KERNEL layout: keys (b, kv, L, d); gemma3's
  sliding layers (rings of 16 entries) read by the masked path, its full layers by the kernel."""
  model = _model(family)
  cfg = model.cfg
  tokens, mask = _prompts(family)
  full = _jax_logits(family)
  split, max_len = 12, PROMPT_LEN + 8
  logits, cache = jax.jit(prefill, static_argnums=3)(model, *_right_aligned(tokens, mask, split), max_len)
  for i, (keys, values) in enumerate(zip(cache.keys, cache.values)):
    entries = decoder.layer_cache_length(cfg, i, max_len)
    assert [k.shape for k in keys] == [v.shape for v in values] == [
        (2, tiny_checkpoints.NUM_KV_HEADS, entries, tiny_checkpoints.HEAD_DIM)]
  assert (family == "gemma3") == any(decoder.layer_cache_length(cfg, i, max_len) < max_len
                                     for i in range(cfg.num_layers))
  np.testing.assert_allclose(np.asarray(logits), full[:, split - 1], atol=TOL, rtol=0)
  # The step runs the kernel: interpreted, or behind platform_dependent (the reference on CPU).
  step_jaxpr = str(jax.jit(decode_step).trace(model, jnp.asarray(tokens[:, split]), cache).jaxpr)
  assert "pallas_call" in step_jaxpr
  assert ("interpret=True" in step_jaxpr) == (kernel_layout == "interpreted_kernel")
  assert ("platform_index" in step_jaxpr) == (kernel_layout == "reference")
  step = jax.jit(decode_step, donate_argnums=2)
  for t in range(split, PROMPT_LEN):
    logits, cache = step(model, jnp.asarray(tokens[:, t]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=TOL, rtol=0, err_msg=f"slot {t}")
  np.testing.assert_array_equal(np.asarray(cache.index), [PROMPT_LEN, PROMPT_LEN - PAD])


def test_kernel_layout_decode_past_one_cache_block(kernel_layout):
  """gemma3 with a cache of 4 DECODE_BLOCKs in the KERNEL layout: the full layers' kernel splits the
  cache (2 splits of 512 slots), the reference reads it by blocks; a few steps across the first
  block boundary give the full forward's logits."""
  block = decoder.DECODE_BLOCK
  length, split = block + 4, block - 4
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, tiny_checkpoints.TOKENIZER_SIZE, size=(2, length)).astype(np.int32)
  mask = np.ones((2, length), np.int32)
  mask[1, :PAD] = 0
  model = _model("gemma3")
  full, _ = jax.jit(forward)(model, jnp.asarray(tokens), jnp.asarray(mask))
  _, cache = jax.jit(prefill, static_argnums=3)(model, *_right_aligned(tokens, mask, split), 4 * block)
  step = jax.jit(decode_step)
  for t in range(split, length):
    logits, cache = step(model, jnp.asarray(tokens[:, t]), cache)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full)[:, t], atol=TOL, rtol=0, err_msg=f"slot {t}")


def test_cache_layout_is_restored_and_picked_by_backend():
  from codit_jax.models import attention_kernels  # pylint: disable=g-import-not-at-top
  assert decoder.cache_layout() == attention_kernels.TRANSPOSED  # CPU
  with decoder.use_cache_layout(attention_kernels.KERNEL, interpret="tpu"):
    assert decoder.cache_layout() == attention_kernels.KERNEL and decoder.INTERPRET_KERNEL == "tpu"
    assert decoder.key_cache_shape(2, 16, 80) == (2, 80, 16)
  assert decoder.cache_layout() == attention_kernels.TRANSPOSED and decoder.INTERPRET_KERNEL is None
  with pytest.raises(ValueError, match="interpret must be one of"):
    with decoder.use_cache_layout(attention_kernels.KERNEL, interpret=True):
      pass
  assert decoder.key_cache_shape(2, 16, 80) == (2, 16, 80)
  with pytest.raises(ValueError):
    with decoder.use_cache_layout("sideways"):
      pass
