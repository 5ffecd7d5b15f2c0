"""Architectures of the paper's base models (shapes only, no weights).

`--config=configs/gsm8k.py:llama3.1-8b` checks a checkpoint against these,
and tpu_scripts/aot_check.py / plan.py compile and cost them without one.
"""

from __future__ import annotations

from typing import Dict

from icm_jax.model.config import RopeScaling

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

# What must match between a preset and a checkpoint claiming to be it.
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
              "num_heads", "num_kv_heads", "head_dim")


def preset_name(name: str) -> str:
  """The PRESETS key for "llama3.1-8b", "Llama-3.1-8B", ...; KeyError if none."""
  key = name.strip().lower()
  if key.startswith("llama") and not key.startswith("llama-"):
    key = "llama-" + key[len("llama"):]
  if key not in PRESETS:
    raise KeyError(name)
  return key
