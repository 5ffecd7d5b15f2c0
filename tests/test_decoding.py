"""Group-consistent decoding, AUC, seed summaries and the bootstrap baseline
against independent references (brute force over assignments, pairwise
counts, a planted scorer)."""

import itertools

import numpy as np
import pytest

from icm_jax.evaluation import (bootstrap_labels, group_consistent_labels,
                                method_result, roc_auc, summarize)
from icm_jax.evaluation.bootstrap import group_folds
from icm_jax.search.consistency import Consistency


def brute_force(lf, lt, groups, keys, kind):
  """Per group: every 0/1 assignment the search's I(D) calls consistent,
  the one with the highest summed log-prob."""
  rule = Consistency.build(groups, keys, kind)
  out = np.zeros(len(groups), int)
  for g in dict.fromkeys(groups):
    members = [i for i, x in enumerate(groups) if x == g]
    best, best_total = None, -np.inf
    for bits in itertools.product((0, 1), repeat=len(members)):
      labels = np.full(len(groups), -1)
      labels[members] = bits
      if rule.count(labels):
        continue
      total = sum(lt[i] if b else lf[i] for i, b in zip(members, bits))
      if total > best_total:
        best, best_total = bits, total
    out[members] = best
  return out


@pytest.mark.parametrize("kind", ["none", "keyed", "comparative"])
@pytest.mark.parametrize("seed", range(6))
def test_group_consistent_decoding_matches_brute_force(kind, seed):
  rng = np.random.default_rng(seed)
  n = 40
  groups = [f"g{x}" for x in rng.integers(0, 9, n)]
  # Comparative groups hold at most two keys (three cannot be consistent).
  num_keys = 2 if kind == "comparative" else 3
  keys = [None if kind == "none" else f"k{x}"
          for x in rng.integers(0, num_keys, n)]
  # Log-probs of two words (not normalised to each other, as in the model).
  lf, lt = -rng.exponential(2.0, n), -rng.exponential(2.0, n)
  got = group_consistent_labels(lf, lt, groups, keys, kind)
  np.testing.assert_array_equal(got, brute_force(lf, lt, groups, keys, kind))
  if kind != "none":
    assert Consistency.build(groups, keys, kind).count(got) == 0


def test_comparative_pair_picks_the_larger_log_odds():
  # A biased model: both claims of each pair lean False, yet it ranks the
  # right one higher; thresholding says all-False, decoding recovers it.
  lf = np.array([-0.1, -0.2, -0.3, -0.05])
  lt = np.array([-2.0, -3.0, -4.0, -2.5])
  gold = np.array([1, 0, 0, 1])
  r = method_result("m", lf, lt, gold,
                    (["p", "p", "q", "q"], ["A>B", "B>A", "A>B", "B>A"],
                     "comparative"))
  assert r.accuracy == 0.5 and r.predicted_true_fraction == 0.0
  assert r.consistent_accuracy == 1.0


def test_decoding_errors():
  with pytest.raises(ValueError, match="needs a key"):
    group_consistent_labels([0, 0], [1, 1], ["a", "a"], ["x", None], "keyed")
  with pytest.raises(ValueError, match="differ in length"):
    group_consistent_labels([0], [1, 1], ["a", "a"], [None, None], "none")
  with pytest.raises(ValueError, match="group 'a' has 3 keys"):
    group_consistent_labels([0] * 3, [1] * 3, ["a"] * 3, ["x", "y", "z"],
                            "comparative")
  with pytest.raises(ValueError, match="kind"):
    group_consistent_labels([0], [1], ["a"], [None], "pairwise")


@pytest.mark.parametrize("seed", range(4))
def test_auc_equals_pairwise_count(seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, 30).astype(float)  # many ties
  gold = rng.integers(0, 2, 30)
  pos, neg = scores[gold == 1], scores[gold == 0]
  wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  assert roc_auc(scores, gold) == pytest.approx(wins / (len(pos) * len(neg)))
  assert roc_auc([1.0, 2.0], [1, 1]) is None


def test_summary_mean_and_sd_over_seeds():
  gold = np.array([1, 0, 1, 1])
  rows = [method_result("many_shot_icm", -s * gold, s * gold - 0.5, gold,
                        seed=k) for k, s in enumerate((1.0, -1.0, 1.0))]
  rows.append(method_result("zero_shot", [0] * 4, [1] * 4, gold))
  icm, zero = summarize(rows)
  assert icm.seeds == [0, 1, 2] and zero.seeds == [None]
  accuracies = [r.accuracy for r in rows[:3]]  # 1, 0, 1
  assert icm.mean["accuracy"] == pytest.approx(np.mean(accuracies))
  assert icm.sd["accuracy"] == pytest.approx(np.std(accuracies, ddof=1))
  assert zero.sd["accuracy"] == 0.0


def planted_scorer(planted, bias=1.0, weak=0.1, strong=2.0):
  """log-odds = -bias + (2y-1) * (weak + strong * agreement), where
  agreement = share of the demonstrations labelled as planted, minus 1/2
  (so wrong demonstrations push the other way)."""
  planted = np.asarray(planted)
  calls = []

  def score(queries, demos, demo_labels):
    calls.append((list(queries), list(demos)))
    agree = (np.mean(np.asarray(demo_labels) == planted[demos]) - 0.5
             if demos else 0.0)
    s = -bias + (2 * planted[queries] - 1) * (weak + strong * 2 * agree)
    lt = -np.logaddexp(0, -s)
    lf = -np.logaddexp(0, s)
    return lf, lt
  return score, calls


def test_bootstrap_converges_to_planted_labels():
  rng = np.random.default_rng(0)
  pairs = 20
  groups = [f"p{k}" for k in range(pairs) for _ in (0, 1)]
  keys = ["A>B", "B>A"] * pairs
  first = rng.integers(0, 2, pairs)
  planted = np.stack([first, 1 - first], 1).ravel()
  # Zero-shot is mostly wrong for a thresholding reader: noise swamps the
  # weak signal on most pairs.
  noise = rng.normal(0, 1.0, len(planted))
  score, calls = planted_scorer(planted)

  def noisy(queries, demos, demo_labels):
    lf, lt = score(queries, demos, demo_labels)
    return lf, lt + (0 if demos else noise[queries])

  history = bootstrap_labels(noisy, lambda q, c: c[:10], groups, keys,
                             "comparative", rounds=3, seed=1)
  assert len(history) == 4
  assert np.mean(history[0] == planted) < 0.9  # zero-shot is not enough
  np.testing.assert_array_equal(history[-1], planted)
  # Every round is consistent, and no claim saw its own pair in context.
  rule = Consistency.build(groups, keys, "comparative")
  assert all(rule.count(h) == 0 for h in history)
  for queries, demos in calls:
    assert not {groups[q] for q in queries} & {groups[d] for d in demos}


def test_group_folds_split_whole_groups():
  groups = [f"g{k // 3}" for k in range(30)]
  folds = group_folds(groups, seed=0)
  for g in set(groups):
    assert len({folds[i] for i, x in enumerate(groups) if x == g}) == 1
  assert abs(int(folds.sum()) - 15) <= 3
