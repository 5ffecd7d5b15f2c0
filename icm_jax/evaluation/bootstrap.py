"""The bootstrap + consistency baseline (Shrivastava, Qi, Canavan et al. 2025).

Round 0 labels every train claim zero-shot; each later round labels every
train claim many-shot, with the previous round's labels on the
demonstrations; after every round each consistency group is made consistent
by group-consistent decoding. No gold label is read.

A claim is never in its own context, nor is any claim of its group (its
swapped twin would hand it the answer): the train groups are split into two
folds, and a fold's claims are labelled with demonstrations drawn from the
other fold.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from icm_jax.evaluation.decoding import group_consistent_labels

# score(queries, demos, demo_labels) -> (log_p_false[Q], log_p_true[Q]);
# demos == [] means zero-shot. Indices are into the train examples.
ScoreFn = Callable[[List[int], List[int], List[int]],
                   Tuple[np.ndarray, np.ndarray]]
# demos_for(queries, candidates) -> the demonstrations used for `queries`,
# chosen from `candidates` (in order) without looking at labels.
DemoFn = Callable[[List[int], List[int]], List[int]]


def group_folds(groups: Sequence[str], seed: int) -> np.ndarray:
  """[N] fold 0/1 per claim; whole groups, half of the groups in each."""
  names = list(dict.fromkeys(groups))
  order = np.random.default_rng(seed).permutation(len(names))
  fold_of = {names[g]: int(rank % 2) for rank, g in enumerate(order)}
  return np.array([fold_of[g] for g in groups], np.int64)


def bootstrap_labels(score: ScoreFn, demos_for: DemoFn, groups: Sequence[str],
                     keys: Sequence[Optional[str]], kind: str, rounds: int,
                     seed: int = 0) -> List[np.ndarray]:
  """Labels after round 0 (zero-shot), 1, ..., `rounds`; each [N] 0/1.

  `seed` orders the folds' demonstration candidates and splits the folds.
  """
  if rounds < 0:
    raise ValueError(f"bootstrap rounds={rounds} must be >= 0")
  n = len(groups)
  everyone = list(range(n))
  lf, lt = score(everyone, [], [])
  labels = group_consistent_labels(lf, lt, groups, keys, kind)
  history = [labels]
  folds = group_folds(groups, seed)
  order = np.random.default_rng(seed + 1).permutation(n)
  members = [[i for i in everyone if folds[i] == f] for f in (0, 1)]
  candidates = [[int(i) for i in order if folds[i] == f] for f in (0, 1)]
  for _ in range(rounds):
    lf, lt = np.empty(n), np.empty(n)
    for f in (0, 1):
      queries = members[f]
      if not queries:
        continue
      demos = demos_for(queries, candidates[1 - f])
      lf[queries], lt[queries] = score(queries, demos,
                                       [int(labels[d]) for d in demos])
    labels = group_consistent_labels(lf, lt, groups, keys, kind)
    history.append(labels)
  return history


__all__ = ["bootstrap_labels", "group_folds"]
