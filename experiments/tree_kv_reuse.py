"""What reusing tree-mode keys/values across search steps would save.

Issue 22 asks to measure this before building it. A tree level segment's
keys/values depend only on the demonstrations (example, label) it encodes
and on those of its prefix, in order (positions follow from them). So a
segment can be reused when an earlier call encoded the same (prefix,
segment) pair. Query rows (the leaf pass) always read the changed unit and
are never reusable.

The search is the planner's (icm_jax.aot.simulate_search: the config's
search settings and consistency structure, a stand-in model with fixed
random log-odds), recorded call by call; every evaluation call is planned
as LOOScorer plans it (icm_jax.aot.layouts.tree_call_plan). Calls of at
most TREE_ROWS_PATH_MAX rows (the prediction step) run as plain exact rows
and are counted as such. Printed: the share of real token-forwards that
reuse would skip, against (a) the previous evaluation call only, (b) any
earlier call (unbounded memory: an upper bound), (c) duplicates within one
call (its candidates share segments).

  python experiments/tree_kv_reuse.py --config=configs/gsm8k.py \
      --config.data.test=../shared/data/icm/test_gsm8k.json
"""

import dataclasses
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from icm_jax import aot  # noqa: E402
from icm_jax.aot.layouts import _example_lengths, tree_call_plan  # noqa: E402
from icm_jax.scoring import layout  # noqa: E402
from icm_jax.scoring.scorer import TREE_ROWS_PATH_MAX, tree_units  # noqa: E402
# The segment structure itself (which blocks each level encodes after which
# prefix): the plan keeps only token indices, not their (example, label).
from icm_jax.scoring.tree_layout import _forest  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(HERE, "..", "configs", "gsm8k.py"),
    "Run config (scoring, search, data).", lock_config=True)
_NUM = flags.DEFINE_integer("num_examples", None,
                            "N per search (default label.batch_size).")
_TAILS = flags.DEFINE_list("tails", ["0", "4"], "scoring.tree_tail values")
_OUT = flags.DEFINE_string("out", "", "append one JSON line per tail here")


def _segments(workload, scoring, labels, cand_idx, query_idx):
  """[(key, real tokens, level, candidate)] of one call's level segments."""
  n = labels.shape[1]
  groups = list(workload.groups) if len(workload.groups) == n else None
  unit, block = tree_units(scoring, n, groups)
  trees, level_segments, _, _ = _forest(
      _example_lengths(workload), labels, block, cand_idx, query_idx,
      scoring.tree_tail)
  demo_len = _example_lengths(workload).demo
  out = []
  for segs in level_segments:
    for c, lo, hi, path, level in segs:
      t = trees[c]

      def demos(a, b):
        return tuple((int(j), int(labels[c, j]))
                     for m in t["members"][a:b] for j in m)

      own = demos(lo, hi)
      if own:
        key = (tuple(demos(a, b) for _, a, b in path), own)
        out.append((key, int(sum(demo_len[j] for j, _ in own)), level, c))
  return out


def measure(workload, scoring, recorded):
  lengths = _example_lengths(workload)
  seen_any, previous = set(), set()
  total = dict(prediction=0, evaluation=0, level=0, leaf=0, header=0)
  saved = dict(previous=0, any=0, within_call=0)
  per_level, calls = {}, 0
  for call in recorded:
    labels = np.atleast_2d(call.labels).astype(np.int32)
    cand_idx, query_idx = layout.scored_rows(labels, call.queries)
    if len(query_idx) <= TREE_ROWS_PATH_MAX:
      total["prediction"] += int(layout.exact_row_lengths(
          lengths, labels, cand_idx, query_idx).sum())
      continue
    calls += 1
    plan = tree_call_plan(workload, labels, cand_idx, query_idx, scoring, 1)
    real = [int(p.length.sum()) for p in plan.passes]
    total["evaluation"] += sum(real)
    total["leaf"] += real[-1]
    total["header"] += int(plan.header.length.sum()) if plan.header else 0
    segs = _segments(workload, scoring, labels, cand_idx, query_idx)
    here = set()
    for key, tokens, level, _ in segs:
      total["level"] += tokens
      lv = per_level.setdefault(level, [0, 0])
      lv[0] += tokens
      if key in here:
        saved["within_call"] += tokens
        continue
      here.add(key)
      if key in previous:
        saved["previous"] += tokens
      if key in seen_any:
        saved["any"] += tokens
        lv[1] += tokens
    seen_any |= here
    previous = here
  search = total["prediction"] + total["evaluation"]
  return dict(
      evaluation_calls=calls, tokens=total,
      share_of_evaluation={k: v / max(total["evaluation"], 1)
                           for k, v in saved.items()},
      share_of_search={k: v / max(search, 1) for k, v in saved.items()},
      reusable_by_level={str(k): v[1] / max(v[0], 1)
                         for k, v in sorted(per_level.items())})


def main(argv):
  del argv
  config = _CONFIG.value
  scoring, search, _ = aot.stage_configs(config)
  n = _NUM.value or int(config.label.batch_size)
  workload = aot.workload_from_config(config, n)
  recorded, result = aot.simulate_search(workload, search)
  print(f"N={n} {config.scoring.context}: {result.iterations} iterations, "
        f"{len(recorded)} scorer calls; {workload.description}")
  for tail in map(int, _TAILS.value):
    sc = dataclasses.replace(scoring, mode="tree", tree_tail=tail)
    row = measure(workload, sc, recorded)
    row.update(workload=workload.description, n=n, context=sc.context,
               tree_tail=tail, iterations=result.iterations)
    ev, se = row["share_of_evaluation"], row["share_of_search"]
    tok = row["tokens"]
    print(f"tree_tail={tail}: {row['evaluation_calls']} evaluation calls; "
          f"real token-forwards: evaluation {tok['evaluation']:.3e} (levels "
          f"{tok['level'] / max(tok['evaluation'], 1):.0%}, query rows "
          f"{tok['leaf'] / max(tok['evaluation'], 1):.0%}), prediction "
          f"{tok['prediction']:.3e}")
    print(f"  reusable share of evaluation tokens: previous call "
          f"{ev['previous']:.1%}, any earlier call {ev['any']:.1%}, within a "
          f"call {ev['within_call']:.1%}; of the whole search "
          f"{se['previous']:.1%} / {se['any']:.1%} / {se['within_call']:.1%}")
    print("  reusable (any earlier) by level: " + ", ".join(
        f"L{k} {v:.0%}" for k, v in row["reusable_by_level"].items()))
    if _OUT.value:
      with open(_OUT.value, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  app.run(main)
