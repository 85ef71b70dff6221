"""CoDIT greedy decoding written plainly with transformers' PyTorch models.

The independent reference the tests compare the engine against, and the
baseline of bench/decode.py: two models with KV caches, a left-padded batch,
the score computed as ../shared/CODIT.md writes it (in probabilities, not in
log space as the engine does). Needs torch (the `test` extra).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def generate(post, pre, prompts: list[list[int]], *, end_ids, vocab_size: int, max_new_tokens: int,
             alpha: float = 0.01, beta: float = 1.0, mode: str = "codit", with_scores: bool = False):
  """Greedy CoDIT (or direct) decoding of a batch; returns per prompt (tokens, post_logprobs, pre_logprobs, reason).

  Tokens exclude the end token, like the engine's completions. with_scores: a fifth entry, each
  emitted token's log-prob under the contrastive distribution, log_softmax(score), the end token's
  included (what the authors' JSONL calls `score`).
  """
  models = [post, pre] if mode == "codit" else [post]
  b, width = len(prompts), max(len(p) for p in prompts)
  ids = torch.zeros((b, width), dtype=torch.long)
  mask = torch.zeros((b, width), dtype=torch.long)
  for row, prompt in enumerate(prompts):
    ids[row, width - len(prompt):] = torch.tensor(prompt)
    mask[row, width - len(prompt):] = 1
  positions = (mask.cumsum(-1) - 1).clamp(min=0)
  outputs = [m(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True) for m in models]
  caches = [o.past_key_values for o in outputs]
  logits = [o.logits[:, -1] for o in outputs]
  done = torch.zeros(b, dtype=torch.bool)
  results = [([], [], [], "length") for _ in range(b)]
  scores = [[] for _ in range(b)]
  for _ in range(max_new_tokens):
    lp = [torch.log_softmax(l[:, :vocab_size].float(), dim=-1) for l in logits]
    if mode == "codit":
      p_post = lp[0].exp()
      keep = p_post >= alpha * p_post.max(dim=-1, keepdim=True).values
      score = torch.where(keep, lp[0], torch.tensor(-float("inf"))) - beta * lp[1]
    else:
      score = lp[0]
    token = score.argmax(dim=-1)
    contrastive = torch.log_softmax(score, dim=-1)
    for row in range(b):
      if done[row]:
        continue
      t = int(token[row])
      scores[row].append(float(contrastive[row, t]))
      if t in end_ids:
        results[row] = results[row][:3] + ("stop",)
        done[row] = True
        continue
      results[row][0].append(t)
      results[row][1].append(float(lp[0][row, t]))
      if mode == "codit":
        results[row][2].append(float(lp[1][row, t]))
    if done.all():
      break
    mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=-1)
    positions = positions[:, -1:] + 1
    outputs = [m(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=c,
                 use_cache=True) for m, c in zip(models, caches)]
    caches = [o.past_key_values for o in outputs]
    logits = [o.logits[:, -1] for o in outputs]
  return [r + (s,) for r, s in zip(results, scores)] if with_scores else results
