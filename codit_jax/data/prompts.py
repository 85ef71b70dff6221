"""Prompts as CoDIT builds them, the end tokens it stops on, the real vocabulary, a prompt length guard.

The prompt is the post-trained tokenizer's chat template applied to one user
turn (optionally after a system turn) with `add_generation_prompt=True`. The
rendered text is tokenized WITHOUT adding special tokens: a template that
writes the BOS token itself would otherwise get a second one from the
tokenizer, the known doubled-BOS bug of string prompts. Both models of a pair
read these same ids.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import logging

from codit_jax.data.instructions import Instruction, InputReport
from codit_jax.errors import CoditError

POLICIES = ("skip", "truncate")
# Put where the middle of an over-long instruction was cut out, so that readers
# of the dataset (and the student) can see that the text is not whole.
TRUNCATION_MARK = "\n[...]\n"


def build_prompt_ids(tokenizer, instruction: str, system_prompt: str | None = None,
                     enable_thinking: bool | None = None) -> list[int]:
  """Token ids of the chat-formatted prompt for one instruction.

  `enable_thinking` reaches the template only when not None; Qwen3 templates
  need False for CoDIT (see `default_enable_thinking`).
  """
  return _encode(tokenizer, render_prompt(tokenizer, instruction, system_prompt, enable_thinking))


def render_prompt(tokenizer, instruction: str, system_prompt: str | None = None,
                  enable_thinking: bool | None = None) -> str:
  """The chat template's text for one user turn, ending with the generation prompt."""
  if not getattr(tokenizer, "chat_template", None):
    raise CoditError(
        f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template. CoDIT prompts "
        "use the post-trained (instruction-tuned) model's tokenizer and its chat_template.")
  messages = [{"role": "user", "content": instruction}]
  if system_prompt is not None:
    messages.insert(0, {"role": "system", "content": system_prompt})
  template_vars = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
  return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                       **template_vars)


def default_enable_thinking(tokenizer) -> bool | None:
  """False for templates that read `enable_thinking` (Qwen3), None (do not pass it) otherwise."""
  return False if "enable_thinking" in (getattr(tokenizer, "chat_template", None) or "") else None


def _encode(tokenizer, text: str) -> list[int]:
  return _encode_all(tokenizer, [text])[0]


def _encode_all(tokenizer, texts: list[str]) -> list[list[int]]:
  # The template already wrote every special token the model expects. One call for many texts: a
  # fast tokenizer encodes a batch on all cores (the same ids as one at a time).
  return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def end_token_ids(tokenizer, generation_config: Mapping[str, Any] | str | Path | None) -> list[int]:
  """Sorted union of generation_config's eos_token_id (int or list) and the tokenizer's eos.

  `generation_config` is its dict, a generation_config.json file, a checkpoint
  folder, or None (tokenizer eos only). A folder without generation_config.json
  stands in config.json's eos_token_id (else its text_config's), as
  transformers' GenerationConfig.from_model_config does for such a checkpoint.
  """
  config = _generation_config_dict(generation_config)
  ids = set(_as_id_list(config.get("eos_token_id")))
  if getattr(tokenizer, "eos_token_id", None) is not None:
    ids.add(int(tokenizer.eos_token_id))
  if not ids:
    raise CoditError(
        "no end token: neither generation_config.json or config.json (eos_token_id) nor the tokenizer (eos_token) "
        "names one, so generation could never stop before the length limit. Use the post-trained "
        "checkpoint's own tokenizer and generation_config.json.")
  return sorted(ids)


def _generation_config_dict(config: Mapping[str, Any] | str | Path | None) -> Mapping[str, Any]:
  if config is None or isinstance(config, Mapping):
    return config or {}
  path = Path(config).expanduser()
  if path.is_dir() and not (path / "generation_config.json").is_file() and (path / "config.json").is_file():
    model_config = _read_json(path / "config.json")
    eos = model_config.get("eos_token_id")
    if eos is None:
      eos = (model_config.get("text_config") or {}).get("eos_token_id")
    logging.info("%s has no generation_config.json: end tokens come from config.json (eos_token_id %s) and "
                 "the tokenizer.", path, eos)
    return {"eos_token_id": eos}
  path = path / "generation_config.json" if path.is_dir() else path
  if not path.is_file():
    logging.info("%s does not exist: end tokens come from the tokenizer only.", path)
    return {}
  return _read_json(path)


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise CoditError(f"{path} is not valid JSON ({e}). Fix or remove the file.") from None


