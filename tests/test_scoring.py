"""LOO scoring kernel vs independent references, on tiny random models.

References build each LOO prompt as one explicit token sequence (exact mode)
or one explicit sequence with hand-built positions and mask (parallel mode) and
run the plain model on it, one example at a time.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax import sharding
from icm_jax.model import LlamaConfig, forward, init_params, masks
from icm_jax.scoring import LOOScorer, ScoringConfig
from icm_jax.tokenization import ExampleTokens

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=2048)
LABEL_SETS = (np.array([1, 5], np.int32), np.array([2, 7], np.int32))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def make_examples(n, header_len=0, seed=0, sep=(3, 3)):
  rng = np.random.RandomState(seed)
  prompts = tuple(rng.randint(8, 61, rng.randint(3, 10)).astype(np.int32)
                  for _ in range(n))
  return ExampleTokens(tuple(f"ex{i}" for i in range(n)), prompts,
                       np.array([1, 2], np.int32), np.array(sep, np.int32),
                       np.arange(40, 40 + header_len, dtype=np.int32),
                       LABEL_SETS)


def next_token_label_log_probs(params, tokens, positions=None, mask=None):
  tokens = jnp.asarray([tokens])
  t = tokens.shape[1]
  positions = masks.default_positions(1, t) if positions is None else positions
  mask = masks.causal_mask(1, t) if mask is None else mask
  logits = forward(params, tokens, positions, mask, config=CFG)[0, -1]
  logp = jax.nn.log_softmax(logits)
  return [float(jax.nn.logsumexp(logp[jnp.asarray(s)])) for s in LABEL_SETS]


def exact_reference(params, ex, labels, i):
  tokens = list(ex.header)
  for j, y in enumerate(labels):
    if j != i and y >= 0:
      tokens += list(ex.prompts[j]) + [int(ex.label_token[y])] + list(ex.separator)
  return next_token_label_log_probs(params, tokens + list(ex.prompts[i]))


def parallel_reference(params, ex, labels, i):
  """Header, each demo slot right-aligned to one end position, then query i."""
  h = len(ex.header)
  tail = 1 + len(ex.separator)
  end = h + max(len(p) for p in ex.prompts) + tail
  tokens, positions, slot = list(ex.header), list(range(h)), [-1] * h
  for j, y in enumerate(labels):
    if j == i or y < 0:
      continue
    demo = list(ex.prompts[j]) + [int(ex.label_token[y])] + list(ex.separator)
    tokens += demo
    positions += list(range(end - len(demo), end))
    slot += [j] * len(demo)
  q = list(ex.prompts[i])
  tokens += q
  positions += list(range(end, end + len(q)))
  slot += [-2] * len(q)
  slot = np.array(slot)
  n = len(tokens)
  idx = np.arange(n)
  causal = idx[:, None] >= idx[None, :]
  header_key = slot[None, :] == -1
  same_slot = slot[:, None] == slot[None, :]
  query_row = slot[:, None] == -2
  mask = causal & (header_key | same_slot | query_row)
  return next_token_label_log_probs(params, tokens, jnp.asarray([positions]),
                                    jnp.asarray(mask[None]))


@pytest.mark.parametrize("header_len", [0, 3])
@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_exact_mode_equals_naive_prompts(params, header_len, prefix_sharing):
  ex = make_examples(9, header_len)
  labels = np.array([1, 0, -1, 1, 1, -1, 0, 0, 1])
  out = LOOScorer(CFG, params, ex, ScoringConfig(
      "exact", rows_per_chunk=4, prefix_sharing=prefix_sharing)
                  ).score(labels, queries=np.ones(9, bool))
  ref = np.array([exact_reference(params, ex, labels, i) for i in range(9)])
  np.testing.assert_allclose(out.log_p_false, ref[:, 0], atol=1e-4)
  np.testing.assert_allclose(out.log_p_true, ref[:, 1], atol=1e-4)
  np.testing.assert_allclose(out.s, ref[:, 1] - ref[:, 0], atol=1e-4)


@pytest.mark.parametrize("query_chunk", [7, 16])
def test_exact_mode_in_query_chunks_equals_naive_prompts(params, query_chunk):
  # Rows of ~60 tokens: several chunks per pass (one not dividing the
  # length), both the F pass and the packed suffix pass.
  ex = make_examples(9, header_len=2, seed=7)
  labels = np.array([[1, 0, -1, 1, 1, -1, 0, 0, 1],
                     [0, 1, 1, 1, 0, 0, -1, 1, 1]])
  scorer = LOOScorer(CFG, params, ex, ScoringConfig(
      "exact", rows_per_chunk=4, query_chunk=query_chunk))
  out = scorer.score(labels, queries=np.ones_like(labels, bool))
  assert scorer.last_shape[2] > 2 * query_chunk
  for c in range(2):
    ref = np.array([exact_reference(params, ex, labels[c], i) for i in range(9)])
    np.testing.assert_allclose(out.log_p_false[c], ref[:, 0], atol=1e-4)
    np.testing.assert_allclose(out.log_p_true[c], ref[:, 1], atol=1e-4)


@pytest.mark.parametrize("header_len", [0, 2])
def test_parallel_mode_equals_explicit_sequences(params, header_len):
  ex = make_examples(9, header_len, seed=1)
  labels = np.array([1, 0, -1, 1, 1, -1, 0, 0, 1])
  scorer = LOOScorer(CFG, params, ex, ScoringConfig("parallel", rows_per_chunk=4))
  out = scorer.score(labels, queries=np.ones(9, bool))
  ref = np.array([parallel_reference(params, ex, labels, i) for i in range(9)])
  np.testing.assert_allclose(out.log_p_false, ref[:, 0], atol=1e-4)
  np.testing.assert_allclose(out.log_p_true, ref[:, 1], atol=1e-4)
  # Not vacuous: parallel semantics differ from exact prompts.
  exact = np.array([exact_reference(params, ex, labels, i) for i in range(9)])
  assert np.abs(ref - exact).max() > 1e-3


def shared_context_reference(params, ex, labels, block, i):
  """One explicit sequence F + prompt_i: F (header + labelled demos in order)
  causal; the query sees F minus every demo of i's block, at positions
  len(F), len(F) + 1, ..."""
  tokens, owner = list(ex.header), [-1] * len(ex.header)
  for j, y in enumerate(labels):
    if y >= 0:
      demo = list(ex.prompts[j]) + [int(ex.label_token[y])] + list(ex.separator)
      tokens += demo
      owner += [j] * len(demo)
  full = len(tokens)
  owner = np.array(owner, np.int64)
  hidden = (owner >= 0) & (np.asarray(block)[np.maximum(owner, 0)] == block[i])
  q = list(ex.prompts[i])
  n = full + len(q)
  mask = np.zeros((n, n), bool)
  mask[:full, :full] = np.tril(np.ones((full, full), bool))
  mask[full:, :full] = ~hidden[None, :]
  mask[full:, full:] = np.tril(np.ones((len(q), len(q)), bool))
  positions = list(range(full + len(q)))
  return next_token_label_log_probs(params, tokens + q,
                                    jnp.asarray([positions]),
                                    jnp.asarray(mask[None]))


@pytest.mark.parametrize("header_len,context,query_chunk", [
    (0, "leave_one_out", 0), (2, "leave_one_out", 16),  # F in 16-token chunks
    (1, "leave_group_out", 0), (1, "leave_block_out", 0)])
def test_shared_mode_equals_explicit_sequences(params, header_len, context,
                                               query_chunk):
  ex = make_examples(9, header_len, seed=6)
  groups = ["a", "a", "b", "c", "c", "c", "d", "b", "e"]
  labels = np.array([[1, 0, -1, 1, 1, -1, 0, 0, 1],
                     [0, 1, 1, -1, 0, 0, 1, -1, 1]])
  config = ScoringConfig("shared", rows_per_chunk=4, context=context, blocks=2,
                         query_chunk=query_chunk)
  scorer = LOOScorer(CFG, params, ex, config, groups=groups)
  out = scorer.score(labels, queries=np.ones_like(labels, bool))
  block = {"leave_one_out": np.arange(9),
           "leave_group_out": np.array([0, 0, 1, 2, 2, 2, 3, 1, 4]),
           "leave_block_out": np.array([0, 0, 1, 0, 0, 0, 1, 1, 0])}[context]
  for c in range(2):
    ref = np.array([shared_context_reference(params, ex, labels[c], block, i)
                    for i in range(9)])
    np.testing.assert_allclose(out.log_p_false[c], ref[:, 0], atol=1e-4)
    np.testing.assert_allclose(out.log_p_true[c], ref[:, 1], atol=1e-4)
  # Not vacuous: the semantics differ from exact prompts (the leak).
  if context == "leave_one_out":
    exact = LOOScorer(CFG, params, ex, ScoringConfig("exact")).score(
        labels[0], queries=np.ones(9, bool))
    assert np.abs(out.s[0] - exact.s).max() > 1e-3


def test_default_queries_are_the_labelled_examples(params):
  ex = make_examples(6)
  labels = np.array([1, -1, 0, -1, 1, 0])
  out = LOOScorer(CFG, params, ex).score(labels)
  assert np.isnan(out.s[[1, 3]]).all() and np.isfinite(out.s[[0, 2, 4, 5]]).all()


MODES = [("exact", False), ("exact", True), ("parallel", False),
         ("shared", False)]


@pytest.mark.parametrize("mode,shared", MODES)
def test_candidate_batching_equals_separate_calls(params, mode, shared):
  ex = make_examples(8, seed=2)
  base = np.array([1, 0, 1, -1, 0, 1, -1, 0])
  cands = np.stack([base, np.where(base >= 0, 1 - base, -1),
                    np.array([0, 0, 0, 0, 1, 1, 1, -1])])
  scorer = LOOScorer(CFG, params, ex, ScoringConfig(mode, rows_per_chunk=4,
                                                    prefix_sharing=shared))
  together = scorer.score(cands)
  for k, cand in enumerate(cands):
    alone = scorer.score(cand)
    np.testing.assert_allclose(together.s[k], alone.s, atol=1e-5)
    assert np.array_equal(np.isnan(together.s[k]), np.isnan(alone.s))


@pytest.mark.parametrize("mode,shared", MODES)
def test_growing_labelled_set_compiles_once_per_bucket(params, mode, shared):
  ex = make_examples(64, seed=3, sep=(3,))
  scorer = LOOScorer(CFG, params, ex, ScoringConfig(
      mode, rows_per_chunk=8, min_seq_len=64, prefix_sharing=shared))
  labels = -np.ones(64, np.int32)
  shapes = set()
  sizes = range(8, 65, 3)  # every third size still crosses every bucket
  for k in sizes:
    labels[:k] = np.arange(k) % 2
    scorer.score(labels)
    shapes.add(scorer.last_shape)
  # Buckets, not steps: one compilation per distinct shape, fewer than calls.
  assert scorer.trace_count == len(shapes) < len(sizes)
  # Each dimension takes at most two bucket values per power of two, and as
  # the set grows monotonically, every new shape moves some dimension on.
  dims = [sorted(set(d)) for d in zip(*shapes)]
  for values in dims:
    assert len(values) <= 2 * (np.log2(values[-1] / values[0]) + 1)
  assert len(shapes) <= 1 + sum(len(v) - 1 for v in dims)


@pytest.mark.parametrize("mode,shared", MODES)
def test_sharded_equals_unsharded(params, mode, shared):
  ex = make_examples(10, header_len=1, seed=4)
  labels = np.array([1, 0, -1, 1, 1, -1, 0, 0, 1, 0])
  mesh = sharding.create_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  sharded_params = sharding.shard_params(
      params, sharding.param_shardings(params, mesh))
  config = ScoringConfig(mode, rows_per_chunk=8, prefix_sharing=shared)
  plain = LOOScorer(CFG, params, ex, config)
  meshed = LOOScorer(CFG, sharded_params, ex, config, mesh=mesh)
  queries = np.ones(10, bool)
  np.testing.assert_allclose(meshed.score(labels, queries).s,
                             plain.score(labels, queries).s, atol=1e-5)


def test_too_long_for_context_names_the_example(params):
  small = CFG.replace(max_position_embeddings=40)
  ex = make_examples(6, seed=5)
  long_prompt = np.arange(8, 30, dtype=np.int32)
  ex_long = ExampleTokens(ex.ids, ex.prompts[:3] + (long_prompt,) + ex.prompts[4:],
                          ex.label_token, ex.separator, ex.header, LABEL_SETS)
  with pytest.raises(ValueError, match=r"ex3.*47 tokens > model context 40"):
    LOOScorer(small, params, ex_long)
  scorer = LOOScorer(small, params, ex)
  with pytest.raises(ValueError, match=r"LOO prompt for example 'ex\d'.*> model "
                     r"context 40"):
    scorer.score(np.ones(6, np.int32))


def test_bad_labels_rejected(params):
  scorer = LOOScorer(CFG, params, make_examples(4))
  with pytest.raises(ValueError, match="labels must be"):
    scorer.score(np.array([0, 1, 2, 0]))
  with pytest.raises(ValueError, match="cover 3 examples"):
    scorer.score(np.array([0, 1, 0]))


def leave_group_out_reference(params, ex, labels, groups, i):
  """exact_reference with every claim of i's group out of the prompt."""
  hidden = [y if groups[j] != groups[i] else -1 for j, y in enumerate(labels)]
  return exact_reference(params, ex, hidden, i)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_leave_group_out_equals_naive_prompts(params, prefix_sharing):
  ex = make_examples(9, header_len=2, seed=3)
  groups = ["a", "a", "b", "c", "c", "c", "d", "b", "e"]
  labels = np.array([[1, 0, -1, 1, 1, -1, 0, 0, 1],
                     [0, 0, 1, -1, 1, 0, 1, 1, -1]])
  queries = np.ones_like(labels, bool)
  queries[1, 4] = False  # a chosen subset stays NaN elsewhere
  out = LOOScorer(CFG, params, ex, ScoringConfig(
      "exact", rows_per_chunk=4, prefix_sharing=prefix_sharing,
      context="leave_group_out"), groups=groups).score(labels, queries)
  for c in range(2):
    for i in range(9):
      if not queries[c, i]:
        assert np.isnan(out.log_p_false[c, i])
        continue
      ref = leave_group_out_reference(params, ex, labels[c], groups, i)
      np.testing.assert_allclose(out.log_p_false[c, i], ref[0], atol=1e-4)
      np.testing.assert_allclose(out.log_p_true[c, i], ref[1], atol=1e-4)
  # The group's other claims were really removed: leave-one-out differs
  # for a claim whose group-mate is labelled.
  loo = LOOScorer(CFG, params, ex, ScoringConfig("exact")).score(labels[0])
  assert abs(float(loo.s[0]) - float(out.s[0, 0])) > 1e-4
  # Singleton groups have nothing else to leave out.
  np.testing.assert_allclose(loo.s[8], out.s[0, 8], atol=1e-4)


