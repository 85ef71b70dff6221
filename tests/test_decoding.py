"""The CoDIT engine against a PyTorch reference, its sampler's statistics, and its invariances."""

import dataclasses
import functools
import logging
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import transformers

import tiny_checkpoints
from codit_jax import checkpoints, parallel
from codit_jax.decoding import sampling, torch_reference
from codit_jax.decoding import engine as engine_lib
from codit_jax.decoding.engine import DecodeSettings, Engine, check_vocabularies, prompt_buckets
from codit_jax.decoding.score import codit_score, log_probs
from codit_jax.errors import CoditError
from codit_jax.models import decoder, forward

V = tiny_checkpoints.TOKENIZER_SIZE
# Every family (qwen3_moe: tests/test_moe.py).
PAIR_FAMILIES = tuple(f for f in tiny_checkpoints.FAMILIES if f != "qwen3_moe")


@functools.lru_cache(maxsize=None)
def _pair(family):
  post, pre = tiny_checkpoints.make_pair(tempfile.mkdtemp(prefix=f"pair-{family}-"), family)
  return post, pre


@functools.lru_cache(maxsize=None)
def _jax_pair(family, mesh_shape=None):
  post, pre = _pair(family)
  mesh = parallel.make_mesh(model_parallelism=mesh_shape) if mesh_shape else None
  return checkpoints.load_model(post, mesh=mesh), checkpoints.load_model(pre, mesh=mesh), mesh


@functools.lru_cache(maxsize=None)
def _torch_pair(family):
  post, pre = _pair(family)
  return tuple(tiny_checkpoints.load_torch_model(p, family) for p in (post, pre))


def _prompts(n, seed=0, lengths=(5, 31, 12, 40, 9, 23)):
  rng = np.random.default_rng(seed)
  return [(f"ex{i}", rng.integers(0, V, size=lengths[i % len(lengths)]).tolist()) for i in range(n)]


def _generate(engine, examples):
  """The engine's completions of (id, ids) examples, in the examples' order."""
  by_id = {c.id: c for c in engine.run(examples)}
  assert len(by_id) == len(examples)
  return [by_id[example_id] for example_id, _ in examples]


def _settings(**kw):
  defaults = dict(vocab_size=V, end_ids=(V + 5,), temperature=0.0, max_new_tokens=20)  # no real end token
  defaults.update(kw)
  return DecodeSettings(**defaults)


@pytest.mark.parametrize("mode", ["codit", "direct"])
@pytest.mark.parametrize("family", PAIR_FAMILIES)
def test_greedy_equals_torch_reference(family, mode):
  """Mixed prompt lengths in batches of 4 vs. the reference one prompt at a time, unpadded."""
  post, pre, _ = _jax_pair(family)
  torch_post, torch_pre = _torch_pair(family)
  prompts = _prompts(6)
  # Make a token the reference emits part-way an end token, so both 'stop' and 'length' rows occur.
  probe = torch_reference.generate(torch_post, torch_pre, [prompts[0][1]], end_ids=(), vocab_size=V,
                                   max_new_tokens=20, mode=mode)[0][0]
  end_ids = (probe[7],)
  settings = _settings(mode=mode, end_ids=end_ids)
  # 3 slots for 6 prompts: rows join the running batch as others stop.
  engine = Engine(post, pre, settings, batch_size=3, max_prompt_len=64, min_bucket=16)
  completions = _generate(engine, prompts)
  assert engine.stats.prompts_done == 6
  reasons = set()
  for (example_id, ids), got in zip(prompts, completions):
    tokens, lp_post, lp_pre, reason = torch_reference.generate(
        torch_post, torch_pre, [ids], end_ids=end_ids, vocab_size=V, max_new_tokens=20, mode=mode)[0]
    assert got.id == example_id
    assert got.tokens == tokens
    assert got.finish_reason == reason
    np.testing.assert_allclose(got.post_logprobs, lp_post, atol=1e-4, rtol=0)
    if mode == "codit":
      np.testing.assert_allclose(got.pre_logprobs, lp_pre, atol=1e-4, rtol=0)
    else:
      assert got.pre_logprobs == []
    reasons.add(reason)
  assert reasons == {"stop", "length"}


