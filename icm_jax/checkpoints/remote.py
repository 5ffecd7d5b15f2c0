"""Checkpoint folders in an object store (gs://bucket/models/llama-8b).

safetensors is a JSON header followed by raw little-endian tensors, so a
tensor slice is a byte range: `RangeSafetensors` reads the header with one
ranged read and each slice a host needs with another (through fsspec, which
gcsfs backs for gs://). A host of a pod thus fetches only the rows of the
tensors its own chips hold, and nothing is staged on its disk. The tokenizer
files (small; transformers reads them from a local folder) and .gguf files
(read through a memory map) are staged once into `staging_dir()`, with a
size line in the log, and reused while their size matches.
"""

from __future__ import annotations

import json
import hashlib
import math
import os
import struct
from typing import Dict, List, Optional, Tuple

from absl import logging
import ml_dtypes
import numpy as np

from icm_jax import storage
from icm_jax.checkpoints.common import CheckpointError

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
           "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
           "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _fs(url: str):
  import fsspec
  return fsspec.core.url_to_fs(url)


def read_range(url: str, start: int, stop: int) -> bytes:
  """Bytes [start, stop) of the object at `url`."""
  fs, path = _fs(url)
  data = fs.cat_file(path, start=start, end=stop)
  if len(data) != stop - start:
    raise CheckpointError(f"{url}: truncated: wanted bytes {start}..{stop}, "
                          f"got {len(data)}")
  return data


def size_of(url: str) -> int:
  fs, path = _fs(url)
  return int(fs.size(path))


class _RangeSlice:
  """`safe_open(...).get_slice(name)` for one tensor of a remote file."""

  def __init__(self, reader: "RangeSafetensors", name: str):
    self._reader, self._name = reader, name
    info = reader.header[name]
    self.dtype = np.dtype(_DTYPES[info["dtype"]])
    self.shape = tuple(int(d) for d in info["shape"])
    self.begin, self.end = (int(o) for o in info["data_offsets"])

  def get_shape(self) -> List[int]:
    return list(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    if index is Ellipsis or not self.shape:
      return self._rows(0, self.shape[0] if self.shape else 1).reshape(
          self.shape)
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    first = range(self.shape[0])[index[0]]
    start, stop = (first.start, first.stop) if len(first) else (0, 0)
    rows = self._rows(start, stop)
    return rows[(slice(None),) + tuple(index[1:])]

  def _rows(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of axis 0: one contiguous byte range. The last
    range read is kept, so the chips of a host that all hold the same rows
    (replicated, or split along another axis) fetch them once."""
    row = math.prod(self.shape[1:]) * self.dtype.itemsize
    key = (self._name, start, stop)
    cached = self._reader.last_read
    if cached is not None and cached[0] == key:
      data = cached[1]
    else:
      lo = self._reader.data_start + self.begin + start * row
      data = read_range(self._reader.url, lo, lo + (stop - start) * row)
      self._reader.last_read = (key, data)
    return np.frombuffer(data, self.dtype).reshape(
        (stop - start,) + self.shape[1:])


class RangeSafetensors:
  """A remote safetensors file, read by byte ranges (header validated on
  open, as safe_open does)."""

  def __init__(self, url: str):
    self.url = url
    total = size_of(url)
    if total < 8:
      raise CheckpointError(f"{url}: corrupt or truncated safetensors file "
                            f"({total} bytes)")
    (length,) = struct.unpack("<Q", read_range(url, 0, 8))
    if length > min(_MAX_HEADER, total - 8):
      raise CheckpointError(f"{url}: corrupt or truncated safetensors file "
                            f"(header of {length} bytes in {total})")
    try:
      header = json.loads(read_range(url, 8, 8 + length))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{url}: corrupt safetensors header: {e}"
                            ) from None
    header.pop("__metadata__", None)
    self.data_start = 8 + length
    for name, info in header.items():
      if info.get("dtype") not in _DTYPES:
        raise CheckpointError(f"{url}: tensor {name!r} has dtype "
                              f"{info.get('dtype')!r}, not one we read")
      begin, end = info["data_offsets"]
      want = math.prod(info["shape"]) * np.dtype(_DTYPES[info["dtype"]]
                                                   ).itemsize
      if end - begin != want or self.data_start + end > total:
        raise CheckpointError(f"{url}: corrupt or truncated safetensors "
                              f"file (tensor {name!r})")
    self.header: Dict[str, dict] = header
    self.last_read: Optional[Tuple[tuple, bytes]] = None

  def keys(self) -> List[str]:
    return list(self.header)

  def get_slice(self, name: str) -> _RangeSlice:
    return _RangeSlice(self, name)

  def __exit__(self, *exc):
    self.last_read = None


def staging_dir() -> str:
  """Where remote tokenizer files and .gguf files are staged:
  $ICM_JAX_CACHE, else ~/.cache/icm_jax."""
  return os.environ.get("ICM_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "icm_jax")


def stage(urls: List[str], label: str) -> str:
  """Local copies of `urls` (one folder), reused while each size matches;
  returns the folder. Files are written whole, then renamed into place."""
  folder = os.path.join(staging_dir(), "staged", hashlib.sha256(
      storage.dirname(urls[0]).encode()).hexdigest()[:16])
  os.makedirs(folder, exist_ok=True)
  for url in urls:
    local = os.path.join(folder, storage.basename(url))
    size = size_of(url)
    if os.path.isfile(local) and os.path.getsize(local) == size:
      continue
    logging.info("staging %s (%.1f MB) into %s", url, size / 1e6, folder)
    fs, path = _fs(url)
    tmp = local + ".incomplete"
    fs.get_file(path, tmp)
    if os.path.getsize(tmp) != size:
      raise CheckpointError(f"{url}: staged {os.path.getsize(tmp)} of "
                            f"{size} bytes ({label})")
    os.replace(tmp, local)
  return folder
