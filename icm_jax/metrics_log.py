"""Resumable JSON-lines metrics: one record per iteration/step, flushed as written.

Shared by the search (metrics.jsonl, keyed by "iteration") and the trainer
(train_metrics.jsonl, keyed by "step"). A resumed run first drops the lines
past its checkpoint (they are recomputed identically, and a line cut by a kill
ends the kept part), so the file ends as an uninterrupted run's would.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Optional

import numpy as np


def jsonable(record: dict) -> dict:
  """numpy scalars -> Python; non-finite floats -> None (valid JSON)."""
  out = {}
  for k, v in record.items():
    if isinstance(v, np.integer):
      v = int(v)
    elif isinstance(v, (np.floating, float)):
      v = float(v)
      if not math.isfinite(v):
        v = None
    elif isinstance(v, np.bool_):
      v = bool(v)
    out[k] = v
  return out


class MetricsLog:
  """Appends records to `path`; keeps only lines with record[key] <= resume."""

  def __init__(self, path: str, resume: Optional[int] = None,
               key: str = "iteration"):
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    kept = []
    if resume is not None and os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            break  # a line cut by the kill; everything after is redone
          if record[key] > resume:
            break
          kept.append(line if line.endswith("\n") else line + "\n")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".jsonl")
    with os.fdopen(fd, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
    self._file = open(path, "a")

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(jsonable(record)) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()
