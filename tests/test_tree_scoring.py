"""Tree mode against an independent computation of its documented semantics.

The reference builds each query's prompt as one explicit token sequence, in
the order tree_layout.py documents (halving the blocks root-down, sibling
halves first, the query's own block-mates last; with a tail, the last
blocks after them in example order), and runs the plain model on it one
query at a time. Nothing of the kernel's plan is reused.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax import sharding
from icm_jax.model import forward, init_params, masks
from icm_jax.scoring import LOOScorer, ScoringConfig
from tests.test_scoring import CFG, LABEL_SETS, make_examples


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def reference_order(blocks_in_order, query_block):
  """Blocks of the query's prompt, root-down (sibling halves in order)."""
  out, lo, hi = [], 0, len(blocks_in_order)
  pos = blocks_in_order.index(query_block)
  while hi - lo > 1:
    mid = lo + (hi - lo + 1) // 2
    if pos < mid:
      out += blocks_in_order[mid:hi]
      hi = mid
    else:
      out += blocks_in_order[lo:mid]
      lo = mid
  return out


@functools.partial(jax.jit, static_argnames="width")
def _last_token_log_probs(params, tokens, length, *, width):
  logits = forward(params, tokens[None], masks.default_positions(1, width),
                   masks.padded_causal_mask(length[None], width), config=CFG,
                   logit_positions=(length - 1)[None, None])[0, 0]
  logp = jax.nn.log_softmax(logits)
  return jnp.stack([jax.nn.logsumexp(logp[jnp.asarray(t)]) for t in LABEL_SETS])


def next_token_label_log_probs(params, tokens):
  """The plain model on one explicit prompt (right-padded to 256 tokens,
  which a causal model never sees)."""
  padded = np.zeros(256, np.int32)
  padded[:len(tokens)] = tokens
  return np.asarray(_last_token_log_probs(params, jnp.asarray(padded),
                                          jnp.asarray(len(tokens)),
                                          width=256))


def reference_demos(labels, block, unit, queries, i, tail=0):
  """Query i's demonstrations in the documented tree order."""
  n = len(labels)
  active = []
  for j in range(n):  # blocks by first example, active ones only
    if (labels[j] >= 0 or queries[j]) and block[j] not in active:
      active.append(block[j])
  firsts = {b: min(j for j in range(n) if block[j] == b) for b in active}
  active.sort(key=lambda b: firsts[b])
  cut, count = len(active), 0  # the fewest last blocks with >= tail demos
  while tail and cut > 0 and count < tail:
    cut -= 1
    count += sum(1 for j in range(n) if block[j] == active[cut]
                 and labels[j] >= 0)
  rest, last = active[:cut], active[cut:]
  labelled_in = lambda bs: [j for b in bs for j in range(n) if block[j] == b
                            and labels[j] >= 0 and unit[j] != unit[i]]
  if block[i] in last:  # exact mode's prompt: R whole, then T, in order
    return labelled_in(rest) + labelled_in(last)
  demos = [j for b in reference_order(rest, block[i])
           for j in range(n) if block[j] == b and labels[j] >= 0]
  return demos + labelled_in([block[i]]) + labelled_in(last)


def reference_scores(params, ex, labels, block, unit, queries, tail=0):
  """[N] (log P(False), log P(True)) per queried example (NaN elsewhere)."""
  n = len(labels)
  out = np.full((n, 2), np.nan)
  for i in np.nonzero(queries)[0]:
    demos = reference_demos(labels, block, unit, queries, i, tail)
    assert not any(unit[j] == unit[i] for j in demos)
    tokens = list(ex.header)
    for j in demos:
      tokens += (list(ex.prompts[j]) + [int(ex.label_token[labels[j]])] +
                 list(ex.separator))
    out[i] = next_token_label_log_probs(params, tokens + list(ex.prompts[i]))
  return out


GROUPS = [0, 0, 1, 1, 1, 2, 3, 3, 4, 2, 5]
CONTEXTS = ["leave_one_out", "leave_group_out", "leave_block_out"]


