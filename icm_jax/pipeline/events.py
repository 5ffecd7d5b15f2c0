"""TensorBoard scalars of a run (search U/P/I, fine-tuning loss, accuracy).

tensorboardX writes the event files (no TensorFlow); URLs (gs://) go
through icm_jax.storage like every other output.
Multi-host: one writer per run, `enabled` on process 0 only; a disabled
writer is a no-op that creates nothing.
"""

from __future__ import annotations

import numbers
from typing import Any, Mapping

from icm_jax import storage

# Seconds between flushes: a running TensorBoard sees progress without an
# upload per scalar on object stores.
_FLUSH_SECS = 10


def _as_float(tag: str, value: Any) -> float:
  """A float from a real number or a 0-d numpy/jax array; else TypeError."""
  if isinstance(value, numbers.Real):
    return float(value)
  if getattr(value, "shape", None) == () and getattr(
      getattr(value, "dtype", None), "kind", "") in "biuf":
    return float(value)
  raise TypeError(f"TensorBoard scalar {tag!r}: value must be a real number, "
                  f"got {type(value).__name__} {value!r}")


class _ObjectStoreRecordFile:
  """tensorboardX's record file on an object store, through icm_jax.storage
  (one path layer for every output; no append there, so each flush rewrites
  the object with everything so far)."""

  def __init__(self, path: str):
    self.path, self._data = path, bytearray()

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    storage.write_bytes(self.path, bytes(self._data))

  def close(self) -> None:
    self.flush()


class _ObjectStoreFactory:
  def open(self, path: str) -> _ObjectStoreRecordFile:
    return _ObjectStoreRecordFile(path)

  def directory_check(self, path: str) -> None:
    storage.makedirs(path)


def _route_urls_through_storage() -> None:
  from tensorboardX import record_writer
  for scheme in ("gs", "s3"):
    record_writer.register_writer_factory(scheme, _ObjectStoreFactory())


class EventWriter:
  """`scalar(tag, value, step)` / `scalars({tag: value}, step)` to `logdir`."""

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = bool(enabled)
    self._writer = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      _route_urls_through_storage()
      self._writer = SummaryWriter(logdir, flush_secs=_FLUSH_SECS)

  def scalar(self, tag: str, value: float, step: int) -> None:
    if self._writer is not None:
      self._writer.add_scalar(tag, _as_float(tag, value), int(step))

  def scalars(self, values: Mapping[str, float], step: int) -> None:
    for tag, value in values.items():
      self.scalar(tag, value, step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> "EventWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
