"""The search's decision rules against references that do not use its code.

Each test names the wrong search it catches: Algorithm 2 not as the official
code runs it (no forced first resolution, stopping at the first pair, applying
a worse option, > for >=), a wrong acceptance rule (always accept, 1 - exp),
a wrong objective (U = alpha·P + I), no-op steps counted as flips, and a search
that does not reach the brute-force optimum.
"""

import copy
import dataclasses
import json
import itertools
import os
import sys

import numpy as np
import pytest

from icm_jax.search import Consistency, ICMSearch, SearchConfig
from icm_jax.search.state import SearchState

sys.path.insert(0, os.path.dirname(__file__))
from planted import PlantedScorer, Scores  # noqa: E402
from test_search import naive_inconsistent_pairs  # noqa: E402


class FixedScorer:
  """Log-odds s_i(D) = fn(labels)[i]; log P(True) = s, log P(False) = 0.

  Exactly representable values make U exact (for the >= tie test); the search
  reads only log P(True) - log P(False) under the default objective.
  """

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, labels, queries=None):
    labels = np.atleast_2d(np.asarray(labels))
    if queries is None:
      queries = labels >= 0
    queries = np.broadcast_to(queries, labels.shape)
    s = np.stack([np.asarray(self.fn(row), np.float64) for row in labels])
    lt = np.where(queries, s, np.nan).astype(np.float32)
    lf = np.where(queries, 0.0, np.nan).astype(np.float32)
    return Scores(lf, lt)


def constant(values):
  values = np.asarray(values, np.float64)
  return FixedScorer(lambda labels: values)


