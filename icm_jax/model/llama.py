"""The Llama decoder as a pure function of (params, tokens, positions, mask).

Layers are stacked with `nn.scan` (params gain a leading [num_layers] axis), so
compile time does not grow with depth.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from icm_jax.model.config import LlamaConfig
from icm_jax.model.layers import MLP, Attention, RMSNorm


class KVCache(NamedTuple):
  """Rotated keys and values of a prefix, stacked over layers.

  k, v: [num_layers, batch, prefix_len, num_kv_heads, head_dim].
  """

  k: jax.Array
  v: jax.Array


class DecoderLayer(nn.Module):
  config: LlamaConfig

  @nn.compact
  def __call__(self, x, layer_cache, positions, attention_mask):
    cfg = self.config
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype,
                                cfg.params_dtype, name=name)
    attn_out, new_kv = Attention(cfg, name="self_attn")(
        norm("input_layernorm")(x), positions, attention_mask, layer_cache)
    x = x + attn_out
    x = x + MLP(cfg, name="mlp")(norm("post_attention_layernorm")(x))
    return x, new_kv


class Llama(nn.Module):
  """Llama-family decoder (Llama, Mistral, Qwen2/2.5, Qwen3; see LlamaConfig).

  __call__(tokens [B,T] int, positions [B,T] int, attention_mask [B,T,S+T] bool,
           kv_cache=None, logit_positions=None, return_kv=False,
           return_hidden=False)

  - attention_mask[b, q, k] says whether query q may attend key k, where keys
    are the `S` cached prefix positions (if `kv_cache` is given) followed by the
    T positions of this call. Causality is just one such mask (see masks.py).
  - logit_positions [B,P] int: compute logits only at these positions of the
    T axis ([B,P,V] instead of [B,T,V]).
  - Returns float32 logits (or the final-norm hidden states if return_hidden),
    and the KVCache of this call's tokens when return_kv.
  """

  config: LlamaConfig

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        embedding_init=nn.initializers.normal(0.02))
    layer = DecoderLayer
    if cfg.remat:
      layer = nn.remat(layer, prevent_cse=False,
                       policy=jax.checkpoint_policies.nothing_saveable)
    self.layers = nn.scan(
        layer,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
    )(cfg)
    self.norm = RMSNorm(cfg.rms_norm_eps, cfg.compute_dtype, cfg.params_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(
          cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
          param_dtype=cfg.params_dtype,
          kernel_init=nn.initializers.normal(0.02))

  def __call__(self,
               tokens: jax.Array,
               positions: jax.Array,
               attention_mask: jax.Array,
               kv_cache: Optional[KVCache] = None,
               logit_positions: Optional[jax.Array] = None,
               return_kv: bool = False,
               return_hidden: bool = False):
    cfg = self.config
    batch, length = tokens.shape
    prefix = 0 if kv_cache is None else kv_cache.k.shape[2]
    expected = (batch, length, prefix + length)
    if tuple(attention_mask.shape) != expected:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, "
                       f"expected [batch, q_len, prefix+q_len] = {expected}")
    if tuple(positions.shape) != (batch, length):
      raise ValueError(f"positions has shape {positions.shape}, expected "
                       f"{(batch, length)}")
    cfg.check_window(prefix + length)
    x = self.embed_tokens(tokens)
    layer_cache = None if kv_cache is None else (kv_cache.k, kv_cache.v)
    x, (k, v) = self.layers(x, layer_cache, positions,
                            attention_mask.astype(jnp.bool_))
    if logit_positions is not None:
      x = jnp.take_along_axis(x, logit_positions[..., None].astype(jnp.int32),
                              axis=1)
    x = self.norm(x)
    if return_hidden:
      out = x
    elif cfg.tie_word_embeddings:
      out = self.embed_tokens.attend(x).astype(jnp.float32)
    else:
      out = self.lm_head(x).astype(jnp.float32)
    if return_kv:
      return out, KVCache(k, v)
    return out


def key_path_names(path) -> tuple:
  """Names along a jax key path, e.g. ('layers', 'self_attn', 'q_proj', 'kernel')."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def init_params(config: LlamaConfig, rng: jax.Array):
  """Random parameters (normal(0.02) weights, unit norms) as a plain pytree."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  mask = jnp.ones((1, 1, 1), jnp.bool_)
  return Llama(config).init(rng, tokens, tokens, mask)["params"]


def param_shapes(config: LlamaConfig):
  """The parameter pytree as jax.ShapeDtypeStructs, without allocating it."""
  return jax.eval_shape(lambda: init_params(config, jax.random.key(0)))


def forward(params, tokens, positions, attention_mask, *, config: LlamaConfig,
            **kwargs):
  """`Llama(config).apply({'params': params}, ...)`: pure function of params."""
  return Llama(config).apply({"params": params}, tokens, positions,
                             attention_mask, **kwargs)
