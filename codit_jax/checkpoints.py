"""Hugging Face checkpoint (config.json + safetensors) -> Flax NNX Decoder.

Tensors are memory-mapped, never read whole: each parameter is built with
`jax.make_array_from_callback`, which asks for exactly the slice each local
device holds under the parameter's NamedSharding, so a host reads only its
own shards and never holds two full copies of the model. Casting to the
target dtype happens per slice.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from codit_jax import demo, parallel
from codit_jax.errors import CheckpointError
from codit_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from codit_jax.models.decoder import Decoder, use_expert_parallelism, use_sharded_decode_attention

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# Where the text decoder's tensors sit in a checkpoint, tried in order: causal LMs;
# Gemma 3 multimodal as transformers 5 names it in memory (save_original_format=False);
# Gemma 3 multimodal as on the Hub and as save_pretrained writes it by default.
_PREFIXES = (("model.", "lm_head."), ("model.language_model.", "lm_head."),
             ("language_model.model.", "language_model.lm_head."))
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve(name_or_path: str) -> Path:
  """A local checkpoint folder, a Hub id downloaded (safetensors only) into the HF cache, or a built-in one."""
  if demo.is_builtin(name_or_path):
    return Path(demo.resolve(name_or_path))
  path = Path(name_or_path).expanduser()
  if path.is_dir():
    return path
  looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or path.exists()
  if looks_local:
    raise CheckpointError(
        f"checkpoint folder {str(path)!r} does not exist. Give a folder holding config.json and "
        "*.safetensors, or a Hugging Face Hub id such as 'Qwen/Qwen3-8B'.")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
    return Path(snapshot_download(name_or_path, allow_patterns=_HUB_FILES))
  except Exception as e:  # network, auth, missing repo: all the user can fix is the id or access
    raise CheckpointError(
        f"could not download {name_or_path!r} from the Hugging Face Hub ({type(e).__name__}: {e}). "
        "Check the id, your network and `hf auth login` (or HF_TOKEN) for gated models, or pass a local "
        "folder that holds the checkpoint.") from None


def load_config(path: Path) -> tuple[Any, ModelConfig]:
  """(transformers config, ModelConfig) of a checkpoint folder; unsupported families refused."""
  config_file = path / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{config_file} is missing: a checkpoint folder needs config.json.")
  try:
    model_type = json.loads(config_file.read_text()).get("model_type")
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_file} is not valid JSON ({e}).") from None
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"{config_file}: model_type {model_type!r} is not supported. Supported model types: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
  import transformers  # pylint: disable=g-import-not-at-top  (slow import, only when loading)
  try:
    hf_config = transformers.AutoConfig.from_pretrained(path)
  except Exception as e:
    raise CheckpointError(f"{config_file} could not be read by transformers: {e}") from None
  return hf_config, ModelConfig.from_hf(hf_config)


# A folder holds a tokenizer when it has one of these: the fast tokenizer, a SentencePiece model, or the
# vocabulary of a slow BPE/WordPiece one (tokenizer_config.json alone is not a tokenizer).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def load_tokenizer(path: Path, source: str):
  """The tokenizer of the checkpoint folder `path` (from resolve()); `source` names it in errors.

  A folder with config.json but no tokenizer files is refused here: AutoTokenizer would otherwise
  build an empty tokenizer of the model type from config.json, without a word of warning.
  """
  path = Path(path)
  if not any((path / name).is_file() for name in _TOKENIZER_FILES):
    raise CheckpointError(
        f"{source}: the checkpoint folder {path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}). "
        "Copy the tokenizer files of the model it was made from into that folder (save_pretrained of the "
        "tokenizer writes them).")
  import transformers  # pylint: disable=g-import-not-at-top  (slow import, only when loading)
  try:
    return transformers.AutoTokenizer.from_pretrained(path)
  except Exception as e:  # a broken or unsupported tokenizer file: the folder is what the user can fix
    raise CheckpointError(f"{source}: transformers could not load the tokenizer in {path} "
                          f"({type(e).__name__}: {e}).") from None


class SafetensorsFolder:
  """Name -> memory-mapped tensor over one or several .safetensors files of a folder."""

  def __init__(self, path: Path):
    self.path = path
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
      weight_map = json.loads(index_file.read_text())["weight_map"]
      self.source = index_file
    else:
      files = sorted(path.glob("*.safetensors"))
      if not files:
        raise CheckpointError(
            f"{path} holds no *.safetensors weights. codit-jax reads safetensors only; convert "
            "PyTorch .bin weights with transformers (`model.save_pretrained(dir, safe_serialization=True)`).")
      weight_map = {name: f.name for f in files for name in _read_header(f)[0]}
      self.source = files[0] if len(files) == 1 else path
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
      raise CheckpointError(
          f"{index_file} lists shard(s) {', '.join(missing)} that are missing from {path}. The download "
          "is incomplete: download the checkpoint again (or copy the missing files).")
    self.weight_map = weight_map
    self._files: dict[str, tuple[dict, int]] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.weight_map

  def file_of(self, name: str) -> Path:
    return self.path / self.weight_map[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._entry(name)[0]["shape"])

  def memmap(self, name: str) -> np.ndarray:
    info, data_start = self._entry(name)
    begin, end = info["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[info["dtype"]]
    return np.memmap(self.file_of(name), dtype=dtype, mode="r", offset=data_start + begin,
                     shape=tuple(info["shape"]))

  def _entry(self, name: str):
    file = self.weight_map[name]
    if file not in self._files:
      self._files[file] = _read_header(self.path / file)
    header, data_start = self._files[file]
    if name not in header:
      raise CheckpointError(f"{self.path / file} has no tensor {name!r}, although the index says it does.")
    return header[name], data_start


def _read_header(file: Path) -> tuple[dict, int]:
  """The safetensors header: {name: {dtype, shape, data_offsets}} and where the data starts."""
  with open(file, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{file} is not a safetensors file (truncated).")
    (length,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError):
      raise CheckpointError(f"{file} is not a safetensors file (bad header).") from None
  header.pop("__metadata__", None)
  return header, 8 + length


def hf_name(path: tuple, prefixes: tuple[str, str]) -> str:
  """Our parameter path -> the checkpoint's tensor name."""
  parts = [str(p) for p in path]
  leaf = {"kernel": "weight", "embedding": "weight"}.get(parts[-1], parts[-1])
  dotted = ".".join(parts[:-1] + [leaf])
  if parts[0] == "lm_head":
    return prefixes[1] + dotted[len("lm_head."):]
  return prefixes[0] + dotted


