"""Model architectures to plan for (Llama-3.2 1B, Llama-3.1 8B / 70B, no
weights), and fixing the attention kernel for a TPU target."""

from __future__ import annotations

import dataclasses
from typing import Optional

from icm_jax.aot.errors import AotError
from icm_jax.model import LlamaConfig
from icm_jax.model.presets import PRESETS, preset_name


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
  try:
    key = preset_name(name)
  except KeyError:
    raise AotError(f"{arg}={name!r}: unknown preset; choose from "
                   f"{sorted(PRESETS)} or pass an HF checkpoint directory"
                   ) from None
  return LlamaConfig(**dict(PRESETS[key], **overrides))
