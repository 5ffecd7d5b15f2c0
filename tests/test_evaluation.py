"""Evaluation stage: label-word log-probs vs independent references, demo
selection, accuracy reports and plots.

References: a tiny random model run naively (one full concatenated sequence per
query, no cache, no padding) and the real SmolLM2 through transformers/torch on
the whole tokenised text.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from icm_jax import sharding
from icm_jax.evaluation import label_log_probs, select_demonstrations
from icm_jax.model import (LlamaConfig, forward, init_params, masks,
                           param_shapes)
from icm_jax.tokenization import ExampleTokens

CFG = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=512)
LABEL_SETS = (np.array([1, 5], np.int32), np.array([2, 7], np.int32))


@pytest.fixture(scope="module")
def params():
  return init_params(CFG, jax.random.key(0))


def make_examples(lengths, header=(), sep=(3, 3), seed=0):
  rng = np.random.RandomState(seed)
  prompts = tuple(rng.randint(8, 61, n).astype(np.int32) for n in lengths)
  return ExampleTokens(tuple(f"ex{i}" for i in range(len(lengths))), prompts,
                       np.array([1, 2], np.int32), np.array(sep, np.int32),
                       np.array(header, np.int32), LABEL_SETS)


def naive_log_probs(params, config, sequence, token_sets):
  """One unpadded sequence through `forward`; word log-probs at its end."""
  t = len(sequence)
  logits = forward(params, jnp.asarray([sequence]),
                   masks.default_positions(1, t), masks.causal_mask(1, t),
                   config=config)
  logp = np.asarray(jax.nn.log_softmax(logits[0, -1]), np.float64)
  return tuple(float(np.log(np.exp(logp[s]).sum())) for s in token_sets)


def context_tokens(ex, demos, labels, query):
  seq = list(ex.header)
  for d, y in zip(demos, labels):
    seq += list(ex.prompts[d]) + [int(ex.label_token[y])] + list(ex.separator)
  return seq + list(ex.prompts[query])


# -----------------------------------------------------------------------------
# Tiny random model: cached prefix + padded batches == naive full sequences
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("header", [(), (40, 41)])
def test_tiny_model_matches_naive(params, header):
  lengths = [5, 9, 3, 12, 7, 4, 11, 6, 8]
  ex = make_examples(lengths, header=header, seed=len(header))
  demos, labels = [1, 4, 7], [1, 0, 1]
  queries = [0, 2, 3, 5, 6, 8]
  for use_demos in (False, True):
    d, y = (demos, labels) if use_demos else ([], [])
    lf, lt = label_log_probs(CFG, params, ex, queries, demos=d,
                             demo_labels=y if use_demos else None,
                             batch_size=4, min_seq_len=8)
    assert lf.shape == lt.shape == (len(queries),)
    for k, q in enumerate(queries):
      ref = naive_log_probs(params, CFG, context_tokens(ex, d, y, q), LABEL_SETS)
      np.testing.assert_allclose([lf[k], lt[k]], ref, atol=2e-5,
                                 err_msg=f"query {q} demos={use_demos}")


def test_demo_labels_change_the_prediction(params):
  # Guard against a cache that is ignored: flipping demo labels must matter.
  ex = make_examples([6, 6, 6, 6])
  a = label_log_probs(CFG, params, ex, [3], demos=[0, 1, 2],
                      demo_labels=[0, 0, 0])
  b = label_log_probs(CFG, params, ex, [3], demos=[0, 1, 2],
                      demo_labels=[1, 1, 1])
  assert abs(float(a[1][0] - b[1][0])) > 1e-4


def test_sharded_equals_unsharded(params):
  mesh = sharding.create_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
  placed = sharding.shard_params(
      params, sharding.param_shardings(param_shapes(CFG), mesh))
  ex = make_examples([5, 9, 3, 12, 7, 4, 11], seed=3)
  queries = [0, 2, 3, 5, 6]
  for demos, labels in (([], None), ([1, 4], [0, 1])):
    plain = label_log_probs(CFG, params, ex, queries, demos=demos,
                            demo_labels=labels, batch_size=3, min_seq_len=8)
    sharded = label_log_probs(CFG, placed, ex, queries, demos=demos,
                              demo_labels=labels, mesh=mesh, batch_size=3,
                              min_seq_len=8)
    np.testing.assert_allclose(sharded, plain, atol=2e-5)


def test_label_log_probs_errors(params):
  ex = make_examples([5, 9, 3, 12])
  with pytest.raises(ValueError, match="'ex1' is both a demonstration and a query"):
    label_log_probs(CFG, params, ex, [0, 1], demos=[1], demo_labels=[0])
  with pytest.raises(ValueError, match="demo 'ex2': label 2"):
    label_log_probs(CFG, params, ex, [0], demos=[1, 2], demo_labels=[0, 2])
  with pytest.raises(ValueError, match="1 demo_labels for 2 demos"):
    label_log_probs(CFG, params, ex, [0], demos=[1, 2], demo_labels=[0])
  with pytest.raises(ValueError, match="need demo_labels"):
    label_log_probs(CFG, params, ex, [0], demos=[1])
  small = CFG.replace(max_position_embeddings=20)
  # 12-token prompt alone fits 20; with the 5+1+2 token demo 'ex0' it is 20
  # (fits); with 'ex1' (9+1+2) it is 24 > 20.
  label_log_probs(small, params, ex, [3], demos=[0], demo_labels=[1])
  with pytest.raises(ValueError, match=r"query 'ex3': context of 24 tokens"):
    label_log_probs(small, params, ex, [3], demos=[1], demo_labels=[1])
  tiny = CFG.replace(max_position_embeddings=10)
  with pytest.raises(ValueError, match=r"query 'ex3': context of 12 tokens"):
    label_log_probs(tiny, params, ex, [0, 3])


# -----------------------------------------------------------------------------
# select_demonstrations
# -----------------------------------------------------------------------------


def test_select_demonstrations_greedy_prefix():
  ex = make_examples([5, 9, 3, 12, 7, 4], header=(40,), sep=(3,))
  queries = [0, 3]                       # longest query prompt: 12
  candidates = [2, 1, 5, 4]              # demo lengths 5, 11, 6, 9
  base = 1 + 12
  # Exactly fits the first three (base + 22); the fourth would need 9 more.
  assert select_demonstrations(ex, candidates, queries, base + 22) == [2, 1, 5]
  assert select_demonstrations(ex, candidates, queries, base + 22 + 8) == [2, 1, 5]
  assert select_demonstrations(ex, candidates, queries, base + 31) == [2, 1, 5, 4]
  assert select_demonstrations(ex, candidates, queries, base + 21) == [2, 1]
  # Greedy prefix: stops at the first that does not fit, even if a later
  # (shorter) one would.
  assert select_demonstrations(ex, [1, 2], queries, base + 10) == []
  assert select_demonstrations(ex, candidates, queries, base) == []
  with pytest.raises(ValueError, match=r"query 'ex3'.*13 tokens > max_context 12"):
    select_demonstrations(ex, candidates, queries, base - 1)
