"""Building blocks of the Llama decoder: RMSNorm, rotary embedding, attention, MLP."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from icm_jax.model.config import LlamaConfig, RopeScaling
from icm_jax.model.splash_attention import splash_attention


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


def _dense(features: int, name: str, config: LlamaConfig,
           use_bias: bool = False) -> nn.Dense:
  return nn.Dense(
      features,
      use_bias=use_bias,
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
    q = _dense(cfg.num_heads * hd, "q_proj", cfg, cfg.qkv_bias)(x)
    k = _dense(cfg.num_kv_heads * hd, "k_proj", cfg, cfg.qkv_bias)(x)
    v = _dense(cfg.num_kv_heads * hd, "v_proj", cfg, cfg.qkv_bias)(x)
    q = q.reshape(batch, length, cfg.num_heads, hd)
    k = k.reshape(batch, length, cfg.num_kv_heads, hd)
    v = v.reshape(batch, length, cfg.num_kv_heads, hd)
    if cfg.qk_norm:  # Qwen3: one RMSNorm over head_dim, shared by all heads
      q = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype,
                  name="q_norm")(q)
      k = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype,
                  name="k_norm")(k)
    inv_freq = rope_inverse_frequencies(cfg)
    q = apply_rope(q, positions, inv_freq)
    k = apply_rope(k, positions, inv_freq)
    new_kv = (k, v)
    if cached_kv is not None:
      k = jnp.concatenate([cached_kv[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([cached_kv[1].astype(v.dtype), v], axis=1)
    out = causal_attention(q, k, v, attention_mask, scale=hd**-0.5,
                           prefix_len=k.shape[1] - length,
                           block=cfg.attention_block_size,
                           impl=cfg.resolved_attention())
    out = out.reshape(batch, length, cfg.num_heads * hd)
    return _dense(cfg.hidden_size, "o_proj", cfg)(out), new_kv


def causal_attention(q, k, v, mask, *, scale: float, prefix_len: int,
                     block: int = 0, impl: str = "xla"):
  """softmax(q k^T) v over keys [prefix | this chunk], never attending ahead.

  q [B, T, H, D]; k, v [B, prefix_len + T, KV, D]; mask [B, T, prefix_len + T].
  Keys of this chunk after the query position are always masked (the model is
  a causal decoder; `mask` only removes more keys). That guarantee lets
  `block` > 0 split queries into blocks of `block` rows that skip the key
  blocks wholly in their future: ~half the attention FLOPs for long chunks.
  Logits and softmax are float32; GQA handled natively.
  impl: "xla", or "splash"/"splash_interpret" for the TPU kernel, which skips
  masked-out tiles itself.
  """
  length = q.shape[1]
  qi = jnp.arange(length)[:, None]
  ki = jnp.arange(prefix_len + length)[None, :] - prefix_len
  mask = mask & (ki <= qi)[None]
  if impl != "xla":
    return splash_attention(q, k, v, mask, scale=scale,
                            interpret=impl == "splash_interpret")
  if not block or length <= block:
    return _attention(q, k, v, mask, scale)
  outs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    keys = prefix_len + stop
    outs.append(_attention(q[:, start:stop], k[:, :keys], v[:, :keys],
                           mask[:, start:stop, :keys], scale))
  return jnp.concatenate(outs, axis=1)


def _attention(q, k, v, mask, scale: float):
  """The math of jax.nn.dot_product_attention's XLA path, laid out for XLA:CPU.

  q [B, T, H, D]; k, v [B, S, KV, D]; mask [B, T, S] bool.
  Same float32 logits and softmax and the same large negative for masked
  keys, but: the scale is applied to q (exact for power-of-two head_dim), the
  mask is an additive [B, T, S] bias shared by all heads, q is head-major so
  each KV head is one [G*T, D] x [D, S] product, and the softmax is
  normalised after the value product ([T, D] divides instead of [T, S]).
  On XLA:CPU this lets the whole block (both products and the softmax)
  become one YNNPACK fusion with no [H, T, S] transposes or select pass.
  """
  batch, length, heads, dim = q.shape
  keys, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  # Scaling in float32 then rounding once: no bf16-rounded scale factor.
  q = (q.astype(jnp.float32) * scale).astype(q.dtype).reshape(
      batch, length, kv_heads, groups, dim)
  q = q.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * length, dim)
  logits = jnp.einsum("bkqd,bskd->bkqs", q, k,
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(batch, kv_heads, groups, length, keys)
  # As jax.nn.dot_product_attention: masked logits become -0.7 * f32 max
  # (x + that rounds to exactly that for any |x| < 1e31).
  big_neg = jnp.float32(-0.7 * float(jnp.finfo(jnp.float32).max))
  bias = jnp.where(mask, jnp.float32(0), big_neg)
  logits = logits + bias[:, None, None]
  logits = logits - jnp.max(logits, axis=-1, keepdims=True)
  weights = jnp.exp(logits)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bkgts,bskd->bkgtd", weights.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  out = (out / total).astype(v.dtype)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim)


class MLP(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    gate = _dense(cfg.intermediate_size, "gate_proj", cfg)(x)
    up = _dense(cfg.intermediate_size, "up_proj", cfg)(x)
    return _dense(cfg.hidden_size, "down_proj", cfg)(nn.silu(gate) * up)
