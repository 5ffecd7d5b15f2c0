"""Shared-context one-pass LOO ("shared" mode): one causal pass over F.

Semantics: F = header + every labelled demonstration of the assignment, in
example order, encoded once causally, exactly as exact mode encodes a row's
context. Query i (prompt_i) then attends to F with the demonstrations of its
own block masked out (block = the example itself for leave-one-out, its
consistency group for leave-group-out, its fold for leave-block-out), and
causally to itself. Its prompt starts at position len(F), after every key it
can see, so all relative positions are positive as in exact mode. (Starting
it at len(F) minus the masked tokens, its exact-mode position, puts later
demonstrations' keys at negative distances; measured on SmolLM2 that is
worse: TruthfulQA N = 16, gold labels, Spearman with exact 0.74 vs 0.79.)

What differs from exact mode: demonstrations after i in F were encoded with
i's demonstration (and label) in their context, so i's label reaches query i
through their keys/values (the "leak"); and the demonstrations before i sit
len(demo_i) further from the query than in the exact-mode row.

Cost per evaluation: one pass over F per assignment plus the query tokens,
about 2·N·L token-forwards, against about N²·L/2 for exact mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from icm_jax.model import KVCache, forward
from icm_jax.scoring.common import ExampleArrays, constrain_batch, label_log_probs
from icm_jax.scoring.exact import demonstrations_cache


def key_examples(data: ExampleArrays, labels: jax.Array, *, full_len: int,
                 header_len: int, sep_len: int):
  """Per F position: the example whose demonstration it is (-1: header or
  padding) and whether it is real. labels: [N]."""
  included = labels >= 0
  demo_len = jnp.where(included, data.prompt_len + 1 + sep_len, 0)
  ends = header_len + jnp.cumsum(demo_len)
  t = jnp.arange(full_len)
  owner = jnp.clip(jnp.searchsorted(ends, t, side="right"), 0,
                   labels.shape[0] - 1)
  real = t < ends[-1]
  return jnp.where(real & (t >= header_len), owner, -1), real


def shared_context_scores(params, data: ExampleArrays, labels, block,
                          seq_candidate, seq_query, *, model_config,
                          token_sets, full_len: int, header_len: int,
                          sep_len: int, groups: int, query_chunk: int = 0,
                          batch_sharding_fn=None):
  """(log P(False), log P(True)) [P, Q] for P sequences of Q packed queries.

  labels: [C, N] int32 in {-1, 0, 1}; block: [N] int32, the unit masked out of
  a query's context; seq_candidate: [P] the assignment of each sequence;
  seq_query: [P, Q] the example of each slot, -1 for an empty slot. P must be
  a multiple of `groups` (sequences per micro-batch). query_chunk: the pass
  over F in chunks of this many queries (exact.demonstrations_cache).
  """
  num, width = data.prompt_tokens.shape
  per_seq = seq_query.shape[1]
  q_len = per_seq * width
  cache, full_lengths = demonstrations_cache(
      params, data, labels, model_config=model_config, full_len=full_len,
      header_len=header_len, sep_len=sep_len, query_chunk=query_chunk,
      batch_sharding_fn=batch_sharding_fn)

  def sequence_inputs(cand, query):  # cand: [], query: [Q]
    lab = labels[cand]
    owner, real = key_examples(data, lab, full_len=full_len,
                                         header_len=header_len,
                                         sep_len=sep_len)
    q = jnp.clip(query, 0, num - 1)
    used = query >= 0
    qblock = jnp.where(used, block[q], -1)                       # [Q]
    hidden = (owner[None, :] >= 0) & (
        block[jnp.clip(owner, 0, num - 1)][None, :] == qblock[:, None])
    row_cache = real[None, :] & ~hidden                          # [Q, S]
    start = jnp.broadcast_to(full_lengths[cand], (per_seq,))     # [Q]
    lengths = jnp.where(used, data.prompt_len[q], 0)
    row_of = jnp.repeat(jnp.arange(per_seq), width)
    t = jnp.tile(jnp.arange(width), per_seq)
    tokens = jnp.where(used[row_of], data.prompt_tokens[q].reshape(q_len), 0)
    positions = jnp.where(used[row_of], start[row_of] + t, 0)
    same_row = row_of[:, None] == row_of[None, :]
    # Causality inside the packed block is added by the model; padding keys
    # are hidden, and every query keeps its own key so no row is empty.
    self_mask = same_row & (
        (t[None, :] < lengths[row_of][:, None]) | (t[None, :] == t[:, None]))
    mask = jnp.concatenate([row_cache[row_of], self_mask], axis=1)
    read_at = jnp.arange(per_seq) * width + jnp.maximum(lengths - 1, 0)
    return tokens, positions, mask, read_at

  def one_chunk(args):  # `groups` sequences side by side
    cand, query = args
    tokens, positions, mask, read_at = jax.vmap(sequence_inputs)(cand, query)
    tokens = constrain_batch(tokens, batch_sharding_fn)
    kv = KVCache(*(a[:, cand] for a in cache))
    logits = forward(params, tokens, positions, mask, config=model_config,
                     kv_cache=kv, logit_positions=read_at)
    return label_log_probs(logits, token_sets)

  lp_false, lp_true = jax.lax.map(
      one_chunk, (seq_candidate.reshape(-1, groups),
                  seq_query.reshape(-1, groups, per_seq)))
  return lp_false.reshape(-1, per_seq), lp_true.reshape(-1, per_seq)
