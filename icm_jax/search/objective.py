"""P(D), mutual predictability, from the LOO label log-probs of assignments.

  mean_log_odds  (official code; alpha=50 is calibrated for it) the mean over
                 labelled claims of the assigned label's log-odds
                 log P(y) - log P(not y);
  sum_log_prob   (the paper's formula) the sum of log P(y_i | rest);
  class_balanced the mean log-odds within each assigned label, averaged over
                 the two labels (an absent label counts 0), so a constant
                 labelling earns at most half of what its claims' log-odds
                 would give under mean_log_odds.
"""

from __future__ import annotations

import numpy as np

OBJECTIVES = ("mean_log_odds", "sum_log_prob", "class_balanced")
UNLABELLED = -1


def mutual_predictability(objective: str, labels, log_p_false, log_p_true
                          ) -> np.ndarray:
  """P(D) per assignment: labels, log-probs [C, N] (or [N]) -> [C] (or [])."""
  if objective not in OBJECTIVES:
    raise ValueError(f"objective {objective!r} not in {OBJECTIVES}")
  labels = np.asarray(labels)
  # Log-odds in the scorer's dtype, sums in float64 (as the search always has).
  lf, lt = np.asarray(log_p_false), np.asarray(log_p_true)
  labelled = labels != UNLABELLED
  if objective == "sum_log_prob":
    chosen = np.where(labels == 1, lt, lf)
    return np.where(labelled, chosen, 0.0).sum(axis=-1, dtype=np.float64)
  odds = np.where(labels == 1, lt - lf, lf - lt)
  if objective == "mean_log_odds":
    return _masked_mean(odds, labelled)
  return 0.5 * (_masked_mean(odds, labels == 1) +
                _masked_mean(odds, labels == 0))


def _masked_mean(values, mask):
  count = mask.sum(axis=-1)
  total = np.where(mask, values, 0.0).sum(axis=-1, dtype=np.float64)
  return np.where(count > 0, total / np.maximum(count, 1), 0.0)


__all__ = ["OBJECTIVES", "mutual_predictability"]
