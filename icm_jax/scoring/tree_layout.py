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
group-mates last.

With a tail of M demonstrations (`ScoringConfig.tree_tail`), the fewest
last active blocks that hold at least M labelled demonstrations are merged
into one tail block T (whole blocks: a group is never split), and the root
splits the rest R
from T asymmetrically. T's queries read R whole (encoded once) and then
T's demonstrations outside their unit, all in block order: exact mode's
prompt when the examples are grouped by consistency group (block order is
then example order). R's queries run the tree over R as above and then,
before prompt_i, every demonstration of T in block order:

    header + tree order over R + i's block-mates + T + prompt_i

So every query's last demonstrations are the ones exact mode puts last
(the model weighs the most recent demonstrations most), at the price of
re-encoding T in each of R's query rows. Each level's demonstrations are encoded once per level
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

  def build(self, *, min_len: int, rows: int, divisor: int, num_ranges: int,
            prefix_len: int, query_chunk: int) -> TreePass:
    num = len(self.src)
    seg_len = np.array([len(s) for s in self.src], np.int64)
    width = bucket(int(seg_len.max()) if num else 1, min_len)
    s = bucket(max(num, 1), 1, divisor)
    rows = micro_batch_rows(width, s, rows=rows, divisor=divisor,
                            query_chunk=query_chunk)
    s = -(-s // rows) * rows
    token_src = np.full((s, width), -1, np.int32)
    length = np.zeros(s, np.int32)
    start_pos = np.zeros(s, np.int32)
    ranges = np.zeros((s, num_ranges, 2), np.int32)
    write_at = np.full(s, -1, np.int32)
    for k in range(num):
      token_src[k, :seg_len[k]] = self.src[k]
      length[k] = seg_len[k]
      start_pos[k] = self.start_pos[k]
      r = np.asarray(self.ranges[k], np.int64).reshape(-1, 2)
      ranges[k, :len(r)] = r
      write_at[k] = self.write_at[k]
    return TreePass(token_src, length, start_pos, ranges, write_at,
                    prefix_len=prefix_len, rows=rows)


def micro_batch_rows(width: int, segments: int, *, rows: int, divisor: int,
                     query_chunk: int) -> int:
  """Segments per micro-batch of a pass of `segments` (a multiple of
  `divisor`) `width`-token segments: at most `rows` and `segments`, and at
  most query_chunk query tokens per batch shard (at least one segment
  each), so no attention score block is larger than [query_chunk, keys]
  per shard, as in exact mode. Wide levels otherwise hold rows/divisor x
  [query_chunk, prefix + width] scores at once (the 8B GSM8K level 3 on a
  v5e-16: 15.8 GiB of temporaries). A capped count divides `segments`, so
  the cap adds no padding. query_chunk=0: no cap."""
  rows = min(rows, segments)
  if not query_chunk or rows // divisor * width <= query_chunk:
    return rows
  per_shard = max(1, query_chunk // width)
  return divisor * max(k for k in range(1, per_shard + 1)
                       if segments % (divisor * k) == 0)


def _forest(lengths: ExampleLengths, labels: np.ndarray, block: np.ndarray,
            cand_idx: np.ndarray, query_idx: np.ndarray, tail: int = 0):
  """Per assignment its tree; the level segments and each leaf's path.

  Returns (trees, level_segments, leaves, depth): trees[c] holds the active
  blocks (ranks, in order), their labelled members, demo offsets and token
  sources; level_segments[l - 1] lists (c, lo, hi, path, l): blocks lo..hi
  encoded at level l after `path`; leaves[(c, pos)] is the path of block
  position pos. A path is the prefix pieces ((level, lo, hi), ...) root down.
  With tail > 0 the last active blocks holding >= `tail` labelled
  demonstrations are one block, trees[c]["tail"] its position (None
  without a tail).
  """
  num_cand, num = labels.shape
  demo_offset, _, _ = token_table_offsets(lengths)
  demo_len = lengths.demo
  # Blocks in order of their first example.
  _, first = np.unique(block, return_index=True)
  order = np.argsort(first, kind="stable")
  rank_of = {int(block[first[o]]): r for r, o in enumerate(order)}
  block_rank = np.array([rank_of[int(b)] for b in block], np.int64)

  queried = np.zeros(labels.shape, bool)
  queried[cand_idx, query_idx] = True
  trees = []
  for c in range(num_cand):
    labelled = labels[c] >= 0
    active = np.unique(block_rank[labelled | queried[c]])  # sorted ranks
    members = [np.nonzero((block_rank == b) & labelled)[0] for b in active]
    pos_of = {int(b): p for p, b in enumerate(active)}
    tail_pos = None
    if tail and len(active):
      # The fewest last blocks holding >= `tail` labelled demonstrations.
      tail_pos, count = len(active), 0
      while tail_pos > 0 and count < tail:
        tail_pos -= 1
        count += len(members[tail_pos])
      for b in active[tail_pos:]:
        pos_of[int(b)] = tail_pos
      members = members[:tail_pos] + [np.concatenate(members[tail_pos:])]
    has_query = np.zeros(len(members), bool)
    for j in np.nonzero(queried[c])[0]:
      has_query[pos_of[int(block_rank[j])]] = True
    blen = np.array([demo_len[m].sum() for m in members], np.int64)
    # Token sources of each labelled example's demonstration.
    src = {int(j): demo_offset[j, labels[c, j]] + np.arange(demo_len[j])
           for m in members for j in m}
    trees.append(dict(
        active=active, members=members,
        bstart=np.concatenate([[0], np.cumsum(blen)]).astype(np.int64),
        src=src, rank=block_rank, pos_of=pos_of, tail=tail_pos,
        has_query=has_query))

  depth, level_segments, leaves = 0, [], {}
  frontier = [(c, 0, len(t["members"]), (), t["tail"])
              for c, t in enumerate(trees)]
  while frontier:
    segs, nxt = [], []
    level = depth + 1
    for c, lo, hi, path, tail_pos in frontier:
      if tail_pos is not None and tail_pos > lo:
        # The tail root: T reads all of R, encoded here; R's queries go on
        # into R and read T privately (_query_tail).
        if trees[c]["has_query"][tail_pos]:
          segs.append((c, lo, tail_pos, path, level))
        leaves[(c, tail_pos)] = path + ((level, lo, tail_pos),)
        nxt.append((c, lo, tail_pos, path, None))
        continue
      if hi - lo <= 1:
        if hi > lo:
          leaves[(c, lo)] = path
        continue
      mid = _split(lo, hi)
      for (a_lo, a_hi), (b_lo, b_hi) in (((lo, mid), (mid, hi)),
                                         ((mid, hi), (lo, mid))):
        # Node a continues with its sibling b, encoded at this level; b is
        # encoded only if a holds a query.
        nxt.append((c, a_lo, a_hi, path + ((level, b_lo, b_hi),), None))
        if trees[c]["has_query"][a_lo:a_hi].any():
          segs.append((c, b_lo, b_hi, path, level))
    if nxt:
      depth = level
      level_segments.append(segs)
    frontier = nxt
  return trees, level_segments, leaves, depth


def _demo_sources(tree, lo: int, hi: int) -> list:
  return [tree["src"][int(j)] for m in tree["members"][lo:hi] for j in m]


def _query_tail(tree, leaves, c, i, unit, prompt_offset, prompt_len):
  """(path, sources of i's own block-mates outside its unit [+ the tail
  block's demonstrations, if i is not in it] + prompt_i)."""
  pos = tree["pos_of"][int(tree["rank"][i])]
  mates = [tree["src"][int(j)] for j in tree["members"][pos]
           if unit[j] != unit[i]]
  t = tree["tail"]
  if t is not None and pos != t:
    mates += [tree["src"][int(j)] for j in tree["members"][t]]
  return leaves.get((c, pos), ()), mates + [
      prompt_offset[i] + np.arange(prompt_len[i])]


def tree_prompts(lengths: ExampleLengths, labels: np.ndarray,
                 unit: np.ndarray, block: np.ndarray, cand_idx: np.ndarray,
                 query_idx: np.ndarray, *, tail: int = 0) -> list:
  """Each scored row's whole prompt as token-table indices, in tree order
  (the rows path: a call with a few rows runs them as plain sequences)."""
  _, prompt_offset, _ = token_table_offsets(lengths)
  trees, _, leaves, _ = _forest(lengths, labels, block, cand_idx, query_idx,
                                tail)
  out = []
  for c, i in zip(cand_idx.tolist(), query_idx.tolist()):
    t = trees[c]
    path, tail = _query_tail(t, leaves, c, i, unit, prompt_offset,
                             lengths.prompt)
    pieces = [np.arange(lengths.header)]
    for _, lo, hi in path:
      pieces += _demo_sources(t, lo, hi)
    out.append(np.concatenate(pieces + tail).astype(np.int64))
  return out


def tree_plan(lengths: ExampleLengths, labels: np.ndarray, unit: np.ndarray,
              block: np.ndarray, cand_idx: np.ndarray, query_idx: np.ndarray,
              *, min_seq_len: int, min_width: int, rows: int,
              divisor: int = 1, tail: int = 0,
              query_chunk: int = 0) -> TreePlan:
  """Plans scoring rows (cand_idx[k], query_idx[k]) in tree mode.

  labels [C, N] in {-1, 0, 1}; unit [N]: what a query leaves out of its
  context; block [N]: the tree leaf of each example (a union of units).
  min_seq_len: smallest pool region bucket; min_width: smallest segment
  width bucket. rows: segments per micro-batch (a multiple of `divisor`, the
  mesh's batch divisor), fewer for wide passes (micro_batch_rows, bounded
  by query_chunk). tail: demonstrations (rounded up to whole blocks) that
  end every prompt in exact mode's order (module docstring).

  Static shapes: the region (bucket of the longest D), the depth bucket, the
  prefix length (header + region) and the range count (header + one per
  level) are one per call, so a pass's shape varies only in its segment
  count and width buckets.
  """
  num_cand = labels.shape[0]
  _, prompt_offset, _ = token_table_offsets(lengths)
  header = lengths.header
  trees, level_segments, leaves, depth = _forest(lengths, labels, block,
                                                 cand_idx, query_idx, tail)
  region = bucket(max([int(t["bstart"][-1]) for t in trees] + [1]),
                  min_seq_len)
  depth_bucket = bucket(max(depth, 1))
  statics = dict(rows=rows, divisor=divisor, num_ranges=1 + depth_bucket,
                 prefix_len=header + region, query_chunk=query_chunk)

  def region_base(c, level):
    return header + (c * depth_bucket + level - 1) * region

  def prefix_ranges(c, path):
    t = trees[c]
    pieces = [(0, header)]
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
    head = h.build(min_len=1, **statics)
  levels = []
  for segs in level_segments:
    acc = _Segments()
    for c, lo, hi, path, level in segs:
      pieces = _demo_sources(trees[c], lo, hi)
      if pieces:
        acc.add(pieces, path_tokens(c, path), prefix_ranges(c, path),
                write_at=region_base(c, level) + trees[c]["bstart"][lo])
    if acc.src:
      # Level l's segments hold about region / 2^l tokens: that width (or
      # the longest segment, if longer) keeps one shape per level while the
      # labelled set grows inside one region bucket.
      width = max(min_width, region >> len(levels) + 1)
      levels.append(acc.build(min_len=width, **statics))
  leaf = _Segments()
  for c, i in zip(cand_idx.tolist(), query_idx.tolist()):
    path, tail = _query_tail(trees[c], leaves, c, i, unit, prompt_offset,
                             lengths.prompt)
    leaf.add(tail, path_tokens(c, path), prefix_ranges(c, path))
  pool = header + candidates_bucket(num_cand) * depth_bucket * region
  return TreePlan(pool_tokens=int(pool), header=head, levels=tuple(levels),
                  leaf=leaf.build(min_len=min_width, **statics), depth=depth,
                  num_rows=len(query_idx))
