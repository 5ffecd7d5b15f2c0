"""Test setup: 8 fake CPU devices for sharding tests, offline HF, float32 math.

XLA_FLAGS must be set before jax is first imported, which is why it lives here.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
