"""Search outputs in the work directory: metrics JSONL and labels JSONL."""

from __future__ import annotations

import json
import math
import os
from typing import Optional, Sequence

import numpy as np


class MetricsLog:
  """One JSON line per iteration, appended and flushed as the search goes.

  A resumed run first drops lines past its checkpoint's iteration (they are
  recomputed identically), so the file ends as an uninterrupted run's would.
  """

  def __init__(self, path: str, resume_iteration: Optional[int] = None):
    self.path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    kept = []
    if resume_iteration is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            break  # a line cut by the kill; everything after is redone
          if record["iteration"] > resume_iteration:
            break
          kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
      f.writelines(kept)
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(_jsonable(record)) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def write_labels(path: str, ids: Sequence[str], labels: np.ndarray,
                 log_p_false: np.ndarray, log_p_true: np.ndarray,
                 **columns: np.ndarray) -> None:
  """id, label (0/1, null if never labelled) and the final LOO scores.

  score = log P(True) - log P(False) given all other labelled examples
  (null where not scored); `columns` are extra per-example fields.
  """
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for n, example_id in enumerate(ids):
      label = int(labels[n])
      f.write(json.dumps(_jsonable({
          "id": example_id,
          "label": None if label < 0 else label,
          "score": float(log_p_true[n]) - float(log_p_false[n]),
          "log_p_true": float(log_p_true[n]),
          "log_p_false": float(log_p_false[n]),
          **{k: v[n] for k, v in columns.items()},
      })) + "\n")
  os.replace(tmp, path)


def _jsonable(record: dict) -> dict:
  out = {}
  for k, v in record.items():
    if isinstance(v, (np.integer,)):
      v = int(v)
    elif isinstance(v, (np.floating, float)):
      v = float(v)
      if not math.isfinite(v):
        v = None
    elif isinstance(v, np.bool_):
      v = bool(v)
    out[k] = v
  return out