def test_score_by_hand():
  lp_post = jnp.log(jnp.asarray([[0.5, 0.3, 0.004, 0.196]]))
  lp_pre = jnp.log(jnp.asarray([[0.25, 0.6, 0.05, 0.1]]))
  score = codit_score(lp_post, lp_pre, alpha=0.01, beta=1.0)
  # 0.004 < 0.01 * 0.5: out of the plausible set.
  np.testing.assert_allclose(np.exp(score[0]), [2.0, 0.5, 0.0, 1.96], rtol=1e-5)
  score_b2 = codit_score(lp_post, lp_pre, alpha=0.5, beta=2.0)
  np.testing.assert_allclose(np.exp(score_b2[0]), [0.5 / 0.0625, 0.3 / 0.36, 0.0, 0.0], rtol=1e-5)


def test_padded_rows_do_not_take_probability_mass():
  logits = jnp.asarray([[1.0, 2.0, 3.0, 50.0]])  # index 3 is a padding row of the embedding
  np.testing.assert_allclose(np.exp(log_probs(logits, 3)).sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 3)])
def test_sampler_follows_the_score(temperature, top_p, top_k):
  """Chi-square goodness of fit of 4000 first draws; false-alarm rate 1e-3 per case."""
  score = jnp.asarray([[1.0, 0.5, 0.2, -0.3, -1.0, -jnp.inf, 0.8, -2.0]])
  draws = 4000
  keys = sampling.step_keys(7, jnp.arange(draws), 0)
  tokens = sampling.sample(jnp.repeat(score, draws, axis=0), keys, temperature, top_p, top_k)
  expected = np.array(jax.nn.softmax(score[0] / temperature), np.float64)
  if top_k:
    expected[np.argsort(-expected)[top_k:]] = 0
  if top_p < 1:
    order = np.argsort(-expected)
    mass_before = np.cumsum(expected[order]) - expected[order]
    expected[order[mass_before >= top_p]] = 0
  expected /= expected.sum()
  counts = np.bincount(np.asarray(tokens), minlength=len(expected))
  assert counts[expected == 0].sum() == 0  # never outside the kept set
  support = expected > 0
  _, p_value = scipy.stats.chisquare(counts[support], expected[support] * draws)
  assert p_value > 1e-3


def test_top_k_at_or_past_the_vocabulary_keeps_every_token():
  score = jnp.asarray(np.random.default_rng(0).normal(size=(16, 8)), jnp.float32)
  keys = sampling.step_keys(3, jnp.arange(16), 5)
  unfiltered = sampling.sample(score, keys, 1.0, 1.0, 0)
  for top_k in (8, 9, 1000):
    np.testing.assert_array_equal(sampling.sample(score, keys, 1.0, 1.0, top_k), unfiltered)
  assert not np.array_equal(sampling.sample(score, keys, 1.0, 1.0, 1), unfiltered)


@pytest.mark.parametrize("key,value", [("beta", float("nan")), ("beta", float("inf")), ("beta", -0.5),
                                       ("temperature", float("nan")), ("temperature", float("inf")),
                                       ("alpha", float("nan")), ("top_p", float("nan"))])
def test_sampling_settings_that_are_not_finite_numbers_in_range_are_refused(key, value):
  # NaN passes a plain `beta < 0` check, and a NaN beta writes NaN scores and empty responses.
  settings = dict(mode="codit", alpha=0.01, beta=1.0, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8)
  engine_lib.check_sampling(**settings)
  with pytest.raises(CoditError, match=f"^{key} must be"):
    engine_lib.check_sampling(**dict(settings, **{key: value}))


def test_never_draws_outside_plausibility_set():
  family = "llama"
  post, pre, _ = _jax_pair(family)
  prompt = _prompts(1)[0][1]
  alpha = 0.2
  settings = _settings(alpha=alpha, temperature=1.0, max_new_tokens=1)
  examples = [(f"id{i}", prompt) for i in range(64)]
  completions = _generate(Engine(post, pre, settings, batch_size=64, max_prompt_len=64), examples)
  ids = jnp.asarray([prompt])
  logits, _ = forward(post, ids, jnp.ones_like(ids))
  lp = np.asarray(log_probs(logits[0, -1], V))
  plausible = set(np.flatnonzero(np.exp(lp) >= alpha * np.exp(lp).max()).tolist())
  drawn = {c.tokens[0] for c in completions}
  assert len(plausible) < 20  # the set is a real restriction of the 300 tokens
  assert drawn <= plausible and len(drawn) > 1


