"""Search outputs in the work directory: labels JSONL (metrics: icm_jax.metrics_log)."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np

from icm_jax import storage
from icm_jax.metrics_log import jsonable


def write_labels(path: str, ids: Sequence[str], labels: np.ndarray,
                 log_p_false: np.ndarray, log_p_true: np.ndarray,
                 **columns: Sequence) -> None:
  """id, label (0/1, null if never labelled) and the final LOO scores.

  log_odds = log P(True) - log P(False) given all other labelled examples
  (null where not scored); `columns` are extra per-example fields (any
  JSON value, e.g. the rendered claim or the source record).
  """
  lines = []
  for n, example_id in enumerate(ids):
    label = int(labels[n])
    lines.append(json.dumps(jsonable({
        "id": example_id,
        "label": None if label < 0 else label,
        "log_odds": float(log_p_true[n]) - float(log_p_false[n]),
        "log_p_true": float(log_p_true[n]),
        "log_p_false": float(log_p_false[n]),
        **{k: v[n] for k, v in columns.items()},
    })) + "\n")
  storage.write_text(path, "".join(lines))
