"""Accuracy rows per method and the run's report.json.

Each evaluated method (zero-shot, many-shot with gold/ICM labels, fine-tuned
on gold/ICM/random labels) becomes one `MethodResult`: accuracy against gold
plus the fraction predicted True, which exposes a method that "wins" by
always answering one label on a skewed test set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Sequence

import numpy as np


@dataclasses.dataclass
class MethodResult:
  """Test accuracy of one method against gold labels."""

  method: str                   # e.g. "zero_shot", "many_shot_icm"
  accuracy: float
  num_examples: int
  num_correct: int
  predicted_true_fraction: float
  num_demonstrations: int = 0
  extra: dict = dataclasses.field(default_factory=dict)  # free-form

  @classmethod
  def from_dict(cls, d: dict) -> "MethodResult":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    missing = {f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and
               f.default_factory is dataclasses.MISSING} - set(d)
    if unknown or missing:
      raise ValueError(f"method result {d.get('method')!r}: unknown keys "
                       f"{sorted(unknown)}, missing keys {sorted(missing)}")
    return cls(**d)


def method_result(method: str, log_p_false, log_p_true, gold,
                  **kw) -> MethodResult:
  """Prediction = log_p_true > log_p_false (ties predict False); gold is 0/1.

  `kw` sets num_demonstrations and/or extra. Raises ValueError on mismatched
  lengths, no examples, non-finite log-probs or gold labels other than 0/1.
  """
  log_p_false = np.asarray(log_p_false, np.float64).ravel()
  log_p_true = np.asarray(log_p_true, np.float64).ravel()
  gold = np.asarray(gold).ravel()
  if not (len(log_p_false) == len(log_p_true) == len(gold)):
    raise ValueError(
        f"{method}: {len(log_p_false)} log_p_false, {len(log_p_true)} "
        f"log_p_true and {len(gold)} gold labels differ in length")
  if not len(gold):
    raise ValueError(f"{method}: no examples to evaluate")
  values = gold.tolist()
  bad = [i for i, g in enumerate(values) if g not in (0, 1)]
  if bad:
    raise ValueError(f"{method}: gold label {values[bad[0]]!r} at position "
                     f"{bad[0]} is not 0 or 1 ({len(bad)} bad in all)")
  finite = np.isfinite(log_p_false) & np.isfinite(log_p_true)
  if not finite.all():
    first = int(np.argmin(finite))
    raise ValueError(f"{method}: non-finite log-probs at position {first} "
                     f"({log_p_false[first]}, {log_p_true[first]})")
  predicted = (log_p_true > log_p_false).astype(np.int64)
  correct = int((predicted == gold.astype(np.int64)).sum())
  n = len(gold)
  return MethodResult(method=method, accuracy=correct / n, num_examples=n,
                      num_correct=correct,
                      predicted_true_fraction=float(predicted.mean()), **kw)


def write_report(path: str, results: Sequence[MethodResult],
                 **metadata) -> dict:
  """Writes {"results": [...], **metadata} as JSON atomically; returns it."""
  if "results" in metadata:
    raise ValueError("metadata key 'results' is reserved for the method rows")
  methods = [r.method for r in results]
  duplicates = sorted({m for m in methods if methods.count(m) > 1})
  if duplicates:
    raise ValueError(f"report has duplicate methods {duplicates}")
  report = {"results": [dataclasses.asdict(r) for r in results], **metadata}
  text = json.dumps(report, indent=2, allow_nan=False, default=_json_default)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".report-", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return json.loads(text)


def read_report(path: str) -> dict:
  """The dict write_report wrote; raises ValueError naming a malformed file."""
  with open(path) as f:
    try:
      report = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(report, dict) or not isinstance(report.get("results"),
                                                      list):
    raise ValueError(f"{path}: expected an object with a 'results' list")
  return report


def results_of(report: dict) -> list[MethodResult]:
  """The MethodResult rows of a report dict (as read_report returns)."""
  return [MethodResult.from_dict(r) for r in report["results"]]


def format_table(results: Sequence[MethodResult]) -> str:
  """A markdown table: method | accuracy | n | demos | predicted True."""
  lines = ["| method | accuracy | n | demos | predicted True |",
           "|---|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r.method} | {r.accuracy:.3f} ({r.num_correct}) | "
                 f"{r.num_examples} | {r.num_demonstrations} | "
                 f"{r.predicted_true_fraction:.3f} |")
  return "\n".join(lines)


def _json_default(value):
  """numpy scalars/arrays in metadata or `extra` become plain JSON."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"report value of type {type(value).__name__} is not JSON "
                  f"serialisable: {value!r}")


__all__ = ["MethodResult", "method_result", "write_report", "read_report",
           "results_of", "format_table"]
