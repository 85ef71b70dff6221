"""Tiny random Hugging Face checkpoints, built offline, for checking the JAX models against transformers.

Each checkpoint is written the way real Hub checkpoints are: ``config.json``, ``model.safetensors`` (or
``model-0000x-of-0000y.safetensors`` shards plus ``model.safetensors.index.json``), ``generation_config.json`` and
the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``, ``chat_template.jinja``).

Everything is deterministic and needs no network access:

* the tokenizer is a ~300-token byte-level BPE trained with the ``tokenizers`` library on a small English corpus
  embedded below, plus the family's special tokens and a chat template modelled on the real family's template;
* the model is the transformers PyTorch model of the family at tiny dimensions, with *every* parameter overwritten
  from a ``torch.Generator`` seeded by ``seed``.  HF's default init (std 0.02 matrices, zero biases, unit norms)
  would hide bugs such as a missing bias or a wrong ``(1 + w)`` norm, so biases and norm weights are random too,
  and matrices are scaled so that logits have a standard deviation of order 1.

Families: see ``FAMILIES``.  ``make_pair`` builds a post-trained / pre-trained pair of one family (same tokenizer,
different weights, different vocabulary padding).
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

FAMILIES = ("llama", "llama_tied", "qwen2", "qwen3", "qwen3_moe", "mistral", "gemma3", "gemma3_multimodal", "olmo2",
            "olmo3")

# Total tokenizer size (BPE vocabulary + all special/added tokens), the same for every family.
TOKENIZER_SIZE = 300

# Tiny dimensions shared by all families.
HIDDEN_SIZE = 64
NUM_HEADS = 4
NUM_KV_HEADS = 2
HEAD_DIM = 16
INTERMEDIATE_SIZE = 128
NUM_LAYERS = 3
MAX_POSITIONS = 512
RMS_NORM_EPS = 1e-6
SLIDING_WINDOW = 16
# qwen3_moe: 8 experts, top 2, narrower than the dense MLP so that a mix-up of the two widths fails on shapes.
NUM_EXPERTS = 8
NUM_EXPERTS_PER_TOK = 2
MOE_INTERMEDIATE_SIZE = 32
MLP_ONLY_LAYERS = [1]  # layers 0 and 2 are mixtures of experts, layer 1 a dense MLP

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Once upon a time, in a small village near the sea, there lived an old fisherman and his wife. Every morning
the fisherman went out in his boat, and every evening he came back with fish for the market. The people of the
village said that he knew the sea better than anyone, because he listened to the wind and watched the birds.
Please write a short poem about the ocean. Explain why the sky is blue. What is the capital of France?
The capital of France is Paris. The sky looks blue because air scatters blue light more than red light.
Here is a simple recipe: mix the flour, the sugar and the eggs, then bake the cake for thirty minutes.
Machine learning models learn patterns from data. A language model predicts the next word in a sentence,
one token at a time, and an assistant model is trained to follow instructions and to answer questions.
You are a helpful assistant. Answer the question as clearly as you can, and think step by step.
Numbers: one, two, three, four, five, six, seven, eight, nine, ten. 1 2 3 4 5 6 7 8 9 10 100 2024.
Thank you for your help! Could you summarize this paragraph in one sentence? Sure, here is a summary.
"""

# ----------------------------------------------------------------------------------------------------------------
# Chat templates (simplified versions of the real ones, same token layout).
# ----------------------------------------------------------------------------------------------------------------

_LLAMA3_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if not date_string is defined %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] | trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)

_QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.'"
    " + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if not (loop.first and message['role'] == 'system') %}\n"
    "        {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

_QWEN3_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

_MISTRAL_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- '[INST] ' + message['content'] + '[/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial"
    " optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)

_GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if message['role'] == 'assistant' -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {{- message['content'] | trim }}\n"
    "    {{- '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{ '<start_of_turn>model\\n' }}\n"
    "{%- endif -%}\n"
)

