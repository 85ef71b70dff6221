"""Sanity tests of the tiny checkpoint builder (tests/tiny_checkpoints.py)."""

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

sys.path.insert(0, os.path.dirname(__file__))
import tiny_checkpoints as tc  # noqa: E402

# End tokens expected in generation_config.json of a post-trained checkpoint.
EXPECTED_GEN_EOS = {
    "llama": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "llama_tied": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "qwen2": ["<|im_end|>", "<|endoftext|>"],
    "qwen3": ["<|im_end|>", "<|endoftext|>"],
    "qwen3_moe": ["<|im_end|>", "<|endoftext|>"],
    "mistral": ["</s>"],
    "gemma3": ["<eos>", "<end_of_turn>"],
    "gemma3_multimodal": ["<eos>", "<end_of_turn>"],
    "olmo2": ["<|im_end|>"],
    "olmo3": ["<|im_end|>", "<|endoftext|>"],
}

# How the generation prompt ends, per family.
EXPECTED_PROMPT_END = {
    "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "llama_tied": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "qwen2": "<|im_start|>assistant\n",
    "qwen3": "<|im_start|>assistant\n",
    "qwen3_moe": "<|im_start|>assistant\n",
    "mistral": "[/INST]",
    "gemma3": "<start_of_turn>model\n",
    "gemma3_multimodal": "<start_of_turn>model\n",
    "olmo2": "<|im_start|>assistant\n",
    "olmo3": "<|im_start|>assistant\n",
}

# A parameter name (substring) each family's saved checkpoint must contain: the features the JAX model must get right.
EXPECTED_KEYS = {
    "llama": ["lm_head.weight"],
    "llama_tied": [],
    "qwen2": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "lm_head.weight"],
    "qwen3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight"],
    # Hub layout: one tensor per expert; layer 1 is dense (mlp_only_layers).
    "qwen3_moe": ["layers.0.mlp.gate.weight", "layers.0.mlp.experts.7.down_proj.weight", "layers.1.mlp.up_proj.weight"],
    "mistral": ["lm_head.weight"],
    "gemma3": ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight", "self_attn.q_norm.weight"],
    "gemma3_multimodal": ["language_model.model.layers.0.self_attn.q_norm.weight",
                          "multi_modal_projector.mm_input_projection_weight"],
    "olmo2": ["post_feedforward_layernorm.weight", "self_attn.q_norm.weight"],
    "olmo3": ["post_feedforward_layernorm.weight", "self_attn.k_norm.weight"],
}

TIED = {"llama_tied", "gemma3", "gemma3_multimodal"}


def _safetensors_tensors(path):
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    return out