def _sampled(engine_kwargs, examples, family="qwen3", mesh_shape=None):
  post, pre, mesh = _jax_pair(family, mesh_shape)
  settings = _settings(temperature=1.0, top_p=0.95, max_new_tokens=12)
  engine = Engine(post, pre, settings, max_prompt_len=64, seed=3, mesh=mesh, **engine_kwargs)
  return {c.id: c.tokens for c in _generate(engine, examples)}


def test_example_tokens_independent_of_batch_and_devices():
  examples = _prompts(7)
  alone = _sampled(dict(batch_size=1), examples[3:4])
  in_batch = _sampled(dict(batch_size=4), examples)
  reordered = _sampled(dict(batch_size=3), examples[::-1])
  sharded = _sampled(dict(batch_size=4), examples, mesh_shape=2)  # 8 devices: data 4 x model 2
  assert alone["ex3"] == in_batch["ex3"]
  assert in_batch == reordered == sharded
  assert len({tuple(t) for t in in_batch.values()}) == len(examples)  # sampling, not a constant


def test_greedy_one_device_equals_eight():
  examples = _prompts(8)
  post, pre, _ = _jax_pair("gemma3")
  settings = _settings(max_new_tokens=16)
  single = _generate(Engine(post, pre, settings, batch_size=8, max_prompt_len=64), examples)
  post8, pre8, mesh = _jax_pair("gemma3", 4)
  sharded = _generate(Engine(post8, pre8, settings, batch_size=8, max_prompt_len=64, mesh=mesh), examples)
  assert [c.tokens for c in single] == [c.tokens for c in sharded]


@functools.lru_cache(maxsize=None)
def _same_shape_pair(family):
  """A pair whose embeddings are padded alike (make_pair pads them differently), as pair_parallel needs."""
  directory = tempfile.mkdtemp(prefix=f"same-shape-{family}-")
  return tuple(tiny_checkpoints.make_checkpoint(f"{directory}/{name}", family, seed=seed, pre_trained=name == "pre")
               for name, seed in (("post", 0), ("pre", 1)))


@pytest.mark.parametrize("family,padding", [("llama", "alike"), ("gemma3", "alike"), ("llama", "differently")])
def test_pair_parallel_equals_one_model_after_the_other(family, padding):
  """Each model on its own half of 8 devices (pair 2 x data 2 x model 2), both at once: the same tokens
  and log-probs as the two models run in turn on one device, greedy and sampled. Embeddings padded
  differently past the tokenizer (make_pair's) are padded with zero rows to the larger."""
  post_path, pre_path = _same_shape_pair(family) if padding == "alike" else _pair(family)
  post, pre = (checkpoints.load_model(p) for p in (post_path, pre_path))
  mesh = parallel.make_mesh(model_parallelism=2, pair_parallel=True)
  assert dict(mesh.shape) == {"pair": 2, "data": 2, "model": 2}
  pair = checkpoints.load_pair(post_path, pre_path, mesh)
  assert pair.layers[0].mlp.up_proj.kernel[...].sharding.spec[0] == "pair"
  embeddings = np.asarray(pair.embed_tokens.embedding[...])
  for which, model in enumerate((post, pre)):  # each model's rows, then zeros up to the larger padding
    own = np.asarray(model.embed_tokens.embedding[...])
    np.testing.assert_array_equal(embeddings[which, :len(own)], own)
    assert not embeddings[which, len(own):].any()
  assert (post.cfg.vocab_size != pre.cfg.vocab_size) == (padding == "differently")
  examples = _prompts(6)
  for sampling_kw in (dict(), dict(temperature=1.0, top_p=0.9)):
    in_turn = _generate(Engine(post, pre, _settings(**sampling_kw), batch_size=4, max_prompt_len=64, seed=3), examples)
    side_by_side = _generate(Engine(pair, None, _settings(pair_parallel=True, **sampling_kw), batch_size=4,
                                    max_prompt_len=64, seed=3, mesh=mesh), examples)
    for a, b in zip(in_turn, side_by_side):
      assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
      np.testing.assert_allclose(b.post_logprobs, a.post_logprobs, atol=1e-5, rtol=0)
      np.testing.assert_allclose(b.pre_logprobs, a.pre_logprobs, atol=1e-5, rtol=0)


