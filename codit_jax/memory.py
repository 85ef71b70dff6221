"""How much device memory a run needs, and how many slots of the running batch fit in it.

Pure functions (no device is touched except by `device_memory_bytes`), so the rules
can be unit-tested on simulated machines; docs/memory.md gives the arithmetic for the
teacher pairs and bench/memory_table.py reproduces its table.

What is counted, per device:

* weights: every parameter the loader builds (the text tower only: `Decoder`'s
  parameters, which `checkpoints.load_model` checks one by one against the
  checkpoint), in the run's dtype, split over the 'model' mesh axis by
  `parallel.PARAM_RULES`. A dimension that model_parallelism does not divide stays
  whole on every device (as `parallel.fit_spec` places it), and that is counted:
  e.g. OLMo 3's 100278-row embedding and lm_head are replicated at any even
  model_parallelism. So weights per device are exactly what the mesh puts there, not
  just bytes / model_parallelism.
* the KV cache: per layer keys (B, kv_heads, head_dim, slots) and values
  (B, kv_heads, slots, head_dim) in the run's dtype, slots = the cache length L, or
  a sliding-window layer's window W where W < L (ring buffers); the kv_heads axis is
  split over 'model' when model_parallelism divides num_kv_heads, else every device
  of the group holds all heads (as the engine's `_state_specs` places it).
* a margin for everything else (XLA's temporaries, logits, prefill activations,
  fragmentation): `margin` of each device's memory.

The batch dimension (slots) is split over 'data': every data-parallel replica holds
slots / data_parallel slots, so the number of slots is always a multiple of
data_parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from pathlib import Path
from typing import Iterable, Sequence

from codit_jax.errors import CoditError

GiB = 2**30
ITEMSIZE = {"bfloat16": 2, "float32": 4}
DEFAULT_MARGIN = 0.10  # of each device's memory, kept free for XLA's working buffers


def itemsize(dtype: str) -> int:
  if dtype not in ITEMSIZE:
    raise CoditError(f"dtype {dtype!r} is not supported; use one of {', '.join(ITEMSIZE)}.")
  return ITEMSIZE[dtype]


# ---- Weights.

@functools.lru_cache(maxsize=32)
def param_shapes(cfg) -> dict[str, tuple[int, ...]]:
  """{dotted parameter path: shape} of the Decoder of `cfg`, as the loader builds it (no memory used)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from codit_jax.models.decoder import Decoder  # pylint: disable=g-import-not-at-top

  abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
  _, state = nnx.split(abstract)
  return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in state.flat_state()}


def weight_bytes(cfg, dtype: str) -> int:
  """Bytes of one model's weights in `dtype`, from its config (every parameter the loader builds)."""
  return sum(math.prod(shape) for shape in param_shapes(cfg).values()) * itemsize(dtype)


def checkpoint_weight_bytes(path: str | Path, dtype: str) -> int:
  """Bytes of a checkpoint folder's text-decoder weights in `dtype`, from its safetensors headers.

  Counts the tensors under the decoder's prefix (`checkpoints.weight_prefixes`: the
  text tower of a multimodal Gemma 3 checkpoint, not its vision tower or projector)
  and the lm_head unless the embeddings are tied (then the embedding counts once,
  even where the file also stores lm_head). Rotary tables some old checkpoints store
  are not weights. Equals `weight_bytes(cfg, dtype)` for every checkpoint the loader
  accepts, since it checks each tensor's shape against the config.
  """
  from codit_jax import checkpoints  # pylint: disable=g-import-not-at-top

  path = Path(path)
  _, cfg = checkpoints.load_config(path)
  tensors = checkpoints.SafetensorsFolder(path)
  prefixes = checkpoints.weight_prefixes(tensors)
  if prefixes is None:
    raise CoditError(f"{tensors.source} has no embedding tensor: not a checkpoint of a supported decoder.")
  decoder, head = prefixes
  elements = 0
  for name in tensors.weight_map:
    if "rotary_emb" in name:
      continue
    counted = name.startswith(decoder) or (name.startswith(head) and not cfg.tie_word_embeddings)
    if counted:
      elements += math.prod(tensors.shape(name))
  return elements * itemsize(dtype)


