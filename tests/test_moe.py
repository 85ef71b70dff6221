"""Mixture of experts (qwen3_moe, the Qwen3-30B-A3B pair) against transformers and against itself.

The tiny checkpoint (tests/tiny_checkpoints.py) has 8 experts, top 2,
norm_topk_prob, and a dense layer between two sparse ones; test_models.py runs
the family-wide checks on it (full forward and cached decode against
transformers, sharded against unsharded). Here: the routing itself, both
checkpoint layouts, expert parallelism, and greedy CoDIT against the PyTorch
reference.
"""

import functools
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from transformers.models.qwen3_moe import modeling_qwen3_moe

import test_models
import tiny_checkpoints
from codit_jax import checkpoints, parallel
from codit_jax.decoding import torch_reference
from codit_jax.decoding.engine import DecodeSettings, Engine
from codit_jax.models import Decoder, ModelConfig, decode_step, forward, moe, prefill
from codit_jax.models.decoder import SparseMoeBlock

FAMILY = "qwen3_moe"
V = tiny_checkpoints.TOKENIZER_SIZE


def _hf_config(**kw):
  fields = dict(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=4,
                num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2)
  fields.update(kw)
  return transformers.Qwen3MoeConfig(**fields)


@pytest.mark.parametrize("layers, step, mlp_only", [(4, 1, []), (4, 2, []), (6, 3, [2]), (5, 2, [3]), (3, 1, [1])])
def test_sparse_layers_are_transformers(layers, step, mlp_only):
  """decoder_sparse_step and mlp_only_layers pick the same sparse layers as Qwen3MoeDecoderLayer."""
  hf = _hf_config(num_hidden_layers=layers, decoder_sparse_step=step, mlp_only_layers=mlp_only)
  theirs = [i for i in range(layers)
            if isinstance(modeling_qwen3_moe.Qwen3MoeDecoderLayer(hf, i).mlp, modeling_qwen3_moe.Qwen3MoeSparseMoeBlock)]
  cfg = ModelConfig.from_hf(hf)
  assert list(cfg.moe_layers) == theirs
  model = nnx.eval_shape(lambda: Decoder(cfg))
  ours = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, SparseMoeBlock)]
  assert ours == theirs
  for i, layer in enumerate(model.layers):  # widths: intermediate_size dense, moe_intermediate_size per expert
    shape = layer.mlp.experts.up_proj.shape if i in theirs else layer.mlp.up_proj.kernel.shape
    assert shape == ((4, 16, 8) if i in theirs else (16, 32))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_is_transformers(norm_topk_prob):
  hf = _hf_config(num_experts=8, num_experts_per_tok=3, norm_topk_prob=norm_topk_prob)
  router = modeling_qwen3_moe.Qwen3MoeTopKRouter(hf)
  torch.nn.init.normal_(router.weight, std=1.0)
  x = np.random.default_rng(0).normal(size=(40, 16)).astype(np.float32)
  _, their_weights, their_experts = router(torch.tensor(x))
  weights, experts = moe.route(jnp.asarray(x), jnp.asarray(router.weight.detach().numpy().T), 3, norm_topk_prob)
  np.testing.assert_array_equal(np.asarray(experts), their_experts.numpy())
  np.testing.assert_allclose(np.asarray(weights), their_weights.detach().numpy(), atol=1e-6, rtol=0)


def _random_experts(num_experts=8, hidden=16, width=8, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape).astype(np.float32) / np.sqrt(shape[-2]))  # noqa: E731
  return normal(num_experts, hidden, width), normal(num_experts, hidden, width), normal(num_experts, width, hidden)


def test_routed_equals_dense_every_grouped_matmul():
  """Sorted routing (tile loop and ragged_dot) against every expert on every token; with an idle expert."""
  num_tokens, top_k = 37, 3
  gate, up, down = _random_experts()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(num_tokens, 16)).astype(np.float32))
  logits = rng.normal(size=(num_tokens, 8))
  logits[:, 5] = -30.0  # expert 5 gets no token: an empty group
  weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(logits, jnp.float32)), top_k)
  assert not np.any(np.asarray(experts) == 5)
  dense = moe.dense_experts(x, weights, experts, gate, up, down, jax.nn.silu)
  for grouped_mlp in (None, moe.ragged_expert_mlp, functools.partial(moe.tiled_expert_mlp, tile=8),
                      functools.partial(moe.tiled_expert_mlp, tile=64)):
    routed = jax.jit(moe.routed_experts, static_argnums=(6, 7))(x, weights, experts, gate, up, down, jax.nn.silu,
                                                                grouped_mlp)
    np.testing.assert_allclose(np.asarray(routed), np.asarray(dense), atol=1e-5, rtol=0, err_msg=str(grouped_mlp))


