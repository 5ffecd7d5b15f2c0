"""Tree-mode passes on device (the plan: tree_layout.py).

One pass runs S segments in micro-batches of `rows`: each segment's tokens
attend to a prefix gathered from the key/value pool (the pieces named by its
ranges, in prompt order) and causally to themselves, in query chunks
(chunked.chunked_forward, so no mask is larger than [chunk, keys]). A level
pass writes the segments' keys/values into the pool; the leaf pass reads
the label log-probs at each row's last token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from icm_jax.model import KVCache
from icm_jax.scoring.chunked import chunked_forward
from icm_jax.scoring.common import constrain_batch, label_log_probs


def new_pool(model_config, pool_tokens: int, sharding=None) -> KVCache:
  """Zero keys/values [L, pool_tokens, K, D] in the compute dtype
  (sharding: a KVCache of NamedShardings, or None)."""
  cfg = model_config
  shape = (cfg.num_layers, pool_tokens, cfg.num_kv_heads, cfg.head_dim)
  make = lambda: jnp.zeros(shape, cfg.compute_dtype)
  if sharding is None:
    return KVCache(make(), make())
  return KVCache(*(jax.jit(make, out_shardings=s)() for s in sharding))


def _prefix_index(ranges, prefix_len: int):
  """[R, 2] (pool index, length) pieces -> pool index [P] and validity [P]."""
  lens = ranges[:, 1]
  ends = jnp.cumsum(lens)
  starts = ends - lens
  u = jnp.arange(prefix_len)
  r = jnp.clip(jnp.searchsorted(ends, u, side="right"), 0, ranges.shape[0] - 1)
  valid = u < ends[-1]
  return jnp.where(valid, ranges[r, 0] + u - starts[r], 0), valid


def tree_pass(params, pool: KVCache, tokens, start_pos, length, ranges,
              write_at, *, model_config, token_sets, prefix_len: int,
              rows: int, query_chunk: int, write: bool,
              batch_sharding_fn=None):
  """Runs one planned pass (tree_layout.TreePass as arrays).

  tokens [S, W] int32; start_pos, length, write_at [S]; ranges [S, R, 2].
  write=True: returns the pool with every segment's keys/values at
  write_at + offset (padding tokens are dropped). write=False: returns
  (log P(False), log P(True)) [S] read at each segment's last token.
  """
  num, width = tokens.shape
  pool_tokens = pool.k.shape[1]
  offsets = jnp.arange(width)

  def run(pool, args):
    tok, start, ln, rng = args
    tok = constrain_batch(tok, batch_sharding_fn)
    index, valid = jax.vmap(lambda r: _prefix_index(r, prefix_len))(rng)
    prefix = KVCache(pool.k[:, index], pool.v[:, index])  # [L, B, P, K, D]
    positions = start[:, None] + offsets[None, :]

    def key_mask(q):  # [Q] -> [B, Q, P + W]; causality is the model's
      own = (offsets[None, None, :] < ln[:, None, None]) | (
          q[:, None] == offsets[None, :])[None]
      seen = jnp.broadcast_to(valid[:, None, :], (tok.shape[0], q.shape[0],
                                                   prefix_len))
      return jnp.concatenate([seen, own], axis=2)

    if write:
      _, kv = chunked_forward(params, tok, positions, key_mask,
                              model_config=model_config, chunk=query_chunk,
                              prefix=prefix, return_kv=True)
      return kv
    logits = chunked_forward(params, tok, positions, key_mask,
                             model_config=model_config, chunk=query_chunk,
                             prefix=prefix,
                             logit_positions=jnp.maximum(ln - 1, 0)[:, None])
    return label_log_probs(logits[:, 0], token_sets)

  split = lambda a: a.reshape((num // rows, rows) + a.shape[1:])
  args = tuple(map(split, (tokens, start_pos, length, ranges)))
  if not write:
    lp_false, lp_true = jax.lax.map(lambda a: run(pool, a), args)
    return lp_false.reshape(num), lp_true.reshape(num)

  def step(pool, a):
    *a, at = a
    kv = run(pool, tuple(a))
    dest = jnp.where(offsets[None, :] < a[2][:, None],
                     at[:, None] + offsets[None, :], pool_tokens).reshape(-1)
    flat = lambda x: x.reshape((x.shape[0], -1) + x.shape[3:])
    pool = KVCache(*(p.at[:, dest].set(flat(n).astype(p.dtype), mode="drop")
                     for p, n in zip(pool, kv)))
    return pool, None

  pool, _ = jax.lax.scan(step, pool, args + (split(write_at),))
  return pool


def row_scores(params, tokens, lengths, *, model_config, token_sets,
               query_chunk: int, batch_sharding_fn=None):
  """(log P(False), log P(True)) [R] of plain right-padded prompts [R, T]
  read at each row's last token (tree mode's rows path)."""
  tokens = constrain_batch(tokens, batch_sharding_fn)
  num, length = tokens.shape
  keys = jnp.arange(length)

  def key_mask(q):  # real keys only; causality is the model's
    return jnp.broadcast_to(keys[None, None, :] < lengths[:, None, None],
                            (num, q.shape[0], length))

  logits = chunked_forward(
      params, tokens, jnp.broadcast_to(keys, (num, length)), key_mask,
      model_config=model_config, chunk=query_chunk,
      logit_positions=jnp.maximum(lengths - 1, 0)[:, None])
  return label_log_probs(logits[:, 0], token_sets)
