"""Host-side shape planning of one scoring call, from lengths and labels only.

Which (assignment, example) row goes where, and the bucketed static shapes
the jitted kernels are compiled for. Pure numpy: LOOScorer plans its calls
with these, and icm_jax.aot plans the same calls for a pod it compiles for
without any data or weights.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from icm_jax.scoring.buckets import bucket


@dataclasses.dataclass(frozen=True)
class ExampleLengths:
  """Token counts of a tokenised example set (ExampleTokens without tokens)."""

  header: int
  prompt: np.ndarray   # [N]
  separator: int

  @property
  def demo(self) -> np.ndarray:
    """A demonstration: prompt + label token + separator."""
    return self.prompt + 1 + self.separator

  @property
  def width(self) -> int:
    return int(self.prompt.max())


def chunk_rows(rows_per_chunk: int, divisor: int) -> int:
  """Rows per micro-batch: rows_per_chunk rounded up to the mesh's divisor."""
  return -(-rows_per_chunk // divisor) * divisor


def scored_rows(labels: np.ndarray, queries=None):
  """(cand_idx, query_idx) of the rows to score; default: labelled examples."""
  if queries is None:
    queries = labels >= 0
  queries = np.broadcast_to(np.asarray(queries, bool), labels.shape)
  return np.nonzero(queries)


def parallel_end_position(lengths: ExampleLengths) -> int:
  """One-pass mode: the position every demonstration slot ends at."""
  return lengths.header + lengths.width + 1 + lengths.separator


def demo_cache_len(lengths: ExampleLengths) -> int:
  """Keys of parallel.build_demo_cache: header, N left-padded prompts, and
  both labels' (label token + separator) tails."""
  num = len(lengths.prompt)
  return lengths.header + num * lengths.width + 2 * num * (1 + lengths.separator)


def candidates_bucket(num_candidates: int) -> int:
  """Assignments per call, bucketed (padded with copies of the first)."""
  return bucket(num_candidates)


def exact_row_lengths(lengths: ExampleLengths, labels: np.ndarray,
                      cand_idx: np.ndarray, query_idx: np.ndarray
                      ) -> np.ndarray:
  """Tokens of each exact-mode LOO row: header + other labelled demos + prompt."""
  demo_total = np.where(labels >= 0, lengths.demo, 0).sum(axis=1)
  own = np.where(labels[cand_idx, query_idx] >= 0, lengths.demo[query_idx], 0)
  return (lengths.header + demo_total[cand_idx] - own +
          lengths.prompt[query_idx])


def exact_seq_len(row_lengths: np.ndarray, *, min_seq_len: int,
                  context: int) -> int:
  """Static sequence length of an exact-mode call without prefix sharing."""
  return min(bucket(int(row_lengths.max()), min_seq_len), context)


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """One row per (assignment, example), padded to a bucket of `rows`."""

  candidates: int          # bucketed assignment count
  candidate: np.ndarray    # [rows] int32 (padding rows: 0)
  query: np.ndarray        # [rows] int32

  @property
  def rows(self) -> int:
    return len(self.query)


def row_layout(num_candidates: int, cand_idx: np.ndarray,
               query_idx: np.ndarray, *, min_rows: int, chunk: int
               ) -> RowLayout:
  rows = bucket(len(query_idx), min_rows, chunk)
  cand = np.zeros(rows, np.int32)
  query = np.zeros(rows, np.int32)
  cand[:len(cand_idx)], query[:len(query_idx)] = cand_idx, query_idx
  return RowLayout(candidates_bucket(num_candidates), cand, query)


@dataclasses.dataclass(frozen=True)
class SharedLayout:
  """Exact mode with prefix sharing: rows packed two to a suffix sequence.

  With F = header + every labelled demo of the assignment, row i runs
  F[end_i:] + prompt_i against the first start_i cached positions of F.
  """

  candidates: int          # bucketed assignment count
  full: np.ndarray         # [C] real length of F per assignment
  pairs: np.ndarray        # [P, 2] row indices of each sequence (-1 = empty)
  slot_candidate: np.ndarray  # [num_seq, 2] int32 (padding sequences: 0)
  slot_query: np.ndarray
  slot_start: np.ndarray   # cached prefix length start_i
  slot_len: np.ndarray     # suffix length (0 = empty slot)
  full_len: int            # bucket of max(full)
  packed_len: int          # bucket of the longest packed suffix pair

  @property
  def num_seq(self) -> int:
    return len(self.slot_len)


def shared_layout(lengths: ExampleLengths, labels: np.ndarray,
                  cand_idx: np.ndarray, query_idx: np.ndarray, *,
                  min_rows: int, min_seq_len: int, groups: int
                  ) -> SharedLayout:
  labelled = labels >= 0
  ends = lengths.header + np.cumsum(np.where(labelled, lengths.demo, 0), axis=1)
  full = ends[:, -1]
  own = labelled[cand_idx, query_idx]
  end = np.where(own, ends[cand_idx, query_idx], full[cand_idx])
  start = np.where(own, end - lengths.demo[query_idx], end)
  suffix = full[cand_idx] - end + lengths.prompt[query_idx]
  # Pair the longest suffix with the shortest, within each assignment, so a
  # packed sequence is about as long as F.
  pairs = []
  for c in np.unique(cand_idx):
    rows = np.nonzero(cand_idx == c)[0]
    rows = rows[np.argsort(start[rows], kind="stable")]
    for k in range((len(rows) + 1) // 2):
      other = len(rows) - 1 - k
      pairs.append((rows[k], rows[other] if other > k else -1))
  pairs = np.array(pairs, np.int64).reshape(-1, 2)
  num_seq = bucket(len(pairs), max(1, min_rows // 2), groups)
  fields = []
  for values in (cand_idx, query_idx, start, suffix):
    out = np.zeros((num_seq, 2), np.int32)
    out[:len(pairs)] = np.where(pairs >= 0, values[pairs], 0)
    fields.append(out)
  return SharedLayout(
      candidates=candidates_bucket(labels.shape[0]), full=full, pairs=pairs,
      slot_candidate=fields[0], slot_query=fields[1], slot_start=fields[2],
      slot_len=fields[3], full_len=bucket(int(full.max()), min_seq_len),
      packed_len=bucket(int(fields[3].sum(axis=1).max()), min_seq_len))


@dataclasses.dataclass(frozen=True)
class QueryLayout:
  """Shared-context mode: the scored rows packed `per_seq` to a sequence,
  each sequence against the F of one assignment."""

  candidates: int            # bucketed assignment count
  seq_candidate: np.ndarray  # [P] int32 (padding sequences: 0)
  seq_query: np.ndarray      # [P, per_seq] int32 example, -1 = empty slot
  slot_row: np.ndarray       # [P, per_seq] index of the scored row, -1 = empty
  full_len: int              # bucket of the longest F

  @property
  def num_seq(self) -> int:
    return len(self.seq_candidate)


def full_lengths(lengths: ExampleLengths, labels: np.ndarray) -> np.ndarray:
  """[C] tokens of F = header + every labelled demonstration."""
  return lengths.header + np.where(labels >= 0, lengths.demo, 0).sum(axis=1)


def query_layout(lengths: ExampleLengths, labels: np.ndarray,
                 cand_idx: np.ndarray, query_idx: np.ndarray, *,
                 max_per_seq: int, min_seq_len: int, groups: int
                 ) -> QueryLayout:
  per_cand = np.bincount(cand_idx, minlength=labels.shape[0])
  per_seq = min(bucket(int(per_cand.max())), max(1, max_per_seq))
  seqs = []
  for c in np.unique(cand_idx):
    rows = np.nonzero(cand_idx == c)[0]
    for k in range(0, len(rows), per_seq):
      seqs.append((c, rows[k:k + per_seq]))
  num_seq = bucket(len(seqs), 1, groups)
  seq_candidate = np.zeros(num_seq, np.int32)
  seq_query = np.full((num_seq, per_seq), -1, np.int32)
  slot_row = np.full((num_seq, per_seq), -1, np.int64)
  for s, (c, rows) in enumerate(seqs):
    seq_candidate[s] = c
    seq_query[s, :len(rows)] = query_idx[rows]
    slot_row[s, :len(rows)] = rows
  return QueryLayout(
      candidates=candidates_bucket(labels.shape[0]),
      seq_candidate=seq_candidate, seq_query=seq_query, slot_row=slot_row,
      full_len=bucket(int(full_lengths(lengths, labels).max()), min_seq_len))
