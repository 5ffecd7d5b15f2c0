"""Exact leave-one-out scoring: row i = every other demonstration + prompt i.

Rows are assembled on device from (labels, query index) so only O(N) integers
cross from the host per call; `lax.map` walks micro-batches of rows so memory
is bounded by `rows_per_chunk` rows, not by N.

Prefix sharing (`exact_shared_scores`): with F = header + all labelled demos,
row i = F[:start_i] + F[end_i:] + prompt_i. Keys/values of F are computed once
per assignment; each row then runs only its suffix F[end_i:] + prompt_i
against the first start_i cached positions. Suffixes are packed two to a
sequence (long with short) so a packed sequence is about as long as F.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from icm_jax.model import KVCache, forward, masks
from icm_jax.scoring.chunked import chunked_forward
from icm_jax.scoring.common import ExampleArrays, constrain_batch, label_log_probs


def exact_row_tokens(data: ExampleArrays, labels: jax.Array, query: jax.Array,
                     *, seq_len: int, header_len: int, sep_len: int,
                     with_query: bool = True):
  """Tokens [seq_len] and true length of one LOO row.

  Row = header + demos (prompt_j, label token, separator) of every labelled
  j != query, in example order + prompt_query; right-padded with 0. With
  query=-1 and with_query=False: the full demonstration sequence F.
  """
  num, width = data.prompt_tokens.shape
  prompt_len = data.prompt_len
  included = (labels >= 0) & (jnp.arange(num) != query)
  demo_len = jnp.where(included, prompt_len + 1 + sep_len, 0)
  ends = header_len + jnp.cumsum(demo_len)
  starts = ends - demo_len
  demo_end = ends[-1]
  row_len = demo_end + (prompt_len[query] if with_query else 0)

  t = jnp.arange(seq_len)
  j = jnp.clip(jnp.searchsorted(ends, t, side="right"), 0, num - 1)
  offset = t - starts[j]
  pj = prompt_len[j]
  label_tok = data.label_token[jnp.clip(labels[j], 0, 1)]
  sep_tok = data.separator[jnp.clip(offset - pj - 1, 0, data.separator.shape[0] - 1)]
  demo_tok = jnp.where(offset < pj, data.prompt_tokens[j, jnp.clip(offset, 0, width - 1)],
                       jnp.where(offset == pj, label_tok, sep_tok))
  query_tok = data.prompt_tokens[query, jnp.clip(t - demo_end, 0, width - 1)]
  head_tok = data.header[jnp.clip(t, 0, data.header.shape[0] - 1)]
  tokens = jnp.where(
      t < header_len, head_tok,
      jnp.where(t < demo_end, demo_tok, jnp.where(t < row_len, query_tok, 0)))
  return tokens, row_len


def exact_scores(params, data: ExampleArrays, labels, row_candidate, row_query,
                 *, model_config, token_sets, seq_len: int, header_len: int,
                 sep_len: int, rows_per_chunk: int, batch_sharding_fn=None):
  """(log P(False), log P(True)) [R] for rows (labels[row_candidate], row_query).

  labels: [C, N] int32 in {-1 (unlabelled), 0, 1}; R = len(row_query) must be
  a multiple of rows_per_chunk.
  """
  num_rows = row_query.shape[0]
  chunks = num_rows // rows_per_chunk
  cand = row_candidate.reshape(chunks, rows_per_chunk)
  query = row_query.reshape(chunks, rows_per_chunk)

  def one_chunk(args):
    c, q = args
    tokens, lengths = jax.vmap(
        lambda cc, qq: exact_row_tokens(data, labels[cc], qq, seq_len=seq_len,
                                        header_len=header_len,
                                        sep_len=sep_len))(c, q)
    tokens = constrain_batch(tokens, batch_sharding_fn)
    b = tokens.shape[0]
    logits = forward(params, tokens, masks.default_positions(b, seq_len),
                     masks.padded_causal_mask(lengths, seq_len),
                     config=model_config,
                     logit_positions=(lengths - 1)[:, None])
    return label_log_probs(logits[:, 0], token_sets)

  lp_false, lp_true = jax.lax.map(one_chunk, (cand, query))
  return lp_false.reshape(num_rows), lp_true.reshape(num_rows)


def demonstrations_cache(params, data: ExampleArrays, labels, *, model_config,
                         full_len: int, header_len: int, sep_len: int,
                         query_chunk: int = 0, batch_sharding_fn=None):
  """Keys/values [L, C, full_len, K, D] of F = header + every labelled
  demonstration of each assignment (labels [C, N]), one causal pass in
  query chunks; and F's true lengths [C]."""
  num_cand = labels.shape[0]
  full_tokens, full_lengths = jax.vmap(
      lambda lab: exact_row_tokens(data, lab, -1, seq_len=full_len,
                                   header_len=header_len, sep_len=sep_len,
                                   with_query=False))(labels)
  full_tokens = constrain_batch(full_tokens, batch_sharding_fn)
  keys = jnp.arange(full_len)

  def full_mask(rows):  # real keys only; causality is added by the model
    real = keys[None, None, :] < full_lengths[:, None, None]
    return jnp.broadcast_to(real, (num_cand, rows.shape[0], full_len))

  # Hidden states are discarded: only F's keys/values are needed.
  _, cache = chunked_forward(
      params, full_tokens, masks.default_positions(num_cand, full_len),
      full_mask, model_config=model_config, chunk=query_chunk,
      return_kv=True)
  return cache, full_lengths


