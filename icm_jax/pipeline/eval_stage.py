"""Stage 3: the paper's Figure-3 comparison on the test split, with baselines.

Test metrics against gold (`evaluation.report`) of:
  zero_shot;
  many_shot_gold / many_shot_icm / many_shot_random: the same demonstrations
      in the same order (as many train examples as fit `eval.max_context`),
      labelled with gold, ICM or coin-flip labels;
  many_shot_inverted: the same, labelled with gold flipped: the control
      that says whether many-shot accuracy tells good labels from bad
      (`label_accuracy.separation`, in the report as "separation");
  icm_no_consistency: many-shot with the labels of the same search run
      without consistency (the ablation; label stage variant);
  bootstrap_consistent: many-shot with the labels of the bootstrap +
      consistency baseline (`evaluation.bootstrap`, eval.bootstrap_rounds);
  finetune_gold / finetune_icm / finetune_random / finetune_inverted: the
      base model fine-tuned on those labels, then prompted zero-shot
      (finetune_inverted, gold flipped, is the fine-tuning rows' control:
      "separation_finetune" in the report).
ICM-derived rows and many_shot_random get one row per label seed.

With train gold, the report also carries "label_accuracy": the agreement of
every method's train labels with train gold (`evaluation.label_accuracy`;
ICM per seed, bootstrap per round, coin flips, zero-shot decoded
group-consistently) beside a random consistent labelling's level. Writes
`report.json`, `accuracy.png` and `label_accuracy.png` to the workdir.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from icm_jax import storage
from icm_jax.evaluation.bootstrap import bootstrap_labels
from icm_jax.evaluation.decoding import group_consistent_labels
from icm_jax.evaluation.label_accuracy import (chance_agreement,
                                               format_label_table, label_row,
                                               separation)
from icm_jax.evaluation.prompting import (label_log_probs,
                                          select_demonstrations)
from icm_jax.evaluation.report import (MethodResult, format_table,
                                       method_result, summarize, write_report)
from icm_jax.pipeline.inputs import Inputs, Model, example_tokens, gold_of
from icm_jax.tasks import Example
from icm_jax.run_config import SEEDED_METHODS, RunConfig

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"
ACCURACY_PLOT = "accuracy.png"
LABEL_ACCURACY_PLOT = "label_accuracy.png"


# (label variant, seed) -> id -> label (None where the search left it).
LabelSets = Dict[Tuple[str, int], Dict[str, Optional[int]]]
# Methods that read each label variant.
_VARIANT_OF = {"many_shot_icm": "icm", "finetune_icm": "icm",
               "icm_no_consistency": "icm_no_consistency"}


def needed_variants(methods, consistency: str = "keyed") -> List[str]:
  """The label-stage variants the eval methods read (a task without
  consistency has no ablation to run: icm_no_consistency would be icm)."""
  return sorted({_VARIANT_OF[m] for m in methods if m in _VARIANT_OF and not (
      m == "icm_no_consistency" and consistency == "none")})


def demo_candidates(cfg: RunConfig, inputs: Inputs,
                    label_sets: Optional[LabelSets]) -> List[int]:
  """Train indices usable as demonstrations by every requested many-shot
  method, in a seeded order (labels do not influence which are chosen)."""
  need_gold = bool({"many_shot_gold", "many_shot_inverted"} &
                   set(cfg.eval_methods))
  variants = needed_variants(
      [m for m in cfg.eval_methods if not m.startswith("finetune_")],
      inputs.task.consistency)
  sets = [labels for (variant, _), labels in (label_sets or {}).items()
          if variant in variants]
  usable = [i for i, e in enumerate(inputs.train)
            if (not need_gold or e.gold is not None) and
            all(labels.get(e.id) is not None for labels in sets)]
  order = np.random.default_rng(cfg.demo_seed).permutation(len(usable))
  return [usable[k] for k in order]


def run_eval_stage(cfg: RunConfig, inputs: Inputs, model: Model, mesh,
                   workdir: str, label_sets: Optional[LabelSets],
                   finetuned: Callable[[str, Optional[int]], object],
                   write: bool, events=None,
                   metadata: Optional[dict] = None) -> dict:
  """Runs every method in cfg.eval_methods; returns the report dict.

  `label_sets` holds the label stage's labellings for every seed in
  cfg.seeds and every variant the methods need. `finetuned(source, seed)`
  returns the params of the base model fine-tuned on that label source (seed
  None for gold/random). Every process computes; only `write` ones write.
  """
  test_gold = gold_of(inputs.test)
  if test_gold is None:
    first = next(e.id for e in inputs.test if e.gold is None)
    raise ValueError(f"the eval stage needs gold labels on every test "
                     f"example; {first} has none")
  for variant in needed_variants(cfg.eval_methods, inputs.task.consistency):
    missing = [s for s in cfg.seeds if (variant, s) not in (label_sets or {})]
    if missing:
      users = [m for m in cfg.eval_methods if _VARIANT_OF.get(m) == variant]
      raise ValueError(f"eval methods {','.join(users)} need {variant} labels "
                       f"for seeds {missing}: run the label stage first")
  train_gold_missing = any(e.gold is None for e in inputs.train)
  tokens = example_tokens(cfg, inputs.task, model.tokenizer,
                          list(inputs.train) + list(inputs.test))
  queries = list(range(len(inputs.train), len(inputs.train) + len(inputs.test)))
  max_context = cfg.eval_max_context or model.max_context
  common = dict(mesh=mesh, batch_size=cfg.eval_batch_size,
                progress=cfg.progress)
  test_consistency = ([e.group for e in inputs.test],
                      [e.key for e in inputs.test], inputs.task.consistency)
  state = {}

  def demos():
    if "demos" not in state:
      state["demos"] = select_demonstrations(
          tokens, demo_candidates(cfg, inputs, label_sets), queries,
          max_context)
      log.info("many-shot: %d demonstrations fit %d tokens",
               len(state["demos"]), max_context)
    return state["demos"]

  def row(method, params, demo_labels=None, seed=None, **extra):
    shown = demos() if demo_labels is not None else []
    lf, lt = label_log_probs(model.config, params, tokens, queries,
                             demos=shown, demo_labels=demo_labels, **common)
    return method_result(method, lf, lt, test_gold, test_consistency,
                         num_demonstrations=len(shown), seed=seed,
                         extra=extra)

  def labels_of(variant, seed):
    labels = label_sets[(variant, seed)]
    return [labels[inputs.train[d].id] for d in demos()]

  train_labels = {}  # method -> [(seed, labels of every train claim)]

  results: List[MethodResult] = []
  skipped = {}
  for method in cfg.eval_methods:
    if (method.endswith("_gold") or method.endswith("_inverted")) and (
        train_gold_missing):
      skipped[method] = "the train split lacks gold labels"
    elif (method == "icm_no_consistency" and
          inputs.task.consistency == "none"):
      skipped[method] = "the task has no consistency (it equals many_shot_icm)"
    if method in skipped:
      log.warning("skipping %s: %s", method, skipped[method])
      continue
    seeds = cfg.seeds if method in SEEDED_METHODS else (None,)
    for seed in seeds:
      log.info("eval: %s%s on %d test examples", method,
               "" if seed is None else f" (seed {seed})", len(queries))
      if method == "zero_shot":
        results.append(row(method, model.params))
      elif method in ("many_shot_gold", "many_shot_inverted"):
        results.append(row(method, model.params, gold_demo_labels(
            [inputs.train[d] for d in demos()],
            inverted=method == "many_shot_inverted")))
      elif method in ("many_shot_icm", "icm_no_consistency"):
        results.append(row(method, model.params,
                           labels_of(_VARIANT_OF[method], seed), seed))
      elif method == "many_shot_random":
        coins = np.random.default_rng([seed, 2]).integers(0, 2, len(demos()))
        results.append(row(method, model.params, coins.tolist(), seed))
      elif method == "bootstrap_consistent":
        labels, agreement = _bootstrap(cfg, inputs, model, tokens, common,
                                       max_context)
        train_labels[method] = [(None, [int(l) for l in labels])]
        results.append(row(method, model.params,
                           [int(labels[d]) for d in demos()],
                           train_gold_agreement_by_round=agreement))
      else:
        source = method[len("finetune_"):]
        params = finetuned(source, seed if source == "icm" else None)
        results.append(row(method, params, seed=seed))
      log.info("%s: accuracy %.4f, consistent accuracy %.4f", method,
               results[-1].accuracy, results[-1].consistent_accuracy)
      if events is not None:
        tag = method if seed is None else f"{method}/seed_{seed}"
        events.scalar(f"eval/{tag}", results[-1].accuracy, 0)
  log.info("test metrics:\n%s", format_table(results))
  headline = headline_metric(inputs.task.consistency)
  report = dict(metadata or {}, num_test=len(inputs.test),
                num_train=len(inputs.train), max_context=max_context,
                consistency=inputs.task.consistency, headline=headline,
                skipped=skipped)
  by_method = {r.method: r for r in results if r.seed is None}
  for prefix, key in (("many_shot", "separation"),
                      ("finetune", "separation_finetune")):
    if {f"{prefix}_gold", f"{prefix}_inverted"} <= set(by_method):
      report[key] = separation(by_method[f"{prefix}_gold"],
                               by_method[f"{prefix}_inverted"], headline)
      log.info("control: %s", report[key]["statement"])
  label_rows = []
  if not train_gold_missing:
    label_rows, chance = _label_accuracy(cfg, inputs, model, tokens, common,
                                         label_sets, train_labels)
    report["label_accuracy"] = {
        "chance_random_consistent": chance,
        "results": [dataclasses.asdict(r) for r in label_rows],
        "summary": [dataclasses.asdict(s) for s in summarize(label_rows)]}
    log.info("train label accuracy (against train gold, for reporting "
             "only):\n%s", format_label_table(label_rows, chance))
  if write:
    report = write_report(storage.join(workdir, REPORT_FILE), results,
                          **report)
    from icm_jax.evaluation.plots import plot_accuracy_bars
    plot_accuracy_bars(results, storage.join(workdir, ACCURACY_PLOT),
                       title=f"{inputs.task.name}: {model.description}",
                       metric=headline)
    if label_rows:
      plot_accuracy_bars(
          label_rows, storage.join(workdir, LABEL_ACCURACY_PLOT),
          title=f"train label accuracy: {inputs.task.name}, "
          f"{model.description}", metric="accuracy",
          chance=report["label_accuracy"]["chance_random_consistent"],
          ylabel="agreement with train gold")
  return report


def gold_demo_labels(examples: Sequence[Example], inverted: bool = False
                     ) -> List[int]:
  """The demonstrations' gold labels, or every one flipped (the control;
  flipping keeps a comparative labelling consistent)."""
  return [1 - int(e.gold) if inverted else int(e.gold) for e in examples]


def _label_accuracy(cfg: RunConfig, inputs: Inputs, model: Model, tokens,
                    common, label_sets: Optional[LabelSets],
                    train_labels: Dict[str, list]):
  """Rows of train label accuracy and the random consistent level."""
  train = inputs.train
  gold = [int(e.gold) for e in train]
  groups = [e.group for e in train]
  keys = [e.key for e in train]
  kind = inputs.task.consistency
  rows = []
  for (variant, seed), labels in sorted((label_sets or {}).items(),
                                        key=lambda kv: (kv[0][0] != "icm",
                                                        kv[0])):
    rows.append(label_row(variant, [labels.get(e.id) for e in train], gold,
                          seed))
  for method, seeded in train_labels.items():
    for seed, labels in seeded:
      rows.append(label_row(method, labels, gold, seed))
  for seed in cfg.seeds:
    coins = np.random.default_rng([seed, 3]).integers(0, 2, len(train))
    rows.append(label_row("coin_flips", coins.tolist(), gold, seed))
  lf, lt = label_log_probs(model.config, model.params, tokens,
                           list(range(len(train))), demos=[], **common)
  rows.append(label_row("zero_shot_consistent", group_consistent_labels(
      lf, lt, groups, keys, kind).tolist(), gold))
  return rows, chance_agreement(gold, groups, keys, kind)


def headline_metric(consistency: str) -> str:
  """Group-consistent accuracy where the task has consistency groups."""
  return "accuracy" if consistency == "none" else "consistent_accuracy"


def _bootstrap(cfg: RunConfig, inputs: Inputs, model: Model, tokens, common,
               max_context: int):
  """Final bootstrap + consistency train labels and, for the report only,
  their agreement with train gold after each round (None without gold)."""
  def score(queries, demos, demo_labels):
    return label_log_probs(model.config, model.params, tokens, queries,
                           demos=demos, demo_labels=demo_labels or None,
                           **common)

  def demos_for(queries, candidates):
    return select_demonstrations(tokens, candidates, queries, max_context)

  train = inputs.train
  history = bootstrap_labels(score, demos_for, [e.group for e in train],
                             [e.key for e in train], inputs.task.consistency,
                             cfg.bootstrap_rounds, seed=cfg.demo_seed)
  gold = gold_of(train)
  agreement = None if gold is None else [
      float(np.mean(np.asarray(h) == np.asarray(gold))) for h in history]
  log.info("bootstrap_consistent: train gold agreement by round %s",
           agreement)
  return history[-1], agreement