# OLMo 2: the template starts with the bos token (<|endoftext|>), ChatML-like turns.
_OLMO2_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# OLMo 3 Instruct: ChatML, default system message, no bos token.
_OLMO3_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}\n"
    "    {{- '<|im_start|>system\\nYou are Olmo, a helpful AI assistant built by Ai2.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# ----------------------------------------------------------------------------------------------------------------
# Tokenizer specs.
#   head:      special tokens placed first in the vocabulary (ids 0, 1, ...), as in Gemma / Mistral;
#   tail:      special tokens appended after the BPE vocabulary, as in Llama 3 / Qwen / OLMo;
#   added:     non-special added tokens (after tail), e.g. Qwen3's <think>;
#   bos/eos/pad/unk: the tokenizer's named special tokens;
#   add_bos:   whether encoding prepends bos (post-processor), as the real tokenizer does;
#   gen_eos:   end tokens listed in generation_config.json (and config.json) of the post-trained checkpoint;
#   pre_eos:   eos of a base ("pre-trained") checkpoint's generation_config.json, used by make_pair.
# ----------------------------------------------------------------------------------------------------------------

_LLAMA_TOK = dict(
    head=[],
    tail=["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
          "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
          "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"],
    added=[],
    bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None, add_bos=True,
    gen_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], pre_eos="<|end_of_text|>",
    template=_LLAMA3_TEMPLATE,
)
_QWEN2_TOK = dict(
    head=[],
    tail=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    added=[],
    bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None, add_bos=False,
    gen_eos=["<|im_end|>", "<|endoftext|>"], pre_eos="<|endoftext|>",
    template=_QWEN2_TEMPLATE,
)
_QWEN3_TOK = dict(_QWEN2_TOK, added=["<think>", "</think>"], template=_QWEN3_TEMPLATE)
_MISTRAL_TOK = dict(
    head=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"],
    tail=[],
    added=[],
    bos="<s>", eos="</s>", pad=None, unk="<unk>", add_bos=True,
    gen_eos="</s>", pre_eos="</s>",
    template=_MISTRAL_TEMPLATE,
)
_GEMMA3_TOK = dict(
    head=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
          "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
    tail=[],
    added=[],
    bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
    gen_eos=["<eos>", "<end_of_turn>"], pre_eos="<eos>",
    template=_GEMMA3_TEMPLATE,
)
_OLMO2_TOK = dict(
    head=[],
    tail=["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"],
    added=[],
    bos="<|endoftext|>", eos="<|endoftext|>", pad="<|pad|>", unk=None, add_bos=False,
    # A single int (not a list) that differs from the tokenizer's eos: the stop set must be the union.
    gen_eos="<|im_end|>", pre_eos="<|endoftext|>",
    template=_OLMO2_TEMPLATE,
)
_OLMO3_TOK = dict(
    _OLMO2_TOK,
    eos="<|im_end|>",
    gen_eos=["<|im_end|>", "<|endoftext|>"], pre_eos="<|endoftext|>",
    template=_OLMO3_TEMPLATE,
)

_TOKENIZER_SPECS = {
    "llama": _LLAMA_TOK,
    "llama_tied": _LLAMA_TOK,
    "qwen2": _QWEN2_TOK,
    "qwen3": _QWEN3_TOK,
    "qwen3_moe": _QWEN3_TOK,
    "mistral": _MISTRAL_TOK,
    "gemma3": _GEMMA3_TOK,
    "gemma3_multimodal": _GEMMA3_TOK,
    "olmo2": _OLMO2_TOK,
    "olmo3": _OLMO3_TOK,
}

_backend_cache: dict[str, str] = {}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _build_backend(family: str) -> Tokenizer:
    """The `tokenizers.Tokenizer` of a family (cached as JSON; training is deterministic)."""
    spec = _TOKENIZER_SPECS[family]
    if family not in _backend_cache:
        n_extra = len(spec["tail"]) + len(spec["added"])
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=TOKENIZER_SIZE - n_extra,
            min_frequency=2,
            show_progress=False,
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in spec["head"]],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["tail"]])
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["added"]])
        if spec["add_bos"]:
            bos = spec["bos"]
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                special_tokens=[(bos, tok.token_to_id(bos))],
            )
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        _backend_cache[family] = tok.to_str()
    return Tokenizer.from_str(_backend_cache[family])


