"""The tuned student as a Hugging Face folder (output_dir/hf) that transformers loads.

The folder is the student's own, with the weights replaced:
  * every tensor of the student's safetensors is written again under its own
    name, shape and dtype (or `export_dtype`): ours where we trained it (the
    loader's mapping inverted, kernels transposed back to torch's (out, in),
    experts in whichever layout the student stores them), copied unchanged
    where we did not (a multimodal checkpoint's vision tower). A tied
    student stays tied: there is no lm_head to write, or, where the student
    stores one anyway, it gets the tuned embedding;
  * config.json and the other small files are copied; the tokenizer is saved
    with the chat template the student was tuned with;
  * generation_config.json stops on the end-of-turn token it was tuned to write.
The folder is built under a temporary name and renamed into place whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from jax.experimental import multihost_utils

from codit_jax import checkpoints
from codit_jax.errors import CoditError

EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_TORCH_DTYPE_NAMES = {np.dtype(np.float32): "float32", np.dtype(ml_dtypes.bfloat16): "bfloat16",
                      np.dtype(np.float16): "float16"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
_SKIPPED_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_SHARD_BYTES = 5 * 2**30  # as transformers' save_pretrained shards


def export(params: dict[str, Any], student_path: Path, tokenizer, out_dir: Path, *, tied: bool,
           end_ids: list[int], export_dtype: str = "", max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
  """Writes the student with `params` (flat dict, our names) to `out_dir`; returns it."""
  if export_dtype and export_dtype not in EXPORT_DTYPES:
    raise CoditError(f"export_dtype {export_dtype!r} is not supported; use '' (the student's own dtypes) "
                     f"or one of {', '.join(EXPORT_DTYPES)}.")
  out_dir = Path(out_dir)
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):  # of an export that was killed
    shutil.rmtree(leftover)
  temporary = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
  temporary.mkdir()
  _copy_small_files(student_path, temporary)
  source = checkpoints.SafetensorsFolder(student_path)
  dtypes = _write_weights(params, source, temporary, tied, export_dtype, max_shard_bytes)
  _write_config(student_path / "config.json", temporary / "config.json", dtypes if export_dtype else None)
  tokenizer.save_pretrained(str(temporary))
  _write_generation_config(student_path, temporary, end_ids, tokenizer)
  if out_dir.exists():
    shutil.rmtree(out_dir)
  temporary.rename(out_dir)
  return out_dir


def _copy_small_files(student_path: Path, target: Path) -> None:
  for file in student_path.iterdir():
    if file.is_file() and not file.name.endswith(_WEIGHT_SUFFIXES) and file.name not in _SKIPPED_FILES:
      shutil.copyfile(file, target / file.name)


def tensor_producers(params: dict[str, Any], source: checkpoints.SafetensorsFolder,
                     tied: bool) -> dict[str, Callable[[], np.ndarray]]:
  """{checkpoint tensor name: () -> its tuned value}, in the student's layout."""
  prefixes = checkpoints.weight_prefixes(source)
  if prefixes is None:
    raise CoditError(f"{source.source} has no embedding tensor; cannot map the tuned weights onto it.")
  producers: dict[str, Callable[[], np.ndarray]] = {}
  for name in params:
    parts = tuple(name.split("."))
    if len(parts) >= 2 and parts[-2] == "experts":
      producers.update(_expert_producers(params, parts, prefixes, source))
    elif parts[-1] == "kernel":  # torch Linear stores (out, in)
      producers[checkpoints.hf_name(parts, prefixes)] = lambda name=name: _host(params[name]).T
    else:
      producers[checkpoints.hf_name(parts, prefixes)] = lambda name=name: _host(params[name])
  head = prefixes[1] + "weight"
  if tied and head in source:  # stored although tied: keep it equal to the tuned embedding
    producers[head] = lambda: _host(params["embed_tokens.embedding"])
  return producers


