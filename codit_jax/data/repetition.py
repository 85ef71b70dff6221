"""The reference implementation's flag for degenerate, repetitive responses.

A response of MIN_CHARS characters or more (counted on `text.strip()`, as
the reference does, so surrounding whitespace and newlines do not count) is
repetitive when its most
frequent character n-gram, for n = 2, 3 or 4, makes up at least
TOP_NGRAM_SHARE[n] of all its (overlapping) n-grams, or when its most frequent
LONG_NGRAM-gram occurs LONG_NGRAM_MAX_REPEATS times or more. Shares are exact
fractions, so a share that equals its threshold counts, without float
rounding deciding the boundary. Only the length check strips: the n-grams are
those of the text as given, as in the reference.
"""

from __future__ import annotations

import collections
from fractions import Fraction

MIN_CHARS = 100
TOP_NGRAM_SHARE = {2: Fraction(16, 100), 3: Fraction(18, 100), 4: Fraction(20, 100)}
LONG_NGRAM = 100
LONG_NGRAM_MAX_REPEATS = 10


def is_repetitive(text: str) -> bool:
  """Whether `text` is flagged as a degenerate, repetitive response (see module docstring)."""
  if len(text.strip()) < MIN_CHARS:
    return False
  if any(top_ngram_share(text, n) >= share for n, share in TOP_NGRAM_SHARE.items()):
    return True
  return top_ngram_count(text, LONG_NGRAM) >= LONG_NGRAM_MAX_REPEATS


def top_ngram_count(text: str, n: int) -> int:
  """How often the most frequent character n-gram of `text` occurs (overlaps counted)."""
  counts = collections.Counter(text[i:i + n] for i in range(len(text) - n + 1))
  return max(counts.values(), default=0)


def top_ngram_share(text: str, n: int) -> Fraction:
  """The most frequent character n-gram's share of all n-grams of `text`; 0 if it has none."""
  total = len(text) - n + 1
  return Fraction(top_ngram_count(text, n), total) if total > 0 else Fraction(0)