def units_and_blocks(context):
  g = np.array(GROUPS)
  unit = {"leave_one_out": np.arange(len(g)), "leave_group_out": g,
          "leave_block_out": g % 3}[context]
  return unit, (g if context == "leave_one_out" else unit)


def tree_scorer(params, context, n=len(GROUPS), tail=0, **kw):
  ex = make_examples(n, header_len=3, seed=1)
  cfg = ScoringConfig("tree", context=context, blocks=3, rows_per_chunk=2,
                      query_chunk=8, tree_tail=tail)
  return ex, LOOScorer(CFG, params, ex, cfg,
                       groups=[f"g{g}" for g in GROUPS[:n]], **kw)


@pytest.mark.parametrize("tail", [0, 2])
@pytest.mark.parametrize("context", CONTEXTS)
def test_tree_equals_reference(params, context, tail):
  """Every query (one unlabelled) of two assignments in one call, and one
  query alone (the rows path), against the explicit prompts."""
  n = len(GROUPS)
  ex, scorer = tree_scorer(params, context, tail=tail)
  rng = np.random.RandomState(3)
  labels = rng.randint(0, 2, (2, n)).astype(np.int32)
  labels[0, 4] = -1
  labels[1, [0, 7]] = -1
  unit, block = units_and_blocks(context)
  scores = scorer.score(labels, np.ones((2, n), bool))
  # A real tree, not one pass (3 folds with a tail of 2 leave one block).
  assert scorer.last_plan.depth >= (1 if tail and context ==
                                    "leave_block_out" else 2)
  for c in range(2):
    ref = reference_scores(params, ex, labels[c], block, unit, np.ones(n, bool),
                           tail)
    np.testing.assert_allclose(scores.log_p_false[c], ref[:, 0], atol=1e-4)
    np.testing.assert_allclose(scores.log_p_true[c], ref[:, 1], atol=1e-4)
  one = np.zeros(n, bool)
  one[4] = True
  alone = scorer.score(labels[0], one)
  np.testing.assert_allclose(alone.log_p_true[4], scores.log_p_true[0, 4],
                             atol=1e-4)


@pytest.mark.parametrize("tail", [0, 2])
@pytest.mark.parametrize("context", CONTEXTS)
def test_no_prompt_sees_its_own_unit(params, context, tail):
  """Flipping a query's own unit leaves its score alone; flipping any other
  labelled example moves it (both in one call, and on the rows path)."""
  n = len(GROUPS)
  _, scorer = tree_scorer(params, context, tail=tail)
  unit, _ = units_and_blocks(context)
  labels = np.random.RandomState(5).randint(0, 2, n).astype(np.int32)
  for i in (2, 9):
    own = labels.copy()
    own[unit == unit[i]] ^= 1
    other = labels.copy()
    j = int(np.nonzero(unit != unit[i])[0][-1])
    other[j] ^= 1
    batch = np.stack([labels, own, other])
    s = scorer.score(batch, np.ones((3, n), bool)).s[:, i]
    assert abs(s[1] - s[0]) < 1e-5, (i, s)
    assert abs(s[2] - s[0]) > 1e-4, (i, j, s)
    one = np.zeros(n, bool)
    one[i] = True
    alone = [scorer.score(b, one).s[i] for b in batch]
    assert abs(alone[1] - alone[0]) < 1e-5 and abs(alone[2] - alone[0]) > 1e-4


@pytest.mark.parametrize("context", ["leave_one_out", "leave_group_out"])
def test_tail_queries_get_exact_prompts(params, context):
  """Against exact mode itself (an independent kernel): the tail's queries
  (2 demonstrations: groups 5 and 4, whole) score as exact mode does, and
  with the tail holding every demonstration every query does. The examples are in group order, so block order is example
  order."""
  groups = [0, 0, 1, 1, 2, 2, 2, 3, 4, 4, 5]
  n = len(groups)
  ex = make_examples(n, header_len=3, seed=4)
  labels = np.random.RandomState(8).randint(0, 2, n).astype(np.int32)
  names = [f"g{g}" for g in groups]
  score = lambda mode, tail: LOOScorer(
      CFG, params, ex, ScoringConfig(mode, context=context, rows_per_chunk=2,
                                     query_chunk=8, tree_tail=tail),
      groups=names).score(labels).s
  exact = score("exact", 0)
  in_tail = np.isin(groups, [4, 5])
  # Equal to float32 rounding (~5e-7); without the tail the order differs
  # and the tiny model's scores move by ~1e-4.
  np.testing.assert_allclose(score("tree", 2)[in_tail], exact[in_tail],
                             atol=1e-5)
  np.testing.assert_allclose(score("tree", n), exact, atol=1e-5)
  assert np.abs(score("tree", 0)[in_tail] - exact[in_tail]).max() > 5e-5


