"""The CoDIT score (../shared/CODIT.md), per step and per row, in float32.

    lp_post = log_softmax(logits_post)        lp_pre = log_softmax(logits_pre)
    keep    = exp(lp_post) >= alpha * max(exp(lp_post))
    score   = where(keep, lp_post, -inf) - beta * lp_pre

Logits are cut to the tokenizer's real vocabulary first: embedding matrices are
often padded past it (Qwen3: 151936 rows for 151669 tokens), the two models of
a pair may be padded differently, and padding rows must not take probability
mass from the softmax.
"""

import jax
import jax.numpy as jnp


def log_probs(logits, vocab_size: int):
  """float32 log-softmax over the first `vocab_size` entries (the real tokens)."""
  return jax.nn.log_softmax(logits[..., :vocab_size].astype(jnp.float32), axis=-1)


def plausibility_mask(lp_post, alpha: float):
  """Tokens whose post-trained probability is at least alpha times the most probable one's.

  In log space: lp >= log(alpha) + max(lp); equivalent to the probability rule
  and exact where exp would underflow.
  """
  return lp_post >= jnp.log(alpha) + jnp.max(lp_post, axis=-1, keepdims=True)


def codit_score(lp_post, lp_pre, alpha: float, beta: float):
  return jnp.where(plausibility_mask(lp_post, alpha), lp_post, -jnp.inf) - beta * lp_pre