def test_long_generation_reads_cache_by_blocks_alone_and_pair_parallel():
  """A batch with a cache of 4 DECODE_BLOCKs (prompt bucket 32 + 992 new tokens): its steps read the
  cache by visible blocks (one, then two), then whole; the models in turn and side by side agree."""
  post_path, pre_path = _same_shape_pair("llama")
  post, pre = (checkpoints.load_model(p) for p in (post_path, pre_path))
  mesh = parallel.make_mesh(model_parallelism=2, pair_parallel=True)
  pair = checkpoints.load_pair(post_path, pre_path, mesh)
  examples = _prompts(4, lengths=(5, 31, 12, 20))
  assert decoder.cache_length(32 + 992) == 4 * decoder.DECODE_BLOCK
  in_turn = _generate(Engine(post, pre, _settings(max_new_tokens=992), batch_size=4, max_prompt_len=32), examples)
  side_by_side = _generate(Engine(pair, None, _settings(max_new_tokens=992, pair_parallel=True), batch_size=4,
                                  max_prompt_len=32, mesh=mesh), examples)
  for a, b in zip(in_turn, side_by_side):
    assert len(a.tokens) == 992 and a.tokens == b.tokens
    np.testing.assert_allclose(b.pre_logprobs, a.pre_logprobs, atol=1e-4, rtol=0)


def test_pair_parallel_refusals():
  mesh = parallel.make_mesh(pair_parallel=True)
  with pytest.raises(CoditError, match="differ in .*pair_parallel stacks"):
    checkpoints.load_pair(_pair("llama")[0], _pair("qwen3")[1], mesh)
  with pytest.raises(CoditError, match="'pair' axis"):
    checkpoints.load_pair(*_same_shape_pair("llama"), parallel.make_mesh())
  with pytest.raises(CoditError, match="two halves"):
    parallel.make_mesh(model_parallelism=8, pair_parallel=True)
  with pytest.raises(CoditError, match="needs mode 'codit'"):
    _settings(mode="direct", pair_parallel=True)
  pair = checkpoints.load_pair(*_same_shape_pair("llama"), mesh)
  with pytest.raises(CoditError, match="stacked pair"):
    Engine(pair, pair, _settings(pair_parallel=True), batch_size=4, max_prompt_len=64, mesh=mesh)


def _alone_and_joined(engine_kwargs, mesh_shape=None, **settings_kw):
  """Example 'x' (the longest prompt, so admitted last) decoded alone in an empty batch, and decoded
  after joining a running batch of 19 others at another slot and time."""
  post, pre, mesh = _jax_pair("llama", mesh_shape)
  settings = _settings(max_new_tokens=160, **settings_kw)
  make = lambda: Engine(post, pre, settings, max_prompt_len=100, min_bucket=32, seed=5, mesh=mesh,  # noqa: E731
                        **engine_kwargs)
  rng = np.random.default_rng(4)
  others = [(f"o{i}", rng.integers(0, V, size=int(n)).tolist()) for i, n in enumerate(rng.integers(3, 60, 19))]
  x = ("x", rng.integers(0, V, size=90).tolist())
  # An end token the neighbours draw now and then, so that their rows stop at different times.
  end = int(np.bincount(np.concatenate([c.tokens for c in _generate(make(), others[:4])])).argmax())
  settings = dataclasses.replace(settings, end_ids=(end,))
  make = lambda: Engine(post, pre, settings, max_prompt_len=100, min_bucket=32, seed=5, mesh=mesh,  # noqa: E731
                        **engine_kwargs)
  alone = {c.id: c for c in make().run([x])}["x"]
  joined_engine = make()
  joined = {c.id: c for c in joined_engine.run(others + [x])}
  reasons = {c.finish_reason for c in joined.values()}
  return alone, joined["x"], joined_engine, reasons


