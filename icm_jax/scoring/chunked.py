"""One forward pass over a long sequence, run in chunks of queries.

An exact-mode pass is as long as all N demonstrations together (43k tokens
for the paper's GSM8K run), and a whole-sequence attention mask is
[T, prefix + T] booleans per row (4.8 GB at that length, several copies of it
on the way into the splash kernel). Here the queries are cut into chunks of
`chunk` tokens that run one after another (`lax.scan`): chunk c attends to
the prefix cache, to the keys/values chunks < c have written into a buffer,
and causally to itself. Masks are built per chunk from a function of the
query indices, so the largest mask is [chunk, prefix + T]. The result equals
one unchunked forward.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from icm_jax.model import KVCache, forward


def chunked_forward(params, tokens, positions, key_mask: Callable, *,
                    model_config, chunk: int, prefix: Optional[KVCache] = None,
                    logit_positions: Optional[jax.Array] = None,
                    return_kv: bool = False):
  """forward() over tokens [B, T] with attention given by `key_mask`.

  key_mask(rows [Q] int) -> [B, Q, P + T] bool: which of the P prefix keys
  and of this sequence's T keys each query row may see (causality inside the
  sequence is added on top). chunk: queries per chunk; 0 or >= T runs one
  forward. logit_positions [B, R]: logits returned ([B, R, V]); return_kv:
  also this sequence's KVCache [L, B, T, K, D].
  """
  batch, length = tokens.shape
  plen = 0 if prefix is None else prefix.k.shape[2]
  if not chunk or length <= chunk:
    return forward(params, tokens, positions, key_mask(jnp.arange(length)),
                   config=model_config, kv_cache=prefix,
                   logit_positions=logit_positions, return_kv=return_kv,
                   return_hidden=logit_positions is None)
  num = -(-length // chunk)
  padded = num * chunk
  pad = padded - length
  tokens = jnp.pad(tokens, ((0, 0), (0, pad)))
  positions = jnp.pad(positions, ((0, 0), (0, pad)))
  cfg = model_config
  shape = (cfg.num_layers, batch, padded, cfg.num_kv_heads, cfg.head_dim)
  buffer = KVCache(jnp.zeros(shape, cfg.compute_dtype),
                   jnp.zeros(shape, cfg.compute_dtype))
  reads = (jnp.zeros((batch, 0), jnp.int32) if logit_positions is None
           else logit_positions.astype(jnp.int32))
  logits = jnp.zeros((batch, reads.shape[1], cfg.vocab_size), jnp.float32)
  keys = jnp.arange(padded)

  def step(carry, c):
    buffer, logits = carry
    begin = c * chunk
    rows = begin + jnp.arange(chunk)
    # Rows past T are padding: they see what row 0 sees (never empty).
    mask = key_mask(jnp.where(rows < length, rows, 0))      # [B, Q, P + T]
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))
    before, own = mask[..., :plen + padded], mask[..., plen:]
    # Earlier chunks come from the buffer; this chunk's own keys are the
    # call's (the model adds causality to them).
    before = before & jnp.concatenate(
        [jnp.ones((plen,), bool), keys < begin])[None, None]
    own = jax.lax.dynamic_slice_in_dim(own, begin, chunk, axis=2)
    own = own | (jnp.arange(chunk)[:, None] == jnp.arange(chunk))[None]
    cache = buffer if prefix is None else KVCache(
        *(jnp.concatenate([p.astype(b.dtype), b], axis=2)
          for p, b in zip(prefix, buffer)))
    tok = jax.lax.dynamic_slice_in_dim(tokens, begin, chunk, axis=1)
    pos = jax.lax.dynamic_slice_in_dim(positions, begin, chunk, axis=1)
    at = jnp.clip(reads - begin, 0, chunk - 1)
    out, kv = forward(params, tok, pos, jnp.concatenate([before, own], axis=2),
                      config=cfg, kv_cache=cache, logit_positions=at,
                      return_kv=True)
    buffer = KVCache(*(jax.lax.dynamic_update_slice_in_dim(
        b, new.astype(b.dtype), begin, axis=2) for b, new in zip(buffer, kv)))
    here = (reads >= begin) & (reads < begin + chunk)
    logits = jnp.where(here[..., None], out, logits)
    return (buffer, logits), None

  (buffer, logits), _ = jax.lax.scan(step, (buffer, logits), jnp.arange(num))
  kv = KVCache(*(a[:, :, :length] for a in buffer))
  if logit_positions is None:
    return None, kv
  return (logits, kv) if return_kv else logits