def _expert_producers(params, parts: tuple, prefixes, source) -> dict[str, Callable[[], np.ndarray]]:
  """Stacked experts (experts, in, out) back to the student's layout (see checkpoints._experts_reader)."""
  name = ".".join(parts)
  base = prefixes[0] + ".".join(parts[:-1]) + "."
  leaf = parts[-1]
  if base + f"0.{leaf}.weight" in source:  # one torch (out, in) tensor per expert, as on the Hub
    num_experts = params[name].shape[0]
    return {base + f"{e}.{leaf}.weight": (lambda e=e: _host(params[name][e]).T) for e in range(num_experts)}
  if leaf == "down_proj":
    return {base + "down_proj": lambda: _host(params[name]).transpose(0, 2, 1)}
  if leaf == "gate_proj":  # transformers 5's fused gate_up_proj (experts, 2 * inter, hidden), gate rows first
    up = ".".join(parts[:-1] + ("up_proj",))
    return {base + "gate_up_proj": lambda: np.concatenate(
        [_host(params[name]).transpose(0, 2, 1), _host(params[up]).transpose(0, 2, 1)], axis=1)}
  return {}  # up_proj: written with gate_proj


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _write_weights(params, source: checkpoints.SafetensorsFolder, target: Path, tied: bool, export_dtype: str,
                   max_shard_bytes: int) -> set:
  """Writes model.safetensors (or shards and an index); returns the floating dtypes written."""
  producers = tensor_producers(params, source, tied)
  unknown = sorted(set(producers) - set(source.weight_map))
  if unknown:
    raise CoditError(f"tuned tensors {unknown[:5]} have no counterpart in {source.source}; the export "
                     "cannot name them the way the student does.")
  names = sorted(source.weight_map)
  sizes, dtypes = {}, {}
  for name in names:
    stored = source.memmap(name)
    floating = np.issubdtype(stored.dtype, np.floating) or stored.dtype == ml_dtypes.bfloat16
    dtypes[name] = EXPORT_DTYPES[export_dtype] if export_dtype and floating else stored.dtype
    sizes[name] = int(np.prod(stored.shape)) * dtypes[name].itemsize
  shards = _plan_shards(names, sizes, max_shard_bytes)
  files = ["model.safetensors"] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for file, shard in zip(files, shards):
    tensors = {}
    for name in shard:
      value = producers[name]() if name in producers else np.asarray(source.memmap(name))
      if tuple(value.shape) != tuple(source.shape(name)):
        raise CoditError(f"tuned tensor {name!r} has shape {value.shape}, the student's {source.shape(name)}.")
      tensors[name] = np.ascontiguousarray(value.astype(dtypes[name]))
      weight_map[name] = file
    safetensors.numpy.save_file(tensors, str(target / file), metadata={"format": "pt"})
    os.chmod(target / file, _plain_file_mode())  # safetensors creates its files 0600
  if len(files) > 1:
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
  return {dtypes[n] for n in names if n in producers}


def _plain_file_mode() -> int:
  """The mode open() gives a new file under this process's umask (0644 under the usual 022)."""
  umask = os.umask(0)
  os.umask(umask)
  return 0o666 & ~umask


def _plan_shards(names: list[str], sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
  shards, current, used = [], [], 0
  for name in names:
    if current and used + sizes[name] > max_shard_bytes:
      shards.append(current)
      current, used = [], 0
    current.append(name)
    used += sizes[name]
  return shards + [current] if current else shards or [[]]


def _write_config(source: Path, target: Path, dtypes) -> None:
  """config.json as the student's; its dtype field follows export_dtype when one was asked for."""
  config = json.loads(source.read_text())
  if dtypes and len(dtypes) == 1:
    name = _TORCH_DTYPE_NAMES.get(next(iter(dtypes)))
    for key in ("dtype", "torch_dtype"):
      if key in config:
        config[key] = name
    if isinstance(config.get("text_config"), dict):
      for key in ("dtype", "torch_dtype"):
        if key in config["text_config"]:
          config["text_config"][key] = name
  target.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_generation_config(student_path: Path, target: Path, end_ids: list[int], tokenizer) -> None:
  """The student's generation_config.json, with the trained end-of-turn token among its eos ids."""
  source = student_path / "generation_config.json"
  config = json.loads(source.read_text()) if source.is_file() else {}
  eos = config.get("eos_token_id")
  eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
  for token in [end_ids[-1]] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []):
    if token not in eos:
      eos.append(int(token))
  config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
  if "pad_token_id" not in config and tokenizer.pad_token_id is not None:
    config["pad_token_id"] = int(tokenizer.pad_token_id)
  (target / "generation_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