def weight_prefixes(tensors: SafetensorsFolder) -> tuple[str, str] | None:
  """(decoder prefix, lm_head prefix) of the layout `tensors` are stored in; None without an embedding."""
  return next((p for p in _PREFIXES if p[0] + "embed_tokens.weight" in tensors), None)


def _is_transposed(path: tuple) -> bool:
  return path[-1] == "kernel"  # torch Linear stores (out, in)


def load_model(name_or_path: str | os.PathLike, dtype: str = "float32", mesh: Mesh | None = None,
               fsdp: bool = False, abstract: bool = False) -> Decoder:
  """Loads a checkpoint folder or Hub id into a Decoder, placed on `mesh` if given.

  abstract: check the checkpoint's tensors (names and shapes, from the file headers) but read none;
  every parameter is a jax.ShapeDtypeStruct with the shape, dtype and sharding it would be loaded
  with: the model to compile programs for while the weights load (engine.Engine.compile_ahead).
  """
  _check_dtype(dtype)
  path = resolve(str(name_or_path))
  _, cfg = load_config(path)
  tensors = SafetensorsFolder(path)
  prefixes = _weight_prefixes_or_raise(tensors)
  model = _decoder_from(cfg, dtype, lambda path_parts, shape: _load_tensor(
      tensors, path_parts, shape, prefixes, DTYPES[dtype], mesh, fsdp, abstract))
  if mesh is not None:
    use_expert_parallelism(model, mesh)
    use_sharded_decode_attention(model, mesh)
  return model


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise CheckpointError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}.")


def _weight_prefixes_or_raise(tensors: SafetensorsFolder) -> tuple[str, str]:
  prefixes = weight_prefixes(tensors)
  if prefixes is None:
    raise CheckpointError(
        f"{tensors.source} has no embedding tensor (looked for "
        f"{', '.join(p[0] + 'embed_tokens.weight' for p in _PREFIXES)}): this is not a checkpoint of a "
        "supported decoder, or it is incomplete.")
  return prefixes