def exact_shared_scores(params, data: ExampleArrays, labels, slot_candidate,
                        slot_query, slot_start, slot_len, *, model_config,
                        token_sets, full_len: int, packed_len: int,
                        header_len: int, sep_len: int, groups: int = 1,
                        query_chunk: int = 0, batch_sharding_fn=None):
  """(log P(False), log P(True)) [P, 2] for P packed sequences of 2 slots.

  slot_candidate/slot_query/slot_start/slot_len: [P, 2] int32 — the slot's
  assignment, example, prefix length start_i and suffix length (0 = empty
  slot). Both slots of a sequence share a candidate. full_len: static bucket
  of the F length; packed_len: static bucket of the packed suffix length.
  P must be a multiple of `groups` (sequences per micro-batch). query_chunk:
  run both passes in chunks of this many queries (chunked.chunked_forward;
  0 = whole sequences), so no mask is larger than [chunk, keys].
  """
  build = functools.partial(exact_row_tokens, data, seq_len=full_len,
                            header_len=header_len, sep_len=sep_len)
  cache, _ = demonstrations_cache(
      params, data, labels, model_config=model_config, full_len=full_len,
      header_len=header_len, sep_len=sep_len, query_chunk=query_chunk,
      batch_sharding_fn=batch_sharding_fn)
  keys = jnp.arange(full_len)

  def packed_inputs(cand, query, start, length):  # each [2]
    rows = jax.vmap(lambda c, q: build(labels[c], q,
                                       seq_len=full_len + data.prompt_tokens.shape[1])[0]
                    )(cand, query)                         # [2, T + Lp]
    u = jnp.arange(packed_len)
    second = u >= length[0]
    slot = second.astype(jnp.int32)
    k = u - jnp.where(second, length[0], 0)
    valid = u < length[0] + length[1]
    src = jnp.clip(start[slot] + k, 0, rows.shape[1] - 1)
    tokens = jnp.where(valid, rows[slot, src], 0)
    positions = jnp.where(valid, start[slot] + k, 0)
    read_at = jnp.maximum(jnp.cumsum(length) - 1, 0)
    # Per position: the slot (-1 = padding) and its visible cache length.
    return tokens, positions, jnp.where(valid, slot, -1), start[slot], read_at

  def packed_mask(key_slot, key_start, rows):  # [G, U] each -> [G, Q, T + U]
    q_slot, q_start = key_slot[:, rows], key_start[:, rows]
    cache_mask = keys[None, None, :] < q_start[:, :, None]
    same = (q_slot[:, :, None] == key_slot[:, None, :]) & (
        key_slot[:, None, :] >= 0)
    # Causality inside the packed suffixes is added by the model.
    self_mask = same | (rows[:, None] == jnp.arange(packed_len)[None, :])[None]
    return jnp.concatenate([cache_mask, self_mask], axis=2)

  def one_chunk(args):  # `groups` packed sequences side by side
    cand, query, start, length = args
    tokens, positions, key_slot, key_start, read_at = jax.vmap(packed_inputs)(
        cand, query, start, length)
    tokens = constrain_batch(tokens, batch_sharding_fn)
    kv = KVCache(*(a[:, cand[:, 0]] for a in cache))
    logits = chunked_forward(
        params, tokens, positions,
        functools.partial(packed_mask, key_slot, key_start),
        model_config=model_config, chunk=query_chunk, prefix=kv,
        logit_positions=read_at)
    return label_log_probs(logits, token_sets)

  chunked = [a.reshape((-1, groups) + a.shape[1:])
             for a in (slot_candidate, slot_query, slot_start, slot_len)]
  lp_false, lp_true = jax.lax.map(one_chunk, tuple(chunked))
  return lp_false.reshape(-1, 2), lp_true.reshape(-1, 2)
