"""Search outputs in the work directory: labels JSONL (metrics: icm_jax.metrics_log)."""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from icm_jax.metrics_log import jsonable


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
      f.write(json.dumps(jsonable({
          "id": example_id,
          "label": None if label < 0 else label,
          "score": float(log_p_true[n]) - float(log_p_false[n]),
          "log_p_true": float(log_p_true[n]),
          "log_p_false": float(log_p_false[n]),
          **{k: v[n] for k, v in columns.items()},
      })) + "\n")
  os.replace(tmp, path)
