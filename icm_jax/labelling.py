"""ICM over a task's examples: token batches → LOO scorer → annealing search.

    result = run_icm(examples, task=task, model=loaded_model,
                     search=SearchConfig(), scoring=ScoringConfig(),
                     batch_size=256, workdir="runs/tqa")

The examples are split into search batches of whole consistency groups
(`split_into_batches`, seeded by `search.seed`); each batch gets its own
scorer and its own search in `workdir/batch_NNN/` (checkpointed, resumable).
Then `workdir/labels.jsonl` (every example, in input order) and
`workdir/summary.json` (per-batch timing and counts) are written.

Gold labels (`Example.gold`) go only into the reported `gold_agreement`
numbers; the search never sees them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Callable, Optional, Sequence

import numpy as np

from icm_jax import storage
from icm_jax.search import (Consistency, ICMSearch, SearchConfig,
                            SearchResult, split_into_batches)
from icm_jax.search.consistency import UNLABELLED
from icm_jax.search.outputs import write_labels
from icm_jax.tasks import Example, Task
from icm_jax.tokenization import ExampleTokens, LabelWords, tokenize_examples

log = logging.getLogger(__name__)

LABELS_FILE = "labels.jsonl"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class BatchReport:
  batch: int
  num_examples: int
  iterations: int
  flips: int
  utility: float
  inconsistency: int
  labelled: int
  setup_seconds: float   # tokenising + building the scorer (demo cache)
  search_seconds: float  # the annealing loop, this process
  score_seconds: float   # inside the scoring call, this process
  score_calls: int
  gold_agreement: Optional[float]
  alpha: float           # U(D)'s alpha (search.alpha_rule)

  @property
  def host_share(self) -> float:
    """Share of the search loop spent outside the scoring call."""
    if self.search_seconds <= 0:
      return 0.0
    return 1.0 - self.score_seconds / self.search_seconds


@dataclasses.dataclass
class ICMRun:
  ids: tuple
  labels: np.ndarray       # [N] int8, -1 where a batch ended before labelling
  log_p_false: np.ndarray  # [N] final LOO log-probs
  log_p_true: np.ndarray
  batches: list            # [BatchReport]

  @property
  def scores(self) -> np.ndarray:
    """Final LOO log-odds log P(True) - log P(False)."""
    return self.log_p_true - self.log_p_false

  @property
  def gold_agreement(self) -> Optional[float]:
    rates = [(b.gold_agreement, b.labelled) for b in self.batches
             if b.gold_agreement is not None]
    if not rates:
      return None
    return sum(r * n for r, n in rates) / max(sum(n for _, n in rates), 1)


ScorerFactory = Callable[[ExampleTokens, Sequence[Example]], Callable]


def model_scorer_factory(model_config, params, scoring_config, mesh=None):
  """Builds the jitted LOO scorer for one batch of example tokens."""
  from icm_jax.scoring.scorer import LOOScorer

  def build(tokens: ExampleTokens, examples: Sequence[Example]):
    return LOOScorer(model_config, params, tokens, scoring_config, mesh=mesh,
                     groups=[e.group for e in examples]).score
  return build


def check_fits_context(tokens: ExampleTokens, context: int, batch: int):
  """Exact LOO with every other example labelled must fit the model context."""
  needed = (len(tokens.header) + sum(tokens.demo_length(i)
                                     for i in range(tokens.num_examples))
            - 1 - len(tokens.separator))
  if needed > context:
    raise ValueError(
        f"search batch {batch}: {tokens.num_examples} examples need up to "
        f"{needed} tokens in one LOO prompt > model context {context}; lower "
        "batch_size")


def run_icm(examples: Sequence[Example], *, task: Task, tokenizer,
            scorer_factory: ScorerFactory, search: SearchConfig,
            batch_size: int, workdir: str, context_length: Optional[int] = None,
            label_rule: str = "variants", separator: str = "\n\n",
            progress: bool = True) -> ICMRun:
  """Labels `examples` with ICM, one search per batch; see module docstring."""
  if not examples:
    raise ValueError("no examples to label")
  storage.makedirs(workdir)
  words = LabelWords(false=task.false_word, true=task.true_word,
                     rule=label_rule)
  ids = tuple(e.id for e in examples)
  batches = split_into_batches([e.group for e in examples], batch_size,
                               search.seed)
  log.info("%d examples in %d search batches (batch_size=%d)", len(examples),
           len(batches), batch_size)
  labels = np.full(len(examples), UNLABELLED, np.int8)
  log_p = np.full((2, len(examples)), np.nan, np.float32)
  reports = []
  for b, members in enumerate(batches):
    batch_examples = [examples[k] for k in members]
    t = time.perf_counter()
    tokens = tokenize_examples(tokenizer, [e.prompt for e in batch_examples],
                               ids=[e.id for e in batch_examples], words=words,
                               separator=separator)
    if context_length is not None:
      check_fits_context(tokens, context_length, b)
    score_fn = _Lazy(lambda: scorer_factory(tokens, batch_examples))
    consistency = Consistency.build([e.group for e in batch_examples],
                                    [e.key for e in batch_examples],
                                    task.consistency)
    gold = np.array([-1 if e.gold is None else e.gold for e in batch_examples])
    batch_search = ICMSearch(
        score_fn, consistency,
        dataclasses.replace(search, seed=_batch_seed(search.seed, b)),
        ids=[e.id for e in batch_examples], report=_gold_report(gold))
    setup = time.perf_counter() - t
    result = batch_search.run(storage.join(workdir, f"batch_{b:03d}"),
                              progress=progress)
    labels[members] = result.labels
    log_p[:, members] = result.log_p_false, result.log_p_true
    reports.append(_report(b, result, setup, score_fn.build_seconds, gold))
    log.info("batch %d: %s", b, reports[-1])
  run = ICMRun(ids, labels, log_p[0], log_p[1], reports)
  _write_outputs(workdir, run, batches, examples)
  return run


class _Lazy:
  """Builds the scorer on first use: a finished batch resumes without it."""

  def __init__(self, build):
    self._build, self._fn, self.build_seconds = build, None, 0.0

  def __call__(self, labels, queries=None):
    if self._fn is None:
      t = time.perf_counter()
      self._fn = self._build()
      self.build_seconds = time.perf_counter() - t
    return self._fn(labels, queries)


def example_columns(examples: Sequence[Example]) -> dict:
  """labels.jsonl's columns beside the label: the claim as the model read
  it, the gold label (null if none) and the source record's fields."""
  return {"claim": [e.prompt for e in examples],
          "gold": [e.gold for e in examples],
          "record": [dict(e.record) for e in examples]}