class _Axes(types.SimpleNamespace):
  """Stands in for a Mesh where only `mesh.shape` is read (parallel.fit_spec, param_spec)."""


def weight_bytes_per_device(cfg, dtype: str, model_parallelism: int) -> int:
  """Bytes of one model's weights on each device of a model-parallel group of `model_parallelism`,
  as parallel.PARAM_RULES place them (a dimension the group does not divide is whole everywhere)."""
  from codit_jax import parallel  # pylint: disable=g-import-not-at-top

  mesh = _Axes(shape={parallel.DATA: 1, parallel.MODEL: model_parallelism})
  total = 0
  for path, shape in param_shapes(cfg).items():
    spec = parallel.param_spec(path, shape, mesh)
    split = math.prod(model_parallelism for axis in spec if axis == parallel.MODEL)
    total += math.prod(shape) // split
  return total * itemsize(dtype)


# ---- The KV cache.

def layer_slots(cfg, cache_len: int, ring_buffers: bool = True) -> tuple[int, ...]:
  """Cache slots of each layer: the cache length, or a sliding-window layer's window where it is shorter."""
  slots = []
  for i in range(cfg.num_layers):
    window = cfg.window_for(i)
    slots.append(min(window, cache_len) if ring_buffers and window else cache_len)
  return tuple(slots)


def kv_bytes_per_slot(cfg, cache_len: int, dtype: str, ring_buffers: bool = True) -> int:
  """Keys and values of one slot (one row of the batch) over all layers, whole (all kv heads)."""
  per_cache_slot = 2 * cfg.num_kv_heads * cfg.head_dim * itemsize(dtype)
  return per_cache_slot * sum(layer_slots(cfg, cache_len, ring_buffers))


# ---- What a device has.

def device_memory_bytes(devices: Iterable | None = None) -> int | None:
  """The memory JAX may use on each device (the smallest over `devices`, default jax.local_devices()),
  from memory_stats()['bytes_limit']; None where a device reports none (CPU).

  bytes_limit is the allocator's limit, not the chip's memory: on GPU the BFC
  allocator's pool, XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75) of the GPU's memory
  (set 0.95 to give JAX more); on TPU the HBM the runtime lets programs use (a little
  under the chip's HBM). Call it before loading weights: it does not subtract what is
  already allocated."""
  import jax  # pylint: disable=g-import-not-at-top

  limits = []
  for device in (devices if devices is not None else jax.local_devices()):
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without the call)
      stats = None
    if not stats or not stats.get("bytes_limit"):
      return None
    limits.append(int(stats["bytes_limit"]))
  return min(limits) if limits else None


# ---- Per-model footprint and the plan.

