"""Search state and its atomic on-disk checkpoint.

Everything the next iteration depends on is here (labels, the current LOO
scores and U, counters and the numpy bit-generator state), so a run restarted
from a checkpoint makes exactly the same decisions as one never interrupted.
JSON keeps it readable; floats round-trip exactly through `repr`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

import numpy as np

from icm_jax import storage

FORMAT_VERSION = 1
# Config fields a resumed run may change: they do not alter past decisions.
RESUMABLE_CHANGES = ("max_iterations", "checkpoint_every", "stop_when_converged")


@dataclasses.dataclass
class Evaluation:
  """U(D) = alpha * P(D) - I(D) of one assignment, with its LOO scores."""

  utility: float
  predictability: float
  inconsistency: int
  log_p_false: np.ndarray  # [N], NaN where unlabelled
  log_p_true: np.ndarray   # [N]


@dataclasses.dataclass
class SearchState:
  labels: np.ndarray       # [N] int8 in {-1, 0, 1}
  current: Evaluation
  iteration: int           # iterations completed (0 = after initialisation)
  flips: int               # accepted changes
  visited: np.ndarray      # [N] bool: drawn since the last accepted change
  rng_state: dict          # numpy bit_generator.state
  done: bool = False
  # The alpha every U(D) of this search uses (search.alpha_rule); None in a
  # checkpoint written before the rule existed: search.alpha then.
  alpha: Optional[float] = None
  # The search's score cache (annealing.ScoreCache.to_json), oldest first.
  score_cache: list = dataclasses.field(default_factory=list)

  def to_json(self, fingerprint: dict) -> dict:
    c = self.current
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "labels": self.labels.tolist(),
        "utility": c.utility,
        "predictability": c.predictability,
        "inconsistency": int(c.inconsistency),
        "log_p_false": _floats(c.log_p_false),
        "log_p_true": _floats(c.log_p_true),
        "iteration": self.iteration,
        "flips": self.flips,
        "visited": self.visited.astype(int).tolist(),
        "rng_state": self.rng_state,
        "done": self.done,
        "alpha": self.alpha,
        "score_cache": self.score_cache,
    }

  @classmethod
  def from_json(cls, data: dict) -> "SearchState":
    current = Evaluation(
        utility=data["utility"], predictability=data["predictability"],
        inconsistency=data["inconsistency"],
        log_p_false=np.array(data["log_p_false"], np.float32),
        log_p_true=np.array(data["log_p_true"], np.float32))
    return cls(labels=np.array(data["labels"], np.int8), current=current,
               iteration=data["iteration"], flips=data["flips"],
               visited=np.array(data["visited"], bool),
               rng_state=data["rng_state"], done=data["done"],
               alpha=data.get("alpha"),
               score_cache=data.get("score_cache", []))


def fingerprint(config_dict: dict, ids) -> dict:
  """What must match for a checkpoint to be resumed."""
  fixed = {k: v for k, v in config_dict.items() if k not in RESUMABLE_CHANGES}
  digest = hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()
  return {"config": fixed, "num_examples": len(ids), "ids_sha256": digest}


def save(path: str, state: SearchState, fp: dict) -> None:
  """Write atomically: a kill leaves either the old or the new checkpoint."""
  storage.write_text(path, json.dumps(state.to_json(fp)))


def load(path: str, fp: dict) -> Optional[SearchState]:
  """The checkpoint at `path` (None if absent), checked against `fp`."""
  if not storage.exists(path):
    return None
  try:
    data = json.loads(storage.read_text(path))
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"search checkpoint {path} is unreadable: {e}") from e
  if data.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"search checkpoint {path}: format_version "
                     f"{data.get('format_version')!r} != {FORMAT_VERSION}")
  saved = data["fingerprint"]
  for key in ("num_examples", "ids_sha256"):
    if saved[key] != fp[key]:
      raise ValueError(f"search checkpoint {path} was written for other "
                       f"examples ({key} differs); use a fresh work directory")
  for key in sorted(set(saved["config"]) | set(fp["config"])):
    if saved["config"].get(key) != fp["config"].get(key):
      raise ValueError(
          f"search checkpoint {path} was written with search.{key}="
          f"{saved['config'].get(key)!r}, this run has "
          f"{fp['config'].get(key)!r}; use a fresh work directory")
  return SearchState.from_json(data)


def _floats(a: np.ndarray) -> list:
  return [float(x) for x in np.asarray(a, np.float64)]
