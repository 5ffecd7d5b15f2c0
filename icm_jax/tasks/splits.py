"""Train/test splits by whole consistency group, for datasets with one file.

GSM8K and Alpaca were released only as test files, so ICM's train/test split
is made here: the groups (sorted by id, so input order does not matter) are
permuted by `numpy.random.default_rng(seed)` and the first
`round(test_fraction * n_groups)` go to test. Defaults: seed 0, test fraction
0.5. Items keep their input order within each split.
"""

from __future__ import annotations

from typing import Mapping, Sequence, TypeVar

import numpy as np

from icm_jax.tasks.records import Example, group_value

DEFAULT_SEED = 0
DEFAULT_TEST_FRACTION = 0.5

Item = TypeVar("Item")


def split_by_group(items: Sequence[Item],
                   test_fraction: float = DEFAULT_TEST_FRACTION,
                   seed: int = DEFAULT_SEED,
                   group_field: str = "consistency_id",
                   source: str = "records") -> tuple[list[Item], list[Item]]:
  """(train, test): `Example`s (by `.group`) or records (by `group_field`)."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction!r} must be in (0, 1)")
  groups = [_group_of(item, index, group_field, source)
            for index, item in enumerate(items)]
  names = sorted(set(groups))
  n_test = int(round(test_fraction * len(names)))
  if n_test in (0, len(names)):
    raise ValueError(f"{source}: {len(names)} groups cannot be split with "
                     f"test_fraction={test_fraction} (a split would be empty)")
  order = np.random.default_rng(seed).permutation(len(names))
  test_groups = {names[i] for i in order[:n_test]}
  train = [item for item, g in zip(items, groups) if g not in test_groups]
  test = [item for item, g in zip(items, groups) if g in test_groups]
  return train, test


def _group_of(item, index: int, group_field: str, source: str) -> str:
  if isinstance(item, Example):
    return item.group
  if isinstance(item, Mapping):
    return group_value(item, group_field, source, index)
  raise TypeError(f"{source} item {index}: expected an Example or a record, "
                  f"got {type(item).__name__}")
