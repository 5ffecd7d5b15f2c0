"""One path layer for every run file: a gs:// workdir (an in-memory object
store standing in for GCS: no rename, no append) holds everything a local
one would, and nothing lands in a local folder called "gs:"."""

import json
import os

import pytest

from conftest import shipped_config, smollm2_gguf_path
from icm_jax import storage
from icm_jax.metrics_log import MetricsLog



@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """gs:// served from memory through fsspec (what epath uses for gs://);
  the real gcsfs is put back afterwards."""
  import fsspec
  from etils.epath import backend
  from fsspec.implementations.memory import MemoryFileSystem

  class FakeGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store, pseudo_dirs = {}, [""]

    def __init__(self, *args, finalize_on_close=None, **kwargs):
      super().__init__()

    def open(self, path, mode="rb", **kwargs):
      if "a" in mode:  # as on GCS
        raise NotImplementedError("object stores cannot append")
      return super().open(path, mode, **kwargs)

  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, FakeGCS, clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  monkeypatch.chdir(tmp_path)
  yield FakeGCS
  for name in ("gs", "gcs"):
    fsspec.register_implementation(name, "gcsfs.GCSFileSystem", clobber=True)
  backend.fsspec_backend._get_filesystem.cache_clear()
  assert not os.path.exists(tmp_path / "gs:")


def test_local_writes_are_atomic_and_found_at_any_depth(tmp_path):
  path = str(tmp_path / "a" / "b.json")
  storage.write_text(path, "one")
  storage.write_text(path, "two")
  assert open(path).read() == "two"
  assert os.listdir(tmp_path / "a") == ["b.json"]  # no temporary left
  storage.write_text(str(tmp_path / "a" / "c" / "d" / "b.json"), "x")
  assert storage.find(str(tmp_path), "b.json") == [
      path, str(tmp_path / "a" / "c" / "d" / "b.json")]


def test_metrics_log_resumes_on_an_object_store(fake_gcs):
  path = "gs://bucket/run/metrics.jsonl"
  log = MetricsLog(path)
  for i in range(5):
    log.write({"iteration": i, "U": float(i)})
  log.flush()
  assert [json.loads(l)["iteration"] for l in
          storage.read_text(path).splitlines()] == [0, 1, 2, 3, 4]
  log.close()
  resumed = MetricsLog(path, resume=2)  # the checkpoint was at iteration 2
  resumed.write({"iteration": 3, "U": -3.0})
  resumed.close()
  rows = [json.loads(l) for l in storage.read_text(path).splitlines()]
  assert [(r["iteration"], r["U"]) for r in rows] == [
      (0, 0.0), (1, 1.0), (2, 2.0), (3, -3.0)]


def test_unwritable_paths_are_refused_naming_them(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(storage.StorageError,
                     match=f"workdir {tmp_path}/file/run is not writable"):
    storage.check_writable(str(tmp_path / "file" / "run"))


@pytest.mark.skipif(smollm2_gguf_path() is None,
                    reason="the tiny config uses SmolLM2's tokenizer")
def test_a_gs_workdir_holds_every_output(fake_gcs):
  """Label and eval stages on gs://, then an eval-only rerun that reads the
  labels back from there (orbax's own gs:// support is not faked here)."""
  from icm_jax.pipeline import run
  config = shipped_config("tiny")
  config.stages = "label,eval"
  config.eval.methods = "zero_shot,many_shot_icm"
  config.search.max_iterations = 4
  config.data.max_test_examples = 8
  workdir = "gs://bucket/run"
  outputs = run(config, workdir)
  for name in ("labels", "report", "accuracy_plot", "trajectory_plot",
               "tensorboard"):
    assert outputs[name].startswith(workdir + "/"), (name, outputs[name])
  files = sorted(k for k in fake_gcs.store if k.startswith("/bucket/run/") or
                 k.startswith("bucket/run/") or k.startswith(workdir))
  names = {f.rsplit("/run/", 1)[1] for f in files}
  assert {"config.json", "label/labels.jsonl", "label/summary.json",
          "label/batch_000/metrics.jsonl", "label/batch_000/labels.jsonl",
          "label/batch_000/search_state.json", "report.json", "accuracy.png",
          "search_trajectory.png"} <= names, names
  assert any(n.startswith("tensorboard/events.out.tfevents.") for n in names)
  labels = [json.loads(l) for l in
            storage.read_text(outputs["labels"]).splitlines()]
  assert len(labels) == 16 and all("claim" in r for r in labels)
  assert storage.read_bytes(outputs["accuracy_plot"])[:4] == b"\x89PNG"
  report = json.loads(storage.read_text(outputs["report"]))
  config.stages = "eval"
  again = run(config, workdir)
  assert json.loads(storage.read_text(again["report"]))["results"] == (
      report["results"])
