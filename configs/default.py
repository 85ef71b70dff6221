"""Published CoDIT defaults (../shared/CODIT.md); set the pair, the prompts and the output.

    python -m codit_jax.generate --config=configs/default.py \
      --config.post_trained=Qwen/Qwen3-8B --config.pre_trained=Qwen/Qwen3-8B-Base \
      --config.prompts=seed.jsonl --config.output_dir=/data/codit-qwen3-8b

Any key can be overridden with --config.<key>=<value>. The teacher-pair configs
next to this file start from it.
"""

from ml_collections import config_dict


def get_config() -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()

  # What to run.
  config.post_trained = ""  # instruction-tuned model: folder or Hub id
  config.pre_trained = ""  # its own pre-trained checkpoint (unused in direct mode)
  config.prompts = ""  # JSONL / JSON array / Parquet file, TFDS folder, or tfds:<name>
  config.output_dir = ""  # the TFDS dataset written (local folder or gs://)
  config.mode = "codit"  # 'codit' | 'direct' (post-trained model alone, the baseline)

  # The decoding rule and the sampler (published defaults).
  config.alpha = 0.01  # plausibility: keep tokens with p_post >= alpha * max p_post
  config.beta = 1.0  # weight of the pre-trained log-probabilities
  config.temperature = 1.0  # 0 means greedy
  config.top_p = 1.0
  config.top_k = 0  # 0 means off
  config.max_new_tokens = 4096
  # True: a row whose last tokens loop (a cycle of <= 32 tokens whose last max(p, 100) tokens occur
  # 10 times in a row) stops early with finish_reason 'repetitive'. Off: rows run to the limit, as
  # the reference does (the `repetitive` flag still marks them).
  config.stop_repetitive = False
  config.seed = 0

  # Prompts.
  config.enable_thinking = config_dict.placeholder(bool)  # None: False for templates that read it (Qwen3)
  config.system_prompt = config_dict.placeholder(str)  # None: no system turn, as published
  config.prompt_fields = "instruction=instruction,id=id"  # which input fields hold the instruction and id
  config.prompts_format = ""  # '' tells by the name; or jsonl, json, parquet, tfds
  config.tfds_split = "train"
  config.tfds_data_dir = config_dict.placeholder(str)
  config.strict_input = False  # True: the first bad input record stops the run
  config.max_prompt_len = 0  # 0: the model's context - max_new_tokens; prompts over 2048 tokens run in a second pass
  config.long_prompts = "skip"  # 'skip' | 'truncate' (cut the instruction's middle)

  # Compute.
  config.dtype = "bfloat16"  # 'bfloat16' | 'float32'
  # Slots of the running batch (global, over all processes): rows leave as they finish and
  # waiting prompts take their slots. The dataset does not depend on it, nor on the two below.
  # batch_size is a maximum: the slots that run at once are what the KV-cache budget holds, at most this.
  config.batch_size = 32
  config.chunk_steps = 32  # most decode steps between two looks of the host at the batch
  config.admit_tokens = 1024  # about how many prompt tokens one prefill (admit) program takes
  # Devices per model replica (the 'model' mesh axis). 0: automatic, chosen from device memory: the fewest
  # that hold both models' weights and the whole batch's KV cache (else the most slots); docs/memory.md.
  config.model_parallelism = 0
  config.kv_cache_gib = 0.0  # KV cache per device; 0: what the devices have free after the weights, less a margin
  # CoDIT only: the post-trained model on one half of the devices, the pre-trained on the
  # other, both stepping at once (needs an even device count and a pair of equal shapes; the
  # same tokens). None: on for a pair of equal shapes on a CPU host of two or more cores, which
  # codit-generate then makes two host devices, one per model; off on GPU and TPU.
  config.pair_parallel = config_dict.placeholder(bool)
  config.min_bucket = 64  # smallest prompt-length bucket; buckets double up to max_prompt_len
  config.compilation_cache_dir = "~/.cache/codit_jax/xla"  # '' turns JAX's persistent cache off

  # Output and reporting.
  config.rows_per_shard = 1000  # a TFRecord shard is written (atomically) every this many finished rows
  config.write_jsonl = False  # also write codit.jsonl in the reference implementation's layout
  config.write_parquet = False  # also write the dataset as Parquet files (Hugging Face datasets, TRL)
  config.log_every_seconds = 30.0
  # A local folder: a jax.profiler trace of profile_chunks decode chunks (from the second on) is written there,
  # for TensorBoard / XProf or ui.perfetto.dev. '' records none.
  config.profile_dir = ""
  config.profile_chunks = 8
  return config