def pairs_structure(num_pairs):
  groups = [str(k // 2) for k in range(2 * num_pairs)]
  keys = ["A>B" if k % 2 == 0 else "B>A" for k in range(2 * num_pairs)]
  return groups, keys


def naive_utility(scorer, labels, groups, keys, kind, alpha):
  """alpha · mean assigned log-odds − #inconsistent pairs, by plain loops."""
  scores = scorer(labels[None])
  s = (scores.log_p_true - scores.log_p_false)[0].astype(np.float64)
  odds = [s[i] if labels[i] == 1 else -s[i]
          for i in range(len(labels)) if labels[i] >= 0]
  p = float(np.mean(odds)) if odds else 0.0
  return alpha * p - len(naive_inconsistent_pairs(groups, keys, labels, kind))


def state_of(search, labels):
  labels = np.asarray(labels, np.int8)
  return SearchState(labels=labels.copy(),
                     current=search.evaluate(labels[None], "test")[0],
                     iteration=0, flips=0,
                     visited=np.zeros(len(labels), bool),
                     rng_state=np.random.default_rng(0).bit_generator.state)


# -- the objective -------------------------------------------------------------

@pytest.mark.parametrize("kind", ["keyed", "comparative"])
def test_utility_is_alpha_p_minus_inconsistency(kind):
  rng = np.random.default_rng(0)
  n = 10
  groups = [str(k // 3) for k in range(n)]
  keys = [f"k{rng.integers(0, 2)}" for _ in range(n)]
  scorer = PlantedScorer(rng.integers(0, 2, n), herd=0.7, seed=1)
  search = ICMSearch(scorer, Consistency.build(groups, keys, kind),
                     SearchConfig(alpha=3.0))
  labels = rng.integers(-1, 2, size=(40, n)).astype(np.int8)
  got = [e.utility for e in search.evaluate(labels, "test")]
  want = [naive_utility(scorer, l, groups, keys, kind, 3.0) for l in labels]
  assert max(len(naive_inconsistent_pairs(groups, keys, l, kind))
             for l in labels) > 0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# -- Algorithm 2 as the official code runs it ----------------------------------

def test_main_loop_fix_resolves_the_contradiction_even_when_u_drops():
  # Pair (0, 1) made (1, 1) by a proposal. Every example's log-odds is
  # positive, so the unfixed tentative set has the highest U of all; the
  # official fix (dummy current metric) still resolves the pair, with the
  # better of its options: (1, 0).
  groups, keys = pairs_structure(2)
  scorer = constant([3.0, 1.0, 2.0, 2.0])
  search = ICMSearch(scorer, Consistency.build(groups, keys, "comparative"),
                     SearchConfig(alpha=50.0, initial_size=2, fix="official"))
  tentative = np.array([1, 1, 1, 0], np.int8)
  options = np.array([[1, 0, 1, 0], [0, 1, 1, 0]], np.int8)
  u = [e.utility for e in search.evaluate(np.vstack([tentative, options]), "t")]
  assert u[0] > max(u[1:]) and u[1] > u[2]
  for seed in range(5):
    labels, evaluation = search.fix(tentative, None,
                                    np.random.default_rng(seed))
    assert labels.tolist() == [1, 0, 1, 0]
    assert evaluation.inconsistency == 0
    assert evaluation.utility == pytest.approx(u[1])


def three_bad_pairs_search(**overrides):
  # Pairs (0,1) and (2,3) are (1,1) with log-odds +5: resolving them costs
  # far more predictability than the 1 it saves. Pair (4,5) is (1,1) with
  # log-odds (+0.1, -5): setting (1, 0) gains. alpha = 1.
  groups, keys = pairs_structure(3)
  scorer = constant([5.0, 5.0, 5.0, 5.0, 0.1, -5.0])
  cfg = SearchConfig(**{"alpha": 1.0, "initial_size": 2, "fix": "official",
                        **overrides})
  return ICMSearch(scorer, Consistency.build(groups, keys, "comparative"), cfg)


@pytest.mark.parametrize("per_call", [1, 2, 3])
def test_fix_round_walks_every_inconsistent_pair(per_call):
  search = three_bad_pairs_search(fix_pairs_per_call=per_call)
  labels = np.ones(6, np.int8)
  baseline = search.evaluate(labels[None], "t")[0]
  walked_past = 0
  for seed in range(12):
    rng = np.random.default_rng(seed)
    order = search.consistency.pairs(labels)[
        np.random.default_rng(seed).permutation(3)]
    walked_past += order[0].tolist() != [4, 5]
    fixed, evaluation = search.fix(labels, baseline, rng)
    # Only the improving pair is resolved; the other two stay as they were
    # (their options lower U), whatever order the round walked them in.
    assert fixed.tolist() == [1, 1, 1, 1, 1, 0], seed
    assert evaluation.inconsistency == 2
    assert evaluation.utility > baseline.utility
  assert walked_past >= 6  # the improving pair was often not examined first


def test_fix_applies_an_option_that_ties_the_best_u():
  # Official `>=`: with alpha = 1 and log-odds 1 for both claims of a (1, 1)
  # pair, U(unfixed) = 1 - 1 = 0 = U of either option.
  groups, keys = pairs_structure(1)
  search = ICMSearch(constant([1.0, 1.0]),
                     Consistency.build(groups, keys, "comparative"),
                     SearchConfig(alpha=1.0, initial_size=2, fix="official"))
  labels = np.array([1, 1], np.int8)
  baseline = search.evaluate(labels[None], "t")[0]
  options = search.evaluate(np.array([[1, 0], [0, 1]], np.int8), "t")
  assert baseline.utility == options[0].utility == options[1].utility == 0.0
  fixed, evaluation = search.fix(labels, baseline, np.random.default_rng(0))
  assert fixed.tolist() == [1, 0] and evaluation.inconsistency == 0


def test_initialisation_fix_is_measured_against_the_seed_set():
  # The same three pairs as seeds: only the improving pair gets fixed.
  search = three_bad_pairs_search(initial_size=6)
  for seed in range(6):
    search.config = SearchConfig(alpha=1.0, initial_size=6, seed=seed,
                                 fix="official")
    st = search.initial_state()
    labels = st.labels
    assert (labels >= 0).all()
    assert st.current.utility >= search.evaluate(labels[None], "t")[0].utility
    seeded = ICMSearch(search.score_fn, search.consistency,
                       SearchConfig(alpha=1.0, initial_size=6, seed=seed,
                                    fix="official",
                                    consistency_fix_rounds=0)).initial_state()
    assert st.current.utility >= seeded.current.utility
    # An expensive pair seeded (1, 1) stays so (its options lower U); the
    # cheap pair ends (1, 0) if it was seeded inconsistent, else as seeded.
    for a in (0, 2):
      if seeded.labels[a] == seeded.labels[a + 1] == 1:
        assert labels[a:a + 2].tolist() == [1, 1]
    if seeded.labels[4] == seeded.labels[5]:
      assert labels[4:6].tolist() == [1, 0]
    else:
      assert labels[4:6].tolist() == seeded.labels[4:6].tolist()


def test_hard_fix_returns_the_best_consistent_completion():
  # Keyed group of four (GSM8K-like: keys = final answers), proposal holds
  # example 0 True; brute force over the other three.
  groups, keys = ["q"] * 4, ["12", "12", "7", "9"]
  rng = np.random.default_rng(3)
  scorer = PlantedScorer(rng.integers(0, 2, 4), herd=0.8, seed=3)
  cons = Consistency.build(groups, keys, "keyed")
  search = ICMSearch(scorer, cons, SearchConfig(alpha=5.0, fix="hard", initial_size=2))
  tentative = np.array([1, 0, 1, 1], np.int8)
  fixed, evaluation = search.fix(tentative, None, rng, keep=(0,))
  best, best_u = None, -np.inf
  for rest in itertools.product((0, 1), repeat=3):
    cand = np.array((1,) + rest, np.int8)
    if naive_inconsistent_pairs(groups, keys, cand, "keyed"):
      continue
    u = naive_utility(scorer, cand, groups, keys, "keyed", 5.0)
    if u > best_u:
      best, best_u = cand, u
  assert fixed.tolist() == best.tolist()
  assert evaluation.inconsistency == 0
  assert evaluation.utility == pytest.approx(best_u, abs=1e-4)


# -- Algorithm 1: acceptance and no-op steps ------------------------------------

def acceptance_search(a, b):
  """Three unkeyed claims, all labelled False: log-odds a everywhere while
  no claim is True, b once one is. Every step proposes True (a > 0) with
  Delta = U(one True) - U(all False) = 50 · (a - b/3), at T = T0 = 10."""
  scorer = FixedScorer(lambda labels: np.full(3, b if (labels == 1).any()
                                              else a))
  search = ICMSearch(scorer, Consistency.build(["0", "1", "2"], [None] * 3,
                                               "none"), SearchConfig(initial_size=2))
  return search, state_of(search, [0, 0, 0])


def test_a_worse_state_is_accepted_with_probability_exp_delta_over_t():
  target = 0.3
  a = 0.1
  b = 3 * (a - 10 * np.log(target) / 50)
  search, start = acceptance_search(a, b)
  draws, accepted = 4000, 0
  for k in range(draws):
    st = copy.deepcopy(start)
    record = search.step(st, np.random.default_rng(k))
    assert record["proposed"] and record["T"] == 10.0
    assert record["delta"] == pytest.approx(10 * np.log(target), rel=1e-4)
    accepted += record["accepted"]
    assert st.flips == int(record["accepted"])
  sd = np.sqrt(target * (1 - target) / draws)
  assert abs(accepted / draws - target) < 4 * sd, accepted / draws


@pytest.mark.parametrize("b", [0.0, 0.29])
def test_a_better_state_is_always_accepted(b):
  search, start = acceptance_search(0.1, b)
  for k in range(300):
    st = copy.deepcopy(start)
    record = search.step(st, np.random.default_rng(k))
    assert record["delta"] > 0 and record["accepted"], record
    assert (st.labels == 1).sum() == 1 and st.flips == 1


def test_a_step_fixed_back_to_the_current_labels_is_no_change():
  # Pairs (0,1) = (1,0) and (2,3) = (0,1). Example 0's log-odds is negative,
  # so drawing it proposes (0, 0); the forced fix's better option is (1, 0),
  # the current labelling. Every other example agrees with its label.
  groups, keys = pairs_structure(2)
  search = ICMSearch(constant([-0.5, -3.0, -3.0, 3.0]),
                     Consistency.build(groups, keys, "comparative"),
                     SearchConfig(stop_when_converged=True, initial_size=2,
                                  max_iterations=200, fix="official"))
  st = state_of(search, [1, 0, 0, 1])
  rng = np.random.default_rng(0)
  proposals = 0
  while not search.converged(st):
    record = search.step(st, rng)
    if record["proposed"]:
      proposals += 1
      assert record["no_change"] and not record["accepted"], record
    assert record["T"] == 10.0  # no flips, so the schedule never moves
  assert proposals >= 1
  assert st.flips == 0 and st.labels.tolist() == [1, 0, 0, 1]
  # Converged at the first pass over all four examples: a no-op never resets
  # the bookkeeping.
  assert st.iteration < 30


# -- whole searches ------------------------------------------------------------

def brute_force_optimum(scorer, groups, keys, kind, alpha, consistent_only):
  n = len(groups)
  every = np.array(list(itertools.product((0, 1), repeat=n)), np.int8)
  scores = scorer(every)
  s = (scores.log_p_true - scores.log_p_false).astype(np.float64)
  p = np.where(every == 1, s, -s).mean(axis=1)
  bad = np.array([len(naive_inconsistent_pairs(groups, keys, l, kind))
                  for l in every])
  u = alpha * p - bad
  if consistent_only:
    u = np.where(bad == 0, u, -np.inf)
  order = np.argsort(-u)
  return every[order[0]], u[order[0]], u[order[1]], bad[order[0]]


def keyed_groups_task():
  """Three GSM8K-like groups of four (keys = final answers)."""
  groups = [str(k // 4) for k in range(12)]
  keys = ["5", "5", "8", "3", "10", "2", "10", "4", "1", "6", "7", "6"]
  truth = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0])
  return groups, keys, truth


def comparative_pairs_task():
  groups, keys = pairs_structure(6)
  truth = np.array([1, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1])
  return groups, keys, truth


# Planted models with per-claim errors (noise) and a copy-the-majority bias
# (herd) where the optimum of U (for the hard fix: over consistent
# labellings) is unique by a margin, consistent, and neither the planted truth
# nor one label: (task, signal, herd, alpha, noise, scorer seed). Picked from
# a sweep of such scorers for an optimum ICM's proposals (the model's own
# predictions) can reach: a labelling that every prediction agrees with is a
# fixed point no search of this kind leaves, and the hard fix, which turns
# every proposal into a change, keeps more temperature (the log schedule
# cools per flip).
OPTIMUM_CASES = {
    ("keyed", "official"): (keyed_groups_task, 0.3, 0.3, 8.0, 1.2, 4),
    ("comparative", "official"): (comparative_pairs_task, 0.3, 0.3, 8.0, 1.8, 3),
    ("keyed", "hard"): (keyed_groups_task, 0.3, 0.8, 20.0, 1.2, 11),
    ("comparative", "hard"): (comparative_pairs_task, 0.3, 0.3, 50.0, 1.2, 8),
}


@pytest.mark.parametrize("kind,fix", sorted(OPTIMUM_CASES))
def test_search_reaches_the_brute_force_optimum(kind, fix):
  make_task, signal, herd, alpha, noise, seed = OPTIMUM_CASES[kind, fix]
  groups, keys, truth = make_task()
  scorer = PlantedScorer(truth, signal=signal, prior=0.4, herd=herd,
                         noise=noise, context_noise=0.05, seed=seed)
  best, best_u, second_u, best_bad = brute_force_optimum(
      scorer, groups, keys, kind, alpha, consistent_only=(fix == "hard"))
  assert best_u > second_u + 0.3 and best_bad == 0
  assert best.tolist() != truth.tolist()
  assert 0 < best.sum() < len(best)
  reached = []
  for search_seed in range(10):
    result = ICMSearch(scorer, Consistency.build(groups, keys, kind),
                       SearchConfig(alpha=alpha, fix=fix, seed=search_seed,
                                    max_iterations=400)).run(progress=False)
    reached.append(result.labels.tolist() == best.tolist())
  assert sum(reached) >= 8, reached


def biased_pairs(seed, n=24):
  """Comparative pairs with a strong one-label bias: without a working fix,
  'everything False' beats every consistent labelling at alpha = 50."""
  rng = np.random.default_rng(300 + seed)
  first = rng.integers(0, 2, n // 2)
  truth = np.stack([first, 1 - first], 1).reshape(-1)
  groups, keys = pairs_structure(n // 2)
  scorer = PlantedScorer(truth, signal=0.6, prior=0.3, herd=2.0, noise=0.5,
                         seed=seed)
  return scorer, Consistency.build(groups, keys, "comparative"), truth


@pytest.mark.parametrize("fix", [None, "official", "hard"])
def test_comparative_task_ends_consistent_at_the_papers_alpha(fix):
  # None: the defaults.
  for seed in range(5):
    scorer, cons, truth = biased_pairs(seed)
    everything_false = np.zeros(len(truth), np.int8)
    config = SearchConfig(seed=seed, max_iterations=300)
    if fix is not None:
      config = dataclasses.replace(config, fix=fix)
    search = ICMSearch(scorer, cons, config)
    consistent = np.stack([truth, 1 - truth]).astype(np.int8)
    u_false = search.evaluate(everything_false[None], "t")[0].utility
    assert u_false > max(e.utility for e in search.evaluate(consistent, "t"))
    result = search.run(progress=False)
    assert (result.labels >= 0).all()
    assert result.inconsistency == 0, seed
    assert cons.count(result.labels) == 0


def gsm8k_like(seed, groups_of_four=6):
  rng = np.random.default_rng(400 + seed)
  n = 4 * groups_of_four
  groups = [str(k // 4) for k in range(n)]
  keys = [f"{k // 4}:{rng.integers(0, 3)}" for k in range(n)]
  truth = np.zeros(n, np.int64)
  for g in range(groups_of_four):  # one key of each group is the right answer
    right = keys[4 * g + rng.integers(0, 4)]
    truth[4 * g:4 * g + 4] = [keys[4 * g + m] == right for m in range(4)]
  scorer = PlantedScorer(truth, signal=0.6, prior=0.3, herd=1.5, noise=0.6,
                         seed=seed)
  return scorer, Consistency.build(groups, keys, "keyed"), truth


def test_hard_fix_only_ever_holds_consistent_labels(tmp_path):
  for seed in range(3):
    scorer, cons, _ = gsm8k_like(seed)
    workdir = tmp_path / str(seed)
    result = ICMSearch(scorer, cons, SearchConfig(fix="hard", seed=seed,
                                                  max_iterations=150)
                       ).run(str(workdir), progress=False)
    metrics = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert [m["I"] for m in metrics] == [0] * len(metrics)
    assert sum(m["accepted"] for m in metrics[1:]) == result.flips > 0
    assert cons.count(result.labels) == 0


def test_pairs_per_call_changes_calls_not_decisions(tmp_path):
  scorer, cons, _ = gsm8k_like(0)
  runs = {}
  for per_call in (1, 4):
    search = ICMSearch(scorer, cons, SearchConfig(
        seed=5, max_iterations=120, fix="official",
        fix_pairs_per_call=per_call))
    runs[per_call] = search.run(str(tmp_path / str(per_call)), progress=False)
  one, four = runs[1], runs[4]
  assert np.array_equal(one.labels, four.labels)
  assert one.flips == four.flips and one.utility == four.utility
  assert four.score_calls < one.score_calls
  assert (open(tmp_path / "1" / "metrics.jsonl").read() ==
          open(tmp_path / "4" / "metrics.jsonl").read())


def test_hard_fix_refuses_a_group_too_large_to_enumerate():
  cons = Consistency.build(["g"] * 14, [str(k % 3) for k in range(14)], "keyed")
  with pytest.raises(ValueError, match="search.fix='hard'.*14"):
    ICMSearch(constant(np.zeros(14)), cons, SearchConfig(fix="hard"))
  ICMSearch(constant(np.zeros(14)), cons, SearchConfig(fix="official"))


# -- the label-free alpha rule (search.alpha_rule="step_spread") ---------------

@pytest.mark.parametrize("kind", ["comparative", "none"])
def test_step_spread_alpha_is_t0_over_the_median_step(kind):
  """alpha = T0 / median |Delta P| over one neighbour per consistency group,
  each recomputed here by plain loops from the scorer; U uses that alpha.
  Comparative: 7 pairs, the hard fix flips the twin too; none: 14 claims,
  each its own group, a neighbour is one flipped label."""
  n = 14
  if kind == "comparative":
    groups, keys = pairs_structure(n // 2)
  else:
    groups, keys = [str(k) for k in range(n)], [None] * n
  truth = np.tile([1, 0], n // 2)
  scorer = PlantedScorer(truth, signal=0.8, herd=0.5, noise=0.6, seed=2)
  num_groups = len(set(groups))
  cfg = SearchConfig(seed=4, initial_size=n, max_iterations=6,
                     alpha_rule="step_spread", calibration_steps=num_groups,
                     initial_temperature=7.0)
  result = ICMSearch(scorer, Consistency.build(groups, keys, kind),
                     cfg).run(progress=False)
  init = ICMSearch(scorer, Consistency.build(groups, keys, kind),
                   dataclasses.replace(cfg, alpha_rule="fixed")
                   ).initial_state().labels

  def p(labels):  # P(D) of a consistent labelling, by plain loops
    return naive_utility(scorer, labels, groups, keys, "none", 1.0)
  deltas = []
  for g in sorted(set(groups)):
    neighbour = init.copy()
    members = [k for k in range(n) if groups[k] == g]
    neighbour[members] = 1 - neighbour[members]
    deltas.append(abs(p(neighbour) - p(init)))
  expected = cfg.initial_temperature / np.median(deltas)
  assert result.alpha == pytest.approx(expected, rel=1e-4)
  assert result.alpha != pytest.approx(cfg.alpha)
  assert result.utility == pytest.approx(
      naive_utility(scorer, result.labels, groups, keys, kind, expected),
      rel=1e-4, abs=1e-4)


def test_step_spread_uses_at_most_calibration_steps_neighbours():
  """Each neighbour costs a U(D) call without the score cache: 3 asked for,
  3 scored (of 8 groups)."""
  groups, keys = pairs_structure(8)
  truth = np.tile([1, 0], 8)
  calls = {}
  for rule in ("fixed", "step_spread"):
    scorer = PlantedScorer(truth, seed=0)
    ICMSearch(scorer, Consistency.build(groups, keys, "comparative"),
              SearchConfig(seed=1, initial_size=16, max_iterations=1,
                           alpha_rule=rule, calibration_steps=3,
                           score_cache=0)
              ).initial_state()
    calls[rule] = scorer.calls
  assert calls["step_spread"] - calls["fixed"] == 3


def test_step_spread_alpha_is_kept_on_resume(tmp_path):
  """A resumed run scores with the checkpoint's alpha, so it writes the same
  metrics as one never interrupted (config.alpha would change every U)."""
  groups, keys = pairs_structure(8)
  truth = np.tile([1, 0], 8)

  def search(iterations):
    return ICMSearch(
        PlantedScorer(truth, signal=0.8, herd=0.5, noise=0.6, seed=1),
        Consistency.build(groups, keys, "comparative"),
        SearchConfig(seed=2, initial_size=16, max_iterations=iterations,
                     checkpoint_every=5, alpha_rule="step_spread"))
  full = search(30).run(str(tmp_path / "full"), progress=False)
  search(15).run(str(tmp_path / "resumed"), progress=False)
  state = json.loads((tmp_path / "resumed" / "search_state.json").read_text())
  assert state["alpha"] == pytest.approx(full.alpha, rel=1e-12)
  resumed = search(30).run(str(tmp_path / "resumed"), progress=False)
  assert resumed.alpha == full.alpha
  for name in ("labels.jsonl", "metrics.jsonl"):
    assert ((tmp_path / "full" / name).read_bytes()
            == (tmp_path / "resumed" / name).read_bytes())
  metrics = [json.loads(l) for l in
             (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
  assert metrics[0]["alpha"] == full.alpha
  for m in metrics:
    assert m["U"] == pytest.approx(full.alpha * m["P"] - m["I"], rel=1e-6)
