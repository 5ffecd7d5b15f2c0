"""Pure-functional Flax Llama (Llama 2/3/3.1/3.2, SmolLM2)."""

from icm_jax.model.config import LlamaConfig, RopeScaling
from icm_jax.model.llama import (KVCache, Llama, forward, init_params,
                                 param_shapes)
from icm_jax.model import masks

__all__ = ["LlamaConfig", "RopeScaling", "KVCache", "Llama", "forward",
           "init_params", "param_shapes", "masks"]
