"""Stage 1: ICM labels for the train split (optionally iterating with fine-tuning).

Writes `<workdir>/label/labels.jsonl` (one line per train example, in input
order: id, label 0/1 or null, final LOO scores, search batch, the rendered
claim, gold and the source record), the per-batch
search directories (checkpoints, metrics.jsonl) and `summary.json`.

One labelling per (variant, seed): variant "icm" is the search as
configured; "icm_no_consistency" is the same search (seed, budget) with the
task's consistency switched off (I(D) = 0, no fix), the ablation row of the
report. With several label seeds each gets a `seed_NNN/` directory:

  label/[seed_NNN/]labels.jsonl                  variant icm
  label/no_consistency/[seed_NNN/]labels.jsonl   variant icm_no_consistency
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Dict, Optional

import numpy as np

from icm_jax import storage
from icm_jax.labelling import (example_columns, model_scorer_factory,
                               run_icm)
from icm_jax.pipeline.inputs import Inputs, Model
from icm_jax.run_config import RunConfig
from icm_jax.search import split_into_batches
from icm_jax.search.consistency import UNLABELLED
from icm_jax.search.outputs import write_labels
from icm_jax.tasks import DataError, Task

log = logging.getLogger(__name__)

LABEL_DIR = "label"
LABELS_FILE = "labels.jsonl"
VARIANTS = ("icm", "icm_no_consistency")
_VARIANT_DIRS = {"icm": "", "icm_no_consistency": "no_consistency"}


def variant_dir(workdir: str, variant: str = "icm",
                seed: Optional[int] = None) -> str:
  """Where one labelling lives; `seed` None = the single-seed layout."""
  if variant not in VARIANTS:
    raise ValueError(f"label variant {variant!r} not in {VARIANTS}")
  parts = [workdir, LABEL_DIR, _VARIANT_DIRS[variant]]
  if seed is not None:
    parts.append(f"seed_{seed:03d}")
  return storage.join(*[p for p in parts if p])


def labels_path(workdir: str, variant: str = "icm",
                seed: Optional[int] = None) -> str:
  return storage.join(variant_dir(workdir, variant, seed), LABELS_FILE)


def without_consistency(task: Task) -> Task:
  """`task` with consistency "none": the search's I(D) is 0 and nothing is
  fixed (prompts, groups and label words unchanged)."""
  return dataclasses.replace(task, consistency="none", key_field=None,
                             key_from=None)


def read_labels(workdir: str, variant: str = "icm",
                seed: Optional[int] = None) -> Dict[str, Optional[int]]:
  """id -> ICM label (None if the search never labelled it)."""
  path = labels_path(workdir, variant, seed)
  if not storage.exists(path):
    raise FileNotFoundError(
        f"{path} does not exist: run the 'label' stage first "
        "(--config.stages=label,...)")
  labels = {}
  for n, line in enumerate(storage.read_text(path).splitlines(), 1):
    try:
      record = json.loads(line)
      labels[record["id"]] = record["label"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise DataError(f"{path} line {n}: malformed labels line ({e})"
                      ) from None
  return labels


def run_label_stage(cfg: RunConfig, inputs: Inputs, model: Model, mesh,
                    workdir: str, finetune=None, variant: str = "icm",
                    seed: Optional[int] = None) -> Dict[str, Optional[int]]:
  """ICM over inputs.train; returns id -> label.

  `workdir` is where this process writes (see pipeline.run: process 0 the
  run's workdir, other processes a scratch copy). `seed` (None: the config's
  search.seed, single-seed layout) sets search.seed. `finetune(examples,
  labels, run_name) -> params` is required for the iterative scheme (label
  batch k with M_{k-1}, fine-tune M0 on every label found so far -> M_k).
  """
  label_dir = variant_dir(workdir, variant, seed)
  task = inputs.task if variant == "icm" else without_consistency(inputs.task)
  search_config = (cfg.search if seed is None else
                   dataclasses.replace(cfg.search, seed=seed))
  common = dict(task=task, tokenizer=model.tokenizer, search=search_config,
                context_length=model.max_context, label_rule=cfg.label_rule,
                progress=cfg.progress)
  if not cfg.iterative:
    run = run_icm(inputs.train, scorer_factory=model_scorer_factory(
        model.config, model.params, cfg.scoring, mesh=mesh),
                  batch_size=cfg.label_batch_size, workdir=label_dir, **common)
    return {i: (None if l == UNLABELLED else int(l))
            for i, l in zip(run.ids, run.labels)}
  if finetune is None:
    raise ValueError("label.iterative needs a fine-tuning function")
  examples = inputs.train
  batches = split_into_batches([e.group for e in examples],
                               cfg.label_batch_size, cfg.search.seed)
  labels = np.full(len(examples), UNLABELLED, np.int8)
  log_p = np.full((2, len(examples)), np.nan, np.float32)
  batch_of = np.empty(len(examples), np.int64)
  params = model.params
  for k, members in enumerate(batches):
    batch_examples = [examples[i] for i in members]
    search = dataclasses.replace(search_config, seed=search_config.seed + k)
    run = run_icm(batch_examples, scorer_factory=model_scorer_factory(
        model.config, params, cfg.scoring, mesh=mesh),
                  batch_size=len(batch_examples),
                  workdir=storage.join(label_dir, f"iteration_{k:03d}"),
                  **dict(common, search=search))
    labels[members] = run.labels
    log_p[:, members] = run.log_p_false, run.log_p_true
    batch_of[members] = k
    log.info("iteration %d: %d examples labelled, gold agreement %s", k,
             int((run.labels != UNLABELLED).sum()), run.gold_agreement)
    if k + 1 < len(batches):
      # M_k: M0 fine-tuned on every ICM label so far; it labels batch k+1.
      params = finetune(examples, labels, f"iteration_{k:03d}")
  write_labels(storage.join(label_dir, LABELS_FILE), [e.id for e in examples],
               labels, log_p[0], log_p[1], batch=batch_of,
               **example_columns(examples))
  return {e.id: (None if l == UNLABELLED else int(l))
          for e, l in zip(examples, labels)}
