"""Models where users keep them, with no network: Hub ids through the HF
cache (downloaded from a local stand-in for the Hub by huggingface_hub's own
code, then loaded offline), gs:// folders (an in-memory object store), and
every failure as one line naming the id."""

import json
import os
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import torch

from fake_hub import FakeHub
from test_checkpoints import (TIED_MQA, last_dim_shardings, make_torch_model,
                              tiny_tokenizer, tree_allclose, write_tiny_gguf)
from conftest import llama_8b_stand_in
from test_cli import CLAIMS, icm_jax, write_jsonl
from test_storage import fake_gcs  # noqa: F401  (fixture)
from icm_jax import storage
from icm_jax.checkpoints import (CheckpointError, load_model,
                                 load_model_config, load_tokenizer, locate)
from icm_jax.checkpoints import remote

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "icm-test/tiny-llama"


def tiny_checkpoint(folder, seed):
  """A random tiny Llama in HF layout, with a tokenizer and a pickle
  (pytorch_model.bin) that must never be fetched."""
  model = make_torch_model(TIED_MQA, seed=seed)
  model.save_pretrained(folder)
  tiny_tokenizer(TIED_MQA["vocab_size"]).save_pretrained(folder)
  torch.save({"not": "loaded"}, os.path.join(folder, "pytorch_model.bin"))
  return str(folder)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
  root = tmp_path_factory.mktemp("hub")
  fake = FakeHub()
  folders = {"main": tiny_checkpoint(root / "main", 0),
             "v1": tiny_checkpoint(root / "v1", 1)}
  commits = {rev: fake.add(MODEL, path, rev) for rev, path in folders.items()}
  fake.add("icm-test/gated", folders["main"])
  fake.gated.add("icm-test/gated")
  bin_only = root / "bin_only"
  bin_only.mkdir()
  for name in os.listdir(folders["main"]):
    if not name.endswith(".safetensors"):
      (bin_only / name).write_bytes((root / "main" / name).read_bytes())
  fake.add("icm-test/bin-only", str(bin_only))
  yield fake, folders, commits
  fake.close()


def python(code, env, *args, timeout=300):
  """`code` in a fresh interpreter with `env` (HF_* settings are read when
  huggingface_hub is imported, as in a user's process); its last stdout line
  as JSON."""
  full = {k: v for k, v in os.environ.items()
          if not k.startswith("HF_") and k != "TRANSFORMERS_OFFLINE"}
  full.update(env, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  full.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code, *args], env=full,
                        text=True, capture_output=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


# For each [revision ("" = main), folder] of argv[1] (JSON): loads MODEL by
# id at that revision and the folder; prints, per pair, the largest
# parameter difference and both tokenizations of a text.
_COMPARE = f"""
import json, sys, jax, numpy as np
from icm_jax.checkpoints import load_model, locate
out = []
for revision, folder in json.loads(sys.argv[1]):
  by_id = load_model(locate({MODEL!r}, revision or None))
  by_path = load_model(folder)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(by_id.params),
                             jax.tree.leaves(by_path.params)))
  text = "w3 w4 w17 w5"
  out.append({{"diff": diff, "same_config": by_id.config == by_path.config,
              "tokens": [by_id.tokenizer(text)["input_ids"],
                         by_path.tokenizer(text)["input_ids"]]}})
print(json.dumps(out))
"""


def _compare(env, pairs):
  return python(_COMPARE, env, json.dumps(
      [[revision or "", folder] for revision, folder in pairs]))