def _as_id_list(value: Any) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def real_vocab_size(tokenizer, source: str) -> int:
  """The tokenizer's real vocabulary size: its highest token id + 1.

  The ids are those of `tokenizer.get_vocab()` (which holds the added tokens
  too, for fast and slow tokenizers) together with `added_tokens_decoder`, in
  case a tokenizer class leaves its added tokens out of get_vocab(). Ids must
  run 0..size-1 without holes: scores are computed over the first `size`
  entries of the logits, and an id missing in between would be a logit
  without a token (sampled, it decodes to nothing). `len(get_vocab())` would
  silently cut off the top ids of such a tokenizer, so it is refused with a
  CoditError naming `source` (the tokenizer's folder or Hub id) and the first
  missing ids.
  """
  ids = {int(i) for i in tokenizer.get_vocab().values()}
  ids |= {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
  if not ids:
    raise CoditError(f"the tokenizer of {source} has no tokens (an empty vocabulary). Use the checkpoint's own "
                     "tokenizer files.")
  if min(ids) < 0:
    raise CoditError(f"the tokenizer of {source} has a negative token id ({min(ids)}); ids must run from 0.")
  size = max(ids) + 1
  if len(ids) < size:
    missing = sorted(set(range(size)) - ids)
    shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
    raise CoditError(
        f"the tokenizer of {source} has holes in its token ids: {len(missing)} of the ids 0..{size - 1} have no "
        f"token (first: {shown}). CoDIT needs ids without holes (highest id + 1 = the vocabulary); use the "
        "checkpoint's own tokenizer files.")
  return size


@dataclasses.dataclass(frozen=True)
class FittedPrompt:
  """A prompt within the length limit, or why there is none.

  status: 'ok', 'truncated' (`instruction` is the shortened text the ids encode:
  record it, not the original, so the response is paired with what the model
  read) or 'skipped' (`ids` is None).
  """
  ids: list[int] | None
  instruction: str
  status: str
  original_length: int


# Prompts tokenized in one call by `fit_prompts`: enough to keep a host's cores busy.
ENCODE_BATCH = 1024


def fit_prompts(tokenizer, instructions: Sequence[Instruction | str], max_prompt_len: int, policy: str = "skip",
                *, system_prompt: str | None = None, enable_thinking: bool | None = None,
                report: InputReport | None = None) -> Iterator[FittedPrompt]:
  """`fit_prompt` of each instruction, in order, tokenizing ENCODE_BATCH prompts at a time: at the
  start of a run of 250k prompts, most of the time goes to the tokenizer, which encodes a batch on
  all cores."""
  if policy not in POLICIES:  # at the call, not at the first prompt
    raise CoditError(f"prompt length policy {policy!r} is unknown. Use one of {', '.join(POLICIES)}.")

  def fitted() -> Iterator[FittedPrompt]:
    for first in range(0, len(instructions), ENCODE_BATCH):
      batch = instructions[first:first + ENCODE_BATCH]
      texts = [i.instruction if isinstance(i, Instruction) else i for i in batch]
      all_ids = _encode_all(tokenizer, [render_prompt(tokenizer, t, system_prompt, enable_thinking) for t in texts])
      for instruction, text, ids in zip(batch, texts, all_ids):
        yield _fit(tokenizer, instruction, text, ids, max_prompt_len, policy, system_prompt, enable_thinking, report)

  return fitted()


def fit_prompt(tokenizer, instruction: Instruction | str, max_prompt_len: int, policy: str = "skip",
               *, system_prompt: str | None = None, enable_thinking: bool | None = None,
               report: InputReport | None = None) -> FittedPrompt:
  """The prompt ids of `instruction` if they fit in `max_prompt_len` tokens, else per `policy`.

  'skip': no prompt; the instruction is reported and left out.
  'truncate': the middle of the instruction is cut out (marked by
  TRUNCATION_MARK) and the prompt re-rendered. Only the instruction shrinks:
  the template's tokens, above all the generation prompt at the end, must
  survive, and cutting token ids from either end of the rendered prompt would
  lose them. The middle goes because an instruction states its task at the
  start ("Summarize the following: ...") as often as at the end ("... What
  does this code print?"); LongBench truncates long inputs in the middle for
  the same reason.
  """
  (fitted,) = fit_prompts(tokenizer, [instruction], max_prompt_len, policy, system_prompt=system_prompt,
                          enable_thinking=enable_thinking, report=report)
  return fitted


def _fit(tokenizer, instruction: Instruction | str, text: str, ids: list[int], max_prompt_len: int, policy: str,
         system_prompt: str | None, enable_thinking: bool | None, report: InputReport | None) -> FittedPrompt:
  """`fit_prompt` of an instruction whose prompt ids are `ids`."""
  if len(ids) <= max_prompt_len:
    return FittedPrompt(ids, text, "ok", len(ids))
  where = _where(instruction)
  if policy == "skip":
    _note(report, "prompt_too_long", where,
          f"prompt is {len(ids)} tokens, over max_prompt_len={max_prompt_len}", skipped=True)
    return FittedPrompt(None, text, "skipped", len(ids))
  shortened, shortened_ids = _truncate_middle(tokenizer, text, len(ids), max_prompt_len,
                                              system_prompt, enable_thinking)
  _note(report, "prompt_truncated", where,
        f"prompt of {len(ids)} tokens truncated to {len(shortened_ids)} (max_prompt_len="
        f"{max_prompt_len}) by cutting the middle of the instruction", skipped=False)
  return FittedPrompt(shortened_ids, shortened, "truncated", len(ids))


def _truncate_middle(tokenizer, text: str, prompt_length: int, max_prompt_len: int,
                     system_prompt: str | None, enable_thinking: bool | None) -> tuple[str, list[int]]:
  """Shortest cut of the instruction's middle that brings the prompt within the limit."""
  text_ids = _encode(tokenizer, text)
  keep = len(text_ids) - (prompt_length - max_prompt_len)
  while keep > 0:
    head, tail = text_ids[:(keep + 1) // 2], text_ids[len(text_ids) - keep // 2:]
    shortened = tokenizer.decode(head) + TRUNCATION_MARK + tokenizer.decode(tail)
    ids = build_prompt_ids(tokenizer, shortened, system_prompt, enable_thinking)
    if len(ids) <= max_prompt_len:
      return shortened, ids
    # Tokens merge differently across the cut and around the mark: shrink by the overshoot.
    keep -= len(ids) - max_prompt_len
  raise CoditError(
      f"max_prompt_len={max_prompt_len} leaves no room for any instruction text: the chat "
      f"template alone needs about {prompt_length - len(text_ids)} tokens. Raise max_prompt_len.")


def _where(instruction: Instruction | str) -> str:
  if isinstance(instruction, Instruction):
    return instruction.where
  return "instruction"


def _note(report: InputReport | None, kind: str, where: str, message: str, *, skipped: bool) -> None:
  logging.warning("%s: %s%s", where, message, "; skipped." if skipped else ".")
  if report is not None:
    report.add(kind, where, message, skipped=skipped)
