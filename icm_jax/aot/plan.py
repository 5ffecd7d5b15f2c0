"""Roofline plan of a paper-scale run: how long, at best, on a given slice.

Every call is priced per chip by the analytic costs of icm_jax.aot.costs
(the same static shapes the scorer and trainer would compile) as

    max(FLOPs / peak bf16 FLOP/s, HBM bytes / HBM bandwidth)

which is a LOWER BOUND: it assumes perfect overlap, peak matmul throughput,
no collective or host time, and attention that skips every masked (query,
key) pair (splash's tile skipping approaches this). Calls are summed.

The ICM search is accounted by running the real search loop
(`icm_jax.search.ICMSearch`, Algorithm 1 + 2) against a stand-in model whose
log-odds per example are fixed random numbers: the loop decides, exactly as
in a real run, which calls it makes (per iteration: one prediction call that
scores the sampled example; if the label changes, Algorithm 2's calls: one
per inconsistent pair it examines, scoring that pair's consistent options,
or one scoring the tentative assignment when it is consistent) and with which
labels, so each call is priced at the shapes it would really have. Only the
acceptance decisions depend on the stand-in's scores.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from icm_jax.aot.costs import (Cost, exact_cost, exact_shared_cost, tree_cost,
                               parallel_cache_cost, parallel_query_cost,
                               shared_context_cost, train_step_cost)
from icm_jax.aot.errors import AotError
from icm_jax.aot.layouts import (exact_layout, exact_shared_layout,
                                 parallel_layout, shared_context_layout,
                                 tree_call_plan)
from icm_jax.aot.topology import Chip, Topology
from icm_jax.aot.workload import Workload
from icm_jax.model import LlamaConfig
from icm_jax.scoring import layout
from icm_jax.scoring.scorer import TREE_ROWS_PATH_MAX, ScoringConfig, Scores
from icm_jax.search.config import SearchConfig
from icm_jax.training import data as train_data
from icm_jax.training.config import TrainConfig


@dataclasses.dataclass
class Ledger:
  """Per-chip totals of a series of calls, each priced at its roofline."""

  calls: int = 0
  cost: Cost = dataclasses.field(default_factory=Cost)
  compute_seconds: float = 0.0
  memory_seconds: float = 0.0
  seconds: float = 0.0     # sum over calls of max(compute, memory)

  def add(self, cost: Cost, chip: Chip, times: int = 1):
    compute, memory = cost.seconds(chip)
    self.calls += times
    self.cost = self.cost + cost * times
    self.compute_seconds += compute * times
    self.memory_seconds += memory * times
    self.seconds += max(compute, memory) * times
    return self

  def merge(self, other: "Ledger") -> "Ledger":
    self.calls += other.calls
    self.cost = self.cost + other.cost
    self.compute_seconds += other.compute_seconds
    self.memory_seconds += other.memory_seconds
    self.seconds += other.seconds
    return self


@dataclasses.dataclass(frozen=True)
class Target:
  """A model on a slice with a mesh."""

  model: LlamaConfig
  model_name: str
  chip: Chip
  topology: str
  num_chips: int
  mesh: Dict[str, int]    # resolved data / fsdp / tensor sizes

  @property
  def divisor(self) -> int:
    return self.mesh["data"] * self.mesh["fsdp"]

  @property
  def tensor(self) -> int:
    return self.mesh["tensor"]

  @property
  def label(self) -> str:
    mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
    return f"{self.model_name} on {self.topology} ({mesh})"


def make_target(model: LlamaConfig, model_name: str,
                topology: Topology, mesh_config) -> Target:
  from icm_jax.sharding import AXES, MeshConfig
  sizes = MeshConfig.from_any(mesh_config).resolve(topology.num_chips)
  return Target(model, model_name, topology.chip, topology.name,
                topology.num_chips, dict(zip(AXES, sizes)))


# -----------------------------------------------------------------------------
# One U(D) evaluation
# -----------------------------------------------------------------------------


def all_labelled(workload: Workload) -> np.ndarray:
  return (np.arange(workload.num_examples) % 2)[None].astype(np.int32)


def call_cost(target: Target, workload: Workload, scoring: ScoringConfig,
              mode: str, labels: np.ndarray,
              queries: Optional[np.ndarray] = None) -> Cost:
  """Per-chip cost of one scorer call with these labels and queries."""
  if mode == "exact":
    lay = exact_shared_layout(workload, labels, queries, scoring,
                              target.divisor)
    return exact_shared_cost(target.model, lay, target.divisor,
                             target.tensor)
  if mode == "exact_unshared":
    lay = exact_layout(workload, labels, queries, scoring, target.divisor,
                       target.model.max_position_embeddings)
    return exact_cost(target.model, lay, target.divisor, target.tensor)
  if mode == "parallel":
    lay = parallel_layout(workload, labels, queries, scoring, target.divisor)
    return parallel_query_cost(target.model, lay, target.divisor,
                               target.tensor)
  if mode == "tree":
    return _tree_call_cost(target, workload, labels, queries, scoring)
  if mode == "shared":
    lay = shared_context_layout(workload, labels, queries, scoring,
                                target.divisor)
    return shared_context_cost(target.model, lay, target.divisor,
                               target.tensor)
  raise AotError(f"--modes: unknown scoring mode {mode!r}")


def _tree_call_cost(target: Target, workload: Workload, labels, queries,
                    scoring: ScoringConfig) -> Cost:
  """Tree mode as LOOScorer runs it: its own plan, or plain prompts for a
  call of at most TREE_ROWS_PATH_MAX rows (exact rows' lengths)."""
  labels = np.atleast_2d(np.asarray(labels)).astype(np.int32)
  cand_idx, query_idx = layout.scored_rows(labels, queries)
  if len(query_idx) <= TREE_ROWS_PATH_MAX:
    lay = exact_layout(workload, labels, queries, scoring, target.divisor,
                       target.model.max_position_embeddings)
    return exact_cost(target.model, lay, target.divisor, target.tensor)
  plan = tree_call_plan(workload, labels, cand_idx, query_idx, scoring,
                        target.divisor)
  return tree_cost(target.model, plan, target.divisor, target.tensor)


def cache_cost(target: Target, workload: Workload,
               scoring: ScoringConfig) -> Cost:
  lay = parallel_layout(workload, all_labelled(workload), None, scoring,
                        target.divisor)
  return parallel_cache_cost(target.model, workload, lay, target.divisor,
                             target.tensor)


# -----------------------------------------------------------------------------
# The ICM search
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RecordedCall:
  labels: np.ndarray               # [C, N]
  queries: Optional[np.ndarray]    # [C, N] or None (= the labelled ones)

  @property
  def kind(self) -> str:
    return "prediction" if self.queries is not None else "evaluation"


def simulate_search(workload: Workload, search: SearchConfig,
                    seed: int = 0) -> Tuple[List[RecordedCall], object]:
  """The scorer calls of one ICM search over the workload's N examples."""
  from icm_jax.search import ICMSearch
  from icm_jax.search.consistency import Consistency

  n = workload.num_examples
  groups = list(workload.groups) or [str(i // 4) for i in range(n)]
  keys = list(workload.keys) or [str(i % 3) for i in range(n)]
  kind = workload.consistency_kind
  if kind == "none":
    keys = [None] * n
  consistency = Consistency.build(groups, keys, kind)
  log_odds = np.random.default_rng(seed).normal(0.0, 2.0, n)
  log_true = -np.logaddexp(0.0, -log_odds)
  log_false = -np.logaddexp(0.0, log_odds)
  recorded: List[RecordedCall] = []

  def score_fn(labels, queries=None):
    labels = np.atleast_2d(np.asarray(labels))
    asked = None if queries is None else np.broadcast_to(
        np.asarray(queries, bool), labels.shape).copy()
    recorded.append(RecordedCall(labels.astype(np.int8).copy(), asked))
    mask = labels >= 0 if asked is None else asked
    lf = np.where(mask, log_false[None], np.nan).astype(np.float32)
    lt = np.where(mask, log_true[None], np.nan).astype(np.float32)
    return Scores(lf, lt)

  # The stub's scores ignore the context, so the search would revisit
  # assignments (and hit the score cache) far more often than on a model:
  # plan without the cache, an upper bound on the calls.
  search = dataclasses.replace(search, score_cache=0)
  result = ICMSearch(score_fn, consistency, search).run(workdir=None,
                                                       progress=False)
  return recorded, result


@dataclasses.dataclass
class SearchPlan:
  mode: str
  iterations: int
  prediction: Ledger
  evaluation: Ledger
  cache: Ledger
  candidates: int          # assignments scored by evaluation calls
  labelled_at_end: int

  @property
  def total(self) -> Ledger:
    return Ledger().merge(self.prediction).merge(self.evaluation).merge(
        self.cache)


def search_plan(target: Target, workload: Workload,
                scoring: ScoringConfig, mode: str,
                recorded: Sequence[RecordedCall], iterations: int,
                labelled_at_end: int) -> SearchPlan:
  prediction, evaluation, cache = Ledger(), Ledger(), Ledger()
  candidates = 0
  memo: Dict[tuple, Cost] = {}
  for call in recorded:
    key = (call.labels.tobytes(), call.labels.shape,
           None if call.queries is None else call.queries.tobytes())
    cost = memo.get(key)
    if cost is None:
      cost = memo[key] = call_cost(target, workload, scoring, mode,
                                   call.labels, call.queries)
    if call.kind == "prediction":
      prediction.add(cost, target.chip)
    else:
      evaluation.add(cost, target.chip)
      candidates += call.labels.shape[0]
  if mode == "parallel":
    cache.add(cache_cost(target, workload, scoring), target.chip)
  return SearchPlan(mode, iterations, prediction, evaluation, cache,
                    candidates, labelled_at_end)


# -----------------------------------------------------------------------------
# Fine-tuning
# -----------------------------------------------------------------------------


def epoch_plan(target: Target, workload: Workload, train: TrainConfig
               ) -> Tuple[Ledger, Dict[int, int]]:
  """One epoch over workload.train_lengths in the trainer's data order.

  Returns the ledger and {bucketed sequence length: steps}.
  """
  lengths = np.asarray(workload.train_lengths or workload.prompt_lengths)
  n = len(lengths)
  model = dataclasses.replace(target.model, remat=train.remat)
  max_len = model.max_position_embeddings
  steps = train_data.num_steps(n, 1, train.batch_size)
  ledger, buckets = Ledger(), {}
  for step in range(steps):
    idx = train_data.step_example_indices(step, n, 1, train.batch_size,
                                          train.seed)
    rows = lengths[idx[idx >= 0]] + workload.header_len
    seq_len = train_data.bucket_length(int(rows.max()), train.min_seq_len,
                                       max_len)
    buckets[seq_len] = buckets.get(seq_len, 0) + 1
    real = np.zeros(train.batch_size)
    real[:len(rows)] = rows
    cost = train_step_cost(model, seq_len, train, target.divisor,
                           target.tensor, target.num_chips,
                           real_lengths=real)
    ledger.add(cost, target.chip)
  return ledger, buckets


# -----------------------------------------------------------------------------
# The table
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
  target: str
  what: str
  calls: int
  ledger: Ledger


def _fmt_seconds(s: float) -> str:
  if s < 1:
    return f"{s * 1000:.0f} ms"
  if s < 120:
    return f"{s:.1f} s"
  if s < 7200:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.1f} h"


def _fmt_flops(f: float) -> str:
  for unit, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9)):
    if f >= scale:
      return f"{f / scale:.2f} {unit}"
  return f"{f:.3g}"


