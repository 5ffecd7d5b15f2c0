"""ICM search (Algorithms 1 and 2) against a planted scorer and naive references."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from icm_jax.search import (Consistency, ICMSearch, SearchConfig, SearchError,
                            split_into_batches)
from icm_jax.search.consistency import KINDS

sys.path.insert(0, os.path.dirname(__file__))
from planted import PlantedScorer  # noqa: E402


def naive_inconsistent_pairs(groups, keys, labels, kind):
  """Official `pick_two_inconsistent_claims`, transcribed as a plain loop."""
  out = set()
  n = len(groups)
  for i in range(n):
    for j in range(i + 1, n):
      if groups[i] != groups[j] or labels[i] < 0 or labels[j] < 0:
        continue
      if kind == "none":
        continue
      if keys[i] != keys[j]:
        if labels[i] == labels[j] == 1 or (
            kind == "comparative" and labels[i] == labels[j] == 0):
          out.add((i, j))
      elif labels[i] != labels[j]:
        out.add((i, j))
  return out


def random_structure(rng, n, kind):
  groups = [f"g{rng.integers(0, n // 3 + 1)}" for _ in range(n)]
  keys = [None if kind == "none" else f"k{rng.integers(0, 3)}"
          for _ in range(n)]
  return groups, keys


@pytest.mark.parametrize("kind", KINDS)
def test_inconsistency_matches_naive_pairs(kind):
  rng = np.random.default_rng(0)
  for trial in range(20):
    n = int(rng.integers(2, 40))
    groups, keys = random_structure(rng, n, kind)
    cons = Consistency.build(groups, keys, kind)
    labels = rng.integers(-1, 2, size=(5, n)).astype(np.int8)
    counts = cons.count(labels)
    for c in range(5):
      want = naive_inconsistent_pairs(groups, keys, labels[c], kind)
      got = {tuple(p) for p in cons.pairs(labels[c]).tolist()}
      assert got == want, (trial, c)
      assert counts[c] == len(want)


@pytest.mark.parametrize("kind", ["keyed", "comparative"])
def test_fix_options_make_the_pair_consistent(kind):
  rng = np.random.default_rng(1)
  groups, keys = random_structure(rng, 30, kind)
  cons = Consistency.build(groups, keys, kind)
  for _ in range(20):
    labels = rng.integers(0, 2, 30).astype(np.int8)
    for i, j in cons.pairs(labels):
      options = cons.options(i, j)
      for yi, yj in options:
        trial = labels.copy()
        trial[i], trial[j] = yi, yj
        assert (i, j) not in naive_inconsistent_pairs(groups, keys, trial, kind)
      # and every consistent option is offered
      offered = {tuple(o) for o in options.tolist()}
      for yi in (0, 1):
        for yj in (0, 1):
          trial = labels.copy()
          trial[i], trial[j] = yi, yj
          ok = (i, j) not in naive_inconsistent_pairs(groups, keys, trial, kind)
          assert ok == ((yi, yj) in offered)


def test_builtin_rules():
  # GSM8K-like: key = final answer. Two solutions with the same answer must
  # agree; different answers cannot both be right, but can both be wrong.
  cons = Consistency.build(["q"] * 3, ["12", "12", "7"], "keyed")
  assert cons.count(np.array([1, 1, 0])) == 0
  assert cons.count(np.array([0, 0, 0])) == 0
  assert cons.count(np.array([1, 0, 0])) == 1   # same answer, different labels
  assert cons.count(np.array([1, 1, 1])) == 2   # 12 and 7 both right
  # Alpaca-like pair: exactly one of A>B / B>A holds.
  cons = Consistency.build(["p", "p"], ["A>B", "B>A"], "comparative")
  assert cons.count(np.array([[1, 0], [0, 1], [1, 1], [0, 0]])).tolist() == \
      [0, 0, 1, 1]
  # TruthfulQA default: no key-based consistency at all.
  cons = Consistency.build(["q"] * 4, [None] * 4, "none")
  assert cons.count(np.array([1, 1, 0, 1])) == 0
  # Other groups never interact.
  cons = Consistency.build(["a", "b"], ["A>B", "A>B"], "comparative")
  assert cons.count(np.array([1, 0])) == 0
  with pytest.raises(ValueError, match="needs a key"):
    Consistency.build(["a", "b"], ["x", None], "keyed")
  with pytest.raises(ValueError, match="kind"):
    Consistency.build(["a"], [None], "transitive")


def test_temperature_schedules():
  for schedule, expect in (
      ("log", lambda n, f: 10 / (1 + 2 * math.log(1 + f))),
      ("paper", lambda n, f: 10 / (1 + 0.99 * math.log(n))),
      ("exp", lambda n, f: 10 * 0.99 ** f)):
    cfg = SearchConfig(schedule=schedule)
    for n, f in ((1, 0), (5, 3), (100, 40), (3000, 2999)):
      assert cfg.temperature(n, f) == pytest.approx(max(0.01, expect(n, f)))
  assert SearchConfig(schedule="exp").temperature(10**6, 10**6) == 0.01


@pytest.mark.parametrize("bad", [dict(alpha=0), dict(schedule="linear"),
                                 dict(objective="x"), dict(initial_size=0),
                                 dict(max_iterations=1.5),
                                 dict(final_temperature=20.0),
                                 dict(consistency_fix_rounds=-1),
                                 dict(fix="greedy"),
                                 dict(fix_pairs_per_call=0),
                                 dict(alpha_rule="auto"),
                                 dict(calibration_steps=0)])
def test_bad_config_names_the_key(bad):
  key = next(iter(bad))
  with pytest.raises(ValueError, match=f"search.{key}"):
    SearchConfig(**bad)


# -- planted truth ------------------------------------------------------------

def pairs_task(seed, n=32):
  """Comparative pairs (A>B, B>A): exactly one claim of each pair is true."""
  rng = np.random.default_rng(100 + seed)
  first = rng.integers(0, 2, n // 2)
  truth = np.stack([first, 1 - first], 1).reshape(-1)
  groups = [str(k // 2) for k in range(n)]
  keys = ["A>B" if k % 2 == 0 else "B>A" for k in range(n)]
  return truth, groups, keys


def claims_task(seed, n=48):
  """Groups of 4 independent claims (TruthfulQA-like), no consistency keys."""
  rng = np.random.default_rng(200 + seed)
  return rng.integers(0, 2, n), [str(k // 4) for k in range(n)], [None] * n


def test_planted_truth_is_recovered():
  accuracies = []
  for seed in range(10):
    truth, groups, keys = claims_task(seed)
    scorer = PlantedScorer(truth, noise=0.6, seed=seed)
    result = ICMSearch(scorer, Consistency.build(groups, keys, "none"),
                       SearchConfig(seed=seed, max_iterations=500)
                       ).run(progress=False)
    assert (result.labels >= 0).all()
    accuracies.append((result.labels == truth).mean())
  # The Bayes-optimal reading of the planted scores given the true context:
  oracle = [(PlantedScorer(claims_task(s)[0], noise=0.6, seed=s)
             .s(claims_task(s)[0])[0] > 0).astype(int) == claims_task(s)[0]
            for s in range(10)]
  print("accuracy per seed", np.round(accuracies, 3),
        "oracle", np.round([o.mean() for o in oracle], 3))
  assert np.median(accuracies) >= 0.9
  assert sum(a >= 0.85 for a in accuracies) >= 8


def test_consistency_prevents_collapse_on_a_comparative_task():
  """Paper's ablation: without the consistency term the search collapses to
  one label more often (the planted model has a copy-the-majority bias)."""
  def run(kind, seed):
    truth, groups, keys = pairs_task(seed)
    scorer = PlantedScorer(truth, signal=0.8, herd=1.3, noise=0.6, seed=seed)
    result = ICMSearch(scorer, Consistency.build(groups, keys, kind),
                       SearchConfig(seed=seed, max_iterations=400)
                       ).run(progress=False)
    share = (result.labels == 1).mean()
    return (result.labels == truth).mean(), share >= 0.85 or share <= 0.15
  with_rule = [run("comparative", s) for s in range(20)]
  without = [run("none", s) for s in range(20)]
  collapsed_with = sum(c for _, c in with_rule)
  collapsed_without = sum(c for _, c in without)
  print("collapsed with / without consistency:", collapsed_with,
        collapsed_without)
  assert collapsed_without >= collapsed_with + 4
  assert sum(a >= 0.9 for a, _ in with_rule) >= 15


# -- reliability --------------------------------------------------------------

def small_search(seed=3, **overrides):
  truth, groups, keys = pairs_task(0, n=24)
  cfg = SearchConfig(**{"seed": seed, "max_iterations": 120,
                        "checkpoint_every": 7, **overrides})
  scorer = PlantedScorer(truth, signal=0.8, herd=0.5, noise=0.6, seed=0)
  return ICMSearch(scorer, Consistency.build(groups, keys, "comparative"),
                   cfg, ids=[f"ex{k}" for k in range(len(truth))])


def read(path):
  with open(path, "rb") as f:
    return f.read()


def test_same_seed_same_labels_bit_for_bit(tmp_path):
  a = small_search().run(str(tmp_path / "a"), progress=False)
  b = small_search().run(str(tmp_path / "b"), progress=False)
  c = small_search(seed=4).run(str(tmp_path / "c"), progress=False)
  assert np.array_equal(a.labels, b.labels)
  for name in ("labels.jsonl", "metrics.jsonl"):
    assert read(tmp_path / "a" / name) == read(tmp_path / "b" / name)
  assert read(tmp_path / "a" / "metrics.jsonl") != \
      read(tmp_path / "c" / "metrics.jsonl")


@pytest.mark.parametrize("iterations", [120, 3])
def test_outputs_are_well_formed(tmp_path, iterations):
  result = small_search(max_iterations=iterations).run(str(tmp_path),
                                                       progress=False)
  labels = [json.loads(l) for l in open(tmp_path / "labels.jsonl")]
  assert [r["id"] for r in labels] == [f"ex{k}" for k in range(24)]
  assert [r["label"] for r in labels] == [None if l < 0 else l
                                          for l in result.labels.tolist()]
  if iterations == 3:  # 8 seeds + at most 3 more: most examples unlabelled
    assert sum(r["label"] is None for r in labels) >= 13
  for r in labels:
    assert r["log_odds"] == pytest.approx(r["log_p_true"] - r["log_p_false"])
  metrics = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [m["iteration"] for m in metrics] == list(range(iterations + 1))
  for m in metrics:
    assert {"U", "P", "I", "T", "accepted", "labelled", "flips"} <= set(m)
    assert m["U"] == pytest.approx(50 * m["P"] - m["I"])
  assert metrics[-1]["flips"] == result.flips
  assert sum(m["accepted"] for m in metrics[1:]) == result.flips


RESUME_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from test_search import small_search
    kill_at = int(sys.argv[2])
    def hook(state):
      if state.iteration == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    small_search().run(sys.argv[1], progress=False,
                       after_iteration=hook if kill_at > 0 else None)
""")


