"""Host plan of a tree-mode call: which tokens each pass encodes, against
which cached prefix. Pure numpy (icm_jax.aot plans pod calls with it).

Tree mode gives every query exactly the demonstrations exact mode gives it
(D minus the query's unit), in a deterministic order that lets queries share
prefixes. The units of one assignment are grouped into *blocks*, the tree's
leaves: leave_group_out and leave_block_out use the unit itself (the group,
the fold); leave_one_out uses the consistency group, so a group is never
split. Blocks are ordered by their first example in example order, and a
block's demonstrations are its labelled members in example order.

The tree halves the block list recursively (a node of m blocks: the first
ceil(m/2) | the rest). Query i's prompt is

    header
    + for each level from the root down: every demonstration of the sibling
      of the node holding i's block
    + the labelled members of i's own block outside i's unit, in example
      order (leave_one_out: i's group-mates; otherwise none)
    + prompt_i

so demonstrations far from i in example order come first and i's
group-mates last. Each level's demonstrations are encoded once per level
(a node's half is encoded against the node's own prefix, for the other
half to read), so one evaluation costs about log2(blocks) passes over D plus
the query rows, against about N/2 passes for exact mode. A half whose
sibling holds no query is not encoded: one query costs one exact row.

All passes write into / read from one flat key/value *pool* per call:
[header | (assignment, level) regions of `region` tokens each]. Level l's
region holds, at each demonstration's offset in the assignment's block
order, that demonstration's keys/values as encoded at level l.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from icm_jax.scoring.buckets import bucket
from icm_jax.scoring.layout import ExampleLengths, candidates_bucket


@dataclasses.dataclass(frozen=True)
class TreePass:
  """One batched forward: S segments of up to W tokens, each against a
  prefix gathered from the pool (the header and <= R pieces of regions).

  token_src [S, W]: index into the token table (token_table_offsets), -1 =
  padding. length [S]: real tokens. start_pos [S]: position of the first
  token. ranges [S, R, 2]: (pool index, length) of the prefix pieces, in
  prompt order. write_at [S]: pool index of the first token (level passes;
  the leaf pass writes nothing). prefix_len: static bucket of the longest
  prefix. rows: segments per micro-batch (static; divides S).
  """

  token_src: np.ndarray
  length: np.ndarray
  start_pos: np.ndarray
  ranges: np.ndarray
  write_at: np.ndarray
  prefix_len: int
  rows: int

  @property
  def shape(self) -> tuple:
    """(S, W, R, prefix_len, rows): what the pass compiles for."""
    s, w = self.token_src.shape
    return (s, w, self.ranges.shape[1], self.prefix_len, self.rows)

  @property
  def tokens_forwarded(self) -> int:
    """Padded query tokens this pass runs (the cost model's unit)."""
    return int(self.token_src.size)


@dataclasses.dataclass(frozen=True)
class TreePlan:
  """header pass (None without a header), level passes root-down, leaf pass.

  leaf rows follow the order of the call's scored rows: row k of the leaf is
  scored row k (padding rows after them).
  """

  pool_tokens: int
  header: Optional[TreePass]
  levels: tuple
  leaf: TreePass
  depth: int
  num_rows: int

  @property
  def passes(self) -> tuple:
    return ((self.header,) if self.header else ()) + self.levels + (self.leaf,)

  @property
  def tokens_forwarded(self) -> int:
    return sum(p.tokens_forwarded for p in self.passes)


def token_table_offsets(lengths: ExampleLengths):
  """Offsets into the token table: header, then per example its
  demonstration labelled False, labelled True, and its prompt.

  Returns (demo_offset [N, 2], prompt_offset [N], table size).
  """
  demo = lengths.demo
  per = 2 * demo + lengths.prompt
  start = lengths.header + np.concatenate([[0], np.cumsum(per)[:-1]])
  demo_offset = np.stack([start, start + demo], axis=1)
  return demo_offset, start + 2 * demo, int(lengths.header + per.sum())


def token_table(header, prompts, label_token, separator) -> np.ndarray:
  """The token table of token_table_offsets (int32)."""
  parts = [np.asarray(header, np.int32)]
  sep = np.asarray(separator, np.int32)
  for p in prompts:
    p = np.asarray(p, np.int32)
    for lab in (0, 1):
      parts += [p, np.asarray([label_token[lab]], np.int32), sep]
    parts.append(p)
  return np.concatenate(parts).astype(np.int32)


def _split(lo: int, hi: int) -> int:
  return lo + (hi - lo + 1) // 2


class _Segments:
  """Accumulates one pass's segments (lists of token-source pieces)."""

  def __init__(self):
    self.src, self.start_pos, self.ranges, self.write_at = [], [], [], []

  def add(self, pieces, start_pos, ranges, write_at=-1):
    self.src.append(np.concatenate(pieces) if pieces else
                    np.zeros(0, np.int64))
    self.start_pos.append(start_pos)
    self.ranges.append(ranges)
    self.write_at.append(write_at)

  def build(self, *, min_len: int, rows: int, divisor: int) -> TreePass:
    num = len(self.src)
    seg_len = np.array([len(s) for s in self.src], np.int64)
    width = bucket(int(seg_len.max()) if num else 1, min_len)
    s = bucket(max(num, 1), 1, divisor)
    rows = min(rows, s)
    s = -(-s // rows) * rows
    num_ranges = max([len(r) for r in self.ranges] + [1])
    token_src = np.full((s, width), -1, np.int32)
    length = np.zeros(s, np.int32)
    start_pos = np.zeros(s, np.int32)
    ranges = np.zeros((s, num_ranges, 2), np.int32)
    write_at = np.full(s, -1, np.int32)
    prefix = np.zeros(s, np.int64)
    for k in range(num):
      token_src[k, :seg_len[k]] = self.src[k]
      length[k] = seg_len[k]
      start_pos[k] = self.start_pos[k]
      r = np.asarray(self.ranges[k], np.int64).reshape(-1, 2)
      ranges[k, :len(r)] = r
      prefix[k] = r[:, 1].sum()
      write_at[k] = self.write_at[k]
    return TreePass(token_src, length, start_pos, ranges, write_at,
                    prefix_len=bucket(max(int(prefix.max()), 1)), rows=rows)


def tree_plan(lengths: ExampleLengths, labels: np.ndarray, unit: np.ndarray,
              block: np.ndarray, cand_idx: np.ndarray, query_idx: np.ndarray,
              *, min_seq_len: int, min_width: int, rows: int,
              divisor: int = 1) -> TreePlan:
  """Plans scoring rows (cand_idx[k], query_idx[k]) in tree mode.

  labels [C, N] in {-1, 0, 1}; unit [N]: what a query leaves out of its
  context; block [N]: the tree leaf of each example (a union of units).
  min_seq_len: smallest pool region bucket; min_width: smallest segment
  width bucket. rows: segments per micro-batch (a multiple of `divisor`, the
  mesh's batch divisor).
  """
  num_cand, num = labels.shape
  demo_offset, prompt_offset, _ = token_table_offsets(lengths)
  demo_len = lengths.demo
  header = lengths.header
  # Blocks in order of their first example.
  _, first = np.unique(block, return_index=True)
  block_rank = np.empty(num, np.int64)
  order = np.argsort(first, kind="stable")
  rank_of = {int(block[first[o]]): r for r, o in enumerate(order)}
  block_rank[:] = [rank_of[int(b)] for b in block]

  queried = np.zeros(labels.shape, bool)
  queried[cand_idx, query_idx] = True
  trees = []
  for c in range(num_cand):
    labelled = labels[c] >= 0
    active = np.unique(block_rank[labelled | queried[c]])  # sorted ranks
    members = [np.nonzero((block_rank == b) & labelled)[0] for b in active]
    blen = np.array([demo_len[m].sum() for m in members], np.int64)
    bstart = np.concatenate([[0], np.cumsum(blen)])      # demo offsets
    total = int(bstart[-1])
    # Token sources of each labelled example's demonstration.
    src = {int(j): demo_offset[j, labels[c, j]] + np.arange(demo_len[j])
           for m in members for j in m}
    has_query = np.array([queried[c][block_rank == b].any() for b in active])
    trees.append(dict(active=active, members=members, bstart=bstart,
                      total=total, src=src, has_query=has_query))
  region = bucket(max([t["total"] for t in trees] + [1]), min_seq_len)

  # Level passes: breadth-first over nodes (lo, hi, path), path = the
  # prefix pieces [(level, lo, hi)] of the node's siblings, root down.
  depth = 0
  level_segments = []
  frontier = [(c, 0, len(t["active"]), ()) for c, t in enumerate(trees)]
  leaves = {}
  while frontier:
    segs, nxt = [], []
    level = depth + 1
    for c, lo, hi, path in frontier:
      if hi - lo <= 1:
        if hi > lo:
          leaves[(c, lo)] = path
        continue
      mid = _split(lo, hi)
      for (a_lo, a_hi), (b_lo, b_hi) in (((lo, mid), (mid, hi)),
                                         ((mid, hi), (lo, mid))):
        # Node (a_lo, a_hi) continues with its sibling b encoded here.
        nxt.append((c, a_lo, a_hi, path + ((level, b_lo, b_hi),)))
        if trees[c]["has_query"][a_lo:a_hi].any():
          segs.append((c, b_lo, b_hi, path, level))
    if nxt:
      depth = level
      level_segments.append(segs)
    frontier = nxt
  depth_bucket = bucket(max(depth, 1))

  def region_base(c, level):
    return header + (c * depth_bucket + level - 1) * region

  def prefix_ranges(c, path):
    t = trees[c]
    pieces = [(0, header)] if header else []
    for level, lo, hi in path:
      pieces.append((region_base(c, level) + t["bstart"][lo],
                     t["bstart"][hi] - t["bstart"][lo]))
    return pieces

  def path_tokens(c, path):
    t = trees[c]
    return header + sum(t["bstart"][hi] - t["bstart"][lo] for _, lo, hi in path)

  head = None
  if header:
    h = _Segments()
    h.add([np.arange(header)], 0, [], write_at=0)
    head = h.build(min_len=1, rows=rows, divisor=divisor)
  levels = []
  for segs in level_segments:
    acc = _Segments()
    for c, lo, hi, path, level in segs:
      t = trees[c]
      pieces = [t["src"][int(j)] for m in t["members"][lo:hi] for j in m]
      if not pieces:
        continue
      acc.add(pieces, path_tokens(c, path), prefix_ranges(c, path),
              write_at=region_base(c, level) + t["bstart"][lo])
    if acc.src:
      levels.append(acc.build(min_len=min_width, rows=rows,
                              divisor=divisor))
  leaf = _Segments()
  for c, i in zip(cand_idx.tolist(), query_idx.tolist()):
    t = trees[c]
    pos = int(np.searchsorted(t["active"], block_rank[i]))
    path = leaves.get((c, pos), ())
    mates = [t["src"][int(j)] for j in t["members"][pos] if unit[j] != unit[i]]
    leaf.add(mates + [prompt_offset[i] + np.arange(lengths.prompt[i])],
             path_tokens(c, path), prefix_ranges(c, path))
  leaf_pass = leaf.build(min_len=min_width, rows=rows, divisor=divisor)
  pool = header + candidates_bucket(num_cand) * depth_bucket * region
  return TreePlan(pool_tokens=int(pool), header=head, levels=tuple(levels),
                  leaf=leaf_pass, depth=depth, num_rows=len(query_idx))

