"""Our TensorBoard scalars, read back by tensorboard's own EventAccumulator
(its protobufs and TFRecord reader, independent of tensorboardX)."""

import numpy as np
import pytest

from icm_jax.pipeline.events import EventWriter

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")


def test_scalars_read_back_by_event_accumulator(tmp_path):
  logdir = str(tmp_path / "tb")
  with EventWriter(logdir) as writer:
    writer.scalar("search/U", 1.25, 0)
    writer.scalar("search/U", np.float32(-3.5), 7)
    writer.scalars({"train/loss": 0.5, "train/lr": np.float64(1e-5)}, 3)
    with pytest.raises(TypeError, match="train/bad"):
      writer.scalar("train/bad", "x", 1)
  acc = event_accumulator.EventAccumulator(logdir)
  acc.Reload()
  assert sorted(acc.Tags()["scalars"]) == ["search/U", "train/loss",
                                           "train/lr"]
  assert [(e.step, e.value) for e in acc.Scalars("search/U")] == [
      (0, 1.25), (7, -3.5)]
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(3, 0.5)]
  assert acc.Scalars("train/lr")[0].value == pytest.approx(1e-5, rel=1e-6)


def test_disabled_writer_creates_nothing(tmp_path):
  with EventWriter(str(tmp_path / "tb"), enabled=False) as writer:
    writer.scalar("a", 1.0, 0)
  assert not (tmp_path / "tb").exists()
