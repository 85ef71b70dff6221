"""Token text pieces for the page, from the post-trained tokenizer (or token ids when it cannot load)."""

from __future__ import annotations

from typing import Sequence

REPLACEMENT = "\ufffd"


class Pieces:
  """Text of each token id of a response, and of single ids (the token tables)."""

  def __init__(self, tokenizer=None, note: str = ""):
    self.tokenizer = tokenizer
    self.note = note

  @property
  def available(self) -> bool:
    return self.tokenizer is not None

  def of_response(self, ids: Sequence[int]) -> list[str]:
    """One piece per token; joined they are the decoded response (incremental detokenization).

    A token that ends inside a multi-byte character gets '' and the character is
    shown on the token that completes it, as streaming detokenizers do.
    """
    ids = [int(i) for i in ids]
    if self.tokenizer is None:
      return [f"[{i}]" for i in ids]
    decode = lambda part: self.tokenizer.decode(part, skip_special_tokens=False,  # noqa: E731
                                                clean_up_tokenization_spaces=False)
    pieces = []
    prefix_offset = read_offset = 0
    for i in range(len(ids)):
      prefix_text = decode(ids[prefix_offset:read_offset])
      new_text = decode(ids[prefix_offset:i + 1])
      last = i == len(ids) - 1
      if len(new_text) > len(prefix_text) and (last or not new_text.endswith(REPLACEMENT)) \
          and new_text.startswith(prefix_text):
        pieces.append(new_text[len(prefix_text):])
        prefix_offset, read_offset = read_offset, i + 1
      elif last and len(new_text) > len(prefix_text):
        pieces.append(new_text[len(prefix_text):])
      else:
        pieces.append("")
    return pieces

  def of_id(self, token_id: int) -> str:
    if self.tokenizer is None:
      return f"[{token_id}]"
    return self.tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)

  def raw(self, token_id: int) -> str:
    """The vocabulary entry itself (e.g. 'Ġthe'), for the hover."""
    if self.tokenizer is None:
      return ""
    try:
      token = self.tokenizer.convert_ids_to_tokens(int(token_id))
      return "" if token is None else str(token)
    except Exception:  # ids past the tokenizer's vocabulary (padded embeddings): nothing to show
      return ""


def load_pieces(post_trained: str | None) -> Pieces:
  """The post-trained tokenizer named in the metadata, or a Pieces that shows ids, with the reason."""
  if not post_trained:
    return Pieces(None, "the dataset's metadata names no post-trained model, so tokens are shown as ids")
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    from codit_jax import checkpoints  # pylint: disable=g-import-not-at-top
    path = checkpoints.resolve(str(post_trained))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
  except Exception as e:  # offline Hub id, deleted folder, no tokenizer files: ids instead of text
    message = str(e).splitlines()[0][:200] if str(e) else ""
    return Pieces(None, f"the post-trained tokenizer {post_trained!r} could not be loaded "
                        f"({type(e).__name__}: {message}), so tokens are shown as ids")
  return Pieces(tokenizer, "")