def _text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family built once (seed 0, default padding), shared by the tests of this module."""
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = tc.make_checkpoint(root / family, family)
        return cache[family]

    return get


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[0].float()


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_tokenizer(tmp_path, family):
    tok = tc.make_tokenizer(tmp_path, family)
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "tokenizer_config.json").exists()
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tok) == tc.TOKENIZER_SIZE
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.eos_token == tok.eos_token and loaded.bos_token == tok.bos_token

    text = loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert "hi" in text and text.endswith(EXPECTED_PROMPT_END[family])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
    text = loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "Be brief." in text and "capital of France" in text and text.endswith(EXPECTED_PROMPT_END[family])
    no_gen = loaded.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
    assert family == "mistral" or not no_gen.endswith(EXPECTED_PROMPT_END[family])

    # A templated prompt tokenized without special tokens has exactly one BOS when the template starts with it,
    # and that is how the real tokenizers (which add BOS themselves) are meant to be used.
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    adds_bos = loaded("hello")["input_ids"][0] == loaded.bos_token_id
    if family in ("llama", "llama_tied", "mistral", "gemma3", "gemma3_multimodal"):
        assert adds_bos
    if text.startswith(loaded.bos_token or "\0"):
        assert ids[0] == loaded.bos_token_id and ids.count(loaded.bos_token_id) == 1
        if adds_bos:  # the doubled-BOS trap of string prompts is really there
            assert loaded(text)["input_ids"][:2] == [loaded.bos_token_id] * 2
    else:
        assert not adds_bos
    assert loaded.decode(ids) == text  # byte-level BPE round trip

    if family in ("qwen3", "qwen3_moe"):
        off = loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=False)
        assert off == text + "<think>\n\n</think>\n\n"
        on = loaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False, enable_thinking=True)
        assert on == text


def test_tokenizer_is_deterministic(tmp_path):
    tc.make_tokenizer(tmp_path / "a", "qwen3")
    tc._backend_cache.clear()
    tc.make_tokenizer(tmp_path / "b", "qwen3")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_checkpoint(checkpoints, family):
    path = checkpoints(family)
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert os.path.exists(os.path.join(path, name)), name
    tok = AutoTokenizer.from_pretrained(path)
    cfg = AutoConfig.from_pretrained(path)
    text_cfg = _text_config(cfg)
    assert text_cfg.vocab_size == len(tok) + 16
    assert text_cfg.hidden_size == tc.HIDDEN_SIZE and text_cfg.num_attention_heads == tc.NUM_HEADS
    assert text_cfg.num_key_value_heads == tc.NUM_KV_HEADS
    assert getattr(text_cfg, "head_dim", None) in (None, tc.HEAD_DIM)
    if tok.bos_token is not None:
        assert text_cfg.bos_token_id == tok.bos_token_id
    if tok.pad_token is not None:
        assert text_cfg.pad_token_id == tok.pad_token_id

    model, info = tc.model_class(family).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    model.eval()

    logits = _logits(model, tc.random_prompt_ids(64))
    assert logits.shape == (64, len(tok) + 16)
    std = logits[:, : len(tok)].std().item()
    assert 0.5 < std < 5.0, std
    assert torch.isfinite(logits).all()

    gen = GenerationConfig.from_pretrained(path)
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    assert all(0 <= i < len(tok) for i in eos)
    assert tok.convert_ids_to_tokens(eos) == EXPECTED_GEN_EOS[family]
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in EXPECTED_GEN_EOS[family]}
    assert set(eos) <= special

    tensors = _safetensors_tensors(path)
    for key in EXPECTED_KEYS[family]:
        assert any(key in k for k in tensors), (key, sorted(tensors))
    # tied families: no lm_head stored, and the loaded model shares the matrix
    assert any("lm_head" in k for k in tensors) == (family not in TIED)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == (family in TIED)
    # no HF default init left: norms not all ones / zeros, biases non-zero
    for k, t in tensors.items():
        if k.endswith("norm.weight") or "layernorm" in k or k.endswith(".bias"):
            assert not torch.all(t == t.flatten()[0]), k


@pytest.mark.parametrize("family", tc.FAMILIES)
def test_sharded_and_legacy(checkpoints, tmp_path, family):
    path = tc.make_checkpoint(tmp_path, family, max_shard_size="20KB", legacy_format=True)
    shards = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)
    unsharded = _safetensors_tensors(checkpoints(family))
    sharded = _safetensors_tensors(path)
    assert set(index["weight_map"]) == set(sharded) == set(unsharded)
    assert all(torch.equal(sharded[k], unsharded[k]) for k in sharded)  # same seed, same weights

    raw = json.load(open(os.path.join(path, "config.json")))
    raw = raw.get("text_config", raw)
    assert "rope_parameters" not in raw and "rope_theta" in raw
    model, info = tc.model_class(family).from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ref = tc.load_torch_model(checkpoints(family), family)
    ids = tc.random_prompt_ids(64, seed=1)
    torch.testing.assert_close(_logits(model.eval(), ids), _logits(ref, ids), rtol=0, atol=0)


def test_pair(tmp_path):
    post, pre = tc.make_pair(tmp_path, "llama")
    assert post == str(tmp_path / "post") and pre == str(tmp_path / "pre")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert open(os.path.join(post, name), "rb").read() == open(os.path.join(pre, name), "rb").read()
    n = tc.TOKENIZER_SIZE
    assert AutoConfig.from_pretrained(post).vocab_size == n + 16
    assert AutoConfig.from_pretrained(pre).vocab_size == n + 32
    a, b = _safetensors_tensors(post), _safetensors_tensors(pre)
    assert set(a) == set(b)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])
    tok = AutoTokenizer.from_pretrained(post)
    assert GenerationConfig.from_pretrained(pre).eos_token_id == tok.convert_tokens_to_ids("<|end_of_text|>")
    assert len(GenerationConfig.from_pretrained(post).eos_token_id) == 3


def test_bfloat16(tmp_path):
    path = tc.make_checkpoint(tmp_path, "qwen3", dtype="bfloat16")
    tensors = _safetensors_tensors(path)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert AutoConfig.from_pretrained(path).dtype in (torch.bfloat16, "bfloat16")


def test_gemma3_multimodal_layout(checkpoints):
    path = checkpoints("gemma3_multimodal")
    raw = json.load(open(os.path.join(path, "config.json")))
    assert raw["model_type"] == "gemma3" and raw["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert raw["text_config"]["model_type"] == "gemma3_text" and raw["tie_word_embeddings"] is True
    assert raw["vision_config"]["model_type"] == "siglip_vision_model"
    keys = _safetensors_tensors(path)
    assert all(k.startswith(("language_model.model.", "vision_tower.", "multi_modal_projector.")) for k in keys)
    # the text tower has the same weights as the gemma3 (Gemma3ForCausalLM) checkpoint of the same seed
    text = _safetensors_tensors(checkpoints("gemma3"))
    assert {"language_model." + k for k in text} == {k for k in keys if k.startswith("language_model.")}
    assert all(torch.equal(keys["language_model." + k], v) for k, v in text.items())


def test_family_features_are_on(checkpoints):
    """The features the JAX model must reproduce really change transformers' logits."""
    from transformers import AutoModelForCausalLM

    ids = tc.random_prompt_ids(64, seed=2)
    for family, change in [("mistral", {"sliding_window": None}), ("gemma3", {"sliding_window": 4096}),
                           ("olmo3", {"sliding_window": 4096}), ("gemma3", {"query_pre_attn_scalar": 16}),
                           ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})]:
        path = checkpoints(family)
        ref = _logits(tc.load_torch_model(path, family), ids)
        cfg = AutoConfig.from_pretrained(path)
        for k, v in change.items():
            setattr(cfg, k, v)
        alt = AutoModelForCausalLM.from_pretrained(path, config=cfg, dtype=torch.float32, attn_implementation="eager")
        assert (_logits(alt.eval(), ids) - ref).abs().max() > 0.1, (family, change)
