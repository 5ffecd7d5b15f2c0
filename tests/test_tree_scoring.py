"""Tree mode against an independent computation of its documented semantics.

The reference builds each query's prompt as one explicit token sequence, in
the order tree_layout.py documents (halving the blocks root-down, sibling
halves first, the query's own block-mates last), and runs the plain model
on it one query at a time. Nothing of the kernel's plan is reused.
"""

import jax
import numpy as np
import pytest

from icm_jax.model import init_params
from icm_jax.scoring import LOOScorer, ScoringConfig
from tests.test_scoring import CFG, make_examples, next_token_label_log_probs


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def reference_order(blocks_in_order, query_block):
  """Blocks of the query's prompt, root-down (sibling halves in order)."""
  out, lo, hi = [], 0, len(blocks_in_order)
  pos = blocks_in_order.index(query_block)
  while hi - lo > 1:
    mid = lo + (hi - lo + 1) // 2
    if pos < mid:
      out += blocks_in_order[mid:hi]
      hi = mid
    else:
      out += blocks_in_order[lo:mid]
      lo = mid
  return out


def reference_scores(params, ex, labels, block, unit, queries):
  """[N] (log P(False), log P(True)) per queried example (NaN elsewhere)."""
  n = len(labels)
  out = np.full((n, 2), np.nan)
  for i in np.nonzero(queries)[0]:
    active = []
    for j in range(n):  # blocks by first example, active ones only
      if (labels[j] >= 0 or queries[j]) and block[j] not in active:
        active.append(block[j])
    firsts = {b: min(j for j in range(n) if block[j] == b) for b in active}
    active.sort(key=lambda b: firsts[b])
    demos = [j for b in reference_order(active, block[i])
             for j in range(n) if block[j] == b and labels[j] >= 0]
    demos += [j for j in range(n) if block[j] == block[i] and labels[j] >= 0
              and unit[j] != unit[i]]
    assert i not in demos or unit[i] != unit[i]
    tokens = list(ex.header)
    for j in demos:
      tokens += (list(ex.prompts[j]) + [int(ex.label_token[labels[j]])] +
                 list(ex.separator))
    out[i] = next_token_label_log_probs(params, tokens + list(ex.prompts[i]))
  return out


GROUPS = [0, 0, 1, 1, 1, 2, 3, 3, 4, 2, 5]


@pytest.mark.parametrize("context", ["leave_one_out", "leave_group_out",
                                     "leave_block_out"])
def test_tree_equals_reference(params, context):
  n = len(GROUPS)
  ex = make_examples(n, header_len=3, seed=1)
  rng = np.random.RandomState(3)
  labels = rng.randint(0, 2, n).astype(np.int32)
  labels[4] = -1
  groups = [f"g{g}" for g in GROUPS]
  cfg = ScoringConfig("tree", context=context, blocks=3, rows_per_chunk=2,
                      query_chunk=8)
  scorer = LOOScorer(CFG, params, ex, cfg, groups=groups)
  scores = scorer.score(labels, np.ones(n, bool))
  g = np.array(GROUPS)
  unit = {"leave_one_out": np.arange(n), "leave_group_out": g,
          "leave_block_out": g % 3}[context]
  block = unit if context != "leave_one_out" else g
  ref = reference_scores(params, ex, labels, block, unit, np.ones(n, bool))
  np.testing.assert_allclose(scores.log_p_false, ref[:, 0], atol=1e-4)
  np.testing.assert_allclose(scores.log_p_true, ref[:, 1], atol=1e-4)
