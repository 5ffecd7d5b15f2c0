"""EventWriter's files, read back by the `tensorboard` package as reference.

The tensorboard package (a test-only dependency) has its own protobuf
definitions, TFRecord reader with CRC checks and CRC32C implementation, all
independent of icm_jax.tensorboard.
"""

from __future__ import annotations

import glob
import math
import os
import random
import struct

import numpy as np
import pytest

from icm_jax import tensorboard as tb

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")
from tensorboard.backend.event_processing import event_file_loader  # noqa: E402
from tensorboard.compat.proto import event_pb2  # noqa: E402
from tensorboard.compat.proto import summary_pb2  # noqa: E402
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # noqa: E402
from tensorboard.summary.writer import record_writer  # noqa: E402


def f32(x):
  return float(np.float32(x))


def only_event_file(logdir):
  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  assert len(files) == 1, files
  return files[0]


def raw_records(path):
  """Payloads via the stub reader, which raises DataLossError on a bad CRC."""
  reader = pywrap_tensorflow.PyRecordReader_New(path.encode(), 0, b"", None)
  out = []
  while True:
    try:
      reader.GetNext()
    except pywrap_tensorflow.errors.OutOfRangeError:
      return out
    out.append(reader.record())


# ---------------------------------------------------------------- CRC/framing


def test_crc32c_known_vectors():
  assert tb.crc32c(b"") == 0
  assert tb.crc32c(b"123456789") == 0xE3069283
  # RFC 3720 (iSCSI) B.4 vectors.
  assert tb.crc32c(bytes(32)) == 0x8A9136AA
  assert tb.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tb.crc32c(bytes(range(32))) == 0x46DD794E


def test_crc_and_framing_match_reference_on_random_payloads():
  rng = random.Random(0)
  for n in [0, 1, 7, 8, 100, 1000]:
    payload = bytes(rng.randrange(256) for _ in range(n))
    assert tb.crc32c(payload) == pywrap_tensorflow.crc32c(payload)
    assert tb.masked_crc32c(payload) == pywrap_tensorflow.masked_crc32c(payload)

    class Sink:
      data = b""

      def write(self, b):
        self.data += b

    sink = Sink()
    record_writer.RecordWriter(sink).write(payload)
    assert tb.frame_record(payload) == sink.data


def test_event_encoding_matches_reference_protobuf():
  ours = tb.encode_event(1234.5678, 42, scalars={"a/b": 0.1, "ü": -3e38})
  ref = event_pb2.Event(
      wall_time=1234.5678,
      step=42,
      summary=summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag="a/b", simple_value=0.1),
          summary_pb2.Summary.Value(tag="ü", simple_value=-3e38),
      ]))
  assert ours == ref.SerializeToString()

  for step in [-1, -(2**63), 2**63 - 1, 1, 127, 128, 300]:
    ours = tb.encode_event(1.5, step, file_version=tb.FILE_VERSION)
    ref = event_pb2.Event(wall_time=1.5, step=step,
                          file_version=tb.FILE_VERSION)
    assert ours == ref.SerializeToString(), step
    assert event_pb2.Event.FromString(ours).step == step


# ---------------------------------------------------------------- the writer


SCALARS = [
    # (tag, value, step)
    ("loss", 1.25, 0),
    ("loss", 0.1, 1),
    ("loss", -7.5, 2),
    ("loss", 3.4e38, 3),
    ("loss", 1e-30, 10**12),
    ("acc", 0.75, 5),
    ("acc", 1, 6),          # int
    ("acc", True, 7),       # bool -> 1.0
    ("acc", np.float32(0.3), 8),
    ("acc", np.int64(2), 9),
    ("énergie/Δ", -123456.789, 4),  # unicode tag
]


def test_scalars_read_back_by_event_accumulator(tmp_path):
  logdir = str(tmp_path / "tb")
  with tb.EventWriter(logdir) as writer:
    for tag, value, step in SCALARS:
      writer.scalar(tag, value, step)
    writer.scalars({"multi/a": 1.5, "multi/b": -2.0}, step=11)
    writer.scalars({"multi/a": 2.5, "multi/b": np.float64(-4.0)}, step=12)

  acc = event_accumulator.EventAccumulator(logdir)
  acc.Reload()
  expected = {}
  for tag, value, step in SCALARS:
    expected.setdefault(tag, []).append((step, f32(float(value))))
  expected["multi/a"] = [(11, 1.5), (12, 2.5)]
  expected["multi/b"] = [(11, -2.0), (12, -4.0)]
  assert sorted(acc.Tags()["scalars"]) == sorted(expected)
  for tag, points in expected.items():
    got = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert got == points, tag