def _fmt_bytes(b: float) -> str:
  for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
    if b >= scale:
      return f"{b / scale:.2f} {unit}"
  return f"{b:.3g} B"


def markdown_table(rows: Sequence[Row]) -> str:
  head = ("| target | what | calls | matmul FLOPs/chip | attention FLOPs/chip "
          "(visible; dense) | HBM bytes/chip | compute time | memory time | "
          "roofline lower bound |")
  lines = [head, "|" + "---|" * 9]
  for r in rows:
    c = r.ledger.cost
    lines.append(
        f"| {r.target} | {r.what} | {r.calls} | {_fmt_flops(c.matmul_flops)} "
        f"| {_fmt_flops(c.attention_visible_flops)}; "
        f"{_fmt_flops(c.attention_dense_flops)} | {_fmt_bytes(c.hbm_bytes)} "
        f"| {_fmt_seconds(r.ledger.compute_seconds)} "
        f"| {_fmt_seconds(r.ledger.memory_seconds)} "
        f"| **{_fmt_seconds(r.ledger.seconds)}** |")
  return "\n".join(lines)


def plan_rows(target: Target, workload: Workload, scoring: ScoringConfig,
              search: SearchConfig, train: TrainConfig,
              modes: Sequence[str] = ("exact", "parallel"),
              recorded: Optional[Tuple[List[RecordedCall], object]] = None
              ) -> Tuple[List[Row], dict]:
  """Table rows for one target, and the facts behind them (for notes)."""
  name = target.label
  n = workload.num_examples
  rows: List[Row] = []
  facts: dict = {}
  full = all_labelled(workload)
  for mode in modes:
    if mode == "parallel":
      rows.append(Row(name, f"parallel: demo KV cache build (once per "
                      f"search, {2 * n} slots)", 1,
                      Ledger().add(cache_cost(target, workload, scoring),
                                   target.chip)))
    rows.append(Row(name, f"{mode}: one U(D) evaluation, N={n} all "
                    "labelled", 1,
                    Ledger().add(call_cost(target, workload, scoring, mode,
                                           full), target.chip)))
  if recorded is None:
    recorded = simulate_search(workload, search)
  calls, result = recorded
  labelled = int((result.labels >= 0).sum())
  for mode in modes:
    plan = search_plan(target, workload, scoring, mode, calls,
                       result.iterations, labelled)
    facts[mode] = plan
    rows.append(Row(
        name, f"{mode}: ICM search, {result.iterations} iterations "
        f"({plan.prediction.calls} prediction calls + "
        f"{plan.evaluation.calls} evaluation calls scoring "
        f"{plan.candidates} assignments)",
        plan.total.calls, plan.total))
  epoch, buckets = epoch_plan(target, workload, train)
  facts["epoch_buckets"] = buckets
  lengths = ", ".join(f"{v}x{k}" for k, v in sorted(buckets.items()))
  rows.append(Row(name, f"fine-tuning: one epoch, "
                  f"{len(workload.train_lengths or workload.prompt_lengths)} "
                  f"examples, batch {train.batch_size} ({lengths} tokens)",
                  epoch.calls, epoch))
  facts["labelled_at_end"] = labelled
  facts["iterations"] = result.iterations
  facts["flips"] = result.flips
  return rows, facts
