"""The paper's tasks (TruthfulQA, GSM8K, Alpaca) and the registry of them.

None of the default tasks reads the gold label for anything but
`Example.gold`:
  truthfulqa: no consistency keys (the paper finds TruthfulQA works without);
              the official gold-derived keys only via
              `get_task("truthfulqa", consistency_keys="official_gold_leak")`.
  gsm8k:      claim = the LM-written solution (`cot`); key = its final answer
              (`answer`, stripped), so solutions reaching different answers
              cannot both be right. One record of the released file
              (test_gsm8k.json record 1838, cot "The answer is") has an empty
              answer; it keeps key "" (a distinct, empty answer), as upstream.
  alpaca:     pairs asked both ways; key from the pair's order, not the label
              (the official "A>B" if label is the gold answer). "\\n" is
              removed from both responses, as in the official code.
  sentiment:  the demo task (bundled, data/sentiment/SOURCE.md): which of two
              lexicon words is more positive, each pair asked both ways; key
              from the pair's order (comparative), gold from the lexicon.
"""

from __future__ import annotations

from typing import Callable

from icm_jax.tasks import templates
from icm_jax.tasks.task import Task

TRUTHFULQA_CONSISTENCY_KEYS = ("none", "official_gold_leak")


def truthfulqa(consistency_keys: str = "none") -> Task:
  """TruthfulQA claims; `consistency_keys="official_gold_leak"` leaks gold."""
  if consistency_keys not in TRUTHFULQA_CONSISTENCY_KEYS:
    raise ValueError(f"truthfulqa: consistency_keys {consistency_keys!r} not "
                     f"in {TRUTHFULQA_CONSISTENCY_KEYS}")
  if consistency_keys == "official_gold_leak":
    return Task(name="truthfulqa", template=templates.TRUTHFULQA,
                consistency="keyed", key_from="gold_label_leak")
  return Task(name="truthfulqa", template=templates.TRUTHFULQA)


def gsm8k() -> Task:
  """Verification of LM-written GSM8K solutions, keyed by final answer."""
  return Task(name="gsm8k", template=templates.GSM8K, consistency="keyed",
              key_field="answer")


def alpaca() -> Task:
  """Pairwise helpfulness comparisons, each asked in both orders."""
  return Task(name="alpaca", template=templates.ALPACA,
              consistency="comparative", key_from="pair_order",
              pair_fields=("choice", "choice_2"),
              strip_newlines=("choice", "choice_2"))


def sentiment() -> Task:
  """Word-pair sentiment comparisons, each asked in both orders."""
  return Task(name="sentiment", template=templates.SENTIMENT,
              consistency="comparative", key_from="pair_order",
              pair_fields=("word_a", "word_b"), id_field="id")


TASKS: dict[str, Callable[..., Task]] = {
    "truthfulqa": truthfulqa,
    "gsm8k": gsm8k,
    "alpaca": alpaca,
    "sentiment": sentiment,
}


def get_task(name: str, **options) -> Task:
  """A built-in task by name; `options` are that task's keyword options."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; built-in tasks: {sorted(TASKS)}")
  try:
    return TASKS[name](**options)
  except TypeError as e:  # an option the task does not take
    raise ValueError(f"task {name!r}: bad options {sorted(options)} ({e})"
                     ) from None