def _batch_seed(seed: int, batch: int) -> int:
  return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def gold_agreement(labels: np.ndarray, gold: np.ndarray) -> Optional[float]:
  """Share of labelled examples with gold (>= 0) whose label equals it."""
  mask = (gold >= 0) & (labels != UNLABELLED)
  return float((labels[mask] == gold[mask]).mean()) if mask.any() else None


def _gold_report(gold: np.ndarray):
  """The metrics log's reporting hook; None when the data has no gold."""
  if not (gold >= 0).any():
    return None
  return lambda labels: {"gold_agreement": gold_agreement(labels, gold)}


def _report(b, result: SearchResult, setup, build, gold) -> BatchReport:
  labelled = result.labels != UNLABELLED
  agreement = gold_agreement(result.labels, gold)
  # The first scoring call builds the scorer (for parallel mode: the demo
  # cache): count that as setup, not as search or scoring time.
  return BatchReport(b, len(result.labels), result.iterations, result.flips,
                     result.utility, result.inconsistency, int(labelled.sum()),
                     setup + build, result.total_seconds - build,
                     result.score_seconds - build, result.score_calls,
                     agreement, result.alpha)


def _write_outputs(workdir, run: ICMRun, batches, examples):
  batch_of = np.empty(len(run.ids), np.int64)
  for b, members in enumerate(batches):
    batch_of[members] = b
  write_labels(storage.join(workdir, LABELS_FILE), run.ids, run.labels,
               run.log_p_false, run.log_p_true, batch=batch_of,
               **example_columns(examples))
  summary = {"num_examples": len(run.ids),
             "labelled": int((run.labels != UNLABELLED).sum()),
             "gold_agreement": run.gold_agreement,
             "batches": [dict(dataclasses.asdict(r), host_share=r.host_share)
                         for r in run.batches]}
  storage.write_text(storage.join(workdir, SUMMARY_FILE),
                     json.dumps(summary, indent=1))
  unlabelled = int((run.labels == UNLABELLED).sum())
  if unlabelled:
    log.warning("%d of %d examples were never labelled (max_iterations too "
                "small); they are written with label null", unlabelled,
                len(run.ids))
