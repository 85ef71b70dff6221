"""The jitted pieces of training: parameters as a flat dict, the masked loss, the optimizer, the steps.

Parameters travel as a flat dict {dotted path: array} ('layers.0.mlp.up_proj.kernel'):
the names are those of `parallel.param_sharding` and, through
`checkpoints.hf_name`, of the Hugging Face tensors, and a flat dict is the
plainest pytree for optax and orbax. `ParamLayout` turns the dict back into a
`Decoder` inside jit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codit_jax import parallel
from codit_jax.errors import CoditError
from codit_jax.models.decoder import Decoder

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ParamLayout:
  """How a flat dict of named parameters becomes a Decoder again."""
  graphdef: Any
  treedef: Any
  names: tuple[str, ...]

  @classmethod
  def of(cls, model: Decoder) -> tuple[ParamLayout, dict[str, Any]]:
    """The layout of `model` (concrete or abstract) and its parameters as a flat dict."""
    graphdef, state = nnx.split(model)
    with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = tuple(_dotted(path) for path, _ in with_paths)
    return cls(graphdef, treedef, names), {name: leaf for name, (_, leaf) in zip(names, with_paths)}

  def model(self, params: dict[str, Any]) -> Decoder:
    state = jax.tree_util.tree_unflatten(self.treedef, [params[name] for name in self.names])
    return nnx.merge(self.graphdef, state)


def _dotted(path) -> str:
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    # GetAttrKey('value'): the array inside an nnx.Param, not part of the name
  return ".".join(parts)


def param_shardings(shapes: dict[str, Any], mesh: Mesh, fsdp: bool) -> dict[str, NamedSharding]:
  return {name: parallel.param_sharding(name, tuple(x.shape), mesh, fsdp) for name, x in shapes.items()}


def state_shardings(tree, params: dict[str, Any], shardings: dict[str, NamedSharding], mesh: Mesh):
  """Shardings for an optimizer state `tree` (arrays or shapes): a leaf kept under a parameter's
  name with that parameter's shape (Adam's moments, MultiSteps' accumulated gradient) is sharded
  like the parameter; everything else (step counters) is replicated."""
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    last = path[-1] if path else None
    name = last.key if isinstance(last, jax.tree_util.DictKey) else None
    if name in params and tuple(leaf.shape) == tuple(params[name].shape):
      return shardings[name]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def cast_params(params: dict[str, Any], dtype) -> dict[str, Any]:
  """Floating parameters in the compute dtype (the float32 masters stay what the optimizer updates)."""
  return {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in params.items()}


def loss_sums(model: Decoder, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(next token) over the trained positions, number of trained positions).

  Packed rows: every example is a segment with its own positions; attention
  stays inside the segment. `weights` is 0 on prompt tokens, padding and
  segment ends, so only response (and end) tokens are predicted.
  """
  tokens, segment_ids = batch["tokens"], batch["segment_ids"]
  query_slots = jnp.arange(tokens.shape[1])
  hidden, _ = model(tokens, batch["positions"], query_slots, segment_ids > 0, segment_ids=segment_ids)
  logits = model.logits(hidden)  # float32
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  weights = batch["weights"]
  return jnp.sum(losses * weights), jnp.sum(weights)


def make_schedule(learning_rate: float, warmup_steps: int, total_steps: int, final_learning_rate: float):
  """Linear warmup from 0, then cosine decay to final_learning_rate at total_steps."""
  warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=learning_rate, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=final_learning_rate)


def make_optimizer(config, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
  """AdamW with global-norm clipping on the warmup-cosine schedule; MultiSteps accumulates gradients.

  Weight decay applies to matrices (kernels, embeddings, experts) only, not to
  norm weights and biases, as in most language-model recipes.
  """
  schedule = make_schedule(config.learning_rate, config.warmup_steps, total_steps, config.final_learning_rate)
  decays = lambda params: {k: v.ndim >= 2 for k, v in params.items()}  # noqa: E731
  parts = [optax.clip_by_global_norm(config.max_grad_norm)] if config.max_grad_norm > 0 else []
  parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                           weight_decay=config.weight_decay, mask=decays))
  tx = optax.chain(*parts)
  if config.grad_accumulation > 1:
    # Each update() call takes one micro-batch; every k-th applies the mean gradient of the last k.
    tx = optax.MultiSteps(tx, every_k_schedule=config.grad_accumulation)
  return tx, schedule


def make_train_step(layout: ParamLayout, tx: optax.GradientTransformation, compute_dtype: str,
                    param_shardings_: dict, opt_shardings):
  """jit(step)(params, opt_state, batch) -> (params, opt_state, metrics); params and state donated.

  The loss of a micro-batch is the mean over its trained tokens.
  """
  if compute_dtype not in COMPUTE_DTYPES:
    raise CoditError(f"compute_dtype {compute_dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}.")
  dtype = COMPUTE_DTYPES[compute_dtype]

  def loss_fn(params, batch):
    total, count = loss_sums(layout.model(cast_params(params, dtype)), batch)
    return total / jnp.maximum(count, 1.0), count

  def step(params, opt_state, batch):
    (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), trained_tokens=count,
                   tokens=jnp.sum(batch["segment_ids"] > 0))
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(param_shardings_, opt_shardings, None))


def make_eval_step(layout: ParamLayout, compute_dtype: str):
  """jit(step)(params, batch) -> (sum of token losses, number of tokens)."""
  dtype = COMPUTE_DTYPES[compute_dtype]
  return jax.jit(lambda params, batch: loss_sums(layout.model(cast_params(params, dtype)), batch))
