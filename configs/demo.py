"""The demo: a tiny teacher pair built locally, 48 prompts, CPU, about a minute, offline.

    python -m codit_jax.generate --config=configs/demo.py

The pair (builtin:demo-post, builtin:demo-pre) has random weights, so the
responses are word salad; the run shows the whole pipeline: prompts, CoDIT
decoding, the TFDS dataset in /tmp/codit_demo/codit, and its summary. Read the
result back with
    python -c "import tensorflow_datasets as tfds; print(next(iter(tfds.builder_from_directory('/tmp/codit_demo/codit').as_dataset(split='train'))))"
"""

import os

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "default.py")
  config.post_trained = "builtin:demo-post"
  config.pre_trained = "builtin:demo-pre"
  config.prompts = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_prompts.jsonl")
  config.output_dir = "/tmp/codit_demo/codit"
  config.max_new_tokens = 48
  config.batch_size = 16
  config.dtype = "float32"
  config.min_bucket = 32
  config.write_jsonl = True
  config.log_every_seconds = 5.0
  return config