def test_sharded_equals_unsharded(params):
  mesh = sharding.create_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = sharding.shard_params(params, sharding.param_shardings(params,
                                                                   mesh))
  n = len(GROUPS)
  _, plain = tree_scorer(params, "leave_one_out", tail=2)
  _, meshed = tree_scorer(sharded, "leave_one_out", tail=2, mesh=mesh)
  labels = np.random.RandomState(6).randint(0, 2, n).astype(np.int32)
  labels[3] = -1
  queries = np.ones(n, bool)
  np.testing.assert_allclose(meshed.score(labels, queries).s,
                             plain.score(labels, queries).s, atol=1e-5)


def test_compiles_bounded_as_the_labelled_set_grows(params):
  """One labelled example more per call, as the search grows its set: every
  pass shape is a function of the call's region and depth buckets (and
  segment-count buckets), so compiles stop once a bucket repeats; label
  flips never compile."""
  n = 40
  ex = make_examples(n, header_len=2, seed=2)
  scorer = LOOScorer(CFG, params, ex, ScoringConfig("tree"),
                     groups=[f"g{i // 2}" for i in range(n)])
  labels = -np.ones(n, np.int32)
  labels[:24] = 1
  buckets, counts = set(), []
  for k in range(24, n):
    labels[k] = k % 2
    scorer.score(labels)
    buckets.add(scorer.last_plan.pool_tokens)
    counts.append(scorer.trace_count)
  before = scorer.trace_count
  scorer.score(np.where(labels >= 0, 1 - labels, -1))
  assert scorer.trace_count == before   # same lengths: nothing compiles
  # Within one pool bucket, at most a few new shapes appear (segment counts
  # at the deepest levels); a new bucket costs one set of passes.
  passes = len(scorer.last_plan.passes)
  assert counts[-1] <= len(buckets) * passes + 8, (counts, buckets)
  assert counts[-1] < 2 * (n - 24)


def test_tree_plan_cost_is_log_passes():
  """Token-forwards of one evaluation: about log2(units) passes over D,
  against the N/2 of exact mode."""
  from icm_jax.scoring import layout, tree_layout
  n = 256
  lengths = layout.ExampleLengths(4, np.full(n, 20), 2)
  labels = np.ones((1, n), np.int32)
  cand, query = layout.scored_rows(labels)
  plan = tree_layout.tree_plan(lengths, labels, np.arange(n), np.arange(n),
                               cand, query, min_seq_len=64, min_width=8,
                               rows=8)
  demo_total = int(lengths.demo.sum())
  assert plan.depth == 8
  levels = sum(p.tokens_forwarded for p in plan.levels)
  assert demo_total * 8 <= levels <= demo_total * 8 * 1.6
  exact = sum(layout.exact_row_lengths(lengths, labels, cand, query))
  assert plan.tokens_forwarded * 10 < exact


