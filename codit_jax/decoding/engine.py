"""The decode engine: both models of a pair in one compiled program per prompt bucket.

`generate_batch` is a single jitted function: one prefill of each model over a
left-padded batch, then a `lax.while_loop` of decode steps in which both models
read the last token, the score is formed, the next token drawn and written to
both caches. Nothing returns to the host until every row has stopped or the
token budget is spent, and the loop exits as soon as every row has stopped.
The KV caches are created and consumed inside the program, so XLA updates them
in place; they never cross a jit boundary that would need donating.

With `pair_parallel` the post-trained argument is both models stacked
(`checkpoints.load_pair`) and each model step is vmapped over the pair with
the mesh's 'pair' axis as its SPMD axis: each half of the devices runs one
model, both at once, and only the logits cross between the halves.

`Engine` is the host side: it checks the pair, sorts prompts by length, pads
each batch to a prompt-length bucket (powers of two from `min_bucket`) and a
fixed batch size, so a run over prompts of any lengths compiles at most
`len(engine.buckets)` programs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from codit_jax import parallel
from codit_jax.decoding import sampling
from codit_jax.decoding.score import codit_score, log_probs
from codit_jax.errors import CoditError
from codit_jax.models import Decoder, decode_step, prefill
from codit_jax.models.decoder import cache_length

MODES = ("codit", "direct")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """Static settings of a decode program (hashable: a jit static argument)."""

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

  def __post_init__(self):
    if self.mode not in MODES:
      raise CoditError(f"mode {self.mode!r} is not one of {', '.join(MODES)}.")
    if self.pair_parallel and self.mode != "codit":
      raise CoditError("pair_parallel runs the two models of a pair side by side: it needs mode 'codit'.")
    if not 0 < self.alpha <= 1:
      raise CoditError(f"alpha must be in (0, 1]; got {self.alpha}.")
    if self.temperature < 0:
      raise CoditError(f"temperature must be >= 0 (0 is greedy); got {self.temperature}.")
    if not 0 < self.top_p <= 1:
      raise CoditError(f"top_p must be in (0, 1]; got {self.top_p}.")
    if self.top_k < 0 or self.max_new_tokens < 1:
      raise CoditError("top_k must be >= 0 (0 is off) and max_new_tokens >= 1.")
    if not self.end_ids:
      raise CoditError("no end token ids: the post-trained model's generation_config and tokenizer name none.")


class BatchOutput(NamedTuple):
  """What one batch produced; arrays of shape (b, max_new_tokens) or (b,)."""

  tokens: jax.Array  # emitted ids, the end token included; 0 after it
  num_tokens: jax.Array  # emitted per row, the end token included
  stopped: jax.Array  # the row drew an end token
  post_logprobs: jax.Array  # each emitted token under the unmodified post-trained distribution
  pre_logprobs: jax.Array  # ... and the pre-trained one (zeros in direct mode)
  steps: jax.Array  # decode steps the loop ran


class _LoopState(NamedTuple):
  step: jax.Array
  token: jax.Array
  caches: object  # (post cache, pre cache), or one stacked cache with pair_parallel
  out: BatchOutput


def _over_pair(stacked: Decoder, fn, *stacked_args):
  """fn(model, *args) for both models of a stacked pair at once: vmapped over the leading
  (post, pre) axis, which the mesh's 'pair' axis splits, so each half of the devices runs one."""
  graphdef, state = nnx.split(stacked)
  return jax.vmap(lambda s, *a: fn(nnx.merge(graphdef, s), *a), spmd_axis_name=parallel.PAIR)(state, *stacked_args)


def _prefill_models(post, pre, tokens, mask, max_len: int, settings: DecodeSettings):
  """(post logits, pre logits or None, caches) after the prompt."""
  if settings.pair_parallel:
    logits, caches = _over_pair(post, lambda model: prefill(model, tokens, mask, max_len))
    return logits[0], logits[1], caches
  post_logits, post_cache = prefill(post, tokens, mask, max_len)
  pre_logits, pre_cache = prefill(pre, tokens, mask, max_len) if settings.mode == "codit" else (None, None)
  return post_logits, pre_logits, (post_cache, pre_cache)