def test_file_structure_checksums_and_wall_time(tmp_path):
  logdir = str(tmp_path)
  writer = tb.EventWriter(logdir)
  writer.scalar("x", 2.0, step=3, wall_time=1700000000.25)
  writer.scalar("y", math.nan, step=4)
  writer.scalar("z", -math.inf, step=5)
  writer.scalar("big", 1e300, step=6)  # beyond float32 -> inf
  writer.close()
  writer.close()  # idempotent

  path = only_event_file(logdir)
  name = os.path.basename(path).split(".")
  assert name[:3] == ["events", "out", "tfevents"]
  assert name[-2] == str(os.getpid())

  # The stub reader verifies both CRCs of every record.
  events = [event_pb2.Event.FromString(r) for r in raw_records(path)]
  assert events[0].file_version == "brain.Event:2"
  assert not events[0].HasField("summary")
  rest = [(e.step, e.summary.value[0].tag, e.summary.value[0].simple_value)
          for e in events[1:]]
  assert rest[0] == (3, "x", 2.0)
  assert events[1].wall_time == 1700000000.25
  assert rest[1][:2] == (4, "y") and math.isnan(rest[1][2])
  assert rest[2] == (5, "z", -math.inf)
  assert rest[3] == (6, "big", math.inf)

  # And the official loader yields the same number of events.
  loaded = list(event_file_loader.EventFileLoader(path).Load())
  assert len(loaded) == len(events) == 5


def test_corrupted_file_fails_reference_crc_check(tmp_path):
  with tb.EventWriter(str(tmp_path)) as writer:
    writer.scalar("x", 1.0, step=1)
  path = only_event_file(str(tmp_path))
  data = bytearray(open(path, "rb").read())
  data[-6] ^= 0x01  # a byte of the last payload
  with open(path, "wb") as f:
    f.write(data)
  with pytest.raises(pywrap_tensorflow.errors.DataLossError):
    raw_records(path)


def test_flush_makes_events_visible_before_close(tmp_path):
  writer = tb.EventWriter(str(tmp_path))
  writer.scalar("x", 1.0, step=1)
  writer.flush()
  path = only_event_file(str(tmp_path))
  assert len(raw_records(path)) == 2
  writer.close()


def test_two_writers_get_distinct_files(tmp_path):
  with tb.EventWriter(str(tmp_path)) as a, tb.EventWriter(str(tmp_path)) as b:
    a.scalar("x", 1.0, step=1)
    b.scalar("x", 2.0, step=1)
  assert len(glob.glob(str(tmp_path / "events.out.tfevents.*"))) == 2


def test_disabled_writer_is_a_noop(tmp_path):
  logdir = tmp_path / "not_created"
  with tb.EventWriter(str(logdir), enabled=False) as writer:
    writer.scalar("x", 1.0, step=1)
    writer.scalars({"y": 2.0}, step=1)
    writer.flush()
  assert not logdir.exists()
  assert writer.path is None


@pytest.mark.parametrize("value", [None, "1.0", 1 + 2j, [1.0], np.ones(2)])
def test_non_numeric_value_names_the_tag(tmp_path, value):
  with tb.EventWriter(str(tmp_path)) as writer:
    with pytest.raises(TypeError, match="my/tag"):
      writer.scalar("my/tag", value, step=1)
    with pytest.raises(TypeError, match="other/tag"):
      writer.scalars({"ok": 1.0, "other/tag": value}, step=1)
  # Nothing half-written: only the file_version event.
  assert len(raw_records(only_event_file(str(tmp_path)))) == 1


def test_bad_step_tag_and_logdir(tmp_path):
  with tb.EventWriter(str(tmp_path)) as writer:
    with pytest.raises(TypeError, match="'t'.*step"):
      writer.scalar("t", 1.0, step=1.5)
    with pytest.raises(ValueError, match="int64"):
      writer.scalar("t", 1.0, step=2**63)
    with pytest.raises(TypeError, match="tag"):
      writer.scalar(3, 1.0, step=1)
  with pytest.raises(ValueError, match="closed"):
    writer.scalar("t", 1.0, step=1)
  with pytest.raises(ValueError, match="gs://bucket/tb"):
    tb.EventWriter("gs://bucket/tb")


def test_periodic_flush(tmp_path, monkeypatch):
  monkeypatch.setattr(tb, "_FLUSH_EVERY_RECORDS", 3)
  monkeypatch.setattr(tb, "_FLUSH_EVERY_SECS", 1e9)
  writer = tb.EventWriter(str(tmp_path))
  path = only_event_file(str(tmp_path))
  for step in range(3):
    writer.scalar("x", float(step), step=step)
  # 3 records since the last flush -> flushed without flush()/close().
  assert len(raw_records(path)) == 4
  writer.close()


def test_float32_rounding_is_reported_exactly(tmp_path):
  values = [struct.unpack("<f", struct.pack("<f", v))[0]
            for v in (0.1, 1 / 3, 2.0**-149)]
  with tb.EventWriter(str(tmp_path)) as writer:
    for step, v in enumerate([0.1, 1 / 3, 2.0**-149]):
      writer.scalar("r", v, step=step)
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [e.value for e in acc.Scalars("r")] == values
