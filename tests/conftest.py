"""Test setup: 8 simulated CPU devices (set before jax is imported anywhere)."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU sizes its thread pool by NPROC. With the default (the core count, 2 on CI) the
# TPU paged-attention kernel in Pallas interpret mode on 8 simulated devices deadlocks: each
# device's interpreted kernel blocks a pool thread waiting for the others. 16 threads let all
# 8 run; measured on this 2-core machine, the rest of the suite is no slower with it.
os.environ.setdefault("NPROC", "16")

import jax  # noqa: E402

# float32 matmuls at full precision so that comparisons at 1e-4 mean something.
jax.config.update("jax_default_matmul_precision", "highest")
