"""Stopping degenerate rows early: the on-device repetition rule (option `stop_repetitive`).

A row is stopped as 'repetitive' once its most recent tokens are a short
cycle repeated many times. The rule works on token ids only, per row, inside
the compiled decode loop.

The rule. Let x_1 .. x_e be the tokens a row emitted so far (e = `emitted`,
the token just drawn included; the buffer beyond e is never read). For a
period p (1 <= p <= max_period) let

    span(p) = (min_repeats - 1) * p + max(p, min_tokens)

The row is repetitive when, for some p, e >= span(p) and its last span(p)
tokens have period p:

    x_{e-i} == x_{e-i-p}   for every 0 <= i < span(p) - p.

Equivalently: the stretch of the last max(p, min_tokens) tokens also ends
p, 2p, ..., (min_repeats - 1) * p tokens earlier, so it occurs min_repeats
times, back to back, at distance p. With min_tokens <= p this is "a cycle of
p tokens repeated min_repeats times in a row". The rule looks only at the last
`window = span(max_period)` tokens.

Defaults (max_period=32, min_repeats=10, min_tokens=100, window 388) are the
reference text flag's long-n-gram rule read in tokens: the reference
(codit_jax.data.repetition) flags a response whose most frequent 100-character
gram occurs 10 times or more. If every token of the cycle decodes to at least
one character (true of whole-character tokens, not of special tokens, which
the response drops, nor of tokens holding a fraction of a multi-byte
character) and the cycle holds a character other than whitespace, a row the
rule stops is flagged by the reference once decoded:
  * its last span(p) tokens decode to a text of character period L (the
    decoded cycle, L >= p characters) made of 9 whole cycles followed by the
    decoded last 100 tokens, so of at least 9 L + 100 characters;
  * so the 100-character gram that starts at the first of them also starts L,
    2L, ..., 9L characters later: 10 occurrences, and the reference's
    `top_ngram_count(text, 100) >= 10` holds, whatever text comes before;
  * the response is at least 9 L + 100 characters long and strip() removes
    less than L characters from each end of the periodic part (a cycle has a
    non-whitespace character), so it keeps at least 7 L + 102 >= 100.
The same argument gives the other direction that matters, no stop on natural
text: under that premise every row the rule stops is one the reference flags
as repetitive anyway, so text the reference accepts never stops early. In
practice a stretch of 100+ tokens recurring 10 times back to back is not
natural prose, lists or code (a numbered list or a table changes the number or
the cell text from one item to the next). The premise's exceptions are rows
looping on whitespace-only tokens after a short response (the reference does
not count a response of under 100 non-blank characters) and cycles of partial
UTF-8 byte tokens or special tokens; the rule stops them too: they are loops.

Cost: O(B * max_period * window) comparisons per step (about 12k per row with
the defaults), no host round trip.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RepetitionRule:
  """When a row counts as looping (module docstring). Hashable: part of a jit static argument."""

  max_period: int = 32  # the longest cycle looked for, in tokens
  min_repeats: int = 10  # times the last max(p, min_tokens) tokens must occur back to back
  min_tokens: int = 100  # length of that recurring stretch, in tokens (at least one period)

  def __post_init__(self):
    if self.max_period < 1:
      raise ValueError(f"max_period must be >= 1, not {self.max_period}")
    if self.min_repeats < 2:
      raise ValueError(f"min_repeats must be >= 2, not {self.min_repeats}")
    if self.min_tokens < 0:
      raise ValueError(f"min_tokens must be >= 0, not {self.min_tokens}")

  def span(self, period: int) -> int:
    """How many trailing tokens must have period `period` (and be emitted) for the rule to fire."""
    return (self.min_repeats - 1) * period + max(period, self.min_tokens)

  @property
  def window(self) -> int:
    """How many recent tokens the rule reads: span(max_period), the largest span."""
    return self.span(self.max_period)


def repeats_cycle(tokens: jax.Array, emitted: jax.Array, rule: RepetitionRule = RepetitionRule()) -> jax.Array:
  """(B,) bool: whether each row's emitted tokens end in a loop by `rule` (module docstring).

  tokens: (B, N) int, row b's tokens in tokens[b, :emitted[b]] (entries after that are ignored).
  emitted: (B,) int, how many tokens each row has, the just-drawn one included. Rows with fewer
  than span(p) tokens do not fire for period p; a row with none is False.
  """
  b, n = tokens.shape
  periods = rule.max_period
  w = rule.window
  emitted = jnp.asarray(emitted, jnp.int32)
  last = emitted - 1
  # recent[:, j] = x_{e-j} (1-based as in the docstring), j in [0, w + max_period): the last token
  # first. Positions before the row's start are clipped into the buffer; no check that fires can
  # read them, since a period p only counts once emitted >= span(p).
  back = jnp.arange(w + periods, dtype=jnp.int32)
  index = jnp.clip(last[:, None] - back[None, :], 0, n - 1)
  recent = jnp.take_along_axis(tokens, index, axis=1)
  fires = jnp.zeros((b,), bool)
  j = jnp.arange(w, dtype=jnp.int32)
  for p in range(1, periods + 1):  # static: max_period small compares of (B, w)
    same = recent[:, :w] == recent[:, p:p + w]  # x_{e-j} == x_{e-j-p}
    needed = j < rule.span(p) - p
    periodic = jnp.all(same | ~needed[None, :], axis=1)
    fires = fires | (periodic & (emitted >= rule.span(p)))
  return fires
