"""`load_model`: one call for config + params (+ tokenizer), any format."""

from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple, Optional

from icm_jax import storage
from icm_jax.checkpoints.common import CheckpointError, ShardingsArg
from icm_jax.checkpoints.gguf import load_gguf, load_gguf_config
from icm_jax.checkpoints.hf import load_hf_config, load_hf_params
from icm_jax.checkpoints.hub import is_hub_id, resolve_hub_model
from icm_jax.checkpoints.remote import stage
from icm_jax.model.config import LlamaConfig

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "vocab.json")
# Read beside them when present (AutoTokenizer looks at config.json too).
_TOKENIZER_EXTRAS = ("config.json", "special_tokens_map.json",
                     "added_tokens.json", "merges.txt", "chat_template.jinja")


class LoadedModel(NamedTuple):
  config: LlamaConfig
  params: Any  # pytree with the structure of param_shapes(config)
  tokenizer: Any  # transformers tokenizer, or None if with_tokenizer=False


def locate(path: str, revision: Optional[str] = None,
           weights: bool = True) -> str:
  """What the loaders below read for a model named `path`: a local file or
  folder, or a gs:// (any fsspec URL) folder or .gguf, as given; a Hub id
  (`owner/name`, not a local path) becomes its snapshot folder in the HF
  cache (hub.py), at `revision` (None = main), with the weights unless
  `weights=False` (config and tokenizer only: enough for load_model_config
  and load_tokenizer)."""
  path = os.fspath(path)
  if storage.is_url(path) or os.path.exists(path):
    if revision:
      raise CheckpointError(f"{path}: model.revision={revision!r} applies to "
                            "Hub ids only; this is a path")
    return path
  if is_hub_id(path):
    return resolve_hub_model(path, revision or None, weights)
  raise CheckpointError(f"{path}: no such file or directory, and not a Hub "
                        "id (owner/name)")


def _stage_remote_gguf(url: str) -> str:
  return os.path.join(stage([url], "GGUF"), storage.basename(url))


def checkpoint_format(path: str) -> str:
  """'gguf' or 'hf' for `path`; raises CheckpointError if neither."""
  path = os.fspath(path)
  if storage.is_url(path):
    return "gguf" if path.lower().endswith(".gguf") else "hf"
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
  if storage.is_url(path):
    if kind == "gguf":
      path = _stage_remote_gguf(path)
    else:  # transformers reads tokenizers from local files only
      names = [n for n in _TOKENIZER_FILES + _TOKENIZER_EXTRAS
               if storage.exists(storage.join(path, n))]
      if not any(n in _TOKENIZER_FILES for n in names):
        raise CheckpointError(f"{path}: no tokenizer files "
                              f"({', '.join(_TOKENIZER_FILES)}); pass "
                              "with_tokenizer=False to load without one")
      path = stage([storage.join(path, n) for n in names], "tokenizer")
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
    if storage.is_url(path):
      path = _stage_remote_gguf(path)
    return load_gguf_config(path, config_overrides)
  return load_hf_config(path, config_overrides)


def load_model(path: str, *,
               param_shardings: ShardingsArg = None,
               config_overrides: Optional[Mapping[str, Any]] = None,
               with_tokenizer: bool = True,
               strict: bool = True) -> LoadedModel:
  """Loads a Llama-family checkpoint (Llama, Mistral, Qwen2/2.5, Qwen3): HF
  directory (config.json + model.safetensors or sharded *.safetensors +
  model.safetensors.index.json) or a llama/qwen2/qwen3 .gguf file, local or
  at a gs:// URL (safetensors read by byte ranges, see remote.py); a Hub id
  goes through `locate` first.

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
    if storage.is_url(path):
      path = _stage_remote_gguf(path)
    config, params = load_gguf(path, param_shardings=param_shardings,
                               config_overrides=config_overrides, strict=strict)
  else:
    config = load_hf_config(path, config_overrides)
    params = load_hf_params(path, config, param_shardings, strict=strict)
  tokenizer = load_tokenizer(path) if with_tokenizer else None
  return LoadedModel(config, params, tokenizer)
