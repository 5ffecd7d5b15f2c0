"""Attention masks and position ids for the common layouts.

All masks are boolean [batch, q_len, kv_len] with True = may attend. They are
cheap jnp expressions, so callers build them inside jit from small integer
descriptions (lengths, segment ids) instead of shipping O(T^2) arrays.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(batch: int, length: int) -> jax.Array:
  tri = jnp.tril(jnp.ones((length, length), jnp.bool_))
  return jnp.broadcast_to(tri, (batch, length, length))


def padded_causal_mask(lengths: jax.Array, length: int) -> jax.Array:
  """Causal mask for right-padded rows; pad queries attend to nothing real.

  Pad *queries* still see the real keys (never NaN), but pad *keys* are hidden
  from every query.
  """
  idx = jnp.arange(length)
  causal = idx[None, :, None] >= idx[None, None, :]
  real_key = idx[None, None, :] < lengths[:, None, None]
  return causal & real_key


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
  """Block-diagonal causal mask: token attends to earlier tokens of its segment.

  segment_ids: [batch, length] int. Packed independent sequences in one row.
  """
  length = segment_ids.shape[-1]
  idx = jnp.arange(length)
  causal = idx[:, None] >= idx[None, :]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return same & causal[None]


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Position ids restarting at 0 at each new segment of a packed row."""
  length = segment_ids.shape[-1]
  idx = jnp.broadcast_to(jnp.arange(length), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], jnp.bool_),
       segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def default_positions(batch: int, length: int, offset: int = 0) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(offset, offset + length), (batch, length))
