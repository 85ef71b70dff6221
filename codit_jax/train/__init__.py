"""codit-train: instruction-tune a student on a synthesized dataset and export it to Hugging Face format.

  data           read, filter, chat-format, pack (the loss is on response tokens only)
  steps          the masked loss, AdamW on a warmup-cosine schedule, jitted train/eval steps
  checkpointing  orbax checkpoints, resume guard
  metrics        metrics.jsonl, absl log, TensorBoard
  export         the tuned student as a Hugging Face folder
  trainer        the job; app: the absl command line (`python -m codit_jax.train`)
"""