@dataclasses.dataclass(frozen=True)
class ModelMemory:
  """One model's memory figures, for `plan`.

  weights: (bytes on each device at model_parallelism mp) for each candidate mp, as a
  tuple of (mp, bytes) pairs; kv_main / kv_long: keys and values of one slot (all
  heads) at the main and the long pass's cache length; len_main / len_long: those
  lengths; kv_heads: how the cache splits over 'model'.
  """

  name: str
  weights: tuple[tuple[int, int], ...]
  kv_heads: int
  kv_main: int
  len_main: int
  kv_long: int = 0
  len_long: int = 0

  @classmethod
  def from_config(cls, cfg, dtype: str, len_main: int, len_long: int = 0, *, name: str = "",
                  parallelisms: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
                  ring_buffers: bool = True) -> ModelMemory:
    """ring_buffers: sliding-window layers keep min(window, L) slots (False: L, a cache without them)."""
    kv = lambda length: kv_bytes_per_slot(cfg, length, dtype, ring_buffers) if length else 0  # noqa: E731
    return cls(name=name, weights=tuple((mp, weight_bytes_per_device(cfg, dtype, mp)) for mp in parallelisms),
               kv_heads=cfg.num_kv_heads, kv_main=kv(len_main), len_main=len_main, kv_long=kv(len_long),
               len_long=len_long)

  @classmethod
  def simple(cls, weight_bytes: int, kv_heads: int, kv_main: int, len_main: int, kv_long: int = 0,
             len_long: int = 0, name: str = "") -> ModelMemory:
    """Weights that split evenly at any model_parallelism (for simulated machines in tests)."""
    return cls(name=name, weights=((0, weight_bytes),), kv_heads=kv_heads, kv_main=kv_main, len_main=len_main,
               kv_long=kv_long, len_long=len_long)

  @property
  def weight_bytes(self) -> int:
    """The whole model's weights (at model_parallelism 1)."""
    return self.weights_per_device(1)

  def weights_per_device(self, mp: int) -> int:
    if self.weights and self.weights[0][0] == 0:  # `simple`: even split
      return -(-self.weights[0][1] // mp)
    for candidate, size in self.weights:
      if candidate == mp:
        return size
    raise CoditError(f"no weight figure for model_parallelism={mp} (have {[m for m, _ in self.weights]}).")

  def slot_bytes_per_device(self, mp: int, long: bool = False) -> int:
    """One slot's cache on each device of a model-parallel group of mp: kv heads split when mp divides them."""
    kv = self.kv_long if long else self.kv_main
    split = mp if self.kv_heads % mp == 0 else 1
    return -(-kv // split)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """What `plan` decided. Slots are global (over all processes); *_per_device figures are one device's."""

  model_parallelism: int
  data_parallel: int  # replicas of the model-parallel group (per half with pair_parallel)
  slots_main: int
  slots_long: int  # 0: no long pass (no long length given, or not one long slot fits)
  weights_per_device: int  # bytes
  slot_bytes_main: int  # one slot's cache on each device of its replica, bytes
  slot_bytes_long: int
  budget_per_device: int | None  # bytes of cache each device may hold; None: unknown (CPU)
  device_memory: int | None
  auto_parallelism: bool
  pair_parallel: bool
  limited_by: str  # 'memory' | 'batch_size' | 'kv_cache_gib'

  def describe(self) -> str:
    gib = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
    how = "automatic" if self.auto_parallelism else "set"
    parts = [f"model_parallelism {self.model_parallelism} ({how}), data_parallel {self.data_parallel}"
             + (" per half (pair_parallel)" if self.pair_parallel else ""),
             f"weights {gib(self.weights_per_device)} per device",
             f"cache {gib(self.slot_bytes_main)} per slot per device"]
    if self.device_memory is not None:
      parts.append(f"device memory {gib(self.device_memory)}")
    parts.append(f"KV budget {gib(self.budget_per_device)} per device" if self.budget_per_device is not None
                 else "KV budget unknown (no memory stats)")
    parts.append(f"{self.slots_main} slots (limited by {self.limited_by})")
    if self.slot_bytes_long:
      parts.append(f"long prompts: {self.slots_long} slots of {gib(self.slot_bytes_long)} per device"
                   if self.slots_long else
                   f"long prompts: no slot fits ({gib(self.slot_bytes_long)} per device needed)")
    return "; ".join(parts)


def _per_replica(budget_fixed: int | None, free: int, slot_bytes: int) -> int:
  budget = free if budget_fixed is None else min(budget_fixed, free)
  return max(budget, 0) // slot_bytes


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def plan(models: Sequence[ModelMemory], *, device_memory: int | None, device_count: int, batch_size: int,
         kv_cache_gib: float = 0.0, model_parallelism: int = 0, pair_parallel: bool = False,
         margin: float = DEFAULT_MARGIN) -> MemoryPlan:
  """Devices per model replica and slots of the main and long pass.

  models: the post-trained and pre-trained model (one in direct mode).
  device_memory: bytes each device may use (device_memory_bytes()); None: unknown, then
    slots = batch_size (rounded down to the data axis) unless kv_cache_gib bounds them.
  kv_cache_gib: cache budget per device; 0: what the device has free after the weights,
    less `margin` of its memory.
  model_parallelism: devices per model replica; 0: automatic. Candidates are the divisors
    of the device count (of each half's with pair_parallel) that leave at most batch_size
    replicas and whose memory holds the weights, the margin and one slot of the main pass
    per replica; of these, the fewest devices whose memory holds the whole batch
    (batch_size slots), or, where none does, the one that holds the most slots (the
    fewest devices among equals). Fewer devices per model mean fewer all-reduces; more
    slots mean more tokens per step of a decode that reads all weights anyway.
  pair_parallel: the two models on two halves of the devices, each half holding one.

  Slots per replica = budget // bytes per slot per device; global slots = that times
  data_parallel, at most batch_size, rounded down to a multiple of data_parallel. The
  long pass (the longer slots) runs after the main one in the same memory.
  """
  if not models or len(models) > 2:
    raise CoditError(f"plan needs one or two models, got {len(models)}.")
  if pair_parallel and len(models) != 2:
    raise CoditError("pair_parallel needs both models of a CoDIT pair; turn it off in direct mode.")
  if device_count < 1 or batch_size < 1:
    raise CoditError(f"device_count and batch_size must be at least 1 (got {device_count}, {batch_size}).")
  if kv_cache_gib < 0 or not 0 <= margin < 1:
    raise CoditError(f"kv_cache_gib must be >= 0 and margin in [0, 1) (got {kv_cache_gib}, {margin}).")
  group_devices = device_count // 2 if pair_parallel else device_count
  if pair_parallel and device_count % 2:
    raise CoditError(f"pair_parallel needs an even device count; there are {device_count}.")
  budget_fixed = int(kv_cache_gib * GiB) if kv_cache_gib else None
  reserve = int(margin * device_memory) if device_memory is not None else 0

  def weights(mp):  # per device: every device holds both models (one with pair_parallel: the larger half)
    per_model = [m.weights_per_device(mp) for m in models]
    return max(per_model) if pair_parallel else sum(per_model)

  def slot(mp, long=False):
    per_model = [m.slot_bytes_per_device(mp, long) for m in models]
    return max(per_model) if pair_parallel else sum(per_model)

  def free(mp):  # bytes for the cache on each device, None when unknown
    if device_memory is None:
      return None
    return device_memory - reserve - weights(mp)

  auto = model_parallelism == 0
  if auto:
    candidates = [mp for mp in _divisors(group_devices) if group_devices // mp <= batch_size]
    if device_memory is None:
      mp = candidates[0]
    else:
      fits = [mp for mp in candidates if free(mp) >= slot(mp)]
      if not fits:
        mp = candidates[-1]
        raise CoditError(
            f"{device_count} device(s) of {device_memory / GiB:.2f} GiB cannot hold the weights "
            f"({weights(mp) / GiB:.2f} GiB per device at model_parallelism {mp}) plus one slot of KV cache "
            f"({slot(mp) / GiB:.2f} GiB) and the {margin:.0%} margin ({reserve / GiB:.2f} GiB). Use more or "
            "larger devices, a smaller max_new_tokens or max_prompt_len, or dtype bfloat16.")
      cap = lambda mp: batch_size - batch_size % (group_devices // mp)  # noqa: E731
      held = lambda mp: min(cap(mp), _per_replica(budget_fixed, free(mp), slot(mp)) * (group_devices // mp))  # noqa: E731
      # The fewest devices per replica whose memory holds the weights and the whole batch; where no
      # group size holds it, the one holding the most slots (the fewest devices among equals).
      mp = max(fits, key=lambda mp: (held(mp) >= cap(mp), 0 if held(mp) >= cap(mp) else held(mp), -mp))
  else:
    mp = model_parallelism
    if mp < 1 or group_devices % mp:
      raise CoditError(f"model_parallelism {mp} must divide the {group_devices} devices"
                       + (" of each half (pair_parallel)" if pair_parallel else "")
                       + "; or set model_parallelism=0 (automatic).")
  data_parallel = group_devices // mp
  if batch_size < data_parallel:
    raise CoditError(f"batch_size {batch_size} is smaller than the {data_parallel} data-parallel replicas "
                     f"(model_parallelism {mp} on {group_devices} devices): every replica needs a slot. "
                     "Raise batch_size or model_parallelism.")
  available = free(mp)
  if budget_fixed is not None and available is not None and budget_fixed > available:
    raise CoditError(
        f"kv_cache_gib={kv_cache_gib} is more than the {available / GiB:.2f} GiB each device has free after "
        f"the weights ({weights(mp) / GiB:.2f} GiB at model_parallelism {mp}) and the {margin:.0%} margin. "
        "Lower kv_cache_gib, or set it to 0 (what is free).")
  if available is not None and available < slot(mp) and budget_fixed is None:
    raise CoditError(
        f"at model_parallelism {mp} each device holds {weights(mp) / GiB:.2f} GiB of weights, which with the "
        f"{margin:.0%} margin ({reserve / GiB:.2f} GiB) leaves {max(available, 0) / GiB:.2f} GiB of its "
        f"{device_memory / GiB:.2f} GiB: too little for one slot of KV cache ({slot(mp) / GiB:.2f} GiB). Use more "
        f"devices per model (model_parallelism > {mp}, or 0: automatic), a smaller max_new_tokens or "
        "max_prompt_len, or dtype bfloat16.")
  budget = budget_fixed if budget_fixed is not None else available

  def slots_for(slot_bytes):
    if budget is None:
      return batch_size - batch_size % data_parallel, "batch_size"
    per_replica = max(budget, 0) // slot_bytes
    by_memory = per_replica * data_parallel
    cap = batch_size - batch_size % data_parallel
    if by_memory >= cap:
      return cap, "batch_size"
    return by_memory, "kv_cache_gib" if budget_fixed is not None else "memory"

  slots_main, limited_by = slots_for(slot(mp))
  if slots_main == 0:
    raise CoditError(
        f"the KV cache budget ({budget / GiB:.2f} GiB per device) is too small for one slot "
        f"({slot(mp) / GiB:.2f} GiB per device at model_parallelism {mp}, cache length "
        f"{models[0].len_main}). Use a smaller max_new_tokens or max_prompt_len, more devices per model "
        f"(model_parallelism > {mp}, or 0: automatic), a larger kv_cache_gib (or 0: what is free), "
        "or dtype bfloat16.")
  has_long = all(m.len_long for m in models)
  slots_long = slots_for(slot(mp, long=True))[0] if has_long else 0
  return MemoryPlan(model_parallelism=mp, data_parallel=data_parallel, slots_main=slots_main,
                    slots_long=slots_long, weights_per_device=weights(mp), slot_bytes_main=slot(mp),
                    slot_bytes_long=slot(mp, long=True) if has_long else 0, budget_per_device=budget,
                    device_memory=device_memory, auto_parallelism=auto, pair_parallel=pair_parallel,
                    limited_by=limited_by)


def cache_lengths(context: int, max_new_tokens: int, max_prompt_len: int = 0) -> tuple[int, int]:
  """(main, long) cache lengths: the main pass for prompts up to max_prompt_len (0: min(2048,
  context - max_new_tokens)), the long pass for prompts up to context - max_new_tokens; long is 0
  when no prompt is longer than the main pass takes."""
  from codit_jax.models.decoder import cache_length  # pylint: disable=g-import-not-at-top

  longest = context - max_new_tokens
  if longest < 1:
    raise CoditError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context of {context}.")
  main_prompt = max_prompt_len or min(2048, longest)
  main = cache_length(main_prompt + max_new_tokens)
  return main, (cache_length(context) if longest > main_prompt else 0)
