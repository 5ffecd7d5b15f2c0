"""Scalar TensorBoard event files, written without TensorFlow.

Runs log through absl and progress bars; this module adds files TensorBoard
can plot (search energy, accuracy, fine-tuning loss, ...). TensorFlow is a
multi-GB dependency we otherwise never need, and the `tensorboard` package is
only a viewer, so the on-disk format is written here by hand. It is small:

  * An event file is a TFRecord file: each record is
      uint64 length (little-endian) | uint32 masked_crc32c(length bytes)
      | payload | uint32 masked_crc32c(payload)
    with CRC32C the Castagnoli CRC and mask(c) = ((c >> 15 | c << 17)
    + 0xa282ead8) mod 2**32.
  * Each payload is a serialized `tensorflow.Event` protobuf. We emit only
      Event   { wall_time = 1 (double), step = 2 (int64),
                file_version = 3 (string), summary = 5 (Summary) }
      Summary { value = 1 (repeated Value) }
      Value   { tag = 1 (string), simple_value = 2 (float) }
    and encode them with the protobuf wire format (varints, fixed64/fixed32,
    length-delimited fields).
  * The first event of a file carries file_version "brain.Event:2".

Only local (or mounted, e.g. gcsfuse) paths are supported: URLs such as
gs://... are rejected instead of silently creating a local "gs:" folder.

Multi-host: make one writer per run with `enabled=(jax.process_index() == 0)`;
a disabled writer is a no-op that creates no file.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import socket
import struct
import time
from typing import Any, Mapping, Optional

FILE_VERSION = "brain.Event:2"

# Flush the buffered file after this many records or seconds, whichever first,
# so a running TensorBoard sees progress without a syscall per scalar.
_FLUSH_EVERY_RECORDS = 100
_FLUSH_EVERY_SECS = 10.0

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# Distinguishes files of several writers created in one second by one process.
_file_counter = itertools.count()

# --------------------------------------------------------------------------
# CRC32C (Castagnoli), reflected polynomial 0x82F63B78, table-driven.
# Pure Python is plenty fast for records of a few dozen bytes.


def _make_crc_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc32c(data: bytes) -> int:
  """CRC32C of `data` (crc32c(b"123456789") == 0xE3069283)."""
  crc = 0xFFFFFFFF
  table = _CRC_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: CRC32C rotated right by 15 plus a constant."""
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(payload: bytes) -> bytes:
  """One TFRecord: length, its masked CRC, payload, the payload's masked CRC."""
  header = struct.pack("<Q", len(payload))
  return (header + struct.pack("<I", masked_crc32c(header)) + payload +
          struct.pack("<I", masked_crc32c(payload)))


# --------------------------------------------------------------------------
# Protobuf wire format, just the pieces the Event message needs.

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  """Base-128 varint; negative int64 values as their 10-byte two's complement."""
  if value < 0:
    value += 1 << 64
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint((field << 3) | wire_type)


def _len_field(field: int, data: bytes) -> bytes:
  return _key(field, _LEN) + _varint(len(data)) + data


def encode_event(wall_time: float,
                 step: int,
                 *,
                 file_version: Optional[str] = None,
                 scalars: Optional[Mapping[str, float]] = None) -> bytes:
  """A serialized `Event` with a file_version or a summary of simple values.

  Fields are written in field-number order, as protobuf serializers do.
  """
  out = bytearray()
  out += _key(1, _FIXED64) + struct.pack("<d", wall_time)
  if step:  # proto3: the default 0 is omitted.
    out += _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _len_field(3, file_version.encode("utf-8"))
  if scalars:
    summary = bytearray()
    for tag, value in scalars.items():
      entry = (_len_field(1, tag.encode("utf-8")) +
               _key(2, _FIXED32) + struct.pack("<f", _to_float32(value)))
      summary += _len_field(1, entry)
    out += _len_field(5, bytes(summary))
  return bytes(out)


def _to_float32(value: float) -> float:
  """`value` as the nearest float32; beyond its range -> +-inf, not an error."""
  try:
    return struct.unpack("<f", struct.pack("<f", value))[0]
  except OverflowError:  # struct refuses finite values beyond float32's max.
    return math.copysign(math.inf, value)