def _step_models(post, pre, token, caches, settings: DecodeSettings):
  """One decode step of the model(s): (post logits, pre logits or None, caches)."""
  if settings.pair_parallel:
    # The write slot is the same for both models: kept out of the vmap, so that the blocks a
    # step reads (DECODE_BLOCK) are a plain loop, not one batched over the pair.
    index = caches.index[0]
    logits, caches = _over_pair(post, lambda model, cache: decode_step(model, token, cache._replace(index=index)),
                                caches)
    return logits[0], logits[1], caches
  post_logits, post_cache = decode_step(post, token, caches[0])
  pre_logits, pre_cache = decode_step(pre, token, caches[1]) if settings.mode == "codit" else (None, None)
  return post_logits, pre_logits, (post_cache, pre_cache)


def _choose(settings: DecodeSettings, post_logits, pre_logits, seed, hashes, step):
  """Scores one step and draws a token per row: (token, its post log-prob, its pre log-prob)."""
  lp_post = log_probs(post_logits, settings.vocab_size)
  if settings.mode == "codit":
    lp_pre = log_probs(pre_logits, settings.vocab_size)
    score = codit_score(lp_post, lp_pre, settings.alpha, settings.beta)
  else:
    lp_pre, score = None, lp_post
  keys = sampling.step_keys(seed, hashes, step)
  token = sampling.sample(score, keys, settings.temperature, settings.top_p, settings.top_k)
  pick = lambda lp: jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]  # noqa: E731
  return token, pick(lp_post), pick(lp_pre) if lp_pre is not None else jnp.zeros_like(token, jnp.float32)


def _record(out: BatchOutput, step, token, lp_post, lp_pre, end_ids) -> BatchOutput:
  """Writes step `step`'s draws into the output; rows already stopped stay as they were."""
  active = ~out.stopped
  token = jnp.where(active, token, 0)
  column = lambda buf, value: jax.lax.dynamic_update_slice(buf, value[:, None].astype(buf.dtype), (0, step))  # noqa: E731
  return out._replace(
      tokens=column(out.tokens, token),
      num_tokens=out.num_tokens + active.astype(jnp.int32),
      stopped=out.stopped | (active & jnp.isin(token, end_ids)),
      post_logprobs=column(out.post_logprobs, jnp.where(active, lp_post, 0.0)),
      pre_logprobs=column(out.pre_logprobs, jnp.where(active, lp_pre, 0.0)),
      steps=step + 1,
  )


def _generate_batch(post: Decoder, pre: Decoder | None, tokens, mask, active, hashes, seed,
                    settings: DecodeSettings) -> BatchOutput:
  b, prompt_len = tokens.shape
  n = settings.max_new_tokens
  max_len = cache_length(prompt_len + n)
  end_ids = jnp.asarray(settings.end_ids, jnp.int32)
  post_logits, pre_logits, caches = _prefill_models(post, pre, tokens, mask, max_len, settings)
  out = BatchOutput(
      tokens=jnp.zeros((b, n), jnp.int32), num_tokens=jnp.zeros((b,), jnp.int32),
      stopped=~active,  # filler rows of a partial batch start stopped
      post_logprobs=jnp.zeros((b, n), jnp.float32), pre_logprobs=jnp.zeros((b, n), jnp.float32),
      steps=jnp.asarray(0, jnp.int32))
  token, lp_post, lp_pre = _choose(settings, post_logits, pre_logits, seed, hashes, 0)
  out = _record(out, 0, token, lp_post, lp_pre, end_ids)

  def keep_going(state: _LoopState):
    return (state.step < n) & ~jnp.all(state.out.stopped)

  def one_step(state: _LoopState) -> _LoopState:
    post_logits, pre_logits, caches = _step_models(post, pre, state.token, state.caches, settings)
    token, lp_post, lp_pre = _choose(settings, post_logits, pre_logits, seed, hashes, state.step)
    out = _record(state.out, state.step, token, lp_post, lp_pre, end_ids)
    return _LoopState(state.step + 1, token, caches, out)

  state = jax.lax.while_loop(keep_going, one_step, _LoopState(jnp.asarray(1, jnp.int32), token, caches, out))
  return state.out


generate_batch = jax.jit(_generate_batch, static_argnames=("settings",))


@dataclasses.dataclass
class Completion:
  """One finished example. Tokens and log-probs exclude the end token."""

  id: str
  tokens: list[int]
  finish_reason: str  # 'stop' | 'length'
  post_logprobs: list[float]
  pre_logprobs: list[float]  # empty in direct mode


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
  return len(post_vocab)


