"""Building blocks of the Llama decoder: RMSNorm, rotary embedding, attention, MLP."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from icm_jax.model.config import LlamaConfig, RopeScaling


class RMSNorm(nn.Module):
  """RMSNorm with float32 statistics (as HF: normalise in f32, scale in dtype)."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],),
                       self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) +
                              self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:
  """Per-pair inverse frequencies [head_dim // 2], with llama3 scaling if set."""
  dim = config.head_dim
  inv_freq = 1.0 / (config.rope_theta**(np.arange(0, dim, 2, dtype=np.float32)
                                        / dim))
  inv_freq = inv_freq.astype(np.float32)
  if config.rope_scaling is not None:
    inv_freq = _llama3_scale(inv_freq, config.rope_scaling)
  return inv_freq


def _llama3_scale(inv_freq: np.ndarray, rs: RopeScaling) -> np.ndarray:
  # Llama 3.1: keep high frequencies, divide low ones by `factor`, and
  # interpolate smoothly in between (wavelength bands set by the two factors).
  old_len = rs.original_max_position_embeddings
  low_freq_wavelen = old_len / rs.low_freq_factor
  high_freq_wavelen = old_len / rs.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (old_len / wavelen - rs.low_freq_factor) / (
      rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray):
  """Rotates x [B, T, heads, head_dim] by integer positions [B, T].

  Uses the HF "rotate half" layout (first half / second half of head_dim are the
  two coordinates of each rotation pair); GGUF's interleaved layout is undone at
  import time.
  """
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos = jnp.cos(angles).astype(x.dtype)
  sin = jnp.sin(angles).astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


def _dense(features: int, name: str, config: LlamaConfig) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=False,
      dtype=config.compute_dtype,
      param_dtype=config.params_dtype,
      kernel_init=nn.initializers.normal(0.02),
      name=name,
  )


class Attention(nn.Module):
  """Grouped-query self-attention over [cached keys/values ++ this chunk]."""

  config: LlamaConfig

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      attention_mask: jax.Array,
      cached_kv: Optional[Tuple[jax.Array, jax.Array]] = None,
  ) -> Tuple[jax.Array, Tuple[jax.Array, jax.Array]]:
    cfg = self.config
    batch, length, _ = x.shape
    hd = cfg.head_dim
    q = _dense(cfg.num_heads * hd, "q_proj", cfg)(x)
    k = _dense(cfg.num_kv_heads * hd, "k_proj", cfg)(x)
    v = _dense(cfg.num_kv_heads * hd, "v_proj", cfg)(x)
    q = q.reshape(batch, length, cfg.num_heads, hd)
    k = k.reshape(batch, length, cfg.num_kv_heads, hd)
    v = v.reshape(batch, length, cfg.num_kv_heads, hd)
    inv_freq = rope_inverse_frequencies(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    new_kv = (k, v)
    if cached_kv is not None:
      k = jnp.concatenate([cached_kv[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([cached_kv[1].astype(v.dtype), v], axis=1)
    out = causal_attention(q, k, v, attention_mask, scale=hd**-0.5,
                           prefix_len=k.shape[1] - length,
                           block=cfg.attention_block_size)
    out = out.reshape(batch, length, cfg.num_heads * hd)
    return _dense(cfg.hidden_size, "o_proj", cfg)(out), new_kv


def causal_attention(q, k, v, mask, *, scale: float, prefix_len: int,
                     block: int = 0):
  """softmax(q k^T) v over keys [prefix | this chunk], never attending ahead.

  q [B, T, H, D]; k, v [B, prefix_len + T, KV, D]; mask [B, T, prefix_len + T].
  Keys of this chunk after the query position are always masked (the model is
  a causal decoder; `mask` only removes more keys). That guarantee lets
  `block` > 0 split queries into blocks of `block` rows that skip the key
  blocks wholly in their future: ~half the attention FLOPs for long chunks.
  Logits and softmax are float32 (XLA path of jax.nn.dot_product_attention;
  GQA handled natively).
  """
  length = q.shape[1]
  qi = jnp.arange(length)[:, None]
  ki = jnp.arange(prefix_len + length)[None, :] - prefix_len
  mask = mask & (ki <= qi)[None]
  if not block or length <= block:
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale)
  outs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    keys = prefix_len + stop
    outs.append(jax.nn.dot_product_attention(
        q[:, start:stop], k[:, :keys], v[:, :keys],
        mask=mask[:, None, start:stop, :keys], scale=scale))
  return jnp.concatenate(outs, axis=1)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = _dense(cfg.intermediate_size, "gate_proj", cfg)(x)
    up = _dense(cfg.intermediate_size, "up_proj", cfg)(x)
    return _dense(cfg.hidden_size, "down_proj", cfg)(nn.silu(gate) * up)
