"""The data layer of dataset synthesis: what goes in and what comes out.

  instructions  read instruction records (JSONL, JSON array, Parquet, TFDS)
  prompts       chat-template prompts, end tokens, the prompt length guard
  repetition    the reference implementation's flag for degenerate responses
  writer        atomic TFRecord shards, TFDS metadata, resume, optional JSONL

Nothing is imported here on purpose: `writer` pulls in TensorFlow, which the
readers and the prompt builder do not need.
"""