def test_leave_block_out_equals_naive_prompts(params):
  # Groups dealt round-robin into 2 folds in order of first appearance:
  # a, c, e -> fold 0; b, d -> fold 1.
  ex = make_examples(9, header_len=1, seed=8)
  groups = ["a", "a", "b", "c", "c", "c", "d", "b", "e"]
  folds = [0, 0, 1, 0, 0, 0, 1, 1, 0]
  labels = np.array([1, 0, 1, 1, 0, -1, 0, 1, 1])
  out = LOOScorer(CFG, params, ex, ScoringConfig(
      "exact", rows_per_chunk=4, context="leave_block_out", blocks=2),
                  groups=groups).score(labels)
  for i in np.nonzero(labels >= 0)[0]:
    ref = leave_group_out_reference(params, ex, labels, folds, i)
    np.testing.assert_allclose(out.log_p_false[i], ref[0], atol=1e-4)
    np.testing.assert_allclose(out.log_p_true[i], ref[1], atol=1e-4)


@pytest.mark.parametrize("key,value", [("blocks", 0), ("query_chunk", -1),
                                       ("query_chunk", 2.5)])
def test_bad_scoring_values_name_the_key(key, value):
  with pytest.raises(ValueError, match=f"scoring.{key}"):
    ScoringConfig(**{key: value})


def test_leave_group_out_needs_groups(params):
  ex = make_examples(3)
  with pytest.raises(ValueError, match="leave_group_out"):
    LOOScorer(CFG, params, ex, ScoringConfig(context="leave_group_out"))
  with pytest.raises(ValueError, match="scoring.context"):
    ScoringConfig(context="leave_pair_out")