def test_hub_id_loads_offline_from_the_cache_like_its_folder(hub, tmp_path):
  fake, folders, commits = hub
  cache = tmp_path / "hf_cache"
  snapshots = python(
      "import json; from icm_jax.checkpoints import locate; "
      f"print(json.dumps([locate({MODEL!r}, r) for r in (None, 'v1')]))",
      {"HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(cache)})
  for snapshot, revision in zip(snapshots, ("main", "v1")):
    # The hub's own layout: models--owner--name/snapshots/<commit>/.
    assert snapshot == str(cache / "models--icm-test--tiny-llama" /
                           "snapshots" / commits[revision])
    names = sorted(os.listdir(snapshot))
    assert "model.safetensors" in names and "config.json" in names
    assert not [n for n in names if n.endswith((".bin", ".pth"))], names
  served = [p for m, p in fake.requests if m == "GET" and "/resolve/" in p]
  assert not [p for p in served if p.endswith(".bin")]
  offline = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
             # An unreachable endpoint: offline must not even try it.
             "HF_ENDPOINT": "http://127.0.0.1:9"}
  main, v1, crossed = _compare(offline, [(None, folders["main"]),
                                         ("v1", folders["v1"]),
                                         ("v1", folders["main"])])
  for got in (main, v1):
    assert got["diff"] == 0.0 and got["same_config"], got
    assert got["tokens"][0] == got["tokens"][1]
  # model.revision picks the revision: main's and v1's weights differ.
  assert crossed["diff"] > 1e-3, crossed


def test_two_processes_share_one_cache_and_download_once(hub, tmp_path):
  fake, folders, _ = hub
  cache = tmp_path / "shared_cache"
  before = len(fake.requests)
  results, errors = [], []

  def one():
    try:
      results.extend(_compare({"HF_ENDPOINT": fake.url,
                               "HF_HUB_CACHE": str(cache)},
                              [(None, folders["main"])]))
    except AssertionError as e:
      errors.append(e)

  fake.delay_s = 3.0  # the weights take long enough for the two to overlap
  threads = [threading.Thread(target=one) for _ in range(2)]
  try:
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    fake.delay_s = 0.0
  assert not errors, errors
  assert [r["diff"] for r in results] == [0.0, 0.0]
  gets = [p for m, p in fake.requests[before:]
          if m == "GET" and "/resolve/" in p]
  # Each file crossed the network once: the second process waited for the
  # first and found the snapshot complete.
  assert len(gets) == len(set(gets)), gets


def test_checks_run_before_the_weights_download(hub, tmp_path):
  """--check_only on a Hub id fetches config and tokenizer, never weights:
  a Llama-3.1-8B-shaped repo (SmolLM2's tokenizer) whose weights file is
  junk passes every check."""
  fake, _, _ = hub
  repo = llama_8b_stand_in(tmp_path / "llama_8b")
  (repo / "model.safetensors").write_bytes(b"never fetched")
  fake.add("icm-test/llama-8b-shaped", str(repo))
  write_jsonl(tmp_path / "claims.jsonl", [{"claim": c} for c, _ in CLAIMS])
  before = len(fake.requests)
  proc = icm_jax("--config=custom", "--config.data.train=claims.jsonl",
                 "--config.stages=label",
                 "--config.model.path=icm-test/llama-8b-shaped",
                 "--config.search.initial_size=2", "--check_only",
                 "--workdir=runs/check", cwd=tmp_path, timeout=120,
                 env_extra={"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0",
                            "HF_ENDPOINT": fake.url,
                            "HF_HUB_CACHE": str(tmp_path / "cache")})
  assert proc.returncode == 0, proc.stderr[-3000:]
  fetched = [p for m, p in fake.requests[before:]
             if m == "GET" and "/resolve/" in p]
  assert any(p.endswith("/config.json") for p in fetched), fetched
  assert not [p for p in fetched if p.endswith(".safetensors")], fetched


# case -> (model.path, model.revision, offline, the error line's text)
_HUB_FAILURES = {
    "not cached while offline": (
        MODEL, "", True,
        "model.path='icm-test/tiny-llama': not in the HF cache"),
    "gated repo without a token": (
        "icm-test/gated", "", False, "model.path='icm-test/gated': a gated "
        "repo; accept its licence"),
    "unknown id": ("icm-test/no-such-model", "", False,
                   "model.path='icm-test/no-such-model': no such repo on the "
                   "Hub"),
    "no safetensors in the repo": (
        "icm-test/bin-only", "", False, "model.path='icm-test/bin-only': the "
        "repo has no *.safetensors weights"),
    "unknown revision": (
        MODEL, "v9", False, "model.path='icm-test/tiny-llama' (revision v9): "
        "the repo has no revision 'v9'"),
    "not a path and not an id": (
        "./no/such/folder", "", False, "model.path='./no/such/folder': no "
        "such file or directory, and not a Hub id"),
}


def _hub_env(fake, tmp_path, offline):
  return {"HF_HUB_OFFLINE": "1" if offline else "0",
          "TRANSFORMERS_OFFLINE": "1" if offline else "0",
          "HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "cache")}


@pytest.mark.parametrize("case", sorted(_HUB_FAILURES))
def test_hub_failure_is_one_line_naming_the_id(case, hub, tmp_path):
  fake, _, _ = hub
  model, revision, offline, message = _HUB_FAILURES[case]
  write_jsonl(tmp_path / "claims.jsonl", [{"claim": c} for c, _ in CLAIMS])
  proc = icm_jax("--config=custom", "--config.data.train=claims.jsonl",
                 "--config.stages=label", f"--config.model.path={model}",
                 f"--config.model.revision={revision}",
                 "--workdir=runs/bad", cwd=tmp_path, timeout=120,
                 env_extra=_hub_env(fake, tmp_path, offline))
  assert proc.returncode != 0
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert message in errors[0], errors[0]
  assert "Traceback" not in proc.stderr


# -- gs:// ---------------------------------------------------------------------


def test_gs_folder_loads_like_the_local_folder_reading_only_ranges(
    fake_gcs, tmp_path, monkeypatch):
  local = tiny_checkpoint(tmp_path / "ckpt", 0)
  storage.copy_tree(local, "gs://bucket/models/tiny")
  monkeypatch.setenv("ICM_JAX_CACHE", str(tmp_path / "icm_cache"))
  url = "gs://bucket/models/tiny"
  assert locate(url) == url
  assert load_model_config(url) == load_model_config(local)
  plain = load_model(local)
  config = plain.config
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 8),
                           ("l", "x"))
  fetched = []
  read_range = remote.read_range
  monkeypatch.setattr(remote, "read_range", lambda u, a, b: fetched.append(
      (u, a, b)) or read_range(u, a, b))
  from_gs = load_model(url, param_shardings=last_dim_shardings(config, mesh))
  tree_allclose(from_gs.params, plain.params)
  text = "w3 w9 w4"
  assert (from_gs.tokenizer(text)["input_ids"] ==
          plain.tokenizer(text)["input_ids"])
  # Every weight byte crossed once: each chip's rows, never the whole file
  # per chip (8 devices, the projections split 8 ways along their rows).
  weights = os.path.getsize(os.path.join(local, "model.safetensors"))
  got = sum(b - a for u, a, b in fetched if u.endswith(".safetensors"))
  assert 0 < got <= weights, (got, weights)
  # Only the tokenizer's files were staged, not the weights.
  staged = [n for _, _, files in os.walk(tmp_path / "icm_cache")
            for n in files]
  assert staged and not [n for n in staged if n.endswith(".safetensors")]


