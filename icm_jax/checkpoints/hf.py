"""HF checkpoints: import from / export to `config.json` + safetensors.

Import reads tensors slice by slice with `safetensors.safe_open(framework=
"numpy")` (bfloat16 comes back as `ml_dtypes.bfloat16`), or by byte ranges
from a gs:// folder (`remote.RangeSafetensors`), so a parameter is
materialised only as the device shards that need it. Export writes one shard
file at a time, pulling one layer of one parameter to the host at a time.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from icm_jax import storage
from icm_jax.checkpoints.common import (CheckpointError, Index, ShardingsArg,
                                        TensorSource, build_params,
                                        check_overrides, iter_hf_tensors)
from icm_jax.checkpoints.remote import RangeSafetensors
from icm_jax.model.config import LlamaConfig, dtype_from_name

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


# -- import -------------------------------------------------------------------


# A checkpoint folder is a local directory or a URL (gs://...; remote.py):
# these few calls are all that differs between the two.


def _join(folder: str, name: str) -> str:
  return storage.join(folder, name)


def _isfile(path: str) -> bool:
  return storage.exists(path) if storage.is_url(path) else os.path.isfile(path)


def _listdir(folder: str) -> List[str]:
  if storage.is_url(folder):
    return sorted(p.name for p in storage.as_epath(folder).iterdir())
  return os.listdir(folder)


def _open_safetensors(path: str):
  if storage.is_url(path):
    return RangeSafetensors(path)
  return safe_open(path, framework="numpy")


def _require_dir(path: str) -> str:
  path = os.fspath(path)
  if storage.is_url(path):
    if not _isfile(_join(path, CONFIG_NAME)):
      raise CheckpointError(f"{_join(path, CONFIG_NAME)}: missing; an HF "
                            "checkpoint folder needs config.json")
    return path.rstrip("/")
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: no such checkpoint directory")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a directory (expected an HF checkpoint "
                          "directory with config.json and *.safetensors)")
  return path


def read_hf_config_dict(path: str) -> Dict[str, Any]:
  """The parsed `config.json` of checkpoint directory `path`."""
  path = _require_dir(path)
  cfg_path = _join(path, CONFIG_NAME)
  if not _isfile(cfg_path):
    raise CheckpointError(f"{cfg_path}: missing; an HF checkpoint directory "
                          "needs config.json")
  try:
    hf = json.loads(storage.read_text(cfg_path))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{cfg_path}: cannot parse JSON: {e}") from e
  if not isinstance(hf, dict):
    raise CheckpointError(f"{cfg_path}: expected a JSON object")
  return hf


def load_hf_config(path: str,
                   config_overrides: Optional[Mapping[str, Any]] = None
                   ) -> LlamaConfig:
  """LlamaConfig from `path/config.json`, with `config_overrides` applied."""
  hf = read_hf_config_dict(path)
  cfg_path = _join(path, CONFIG_NAME)
  if hf.get("quantization_config"):
    raise CheckpointError(f"{cfg_path}: quantized checkpoints "
                          f"({hf['quantization_config'].get('quant_method')}) "
                          "are not supported")
  overrides = check_overrides(config_overrides)
  try:
    return LlamaConfig.from_hf_config(hf, **overrides)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    msg = str(e)
    if msg.startswith(CONFIG_NAME + ": "):
      msg = msg[len(CONFIG_NAME) + 2:]
    raise CheckpointError(f"{cfg_path}: {msg}") from e


class SafetensorsSource(TensorSource):
  """All tensors of a checkpoint directory (single file or index + shards).

  Opens every file up front (headers are validated there, so a truncated file
  fails before anything is loaded); use as a context manager to close them.
  """

  def __init__(self, path: str):
    self.path = _require_dir(path)
    index_path = _join(self.path, INDEX_NAME)
    single = _join(self.path, SINGLE_FILE)
    self._where: Dict[str, str] = {}
    if _isfile(index_path):
      try:
        weight_map = json.loads(storage.read_text(index_path))["weight_map"]
        if not isinstance(weight_map, dict):
          raise TypeError("weight_map is not an object")
      except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError,
              TypeError) as e:
        raise CheckpointError(f"{index_path}: invalid index: "
                              f"{type(e).__name__}: {e}") from e
      files = sorted(set(weight_map.values()))
      for fname in files:
        if not _isfile(_join(self.path, fname)):
          raise CheckpointError(f"{index_path}: names shard {fname!r} which "
                                f"does not exist in {self.path}")
      self.describe_str = index_path
    elif _isfile(single):
      files = [SINGLE_FILE]
      weight_map = None
      self.describe_str = single
    else:
      found = sorted(f for f in _listdir(self.path)
                     if f.endswith(".safetensors"))
      raise CheckpointError(
          f"{self.path}: no {SINGLE_FILE} or {INDEX_NAME}"
          + (f" (found {found[:4]} without an index)" if found else
             " and no *.safetensors files"))
    self._handles = {}
    try:
      for fname in files:
        fpath = _join(self.path, fname)
        try:
          handle = _open_safetensors(fpath)
        except CheckpointError:
          raise
        except Exception as e:  # SafetensorError is not exported portably
          raise CheckpointError(f"{fpath}: corrupt or truncated safetensors "
                                f"file: {e}") from e
        self._handles[fname] = handle
        for name in handle.keys():
          if weight_map is not None and weight_map.get(name) != fname:
            continue  # stale/duplicate entry: the index is authoritative
          self._where[name] = fname
      if weight_map is not None:
        for name, fname in weight_map.items():
          if name not in self._where:
            raise CheckpointError(
                f"{_join(self.path, fname)}: tensor {name!r} listed in "
                f"{INDEX_NAME} is not in this shard")
    except BaseException:
      self.close()
      raise
    self._slices = {}

  def close(self):
    for h in getattr(self, "_handles", {}).values():
      try:
        h.__exit__(None, None, None)
      except Exception:
        pass
    self._handles = {}

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def describe(self) -> str:
    return self.describe_str

  def names(self) -> Sequence[str]:
    return list(self._where)

  def location(self, name: str) -> str:
    fname = self._where.get(name)
    return _join(self.path, fname) if fname else self.describe_str

  def _slice(self, name):
    return self._handles[self._where[name]].get_slice(name)

  def shape(self, name: str) -> Tuple[int, ...]:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: Index) -> np.ndarray:
    sl = self._slice(name)
    if any(s.step != 1 for s in index):
      return np.asarray(sl[tuple(slice(s.start, s.stop) for s in index)]
                        )[tuple(slice(None, None, s.step) for s in index)]
    if not index:  # 0-d
      return np.asarray(sl[...])
    return np.asarray(sl[index])


def load_hf_params(path: str, config: LlamaConfig,
                   param_shardings: ShardingsArg = None, *,
                   strict: bool = True):
  """Our param pytree from the safetensors of checkpoint directory `path`.

  param_shardings: None (default device), a pytree of `jax.sharding.Sharding`
    with the structure of `param_shapes(config)`, or a callable config -> such
    a pytree. Arrays are built directly in that layout.
  strict: unexpected extra tensors raise CheckpointError (else: a warning).
  """
  with SafetensorsSource(path) as source:
    return build_params(source, config, param_shardings, strict=strict)


# -- export -------------------------------------------------------------------

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: Union[int, str]) -> int:
  """Bytes in `size`: an int, or '500MB' / '2GB' (10^n) / '1GiB' (2^n)."""
  if isinstance(size, (int, np.integer)):
    if size <= 0:
      raise ValueError(f"max_shard_size must be > 0, got {size}")
    return int(size)
  m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(size))
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f"cannot parse max_shard_size={size!r} (e.g. '2GB', "
                     "'500MB', '1GiB' or an int number of bytes)")
  value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
  if value <= 0:
    raise ValueError(f"max_shard_size must be > 0, got {size!r}")
  return value


def save_hf_checkpoint(params, config: LlamaConfig, out_dir: str, *,
                       tokenizer=None, dtype: str = "float32",
                       max_shard_size: Union[int, str] = "5GB",
                       generation_config: bool = True) -> List[str]:
  """Writes an HF checkpoint that `AutoModelForCausalLM.from_pretrained` loads.

  Writes config.json, model.safetensors (or model-0000k-of-0000n.safetensors +
  model.safetensors.index.json when larger than `max_shard_size`),
  generation_config.json (if `generation_config` and bos/eos are known) and the
  tokenizer's files (if `tokenizer` is given). Tensors are stored in `dtype`
  ("float32" | "bfloat16" | "float16"). Sharded/multi-device params are pulled
  to the host one layer of one parameter at a time; one shard file is held in
  host memory at a time. Previous model*.safetensors / index files in
  `out_dir` are removed so they cannot shadow the new ones. In multi-process
  runs every process must call this (gathers are collective); only process 0
  writes. Returns the paths written.
  """
  if dtype not in ("float32", "bfloat16", "float16"):
    raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', got "
                     f"{dtype!r}")
  np_dtype = np.dtype(dtype_from_name(dtype))
  limit = parse_size(max_shard_size)
  tensors = list(iter_hf_tensors(params, config))  # validates params (lazy data)

  # Plan shards from shapes alone, so names are known before any data moves.
  shards: List[List[Any]] = [[]]
  size = 0
  for t in tensors:
    nbytes = int(np.prod(t.shape)) * np_dtype.itemsize
    if shards[-1] and size + nbytes > limit:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  n = len(shards)
  names = ([SINGLE_FILE] if n == 1 else
           [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])

  writer = jax.process_index() == 0
  written: List[str] = []
  if writer:
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
      if f in (SINGLE_FILE, INDEX_NAME) or _SHARD_RE.match(f):
        os.remove(os.path.join(out_dir, f))
    hf = config.to_hf_config(dtype=dtype)
    written.append(_write_json(os.path.join(out_dir, CONFIG_NAME), hf))

  weight_map: Dict[str, str] = {}
  total = 0
  for fname, shard in zip(names, shards):
    arrays = {}
    for t in shard:
      host = np.ascontiguousarray(np.asarray(t.fetch()).astype(np_dtype))
      if host.shape != t.shape:
        raise ValueError(f"{t.name}: got shape {host.shape}, expected {t.shape}")
      arrays[t.name] = host
      weight_map[t.name] = fname
      total += host.nbytes
    if writer:
      fpath = os.path.join(out_dir, fname)
      save_file(arrays, fpath, metadata={"format": "pt"})
      written.append(fpath)
    del arrays
  if writer and n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": dict(sorted(weight_map.items()))}
    written.append(_write_json(os.path.join(out_dir, INDEX_NAME), index))
  if writer and generation_config and (config.bos_token_id is not None or
                                       config.eos_token_id is not None):
    gen = {"_from_model_config": True}
    if config.bos_token_id is not None:
      gen["bos_token_id"] = config.bos_token_id
    if config.eos_token_id is not None:
      gen["eos_token_id"] = config.eos_token_id
    written.append(_write_json(os.path.join(out_dir, "generation_config.json"),
                               gen))
  if writer and tokenizer is not None:
    written.extend(os.fspath(p) for p in tokenizer.save_pretrained(out_dir))
  return written


def _write_json(path: str, obj) -> str:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")
  os.replace(tmp, path)
  return path
