"""The bundled sentiment task: its files, its gold-free structure, its source."""

import hashlib
import json
import os
import re

import numpy as np
import pytest

from icm_jax.tasks import bundled_path, get_task, load_examples
from icm_jax.tasks.bundled import bundled_dir


def records(split):
  with open(bundled_path("sentiment", split)) as f:
    return json.load(f)


@pytest.mark.parametrize("split,n", [("train", 166), ("test", 84)])
def test_bundled_files_load_as_pairs_asked_both_ways(split, n):
  examples = load_examples(get_task("sentiment"), bundled_path("sentiment", split))
  assert len(examples) == n
  by_group = {}
  for e in examples:
    by_group.setdefault(e.group, []).append(e)
  for pair in by_group.values():
    a, b = pair
    assert {a.key, b.key} == {"A>B", "B>A"}
    assert a.gold + b.gold == 1  # exactly one order is right
  golds = [e.gold for e in examples]
  assert sum(golds) == n // 2


def test_train_and_test_share_no_word():
  words = {s: {r[f] for r in records(s) for f in ("word_a", "word_b")}
           for s in ("train", "test")}
  assert not words["train"] & words["test"]


@pytest.mark.parametrize("change", ["delete", "shuffle", "invert"])
def test_groups_and_keys_do_not_read_labels(change, tmp_path):
  """The consistency structure is identical with labels deleted, shuffled
  across records or inverted: it is gold-free by construction."""
  task = get_task("sentiment")
  original = records("train")
  rng = np.random.default_rng(0)
  altered = [dict(r) for r in original]
  if change == "delete":
    for r in altered:
      del r["label"]
  elif change == "shuffle":
    for r, label in zip(altered, rng.permutation([r["label"] for r in original])):
      r["label"] = int(label)
  else:
    for r in altered:
      r["label"] = 1 - r["label"]
  path = tmp_path / "train_sentiment.json"
  path.write_text(json.dumps(altered))
  before = load_examples(task, bundled_path("sentiment", "train"))
  after = load_examples(task, str(path))
  assert [(e.id, e.prompt, e.group, e.key) for e in before] == [
      (e.id, e.prompt, e.group, e.key) for e in after]
  if change == "delete":
    assert all(e.gold is None for e in after)


def test_source_md_hashes_match_the_files():
  text = open(os.path.join(bundled_dir("sentiment"), "SOURCE.md")).read()
  for split in ("train", "test"):
    name = f"{split}_sentiment.json"
    with open(bundled_path("sentiment", split), "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    assert re.search(rf"{name} \| {digest}", text), name
  assert "PDDL" in text and "textblob 0.20.1" in text


def test_build_script_reproduces_the_bundled_files(tmp_path):
  """The files are what the documented command writes (textblob installed)."""
  import importlib.util
  import subprocess
  import sys
  if importlib.util.find_spec("textblob") is None:  # lexicon only, no nltk
    pytest.skip("textblob is not installed")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, os.path.join(repo, "experiments",
                                               "build_sentiment_task.py"),
                  f"--out={tmp_path}"], check=True, capture_output=True)
  for split in ("train", "test"):
    with open(tmp_path / f"{split}_sentiment.json", "rb") as built, open(
        bundled_path("sentiment", split), "rb") as shipped:
      assert built.read() == shipped.read(), split
