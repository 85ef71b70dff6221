"""The decode engine: both models of a pair, continuously batched.

The running batch has B slots (B = batch_size). A slot holds one example at a
time; when its row stops, the slot is refilled with a waiting prompt while the
other rows go on, so no row waits for a longer neighbour. The device state is
one pytree, `DecodeState`, of fixed shapes for the whole run: both models' KV
caches (one length for every slot: the longest prompt bucket plus
max_new_tokens), each row's cache write index, which is its rope position (in the caches),
its last token, the tokens it emitted so far, a done flag, its example's hash,
and the output buffers of what it emitted.

Three compiled programs, in the shape of JetStream's engine (prefill, insert,
generate) and MaxText's offline engine:
  * `init_state` (one program): the empty batch, every slot free.
  * `admit` (one program per prompt bucket): prefill a group of waiting prompts,
    right-padded to the bucket (each row's sequence starts at slot 0), in both models; draw their first tokens; scatter
    their caches and rows into free slots. A group has a fixed size per bucket
    (about `admit_tokens` tokens); its padding rows target slot B and are
    dropped by the scatter.
  * `decode_chunk` (one program): a while_loop of up to `chunk_steps` decode
    steps of every live row, leaving early once `min_free` slots are free (a
    refill pays off) or no row is live.
The host (`Engine.run`) loops: admit waiting prompts (in length order) into the
free slots, dispatch a chunk, hand on the rows the chunk before finished (the
caller's work on them, writing the dataset, runs while the devices decode), read
the replicated done flags. The state is donated to every program, and nothing
returns to the host per token. `Engine.compile_ahead` (codit-generate) compiles
the decode program and the admit programs of the run's buckets in background
threads, from the models' shapes alone: while the weights load and the first
rows decode, instead of one after another as each is needed.

A row's tokens depend only on its own data: its prompt, its sampling keys
fold_in(fold_in(key(seed), hash(id)), t) with t its own token index, its own
cache slots. Decode attention reads the cache blocks that any live row can see,
and a block no key of which a row sees leaves that row's result exactly as it
was (`models.decoder.attend_step`), so slot, neighbours and admission time
change no bit of a row. With several processes every process makes the same
admit and refill decisions from the same waiting list and the replicated done
flags, feeds the same groups, and reports the rows of its own devices.

With `pair_parallel` the post-trained argument is both models stacked
(`checkpoints.load_pair`) and each model step is vmapped over the pair with
the mesh's 'pair' axis as its SPMD axis: each half of the devices runs one
model, both at once, and only the logits cross between the halves.

Profiles (codit-generate's `profile_dir`) show each op under its block's
jax.named_scope: prefill_post_trained / step_post_trained / step_pre_trained /
step_pair, then the decoder's layer_<i>/attention and layer_<i>/mlp (or moe),
embed and logits; score, sample, insert, record and stop here.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import time
from collections import deque
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codit_jax import parallel
from codit_jax.data import prompts
from codit_jax.decoding import repetition_stop, sampling
from codit_jax.decoding.score import codit_score, log_probs
from codit_jax.errors import CoditError
from codit_jax.models import Decoder, KVCache, decode_step, prefill
from codit_jax.models.decoder import cache_blocks, cache_length, key_cache_shape, layer_cache_length

MODES = ("codit", "direct")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Static settings of the decode programs (hashable: a jit static argument)."""

  vocab_size: int  # the tokenizer's real vocabulary
  end_ids: tuple[int, ...]  # any of them stops a row
  mode: str = "codit"
  alpha: float = 0.01
  beta: float = 1.0
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  max_new_tokens: int = 4096
  pair_parallel: bool = False  # the models are one stacked Decoder split over the mesh's 'pair' axis
  # Stop a row whose last tokens loop (finish reason 'repetitive'); None: rows run to an end token
  # or max_new_tokens, as the reference does.
  stop_repetitive: repetition_stop.RepetitionRule | None = None

  def __post_init__(self):
    check_sampling(self.mode, self.alpha, self.beta, self.temperature, self.top_p, self.top_k, self.max_new_tokens)
    if self.pair_parallel and self.mode != "codit":
      raise CoditError("pair_parallel runs the two models of a pair side by side: it needs mode 'codit'.")
    if not self.end_ids:
      raise CoditError("no end token ids: the post-trained model's generation_config and tokenizer name none.")


