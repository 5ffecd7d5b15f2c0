"""Accuracy rows per method and the run's report.json.

Each evaluated method (zero-shot, many-shot with gold/ICM/random labels, the
bootstrap baseline, fine-tuned on gold/ICM/random labels) becomes one
`MethodResult` per label seed: accuracy thresholded at 0, the accuracy of
group-consistent decoding (`decoding.group_consistent_labels`), the AUC of the
log-odds, and the fraction predicted True, which exposes a method that "wins"
by always answering one label. `summarize` folds the seeds of a method into
mean and sample sd; the headline is `consistent_accuracy` for keyed and
comparative tasks and `accuracy` for tasks without consistency.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional, Sequence

import numpy as np

from icm_jax import storage
from icm_jax.evaluation.decoding import group_consistent_labels, roc_auc


@dataclasses.dataclass
class MethodResult:
  """Test accuracy of one method against gold labels."""

  method: str                   # e.g. "zero_shot", "many_shot_icm"
  accuracy: float
  num_examples: int
  num_correct: int
  predicted_true_fraction: float
  num_demonstrations: int = 0
  # Group-consistent decoding (equals `accuracy` for consistency "none").
  consistent_accuracy: Optional[float] = None
  auc: Optional[float] = None   # None when the test gold holds one class
  seed: Optional[int] = None    # label seed of ICM-derived rows
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
                  consistency=None, **kw) -> MethodResult:
  """Prediction = log_p_true > log_p_false (ties predict False); gold is 0/1.

  consistency: (groups, keys, kind) of the examples, for group-consistent
  decoding; without it consistent_accuracy is the thresholded accuracy.
  `kw` sets num_demonstrations, seed and/or extra. Raises ValueError on
  mismatched lengths, no examples, non-finite log-probs or gold labels other
  than 0/1.
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
  gold = gold.astype(np.int64)
  correct = int((predicted == gold).sum())
  n = len(gold)
  consistent = predicted
  if consistency is not None:
    groups, keys, kind = consistency
    consistent = group_consistent_labels(log_p_false, log_p_true, groups,
                                         keys, kind)
  return MethodResult(method=method, accuracy=correct / n, num_examples=n,
                      num_correct=correct,
                      predicted_true_fraction=float(predicted.mean()),
                      consistent_accuracy=float((consistent == gold).mean()),
                      auc=roc_auc(log_p_true - log_p_false, gold), **kw)


METRICS = ("accuracy", "consistent_accuracy", "auc", "predicted_true_fraction")


@dataclasses.dataclass
class MethodSummary:
  """One method over its seeds: metric -> (mean, sample sd; 0 for one seed)."""

  method: str
  num_examples: int
  num_demonstrations: int
  seeds: list
  mean: dict
  sd: dict


def summarize(results: Sequence[MethodResult]) -> list[MethodSummary]:
  """Rows of the same method (one per seed) as mean ± sd, in first-seen order."""
  by_method = {}
  for r in results:
    by_method.setdefault(r.method, []).append(r)
  out = []
  for method, rows in by_method.items():
    mean, sd = {}, {}
    for metric in METRICS:
      values = [getattr(r, metric) for r in rows]
      if any(v is None for v in values):
        mean[metric] = sd[metric] = None
        continue
      mean[metric] = float(np.mean(values))
      sd[metric] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    out.append(MethodSummary(method, rows[0].num_examples,
                             rows[0].num_demonstrations,
                             [r.seed for r in rows], mean, sd))
  return out


def write_report(path: str, results: Sequence[MethodResult],
                 **metadata) -> dict:
  """Writes {"results": [...], **metadata} as JSON atomically; returns it."""
  if "results" in metadata:
    raise ValueError("metadata key 'results' is reserved for the method rows")
  if "summary" in metadata:
    raise ValueError("metadata key 'summary' is reserved for the seed means")
  rows = [(r.method, r.seed) for r in results]
  duplicates = sorted({m for m in rows if rows.count(m) > 1}, key=str)
  if duplicates:
    raise ValueError(f"report has duplicate (method, seed) rows {duplicates}")
  report = {"results": [dataclasses.asdict(r) for r in results],
            "summary": [dataclasses.asdict(s) for s in summarize(results)],
            **metadata}
  text = json.dumps(report, indent=2, allow_nan=False, default=_json_default)
  storage.write_text(path, text + "\n")
  return json.loads(text)


def read_report(path: str) -> dict:
  """The dict write_report wrote; raises ValueError naming a malformed file."""
  try:
    report = json.loads(storage.read_text(path))
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
  """A markdown table of `summarize(results)`: mean ± sd over seeds of the
  group-consistent accuracy, accuracy at 0, AUC and fraction predicted True."""
  lines = ["| method | seeds | consistent accuracy | accuracy | AUC | "
           "predicted True | n | demos |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for s in summarize(results):
    cells = [_mean_sd(s, m, len(s.seeds)) for m in (
        "consistent_accuracy", "accuracy", "auc", "predicted_true_fraction")]
    seeds = ",".join("-" if x is None else str(x) for x in s.seeds)
    lines.append(f"| {s.method} | {seeds} | " + " | ".join(cells) +
                 f" | {s.num_examples} | {s.num_demonstrations} |")
  return "\n".join(lines)


def _mean_sd(summary: MethodSummary, metric: str, count: int) -> str:
  mean = summary.mean[metric]
  if mean is None:
    return "n/a"
  if count == 1:
    return f"{mean:.3f}"
  return f"{mean:.3f} ± {summary.sd[metric]:.3f}"


def _json_default(value):
  """numpy scalars/arrays in metadata or `extra` become plain JSON."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"report value of type {type(value).__name__} is not JSON "
                  f"serialisable: {value!r}")


__all__ = ["METRICS", "MethodResult", "MethodSummary", "method_result",
           "summarize", "write_report", "read_report", "results_of",
           "format_table"]