def _as_float(tag: str, value: Any) -> float:
  """A Python float from a real number (bools, numpy/jax 0-d arrays too)."""
  if isinstance(value, numbers.Real):
    return float(value)
  shape = getattr(value, "shape", None)
  dtype = getattr(value, "dtype", None)
  if shape is not None and tuple(shape) == () and getattr(dtype, "kind",
                                                           "") in "biuf":
    return float(value)
  raise TypeError(f"TensorBoard scalar {tag!r}: value must be a real number, "
                  f"got {type(value).__name__} {value!r}")


def _check_tag(tag: Any) -> str:
  if not isinstance(tag, str) or not tag:
    raise TypeError(f"TensorBoard scalar tag must be a non-empty str, "
                    f"got {tag!r}")
  return tag


def _check_step(step: Any, tag: str) -> int:
  if isinstance(step, bool) or not isinstance(step, numbers.Integral):
    raise TypeError(f"TensorBoard scalar {tag!r}: step must be an int, "
                    f"got {type(step).__name__} {step!r}")
  step = int(step)
  if not _INT64_MIN <= step <= _INT64_MAX:
    raise ValueError(f"TensorBoard scalar {tag!r}: step {step} is outside "
                     "int64")
  return step


class EventWriter:
  """Scalars to `<logdir>/events.out.tfevents.<time>.<hostname>.<pid>.<n>`.

  Usage:
    with EventWriter(workdir + "/tb", enabled=jax.process_index() == 0) as w:
      w.scalar("search/energy", energy, step=it)
      w.scalars({"train/loss": loss, "train/lr": lr}, step=it)

  The file is created on construction (with the file_version event), so an
  empty run still shows up in TensorBoard's run list.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self.enabled = bool(enabled)
    self.path: Optional[str] = None
    self._file = None
    if not self.enabled:
      return
    logdir = os.fspath(logdir)
    if "://" in logdir:
      raise ValueError(
          f"EventWriter logdir {logdir!r}: URLs are not supported; write to a "
          "local or mounted (e.g. gcsfuse) directory")
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    name = (f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_file_counter)}")
    self.path = os.path.join(logdir, name)
    # "xb": never append to / clobber another writer's file.
    self._file = open(self.path, "xb")
    self._unflushed = 0
    self._last_flush = time.monotonic()
    self._write(encode_event(now, 0, file_version=FILE_VERSION))
    self.flush()

  def scalar(self,
             tag: str,
             value: float,
             step: int,
             wall_time: Optional[float] = None) -> None:
    """Logs one scalar; value is stored as float32 (NaN/inf as they are)."""
    if not self.enabled:
      return
    tag = _check_tag(tag)
    self._write_scalars({tag: _as_float(tag, value)}, _check_step(step, tag),
                        wall_time)

  def scalars(self, values: Mapping[str, float], step: int) -> None:
    """Logs several scalars of one step as one event (None is a TypeError)."""
    if not self.enabled:
      return
    checked = {}
    for tag, value in values.items():
      tag = _check_tag(tag)
      checked[tag] = _as_float(tag, value)
    if not checked:
      return
    self._write_scalars(checked, _check_step(step, next(iter(checked))), None)

  def flush(self) -> None:
    if self._file is None:
      return
    self._file.flush()
    self._unflushed = 0
    self._last_flush = time.monotonic()

  def close(self) -> None:
    """Flushes and closes the file; calling it again is a no-op."""
    if self._file is None:
      return
    self.flush()
    self._file.close()
    self._file = None

  def __enter__(self) -> EventWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _write_scalars(self, scalars: Mapping[str, float], step: int,
                     wall_time: Optional[float]) -> None:
    if self._file is None:
      raise ValueError(f"EventWriter for {self.path} is closed")
    if wall_time is None:
      wall_time = time.time()
    self._write(encode_event(float(wall_time), step, scalars=scalars))
    if (self._unflushed >= _FLUSH_EVERY_RECORDS or
        time.monotonic() - self._last_flush >= _FLUSH_EVERY_SECS):
      self.flush()

  def _write(self, payload: bytes) -> None:
    self._file.write(frame_record(payload))
    self._unflushed += 1