@pytest.mark.parametrize("mesh_shape", [None, 2])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_row_is_independent_of_slot_neighbours_and_admission_time(temperature, mesh_shape):
  """Bit for bit: a row's tokens and log-probs do not depend on what else runs in the batch, on 1 device
  and on 8 (data 4 x model 2). The cache (100 + 160 slots, 2 blocks) makes steps read the blocks
  that neighbours need and this row does not."""
  alone, joined, engine, reasons = _alone_and_joined(dict(batch_size=16), mesh_shape, temperature=temperature)
  assert engine.cache_len == 2 * decoder.DECODE_BLOCK and engine.group_size(32) == 2
  assert reasons == {"stop", "length"}  # neighbours left at different times
  assert joined.tokens == alone.tokens and joined.finish_reason == alone.finish_reason
  for field in ("post_logprobs", "pre_logprobs", "codit_logprobs"):
    np.testing.assert_array_equal(getattr(joined, field), getattr(alone, field), err_msg=field)
  assert engine.stats.utilization < 1.0 and engine.stats.slot_steps > 0


@functools.lru_cache(maxsize=None)
def _tpu_kernel_pair():
  """A one-layer llama pair at head_dim 128 in bfloat16: a shape the TPU kernel takes (the tiny
  models' head_dim 16 is not one)."""
  paths = tiny_checkpoints.make_pair(tempfile.mkdtemp(prefix="tpu-kernel-pair-"), "llama",
                                     config_overrides=dict(head_dim=128, num_hidden_layers=1))
  return tuple(checkpoints.load_model(p, dtype="bfloat16") for p in paths)


def test_tpu_kernel_rows_are_independent_and_agree_with_the_reference(monkeypatch):
  """The engine on the KERNEL layout with the Pallas TPU kernel interpreted (what a TPU runs in
  bfloat16): rows join a batch of 2 slots as others leave, free slots are length-0 rows of the
  kernel, and a row's tokens and log-probs are bit for bit those it gets alone. Against the pure-jnp
  reference on the same layout: the same greedy tokens, log-probs within bfloat16 rounding."""
  from codit_jax.models import attention_kernels  # pylint: disable=g-import-not-at-top
  post, pre = _tpu_kernel_pair()
  traced = []
  kernel = attention_kernels.tpu_kernel_decode_attention
  monkeypatch.setattr(attention_kernels, "tpu_kernel_decode_attention",
                      lambda *a, **kw: traced.append(a[1].shape) or kernel(*a, **kw))
  examples = _prompts(3)
  # 116 prompt slots + 12 new tokens: a cache of 128 slots, one page of the kernel.
  make = lambda: Engine(post, pre, _settings(max_new_tokens=12), batch_size=2, max_prompt_len=116, seed=5)  # noqa: E731
  with decoder.use_cache_layout(attention_kernels.KERNEL, interpret="tpu"):
    engine = make()
    assert engine.cache_len == 128 and attention_kernels.tpu_page(engine.cache_len) == 128
    joined = _generate(engine, examples)
    alone = _generate(make(), examples[2:])[0]
  assert traced and set(traced) == {(2, tiny_checkpoints.NUM_KV_HEADS, 128, 128)}  # both models' decode steps
  assert engine.stats.utilization < 1.0  # a slot sat free while the last row finished
  assert alone.tokens == joined[2].tokens
  for field in ("post_logprobs", "pre_logprobs", "codit_logprobs"):
    np.testing.assert_array_equal(getattr(joined[2], field), getattr(alone, field), err_msg=field)
  with decoder.use_cache_layout(attention_kernels.KERNEL):  # the reference, as CPU runs it
    reference = _generate(make(), examples)
  for kernel_row, reference_row in zip(joined, reference):
    assert kernel_row.tokens == reference_row.tokens
    np.testing.assert_allclose(kernel_row.post_logprobs, reference_row.post_logprobs, atol=0.05, rtol=0)


