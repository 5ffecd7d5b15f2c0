"""P(D) forms against a claim-by-claim reference."""

import numpy as np
import pytest

from icm_jax.search.objective import OBJECTIVES, mutual_predictability


def reference(objective, labels, lf, lt):
  odds = {1: [], 0: []}
  total = 0.0
  for y, f, t in zip(labels, lf, lt):
    if y < 0:
      continue
    total += t if y == 1 else f
    odds[y].append((t - f) if y == 1 else (f - t))
  if objective == "sum_log_prob":
    return total
  everyone = odds[0] + odds[1]
  if objective == "mean_log_odds":
    return np.mean(everyone) if everyone else 0.0
  return 0.5 * sum(np.mean(v) if v else 0.0 for v in odds.values())


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_matches_reference(objective):
  rng = np.random.default_rng(0)
  labels = rng.integers(-1, 2, (20, 12))
  labels[0] = -1          # nothing labelled
  labels[1] = 1           # one class only
  lf = -rng.exponential(1.0, (20, 12)).astype(np.float32)
  lt = -rng.exponential(1.0, (20, 12)).astype(np.float32)
  got = mutual_predictability(objective, labels, lf, lt)
  want = [reference(objective, labels[c], lf[c], lt[c]) for c in range(20)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_class_balanced_halves_a_constant_labelling():
  # A copying model: with every demo False, every claim is confidently False.
  labels = np.zeros(8, int)
  lf, lt = np.full(8, -0.05), np.full(8, -3.0)
  mean = mutual_predictability("mean_log_odds", labels, lf, lt)
  balanced = mutual_predictability("class_balanced", labels, lf, lt)
  assert balanced == pytest.approx(mean / 2)
  with pytest.raises(ValueError, match="objective"):
    mutual_predictability("calibrated", labels, lf, lt)