def make_tokenizer(save_dir, family) -> transformers.PreTrainedTokenizerFast:
    """Builds the family's tiny byte-level BPE tokenizer with its chat template, saves it to `save_dir`."""
    _check_family(family)
    spec = _TOKENIZER_SPECS[family]
    kwargs = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k] is not None}
    kwargs = {f"{k}_token": v for k, v in kwargs.items()}
    if spec["add_bos"]:
        kwargs["add_bos_token"] = True
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_build_backend(family),
        chat_template=spec["template"],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
        **kwargs,
    )
    assert len(tokenizer) == TOKENIZER_SIZE, (family, len(tokenizer))
    os.makedirs(save_dir, exist_ok=True)
    tokenizer.save_pretrained(str(save_dir))
    return tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Model configs.
# ----------------------------------------------------------------------------------------------------------------

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # With head_dim 16 and theta 5e5 the wavelengths are 6.3, 32.4, 167, 862, ...: with original 64 the
    # high/low-frequency wavelength cut-offs are 16 and 64, so the three branches of llama3 scaling (unchanged,
    # smoothly interpolated, divided by factor) are all exercised.
    "original_max_position_embeddings": 64,
}

_GEMMA3_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
}


def _layer_types(family: str, n_layers: int) -> list[str] | None:
    if family in ("gemma3", "gemma3_multimodal"):  # 2 local : 1 global (real: 5 : 1)
        return ["sliding_attention" if (i + 1) % 3 else "full_attention" for i in range(n_layers)]
    if family == "olmo3":  # 3 local : 1 global, as the real OLMo 3
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(n_layers)]
    return None


def _text_config_kwargs(family: str, vocab_size: int, tokenizer) -> dict:
    spec = _TOKENIZER_SPECS[family]

    def tid(token):
        return None if token is None else tokenizer.convert_tokens_to_ids(token)

    gen_eos = spec["gen_eos"]
    eos_ids = [tid(t) for t in gen_eos] if isinstance(gen_eos, list) else tid(gen_eos)
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=RMS_NORM_EPS,
        bos_token_id=tid(spec["bos"]),
        eos_token_id=eos_ids,
        pad_token_id=tid(spec["pad"]),
        tie_word_embeddings=False,
        use_cache=True,
    )
    if family in ("llama", "llama_tied"):
        kw.update(model_type="llama", hidden_act="silu", rope_parameters=copy.deepcopy(_LLAMA3_ROPE),
                  tie_word_embeddings=(family == "llama_tied"), attention_bias=False, mlp_bias=False)
    elif family == "qwen2":
        kw.update(model_type="qwen2", hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  use_sliding_window=False)
        kw.pop("head_dim")  # Qwen2Config has no head_dim field (head_dim = hidden / heads = 16)
    elif family == "qwen3":
        kw.update(model_type="qwen3", hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  attention_bias=False, use_sliding_window=False)
    elif family == "qwen3_moe":
        kw.update(model_type="qwen3_moe", hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  attention_bias=False, use_sliding_window=False, num_experts=NUM_EXPERTS,
                  num_experts_per_tok=NUM_EXPERTS_PER_TOK, moe_intermediate_size=MOE_INTERMEDIATE_SIZE,
                  norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=list(MLP_ONLY_LAYERS))
    elif family == "mistral":
        kw.update(model_type="mistral", hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=SLIDING_WINDOW)
    elif family in ("gemma3", "gemma3_multimodal"):
        n_layers = 4
        kw.update(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh", num_hidden_layers=n_layers,
                  query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW, sliding_window_pattern=3,
                  layer_types=_layer_types(family, n_layers), rope_parameters=copy.deepcopy(_GEMMA3_ROPE),
                  final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False,
                  tie_word_embeddings=True)
    elif family == "olmo2":
        kw.update(model_type="olmo2", hidden_act="silu",
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, attention_bias=False)
        kw.pop("head_dim")  # Olmo2Config has no head_dim field (head_dim = hidden / heads = 16)
    elif family == "olmo3":
        n_layers = 4
        kw.update(model_type="olmo3", hidden_act="silu", num_hidden_layers=n_layers, sliding_window=SLIDING_WINDOW,
                  layer_types=_layer_types(family, n_layers), attention_bias=False,
                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                   "full_attention": {"rope_type": "default", "rope_theta": 500000.0}})
        kw.pop("head_dim")  # Olmo3Config has no head_dim field (head_dim = hidden / heads = 16)
    return kw


