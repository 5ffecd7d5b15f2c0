"""PNG plots of the evaluation (accuracy per method) and of ICM searches.

Figures are drawn with matplotlib's object API on an Agg canvas
(`matplotlib.figure.Figure` + `FigureCanvasAgg`), never through pyplot: it
works headless and leaves a notebook user's backend and current figure alone.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Mapping, Sequence, Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from icm_jax import storage
from icm_jax.evaluation.report import MethodResult, summarize

# Keys every search metrics record must have to be plotted.
_REQUIRED_KEYS = ("iteration", "U")


def plot_accuracy_bars(results: Sequence[MethodResult], path: str,
                       title: str = "", metric: str = "accuracy",
                       chance: float = 0.5, ylabel: str = "") -> str:
  """One bar per method: `metric`'s mean over its seeds, with a ±1 sd error
  bar where a method has several seeds; `chance` dashed.

  The number of test examples goes in the axis label (per bar when methods
  were measured on different numbers). Returns `path`.
  """
  if not results:
    raise ValueError("plot_accuracy_bars: no results to plot")
  if metric not in ("accuracy", "consistent_accuracy"):
    raise ValueError(f"plot_accuracy_bars: metric {metric!r} is not an "
                     "accuracy")
  rows = summarize(results)
  fig = Figure(figsize=(max(4.0, 1.3 * len(rows) + 1.5), 4.0))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  names = [r.method for r in rows]
  means = [r.mean[metric] for r in rows]
  errors = [r.sd[metric] if len(r.seeds) > 1 else 0.0 for r in rows]
  colors = [f"C{i % 10}" for i in range(len(rows))]
  bars = ax.bar(range(len(rows)), means, color=colors)
  seeded = [k for k, r in enumerate(rows) if len(r.seeds) > 1]
  if seeded:  # error bars only where there is a spread to show
    ax.errorbar(seeded, [means[k] for k in seeded],
                yerr=[errors[k] for k in seeded], fmt="none", ecolor="black",
                capsize=4)
  for bar, r, err in zip(bars, rows, errors):
    text = f"{r.mean[metric]:.3f}"
    if len(r.seeds) > 1:
      text += f"\n±{err:.3f}"
    ax.annotate(text, (bar.get_x() + bar.get_width() / 2,
                       bar.get_height() + err),
                xytext=(0, 3), textcoords="offset points", ha="center",
                va="bottom", fontsize=8)
  ax.axhline(chance, color="gray", linestyle="--", linewidth=1,
             label="chance")
  label = ylabel or ("test consistent accuracy" if metric != "accuracy" else
                     "test accuracy")
  seeds = max(len(r.seeds) for r in rows)
  detail = [f"mean ± sd, {seeds} seeds"] if seeds > 1 else []
  sizes = sorted({r.num_examples for r in rows})
  if len(sizes) == 1:
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    detail.append(f"n = {sizes[0]}")
    ax.set_ylabel(f"{label}\n({'; '.join(detail)})")
  else:
    ax.set_xticks(range(len(rows)),
                  [f"{r.method}\n(n = {r.num_examples})" for r in rows],
                  rotation=20, ha="right")
    ax.set_ylabel(label + (f"\n({detail[0]})" if detail else ""))
  ax.set_ylim(0.0, 1.1)
  ax.legend(loc="upper left", fontsize=8)
  if title:
    ax.set_title(title)
  fig.tight_layout()
  return _save(fig, path)


def plot_search_trajectory(metrics_files: Union[Sequence[str],
                                                Mapping[str, str]],
                           path: str) -> str:
  """Utility U and gold agreement vs iteration for ICM searches' metrics.

  metrics_files: paths of metrics.jsonl files, or {legend label: path}; a
  plain path is labelled by its parent directory's name (e.g. batch_000).
  Gold agreement is optional per record (absent or null when there is no
  gold); the lower panel says "no gold labels" when no file has any.
  Raises ValueError naming the file (and line) that is missing, empty or
  malformed. Returns `path`.
  """
  if isinstance(metrics_files, Mapping):
    named = list(metrics_files.items())
  else:
    if isinstance(metrics_files, (str, bytes, os.PathLike)):
      raise TypeError("plot_search_trajectory takes a sequence (or mapping) "
                      f"of metrics files, not one path {metrics_files!r}")
    named = [(_default_label(p), p) for p in metrics_files]
  if not named:
    raise ValueError("plot_search_trajectory: no metrics files")
  runs = [(label, read_metrics(p)) for label, p in named]

  fig = Figure(figsize=(7.0, 5.5))
  FigureCanvasAgg(fig)
  ax_u, ax_gold = fig.subplots(2, 1, sharex=True)
  any_gold = False
  for k, (label, records) in enumerate(runs):
    color = f"C{k % 10}"
    ax_u.plot([r["iteration"] for r in records], [r["U"] for r in records],
              color=color, label=label, linewidth=1.2)
    gold = [(r["iteration"], r["gold_agreement"]) for r in records
            if r.get("gold_agreement") is not None]
    if gold:
      any_gold = True
      ax_gold.plot(*zip(*gold), color=color, label=label, linewidth=1.2)
  ax_u.set_ylabel("utility U")
  ax_u.set_title("ICM search")
  ax_u.legend(fontsize=8, loc="best")
  ax_gold.set_xlabel("iteration")
  ax_gold.set_ylabel("agreement with gold")
  if any_gold:
    ax_gold.set_ylim(0.0, 1.0)
    ax_gold.axhline(0.5, color="gray", linestyle="--", linewidth=1)
  else:
    ax_gold.text(0.5, 0.5, "no gold labels", transform=ax_gold.transAxes,
                 ha="center", va="center", color="gray")
  fig.tight_layout()
  return _save(fig, path)


def read_metrics(path: str) -> list[dict]:
  """Records of one metrics.jsonl, validated for plotting.

  Blank lines are skipped; every other line must be a JSON object with a
  numeric "iteration" and "U", and "gold_agreement" (if present) a number or
  null.
  """
  if not storage.exists(path):
    raise ValueError(f"metrics file {path} does not exist")
  records = []
  for line_no, line in enumerate(storage.read_text(path).splitlines(), 1):
    if not line.strip():
      continue
    where = f"metrics file {path} line {line_no}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{where}: not valid JSON ({e})") from e
    if not isinstance(record, dict):
      raise ValueError(f"{where}: expected a JSON object")
    for key in _REQUIRED_KEYS:
      if not _is_number(record.get(key)):
        raise ValueError(f"{where}: {key!r} missing or not a finite number")
    gold = record.get("gold_agreement")
    if gold is not None and not _is_number(gold):
      raise ValueError(f"{where}: 'gold_agreement' is {gold!r}, not a "
                       "number or null")
    records.append(record)
  if not records:
    raise ValueError(f"metrics file {path} is empty")
  return records


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def _default_label(path: str) -> str:
  parent = storage.basename(storage.dirname(path))
  return parent or storage.basename(path)


def _save(fig: Figure, path: str) -> str:
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=120)
  storage.write_bytes(path, png.getvalue())
  return path