class Engine:
  """Generates completions for prompts (already tokenized) with one model (direct) or a pair (CoDIT).

  With settings.pair_parallel, `post` is the pair from `checkpoints.load_pair` and `pre` is None.
  """

  def __init__(self, post: Decoder, pre: Decoder | None, settings: DecodeSettings, *, batch_size: int,
               max_prompt_len: int, seed: int = 0, mesh: Mesh | None = None, min_bucket: int = 32):
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
    self.post, self.pre = post, (pre if settings.mode == "codit" else None)
    self.settings, self.batch_size, self.seed, self.mesh = settings, batch_size, seed, mesh
    self.max_prompt_len = max_prompt_len
    self.buckets = prompt_buckets(max_prompt_len, min(min_bucket, max_prompt_len))
    self.generated_tokens = 0
    self.seconds = 0.0

  def bucket_for(self, length: int) -> int:
    if length > self.max_prompt_len:
      raise CoditError(f"prompt of {length} tokens exceeds max_prompt_len {self.max_prompt_len}.")
    return next(b for b in self.buckets if b >= length)

  def generate(self, examples: Sequence[tuple[str, Sequence[int]]]) -> list[Completion]:
    """Completions for (id, prompt ids) pairs, in the given order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][1]))
    results: list[Completion | None] = [None] * len(examples)
    for start in range(0, len(order), self.batch_size):
      chunk = [examples[i] for i in order[start:start + self.batch_size]]
      for i, completion in zip(order[start:start + self.batch_size], self.run_batch(chunk)):
        results[i] = completion
    return results

  def run_batch(self, chunk: Sequence[tuple[str, Sequence[int]]]) -> list[Completion]:
    """Decodes one batch of at most batch_size (id, prompt ids); completions of this process's rows.

    Every process of a multi-process run calls this with the same batch; each
    supplies the rows of its devices and gets their completions back (all rows
    in a single-process run), in batch order.
    """
    if len(chunk) > self.batch_size:
      raise ValueError(f"a batch of {len(chunk)} examples exceeds batch_size {self.batch_size}")
    bucket = self.bucket_for(max(len(ids) for _, ids in chunk))
    b = self.batch_size
    tokens = np.zeros((b, bucket), np.int32)
    mask = np.zeros((b, bucket), np.int32)
    for row, (_, ids) in enumerate(chunk):
      tokens[row, bucket - len(ids):] = ids
      mask[row, bucket - len(ids):] = 1
    active = np.arange(b) < len(chunk)
    hashes = np.zeros((b,), np.int32)
    hashes[:len(chunk)] = sampling.example_hashes([i for i, _ in chunk])
    inputs = [self._place(x) for x in (tokens, mask, active, hashes)]
    started = time.perf_counter()
    out = generate_batch(self.post, self.pre, *inputs, jnp.asarray(self.seed, jnp.int32), settings=self.settings)
    generated = int(jnp.sum(out.num_tokens))  # a collective in multi-process runs: every process calls it
    # With pair_parallel both halves of the devices hold every row: the post-trained half reports them.
    reporting = set(self.mesh.devices[0].flat) if self.settings.pair_parallel else None
    rows = {name: _local_rows(value, reporting) for name, value in out._asdict().items() if name != "steps"}
    self.seconds += time.perf_counter() - started
    self.generated_tokens += generated
    return [self._completion(chunk[row][0], {name: r[row] for name, r in rows.items()})
            for row in sorted(rows["tokens"]) if row < len(chunk)]

  def _place(self, array: np.ndarray):
    if self.mesh is None:
      return jnp.asarray(array)
    # From a callback, so each process places only the rows of its own devices.
    sharding = parallel.batch_sharding(self.mesh, array.shape)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  def _completion(self, example_id, row: dict) -> Completion:
    stopped = bool(row["stopped"])
    n = int(row["num_tokens"]) - (1 if stopped else 0)  # drop the end token
    return Completion(
        id=example_id,
        tokens=row["tokens"][:n].tolist(),
        finish_reason="stop" if stopped else "length",
        post_logprobs=row["post_logprobs"][:n].tolist(),
        pre_logprobs=row["pre_logprobs"][:n].tolist() if self.settings.mode == "codit" else [],
    )

  @property
  def tokens_per_second(self) -> float:
    return self.generated_tokens / self.seconds if self.seconds else math.nan


def _local_rows(array: jax.Array, devices: set | None = None) -> dict[int, np.ndarray]:
  """{row index: row} for the rows of a batch-sharded array that live on this process's devices
  (only those among `devices`, if given)."""
  if array.is_fully_addressable:
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