@pytest.mark.parametrize("divisor", [1, 2])
def test_wide_passes_hold_at_most_query_chunk_tokens_per_shard(divisor):
  """A micro-batch holds at most query_chunk query tokens per batch shard
  (one segment at least), so wide levels run fewer segments at once; with
  query_chunk=0 every pass keeps rows_per_chunk segments. Same segments,
  same widths, no extra padding either way."""
  from icm_jax.scoring import layout, tree_layout
  n, rows, chunk = 64, 8, 128
  lengths = layout.ExampleLengths(4, np.full(n, 20), 2)
  labels = np.ones((1, n), np.int32)
  cand, query = layout.scored_rows(labels)
  plan = lambda q: tree_layout.tree_plan(
      lengths, labels, np.arange(n), np.arange(n), cand, query,
      min_seq_len=64, min_width=8, rows=rows, divisor=divisor, query_chunk=q)
  bounded, free = plan(chunk), plan(0)
  for b, f in zip(bounded.passes, free.passes):
    s, w = b.token_src.shape
    assert (s, w) == f.token_src.shape
    np.testing.assert_array_equal(b.token_src, f.token_src)
    assert f.rows == min(rows, s)
    assert b.rows % divisor == 0 and s % b.rows == 0
    assert b.rows == divisor or b.rows // divisor * w <= chunk, (b.rows, w)
  # The root levels (hundreds of tokens wide) run one segment per shard;
  # the leaf (a prompt, 24 tokens) 4 per shard at most: 4 divides its 64.
  assert [p.rows for p in bounded.levels[:2]] == [divisor, divisor]
  assert bounded.leaf.rows == 4 * divisor


@pytest.mark.parametrize("tail", [1, 4])
def test_tail_costs_one_tail_per_query_row(tail):
  """With a tail of M claims (blocks of one), each query outside it
  re-encodes all M
  demonstrations, each inside it the other M - 1; the tree over the rest
  keeps its log passes, plus one pass over the rest for the tail's queries."""
  from icm_jax.scoring import layout, tree_layout
  n, prompt = 64, 20
  lengths = layout.ExampleLengths(4, np.full(n, prompt), 2)
  demo = prompt + 1 + 2
  labels = np.ones((1, n), np.int32)
  cand, query = layout.scored_rows(labels)
  plan = lambda t: tree_layout.tree_plan(
      lengths, labels, np.arange(n), np.arange(n), cand, query,
      min_seq_len=64, min_width=8, rows=8, tail=t)
  leaf = int(plan(tail).leaf.length.sum())
  assert leaf == n * prompt + (n - tail) * tail * demo + tail * (tail - 1) * demo
  assert int(plan(0).leaf.length.sum()) == n * prompt
  levels = lambda p: sum(int(q.length.sum()) for q in p.levels)
  rest = n - tail
  # The rest's tree (its own levels) plus one encoding of the rest.
  assert levels(plan(tail)) == rest * demo + levels(tree_layout.tree_plan(
      layout.ExampleLengths(4, np.full(rest, prompt), 2),
      np.ones((1, rest), np.int32), np.arange(rest), np.arange(rest),
      *layout.scored_rows(np.ones((1, rest), np.int32)), min_seq_len=64,
      min_width=8, rows=8))


@pytest.mark.parametrize("context", CONTEXTS)
def test_tree_prompts_follow_the_documented_order_at_every_tail(context):
  """The plan's prompts (token-table indices), for every tail from none to
  all, against the reference order built from the documentation."""
  from icm_jax.scoring import layout, tree_layout
  n = len(GROUPS)
  lengths = layout.ExampleLengths(3, np.arange(n) % 4 + 2, 2)
  demo_offset, prompt_offset, _ = tree_layout.token_table_offsets(lengths)
  unit, block = units_and_blocks(context)
  labels = np.random.RandomState(9).randint(0, 2, n).astype(np.int32)
  labels[[3, 8]] = -1
  queries = np.ones(n, bool)
  cand, query = layout.scored_rows(labels[None], queries[None])
  for tail in range(n + 1):
    got = tree_layout.tree_prompts(lengths, labels[None], unit, block, cand,
                                   query, tail=tail)
    for i, prompt in zip(query, got):
      want = [np.arange(3)] + [
          demo_offset[j, labels[j]] + np.arange(lengths.demo[j])
          for j in reference_demos(labels, block, unit, queries, i, tail)]
      want.append(prompt_offset[i] + np.arange(lengths.prompt[i]))
      np.testing.assert_array_equal(prompt, np.concatenate(want),
                                    err_msg=f"tail={tail} query={i}")