def test_experts_split_between_devices_add_up():
  """What expert parallelism relies on: each half of the experts, given ids shifted to its own, sums to the whole."""
  gate, up, down = _random_experts(seed=2)
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(21, 16)).astype(np.float32))
  weights, experts = jax.lax.top_k(jax.nn.softmax(jnp.asarray(rng.normal(size=(21, 8)), jnp.float32)), 2)
  whole = moe.routed_experts(x, weights, experts, gate, up, down, jax.nn.silu)
  halves = sum(moe.routed_experts(x, weights, experts - first, gate[first:first + 4], up[first:first + 4],
                                  down[first:first + 4], jax.nn.silu) for first in (0, 4))
  np.testing.assert_allclose(np.asarray(halves), np.asarray(whole), atol=1e-6, rtol=0)


@functools.lru_cache(maxsize=None)
def _stacked_layout_checkpoint():
  """The tiny checkpoint re-saved as transformers 5 keeps MoE weights in memory: experts stacked and gate/up fused."""
  hub = test_models._checkpoint(FAMILY)
  folder = tempfile.mkdtemp(prefix="tiny-qwen3_moe-stacked-")
  model = tiny_checkpoints.load_torch_model(hub, FAMILY)
  model.save_pretrained(folder, save_original_format=False)
  return folder


def _tensor_names(folder):
  names = set()
  for file in sorted(pathlib.Path(folder).glob("*.safetensors")):
    with safe_open(file, "np") as f:
      names |= set(f.keys())
  return names


def test_both_checkpoint_layouts_load_the_same_weights():
  hub, stacked = test_models._checkpoint(FAMILY), _stacked_layout_checkpoint()
  assert "model.layers.0.mlp.experts.7.gate_proj.weight" in _tensor_names(hub)  # save_pretrained's default
  assert {"model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"} <= _tensor_names(stacked)
  reference = nnx.state(checkpoints.load_model(hub))
  mesh = parallel.make_mesh(model_parallelism=4)
  # fsdp also splits the experts' in/out dimensions, so slices of the fused gate_up rows are read too.
  for folder, place in [(stacked, {}), (hub, dict(mesh=mesh, fsdp=True)), (stacked, dict(mesh=mesh, fsdp=True))]:
    loaded = nnx.state(checkpoints.load_model(folder, **place))
    for (path, ours), (_, theirs) in zip(loaded.flat_state(), reference.flat_state()):
      np.testing.assert_array_equal(np.asarray(ours.get_value()), np.asarray(theirs.get_value()),
                                    err_msg=f"{folder} {place} {path}")
  experts = checkpoints.load_model(stacked, mesh=mesh, fsdp=True).layers[0].mlp.experts.up_proj[...]
  assert experts.sharding.spec == jax.sharding.PartitionSpec("model", "data", None)


@pytest.mark.parametrize("layout", ["hub", "stacked"])
def test_every_slice_of_the_experts_reads_right(layout):
  """A device's slice of a stacked expert weight, any dimension cut anywhere, is that slice of the whole."""
  folder = test_models._checkpoint(FAMILY) if layout == "hub" else _stacked_layout_checkpoint()
  tensors = checkpoints.SafetensorsFolder(pathlib.Path(folder))
  whole = checkpoints.load_model(test_models._checkpoint(FAMILY)).layers[2].mlp.experts
  index = (slice(3, 7), slice(5, 40), slice(9, 30))
  for leaf in ("gate_proj", "up_proj", "down_proj"):
    expected = np.asarray(getattr(whole, leaf)[...])
    read = checkpoints._experts_reader(tensors, ("layers", 2, "mlp", "experts", leaf), expected.shape,
                                       ("model.", "lm_head."), np.dtype(np.float32))
    np.testing.assert_array_equal(read(index), expected[index], err_msg=leaf)
    np.testing.assert_array_equal(read(()), expected, err_msg=leaf)


def test_stacked_layout_logits_are_transformers():
  tokens, mask = test_models._prompts(FAMILY)
  logits, _ = jax.jit(forward)(checkpoints.load_model(_stacked_layout_checkpoint()), jnp.asarray(tokens),
                               jnp.asarray(mask))
  ref = test_models._reference_logits(FAMILY)
  assert np.abs(np.asarray(logits)[0] - ref[0]).max() < test_models.TOL
  assert np.abs(np.asarray(logits)[1, test_models.PAD:] - ref[1]).max() < test_models.TOL


