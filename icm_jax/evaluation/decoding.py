"""Reading predictions from label log-probs: group-consistent decoding, AUC.

Thresholding each claim's log-odds at 0 hides the signal of a biased model: a
model that ranks the right claim of every pair higher but prefers " False"
overall answers all-False. Group-consistent decoding instead picks, per
consistency group, the consistent assignment with the highest summed log-prob
(the rules the search enforces in `search.consistency`, which the tests use
as the brute-force reference; this module does not import the search):
  none:        each claim on its own (the thresholded prediction);
  keyed:       one key's claims True and the rest False, or all False;
  comparative: claims of different keys differ, so with two keys exactly one
               key's claims are True (for a pair asked both ways: the claim
               with the larger log-odds is True); a group with one key is
               all True or all False; three keys cannot be consistent and
               raise ValueError.
Each option's sum is linear in the claims, so a group costs O(size), not
O(2^size).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

KINDS = ("none", "keyed", "comparative")


def group_consistent_labels(log_p_false, log_p_true, groups: Sequence[str],
                            keys: Sequence[Optional[str]], kind: str
                            ) -> np.ndarray:
  """[N] 0/1: per group, the consistent assignment of highest sum log-prob.

  Ties go to the option listed first: "all False" (keyed), then keys in order
  of first appearance in the group.
  """
  log_p_false = np.asarray(log_p_false, np.float64).ravel()
  log_p_true = np.asarray(log_p_true, np.float64).ravel()
  if not len(log_p_false) == len(log_p_true) == len(groups):
    raise ValueError(f"{len(log_p_false)} log_p_false, {len(log_p_true)} "
                     f"log_p_true and {len(groups)} groups differ in length")
  if kind not in KINDS:
    raise ValueError(f"consistency kind {kind!r} not in {KINDS}")
  if kind == "none":
    return (log_p_true > log_p_false).astype(np.int64)
  missing = [n for n, k in enumerate(keys) if k is None]
  if missing:
    raise ValueError(f"consistency kind {kind!r} needs a key for every "
                     f"example; examples {missing[:10]} have none")
  group, key = _dense(groups), _dense(keys)
  labels = np.zeros(len(groups), np.int64)
  gain = log_p_true - log_p_false  # switching a claim from False to True
  for g in np.unique(group):
    members = np.flatnonzero(group == g)
    member_keys = key[members]
    # Keys in order of first appearance in the group.
    _, first = np.unique(member_keys, return_index=True)
    ordered = member_keys[np.sort(first)]
    totals = np.array([gain[members[member_keys == k]].sum() for k in ordered])
    if kind == "comparative" and len(ordered) > 2:
      raise ValueError(f"comparative group {groups[members[0]]!r} has "
                       f"{len(ordered)} keys; no labelling of it is consistent")
    if kind == "comparative" and len(ordered) == 1:
      labels[members] = int(totals[0] > 0)
      continue
    best = int(np.argmax(totals))
    if kind == "keyed" and totals[best] <= 0:
      continue  # all False scores at least as high
    labels[members[member_keys == ordered[best]]] = 1
  return labels


def _dense(names) -> np.ndarray:
  ids = {}
  return np.array([ids.setdefault(n, len(ids)) for n in names], np.int64)


def roc_auc(scores, gold) -> Optional[float]:
  """Area under the ROC curve of `scores` for 0/1 `gold` (ties count 1/2);
  None when gold holds one class only."""
  scores = np.asarray(scores, np.float64).ravel()
  gold = np.asarray(gold).ravel().astype(np.int64)
  positives, negatives = scores[gold == 1], scores[gold == 0]
  if not len(positives) or not len(negatives):
    return None
  # Mann-Whitney U from mid-ranks (ties get their average rank).
  order = np.argsort(scores, kind="mergesort")
  ranks = np.empty(len(scores), np.float64)
  sorted_scores = scores[order]
  start = 0
  while start < len(scores):
    end = start
    while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
      end += 1
    ranks[order[start:end + 1]] = (start + end) / 2 + 1
    start = end + 1
  u = ranks[gold == 1].sum() - len(positives) * (len(positives) + 1) / 2
  return float(u / (len(positives) * len(negatives)))


__all__ = ["group_consistent_labels", "roc_auc"]