def check_sampling(mode, alpha, beta, temperature, top_p, top_k, max_new_tokens) -> None:
  """Refuses decoding settings out of range, naming the config key (before any model is loaded)."""
  if mode not in MODES:
    raise CoditError(f"mode {mode!r} is not one of {', '.join(MODES)}: set --config.mode=codit or direct.")
  if not 0 < alpha <= 1:
    raise CoditError(f"alpha must be in (0, 1] (the published value is 0.01); got {alpha}.")
  if not 0 <= beta < math.inf:  # written so that NaN is refused too
    raise CoditError(f"beta must be a finite number >= 0 (the published value is 1.0); got {beta}.")
  if not 0 <= temperature < math.inf:
    raise CoditError(f"temperature must be a finite number >= 0 (0 is greedy); got {temperature}.")
  if not 0 < top_p <= 1:
    raise CoditError(f"top_p must be in (0, 1]; got {top_p}.")
  if top_k < 0:
    raise CoditError(f"top_k must be >= 0 (0 is off; one at or past the vocabulary keeps every token); "
                     f"got {top_k}.")
  if max_new_tokens < 1:
    raise CoditError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")


class Rows(NamedTuple):
  """Per-slot state of the running batch, each (B,). A row's cache write index, which is its rope
  position, is in the KV caches (`KVCache.index`, the same in both models)."""

  token: jax.Array  # the last token drawn: the next step's input
  emitted: jax.Array  # tokens emitted so far, the end token included
  done: jax.Array  # the slot is free: its row stopped, or it never held one
  hash: jax.Array  # the example's hash, for its sampling keys


class Outputs(NamedTuple):
  """What each slot's row emitted, (B, max_new_tokens): its first `emitted` entries (the end token
  included); each token's log-prob under the unmodified post- and pre-trained distributions (pre: 0
  in direct mode) and under the contrastive one (log_softmax of the CoDIT score, before temperature;
  the post-trained one in direct mode)."""

  tokens: jax.Array
  post_logprobs: jax.Array
  pre_logprobs: jax.Array
  codit_logprobs: jax.Array


class DecodeState(NamedTuple):
  """The running batch on the devices."""

  caches: object  # (post KVCache, pre KVCache or None); one stacked KVCache with pair_parallel
  rows: Rows
  out: Outputs


class ChunkReport(NamedTuple):
  """What the host reads after a chunk. The first three are replicated, so every process takes the
  same decisions; emitted and out are the rows' counts and outputs at the chunk's end, sharded as the
  state's rows (each process reads its own) and buffers of their own: the host reads the finished rows
  from them while the next chunk runs on the state, which it was donated."""

  done: jax.Array  # (B,)
  steps: jax.Array  # decode steps the chunk ran
  live_slot_steps: jax.Array  # sum over those steps of the live rows: the useful slot-steps
  emitted: jax.Array  # (B,)
  out: Outputs


def _over_pair(stacked: Decoder, fn, *stacked_args):
  """fn(model, *args) for both models of a stacked pair at once: vmapped over the leading
  (post, pre) axis, which the mesh's 'pair' axis splits, so each half of the devices runs one."""
  graphdef, state = nnx.split(stacked)
  return jax.vmap(lambda s, *a: fn(nnx.merge(graphdef, s), *a), spmd_axis_name=parallel.PAIR)(state, *stacked_args)


def _prefill_models(post, pre, tokens, lengths, max_len: int, settings: DecodeSettings):
  """(post logits, pre logits or None, caches) after the prompts."""
  if settings.pair_parallel:
    with jax.named_scope("prefill_pair"):
      logits, caches = _over_pair(post, lambda model: prefill(model, tokens, lengths, max_len))
    return logits[0], logits[1], caches
  with jax.named_scope("prefill_post_trained"):
    post_logits, post_cache = prefill(post, tokens, lengths, max_len)
  pre_logits, pre_cache = None, None
  if settings.mode == "codit":
    with jax.named_scope("prefill_pre_trained"):
      pre_logits, pre_cache = prefill(pre, tokens, lengths, max_len)
  return post_logits, pre_logits, (post_cache, pre_cache)


def _step_models(post, pre, token, caches, live, settings: DecodeSettings):
  """One decode step of the model(s): (post logits, pre logits or None, caches)."""
  if settings.pair_parallel:
    # Write slots and live rows are the same for both models: kept out of the vmap, so that the
    # blocks a step reads (DECODE_BLOCK) are a plain loop, not one batched over the pair.
    index = caches.index[0]
    with jax.named_scope("step_pair"):
      logits, caches = _over_pair(
          post, lambda model, cache: decode_step(model, token, cache._replace(index=index), live), caches)
    return logits[0], logits[1], caches
  with jax.named_scope("step_post_trained"):
    post_logits, post_cache = decode_step(post, token, caches[0], live)
  pre_logits, pre_cache = None, None
  if settings.mode == "codit":
    with jax.named_scope("step_pre_trained"):
      pre_logits, pre_cache = decode_step(pre, token, caches[1], live)
  return post_logits, pre_logits, (post_cache, pre_cache)