def _apply_overrides(family: str, kw: dict, overrides: dict) -> dict:
    kw = dict(kw)
    kw.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides and kw.get("layer_types") is not None:
        kw["layer_types"] = _layer_types(family, kw["num_hidden_layers"])
    return kw


_GEMMA3_TOP_LEVEL = {"vision_config", "text_config", "mm_tokens_per_image", "boi_token_index", "eoi_token_index",
                     "image_token_index", "tie_word_embeddings", "initializer_range"}


def _make_config(family: str, vocab_size: int, tokenizer, overrides: dict | None):
    overrides = dict(overrides or {})
    text_kw = _text_config_kwargs(family, vocab_size, tokenizer)
    if family != "gemma3_multimodal":
        text_kw = _apply_overrides(family, text_kw, overrides)
        model_type = text_kw.pop("model_type")
        return AutoConfig.for_model(model_type, **text_kw)

    # Gemma3ForConditionalGeneration: the text config nested as text_config plus a tiny SigLIP vision tower.
    # Overrides: keys that are Gemma3Config fields apply at the top level (text_config / vision_config dicts are
    # merged into the nested configs), every other key applies to the text config.
    top = {k: overrides.pop(k) for k in list(overrides) if k in _GEMMA3_TOP_LEVEL}
    text_kw = _apply_overrides(family, text_kw, {**overrides, **top.pop("text_config", {})})
    text_kw.pop("model_type")
    vision_kw = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_channels=3,
        image_size=28, patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
    )
    vision_kw.update(top.pop("vision_config", {}))
    tid = tokenizer.convert_tokens_to_ids
    top_kw = dict(
        mm_tokens_per_image=4,  # 2x2 patches per image, pooled with kernel 1
        boi_token_index=tid("<start_of_image>"),
        eoi_token_index=tid("<end_of_image>"),
        image_token_index=tid("<image_soft_token>"),
        tie_word_embeddings=True,
    )
    top_kw.update(top)
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    return Gemma3Config(
        text_config=Gemma3TextConfig(**text_kw),
        vision_config=SiglipVisionConfig(**vision_kw),
        bos_token_id=text_kw["bos_token_id"],
        eos_token_id=text_kw["eos_token_id"],
        pad_token_id=text_kw["pad_token_id"],
        **top_kw,
    )


# ----------------------------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------------------------

# Std of embedding / lm_head entries relative to 1/sqrt(hidden): logits = norm(h) @ W^T have std ~ LOGIT_GAIN.
LOGIT_GAIN = 2.0
BIAS_STD = 0.1
NORM_STD = 0.1


def _is_offset_rmsnorm(module) -> bool:
    """Norms computing x * (1 + w) (Gemma), which store w with the offset removed."""
    return type(module).__name__.startswith("Gemma") and "RMSNorm" in type(module).__name__


