"""Model architectures to plan for (Llama-3.2 1B, Llama-3.1 8B / 70B, no
weights), and fixing the attention kernel for a TPU target."""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from icm_jax.aot.errors import AotError
from icm_jax.model import LlamaConfig, RopeScaling

_LLAMA31 = dict(
    vocab_size=128256, head_dim=128, num_kv_heads=8, rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0,
                             original_max_position_embeddings=8192),
    max_position_embeddings=131072, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128001)

PRESETS: Dict[str, dict] = {
    # Llama-3.2-1B: the 1B shape of the LoRA vs full fine-tuning memory line.
    "llama-3.2-1b": dict(
        _LLAMA31, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, head_dim=64, tie_word_embeddings=True,
        rope_scaling=RopeScaling(factor=32.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336,
                         num_layers=32, num_heads=32),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672,
                          num_layers=80, num_heads=64),
}


def for_tpu(config: LlamaConfig, attention: Optional[str] = "splash"
            ) -> LlamaConfig:
  """`config` with the attention kernel fixed for a TPU target.

  "auto" would resolve from the *host's* backend (CPU here), so AOT for TPU
  names the kernel explicitly. None keeps the config's.
  """
  if attention is None:
    return config
  return dataclasses.replace(config, attention=attention)


def attention_impl(config: LlamaConfig) -> str:
  return config.attention


def model_preset(name: str, arg: str = "--model", **overrides) -> LlamaConfig:
  """Llama-3.2-1B / Llama-3.1-8B / 70B architecture (no weights)."""
  key = name.strip().lower()
  if key not in PRESETS:
    raise AotError(f"{arg}={name!r}: unknown preset; choose from "
                   f"{sorted(PRESETS)} or pass an HF checkpoint directory")
  return LlamaConfig(**dict(PRESETS[key], **overrides))
