"""Logical consistency I(D) between labelled claims (paper Sec. 2.2).

Claims are compared only inside a consistency group (e.g. the answers to one
question). Within a group:
  * claims with different keys cannot both be True ("contradiction");
    in comparative tasks (A>B vs B>A) they also cannot both be False;
  * claims with the same key must carry the same label ("implication").
I(D) counts the inconsistent pairs among labelled claims. Every within-group
pair is enumerated once up front, so I(D) for C candidate assignments is a few
vectorised numpy ops over [C, pairs].
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

KINDS = ("none", "keyed", "comparative")

UNLABELLED = -1


@dataclasses.dataclass(frozen=True)
class Consistency:
  """Consistency structure of N examples: groups, keys and the rule kind.

  `pair_i`, `pair_j` list every within-group pair (i < j) of examples that
  have keys; `same_key` says whether the pair's keys agree.
  """

  kind: str
  group: np.ndarray     # [N] int group index
  key: np.ndarray       # [N] int key index within the whole batch, -1 = none
  pair_i: np.ndarray    # [P]
  pair_j: np.ndarray    # [P]
  same_key: np.ndarray  # [P] bool

  @classmethod
  def build(cls, groups: Sequence[str], keys: Sequence[Optional[str]],
            kind: str) -> "Consistency":
    """From per-example group names and keys (None when kind == "none")."""
    if kind not in KINDS:
      raise ValueError(f"consistency kind {kind!r} not in {KINDS}")
    if len(groups) != len(keys):
      raise ValueError(f"{len(groups)} groups but {len(keys)} keys")
    group = _index(groups)
    if kind == "none":
      key = np.full(len(groups), -1, np.int64)
    else:
      missing = [n for n, k in enumerate(keys) if k is None]
      if missing:
        raise ValueError(f"consistency kind {kind!r} needs a key for every "
                         f"example; examples {missing[:10]} have none")
      key = _index(keys)
    pair_i, pair_j = _within_group_pairs(group, key >= 0)
    return cls(kind, group, key, pair_i, pair_j, key[pair_i] == key[pair_j])

  @property
  def num_examples(self) -> int:
    return len(self.group)

  def inconsistent(self, labels: np.ndarray) -> np.ndarray:
    """[C, P] (or [P]) bool: which pairs are inconsistent under `labels`."""
    labels = np.asarray(labels)
    li, lj = labels[..., self.pair_i], labels[..., self.pair_j]
    both = (li != UNLABELLED) & (lj != UNLABELLED)
    implication = self.same_key & (li != lj)
    contradiction = ~self.same_key & (li == 1) & (lj == 1)
    if self.kind == "comparative":
      contradiction |= ~self.same_key & (li == 0) & (lj == 0)
    return both & (implication | contradiction)

  def count(self, labels: np.ndarray) -> np.ndarray:
    """I(D): number of inconsistent pairs, per assignment ([C] or scalar)."""
    return self.inconsistent(labels).sum(axis=-1)

  def pairs(self, labels: np.ndarray) -> np.ndarray:
    """[K, 2] example indices of the inconsistent pairs of one assignment."""
    bad = self.inconsistent(labels)
    return np.stack([self.pair_i[bad], self.pair_j[bad]], axis=1)

  def options(self, i: int, j: int) -> np.ndarray:
    """[O, 2] label pairs (y_i, y_j) that make the pair (i, j) consistent."""
    if self.key[i] == self.key[j]:
      return np.array([[0, 0], [1, 1]], np.int8)
    if self.kind == "comparative":
      return np.array([[1, 0], [0, 1]], np.int8)
    return np.array([[1, 0], [0, 1], [0, 0]], np.int8)

  def same_group(self, labelled: np.ndarray) -> np.ndarray:
    """[N] bool: example shares a group with some labelled example."""
    has_labelled = np.zeros(self.group.max() + 1 if len(self.group) else 0,
                            bool)
    has_labelled[self.group[labelled]] = True
    return has_labelled[self.group]


def _index(names: Sequence) -> np.ndarray:
  """Dense int ids, in order of first appearance."""
  ids = {}
  return np.array([ids.setdefault(n, len(ids)) for n in names], np.int64)


def _within_group_pairs(group: np.ndarray, keyed: np.ndarray):
  idx = np.nonzero(keyed)[0]
  if len(idx) == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  order = idx[np.argsort(group[idx], kind="stable")]
  bounds = np.flatnonzero(np.diff(group[order])) + 1
  pi, pj = [], []
  for members in np.split(order, bounds):
    a, b = np.triu_indices(len(members), k=1)
    pi.append(members[a])
    pj.append(members[b])
  pair_i, pair_j = np.concatenate(pi), np.concatenate(pj)
  swap = pair_i > pair_j
  pair_i[swap], pair_j[swap] = pair_j[swap], pair_i[swap]
  return pair_i, pair_j
