"""Resumable JSON-lines metrics: one record per iteration/step (icm_jax.storage).

Shared by the search (metrics.jsonl, keyed by "iteration") and the trainer
(train_metrics.jsonl, keyed by "step"). A resumed run first drops the lines
past its checkpoint (they are recomputed identically, and a line cut by a kill
ends the kept part), so the file ends as an uninterrupted run's would.
"""

from __future__ import annotations

import json
import math
from typing import Optional

import numpy as np

from icm_jax import storage


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
    kept = []
    if resume is not None and storage.exists(path):
      for line in storage.read_text(path).splitlines(keepends=True):
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          break  # a line cut by the kill; everything after is redone
        if record[key] > resume:
          break
        kept.append(line if line.endswith("\n") else line + "\n")
    self._log = storage.LineLog(path, kept)

  def write(self, record: dict) -> None:
    self._log.write(json.dumps(jsonable(record)) + "\n")

  def flush(self) -> None:
    """Makes every record so far visible (object stores upload lazily)."""
    self._log.flush()

  def close(self) -> None:
    self._log.close()
