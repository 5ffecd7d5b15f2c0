"""Static shapes: the scorer's bucketing, for given labels and queries.

Each layout is what LOOScorer would pass its kernel in one mode, planned by
the scorer's own icm_jax.scoring.layout, plus what the costs need.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from icm_jax.aot.workload import Workload
from icm_jax.scoring import layout
from icm_jax.scoring.scorer import ScoringConfig


def _rows(labels, queries) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels [C, N], cand_idx, query_idx) as LOOScorer.score derives them."""
  labels = np.atleast_2d(np.asarray(labels)).astype(np.int32)
  return (labels,) + tuple(layout.scored_rows(labels, queries))


def _example_lengths(workload: Workload) -> layout.ExampleLengths:
  return layout.ExampleLengths(workload.header_len, workload.lengths,
                               workload.sep_len)


@dataclasses.dataclass(frozen=True)
class ExactSharedLayout:
  """What LOOScorer passes in exact mode with prefix sharing: the scorer's
  own plan (icm_jax.scoring.layout.shared_layout) plus what costs need."""

  plan: layout.SharedLayout
  groups: int             # packed sequences per micro-batch
  num_rows: int           # LOO rows scored

  @property
  def static(self) -> tuple:
    p = self.plan
    return (p.candidates, p.num_seq, p.full_len, p.packed_len)


def exact_shared_layout(workload: Workload, labels: np.ndarray,
                        queries: Optional[np.ndarray], scoring: ScoringConfig,
                        divisor: int) -> ExactSharedLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  plan = layout.shared_layout(
      _example_lengths(workload), labels, cand_idx, query_idx,
      min_rows=scoring.min_rows, min_seq_len=scoring.min_seq_len,
      groups=divisor)
  return ExactSharedLayout(plan, divisor, len(query_idx))


@dataclasses.dataclass(frozen=True)
class ExactLayout:
  """What LOOScorer passes in exact mode without sharing."""

  cands: int
  rows: int
  seq_len: int
  row_lengths: np.ndarray  # [num real rows]
  chunk: int               # rows per micro-batch

  @property
  def static(self) -> tuple:
    return (self.cands, self.rows, self.seq_len)


def exact_layout(workload: Workload, labels: np.ndarray,
                 queries: Optional[np.ndarray], scoring: ScoringConfig,
                 divisor: int, max_positions: int) -> ExactLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  chunk = layout.chunk_rows(scoring.rows_per_chunk, divisor)
  rows = layout.row_layout(labels.shape[0], cand_idx, query_idx,
                           min_rows=scoring.min_rows, chunk=chunk)
  lengths = layout.exact_row_lengths(_example_lengths(workload), labels,
                                     cand_idx, query_idx)
  seq_len = layout.exact_seq_len(lengths, min_seq_len=scoring.min_seq_len,
                                 context=max_positions)
  return ExactLayout(rows.candidates, rows.rows, seq_len, lengths, chunk)


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
  """Shapes of parallel mode: the demo cache and one query call."""

  cands: int
  rows: int
  chunk: int
  groups: int
  width: int
  end_position: int
  cache_len: int
  num_queries: int
  query_lengths: np.ndarray        # [num real rows] prompt tokens
  visible_cache_keys: np.ndarray   # [num real rows] cache keys each sees

  @property
  def static(self) -> tuple:
    return (self.cands, self.rows)


def parallel_layout(workload: Workload, labels: np.ndarray,
                    queries: Optional[np.ndarray], scoring: ScoringConfig,
                    divisor: int) -> ParallelLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  lengths = _example_lengths(workload)
  chunk = layout.chunk_rows(scoring.rows_per_chunk, divisor)
  rows = layout.row_layout(labels.shape[0], cand_idx, query_idx,
                           min_rows=scoring.min_rows, chunk=chunk)
  prompts = workload.lengths[query_idx]
  # A query sees the header and every other labelled demonstration: the
  # exact-mode row without its own prompt.
  visible = layout.exact_row_lengths(lengths, labels, cand_idx,
                                     query_idx) - prompts
  return ParallelLayout(
      cands=rows.candidates, rows=rows.rows, chunk=chunk, groups=divisor,
      width=lengths.width, end_position=layout.parallel_end_position(lengths),
      cache_len=layout.demo_cache_len(lengths), num_queries=len(query_idx),
      query_lengths=prompts, visible_cache_keys=visible)


@dataclasses.dataclass(frozen=True)
class SharedContextLayout:
  """What LOOScorer passes in shared mode (layout.query_layout), plus what
  costs need."""

  plan: layout.QueryLayout
  groups: int                   # sequences per micro-batch
  width: int                    # prompt slot width
  full: np.ndarray              # [C] real F length per assignment
  query_lengths: np.ndarray     # [num real rows] prompt tokens
  visible_cache_keys: np.ndarray  # [num real rows] F keys each query sees

  @property
  def static(self) -> tuple:
    p = self.plan
    return (p.candidates, p.num_seq, p.seq_query.shape[1], p.full_len)


def shared_context_layout(workload: Workload, labels: np.ndarray,
                          queries: Optional[np.ndarray],
                          scoring: ScoringConfig, divisor: int
                          ) -> SharedContextLayout:
  labels, cand_idx, query_idx = _rows(labels, queries)
  lengths = _example_lengths(workload)
  chunk = layout.chunk_rows(scoring.rows_per_chunk, divisor)
  plan = layout.query_layout(lengths, labels, cand_idx, query_idx,
                             max_per_seq=chunk // divisor,
                             min_seq_len=scoring.min_seq_len, groups=divisor)
  prompts = workload.lengths[query_idx]
  # Leave-one-out: F without the query's own demonstration.
  visible = layout.exact_row_lengths(lengths, labels, cand_idx,
                                     query_idx) - prompts
  return SharedContextLayout(plan, divisor, lengths.width,
                             layout.full_lengths(lengths, labels), prompts,
                             visible)


def tree_call_plan(workload: Workload, labels: np.ndarray, cand_idx, query_idx,
                   scoring: ScoringConfig, divisor: int):
  """Tree mode's plan (icm_jax.scoring.tree_layout.TreePlan) for these rows,
  with the units and blocks LOOScorer derives from the workload's groups."""
  from icm_jax.scoring import tree_layout
  from icm_jax.scoring.scorer import TREE_MIN_WIDTH, tree_units
  n = labels.shape[1]
  groups = list(workload.groups) if len(workload.groups) == n else None
  unit, block = tree_units(scoring, n, groups)
  return tree_layout.tree_plan(
      _example_lengths(workload), labels, unit, block, cand_idx, query_idx,
      min_seq_len=scoring.min_seq_len, min_width=TREE_MIN_WIDTH,
      rows=layout.chunk_rows(scoring.rows_per_chunk, divisor),
      divisor=divisor, tail=scoring.tree_tail,
      query_chunk=scoring.query_chunk)
