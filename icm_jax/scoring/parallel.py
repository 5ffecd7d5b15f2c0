"""One-pass leave-one-out ("parallel" mode) with a demonstration KV cache.

Semantics (structured prompting / parallel context windows): every example j
is encoded once as its own demonstration slot — header, then prompt_j + label
token + separator — attending only to the header and causally to itself. Slots
are right-aligned: every demonstration ends at position `end_position`, so all
demonstrations sit at the same distance from the queries. A query slot i
(prompt_i at positions end_position, end_position+1, ...) attends to the
header, to every *labelled* demonstration slot j != i (with j's current label),
and causally to itself. Dropping slot i from query i's view is exactly
leave-one-out under these semantics.

A demonstration slot depends only on (example, label), never on the other
examples, so its keys/values are computed once per example and label
(`build_demo_cache`) and an evaluation of U(D) costs only the query tokens
(`parallel_scores`). The cache holds both labels' tails side by side, so its
layout is fixed; the current labels only change the attention mask.

Cache key layout along S: [header (H) | prompt of each example (N x Lp,
left-padded) | label+separator tail for label 0 (N x Lt) | ... label 1 (N x Lt)].
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from icm_jax.model import KVCache, forward, masks
from icm_jax.scoring.common import ExampleArrays, constrain_batch, label_log_probs


class DemoCache(NamedTuple):
  kv: KVCache            # [L, 1, S, kv_heads, head_dim]
  key_example: jax.Array  # [S] example of each key, -1 for the header
  key_label: jax.Array    # [S] label of a tail key, -1 for header/prompt keys
  key_valid: jax.Array    # [S] False for padding


def _demo_rows(data: ExampleArrays, *, sep_len: int):
  """Tokens [2N, Lp + Lt] of every (label, example) demo, left-padded."""
  num, width = data.prompt_tokens.shape
  tail_len = 1 + sep_len
  pad = width - data.prompt_len                         # [N]
  t = jnp.arange(width)
  src = jnp.clip(t[None, :] - pad[:, None], 0, width - 1)
  prompt = jnp.where(t[None, :] >= pad[:, None],
                     jnp.take_along_axis(data.prompt_tokens, src, axis=1), 0)
  sep = data.separator[:sep_len] if sep_len else jnp.zeros((0,), jnp.int32)
  rows = []
  for label in (0, 1):
    tail = jnp.concatenate([data.label_token[label][None], sep])
    rows.append(jnp.concatenate(
        [prompt, jnp.broadcast_to(tail, (num, tail_len))], axis=1))
  valid = jnp.concatenate(
      [t[None, :] >= pad[:, None], jnp.ones((num, tail_len), jnp.bool_)], axis=1)
  return jnp.concatenate(rows), jnp.concatenate([valid, valid])


def build_demo_cache(params, data: ExampleArrays, *, model_config,
                     header_len: int, sep_len: int, end_position: int,
                     rows_per_chunk: int, batch_sharding_fn=None) -> DemoCache:
  """Keys/values of the header and of every (example, label) demonstration."""
  num, width = data.prompt_tokens.shape
  tail_len = 1 + sep_len
  row_len = width + tail_len
  header_kv = None
  if header_len:
    header = data.header[None, :header_len]
    _, header_kv = forward(params, header, masks.default_positions(1, header_len),
                           masks.causal_mask(1, header_len),
                           config=model_config, return_kv=True)

  tokens, valid = _demo_rows(data, sep_len=sep_len)     # [2N, row_len]
  total = tokens.shape[0]
  padded = -(-total // rows_per_chunk) * rows_per_chunk
  tokens = jnp.pad(tokens, ((0, padded - total), (0, 0)))
  valid = jnp.pad(valid, ((0, padded - total), (0, 0)), constant_values=True)
  positions = end_position - row_len + jnp.arange(row_len)
  idx = jnp.arange(row_len)
  causal = idx[:, None] >= idx[None, :]

  def one_chunk(args):
    tok, ok = args
    tok = constrain_batch(tok, batch_sharding_fn)
    b = tok.shape[0]
    # Pad queries may see themselves so no softmax row is empty.
    self_mask = (causal[None] & ok[:, None, :]) | jnp.eye(row_len, dtype=bool)[None]
    cache = None
    if header_kv is not None:
      cache = KVCache(*(jnp.broadcast_to(a, (a.shape[0], b) + a.shape[2:])
                        for a in header_kv))
      self_mask = jnp.concatenate(
          [jnp.ones((b, row_len, header_len), jnp.bool_), self_mask], axis=2)
    _, kv = forward(params, tok, jnp.broadcast_to(positions, (b, row_len)),
                    self_mask, config=model_config, kv_cache=cache,
                    return_kv=True)
    return kv

  kv = jax.lax.map(one_chunk, (tokens.reshape(-1, rows_per_chunk, row_len),
                               valid.reshape(-1, rows_per_chunk, row_len)))
  # [chunks, L, rows, T, K, D] -> [L, 2N, T, K, D]
  kv = KVCache(*(jnp.moveaxis(a, 0, 1).reshape(
      (a.shape[1], padded) + a.shape[3:])[:, :total] for a in kv))

  def flat(a, rows, cols):  # [L, n, c, K, D] -> [L, 1, n*c, K, D]
    return a[:, rows][:, :, cols].reshape(
        (a.shape[0], 1, -1) + a.shape[3:])

  prompt_rows, tail_cols = slice(0, num), slice(width, row_len)
  parts = [flat(a, prompt_rows, slice(0, width)) for a in kv]
  tails = [[flat(a, slice(label * num, (label + 1) * num), tail_cols)
            for a in kv] for label in (0, 1)]
  pieces_k = [parts[0], tails[0][0], tails[1][0]]
  pieces_v = [parts[1], tails[0][1], tails[1][1]]
  if header_kv is not None:
    pieces_k.insert(0, header_kv.k)
    pieces_v.insert(0, header_kv.v)
  cache = KVCache(jnp.concatenate(pieces_k, axis=2),
                  jnp.concatenate(pieces_v, axis=2))

  examples = jnp.arange(num)
  key_example = jnp.concatenate([
      jnp.full((header_len,), -1, jnp.int32),
      jnp.repeat(examples, width),
      jnp.repeat(examples, tail_len), jnp.repeat(examples, tail_len)])
  key_label = jnp.concatenate([
      jnp.full((header_len + num * width,), -1, jnp.int32),
      jnp.zeros((num * tail_len,), jnp.int32),
      jnp.ones((num * tail_len,), jnp.int32)])
  key_valid = jnp.concatenate([
      jnp.ones((header_len,), jnp.bool_),
      valid[:num, :width].reshape(-1),
      jnp.ones((2 * num * tail_len,), jnp.bool_)])
  return DemoCache(cache, key_example, key_label, key_valid)


def parallel_scores(params, data: ExampleArrays, cache: DemoCache, labels,
                    row_candidate, row_query, *, model_config, token_sets,
                    end_position: int, rows_per_chunk: int, groups: int,
                    batch_sharding_fn=None):
  """(log P(False), log P(True)) [R] of query rows against the demo cache.

  The rows of a micro-batch are packed `rows_per_chunk // groups` to a
  sequence (their own tokens masked block-diagonally), so every packed
  sequence shares one copy of the cache; `groups` sequences (a multiple of the
  mesh's batch divisor) run side by side.
  """
  num, width = data.prompt_tokens.shape
  num_rows = row_query.shape[0]
  per_group = rows_per_chunk // groups
  q_len = per_group * width
  cand = row_candidate.reshape(-1, groups, per_group)
  query = row_query.reshape(-1, groups, per_group)
  layers, _, cache_len = cache.kv.k.shape[:3]

  def group_inputs(c, q):  # c, q: [per_group]
    tokens = data.prompt_tokens[q].reshape(q_len)
    lengths = data.prompt_len[q]
    row_of = jnp.repeat(jnp.arange(per_group), width)
    t = jnp.tile(jnp.arange(width), per_group)
    # Cache keys: header always; demo keys of labelled j != query with the
    # label that j currently carries.
    lab = labels[c]                                      # [per_group, N]
    ex = jnp.clip(cache.key_example, 0, num - 1)
    key_lab = jnp.take(lab, ex, axis=1)                  # [per_group, S]
    demo_ok = (key_lab >= 0) & (cache.key_example[None] != q[:, None]) & (
        (cache.key_label[None] < 0) | (cache.key_label[None] == key_lab))
    row_cache = cache.key_valid[None] & (
        (cache.key_example[None] < 0) | demo_ok)          # [per_group, S]
    cache_mask = row_cache[row_of]                       # [q_len, S]
    same_row = row_of[:, None] == row_of[None, :]
    self_mask = same_row & (t[None, :] <= t[:, None]) & (
        (t[None, :] < lengths[row_of][:, None]) | (t[None, :] == t[:, None]))
    mask = jnp.concatenate([cache_mask, self_mask], axis=1)
    read_at = jnp.arange(per_group) * width + lengths - 1
    return tokens, mask, read_at

  positions = end_position + jnp.tile(jnp.arange(width), per_group)

  def one_chunk(args):
    c, q = args
    tokens, mask, read_at = jax.vmap(group_inputs)(c, q)
    tokens = constrain_batch(tokens, batch_sharding_fn)
    kv = KVCache(*(jnp.broadcast_to(a, (layers, groups) + a.shape[2:])
                   for a in cache.kv))
    logits = forward(params, tokens, jnp.broadcast_to(positions, (groups, q_len)),
                     mask, config=model_config, kv_cache=kv,
                     logit_positions=read_at)
    return label_log_probs(logits, token_sets)

  lp_false, lp_true = jax.lax.map(one_chunk, (cand, query))
  return lp_false.reshape(num_rows), lp_true.reshape(num_rows)
