r"""Why a demo search ended where it did, from its run directory alone.

  python experiments/demo_diagnosis.py --workdir=runs/demo [--out=rows.jsonl]

For every ICM search of the run (`<workdir>/label/seed_*/batch_*/
metrics.jsonl`) prints one row: the alpha it used, the final train gold
agreement, the best one any accepted state reached and how many iterations
sat at gold (agreement 1.0), how many steps proposed a change, were
accepted, or accepted a worse U, the median |Delta U| of proposals beside
the temperature at the start and the end, and the score calls. Gold is read
from the metrics log's reporting column; the search never saw it.
Pair it with `experiments/objective_ranking.py --all` (gold's rank under U
among every consistent labelling) to tell a search that missed the optimum
from an objective whose optimum is not gold.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "the run's --workdir", required=True)
flags.DEFINE_string("out", "", "append one JSON line per search here")


def diagnose(metrics: list) -> dict:
  steps = metrics[1:]
  proposed = [m for m in steps if m.get("delta") is not None]
  deltas = np.array([m["delta"] for m in proposed])
  agreement = [m.get("gold_agreement") for m in metrics]
  return dict(
      alpha=metrics[0].get("alpha"),
      iterations=len(steps),
      final_gold_agreement=agreement[-1],
      best_gold_agreement=max(a for a in agreement if a is not None),
      iterations_at_gold=sum(a == 1.0 for a in agreement[1:]),
      proposals=len(proposed),
      accepted=sum(m["accepted"] for m in steps),
      accepted_worse=sum(m["accepted"] and m["delta"] < 0 for m in proposed),
      median_abs_delta_u=float(np.median(np.abs(deltas))) if len(deltas)
      else None,
      t_start=metrics[0]["T"], t_end=steps[-1]["T"] if steps else None,
      final_u=metrics[-1]["U"])


def main(argv):
  del argv
  pattern = os.path.join(FLAGS.workdir, "label", "seed_*", "batch_*",
                         "metrics.jsonl")
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise SystemExit(f"error: no search metrics under {pattern}")
  for path in paths:
    with open(path) as f:
      metrics = [json.loads(line) for line in f]
    seed_dir = os.path.basename(os.path.dirname(os.path.dirname(path)))
    batch_dir = os.path.basename(os.path.dirname(path))
    summary = os.path.join(os.path.dirname(os.path.dirname(path)),
                           "summary.json")
    row = dict(run=os.path.basename(os.path.normpath(FLAGS.workdir)),
               search=f"{seed_dir}/{batch_dir}", **diagnose(metrics))
    if os.path.exists(summary):
      with open(summary) as f:
        batches = json.load(f)["batches"]
      b = int(batch_dir.split("_")[1])
      row.update(score_calls=batches[b]["score_calls"],
                 search_seconds=round(batches[b]["search_seconds"], 1))
    print(json.dumps(row), flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
