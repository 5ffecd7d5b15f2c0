"""Train label accuracy: how often each method's train labels equal gold.

ICM is a labeller, so its first measure is its labels: the agreement of the
train labels each method produces (ICM per seed, the bootstrap baseline per
round, coin flips, zero-shot decoded group-consistently) with the train gold,
over the claims it labelled. Gold is read here for reporting only; nothing
that chooses labels sees it. Rows are `MethodResult`s (accuracy = agreement,
num_examples = claims labelled), so seeds fold into mean ± sd as test rows
do, and `chance_agreement` is the level a uniformly random consistent
labelling reaches, printed beside them.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from icm_jax.evaluation.decoding import KINDS
from icm_jax.evaluation.report import MethodResult, summarize


def label_row(method: str, labels: Sequence[Optional[int]], gold,
              seed: Optional[int] = None, **extra) -> MethodResult:
  """Agreement of `labels` (None = left unlabelled) with 0/1 `gold`."""
  labels = [None if l is None else int(l) for l in labels]
  gold = [int(g) for g in gold]
  if len(labels) != len(gold):
    raise ValueError(f"{method}: {len(labels)} labels for {len(gold)} gold")
  pairs = [(l, g) for l, g in zip(labels, gold) if l is not None]
  if not pairs:
    raise ValueError(f"{method}: no train claim is labelled")
  correct = sum(l == g for l, g in pairs)
  accuracy = correct / len(pairs)
  return MethodResult(
      method=method, accuracy=accuracy, num_examples=len(pairs),
      num_correct=correct,
      predicted_true_fraction=sum(l for l, _ in pairs) / len(pairs),
      consistent_accuracy=accuracy, seed=seed,
      extra=dict(extra, unlabelled=len(labels) - len(pairs)))


def chance_agreement(gold, groups: Sequence[str],
                     keys: Sequence[Optional[str]], kind: str) -> float:
  """Expected agreement with `gold` of a labelling drawn uniformly from the
  consistent ones. Groups are independent, so this is, per group, the mean
  agreement over its consistent assignments (the options `decoding` picks
  from: keyed, one key's claims True or none; comparative, one of two keys'
  claims True, or a one-key group all True or all False; none, any)."""
  gold = np.asarray(gold, np.int64)
  if kind not in KINDS:
    raise ValueError(f"consistency kind {kind!r} not in {KINDS}")
  if kind == "none":
    return 0.5
  expected = 0.0
  group_ids = {}
  dense = np.array([group_ids.setdefault(g, len(group_ids)) for g in groups])
  for g in range(len(group_ids)):
    members = np.flatnonzero(dense == g)
    member_keys = [keys[m] for m in members]
    distinct = list(dict.fromkeys(member_keys))
    if kind == "comparative" and len(distinct) > 2:
      raise ValueError(f"comparative group {groups[members[0]]!r} has "
                       f"{len(distinct)} keys; no labelling is consistent")
    options = [np.array([k == key for k in member_keys], np.int64)
               for key in distinct]
    if kind == "keyed" or len(distinct) == 1:
      options.append(np.zeros(len(members), np.int64))
    expected += np.mean([(o == gold[members]).sum() for o in options])
  return float(expected / len(gold))


def format_label_table(rows: Sequence[MethodResult], chance: float) -> str:
  """Markdown: per method, mean ± sd over seeds of the train label accuracy,
  the claims labelled, and the random consistent labelling's level."""
  lines = ["| train labels of | seeds | label accuracy | claims labelled |",
           "|---|---:|---:|---:|"]
  for s in summarize(rows):
    mean, sd = s.mean["accuracy"], s.sd["accuracy"]
    cell = f"{mean:.3f}" if len(s.seeds) == 1 else f"{mean:.3f} ± {sd:.3f}"
    seeds = ",".join("-" if x is None else str(x) for x in s.seeds)
    lines.append(f"| {s.method} | {seeds} | {cell} | {s.num_examples} |")
  lines.append(f"| random consistent labelling (expected) | - | "
               f"{chance:.3f} | - |")
  return "\n".join(lines)


def separation(gold: MethodResult, inverted: MethodResult,
               metric: str) -> dict:
  """Does the downstream metric tell gold labels from inverted ones
  (many-shot demonstrations, or fine-tuning targets)? It does when their gap exceeds twice the standard error of a
  difference of two accuracies on these test claims (binomial, treated as
  independent samples: conservative for the paired claims)."""
  a, b = getattr(gold, metric), getattr(inverted, metric)
  n = gold.num_examples
  se = float(np.sqrt((a * (1 - a) + b * (1 - b)) / n))
  separates = a - b > 2 * se
  what = "fine-tuned" if gold.method.startswith("finetune_") else "many-shot"
  figures = f"gold {a:.3f} vs inverted {b:.3f}, 2 SE = {2 * se:.3f}"
  if separates:
    statement = (f"{what} {metric} separates gold from inverted labels "
                 f"({figures})")
  else:
    why = ("inverted labels score higher" if b - a > 2 * se else
           "within noise")
    statement = (f"{what} {metric} does not separate gold from inverted "
                 f"labels for this model and task ({why}: {figures}): do "
                 "not rank label sources by it")
  return {"metric": metric, "gold": a, "inverted": b, "two_se": 2 * se,
          "separates": bool(separates), "statement": statement}


__all__ = ["label_row", "chance_agreement", "format_label_table",
           "separation"]