def test_resume_after_kill_gives_the_uninterrupted_labels(tmp_path):
  script = tmp_path / "run.py"
  script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}

  def launch(workdir, kill_at):
    return subprocess.run([sys.executable, str(script), str(workdir),
                           str(kill_at)], env=env, capture_output=True,
                          text=True)
  full = launch(tmp_path / "full", 0)
  assert full.returncode == 0, full.stderr
  # Killed twice, mid-way between checkpoints (every 7 iterations).
  for kill_at in (40, 93):
    killed = launch(tmp_path / "resumed", kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = json.loads(read(tmp_path / "resumed" / "search_state.json"))
    assert state["iteration"] == kill_at // 7 * 7 and not state["done"]
  resumed = launch(tmp_path / "resumed", 0)
  assert resumed.returncode == 0, resumed.stderr
  # search_state.json holds the score cache too: a resumed run that dropped
  # it (or reordered it) ends with other rows in it.
  for name in ("labels.jsonl", "metrics.jsonl", "search_state.json"):
    assert read(tmp_path / "full" / name) == read(tmp_path / "resumed" / name)


def test_score_cache_changes_calls_not_decisions(tmp_path):
  """A scorer row is computed once: the same metrics, byte for byte, with
  the cache off, tiny (evictions) or default, and fewer scorer calls."""
  runs = {}
  for size in (0, 3, 64):
    search = small_search(score_cache=size)
    result = search.run(str(tmp_path / str(size)), progress=False)
    runs[size] = (result.score_calls,
                  read(tmp_path / str(size) / "metrics.jsonl"))
    state = json.loads(read(tmp_path / str(size) / "search_state.json"))
    assert len(state["score_cache"]) == (size if size < 20 else
                                         len(state["score_cache"]))
    assert 0 < len(state["score_cache"]) <= size or size == 0
  assert runs[0][1] == runs[3][1] == runs[64][1]
  print("scorer calls with cache 0 / 3 / 64:",
        [runs[k][0] for k in (0, 3, 64)])
  assert runs[64][0] < runs[3][0] <= runs[0][0]
  assert runs[64][0] <= 0.8 * runs[0][0]


def test_resume_refuses_a_different_config(tmp_path):
  small_search().run(str(tmp_path), progress=False)
  with pytest.raises(ValueError, match="search.alpha"):
    small_search(alpha=30.0).run(str(tmp_path), progress=False)
  # A longer run may continue a finished one.
  longer = small_search(max_iterations=150).run(str(tmp_path), progress=False)
  assert longer.iterations == 150


def test_non_finite_score_stops_the_run_naming_the_example():
  truth, groups, keys = pairs_task(0, n=16)
  scorer = PlantedScorer(truth, seed=0, nan_examples=[5])
  search = ICMSearch(scorer, Consistency.build(groups, keys, "comparative"),
                     SearchConfig(max_iterations=200),
                     ids=[f"ex{k}" for k in range(16)])
  with pytest.raises(SearchError, match=r"non-finite.*ex5"):
    search.run(progress=False)


def test_stops_when_converged():
  truth, groups, keys = claims_task(0, n=16)
  result = ICMSearch(PlantedScorer(truth, seed=0, context_noise=0.0),
                     Consistency.build(groups, keys, "none"),
                     SearchConfig(max_iterations=3000, stop_when_converged=True)
                     ).run(progress=False)
  assert (result.labels >= 0).all()
  assert result.iterations < 3000


def test_initial_seeds_are_balanced_and_consistent():
  truth, groups, keys = pairs_task(0, n=32)
  search = ICMSearch(PlantedScorer(truth, seed=0),
                     Consistency.build(groups, keys, "comparative"),
                     SearchConfig(initial_size=8, seed=11))
  st = search.initial_state()
  assert (st.labels >= 0).sum() == 8
  assert st.current.inconsistency == 0
  # seeds are whole groups (pairs)
  labelled_groups = {groups[k] for k in np.flatnonzero(st.labels >= 0)}
  assert len(labelled_groups) == 4


def test_split_into_batches_keeps_groups_whole():
  rng = np.random.default_rng(0)
  groups = [f"g{rng.integers(0, 60)}" for _ in range(500)]
  batches = split_into_batches(groups, 64, seed=0)
  flat = np.concatenate(batches)
  assert sorted(flat.tolist()) == list(range(500))
  assert all(len(b) <= 64 for b in batches)
  owner = {}
  for b, members in enumerate(batches):
    for k in members:
      assert owner.setdefault(groups[k], b) == b
  for members in batches:  # a group's members are adjacent in its batch
    names = [groups[k] for k in members]
    assert all(names.index(g) + names.count(g) - 1 ==
               len(names) - 1 - names[::-1].index(g) for g in set(names))
  again = split_into_batches(groups, 64, seed=0)
  assert all(np.array_equal(x, y) for x, y in zip(batches, again))
  with pytest.raises(ValueError, match="group 'big'"):
    split_into_batches(["big"] * 5, 4, seed=0)
