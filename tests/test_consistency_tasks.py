"""The built-in tasks' consistency keys, checked on the real data's gold labels.

Gold labels are a consistent labelling of the real world, so under a correct
label-free rule they should be (almost) free of inconsistencies; the counts
are checked against a naive per-pair loop (test_search.naive_inconsistent_pairs).
"""

import os
import sys

import numpy as np
import pytest

from icm_jax.search import Consistency
from icm_jax.tasks import bundled_path, get_task, load_examples

sys.path.insert(0, os.path.dirname(__file__))
from task_data import shared_file  # noqa: E402
from test_search import naive_inconsistent_pairs  # noqa: E402


def inconsistency_of_gold(task, examples):
  groups = [e.group for e in examples]
  keys = [e.key for e in examples]
  gold = np.array([e.gold for e in examples])
  cons = Consistency.build(groups, keys, task.consistency)
  got = int(cons.count(gold))
  assert got == len(naive_inconsistent_pairs(groups, keys, gold,
                                             task.consistency))
  return got, cons


def test_alpaca_pair_order_keys_make_gold_fully_consistent():
  task = get_task("alpaca")
  examples = load_examples(task, shared_file("test_alpaca.json"))
  got, cons = inconsistency_of_gold(task, examples)
  assert got == 0  # each pair's gold labels are complementary: exactly one holds
  # ...and the rule has teeth: both-True and both-False pairs all count.
  assert cons.count(np.ones(len(examples), np.int8)) == len(examples) // 2
  assert cons.count(np.zeros(len(examples), np.int8)) == len(examples) // 2


def test_gsm8k_answer_keys_on_gold():
  task = get_task("gsm8k")
  examples = load_examples(task, shared_file("test_gsm8k.json"))
  got, _ = inconsistency_of_gold(task, examples)
  # Independent count of the data's known quirks: pairs of solutions with the
  # same final answer but different gold labels (the reasoning of one was
  # judged wrong), plus groups where two different answers are both "correct".
  by_group = {}
  for e in examples:
    by_group.setdefault(e.group, []).append(e)
  same_answer_disagree = both_true_different = 0
  for members in by_group.values():
    for a in range(len(members)):
      for b in range(a + 1, len(members)):
        x, y = members[a], members[b]
        if x.key == y.key and x.gold != y.gold:
          same_answer_disagree += 1
        if x.key != y.key and x.gold == y.gold == 1:
          both_true_different += 1
  assert got == same_answer_disagree + both_true_different
  assert got < 0.05 * len(examples)  # gold is nearly consistent under the rule
  print("gsm8k gold inconsistencies:", same_answer_disagree,
        both_true_different)


@pytest.mark.parametrize("keys", ["none", "official_gold_leak"])
def test_truthfulqa_keys(keys):
  task = get_task("truthfulqa", consistency_keys=keys)
  examples = load_examples(task, bundled_path("truthfulqa", "train"))
  got, cons = inconsistency_of_gold(task, examples)
  assert got == 0
  if keys == "none":
    assert len(cons.pair_i) == 0  # no constraint at all by default
  else:
    # The leaked keys encode gold: flipping any one gold label breaks
    # consistency with the rest of its group.
    flipped = np.array([e.gold for e in examples])
    flipped[0] = 1 - flipped[0]
    assert cons.count(flipped) > 0
