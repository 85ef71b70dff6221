"""The tuning demo: builtin:demo-post tuned on the demo dataset, CPU, offline, seconds.

    python -m codit_jax.generate --config=configs/demo.py     # writes /tmp/codit_demo/codit
    python -m codit_jax.train --config=configs/sft_demo.py    # writes /tmp/codit_demo/sft

The demo teacher has random weights, so its responses are word salad, and most
stop at the length limit: the filters are off so that there is data to learn.
The loss falls as the tiny student learns them (eval_loss on 5 held-out
examples too, from about 6.4 to 3.8); metrics are in
/tmp/codit_demo/sft/metrics.jsonl (and tensorboard/), the tuned student in
/tmp/codit_demo/sft/hf. Any JSONL file with instruction and response fields
works too: --config.datasets=my.jsonl.
"""

from codit_jax.config_files import sibling_config


def get_config():
  config = sibling_config(__file__, "sft_default.py")
  config.student = "builtin:demo-post"
  config.datasets = "/tmp/codit_demo/codit"
  config.output_dir = "/tmp/codit_demo/sft"
  config.drop_repetitive = False
  config.drop_unfinished = False
  config.max_length = 256
  config.eval_fraction = 0.1
  config.max_steps = 30  # about 6 epochs; longer overfits the 42 training examples
  config.batch_size = 4
  config.learning_rate = 3e-3  # a tiny random model: far above what a real student takes
  config.warmup_steps = 5
  config.dtype = "float32"
  config.compute_dtype = "float32"
  config.checkpoint_every = 10
  config.log_every = 5
  config.eval_every = 10
  return config
