"""Split a dataset into search batches of whole consistency groups.

The official ICM runs one search per batch of `batch_size` examples made of
whole groups. Groups are shuffled with a seeded generator and dealt, largest
batch-fill first, into ceil(N / batch_size) batches (more only if groups do
not fit), so batches are near-equal in size and never split a group.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def split_into_batches(groups: Sequence[str], batch_size: int,
                       seed: int) -> list:
  """Example indices of each batch.

  Within a batch a group's members are adjacent (groups ordered by their
  first example), as the official code orders its in-context demonstrations.
  """
  if not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"search.batch_size={batch_size!r} must be a positive int")
  members = {}
  for n, g in enumerate(groups):
    members.setdefault(g, []).append(n)
  names = list(members)
  too_big = [g for g in names if len(members[g]) > batch_size]
  if too_big:
    raise ValueError(f"consistency group {too_big[0]!r} has "
                     f"{len(members[too_big[0]])} examples > search.batch_size="
                     f"{batch_size}")
  rng = np.random.default_rng(seed)
  order = [names[k] for k in rng.permutation(len(names))]
  num_batches = max(1, -(-len(groups) // batch_size))
  while True:
    batches = [[] for _ in range(num_batches)]
    sizes = np.zeros(num_batches, np.int64)
    fits = True
    for g in order:
      size = len(members[g])
      room = np.flatnonzero(sizes + size <= batch_size)
      if len(room) == 0:
        fits = False
        break
      b = room[np.argmin(sizes[room])]
      batches[b].extend(members[g])
      sizes[b] += size
    if fits:
      return [_group_contiguous(b, groups) for b in batches if b]
    num_batches += 1


def _group_contiguous(members: list, groups: Sequence[str]) -> np.ndarray:
  first = {}
  for k in sorted(members):
    first.setdefault(groups[k], k)
  return np.array(sorted(members, key=lambda k: (first[groups[k]], k)),
                  np.int64)