def _decoder_from(cfg: ModelConfig, dtype: str, load) -> Decoder:
  """A Decoder of `cfg` whose every parameter is load(path_parts, shape): nothing is initialized."""
  abstract = nnx.eval_shape(lambda: Decoder(cfg, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  for path_parts, variable in state.flat_state():
    variable.set_value(load(path_parts, tuple(variable.get_value().shape)))
  return nnx.merge(graphdef, state)


def _load_tensor(tensors: SafetensorsFolder, path_parts: tuple, shape: tuple, prefixes, dtype, mesh, fsdp,
                 abstract: bool):
  read = _param_reader(tensors, path_parts, shape, prefixes, np.dtype(dtype))
  sharding = None if mesh is None else parallel.param_sharding(".".join(map(str, path_parts)), shape, mesh, fsdp)
  if abstract:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  if mesh is None:
    return jnp.asarray(read(()))
  return jax.make_array_from_callback(shape, sharding, read)


def _param_reader(tensors: SafetensorsFolder, path_parts: tuple, shape: tuple, prefixes, np_dtype):
  if _is_stacked_experts(path_parts):
    return _experts_reader(tensors, path_parts, shape, prefixes, np_dtype)
  return _tensor_reader(tensors, path_parts, shape, prefixes, np_dtype)


# Config fields two checkpoints of a pair may differ in and still share one program:
# the context length only bounds the prompts (a pair's instruct model is often
# trained longer than its base, e.g. Qwen3-8B 40960 against Qwen3-8B-Base 32768), and
# the embedding's padding past the tokenizer is padded further with zero rows to the
# larger of the two (no real token reads those rows; their logits are cut off).
_PAIR_FREE_FIELDS = ("max_position_embeddings", "vocab_size")


def pair_problem(cfg: ModelConfig, pre_cfg: ModelConfig) -> str | None:
  """Why the two models of a pair cannot be stacked for pair_parallel (None: they can)."""
  differing = [f.name for f in dataclasses.fields(cfg)
               if f.name not in _PAIR_FREE_FIELDS and getattr(cfg, f.name) != getattr(pre_cfg, f.name)]
  if differing:
    return (f"they differ in {', '.join(differing)}, and pair_parallel stacks the two models into one program, "
            "which needs the same architecture and shapes")
  if cfg.moe_layers:
    return ("the post-trained model has mixture-of-experts layers, which pair_parallel does not support "
            "(experts are split over 'model' instead)")
  return None


def load_pair(post_name_or_path: str | os.PathLike, pre_name_or_path: str | os.PathLike, mesh: Mesh,
              dtype: str = "float32", abstract: bool = False) -> Decoder:
  """Both models of a CoDIT pair as one Decoder whose every parameter is (2, *shape): [0] the
  post-trained model's, [1] the pre-trained one's, split over `mesh`'s 'pair' axis (see
  parallel.make_mesh(pair_parallel=True)); the engine then runs the two at the same time,
  one per half of the devices. The two must have the same architecture and shapes.
  abstract: as in load_model, shapes and shardings only."""
  _check_dtype(dtype)
  if parallel.PAIR not in mesh.shape:
    raise CheckpointError("load_pair needs a mesh with a 'pair' axis: parallel.make_mesh(..., pair_parallel=True).")
  paths = [resolve(str(name)) for name in (post_name_or_path, pre_name_or_path)]
  cfg, pre_cfg = (load_config(path)[1] for path in paths)
  problem = pair_problem(cfg, pre_cfg)
  if problem:
    raise CheckpointError(f"{paths[0]} and {paths[1]}: {problem}. Turn pair_parallel off for this pair.")
  folders = [SafetensorsFolder(path) for path in paths]
  prefixes = [_weight_prefixes_or_raise(tensors) for tensors in folders]
  np_dtype = np.dtype(DTYPES[dtype])
  vocab_sizes = (cfg.vocab_size, pre_cfg.vocab_size)
  cfg = dataclasses.replace(cfg, vocab_size=max(vocab_sizes))

  def load(path_parts, shape):
    axis = _vocab_axis(path_parts)
    readers = [_param_reader(t, path_parts, shape, p, np_dtype) if axis is None else
               _zero_padded(_param_reader(t, path_parts, _with(shape, axis, vocab), p, np_dtype), shape, axis, vocab,
                            np_dtype)
               for t, p, vocab in zip(folders, prefixes, vocab_sizes)]

    def read(index):
      index = _full_index(index, len(shape) + 1)
      return np.stack([readers[which](index[1:]) for which in range(2)[index[0]]])

    sharding = parallel.pair_param_sharding(".".join(map(str, path_parts)), shape, mesh)
    if abstract:
      return jax.ShapeDtypeStruct((2, *shape), np_dtype, sharding=sharding)
    return jax.make_array_from_callback((2, *shape), sharding, read)

  pair = _decoder_from(cfg, dtype, load)
  # The engine vmaps each step over the pair with spmd_axis_name='pair', and vmap adds 'pair' to
  # the kernel's shard_map specs: each half of the devices runs its model's kernel on its own shards.
  use_sharded_decode_attention(pair, mesh)
  return pair


def _full_index(index: tuple, ndim: int) -> tuple:
  return tuple(index) + (slice(None),) * (ndim - len(index))


def _vocab_axis(path_parts: tuple) -> int | None:
  """The vocabulary axis of a parameter: the embedding's rows, the lm_head kernel's columns; else None."""
  return {("embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}.get(tuple(map(str, path_parts)))


def _with(shape: tuple, axis: int, size: int) -> tuple:
  return shape[:axis] + (size,) + shape[axis + 1:]


def _zero_padded(read, shape: tuple, axis: int, size: int, np_dtype):
  """read(index) of a parameter of `shape`, whose first `size` entries on `axis` are the ones `read`
  (a reader of that smaller parameter, in np_dtype) gives and the rest zeros."""
  def padded(index):
    index = _full_index(index, len(shape))
    start, stop, step = index[axis].indices(shape[axis])
    if step != 1:
      raise ValueError(f"a strided read {index[axis]} of a padded parameter")
    out_shape = [len(range(*i.indices(n))) for i, n in zip(index, shape)]
    out = np.zeros(out_shape, np_dtype)
    inside = slice(min(start, size), min(stop, size))
    if inside.stop > inside.start:
      where = [slice(None)] * len(shape)
      where[axis] = slice(0, inside.stop - inside.start)
      out[tuple(where)] = read(_with(index, axis, inside))
    return out
  return padded


def _tensor_reader(tensors: SafetensorsFolder, path_parts: tuple, shape: tuple, prefixes, np_dtype):
  """read(index) -> the slice `index` of the parameter, from the one tensor it is stored as."""
  name = hf_name(path_parts, prefixes)
  _check_tensor(tensors, name, tuple(reversed(shape)) if _is_transposed(path_parts) else shape)
  source = tensors.memmap(name)
  transposed = _is_transposed(path_parts)

  def read(index):
    index = _full_index(index, len(shape))
    if transposed:
      return np.ascontiguousarray(source[tuple(reversed(index))].T, dtype=np_dtype)
    return np.ascontiguousarray(source[index], dtype=np_dtype)

  return read


def _check_tensor(tensors: SafetensorsFolder, name: str, expected: tuple) -> None:
  if name not in tensors:
    raise CheckpointError(
        f"tensor {name!r} is missing from {tensors.source}. The checkpoint is incomplete, or its "
        "config.json does not describe these weights (check model_type and tie_word_embeddings).")
  if tensors.shape(name) != expected:
    raise CheckpointError(
        f"tensor {name!r} in {tensors.file_of(name)} has shape {tensors.shape(name)}, but config.json "
        f"implies {expected}. The config and the weights belong to different models: fix config.json "
        "or download the checkpoint again.")


def _is_stacked_experts(path_parts: tuple) -> bool:
  return len(path_parts) >= 2 and path_parts[-2] == "experts"  # layers.N.mlp.experts.{gate,up,down}_proj


def _experts_reader(tensors: SafetensorsFolder, path_parts: tuple, shape: tuple, prefixes, np_dtype):
  """read(index) -> a slice of stacked expert weights (experts, in, out), from either layout:

  * the Hub's, one torch (out, in) tensor per expert:
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight;
  * transformers 5's in-memory one (save_pretrained(save_original_format=False)):
    mlp.experts.gate_up_proj (experts, 2 * inter, hidden), gate rows first, and
    mlp.experts.down_proj (experts, hidden, inter).
  Either way a slice reads only the experts and rows it covers.
  """
  base = prefixes[0] + ".".join(map(str, path_parts[:-1])) + "."  # 'model.layers.N.mlp.experts.'
  leaf = str(path_parts[-1])
  num_experts, fan_in, fan_out = shape
  if base + f"0.{leaf}.weight" in tensors:
    names = [base + f"{e}.{leaf}.weight" for e in range(num_experts)]
    for name in names:
      _check_tensor(tensors, name, (fan_out, fan_in))

    def read_per_expert(index):
      experts, rows_in, rows_out = _full_index(index, 3)
      return np.stack([np.asarray(tensors.memmap(names[e])[rows_out, rows_in].T, dtype=np_dtype)
                       for e in range(num_experts)[experts]])

    return read_per_expert
  fused = base + ("down_proj" if leaf == "down_proj" else "gate_up_proj")
  if fused not in tensors:
    raise CheckpointError(
        f"the experts' {leaf} weights are missing from {tensors.source}: found neither {base}0.{leaf}.weight "
        f"(one tensor per expert, as on the Hub) nor {fused} (stacked, as transformers 5 keeps them). The "
        "checkpoint is incomplete, or its config.json does not describe these weights.")
  stacked_rows = 2 * fan_out if fused.endswith("gate_up_proj") else fan_out
  _check_tensor(tensors, fused, (num_experts, stacked_rows, fan_in))
  source = tensors.memmap(fused)
  row_offset = fan_out if leaf == "up_proj" else 0

  def read_stacked(index):
    experts, rows_in, rows_out = _full_index(index, 3)
    out_range = range(fan_out)[rows_out]
    rows = slice(row_offset + out_range.start, row_offset + out_range.stop, out_range.step)
    return np.ascontiguousarray(source[experts, rows, rows_in].transpose(0, 2, 1), dtype=np_dtype)

  return read_stacked
