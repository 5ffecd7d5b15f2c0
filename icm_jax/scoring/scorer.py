"""Host-side LOO scorer: buckets shapes, calls one jitted kernel per evaluation.

    scorer = LOOScorer(model_config, params, example_tokens,
                       ScoringConfig(mode="exact"), mesh=mesh)
    scores = scorer.score(labels)            # labels [N] in {-1, 0, 1}
    scores = scorer.score(candidates)        # [C, N]: C assignments in one call

Row (c, i) scores example i given every other example labelled in assignment
c (with `context="leave_group_out"`: every labelled example outside i's
consistency group). By default every labelled example of each assignment is
scored; pass `queries` [C, N] bool to choose (e.g. one unlabelled example).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from icm_jax.model import LlamaConfig
from icm_jax.scoring import (exact, layout, parallel, shared_context, tree,
                             tree_layout)
from icm_jax.scoring.buckets import bucket
from icm_jax.scoring.common import example_arrays
from icm_jax.tokenization import ExampleTokens

MODES = ("exact", "tree", "parallel", "shared")
# Which examples leave a query's context: the query itself (the paper's
# mutual predictability), its whole consistency group (its swapped twin
# would otherwise hand it the answer, or the opposite label to copy), or its
# whole fold of `blocks` folds of groups (leave-one-block-out: B passes
# instead of N).
# Tree mode: the smallest segment width bucket (deep levels and query rows
# are a few demonstrations long; min_seq_len would pad them several-fold).
TREE_MIN_WIDTH = 8
# Tree mode: a call scoring at most this many rows (the search's prediction
# step scores one) runs each prompt, in tree order, as one plain sequence:
# one compiled shape per length bucket instead of one per tree pass.
TREE_ROWS_PATH_MAX = 2
CONTEXTS = ("leave_one_out", "leave_group_out", "leave_block_out")


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
  """mode: "exact" (the paper's LOO prompts), "tree" (the same
  demonstrations per prompt in a prefix-sharing order, about log2(N) passes
  over them: tree_layout.py), "shared" (one causal pass over all
  demonstrations, each query masking its own out) or "parallel" (every
  demonstration encoded alone).

  rows_per_chunk: LOO rows per micro-batch inside the jitted call (memory
  bound); rounded up to a multiple of the mesh's batch divisor. With prefix
  sharing a micro-batch is one packed sequence (two rows) per batch shard.
  min_rows / min_seq_len: smallest row-count and sequence-length buckets.
  min_rows is small because the search's most frequent call scores one
  example (the prediction step); padding it to 8 rows would run 4 packed
  sequences of up to the full context length where 1 is needed.
  """

  mode: str = "exact"
  rows_per_chunk: int = 8
  min_rows: int = 2
  min_seq_len: int = 64
  # Exact mode: compute the shared demonstration prefix once per assignment
  # and run only each row's suffix (about half the tokens).
  prefix_sharing: bool = True
  # Exact (with prefix sharing), shared and tree modes: run each long pass
  # in chunks of this many query tokens (0 = whole sequences), so no
  # attention mask or activation is larger than [chunk, keys]; same scores.
  # Shorter passes are one chunk. Tree mode also caps a micro-batch at this
  # many query tokens per batch shard (fewer segments for wide levels).
  query_chunk: int = 4096
  # leave_group_out: each query is scored without any claim of its group in
  # context (LOOScorer needs `groups`).
  context: str = "leave_one_out"
  # leave_block_out: the number of folds (whole consistency groups, dealt
  # round-robin in order of first appearance).
  blocks: int = 4
  # Tree mode: at least this many of the last demonstrations (whole
  # consistency groups / units, in example order) end every prompt in exact
  # mode's order, after the tree-ordered rest, so the demonstrations nearest
  # each query are exact mode's (tree_layout.py). The model weighs recent
  # demonstrations most; each query row re-encodes the tail.
  tree_tail: int = 0

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"scoring.mode={self.mode!r} not in {MODES}")
    if self.context not in CONTEXTS:
      raise ValueError(f"scoring.context={self.context!r} not in {CONTEXTS}")
    for key in ("rows_per_chunk", "min_rows", "min_seq_len", "blocks"):
      if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
        raise ValueError(f"scoring.{key} must be a positive int, got "
                         f"{getattr(self, key)!r}")
    for key in ("query_chunk", "tree_tail"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"scoring.{key} must be an int >= 0, got {value!r}")


class Scores(NamedTuple):
  """Per (assignment, example) log-probs; NaN where a pair was not scored."""

  log_p_false: np.ndarray  # [C, N]
  log_p_true: np.ndarray   # [C, N]

  @property
  def s(self) -> np.ndarray:
    """log P(True) - log P(False)."""
    return self.log_p_true - self.log_p_false


class LOOScorer:
  """Scores leave-one-out label log-probs for one fixed set of examples."""

  def __init__(self, model_config: LlamaConfig, params, examples: ExampleTokens,
               config: ScoringConfig = ScoringConfig(), mesh=None,
               groups=None):
    # The unit each query leaves out of its context (None: itself).
    self._unit = context_units(config, examples.num_examples, groups)
    self.model_config = model_config
    self.params = params
    self.examples = examples
    self.config = config
    self.mesh = mesh
    self.num_examples = examples.num_examples
    self._header_len = len(examples.header)
    self._sep_len = len(examples.separator)
    self._prompt_len = examples.prompt_lengths
    self._lengths = layout.ExampleLengths(self._header_len, self._prompt_len,
                                          self._sep_len)
    self._demo_len = self._lengths.demo
    divisor = 1
    self._batch_sharding_fn = None
    if mesh is not None:
      from icm_jax import sharding  # the mesh stage is optional for scoring
      divisor = sharding.batch_divisor(mesh)
      self._batch_sharding_fn = functools.partial(sharding.batch_sharding, mesh)
    self._groups = divisor
    self._chunk = layout.chunk_rows(config.rows_per_chunk, divisor)
    self._token_sets = tuple(tuple(int(t) for t in s)
                             for s in examples.label_token_sets)
    self._check_vocab()
    width = int(self._prompt_len.max())
    self._data = example_arrays(examples, width)
    self.trace_count = 0  # jitted-kernel traces (== compilations), for tests
    self.last_shape = None  # bucketed shape of the latest call
    context = model_config.max_position_embeddings
    if config.mode in ("exact", "tree"):
      longest = self._header_len + self._demo_len + self._prompt_len
      worst = int(np.argmax(longest))
      if longest[worst] > context:
        raise ValueError(
            f"example {examples.ids[worst]!r}: one demonstration "
            f"({self._demo_len[worst]} tokens) plus its prompt is already "
            f"{longest[worst]} tokens > model context {context}")
    if config.mode == "exact":
      self._kernel = jax.jit(self._exact_kernel,
                             static_argnames=("seq_len",))
      self._shared_kernel = jax.jit(self._exact_shared_kernel,
                                    static_argnames=("full_len", "packed_len"))
    elif config.mode == "tree":
      self._init_tree(groups)
    elif config.mode == "shared":
      self._kernel = jax.jit(self._shared_context_kernel,
                             static_argnames=("full_len",))
      self._block = jnp.asarray(
          np.arange(self.num_examples) if self._unit is None else self._unit,
          jnp.int32)
    else:
      self._end_position = layout.parallel_end_position(self._lengths)
      if self._end_position + width > context:
        worst = int(np.argmax(self._prompt_len))
        raise ValueError(
            f"example {examples.ids[worst]!r}: prompt of {width} tokens needs "
            f"positions up to {self._end_position + width} in parallel mode "
            f"> model context {context}")
      self._cache = jax.jit(functools.partial(
          parallel.build_demo_cache, model_config=model_config,
          header_len=self._header_len, sep_len=self._sep_len,
          end_position=self._end_position, rows_per_chunk=self._chunk,
          batch_sharding_fn=self._batch_sharding_fn))(params, self._data)
      self._kernel = jax.jit(self._parallel_kernel)

  def _init_tree(self, groups):
    self._tree_unit, self._tree_block = tree_units(
        self.config, self.num_examples, groups)
    ex = self.examples
    self._tree_table = tree_layout.token_table(ex.header, ex.prompts,
                                               ex.label_token, ex.separator)
    self._pool_sharding = None
    if self.mesh is not None:
      from icm_jax import sharding
      self._pool_sharding = sharding.kv_pool_sharding(self.model_config,
                                                      self.mesh)
    statics = ("prefix_len", "rows", "write")
    self._tree_write = jax.jit(self._tree_kernel, static_argnames=statics,
                               donate_argnums=(1,))
    self._tree_read = jax.jit(self._tree_kernel, static_argnames=statics)
    self._tree_rows = jax.jit(self._tree_rows_kernel)

  def _check_vocab(self):
    vocab = self.model_config.vocab_size
    for name, ids in (("prompt", np.concatenate(self.examples.prompts)),
                      ("label", self.examples.label_token),
                      ("label set", np.concatenate(self.examples.label_token_sets))):
      if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{name} token ids outside the model vocabulary "
                         f"[0, {vocab}): tokenizer and model do not match")

  # -- jitted kernels (trace_count counts traces, i.e. compilations) ----------

  def _exact_kernel(self, params, data, labels, cand, query, *, seq_len):
    self.trace_count += 1
    return exact.exact_scores(
        params, data, labels, cand, query, model_config=self.model_config,
        token_sets=self._token_sets, seq_len=seq_len,
        header_len=self._header_len, sep_len=self._sep_len,
        rows_per_chunk=self._chunk, batch_sharding_fn=self._batch_sharding_fn)

  def _exact_shared_kernel(self, params, data, labels, cand, query, start,
                           length, *, full_len, packed_len):
    self.trace_count += 1
    return exact.exact_shared_scores(
        params, data, labels, cand, query, start, length,
        model_config=self.model_config, token_sets=self._token_sets,
        full_len=full_len, packed_len=packed_len, header_len=self._header_len,
        sep_len=self._sep_len, groups=self._groups,
        query_chunk=self.config.query_chunk,
        batch_sharding_fn=self._batch_sharding_fn)

  def _shared_context_kernel(self, params, data, labels, block, seq_cand,
                             seq_query, *, full_len):
    self.trace_count += 1
    return shared_context.shared_context_scores(
        params, data, labels, block, seq_cand, seq_query,
        model_config=self.model_config, token_sets=self._token_sets,
        full_len=full_len, header_len=self._header_len, sep_len=self._sep_len,
        groups=self._groups, query_chunk=self.config.query_chunk,
        batch_sharding_fn=self._batch_sharding_fn)

  def _parallel_kernel(self, params, data, cache, labels, cand, query):
    self.trace_count += 1
    return parallel.parallel_scores(
        params, data, cache, labels, cand, query,
        model_config=self.model_config, token_sets=self._token_sets,
        end_position=self._end_position, rows_per_chunk=self._chunk,
        groups=self._groups, batch_sharding_fn=self._batch_sharding_fn)

  def _tree_kernel(self, params, pool, tokens, start_pos, length, ranges,
                   write_at, *, prefix_len, rows, write):
    self.trace_count += 1
    return tree.tree_pass(
        params, pool, tokens, start_pos, length, ranges, write_at,
        model_config=self.model_config, token_sets=self._token_sets,
        prefix_len=prefix_len, rows=rows, query_chunk=self.config.query_chunk,
        write=write, batch_sharding_fn=self._batch_sharding_fn)

  def _tree_rows_kernel(self, params, tokens, lengths):
    self.trace_count += 1
    return tree.row_scores(
        params, tokens, lengths, model_config=self.model_config,
        token_sets=self._token_sets, query_chunk=self.config.query_chunk,
        batch_sharding_fn=self._batch_sharding_fn)

  # -- host API ---------------------------------------------------------------

  def score(self, labels, queries: Optional[np.ndarray] = None) -> Scores:
    """LOO log-probs for each assignment in `labels` ([N] or [C, N])."""
    labels = np.asarray(labels)
    single = labels.ndim == 1
    labels = np.atleast_2d(labels).astype(np.int32)
    num_cand, n = labels.shape
    if n != self.num_examples:
      raise ValueError(f"labels cover {n} examples, scorer has "
                       f"{self.num_examples}")
    if not np.isin(labels, (-1, 0, 1)).all():
      raise ValueError("labels must be -1 (unlabelled), 0 (False) or 1 (True)")
    # Shared mode masks a query's unit inside the kernel; the others score
    # assignments with the unit unlabelled.
    score = (self._score_leave_unit_out
             if self._unit is not None
             and self.config.mode not in ("shared", "tree")
             else self._score_leave_one_out)
    lp_false, lp_true = score(labels, queries)
    if single:
      return Scores(lp_false[0], lp_true[0])
    return Scores(lp_false, lp_true)

  def _score_leave_one_out(self, labels, queries):
    cand_idx, query_idx = layout.scored_rows(labels, queries)
    lp_false = np.full(labels.shape, np.nan, np.float32)
    lp_true = np.full(labels.shape, np.nan, np.float32)
    if len(query_idx):
      lf, lt = self._score_rows(labels, cand_idx, query_idx)
      lp_false[cand_idx, query_idx] = lf
      lp_true[cand_idx, query_idx] = lt
    return lp_false, lp_true

  def _score_leave_unit_out(self, labels, queries):
    """One leave-one-out call on expanded assignments: for every (assignment
    c, unit g) with queries, c with g's claims unlabelled, querying them. A
    query's own label never enters its context, so this is exactly c's
    scores with g's claims out of context."""
    cand_idx, query_idx = layout.scored_rows(labels, queries)
    pairs = sorted(set(zip(cand_idx.tolist(),
                           self._unit[query_idx].tolist())))
    lp_false = np.full(labels.shape, np.nan, np.float32)
    lp_true = np.full(labels.shape, np.nan, np.float32)
    if not pairs:
      return lp_false, lp_true
    rows = [c for c, _ in pairs]
    expanded = labels[rows].copy()
    asked = np.zeros(labels.shape, bool)
    asked[cand_idx, query_idx] = True
    asked = asked[rows]
    for row, (_, g) in enumerate(pairs):
      members = self._unit == g
      expanded[row, members] = -1
      asked[row] &= members
    lf, lt = self._score_leave_one_out(expanded, asked)
    for row, (c, g) in enumerate(pairs):
      hit = asked[row]
      lp_false[c, hit], lp_true[c, hit] = lf[row, hit], lt[row, hit]
    return lp_false, lp_true

  def _score_rows(self, labels, cand_idx, query_idx):
    if self.config.mode == "exact" and self.config.prefix_sharing:
      return self._score_rows_shared(labels, cand_idx, query_idx)
    if self.config.mode == "shared":
      return self._score_rows_shared_context(labels, cand_idx, query_idx)
    if self.config.mode == "tree":
      return self._score_rows_tree(labels, cand_idx, query_idx)
    num_rows = len(query_idx)
    rows = layout.row_layout(labels.shape[0], cand_idx, query_idx,
                             min_rows=self.config.min_rows, chunk=self._chunk)
    args = (jnp.asarray(_pad_candidates(labels, rows.candidates)),
            jnp.asarray(rows.candidate), jnp.asarray(rows.query))
    if self.config.mode == "exact":
      seq_len = layout.exact_seq_len(
          self._exact_row_lengths(labels, cand_idx, query_idx),
          min_seq_len=self.config.min_seq_len,
          context=self.model_config.max_position_embeddings)
      self.last_shape = (rows.candidates, rows.rows, seq_len)
      lf, lt = self._call(self._kernel, self.params, self._data, *args,
                          seq_len=seq_len)
    else:
      self.last_shape = (rows.candidates, rows.rows)
      lf, lt = self._call(self._kernel, self.params, self._data, self._cache,
                          *args)
    return np.asarray(lf)[:num_rows], np.asarray(lt)[:num_rows]

  def _score_rows_shared(self, labels, cand_idx, query_idx):
    self._exact_row_lengths(labels, cand_idx, query_idx)  # context check
    plan = layout.shared_layout(
        self._lengths, labels, cand_idx, query_idx,
        min_rows=self.config.min_rows, min_seq_len=self.config.min_seq_len,
        groups=self._groups)
    self.last_shape = (plan.candidates, plan.num_seq, plan.full_len,
                       plan.packed_len)
    slots = (plan.slot_candidate, plan.slot_query, plan.slot_start,
             plan.slot_len)
    lf, lt = self._call(self._shared_kernel, self.params, self._data,
                        jnp.asarray(_pad_candidates(labels, plan.candidates)),
                        *map(jnp.asarray, slots),
                        full_len=plan.full_len, packed_len=plan.packed_len)
    pairs = plan.pairs
    lf, lt = np.asarray(lf)[:len(pairs)], np.asarray(lt)[:len(pairs)]
    out_f = np.empty(len(query_idx), np.float32)
    out_t = np.empty(len(query_idx), np.float32)
    used = pairs >= 0
    out_f[pairs[used]], out_t[pairs[used]] = lf[used], lt[used]
    return out_f, out_t

  def _score_rows_shared_context(self, labels, cand_idx, query_idx):
    self._exact_row_lengths(labels, cand_idx, query_idx)  # context check
    plan = layout.query_layout(
        self._lengths, labels, cand_idx, query_idx,
        max_per_seq=self._chunk // self._groups,
        min_seq_len=self.config.min_seq_len, groups=self._groups)
    self.last_shape = (plan.candidates, plan.num_seq, plan.seq_query.shape[1],
                       plan.full_len)
    lf, lt = self._call(self._kernel, self.params, self._data,
                        jnp.asarray(_pad_candidates(labels, plan.candidates)),
                        self._block, jnp.asarray(plan.seq_candidate),
                        jnp.asarray(plan.seq_query), full_len=plan.full_len)
    used = plan.slot_row >= 0
    out_f = np.empty(len(query_idx), np.float32)
    out_t = np.empty(len(query_idx), np.float32)
    out_f[plan.slot_row[used]] = np.asarray(lf)[used]
    out_t[plan.slot_row[used]] = np.asarray(lt)[used]
    return out_f, out_t

  def _score_rows_tree(self, labels, cand_idx, query_idx):
    self._exact_row_lengths(labels, cand_idx, query_idx)  # context check
    if len(query_idx) <= TREE_ROWS_PATH_MAX:
      return self._score_tree_prompts(labels, cand_idx, query_idx)
    plan = tree_layout.tree_plan(
        self._lengths, labels, self._tree_unit, self._tree_block, cand_idx,
        query_idx, min_seq_len=self.config.min_seq_len,
        min_width=TREE_MIN_WIDTH, rows=self._chunk, divisor=self._groups,
        tail=self.config.tree_tail, query_chunk=self.config.query_chunk)
    self.last_shape = (plan.pool_tokens,) + tuple(p.shape for p in plan.passes)
    self.last_plan = plan
    pool = self._call(tree.new_pool, self.model_config, plan.pool_tokens,
                      self._pool_sharding)
    for p in plan.passes[:-1]:
      pool = self._call(self._tree_write, self.params, pool,
                        *self._tree_arrays(p), prefix_len=p.prefix_len,
                        rows=p.rows, write=True)
    leaf = plan.leaf
    lf, lt = self._call(self._tree_read, self.params, pool,
                        *self._tree_arrays(leaf), prefix_len=leaf.prefix_len,
                        rows=leaf.rows, write=False)
    n = plan.num_rows
    return np.asarray(lf)[:n], np.asarray(lt)[:n]

  def _score_tree_prompts(self, labels, cand_idx, query_idx):
    """A few rows: each prompt, in tree order, as one plain sequence."""
    prompts = tree_layout.tree_prompts(self._lengths, labels, self._tree_unit,
                                       self._tree_block, cand_idx, query_idx,
                                       tail=self.config.tree_tail)
    lengths = np.array([len(p) for p in prompts])
    seq_len = layout.exact_seq_len(
        lengths, min_seq_len=self.config.min_seq_len,
        context=self.model_config.max_position_embeddings)
    rows = bucket(len(prompts), 1, self._groups)
    tokens = np.zeros((rows, seq_len), np.int32)
    for k, p in enumerate(prompts):
      tokens[k, :len(p)] = self._tree_table[p]
    padded = np.ones(rows, np.int32)
    padded[:len(prompts)] = lengths
    self.last_shape = (rows, seq_len)
    lf, lt = self._call(self._tree_rows, self.params, jnp.asarray(tokens),
                        jnp.asarray(padded))
    n = len(prompts)
    return np.asarray(lf)[:n], np.asarray(lt)[:n]

  def _tree_arrays(self, p: tree_layout.TreePass):
    tokens = np.where(p.token_src >= 0,
                      self._tree_table[np.maximum(p.token_src, 0)], 0)
    return tuple(jnp.asarray(a, jnp.int32) for a in (
        tokens, p.start_pos, p.length, p.ranges, p.write_at))

  def _call(self, fn, *args, **kwargs):
    if self.mesh is None:
      return fn(*args, **kwargs)
    with jax.set_mesh(self.mesh):
      return fn(*args, **kwargs)

  def _exact_row_lengths(self, labels, cand_idx, query_idx) -> np.ndarray:
    """Row lengths; raises naming the example if one exceeds the context."""
    lengths = layout.exact_row_lengths(self._lengths, labels, cand_idx,
                                       query_idx)
    worst = int(np.argmax(lengths))
    context = self.model_config.max_position_embeddings
    if lengths[worst] > context:
      raise ValueError(
          f"LOO prompt for example {self.examples.ids[query_idx[worst]]!r} is "
          f"{lengths[worst]} tokens ({int((labels[cand_idx[worst]] >= 0).sum())}"
          f" labelled demonstrations) > model context {context}; use a smaller"
          " batch or parallel mode")
    return lengths