def test_codit_logprobs_are_the_contrastive_distribution():
  """codit_logprobs: log_softmax of the masked CoDIT score at the drawn token (before temperature);
  checked against the models' logits directly for the first token."""
  post, pre, _ = _jax_pair("llama")
  prompt = _prompts(1)[0]
  settings = _settings(temperature=0.7, max_new_tokens=1)
  got = _generate(Engine(post, pre, settings, batch_size=2, max_prompt_len=64), [prompt])[0]
  ids = jnp.asarray([prompt[1]])
  lp_post = log_probs(forward(post, ids, jnp.ones_like(ids))[0][0, -1], V)
  lp_pre = log_probs(forward(pre, ids, jnp.ones_like(ids))[0][0, -1], V)
  contrastive = np.asarray(jax.nn.log_softmax(codit_score(lp_post, lp_pre, 0.01, 1.0)))
  token = got.tokens[0]
  np.testing.assert_allclose(got.codit_logprobs[0], contrastive[token], atol=1e-5)
  np.testing.assert_allclose(got.post_logprobs[0], np.asarray(lp_post)[token], atol=1e-5)
  assert np.isfinite(contrastive[token]) and got.end_codit_logprob is None


def test_compiled_programs_bounded_by_buckets():
  post, pre, _ = _jax_pair("llama")
  settings = _settings(max_new_tokens=3)
  engine = Engine(post, pre, settings, batch_size=4, max_prompt_len=100, min_bucket=16)
  assert engine.buckets == (16, 32, 64, 100) == prompt_buckets(100, 16)
  rng = np.random.default_rng(1)
  examples = [(str(i), rng.integers(0, V, size=n).tolist()) for i, n in enumerate(rng.integers(1, 101, 40))]
  programs = (engine_lib.init_state, engine_lib.admit, engine_lib.decode_chunk)
  before = [p._cache_size() for p in programs]  # pylint: disable=protected-access
  _generate(engine, examples)
  _generate(engine, examples[:5])  # another run, fewer prompts: the same programs
  grown = [p._cache_size() - b for p, b in zip(programs, before)]  # pylint: disable=protected-access
  assert grown[0] == 1 and grown[2] == 1  # one empty batch, one decode program
  assert grown[1] <= len(engine.buckets)  # one admit program per prompt bucket
  with pytest.raises(CoditError, match="exceeds max_prompt_len"):
    _generate(engine, [("long", [1] * 101)])


def test_finished_rows_are_handed_on_while_the_next_chunk_runs(monkeypatch):
  """The rows a chunk finished come out of Engine.run once the next chunk is dispatched (so the caller's
  work on them, writing the dataset, overlaps the devices'), except after the last chunk; each exactly once."""
  post, pre, _ = _jax_pair("llama")
  rng = np.random.default_rng(3)
  examples = [(f"e{i}", rng.integers(0, V, size=int(n)).tolist()) for i, n in enumerate(rng.integers(3, 30, 9))]
  end = int(np.bincount(np.concatenate([c.tokens for c in _generate(
      Engine(post, pre, _settings(), batch_size=4, max_prompt_len=32, min_bucket=32), examples[:3])])).argmax())
  settings = _settings(end_ids=(end,))
  events = []  # ("dispatch", chunk) | ("chunk done", chunk, prompts done so far) | ("completion", id)
  real_decode_chunk = engine_lib.decode_chunk

  def dispatching(*args, **kwargs):
    events.append(("dispatch", sum(e[0] == "dispatch" for e in events) + 1))
    return real_decode_chunk(*args, **kwargs)

  monkeypatch.setattr(engine_lib, "decode_chunk", dispatching)
  engine = Engine(post, pre, settings, batch_size=4, max_prompt_len=32, min_bucket=32, chunk_steps=3)
  # on_chunk runs after the chunk last dispatched has finished.
  on_chunk = lambda stats: events.append(  # noqa: E731
      ("chunk done", max(e[1] for e in events if e[0] == "dispatch"), stats.prompts_done))
  completions = []
  for completion in engine.run(examples, on_chunk=on_chunk):
    completions.append(completion)
    events.append(("completion", completion.id))
  chunks = max(e[1] for e in events if e[0] == "dispatch")
  assert sorted(c.id for c in completions) == sorted(i for i, _ in examples)
  assert {c.finish_reason for c in completions} == {"stop", "length"} and chunks > 3
  done_after = [e for e in events if e[0] == "chunk done"]
  for n, index in enumerate(i for i, e in enumerate(events) if e[0] == "completion"):
    chunk = next(c for _, c, done in done_after if done > n)  # the chunk that finished the n-th row
    dispatched = [i for i, e in enumerate(events) if e == ("dispatch", chunk + 1)]
    if chunk < chunks:
      assert dispatched and dispatched[0] < index, (n, chunk, events)  # handed on once the next chunk runs
    assert not [e for e in events[:index] if e[0] == "chunk done" and e[1] > chunk + 1], (n, events)  # not later


