"""Data shipped inside the package: the ICM paper's TruthfulQA split and the
word-sentiment comparisons the demo runs on.

See data/<task>/SOURCE.md for origin and licence; GSM8K and Alpaca are read
from a directory the user provides.
"""

from __future__ import annotations

import os

BUNDLED = {
    ("truthfulqa", "train"): "truthfulqa/train_truthfulqa.json",
    ("truthfulqa", "test"): "truthfulqa/test_truthfulqa.json",
    ("sentiment", "train"): "sentiment/train_sentiment.json",
    ("sentiment", "test"): "sentiment/test_sentiment.json",
}

_DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def bundled_path(task: str, split: str) -> str:
  """Path of the bundled records file of `task`'s `split`."""
  if (task, split) not in BUNDLED:
    raise ValueError(f"no bundled data for task {task!r} split {split!r}; "
                     f"bundled: {sorted(BUNDLED)}")
  return os.path.join(_DATA_DIR, BUNDLED[(task, split)])


def bundled_dir(task: str) -> str:
  """Directory holding `task`'s bundled files (a TFDS builder's default)."""
  if not any(t == task for t, _ in BUNDLED):
    raise ValueError(f"no bundled data for task {task!r}")
  return os.path.join(_DATA_DIR, task)
