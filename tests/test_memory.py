"""codit_jax.memory: weights and KV cache by hand on tiny models, the automatic model_parallelism on
simulated machines, the budget honoured, the refusals."""

import itertools
import types
from pathlib import Path

import jax
import pytest

from codit_jax import checkpoints, memory
from codit_jax.errors import CoditError
from codit_jax.models.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from tests import tiny_checkpoints as tc

GiB = memory.GiB
V = tc.TOKENIZER_SIZE + 16  # make_checkpoint's default vocab_padding
H, I, D = tc.HIDDEN_SIZE, tc.INTERMEDIATE_SIZE, tc.HEAD_DIM
Q, KV = tc.NUM_HEADS * D, tc.NUM_KV_HEADS * D  # 64, 32
ATTENTION = H * Q + 2 * H * KV + Q * H  # q, k, v, o kernels (no biases in these families)
MLP = 3 * H * I

# Elements of every tensor the decoder loads, by hand from tiny_checkpoints' sizes.
LLAMA = 3 * (ATTENTION + MLP + 2 * H) + 2 * V * H + H  # 3 layers, 2 norms each; embed + lm_head; final norm
LLAMA_TIED = LLAMA - V * H
# Gemma 3 multimodal: 4 layers with 4 sandwich norms and q/k head norms; tied; the vision tower not counted.
GEMMA3 = 4 * (ATTENTION + MLP + 4 * H + 2 * D) + V * H + H
# Qwen3 MoE: layers 0 and 2 route over 8 experts of width 32 (router 8 x 64), layer 1 is a dense MLP.
EXPERTS = tc.NUM_EXPERTS * 3 * H * tc.MOE_INTERMEDIATE_SIZE + tc.NUM_EXPERTS * H
QWEN3_MOE = 3 * (ATTENTION + 2 * D + 2 * H) + 2 * EXPERTS + MLP + 2 * V * H + H


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("memory")
  return {family: Path(tc.make_checkpoint(root / family, family, dtype="bfloat16"))
          for family in ("llama", "llama_tied", "gemma3_multimodal", "qwen3_moe")}


@pytest.mark.parametrize("family,elements", [("llama", LLAMA), ("llama_tied", LLAMA_TIED),
                                             ("gemma3_multimodal", GEMMA3), ("qwen3_moe", QWEN3_MOE)])
def test_weight_bytes_by_hand(tiny, family, elements):
  _, cfg = checkpoints.load_config(tiny[family])
  for dtype, size in (("bfloat16", 2), ("float32", 4)):
    assert memory.weight_bytes(cfg, dtype) == elements * size
    assert memory.checkpoint_weight_bytes(tiny[family], dtype) == elements * size
  assert memory.weight_bytes_per_device(cfg, "bfloat16", 1) == elements * 2


