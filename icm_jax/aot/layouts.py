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


def chunk_rows(scoring: ScoringConfig, divisor: int) -> int:
  """LOOScorer's micro-batch: rows_per_chunk rounded up to the divisor."""
  return -(-scoring.rows_per_chunk // divisor) * divisor


def _rows(labels, queries) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels [C, N], cand_idx, query_idx) as LOOScorer.score derives them."""
  labels = np.atleast_2d(np.asarray(labels)).astype(np.int32)
  queries = labels >= 0 if queries is None else np.broadcast_to(
      np.asarray(queries, bool), labels.shape)
  cand_idx, query_idx = np.nonzero(queries)
  return labels, cand_idx, query_idx


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
  def cands(self) -> int:
    return self.plan.candidates

  @property
  def num_seq(self) -> int:
    return self.plan.num_seq

  @property
  def full_len(self) -> int:
    return self.plan.full_len

  @property
  def packed_len(self) -> int:
    return self.plan.packed_len

  @property
  def full(self) -> np.ndarray:
    return self.plan.full

  @property
  def slot_start(self) -> np.ndarray:
    return self.plan.slot_start

  @property
  def slot_len(self) -> np.ndarray:
    return self.plan.slot_len

  @property
  def static(self) -> tuple:
    return (self.cands, self.num_seq, self.full_len, self.packed_len)


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
  chunk = chunk_rows(scoring, divisor)
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
  n, width, h = workload.num_examples, workload.width, workload.header_len
  tail = 1 + workload.sep_len
  chunk = chunk_rows(scoring, divisor)
  rows = layout.row_layout(labels.shape[0], cand_idx, query_idx,
                           min_rows=scoring.min_rows, chunk=chunk)
  prompts = workload.lengths[query_idx]
  # A query sees the header and every other labelled demonstration: the
  # exact-mode row without its own prompt.
  visible = layout.exact_row_lengths(_example_lengths(workload), labels,
                                     cand_idx, query_idx) - prompts
  return ParallelLayout(
      cands=rows.candidates, rows=rows.rows, chunk=chunk, groups=divisor,
      width=width, end_position=h + width + tail,
      cache_len=h + n * width + 2 * n * tail, num_queries=len(query_idx),
      query_lengths=prompts, visible_cache_keys=visible)
