"""A small teacher pair built locally, so the demo runs offline and without PyTorch.

`builtin:demo-post` and `builtin:demo-pre` name it wherever a checkpoint is
expected (config keys `post_trained`, `pre_trained`, `student`). On first use
it is written, in the Hugging Face layout the loader reads for real
checkpoints, under $CODIT_JAX_CACHE (default ~/.cache/codit_jax): a Llama-family
config, a byte-level BPE tokenizer trained on a few paragraphs with a ChatML
chat template, a generation_config, and random safetensors weights. The two
checkpoints share the tokenizer; their weights differ and their embedding
matrices are padded differently, as real pairs often are.

The weights are random, so the responses are word salad: the demo shows the
pipeline, not the method.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors.numpy
import tokenizers
import transformers

PREFIX = "builtin:"
NAMES = ("demo-post", "demo-pre")

_CORPUS = """\
Contrastive decoding writes each token by comparing two models. The post-trained model answers
instructions; the pre-trained checkpoint it came from knows the same facts but not how to follow
a request. Tokens that both models like are common knowledge, tokens that only the instruction
tuned model likes carry what post-training added. Instruction tuning data made this way helps a
student model follow instructions, write clearly, explain steps, list ideas, summarize a text,
translate a sentence, answer a question about science, history, cooking, travel or programming.
Here is a short poem about the sea. Here are three tips for better sleep. Sure! The answer is 42.
First, preheat the oven. Second, mix the flour and the eggs. Finally, bake for twenty minutes.
def add(a, b): return a + b. The capital of France is Paris. Water boils at 100 degrees Celsius.
"""
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_VOCAB_SIZE = 512


def is_builtin(name: str) -> bool:
  return str(name).startswith(PREFIX)


def cache_dir() -> Path:
  return Path(os.environ.get("CODIT_JAX_CACHE", Path.home() / ".cache" / "codit_jax")).expanduser()


def resolve(name: str) -> str:
  """The folder of a built-in checkpoint, building the pair on first use."""
  short = name[len(PREFIX):]
  if short not in NAMES:
    from codit_jax.errors import CheckpointError  # pylint: disable=g-import-not-at-top
    raise CheckpointError(f"{name!r} is not a built-in checkpoint; the built-in ones are "
                          f"{', '.join(PREFIX + n for n in NAMES)}.")
  root = cache_dir() / "builtin"
  if not (root / short / "model.safetensors").is_file():
    build_pair(root)
  return str(root / short)


def build_pair(root: str | Path) -> tuple[str, str]:
  """Writes demo-post and demo-pre under `root`; returns their folders."""
  root = Path(root)
  tokenizer = _tokenizer()
  folders = []
  for name, seed, padding in (("demo-post", 0, 64), ("demo-pre", 1, 128)):
    folder = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(tmp)
    config = _config(len(tokenizer) + padding, tokenizer)
    config.save_pretrained(tmp)
    generation = {"eos_token_id": [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id]}
    (tmp / "generation_config.json").write_text(json.dumps(generation) + "\n")
    safetensors.numpy.save_file(_weights(config, seed), str(tmp / "model.safetensors"))
    if folder.exists():  # a half-built folder of a killed earlier build
      for f in folder.iterdir():
        f.unlink()
      folder.rmdir()
    tmp.rename(folder)  # whole or not at all
    folders.append(str(folder))
  return folders[0], folders[1]


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
  model = tokenizers.Tokenizer(tokenizers.models.BPE())
  model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=_VOCAB_SIZE, special_tokens=_SPECIAL_TOKENS,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())  # any text encodes
  model.train_from_iterator(_CORPUS.splitlines(), trainer)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=model, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      chat_template=_CHAT_TEMPLATE)


def _config(vocab_size: int, tokenizer) -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
      rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _weights(config, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
  q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
  normal = lambda *shape: (rng.standard_normal(shape) * 0.08).astype(np.float32)  # noqa: E731
  weights = {"model.embed_tokens.weight": normal(config.vocab_size, h), "lm_head.weight": normal(config.vocab_size, h),
             "model.norm.weight": np.ones(h, np.float32)}
  for i in range(config.num_hidden_layers):
    p = f"model.layers.{i}."
    weights.update({
        p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight": normal(kv, h),
        p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, q),
        p + "mlp.gate_proj.weight": normal(f, h), p + "mlp.up_proj.weight": normal(f, h),
        p + "mlp.down_proj.weight": normal(h, f),
        p + "input_layernorm.weight": np.ones(h, np.float32),
        p + "post_attention_layernorm.weight": np.ones(h, np.float32)})
  return weights