def test_weights_per_device_count_what_stays_whole(tiny):
  _, cfg = checkpoints.load_config(tiny["llama"])
  assert V % 4 == 0 and V % 8  # 316 rows: split over 4 devices, whole on each of 8
  layers_split = lambda mp: 3 * ((ATTENTION + MLP) // mp + 2 * H)  # noqa: E731  (norms replicated)
  assert memory.weight_bytes_per_device(cfg, "bfloat16", 4) == 2 * (layers_split(4) + 2 * V * H // 4 + H)
  assert memory.weight_bytes_per_device(cfg, "bfloat16", 8) == 2 * (layers_split(8) + 2 * V * H + H)


def _cfg(layer_types, window=16, kv_heads=2, head_dim=16):
  return ModelConfig(model_type="gemma3_text", vocab_size=100, hidden_size=64, intermediate_size=128,
                     num_layers=len(layer_types), num_heads=4, num_kv_heads=kv_heads, head_dim=head_dim,
                     rms_norm_eps=1e-6, max_position_embeddings=4096, layer_types=tuple(layer_types),
                     sliding_window=window if SLIDING_ATTENTION in layer_types else None)


def test_cache_bytes_per_slot_by_hand():
  cfg = _cfg([SLIDING_ATTENTION] * 5 + [FULL_ATTENTION])  # Gemma 3's 5 local : 1 global
  per_cache_slot = 2 * 2 * 16 * 2  # keys and values, 2 kv heads, head_dim 16, bfloat16: 128 bytes
  assert memory.layer_slots(cfg, 64) == (16,) * 5 + (64,)
  assert memory.kv_bytes_per_slot(cfg, 64, "bfloat16") == per_cache_slot * (5 * 16 + 64)
  assert memory.kv_bytes_per_slot(cfg, 64, "bfloat16", ring_buffers=False) == per_cache_slot * 6 * 64
  assert memory.kv_bytes_per_slot(cfg, 64, "float32") == 2 * per_cache_slot * (5 * 16 + 64)
  # A window no shorter than the cache keeps the cache length.
  assert memory.layer_slots(cfg, 12) == (12,) * 6
  full = _cfg([FULL_ATTENTION] * 3)
  assert memory.kv_bytes_per_slot(full, 256, "bfloat16") == 3 * per_cache_slot * 256


def test_cache_lengths():
  assert memory.cache_lengths(40960, 4096) == (6144, 40960)  # Qwen3-8B: main 2048 + 4096, long the context
  assert memory.cache_lengths(8192, 4096) == (6144, 8192)
  assert memory.cache_lengths(6144, 4096) == (6144, 0)  # no prompt is longer than the main pass takes
  assert memory.cache_lengths(40960, 4096, max_prompt_len=100) == (4352, 40960)  # 4196 rounded to 256s
  with pytest.raises(CoditError, match="max_new_tokens"):
    memory.cache_lengths(4096, 4096)


def test_slot_bytes_split_only_when_model_parallelism_divides_kv_heads():
  m = memory.ModelMemory.simple(weight_bytes=GiB, kv_heads=8, kv_main=8 * 1000, len_main=100)
  assert m.slot_bytes_per_device(4) == 2000
  assert m.slot_bytes_per_device(16) == 8000  # 8 heads over 16 devices: every device holds all
  assert m.weights_per_device(3) == -(-GiB // 3)


# A Qwen3-8B-sized pair, from its config.json (docs/memory.md): 8,190,735,360 parameters in bfloat16;
# keys and values of one slot at L = 2048 + 4096: 36 layers x 2 x 8 kv heads x 128 x 6144 x 2 bytes.
QWEN3_8B_WEIGHTS = 8_190_735_360 * 2
QWEN3_8B_SLOT = 36 * 2 * 8 * 128 * 6144 * 2
QWEN3_8B = memory.ModelMemory.simple(QWEN3_8B_WEIGHTS, kv_heads=8, kv_main=QWEN3_8B_SLOT, len_main=6144,
                                     kv_long=QWEN3_8B_SLOT // 6144 * 40960, len_long=40960)
PAIR = (QWEN3_8B, QWEN3_8B)
H200 = int(0.75 * 143771 * 2**20)  # bytes_limit: JAX's default 75% of the GPU


@pytest.mark.parametrize("device_memory,devices,batch_size,expected_mp", [
    (H200, 1, 64, 1),  # 141 GB: both models on one GPU
    (H200, 8, 64, 1),  # 8 GPUs: one model per GPU, 8 data-parallel replicas
    (16 * GiB, 8, 32, 4),  # v5e-8: 2 devices cannot hold 30.5 GiB of weights; 4 hold the batch of 32
    (16 * GiB, 8, 64, 8),  # ... but not 64 slots (32); 8 devices hold the most (50)
    (16 * GiB, 16, 64, 4),  # v5litepod-16: 4 replicas of 4 chips hold the batch of 64
    (32 * GiB, 8, 64, 2),  # v6e-8: 2 chips hold the weights and 4 x 16 slots
    (95 * GiB, 4, 64, 1),  # v5p-8 (4 chips): one chip holds both models and 16 slots
    (24 * GiB, 4, 8, 2),  # 4 x 24 GiB GPUs, a small batch: 2 per model is enough
])
def test_automatic_model_parallelism(device_memory, devices, batch_size, expected_mp):
  p = memory.plan(PAIR, device_memory=device_memory, device_count=devices, batch_size=batch_size)
  assert p.model_parallelism == expected_mp, p.describe()
  assert p.auto_parallelism and p.data_parallel == devices // expected_mp
  assert "model_parallelism %d (automatic)" % expected_mp in p.describe()


def test_automatic_model_parallelism_numbers_on_v5e_8():
  p = memory.plan(PAIR, device_memory=16 * GiB, device_count=8, batch_size=64)
  free = 16 * GiB - int(0.1 * 16 * GiB) - 2 * -(-QWEN3_8B_WEIGHTS // 8)
  per_slot = 2 * (QWEN3_8B_SLOT // 8)
  assert p.weights_per_device == 2 * -(-QWEN3_8B_WEIGHTS // 8)
  assert p.slot_bytes_main == per_slot and p.budget_per_device == free
  assert p.slots_main == free // per_slot == 50 and p.limited_by == "memory"
  assert p.slots_long == free // (2 * (QWEN3_8B_SLOT // 6144 * 40960 // 8)) == 7


def test_unknown_memory_gives_batch_size_slots():
  p = memory.plan(PAIR, device_memory=None, device_count=8, batch_size=30)
  assert (p.model_parallelism, p.data_parallel, p.slots_main, p.slots_long) == (1, 8, 24, 24)  # rounded to 8
  assert p.budget_per_device is None and "unknown" in p.describe()
  p = memory.plan(PAIR, device_memory=None, device_count=8, batch_size=4)
  assert p.model_parallelism == 2  # 8 replicas would be more than 4 slots


@pytest.mark.parametrize("device_memory,devices,batch_size,kv_cache_gib,mp,pair", list(itertools.product(
    [16 * GiB, 32 * GiB, 95 * GiB, H200], [1, 2, 8, 16], [1, 7, 64, 256], [0.0, 0.5, 2.0],
    [0, 4], [False, True])))
def test_budget_is_honoured(device_memory, devices, batch_size, kv_cache_gib, mp, pair):
  try:
    p = memory.plan(PAIR, device_memory=device_memory, device_count=devices, batch_size=batch_size,
                    kv_cache_gib=kv_cache_gib, model_parallelism=mp, pair_parallel=pair)
  except CoditError:
    return  # refusals are tested below
  assert 0 < p.slots_main <= batch_size and p.slots_main % p.data_parallel == 0
  assert 0 <= p.slots_long <= batch_size and p.slots_long % p.data_parallel == 0
  per_replica, long_per_replica = p.slots_main // p.data_parallel, p.slots_long // p.data_parallel
  assert per_replica * p.slot_bytes_main <= p.budget_per_device
  assert long_per_replica * p.slot_bytes_long <= p.budget_per_device
  if kv_cache_gib:
    assert p.budget_per_device == int(kv_cache_gib * GiB)
  assert p.weights_per_device + p.budget_per_device + int(0.1 * device_memory) <= device_memory
  group = devices // 2 if pair else devices
  assert p.data_parallel * p.model_parallelism == group


def test_pair_parallel_holds_one_model_per_half():
  p = memory.plan(PAIR, device_memory=32 * GiB, device_count=8, batch_size=64, pair_parallel=True)
  assert p.pair_parallel and p.model_parallelism * p.data_parallel == 4
  assert p.weights_per_device == -(-QWEN3_8B_WEIGHTS // p.model_parallelism)  # one model, not two
  assert p.slot_bytes_main == QWEN3_8B_SLOT // p.model_parallelism
  with pytest.raises(CoditError, match="even device count"):
    memory.plan(PAIR, device_memory=32 * GiB, device_count=3, batch_size=8, pair_parallel=True)
  with pytest.raises(CoditError, match="direct mode"):
    memory.plan(PAIR[:1], device_memory=32 * GiB, device_count=2, batch_size=8, pair_parallel=True)


def test_refusals_say_what_to_change():
  # Weights that leave no room for one slot at a set model_parallelism.
  with pytest.raises(CoditError, match=r"model_parallelism > 1.*max_new_tokens.*bfloat16"):
    memory.plan(PAIR, device_memory=32 * GiB, device_count=8, batch_size=8, model_parallelism=1)
  # A kv_cache_gib too small for one slot.
  with pytest.raises(CoditError, match=r"too small for one slot.*max_new_tokens.*model_parallelism.*kv_cache_gib"):
    memory.plan(PAIR, device_memory=H200, device_count=1, batch_size=8, kv_cache_gib=1.0)
  # A kv_cache_gib larger than what is free.
  with pytest.raises(CoditError, match="kv_cache_gib=100"):
    memory.plan(PAIR, device_memory=H200, device_count=1, batch_size=8, kv_cache_gib=100)
  # Not even all devices hold the weights.
  with pytest.raises(CoditError, match=r"2 device\(s\) of 16.00 GiB cannot hold the weights"):
    memory.plan(PAIR, device_memory=16 * GiB, device_count=2, batch_size=8)
  with pytest.raises(CoditError, match="must divide"):
    memory.plan(PAIR, device_memory=H200, device_count=8, batch_size=8, model_parallelism=3)
  with pytest.raises(CoditError, match="smaller than the 8 data-parallel replicas"):
    memory.plan(PAIR, device_memory=H200, device_count=8, batch_size=4, model_parallelism=1)


def test_long_pass_without_a_slot_is_zero_not_an_error():
  p = memory.plan(PAIR, device_memory=16 * GiB, device_count=8, batch_size=32, model_parallelism=4)
  assert p.slots_main == 32 and p.slots_long == 2 * (p.budget_per_device // p.slot_bytes_long)
  tight = memory.plan(PAIR, device_memory=10 * GiB, device_count=4, batch_size=8, model_parallelism=4)
  assert tight.slots_long == 0 and tight.slots_main > 0 and "no slot fits" in tight.describe()


def test_device_memory_bytes():
  fake = lambda limit: types.SimpleNamespace(memory_stats=lambda: {"bytes_limit": limit, "bytes_in_use": 0})  # noqa: E731
  assert memory.device_memory_bytes([fake(16 * GiB), fake(15 * GiB)]) == 15 * GiB
  assert memory.device_memory_bytes([fake(16 * GiB), types.SimpleNamespace(memory_stats=lambda: None)]) is None
  assert memory.device_memory_bytes(jax.devices("cpu")) is None  # XLA:CPU reports no memory stats


def test_model_memory_from_config_matches_the_functions(tiny):
  _, cfg = checkpoints.load_config(tiny["gemma3_multimodal"])  # sliding layers (window 16)
  m = memory.ModelMemory.from_config(cfg, "bfloat16", 64, 512, parallelisms=(1, 2))
  assert m.weight_bytes == 2 * GEMMA3 and m.weights_per_device(2) == memory.weight_bytes_per_device(cfg, "bfloat16", 2)
  assert m.kv_main == memory.kv_bytes_per_slot(cfg, 64, "bfloat16")
  assert m.kv_long == memory.kv_bytes_per_slot(cfg, 512, "bfloat16")
  plain = memory.ModelMemory.from_config(cfg, "bfloat16", 64, parallelisms=(1,), ring_buffers=False)
  assert plain.kv_main == memory.kv_bytes_per_slot(cfg, 64, "bfloat16", ring_buffers=False) > m.kv_main
  assert plain.kv_long == 0
  with pytest.raises(CoditError, match="model_parallelism=4"):
    m.weights_per_device(4)