def test_expert_parallel_equals_unsharded():
  """8 devices, one expert each (model parallelism 8): full forward, prefill and cached decode."""
  mesh = parallel.make_mesh(model_parallelism=8)
  model = checkpoints.load_model(test_models._checkpoint(FAMILY), dtype="float32", mesh=mesh)
  sparse = [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMoeBlock)]
  assert len(sparse) == 2 and all(block.expert_mesh is mesh for block in sparse)
  gate = sparse[0].experts.gate_proj[...]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("model", None, None)
  assert {shard.data.shape for shard in gate.addressable_shards} == {(1, tiny_checkpoints.HIDDEN_SIZE,
                                                                       tiny_checkpoints.MOE_INTERMEDIATE_SIZE)}
  tokens, mask = test_models._prompts(FAMILY)
  logits, _ = jax.jit(forward)(model, jnp.asarray(tokens), jnp.asarray(mask))
  full = test_models._jax_logits(FAMILY)
  np.testing.assert_allclose(np.asarray(logits), full, atol=5e-5, rtol=0)
  split = 64
  logits, cache = jax.jit(prefill, static_argnums=3)(model, *test_models._right_aligned(tokens, mask, split),
                                                     test_models.PROMPT_LEN)
  np.testing.assert_allclose(np.asarray(logits), full[:, split - 1], atol=5e-5, rtol=0)
  step = jax.jit(decode_step, donate_argnums=2)
  for t in range(split, split + 4):
    logits, cache = step(model, jnp.asarray(tokens[:, t]), cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, t], atol=5e-5, rtol=0, err_msg=f"slot {t}")


@functools.lru_cache(maxsize=None)
def _pair():
  return tiny_checkpoints.make_pair(tempfile.mkdtemp(prefix="pair-qwen3_moe-"), FAMILY)


def test_greedy_codit_equals_torch_reference():
  """As test_decoding.py::test_greedy_equals_torch_reference: 4 prompts, the longest 70 tokens, in 2 slots
  (rows join as others finish); and the engine on a ('data': 2, 'model': 4) mesh, experts split, writes
  the same tokens."""
  post_path, pre_path = _pair()
  post, pre = checkpoints.load_model(post_path), checkpoints.load_model(pre_path)
  torch_post, torch_pre = (tiny_checkpoints.load_torch_model(p, FAMILY) for p in (post_path, pre_path))
  rng = np.random.default_rng(0)
  prompts = [(f"ex{i}", rng.integers(0, V, size=n).tolist()) for i, n in enumerate((70, 12, 33, 5))]
  # Make a token the reference emits part-way an end token, so both 'stop' and 'length' rows occur.
  probe = torch_reference.generate(torch_post, torch_pre, [prompts[0][1]], end_ids=(), vocab_size=V,
                                   max_new_tokens=16)[0][0]
  end_ids = (probe[7],)
  settings = DecodeSettings(vocab_size=V, end_ids=end_ids, temperature=0.0, max_new_tokens=16)
  in_order = lambda engine: [{c.id: c for c in engine.run(prompts)}[i] for i, _ in prompts]  # noqa: E731
  completions = in_order(Engine(post, pre, settings, batch_size=2, max_prompt_len=96, min_bucket=96))
  mesh = parallel.make_mesh(model_parallelism=4)  # experts 2 per device, the batch over 'data'
  sharded = in_order(Engine(checkpoints.load_model(post_path, mesh=mesh), checkpoints.load_model(pre_path, mesh=mesh),
                            settings, batch_size=2, max_prompt_len=96, min_bucket=96, mesh=mesh))
  for got, on_mesh in zip(completions, sharded):
    assert on_mesh.tokens == got.tokens
    np.testing.assert_allclose(on_mesh.post_logprobs, got.post_logprobs, atol=5e-5, rtol=0)
  reasons = set()
  for (example_id, ids), got in zip(prompts, completions):
    tokens, lp_post, lp_pre, reason = torch_reference.generate(
        torch_post, torch_pre, [ids], end_ids=end_ids, vocab_size=V, max_new_tokens=16)[0]
    assert got.id == example_id
    assert got.tokens == tokens
    assert got.finish_reason == reason
    np.testing.assert_allclose(got.post_logprobs, lp_post, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.pre_logprobs, lp_pre, atol=1e-4, rtol=0)
    reasons.add(reason)
  assert reasons == {"stop", "length"}
