"""`load_model`: one call for config + params (+ tokenizer), any format."""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional

from icm_jax.checkpoints.common import CheckpointError, ShardingsArg
from icm_jax.checkpoints.gguf import load_gguf, load_gguf_config
from icm_jax.checkpoints.hf import load_hf_config, load_hf_params
from icm_jax.model.config import LlamaConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "vocab.json")


class LoadedModel(NamedTuple):
  config: LlamaConfig
  params: Any  # pytree with the structure of param_shapes(config)
  tokenizer: Any  # transformers tokenizer, or None if with_tokenizer=False


def checkpoint_format(path: str) -> str:
  """'gguf' or 'hf' for `path`; raises CheckpointError if neither."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such file or directory")
  if os.path.isfile(path):
    with open(path, "rb") as f:
      magic = f.read(4)
    if magic == b"GGUF" or path.lower().endswith(".gguf"):
      return "gguf"
    raise CheckpointError(f"{path}: not a GGUF file; pass a .gguf file or an "
                          "HF checkpoint directory (config.json + "
                          "*.safetensors)")
  return "hf"


def load_tokenizer(path: str):
  """transformers AutoTokenizer for an HF directory or a .gguf file (offline)."""
  from transformers import AutoTokenizer
  path = os.fspath(path)
  kind = checkpoint_format(path)
  try:
    if kind == "gguf":
      directory, name = os.path.split(os.path.abspath(path))
      return AutoTokenizer.from_pretrained(directory, gguf_file=name,
                                           local_files_only=True)
    if not any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
      raise CheckpointError(f"{path}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
                            "pass with_tokenizer=False to load without one")
    return AutoTokenizer.from_pretrained(path, local_files_only=True)
  except CheckpointError:
    raise
  except Exception as e:
    raise CheckpointError(f"{path}: cannot load tokenizer: "
                          f"{type(e).__name__}: {e}") from e


def load_model_config(path: str,
                      config_overrides: Optional[Mapping[str, Any]] = None
                      ) -> LlamaConfig:
  """The LlamaConfig `load_model` would build, from metadata alone (HF
  config.json or the GGUF header): checks before the weights load."""
  path = os.fspath(path)
  if checkpoint_format(path) == "gguf":
    return load_gguf_config(path, config_overrides)
  return load_hf_config(path, config_overrides)


def load_model(path: str, *,
               param_shardings: ShardingsArg = None,
               config_overrides: Optional[Mapping[str, Any]] = None,
               with_tokenizer: bool = True,
               strict: bool = True) -> LoadedModel:
  """Loads a Llama-family checkpoint (Llama, Mistral, Qwen2/2.5, Qwen3): HF
  directory (config.json + model.safetensors or sharded *.safetensors +
  model.safetensors.index.json) or a llama/qwen2/qwen3 .gguf file.

  param_shardings: None -> every param on jax.devices()[0]; or a pytree of
    `jax.sharding.Sharding` with the structure of `param_shapes(config)`; or a
    callable `config -> that pytree` (useful because the config is only known
    once the checkpoint is read; it gets the config *with* overrides applied).
    Params are built in place with make_array_from_callback, never as a full
    host copy.
  config_overrides: LlamaConfig fields to replace (e.g. dtype, param_dtype,
    remat); params are cast to the resulting `param_dtype`.
  with_tokenizer: also load the transformers tokenizer (from the directory, or
    from the GGUF metadata).
  strict: tensors the model has no parameter for raise CheckpointError; with
    strict=False they only warn. (Missing or mis-shaped tensors always raise;
    `*.rotary_emb.inv_freq` buffers are skipped silently, and a `lm_head.weight`
    in a tied-embeddings checkpoint is ignored with a warning, as transformers
    does.)

  Raises CheckpointError (a ValueError) naming the file / tensor on bad input.
  """
  path = os.fspath(path)
  kind = checkpoint_format(path)
  if kind == "gguf":
    config, params = load_gguf(path, param_shardings=param_shardings,
                               config_overrides=config_overrides, strict=strict)
  else:
    config = load_hf_config(path, config_overrides)
    params = load_hf_params(path, config, param_shardings, strict=strict)
  tokenizer = load_tokenizer(path) if with_tokenizer else None
  return LoadedModel(config, params, tokenizer)
