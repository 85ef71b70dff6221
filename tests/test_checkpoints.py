"""The loader: what it refuses, and how it says so; dtypes and the Hub layout of Gemma 3."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import tiny_checkpoints
from codit_jax import checkpoints, parallel
from codit_jax.errors import CheckpointError
from codit_jax.models import forward


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory):
  folder = tmp_path_factory.mktemp("llama")
  return tiny_checkpoints.make_checkpoint(str(folder), "llama", max_shard_size="40KB")


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def test_unsupported_family_lists_supported_ones(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
  with pytest.raises(CheckpointError) as e:
    checkpoints.load_model(tmp_path)
  message = str(e.value)
  assert "'gpt2' is not supported" in message and str(tmp_path / "config.json") in message
  for family in ("llama", "qwen2", "qwen3", "mistral", "gemma3_text", "olmo3"):
    assert family in message


def test_missing_shard_is_named(llama_sharded, tmp_path):
  folder = _copy(llama_sharded, tmp_path)
  index = json.loads((folder / "model.safetensors.index.json").read_text())
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 1
  (folder / shards[1]).unlink()
  with pytest.raises(CheckpointError, match=f"{shards[1]}.*missing.*download the checkpoint again"):
    checkpoints.load_model(folder)


def test_missing_tensor_is_named(llama_sharded, tmp_path):
  folder = _copy(llama_sharded, tmp_path)
  index_file = folder / "model.safetensors.index.json"
  index = json.loads(index_file.read_text())
  name = "model.layers.1.mlp.up_proj.weight"
  shard = folder / index["weight_map"].pop(name)
  tensors = load_file(shard)
  del tensors[name]
  save_file(tensors, shard)
  index_file.write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match=f"tensor '{name}' is missing"):
    checkpoints.load_model(folder)


def test_shape_mismatch_names_tensor_and_file(llama_sharded, tmp_path):
  folder = _copy(llama_sharded, tmp_path)
  config = json.loads((folder / "config.json").read_text())
  config["intermediate_size"] = 96
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError) as e:
    checkpoints.load_model(folder)
  message = str(e.value)
  assert "model.layers.0.mlp.down_proj.weight" in message and ".safetensors" in message
  assert "(64, 128)" in message and "(64, 96)" in message


def _signature(model):
  return [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(model)]


def test_abstract_load_matches_the_loaded_model_and_checks_the_tensors(llama_sharded, tmp_path):
  """abstract=True (what codit-generate compiles for while the weights load) gives every parameter
  the shape, dtype and sharding it is loaded with, in the same structure, and still refuses a
  checkpoint whose tensors do not match its config.json."""
  mesh = parallel.make_mesh(model_parallelism=2)
  for dtype in ("float32", "bfloat16"):
    loaded = checkpoints.load_model(llama_sharded, dtype, mesh)
    shapes = checkpoints.load_model(llama_sharded, dtype, mesh, abstract=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert jax.tree.structure(shapes) == jax.tree.structure(loaded)
    assert _signature(shapes) == _signature(loaded)
  post, pre = tiny_checkpoints.make_pair(str(tmp_path / "pair"), "llama")
  pair_mesh = parallel.make_mesh(pair_parallel=True)
  pair, pair_shapes = (checkpoints.load_pair(post, pre, pair_mesh, abstract=abstract) for abstract in (False, True))
  assert jax.tree.structure(pair_shapes) == jax.tree.structure(pair)
  assert _signature(pair_shapes) == _signature(pair)
  folder = _copy(llama_sharded, tmp_path)
  config = json.loads((folder / "config.json").read_text())
  (folder / "config.json").write_text(json.dumps(dict(config, intermediate_size=96)))
  with pytest.raises(CheckpointError, match="model.layers.0.mlp.down_proj.weight.*has shape"):
    checkpoints.load_model(folder, mesh=mesh, abstract=True)


def test_missing_folder_and_unreachable_hub_id(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    checkpoints.load_model(tmp_path / "nowhere")
  # Tests run with HF_HUB_OFFLINE=1: the Hub cannot be reached.
  with pytest.raises(CheckpointError, match="could not download 'no-such-org/no-such-model'"):
    checkpoints.load_model("no-such-org/no-such-model")


def test_folder_without_safetensors(llama_sharded, tmp_path):
  folder = tmp_path / "bin_only"
  folder.mkdir()
  shutil.copy(llama_sharded + "/config.json", folder)
  (folder / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(CheckpointError, match="no \\*.safetensors"):
    checkpoints.load_model(folder)


def test_bfloat16_load_is_close_to_float32(llama_sharded):
  tokens = jnp.asarray(np.arange(40, dtype=np.int32)[None] % tiny_checkpoints.TOKENIZER_SIZE)
  mask = jnp.ones_like(tokens)
  f32 = checkpoints.load_model(llama_sharded, dtype="float32")
  bf16 = checkpoints.load_model(llama_sharded, dtype="bfloat16")
  assert bf16.layers[0].self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
  logits32, _ = forward(f32, tokens, mask)
  logits16, _ = forward(bf16, tokens, mask)
  assert logits16.dtype == jnp.float32
  # bf16 has ~3 significant digits; the argmax should mostly agree.
  agree = np.mean(np.argmax(logits16, -1) == np.argmax(logits32, -1))
  assert agree > 0.9
  assert np.abs(np.asarray(logits16) - np.asarray(logits32)).max() < 0.25


def test_unknown_dtype_refused(llama_sharded):
  with pytest.raises(CheckpointError, match="dtype 'float8'"):
    checkpoints.load_model(llama_sharded, dtype="float8")


def test_gemma3_multimodal_both_layouts(tmp_path):
  """Gemma 3 on the Hub (and save_pretrained's default) names the text weights language_model.model.*;
  transformers 5 holds them in memory, and saves them with save_original_format=False, as model.language_model.*."""
  folder = tiny_checkpoints.make_checkpoint(str(tmp_path / "saved"), "gemma3_multimodal")
  renamed_folder = tmp_path / "renamed"
  shutil.copytree(folder, renamed_folder)
  for file in renamed_folder.glob("*.safetensors"):
    tensors = load_file(file)
    assert any(name.startswith("language_model.model.") for name in tensors)
    save_file({name.replace("language_model.model.", "model.language_model."): t for name, t in tensors.items()}, file)
  tokens = jnp.asarray(np.arange(20, dtype=np.int32)[None])
  mask = jnp.ones_like(tokens)
  hub_logits, _ = forward(checkpoints.load_model(folder), tokens, mask)
  renamed_logits, _ = forward(checkpoints.load_model(renamed_folder), tokens, mask)
  np.testing.assert_array_equal(np.asarray(hub_logits), np.asarray(renamed_logits))


@pytest.mark.parametrize("family", ["llama", "gemma3", "olmo3"])
def test_legacy_rope_config_format(family, tmp_path):
  """transformers 4.x configs (rope_theta / rope_scaling / rope_local_base_freq) give the same model."""
  new = tiny_checkpoints.make_checkpoint(str(tmp_path / "new"), family)
  old = tiny_checkpoints.make_checkpoint(str(tmp_path / "old"), family, legacy_format=True)
  assert "rope_parameters" not in json.loads((tmp_path / "old" / "config.json").read_text())
  tokens = jnp.asarray(np.arange(70, dtype=np.int32)[None] % tiny_checkpoints.TOKENIZER_SIZE)
  mask = jnp.ones_like(tokens)
  new_logits, _ = forward(checkpoints.load_model(new), tokens, mask)
  old_logits, _ = forward(checkpoints.load_model(old), tokens, mask)
  np.testing.assert_array_equal(np.asarray(new_logits), np.asarray(old_logits))