def randomize_weights_(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter of `model` in place from a torch.Generator seeded by `seed`.

    Matrices ~ N(0, 1/fan_in) (variance preserving), embeddings and the lm_head ~ N(0, (LOGIT_GAIN^2)/hidden),
    biases ~ N(0, BIAS_STD^2), norm weights 1 + NORM_STD * N(0, 1), or NORM_STD * N(0, 1) for Gemma's (1 + w)
    norms. Tied parameters are written once, in place, so the tie survives. The text tower (modules under
    `language_model`) is drawn first, so a Gemma3ForConditionalGeneration gets the same text weights as the
    Gemma3ForCausalLM of the same seed.
    """
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean

    def write(param, value):
        if id(param) in done:
            return
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        done.add(id(param))

    # The text tower first, so that gemma3_multimodal gets the same text weights as gemma3 for the same seed.
    modules = sorted(model.named_modules(), key=lambda item: "language_model" not in item[0])
    for _, module in modules:
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, torch.nn.Embedding):
            write(own["weight"], normal(own["weight"].shape, LOGIT_GAIN / math.sqrt(module.embedding_dim)))
        elif isinstance(module, torch.nn.Linear):
            w = own["weight"]
            is_head = w.shape[0] == model.config.get_text_config().vocab_size
            std = LOGIT_GAIN / math.sqrt(module.in_features) if is_head else 1.0 / math.sqrt(module.in_features)
            write(w, normal(w.shape, std))
            if "bias" in own:
                write(own["bias"], normal(own["bias"].shape, BIAS_STD))
        elif isinstance(module, torch.nn.Conv2d):
            w = own["weight"]
            write(w, normal(w.shape, 1.0 / math.sqrt(w[0].numel())))
            if "bias" in own:
                write(own["bias"], normal(own["bias"].shape, BIAS_STD))
        elif isinstance(module, torch.nn.LayerNorm):
            write(own["weight"], normal(own["weight"].shape, NORM_STD, 1.0))
            if "bias" in own:
                write(own["bias"], normal(own["bias"].shape, BIAS_STD))
        elif "RMSNorm" in type(module).__name__ and set(own) == {"weight"}:
            mean = 0.0 if _is_offset_rmsnorm(module) else 1.0
            write(own["weight"], normal(own["weight"].shape, NORM_STD, mean))
        else:
            for name, p in own.items():
                if name == "mm_input_projection_weight":  # Gemma3 projector: [vision_hidden, text_hidden]
                    write(p, normal(p.shape, 1.0 / math.sqrt(p.shape[0])))
                elif p.ndim == 1:
                    write(p, normal(p.shape, BIAS_STD))
                else:
                    write(p, normal(p.shape, 1.0 / math.sqrt(p.shape[-1])))

    missed = [n for n, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise AssertionError(f"parameters not randomized: {missed}")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _generation_config(family: str, tokenizer, pre_trained: bool = False) -> GenerationConfig:
    spec = _TOKENIZER_SPECS[family]
    tid = tokenizer.convert_tokens_to_ids
    eos = spec["pre_eos"] if pre_trained else spec["gen_eos"]
    eos_ids = [tid(t) for t in eos] if isinstance(eos, list) else tid(eos)
    kw = dict(eos_token_id=eos_ids)
    if spec["bos"] is not None:
        kw["bos_token_id"] = tid(spec["bos"])
    if spec["pad"] is not None:
        kw["pad_token_id"] = tid(spec["pad"])
    if not pre_trained:  # sampling defaults as in the real instruct checkpoints
        kw.update(do_sample=True, temperature=0.6, top_p=0.9)
    return GenerationConfig(**kw)


def model_class(family: str):
    """The transformers class that `make_checkpoint` instantiates for `family`."""
    _check_family(family)
    if family == "gemma3_multimodal":
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration
    return AutoModelForCausalLM


def make_checkpoint(save_dir, family, *, seed=0, dtype="float32", vocab_padding=16, max_shard_size=None,
                    config_overrides=None, legacy_format=False, pre_trained=False) -> str:
    """Builds and saves a tiny random HF checkpoint of `family` in `save_dir`; returns `save_dir` as str.

    vocab_size = len(tokenizer) + vocab_padding. `max_shard_size` (e.g. "20KB") forces a sharded save with an
    index. `config_overrides` are extra config kwargs (for gemma3_multimodal: Gemma3Config fields at the top
    level, everything else into text_config).

    Extras (not needed by most tests):
      legacy_format: rewrite config.json the way transformers 4.x wrote it, as most Hub checkpoints still have it:
        rope_theta / rope_scaling (gemma3: rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
        instead of rope_parameters. transformers 5 reads both to the same config. (The safetensors keys need no
        such option: transformers 5 already saves Gemma3ForConditionalGeneration in the Hub layout,
        language_model.model.*, vision_tower.*, multi_modal_projector.*, and qwen3_moe experts one tensor per
        expert, mlp.experts.E.{gate,up,down}_proj.weight, although it holds them stacked in memory.)
      pre_trained: write a base model's generation_config.json (single eos, no sampling defaults).
    """
    _check_family(family)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = make_tokenizer(save_dir, family)
    config = _make_config(family, len(tokenizer) + vocab_padding, tokenizer, config_overrides)
    config._attn_implementation = "eager"

    cls = model_class(family)
    if cls is AutoModelForCausalLM:
        model = cls.from_config(config, attn_implementation="eager", dtype=torch.float32)
    else:
        model = cls(config)
    randomize_weights_(model, seed)
    model.to(_DTYPES[dtype])
    model.eval()

    save_kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(save_dir), **save_kw)
    _generation_config(family, tokenizer, pre_trained=pre_trained).save_pretrained(str(save_dir))
    if legacy_format:
        _to_legacy_format(save_dir, family)
    return str(save_dir)


def make_pair(save_dir, family, **kw) -> tuple[str, str]:
    """A post-trained and a pre-trained checkpoint of `family` in `save_dir`/post and `save_dir`/pre.

    Same tokenizer (identical files), different weights (seeds `seed` and `seed + 1`) and different vocabulary
    padding (`vocab_padding` and `vocab_padding + 16`, by default 16 and 32). The pre-trained checkpoint gets a
    base model's generation_config.json (single eos). Other keyword arguments go to both make_checkpoint calls.
    """
    save_dir = Path(save_dir)
    seed = kw.pop("seed", 0)
    vocab_padding = kw.pop("vocab_padding", 16)
    kw.pop("pre_trained", None)
    post = make_checkpoint(save_dir / "post", family, seed=seed, vocab_padding=vocab_padding, **kw)
    pre = make_checkpoint(save_dir / "pre", family, seed=seed + 1, vocab_padding=vocab_padding + 16,
                          pre_trained=True, **kw)
    return post, pre


# ----------------------------------------------------------------------------------------------------------------
# Legacy (transformers 4.x / Hub) layout.
# ----------------------------------------------------------------------------------------------------------------


def _legacy_rope(cfg: dict, gemma: bool) -> None:
    rp = cfg.pop("rope_parameters", None)
    if rp is None:
        return
    if gemma:
        full, local = dict(rp["full_attention"]), dict(rp["sliding_attention"])
        cfg["rope_theta"] = full.pop("rope_theta")
        cfg["rope_local_base_freq"] = local.pop("rope_theta")
        cfg["rope_scaling"] = None if full.get("rope_type", "default") == "default" else full
        if "_sliding_window_pattern" in cfg:
            cfg["sliding_window_pattern"] = cfg.pop("_sliding_window_pattern")
        return
    if "full_attention" in rp:  # per-layer-type rope (olmo3): rope_theta applies to both, rope_scaling to full
        local = rp["sliding_attention"]
        if local.get("rope_type", "default") != "default" or local["rope_theta"] != rp["full_attention"]["rope_theta"]:
            raise ValueError(f"rope_parameters {rp} have no transformers 4.x equivalent")
        rp = rp["full_attention"]
    rp = dict(rp)
    cfg["rope_theta"] = rp.pop("rope_theta")
    cfg["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp


def _to_legacy_format(save_dir: Path, family: str) -> None:
    cfg_path = save_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    gemma = family.startswith("gemma3")
    if family == "gemma3_multimodal":
        _legacy_rope(cfg["text_config"], gemma=True)
    else:
        _legacy_rope(cfg, gemma=gemma)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Helpers for tests.
# ----------------------------------------------------------------------------------------------------------------


def load_torch_model(path, family, dtype=torch.float32):
    """Loads a checkpoint written by make_checkpoint with transformers (eager attention, eval mode)."""
    model = model_class(family).from_pretrained(str(path), dtype=dtype, attn_implementation="eager")
    return model.eval()


def random_prompt_ids(n_tokens=64, seed=0, vocab=TOKENIZER_SIZE):
    """Deterministic random token ids in [0, vocab), shape [1, n_tokens]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, n_tokens), generator=gen)