def _choose(settings: DecodeSettings, post_logits, pre_logits, seed, hashes, steps):
  """Scores one step and draws a token per row: (token, its post, pre and contrastive log-probs)."""
  with jax.named_scope("score"):
    lp_post = log_probs(post_logits, settings.vocab_size)
    if settings.mode == "codit":
      lp_pre = log_probs(pre_logits, settings.vocab_size)
      score = codit_score(lp_post, lp_pre, settings.alpha, settings.beta)
    else:
      lp_pre, score = None, lp_post
  with jax.named_scope("sample"):
    token = sampling.sample(score, sampling.step_keys(seed, hashes, steps), settings.temperature, settings.top_p,
                            settings.top_k)
  pick = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]  # noqa: E731
  # The drawn token's entry of log_softmax(score), without materializing the whole vocabulary's.
  lp_codit = pick(score) - jax.nn.logsumexp(score, axis=-1) if settings.mode == "codit" else pick(lp_post)
  return token, pick(lp_post), pick(lp_pre) if lp_pre is not None else jnp.zeros_like(lp_codit), lp_codit


# ---- The state's layout on the mesh: every program leaves it in the same shardings, so that one
# compiled decode program serves the whole run.

def _state_specs(state: DecodeState, mesh: Mesh, pair_parallel: bool):
  """PartitionSpecs of the state: slots over 'data', the caches' kv heads over 'model', the pair
  axis (with pair_parallel) over 'pair'."""
  lead = (parallel.PAIR,) if pair_parallel else ()

  # Keys and values have their kv heads on axis 1 (after the pair axis) in both cache layouts.
  def cache_spec(leaf, kv_heads_axis: bool):
    dims = leaf.shape[len(lead):]
    spec = (parallel.DATA, parallel.MODEL) if kv_heads_axis else (parallel.DATA,)
    return P(*lead, *parallel.fit_spec(spec, dims, mesh))

  def caches_specs(cache: KVCache | None):
    if cache is None:
      return None
    blocks = lambda tree: jax.tree.map(lambda leaf: cache_spec(leaf, True), tree)  # noqa: E731
    return KVCache(keys=blocks(cache.keys), values=blocks(cache.values), index=cache_spec(cache.index, False))

  caches = caches_specs(state.caches) if pair_parallel else tuple(caches_specs(c) for c in state.caches)
  rows = jax.tree.map(lambda x: parallel.fit_spec((parallel.DATA,), x.shape, mesh), state.rows)
  out = jax.tree.map(lambda x: parallel.fit_spec((parallel.DATA,), x.shape, mesh), state.out)
  return DecodeState(caches, rows, out)


def _constrain(state: DecodeState, mesh: Mesh | None, pair_parallel: bool) -> DecodeState:
  if mesh is None:
    return state
  specs = _state_specs(state, mesh, pair_parallel)
  return jax.tree.map(lambda spec, x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec)), specs, state,
                      is_leaf=lambda x: isinstance(x, P))