def context_units(config: ScoringConfig, num_examples: int, groups=None):
  """[N] int unit id each query leaves out of its context; None = itself."""
  if config.context == "leave_one_out":
    return None
  if groups is None or len(groups) != num_examples:
    raise ValueError(f"scoring.context={config.context!r} needs one "
                     "consistency group per example")
  names = {}
  group = np.array([names.setdefault(g, len(names)) for g in groups], np.int64)
  if config.context == "leave_group_out":
    return group
  return group % config.blocks


def tree_units(config: ScoringConfig, num_examples: int, groups=None):
  """Tree mode's (unit [N], block [N]): what each query leaves out, and the
  tree leaf holding it (leave_one_out: the consistency group, so a group is
  never split; otherwise the unit itself)."""
  unit = context_units(config, num_examples, groups)
  unit = np.arange(num_examples) if unit is None else np.asarray(unit)
  if config.context == "leave_one_out" and groups is not None:
    return unit, context_units(
        dataclasses.replace(config, context="leave_group_out"), num_examples,
        groups)
  return unit, unit


def _pad_candidates(labels: np.ndarray, candidates: int) -> np.ndarray:
  """[C, N] -> [candidates, N], padded with copies of the first assignment."""
  extra = candidates - labels.shape[0]
  return np.concatenate([labels, np.repeat(labels[:1], extra, axis=0)])
