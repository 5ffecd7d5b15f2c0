"""Stage 3: the paper's Figure-3 comparison on the test split.

Test accuracy against gold of: zero-shot; many-shot prompting with gold
labels and with ICM labels (the same demonstrations, in the same order: as
many train examples as fit `eval.max_context`); and the base model fine-tuned
on gold, ICM and random labels (then prompted zero-shot). Writes
`report.json` and `accuracy.png` to the workdir.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from icm_jax.evaluation.prompting import (label_log_probs,
                                          select_demonstrations)
from icm_jax.evaluation.report import (MethodResult, format_table,
                                       method_result, write_report)
from icm_jax.pipeline.inputs import Inputs, Model, example_tokens, gold_of
from icm_jax.run_config import RunConfig

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
ACCURACY_PLOT = "accuracy.png"


def demo_candidates(cfg: RunConfig, inputs: Inputs,
                    icm_labels: Optional[Dict[str, Optional[int]]]) -> List[int]:
  """Train indices usable as demonstrations by every requested many-shot
  method, in a seeded order (labels do not influence which are chosen)."""
  need_gold = "many_shot_gold" in cfg.eval_methods
  need_icm = "many_shot_icm" in cfg.eval_methods
  usable = [i for i, e in enumerate(inputs.train)
            if (not need_gold or e.gold is not None) and
            (not need_icm or icm_labels.get(e.id) is not None)]
  order = np.random.default_rng(cfg.demo_seed).permutation(len(usable))
  return [usable[k] for k in order]


def run_eval_stage(cfg: RunConfig, inputs: Inputs, model: Model, mesh,
                   workdir: str, icm_labels: Optional[Dict[str, Optional[int]]],
                   finetuned: Callable[[str], object], write: bool,
                   events=None, metadata: Optional[dict] = None) -> dict:
  """Runs every method in cfg.eval_methods; returns the report dict.

  `finetuned(source)` returns the params of the base model fine-tuned on
  that label source. Every process computes; only `write` ones write files.
  """
  test_gold = gold_of(inputs.test)
  if test_gold is None:
    first = next(e.id for e in inputs.test if e.gold is None)
    raise ValueError(f"the eval stage needs gold labels on every test "
                     f"example; {first} has none")
  needs_icm = any(m.endswith("_icm") for m in cfg.eval_methods)
  if needs_icm and icm_labels is None:
    raise ValueError("eval methods " + ",".join(
        m for m in cfg.eval_methods if m.endswith("_icm")) +
                     " need ICM labels: run the label stage first")
  train_gold_missing = any(e.gold is None for e in inputs.train)
  tokens = example_tokens(cfg, inputs.task, model.tokenizer,
                          list(inputs.train) + list(inputs.test))
  queries = list(range(len(inputs.train), len(inputs.train) + len(inputs.test)))
  max_context = cfg.eval_max_context or model.max_context
  common = dict(mesh=mesh, batch_size=cfg.eval_batch_size,
                progress=cfg.progress)
  demos = None
  results: List[MethodResult] = []
  skipped = {}
  for method in cfg.eval_methods:
    if method.endswith("_gold") and train_gold_missing:
      skipped[method] = "the train split lacks gold labels"
      log.warning("skipping %s: %s", method, skipped[method])
      continue
    log.info("eval: %s on %d test examples", method, len(queries))
    if method == "zero_shot":
      lf, lt = label_log_probs(model.config, model.params, tokens, queries,
                               **common)
      results.append(method_result(method, lf, lt, test_gold))
    elif method.startswith("many_shot_"):
      if demos is None:
        demos = select_demonstrations(tokens, demo_candidates(
            cfg, inputs, icm_labels), queries, max_context)
        log.info("many-shot: %d demonstrations fit %d tokens", len(demos),
                 max_context)
      if method == "many_shot_gold":
        demo_labels = [inputs.train[d].gold for d in demos]
      else:
        demo_labels = [icm_labels[inputs.train[d].id] for d in demos]
      lf, lt = label_log_probs(model.config, model.params, tokens, queries,
                               demos=demos, demo_labels=demo_labels, **common)
      results.append(method_result(method, lf, lt, test_gold,
                                   num_demonstrations=len(demos)))
    else:
      source = method[len("finetune_"):]
      params = finetuned(source)
      lf, lt = label_log_probs(model.config, params, tokens, queries, **common)
      results.append(method_result(method, lf, lt, test_gold))
    log.info("%s: accuracy %.4f", method, results[-1].accuracy)
    if events is not None:
      events.scalar(f"eval/{method}", results[-1].accuracy, 0)
  log.info("test accuracy:\n%s", format_table(results))
  report = dict(metadata or {}, num_test=len(inputs.test),
                num_train=len(inputs.train), max_context=max_context,
                skipped=skipped)
  if write:
    report = write_report(os.path.join(workdir, REPORT_FILE), results,
                          **report)
    from icm_jax.evaluation.plots import plot_accuracy_bars
    plot_accuracy_bars(results, os.path.join(workdir, ACCURACY_PLOT),
                       title=f"{inputs.task.name}: {model.description}")
  return report