def _abstract(tree, mesh: Mesh | None):
  """Shapes, dtypes and (on a mesh) shardings of the arrays of `tree`: what a program compiles for.
  Without a mesh the arrays are uncommitted (on the default device), and so are their stand-ins, or the
  calls would not find the programs compiled for them in jax's caches."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding if mesh else None), tree)


def _replicated(x, mesh: Mesh | None):
  return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))


# ---- The three programs.

def _empty_cache(model: Decoder, slots: int, length: int, stacked: bool) -> KVCache:
  cfg = model.cfg
  dtype = model.embed_tokens.embedding[...].dtype
  lead = (2,) if stacked else ()
  zeros = lambda *shape, dtype=dtype: jnp.zeros(lead + shape, dtype)  # noqa: E731
  entries = [layer_cache_length(cfg, i, length) for i in range(cfg.num_layers)]
  return KVCache(
      keys=tuple(tuple(zeros(slots, *key_cache_shape(cfg.num_kv_heads, cfg.head_dim, n)) for n in cache_blocks(e))
                 for e in entries),
      values=tuple(tuple(zeros(slots, cfg.num_kv_heads, n, cfg.head_dim) for n in cache_blocks(e)) for e in entries),
      index=zeros(slots, dtype=jnp.int32))


def _init_state(post: Decoder, pre: Decoder | None, *, settings: DecodeSettings, slots: int, cache_len: int,
                mesh: Mesh | None) -> DecodeState:
  if settings.pair_parallel:
    caches = _empty_cache(post, slots, cache_len, stacked=True)
  else:
    caches = (_empty_cache(post, slots, cache_len, False),
              _empty_cache(pre, slots, cache_len, False) if pre is not None else None)
  rows = Rows(token=jnp.zeros((slots,), jnp.int32), emitted=jnp.zeros((slots,), jnp.int32),
              done=jnp.ones((slots,), bool), hash=jnp.zeros((slots,), jnp.int32))
  n = settings.max_new_tokens
  out = Outputs(*(jnp.zeros((slots, n), dtype) for dtype in (jnp.int32, jnp.float32, jnp.float32, jnp.float32)))
  return _constrain(DecodeState(caches, rows, out), mesh, settings.pair_parallel)


def _admit(post, pre, state: DecodeState, tokens, lengths, hashes, slots, seed, *, settings: DecodeSettings,
           cache_len: int, mesh: Mesh | None) -> DecodeState:
  """Prefills a group of prompts (tokens: (G, bucket), right-padded; lengths: (G,)), draws each one's
  first token and puts it into its slot (slots: (G,); B for padding rows, which the scatter drops)."""
  post_logits, pre_logits, group_caches = _prefill_models(post, pre, tokens, lengths, cache_len, settings)
  token, lp_post, lp_pre, lp_codit = _choose(settings, post_logits, pre_logits, seed, hashes, 0)
  end_ids = jnp.asarray(settings.end_ids, jnp.int32)
  group = tokens.shape[0]
  rows = Rows(token=token, emitted=jnp.ones((group,), jnp.int32),
              done=jnp.isin(token, end_ids) | (settings.max_new_tokens == 1), hash=hashes)
  first = lambda value, dtype: jnp.zeros((group, settings.max_new_tokens), dtype).at[:, 0].set(value)  # noqa: E731
  out = Outputs(first(token, jnp.int32), first(lp_post, jnp.float32), first(lp_pre, jnp.float32),
                first(lp_codit, jnp.float32))
  into = lambda full, part: full.at[slots].set(part, mode="drop")  # noqa: E731
  into_pair = lambda full, part: full.at[:, slots].set(part, mode="drop")  # noqa: E731
  with jax.named_scope("insert"):
    caches = jax.tree.map(into_pair if settings.pair_parallel else into, state.caches, group_caches)
    new = DecodeState(caches, jax.tree.map(into, state.rows, rows), jax.tree.map(into, state.out, out))
  return _constrain(new, mesh, settings.pair_parallel)


def _decode_chunk(post, pre, state: DecodeState, seed, min_free, *, settings: DecodeSettings, chunk_steps: int,
                  mesh: Mesh | None) -> tuple[DecodeState, ChunkReport]:
  """Up to chunk_steps decode steps of every live row; leaves early once min_free slots are free."""
  end_ids = jnp.asarray(settings.end_ids, jnp.int32)
  n = settings.max_new_tokens
  slots = state.rows.done.shape[0]

  def keep_going(carry):
    step, _, st = carry
    return (step < chunk_steps) & ~jnp.all(st.rows.done) & (jnp.sum(st.rows.done) < min_free)

  def one_step(carry):
    step, live_steps, st = carry
    rows, live = st.rows, ~st.rows.done
    post_logits, pre_logits, caches = _step_models(post, pre, rows.token, st.caches, live, settings)
    token, *logprobs = _choose(settings, post_logits, pre_logits, seed, rows.hash, rows.emitted)
    column = jnp.where(live, rows.emitted, n)  # out of bounds for rows not live: dropped
    write = lambda buf, value: buf.at[jnp.arange(slots), column].set(value.astype(buf.dtype), mode="drop")  # noqa: E731
    with jax.named_scope("record"):
      out = Outputs(*(write(buf, value) for buf, value in zip(st.out, (token, *logprobs))))
    emitted = rows.emitted + live.astype(jnp.int32)
    with jax.named_scope("stop"):
      ended = jnp.isin(token, end_ids) | (emitted >= n)
      if settings.stop_repetitive is not None:
        ended |= repetition_stop.repeats_cycle(out.tokens, emitted, settings.stop_repetitive)
    done = rows.done | (live & ended)
    rows = Rows(token=jnp.where(live, token, rows.token), emitted=emitted, done=done, hash=rows.hash)
    return step + 1, live_steps + jnp.sum(live.astype(jnp.int32)), DecodeState(caches, rows, out)

  zero = jnp.asarray(0, jnp.int32)
  steps, live_steps, state = jax.lax.while_loop(keep_going, one_step, (zero, zero, state))
  state = _constrain(state, mesh, settings.pair_parallel)
  # Copies: the state's own buffers are the next program's (donated) before the host reads them.
  rows_emitted, rows_out = jax.tree.map(jnp.copy, (state.rows.emitted, state.out))
  report = ChunkReport(_replicated(state.rows.done, mesh), _replicated(steps, mesh), _replicated(live_steps, mesh),
                       rows_emitted, rows_out)
  return state, report


init_state = jax.jit(_init_state, static_argnames=("settings", "slots", "cache_len", "mesh"))
admit = jax.jit(_admit, static_argnames=("settings", "cache_len", "mesh"), donate_argnames=("state",))
decode_chunk = jax.jit(_decode_chunk, static_argnames=("settings", "chunk_steps", "mesh"), donate_argnames=("state",))


def abstract_state(post, pre, *, settings: DecodeSettings, slots: int, cache_len: int, mesh: Mesh | None):
  """The shapes, dtypes and shardings of `init_state`'s state, from the models' shapes alone (they
  may be abstract: checkpoints.load_model(..., abstract=True))."""
  shapes = init_state.eval_shape(post, pre, settings=settings, slots=slots, cache_len=cache_len, mesh=mesh)
  if mesh is None:
    return shapes
  return jax.tree.map(lambda spec, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec)),
                      _state_specs(shapes, mesh, settings.pair_parallel), shapes,
                      is_leaf=lambda x: isinstance(x, P))


@dataclasses.dataclass
class Completion:
  """One finished example. Tokens and per-token log-probs exclude the end token."""

  id: str
  tokens: list[int]
  finish_reason: str  # 'stop' | 'length' | 'repetitive'
  post_logprobs: list[float]
  pre_logprobs: list[float]  # empty in direct mode
  codit_logprobs: list[float]  # under the contrastive distribution (the post-trained one in direct mode)
  end_codit_logprob: float | None  # the end token's contrastive log-prob; None when the row ran out of tokens


@dataclasses.dataclass
class EngineStats:
  """Running totals of a run, for progress lines and benchmarks."""

  prompts_done: int = 0  # rows finished (all processes)
  generated_tokens: int = 0  # emitted tokens, the end tokens included (all processes)
  seconds: float = 0.0  # on the devices' programs and the host loop, from the first admit
  slot_steps: int = 0  # B x decode steps run
  live_slot_steps: int = 0  # of those, the steps of a live row
  waiting_slot_steps: int = 0  # slot-steps of the chunks run while prompts were waiting
  waiting_live_slot_steps: int = 0
  live_slots: int = 0  # rows running after the last chunk

  @property
  def utilization(self) -> float:
    """Useful slot-steps over slot-steps run."""
    return self.live_slot_steps / self.slot_steps if self.slot_steps else math.nan

  @property
  def utilization_while_waiting(self) -> float:
    return self.waiting_live_slot_steps / self.waiting_slot_steps if self.waiting_slot_steps else math.nan

  @property
  def tokens_per_second(self) -> float:
    return self.generated_tokens / self.seconds if self.seconds else math.nan


def prompt_buckets(max_prompt_len: int, min_bucket: int = 32) -> tuple[int, ...]:
  """Powers of two from min_bucket, the last one max_prompt_len itself."""
  buckets, size = [], min_bucket
  while size < max_prompt_len:
    buckets.append(size)
    size *= 2
  return tuple(buckets) + (max_prompt_len,)


def check_vocabularies(post_tokenizer, pre_tokenizer, post_source: str = "post_trained",
                       pre_source: str = "pre_trained") -> int:
  """The real vocabulary size shared by the pair; refuses tokenizers that disagree on any real token."""
  post_vocab, pre_vocab = post_tokenizer.get_vocab(), pre_tokenizer.get_vocab()
  if post_vocab != pre_vocab:
    diffs = sorted(set(post_vocab.items()) ^ set(pre_vocab.items()), key=lambda kv: kv[1])[:5]
    shown = ", ".join(f"{token!r}->{i}" for token, i in diffs)
    raise CoditError(
        f"the tokenizers of {post_source} ({len(post_vocab)} tokens) and {pre_source} ({len(pre_vocab)} "
        f"tokens) disagree (first differences: {shown}). CoDIT contrasts the two models token by token, so "
        "both must share one tokenizer: pair a post-trained model with its own pre-trained checkpoint.")
  return prompts.real_vocab_size(post_tokenizer, post_source)


class Engine:
  """Decodes prompts (already tokenized) with one model (direct) or a pair (CoDIT), continuously batched.

  With settings.pair_parallel, `post` is the pair from `checkpoints.load_pair` and `pre` is None.
  The models may be their abstract stand-ins (`checkpoints.load_model(..., abstract=True)`): enough
  to `compile_ahead` while the weights load; `use_models` then hands over the loaded ones.
  batch_size: the slots of the running batch. chunk_steps: the most decode steps between two looks
  of the host at the batch. admit_tokens: about how many prompt tokens one admit program prefills
  (its group size per bucket; at most batch_size / 8 rows, so that a refill waits for few free slots).
  """

  def __init__(self, post: Decoder, pre: Decoder | None, settings: DecodeSettings, *, batch_size: int,
               max_prompt_len: int, seed: int = 0, mesh: Mesh | None = None, min_bucket: int = 32,
               chunk_steps: int = 32, admit_tokens: int = 1024):
    if settings.pair_parallel:
      if pre is not None or mesh is None or parallel.PAIR not in mesh.shape:
        raise CoditError("pair_parallel takes both models as one stacked pair (checkpoints.load_pair) in "
                         "place of the post-trained model, no pre-trained model, and a mesh with a 'pair' axis.")
    elif settings.mode == "codit" and pre is None:
      raise CoditError("mode 'codit' needs a pre-trained model; use mode 'direct' for the post-trained one alone.")
    for name, model in (("post_trained", post), ("pre_trained", pre)):
      if model is not None and model.cfg.vocab_size < settings.vocab_size:
        raise CoditError(
            f"the {name} model's embedding has {model.cfg.vocab_size} rows, fewer than the tokenizer's "
            f"{settings.vocab_size} tokens: the checkpoint and its tokenizer do not belong together.")
    if batch_size < 1 or chunk_steps < 1 or admit_tokens < 1:
      raise CoditError("batch_size, chunk_steps and admit_tokens must be at least 1.")
    self.post, self.pre = post, (pre if settings.mode == "codit" else None)
    self.settings, self.batch_size, self.seed, self.mesh = settings, batch_size, seed, mesh
    self.chunk_steps, self.admit_tokens = chunk_steps, admit_tokens
    self.max_prompt_len = max_prompt_len
    self.buckets = prompt_buckets(max_prompt_len, min(min_bucket, max_prompt_len))
    self.cache_len = cache_length(self.buckets[-1] + settings.max_new_tokens)
    self.stats = EngineStats()
    self._compiling = {}  # ("admit", bucket) or "decode": the future of its compile (compile_ahead)

  def use_models(self, post: Decoder, pre: Decoder | None) -> None:
    """Takes the loaded models in place of the ones the engine was made with (their abstract
    stand-ins), which they must match in structure, shapes, dtypes and shardings: the programs
    compiled ahead are compiled for those."""
    for name, old, new in (("post_trained", self.post, post), ("pre_trained", self.pre, pre)):
      problem = _mismatch(old, new, self.mesh)
      if problem:
        raise CoditError(f"the {name} model loaded is not the one the engine was made with: {problem}.")
    self.post, self.pre = post, pre

  def bucket_for(self, length: int) -> int:
    if length > self.max_prompt_len:
      raise CoditError(f"prompt of {length} tokens exceeds max_prompt_len {self.max_prompt_len}.")
    return next(b for b in self.buckets if b >= length)

  def group_size(self, bucket: int) -> int:
    """Rows of one admit program for prompts of `bucket` tokens."""
    return max(1, min(self.batch_size // 8, self.admit_tokens // bucket))

  def run(self, examples: Sequence[tuple[str, Sequence[int]]],
          on_chunk: Callable[[EngineStats], None] | None = None) -> Iterator[Completion]:
    """Completions of (id, prompt ids) pairs, as their rows finish (this process's rows only).

    Every process of a multi-process run calls this with the same examples; each
    gets back the rows that its devices decoded. Prompts are admitted shortest
    first. A chunk's finished rows come out once the next chunk is dispatched, so
    the caller's work on them overlaps the devices' (the last chunk's at the end).
    on_chunk(stats) is called after every decode chunk. A program that
    `compile_ahead` is compiling is waited for, not compiled a second time.
    """
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves((self.post, self.pre))):
      raise CoditError("the engine holds the models' abstract stand-ins: give it the loaded models "
                       "(Engine.use_models) before running it.")
    for _, ids in examples:
      self.bucket_for(len(ids))
    waiting = deque(sorted(examples, key=lambda e: len(e[1])))
    occupant: list[tuple[str, Sequence[int]] | None] = [None] * self.batch_size
    seed = np.int32(self.seed)
    started = time.perf_counter()
    state = init_state(self.post, self.pre, settings=self.settings, slots=self.batch_size,
                       cache_len=self.cache_len, mesh=self.mesh)
    try:
      yield from self._loop(state, seed, waiting, occupant, started, on_chunk)
    finally:
      for future in self._compiling.values():
        future.cancel()  # those not started (the run ended early); running ones finish in their thread

  def _ready(self, key) -> None:
    """Waits for `compile_ahead`'s compile of program `key`, if any; says so when it must wait."""
    future = self._compiling.get(key)
    if future is None:
      return
    if not future.done():
      name = "decode program" if key == "decode" else f"admit program of prompts up to {key[1]} tokens"
      logging.info("waiting for the %s to compile.", name)
    future.result()

  def _loop(self, state, seed, waiting, occupant, started, on_chunk) -> Iterator[Completion]:
    # The rows the last chunk finished: handed on once the next chunk is dispatched, so that the host's
    # work on them (the caller writes the dataset) overlaps the devices' instead of leaving them idle.
    pending = None
    while waiting or any(o is not None for o in occupant):
      free = [s for s, o in enumerate(occupant) if o is None]
      while waiting and free:
        bucket = self.bucket_for(len(waiting[0][1]))
        size = self.group_size(bucket)
        group = []
        while waiting and len(group) < min(size, len(free)) and self.bucket_for(len(waiting[0][1])) == bucket:
          group.append(waiting.popleft())
        targets, free = free[:len(group)], free[len(group):]
        self._ready(("admit", bucket))
        state = admit(self.post, self.pre, state, *self._group_inputs(group, targets, bucket, size), seed,
                      settings=self.settings, cache_len=self.cache_len, mesh=self.mesh)
        for example, slot in zip(group, targets):
          occupant[slot] = example
      min_free = min(self.group_size(self.bucket_for(len(waiting[0][1]))), len(waiting)) if waiting else \
          self.batch_size
      self._ready("decode")
      state, report = decode_chunk(self.post, self.pre, state, seed, np.int32(min_free), settings=self.settings,
                                   chunk_steps=self.chunk_steps, mesh=self.mesh)
      if pending is not None:
        yield from self._completions(*pending)
      done = np.asarray(report.done)  # waits for the chunk
      finished = [s for s, o in enumerate(occupant) if o is not None and done[s]]
      self._count(report, bool(waiting), len(finished))
      pending = (report, finished, [occupant[s] for s in finished]) if finished else None
      for s in finished:
        occupant[s] = None
      self.stats.live_slots = sum(o is not None for o in occupant)
      self.stats.seconds = time.perf_counter() - started
      if on_chunk is not None:
        on_chunk(self.stats)
    if pending is not None:
      yield from self._completions(*pending)

  def compile_ahead(self, prompt_lengths: Sequence[int]) -> None:
    """Starts compiling the programs a run of prompts of these lengths calls, in background threads:
    the admit program of every bucket they fall in and the decode program, in the order `run` first
    needs them. Needs only the models' shapes, so it can start before the weights are loaded.

    XLA compiles without holding the GIL, so the programs compile while the weights load and the
    first rows decode (a cold start on a real model compiles one admit program per bucket, each as
    big as a model's forward pass). Compiling fills jax's caches, so the calls in `run` find their
    programs compiled once their future is done.
    """
    seed = np.int32(self.seed)
    state = abstract_state(self.post, self.pre, settings=self.settings, slots=self.batch_size,
                           cache_len=self.cache_len, mesh=self.mesh)
    buckets = sorted({self.bucket_for(n) for n in prompt_lengths})
    jobs = {}
    for bucket in buckets:
      inputs = _abstract(self._group_inputs([], [], bucket, self.group_size(bucket)), self.mesh)
      jobs[("admit", bucket)] = lambda inputs=inputs: admit.lower(
          self.post, self.pre, state, *inputs, seed, settings=self.settings, cache_len=self.cache_len,
          mesh=self.mesh).compile()
      if len(jobs) == 1:
        jobs["decode"] = lambda: decode_chunk.lower(
            self.post, self.pre, state, seed, np.int32(self.batch_size), settings=self.settings,
            chunk_steps=self.chunk_steps, mesh=self.mesh).compile()
    # One XLA:CPU compile keeps about 1.6 cores busy (measured: 2.9 s of CPU in 1.9 s), so on a host
    # of 2 or 3 cores two at once only slow down the one needed first: there they run one after
    # another, in the order needed. Hosts with more cores compile several at once.
    logging.info("compiling %d programs in the background: decode, and admit for prompts up to %s tokens.",
                 len(jobs), ", ".join(map(str, buckets)))
    threads = max(1, min(len(jobs), len(os.sched_getaffinity(0)) // 2))
    pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="codit-compile")
    self._compiling = {key: pool.submit(job) for key, job in jobs.items()}
    pool.shutdown(wait=False)

  def _group_inputs(self, group, targets, bucket: int, size: int):
    tokens = np.zeros((size, bucket), np.int32)
    lengths = np.ones((size,), np.int32)  # padding rows: one token, never read
    hashes = np.zeros((size,), np.int32)
    slots = np.full((size,), self.batch_size, np.int32)  # padding rows: out of bounds, dropped
    for row, ((example_id, ids), slot) in enumerate(zip(group, targets)):
      tokens[row, :len(ids)] = ids
      lengths[row] = len(ids)
      hashes[row] = sampling.example_hash(example_id)
      slots[row] = slot
    return [self._replicate(x) for x in (tokens, lengths, hashes, slots)]

  def _replicate(self, array: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(array)
    # The same group on every process: each places its devices' copies.
    return jax.make_array_from_callback(array.shape, NamedSharding(self.mesh, P()), lambda index: array[index])

  def _count(self, report: ChunkReport, waiting: bool, finished: int) -> None:
    steps, live = int(report.steps), int(report.live_slot_steps)
    stats = self.stats
    stats.slot_steps += steps * self.batch_size
    stats.live_slot_steps += live
    stats.prompts_done += finished
    stats.generated_tokens += live + finished  # a finished row's first token was drawn at its admission
    if waiting:
      stats.waiting_slot_steps += steps * self.batch_size
      stats.waiting_live_slot_steps += live

  def _completions(self, report: ChunkReport, finished: list[int], examples: list) -> Iterator[Completion]:
    """The completions of the `finished` slots (holding `examples`) that this process reports."""
    # With pair_parallel both halves of the devices hold every row: the post-trained half reports them.
    reporting = set(self.mesh.devices[0].flat) if self.settings.pair_parallel else None
    emitted = _local_rows(report.emitted, reporting)
    local = [(s, example) for s, example in zip(finished, examples) if s in emitted]
    outputs = {name: _local_rows(value, reporting) for name, value in report.out._asdict().items()} if local else {}
    for s, (example_id, _) in local:
      yield self._completion(example_id, int(emitted[s]), {name: rows[s] for name, rows in outputs.items()})

  def _completion(self, example_id: str, emitted: int, row: dict) -> Completion:
    # The three ways a row ends: an end token, the token budget, a loop (stop_repetitive).
    stopped = int(row["tokens"][emitted - 1]) in self.settings.end_ids
    reason = "stop" if stopped else "length" if emitted >= self.settings.max_new_tokens else "repetitive"
    n = emitted - 1 if stopped else emitted  # drop the end token
    return Completion(
        id=example_id,
        tokens=row["tokens"][:n].tolist(),
        finish_reason=reason,
        post_logprobs=row["post_logprobs"][:n].tolist(),
        pre_logprobs=row["pre_logprobs"][:n].tolist() if self.settings.mode == "codit" else [],
        codit_logprobs=row["codit_logprobs"][:n].tolist(),
        end_codit_logprob=float(row["codit_logprobs"][n]) if stopped else None,
    )


def _mismatch(old, new, mesh: Mesh | None) -> str | None:
  """How model `new` differs from `old` in what a compiled program depends on (None: it does not)."""
  if (old is None) != (new is None):
    return "one of the two is None"
  if old is None:
    return None
  if jax.tree.structure(old) != jax.tree.structure(new):
    return "its structure (config, layers or sharding settings) differs"
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(old), jax.tree.leaves(new)):
    if (a.shape, a.dtype) != (b.shape, b.dtype) or (mesh is not None and a.sharding != b.sharding):
      return (f"parameter {jax.tree_util.keystr(path)} is {b.dtype}{list(b.shape)} on {b.sharding}, "
              f"not {a.dtype}{list(a.shape)} on {a.sharding}")
  return None


def _local_rows(array: jax.Array, devices: set | None = None) -> dict[int, np.ndarray]:
  """{row index: row} for the rows of a batch-sharded array that live on this process's devices
  (only those among `devices`, if given)."""
  if array.is_fully_addressable and devices is None:
    return dict(enumerate(np.asarray(array)))
  rows = {}
  for shard in array.addressable_shards:
    if devices is not None and shard.device not in devices:
      continue
    start = shard.index[0].start or 0 if shard.index else 0
    rows.update((start + i, row) for i, row in enumerate(np.asarray(shard.data)))
  return rows


def enable_compilation_cache(directory: str) -> None:
  """JAX's persistent compilation cache: a rerun or resumed run reuses compiled programs from disk."""
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
