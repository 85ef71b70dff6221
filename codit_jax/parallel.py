"""Device mesh and partition rules.

One mesh with two axes: 'data' splits the batch (what pmap would give) and
'model' splits weights and key/value heads (tensor parallelism), and the
experts of mixture-of-experts layers (expert parallelism). Parameters get
their PartitionSpec from their name, like logical-axis rules; a dimension that
the mesh axis does not divide stays replicated rather than failing.

With pair parallelism a third, leading axis 'pair' of size 2 puts the
post-trained model on one half of the devices and the pre-trained model on the
other (their weights stacked on a leading axis that 'pair' splits), so the two
models of a CoDIT pair run at the same time; 'data' and 'model' then split
each half.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from codit_jax.errors import CoditError

DATA, MODEL, PAIR = "data", "model", "pair"

# (pattern on the dotted parameter path, spec). First match wins. Kernels are
# stored (in, out): column-parallel layers split `out`, row-parallel split `in`.
PARAM_RULES: tuple[tuple[str, tuple], ...] = (
    # Mixture of experts: stacked (experts, in, out) weights split by expert (expert
    # parallelism, see models/moe.py); the router is small and every device routes.
    (r"mlp\.experts\.(gate_proj|up_proj|down_proj)$", (MODEL, None, None)),
    (r"mlp\.gate\.kernel$", ()),
    (r"embed_tokens\.embedding$", (MODEL, None)),
    (r"lm_head\.kernel$", (None, MODEL)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", (None, MODEL)),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", (MODEL,)),
    (r"(o_proj|down_proj)\.kernel$", (MODEL, None)),
    (r".*", ()),  # norms, other biases: replicated
)


def make_mesh(model_parallelism: int = 1, devices: Sequence[jax.Device] | None = None,
              pair_parallel: bool = False) -> Mesh:
  """A ('data', 'model') mesh over all (or the given) devices; ('pair', 'data', 'model') with pair_parallel."""
  devices = list(devices if devices is not None else jax.devices())
  if pair_parallel and len(devices) % (2 * model_parallelism):
    raise CoditError(f"{len(devices)} devices cannot be split into two halves (pair_parallel) of model-parallel "
                     f"groups of {model_parallelism}: pair_parallel needs a device count divisible by "
                     "2 x model_parallelism. Turn pair_parallel off or lower model_parallelism.")
  if len(devices) % model_parallelism:
    raise CoditError(f"{len(devices)} devices cannot be split into model-parallel groups of {model_parallelism}: "
                     "set model_parallelism to a divisor of the device count.")
  grid = np.asarray(devices).reshape(len(devices) // model_parallelism, model_parallelism)
  if not pair_parallel:
    return Mesh(grid, (DATA, MODEL))
  return Mesh(grid.reshape(2, -1, model_parallelism), (PAIR, DATA, MODEL))


def fit_spec(spec: Sequence, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension, so any shape can be placed."""
  spec = tuple(spec) + (None,) * (len(shape) - len(spec))
  fitted = []
  for axis, dim in zip(spec, shape):
    names = axis if isinstance(axis, tuple) else (axis,) if axis else ()
    size = int(np.prod([mesh.shape[n] for n in names])) if names else 1
    fitted.append(axis if names and dim % size == 0 else None)
  return P(*fitted)


def param_spec(path: str, shape: Sequence[int], mesh: Mesh, fsdp: bool = False) -> P:
  """PartitionSpec of the parameter at dotted `path` (e.g. 'layers.3.mlp.up_proj.kernel').

  With fsdp, the largest dimension that tensor parallelism left whole is also
  split over 'data', so each data-parallel replica holds a slice of the weights.
  """
  spec = next(s for pattern, s in PARAM_RULES if re.search(pattern, path))
  spec = list(spec) + [None] * (len(shape) - len(spec))
  if fsdp and shape:
    free = [i for i, axis in enumerate(spec) if axis is None]
    if free:
      spec[max(free, key=lambda i: shape[i])] = DATA
  return fit_spec(spec, shape, mesh)


def param_sharding(path: str, shape: Sequence[int], mesh: Mesh, fsdp: bool = False) -> NamedSharding:
  return NamedSharding(mesh, param_spec(path, shape, mesh, fsdp))


def pair_param_sharding(path: str, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
  """Sharding of a parameter of both models stacked (2, *shape): one model per half of the 'pair' axis."""
  return NamedSharding(mesh, P(PAIR, *param_spec(path, shape, mesh)))


def batch_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
  """Leading (batch) dimension over 'data', the rest replicated."""
  return NamedSharding(mesh, fit_spec((DATA,), shape, mesh))