def test_gs_gguf_is_staged_once_and_reused(fake_gcs, tmp_path, monkeypatch):
  model = make_torch_model(TIED_MQA)
  write_tiny_gguf(str(tmp_path / "tiny.gguf"), model)
  with open(tmp_path / "tiny.gguf", "rb") as f:
    storage.write_bytes("gs://bucket/tiny.gguf", f.read())
  monkeypatch.setenv("ICM_JAX_CACHE", str(tmp_path / "icm_cache"))
  fetched = []
  stage_get = remote._fs

  def counting(url):
    fs, path = stage_get(url)
    fetched.append(url)
    return fs, path

  monkeypatch.setattr(remote, "_fs", counting)
  local = load_model(str(tmp_path / "tiny.gguf"), with_tokenizer=False)
  remote_model = load_model("gs://bucket/tiny.gguf", with_tokenizer=False)
  tree_allclose(remote_model.params, local.params)
  first = len(fetched)
  load_model_config("gs://bucket/tiny.gguf")
  assert len(fetched) - first == 1  # a size check; no second download


def test_gs_errors_name_the_object(fake_gcs, tmp_path):
  with pytest.raises(CheckpointError, match="gs://bucket/none/config.json: "
                     "missing"):
    load_model("gs://bucket/none")
  local = tiny_checkpoint(tmp_path / "ckpt", 0)
  storage.copy_tree(local, "gs://bucket/cut")
  with open(os.path.join(local, "model.safetensors"), "rb") as f:
    data = f.read()
  storage.write_bytes("gs://bucket/cut/model.safetensors", data[:-100])
  with pytest.raises(CheckpointError, match="gs://bucket/cut/model."
                     "safetensors: corrupt or truncated"):
    load_model("gs://bucket/cut", with_tokenizer=False)