@pytest.mark.parametrize("model_parallelism", [None, 2], ids=["one-device", "mesh"])
def test_compile_ahead_from_abstract_models_compiles_each_program_once_off_the_main_thread(model_parallelism, caplog):
  """compile_ahead, on an engine made with the models' abstract stand-ins (no weights read), compiles
  the decode program and the admit program of each bucket the prompts fall in, in background threads;
  after use_models hands over the loaded models the run calls exactly those programs (none compiles
  again on the main thread) and gives the same completions as a run that compiles each program when
  it needs it."""
  post, pre, mesh = _jax_pair("llama", model_parallelism)
  shapes = [checkpoints.load_model(path, mesh=mesh, abstract=True) for path in _pair("llama")]
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
  # Shapes that no other test compiles (max_new_tokens, 5 slots): every program compiles here.
  settings = _settings(max_new_tokens=11 + (model_parallelism or 0))
  examples = _prompts(7)  # 5 to 40 tokens: buckets 16, 32 and 64

  def engine(post, pre):
    return Engine(post, pre, settings, batch_size=5, max_prompt_len=64, min_bucket=16, mesh=mesh)

  jax.config.update("jax_log_compiles", True)  # globally: the context manager is the calling thread's
  try:
    with caplog.at_level(logging.WARNING):
      ahead_engine = engine(*shapes)
      ahead_engine.compile_ahead([len(ids) for _, ids in examples])
      with pytest.raises(CoditError, match="abstract stand-ins"):
        next(ahead_engine.run(examples))
      ahead_engine.use_models(post, pre)
      ahead = {c.id: c for c in ahead_engine.run(examples)}
  finally:
    jax.config.update("jax_log_compiles", False)
  compiled = [(re.search(r"XLA compilation of jit\((\w+)\)", r.getMessage()).group(1), r.threadName)
              for r in caplog.records if "XLA compilation of jit(" in r.getMessage()]
  programs = [(name, thread.startswith("codit-compile")) for name, thread in compiled
              if name in ("_admit", "_decode_chunk")]
  assert sorted(programs) == [("_admit", True)] * 3 + [("_decode_chunk", True)], compiled
  as_needed = {c.id: c for c in engine(post, pre).run(examples)}
  assert ahead == as_needed and len(ahead) == 7


def test_use_models_refuses_models_the_programs_were_not_compiled_for():
  post, pre, _ = _jax_pair("llama")
  shapes = [checkpoints.load_model(path, abstract=True) for path in _pair("llama")]
  engine = Engine(*shapes, _settings(), batch_size=2, max_prompt_len=16)
  bf16 = checkpoints.load_model(_pair("llama")[1], dtype="bfloat16")
  with pytest.raises(CoditError, match=r"pre_trained model loaded is not .* bfloat16\[.*not float32"):
    engine.use_models(post, bf16)
  with pytest.raises(CoditError, match="pre_trained model loaded is not"):
    engine.use_models(post, None)
  engine.use_models(post, pre)
  assert engine.post is post and engine.pre is pre


def test_tokenizers_that_disagree_are_refused(tmp_path):
  llama = transformers.AutoTokenizer.from_pretrained(_pair("llama")[0])
  qwen = transformers.AutoTokenizer.from_pretrained(_pair("qwen3")[0])
  assert check_vocabularies(llama, transformers.AutoTokenizer.from_pretrained(_pair("llama")[1])) == V
  with pytest.raises(CoditError, match="disagree .*first differences.*its own pre-trained checkpoint"):
    check_vocabularies(llama, qwen)


def test_bad_settings_refused():
  with pytest.raises(CoditError, match="mode"):
    _settings(mode="contrastive")
  with pytest.raises(CoditError, match="top_p"):
    _settings(top_p=0.0)
  post, _, _ = _jax_pair("llama")
  with pytest.raises(CoditError, match="needs a pre-trained model"):
    Engine(post, None, _settings(), batch_size=2, max_prompt_len=16)
