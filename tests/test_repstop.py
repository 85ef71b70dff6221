"""The on-device repetition rule (codit_jax.decoding.repetition_stop), against the docstring's
definition and the reference text flag. No models: token ids only, tokenizers built offline."""

import functools
import inspect
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from codit_jax import demo
from codit_jax.data.repetition import is_repetitive
from codit_jax.decoding.repetition_stop import RepetitionRule, repeats_cycle

# "A cycle of p tokens repeated 8 times", as in the issue: span(p) = 8 p.
PLAIN = RepetitionRule(max_period=4, min_repeats=8, min_tokens=0)
DEFAULT = RepetitionRule()


@functools.lru_cache(maxsize=None)
def _jitted():
  return jax.jit(repeats_cycle, static_argnums=2)


def fires(rows, emitted=None, rule=DEFAULT, width=None):
  """repeats_cycle of a batch of Python lists (padded with junk after each row's end)."""
  emitted = [len(r) for r in rows] if emitted is None else emitted
  width = width or -(-(max(len(r) for r in rows) + 7) // 512) * 512  # few shapes: few compiles
  height = -(-len(rows) // 8) * 8
  buf = np.full((height, width), 9999, np.int32)
  for b, r in enumerate(rows):
    buf[b, :len(r)] = r[:width]
  emitted = np.pad(np.asarray(emitted, np.int32), (0, height - len(rows)))
  return np.asarray(_jitted()(jnp.asarray(buf), jnp.asarray(emitted), rule))[:len(rows)].tolist()


def reference(x, rule):
  """The docstring's definition, literally, for one row x (its emitted tokens)."""
  e = len(x)
  for p in range(1, rule.max_period + 1):
    span = (rule.min_repeats - 1) * p + max(p, rule.min_tokens)
    if e >= span and all(x[e - 1 - i] == x[e - 1 - i - p] for i in range(span - p)):
      return True
  return False


def first_firing(x, rule=DEFAULT):
  """The smallest e such that the rule fires on x[:e] (None if none): a run-length scan."""
  x = np.asarray(x)
  best = None
  for p in range(1, rule.max_period + 1):
    need = rule.span(p) - p
    same = np.zeros(len(x), bool)
    same[p:] = x[p:] == x[:-p]  # same[t]: x[t] == x[t - p]
    # run[t] = how many of same[..t] are True back to back, ending at t.
    breaks = np.where(same, 0, np.arange(len(x)) + 1)
    run = np.arange(len(x)) + 1 - np.maximum.accumulate(breaks) if len(x) else breaks
    hits = np.flatnonzero(run >= need)  # need >= 1; run >= need implies len >= span(p)
    if hits.size:
      best = int(hits[0]) + 1 if best is None else min(best, int(hits[0]) + 1)
  return best


# By hand.

def test_spans_and_window():
  assert [PLAIN.span(p) for p in (1, 2, 3, 4)] == [8, 16, 24, 32] and PLAIN.window == 32
  assert [DEFAULT.span(p) for p in (1, 3, 32)] == [109, 127, 388] and DEFAULT.window == 388
  assert hash(DEFAULT) == hash(RepetitionRule()) and DEFAULT == RepetitionRule()
  for bad in ({"max_period": 0}, {"min_repeats": 1}, {"min_tokens": -1}):
    with pytest.raises(ValueError):
      RepetitionRule(**bad)


def test_period_3_fires_exactly_when_the_eighth_repeat_completes():
  loop = [1, 2, 3] * 8
  prefix = [7, 8, 9, 10, 11]
  x = prefix + loop
  got = fires([x[:e] for e in range(len(x) + 1)], rule=PLAIN)
  assert got == [e >= len(x) for e in range(len(x) + 1)]  # True at 8 repeats, not one token earlier
  assert fires([prefix + [1, 2, 3] * 7], rule=PLAIN) == [False]
  # A loop that starts inside the emitted tokens but whose 8th repeat has not completed.
  assert fires([[1, 2, 3] * 7 + [1, 2]], rule=PLAIN) == [False]


def test_a_broken_cycle_does_not_fire():
  x = [1, 2, 3] * 8
  for i in range(len(x) - 3):  # one token changed anywhere but in the first period
    broken = list(x)
    broken[i + 3] = 4
    assert fires([broken], rule=PLAIN) == [False], i
  first = list(x)
  first[0] = 4  # the first period only has to equal the second from its 2nd token on: still 7.67 repeats
  assert fires([first], rule=PLAIN) == [False]
  assert fires([first + [1, 2, 3]], rule=PLAIN) == [True]


def test_period_1_and_the_longest_period():
  assert fires([[5] * 7, [5] * 8, [6] + [5] * 8], rule=PLAIN) == [False, True, True]
  longest = list(range(10, 14))  # period 4 = max_period
  assert fires([longest * 8, longest * 7, (longest * 8)[:-1]], rule=PLAIN) == [True, False, False]
  beyond = list(range(20, 25))  # period 5 = max_period + 1: never seen
  assert fires([beyond * 20], rule=PLAIN) == [False]
  assert fires([beyond * 8], rule=RepetitionRule(max_period=5, min_repeats=8, min_tokens=0)) == [True]


def test_defaults_need_the_100_token_stretch_10_times():
  assert fires([[5] * 108, [5] * 109], rule=DEFAULT) == [False, True]
  assert fires([[1, 2, 3] * 42, [1, 2, 3] * 42 + [1]]) == [False, True]  # span(3) = 127
  cycle = list(range(100, 132))  # period 32: 9 repeats + 100 tokens = 388
  x = (cycle * 13)[:388]
  assert fires([x[:-1], x]) == [False, True]
  assert fires([(list(range(100, 133)) * 20)]) == [False]  # period 33


def test_rows_of_different_lengths_in_one_batch_and_the_tail_ignored():
  loop = [4, 5, 6] * 8
  rows = [[], [4], loop[:-1], loop, [9] * 3 + loop, [1, 2] * 16]
  assert fires(rows, rule=PLAIN) == [False, False, False, True, True, True]
  # The same buffer with emitted cut short: whatever follows `emitted` is not read.
  buf = [loop + [4, 5, 6] * 4] * 3
  assert fires(buf, emitted=[23, 24, 0], rule=PLAIN, width=40) == [False, True, False]
  # A buffer tail that would complete the loop does not count.
  assert fires([loop], emitted=[23], rule=PLAIN) == [False]


def test_buffer_shorter_than_the_window():
  # N = max_new_tokens may be smaller than the window: the gather clips, nothing fires wrongly.
  assert fires([[5] * 20, [5] * 5], rule=DEFAULT, width=20) == [False, False]
  assert fires([[5] * 8], rule=PLAIN, width=8) == [True]


# Against the literal definition.

def _random_row(rng, rule):
  n = int(rng.integers(0, 2 * rule.window))
  vocab = int(rng.choice([2, 3, 50]))
  x = rng.integers(0, vocab, n).tolist()
  if rng.random() < 0.6 and n:  # inject a loop, often just short of or at its firing length
    p = int(rng.integers(1, rule.max_period + 3))
    cycle = rng.integers(0, vocab, p).tolist()
    reps = rule.span(p) // p + int(rng.integers(-2, 3))
    tail = (cycle * (reps + 2))[:max(0, reps * p + int(rng.integers(-p, p + 1)))]
    if rng.random() < 0.3 and tail:
      tail[int(rng.integers(len(tail)))] = vocab  # broken somewhere
    x = x + tail
  return x


@pytest.mark.parametrize("rule", [PLAIN, RepetitionRule(max_period=6, min_repeats=3, min_tokens=10),
                                  RepetitionRule(max_period=8, min_repeats=4, min_tokens=3), DEFAULT])
def test_equals_the_definition_on_random_rows(rule):
  rng = np.random.default_rng(17)
  rows = [_random_row(rng, rule) for _ in range(300)]
  want = [reference(x, rule) for x in rows]
  assert fires(rows, rule=rule) == want
  assert 30 < sum(want) < 270  # both outcomes well represented
  for x in rows[:60]:  # the scan the other tests use, against the definition at every length
    e = first_firing(x, rule)
    assert [reference(x[:k], rule) for k in range(len(x) + 1)][:(e or len(x) + 1)] == [False] * (e or len(x) + 1)
    assert e is None or reference(x[:e], rule)


# The reference text flag agrees.

@functools.lru_cache(maxsize=None)
def _demo_tokenizer():
  return demo._tokenizer()


def _whole_char_tokens(tokenizer):
  """Tokens that decode on their own to at least one character, none of them a replacement."""
  special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in demo._SPECIAL_TOKENS}
  out = []
  for v in range(len(tokenizer)):
    text = tokenizer.decode([v], skip_special_tokens=True)
    if v not in special and text and "\ufffd" not in text:
      out.append(v)
  return out


def test_rows_it_stops_are_flagged_by_the_reference_text_rule():
  tokenizer = _demo_tokenizer()
  whole = _whole_char_tokens(tokenizer)
  assert len(whole) > 200
  words = [v for v in whole if tokenizer.decode([v]).strip()]
  blanks = [v for v in whole if not tokenizer.decode([v]).strip()]
  any_token = [v for v in range(len(tokenizer)) if v not in tokenizer.all_special_ids]
  rng = np.random.default_rng(4)
  checked = 0
  for case in range(400):
    p = int(rng.integers(1, DEFAULT.max_period + 1))
    cycle = rng.choice(whole, p).tolist()
    if not any(v in words for v in cycle):
      cycle[int(rng.integers(p))] = int(rng.choice(words))  # the premise: a non-blank character
    if case % 4 == 0:  # mostly blank, e.g. a newline loop with one word
      cycle = rng.choice(blanks, p).tolist()
      cycle[0] = int(rng.choice(words))
    prefix = rng.choice(any_token, int(rng.integers(0, 600))).tolist()  # anything, partial bytes too
    x = prefix + cycle * (DEFAULT.window // p + 2)
    e = first_firing(x)
    assert e is not None and e <= len(x)
    assert fires([x[:e - 1], x[:e]]) == [False, True]
    text = tokenizer.decode(x[:e], skip_special_tokens=True)
    assert is_repetitive(text), (case, p, text[-300:])
    checked += 1
  assert checked == 400


def test_a_decoded_forced_loop_is_flagged_also_with_a_long_natural_prefix():
  tokenizer = _demo_tokenizer()
  prefix = tokenizer.encode(NATURAL_TEXTS[0] * 3)
  for loop_text in ("I am sorry. ", "The answer is 42.\n", "ok", "\n\n1.", " def f(x): return x\n"):
    cycle = tokenizer.encode(loop_text)
    x = prefix + cycle * 200
    e = first_firing(x)
    assert e is not None and e < len(prefix) + DEFAULT.window + len(cycle)
    assert is_repetitive(tokenizer.decode(x[:e], skip_special_tokens=True)), loop_text


# Natural text does not fire.

NATURAL_TEXTS = [
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into "
    "chemical energy. In the light reactions, water is split and oxygen is released; in the Calvin cycle, "
    "carbon dioxide is fixed into sugars. The rate depends on light intensity, temperature and the "
    "concentration of carbon dioxide, and each factor can limit it when the others are plentiful. ",
    "Here is a plan for the week:\n" + "".join(
        f"{i}. Day {i}: read chapter {i}, write a one-page summary, and review the notes of day {i - 1}.\n"
        for i in range(1, 31)),
    "| Name | Age | City | Score |\n|------|-----|------|-------|\n" + "".join(
        f"| Person {i} | {20 + i} | City {i % 7} | {(i * 37) % 100} |\n" for i in range(40)),
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n\n"
    "for i in range(10):\n    print(i, fibonacci(i))\n\n" + "".join(
        f"assert fibonacci({i}) == {[0, 1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89][i]}\n" for i in range(12)),
    "{\n" + "".join(f'  "key_{i}": {{"value": {i * i}, "label": "item {i}", "ok": true}},\n' for i in range(40)) + "}\n",
    "Yes, yes, yes! She said it three times, then laughed: ha ha ha. The band played on and on, "
    "bar after bar, while the crowd chanted the chorus again and again.\n" * 2,
    "#" * 72 + "\n# Section\n" + "#" * 72 + "\n" + "-" * 60 + "\n" + "=" * 80 + "\n",
]


def _stdlib_texts():
  """Some of Python's own source: code and English docstrings, found offline."""
  root = pathlib.Path(inspect.getfile(inspect)).parent
  for name in ("re/_parser.py", "argparse.py", "textwrap.py", "json/encoder.py", "csv.py", "calendar.py",
               "difflib.py", "fractions.py", "statistics.py"):
    path = root / name
    if path.exists():
      yield name, path.read_text()


@functools.lru_cache(maxsize=None)
def _larger_bpe():
  """A byte-level BPE of 4000 tokens (closer to a real tokenizer's), trained offline on other stdlib files."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(inspect.getfile(inspect)).parent
  corpus = [(root / n).read_text() for n in ("tarfile.py", "inspect.py", "typing.py", "pydoc.py", "turtle.py")
            if (root / n).exists()]
  model = tokenizers.Tokenizer(tokenizers.models.BPE())
  model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = tokenizers.decoders.ByteLevel()
  model.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
      vocab_size=4000, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  return model


def test_natural_text_and_code_never_fire(tmp_path):
  import tiny_checkpoints  # pylint: disable=g-import-not-at-top  # tests/ is on the path
  larger = _larger_bpe()
  tokenizers = [("demo", _demo_tokenizer().encode), ("4000-token BPE", lambda t: larger.encode(t).ids)]
  tokenizers += [(f, tiny_checkpoints.make_tokenizer(tmp_path / f, f).encode) for f in ("llama", "gemma3")]
  texts = [(f"natural {i}", t) for i, t in enumerate(NATURAL_TEXTS)] + list(_stdlib_texts())
  assert len(texts) > len(NATURAL_TEXTS) + 5
  for tname, encode in tokenizers:
    for name, text in texts:
      x = encode(text)
      assert len(x) > 50
      e = first_firing(x)
      assert e is None, (tname, name, e, x[max(0, e - 400):e])
  # The reference accepts all of them but the rulers (their character 2-grams are one '##', '--'
  # or '=='), which as tokens are too short a run to be a loop.
  assert [is_repetitive(t) for t in NATURAL_TEXTS] == [False] * (len(NATURAL_TEXTS) - 1) + [True]
