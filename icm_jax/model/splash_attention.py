"""TPU attention: the Pallas splash kernel driven by our boolean masks.

Every LOO layout (padded causal rows, packed prefix-sharing suffixes against
a cached prefix, one-pass query slots against the demonstration cache) is a
boolean mask [B, T, S] built on device from the current labels, so it cannot
be a static splash mask. Splash's *dynamic* masks take exactly that: per
batch row, the mask is cut into (block_q, block_kv) tiles, tiles with no
visible key are skipped (no matmul, no DMA of their keys) and fully visible
tiles run unmasked. Block sparsity therefore follows whatever the mask says:
the causal upper triangle of exact-mode rows, the unlabelled and left-out
demonstrations of one-pass queries.

Mosaic kernels cannot be partitioned by XLA, so on a mesh the kernel runs
under shard_map: batch split over the data-parallel axes, heads over
'tensor' (when they divide), keys and queries whole on each device.
"""

from __future__ import annotations

import functools
import math
from typing import Tuple

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash)
from jax.sharding import PartitionSpec as P

# Mesh axis names (icm_jax.sharding builds its mesh from these).
BATCH_AXES: Tuple[str, str] = ("data", "fsdp")
HEAD_AXIS = "tensor"

# Tile sizes: multiples of the 128-lane vreg; 512 amortises per-step overhead
# (MaxText's default) but is capped by the (padded) sequence itself.
_LANE = 128
_MAX_BLOCK = 512


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _block(padded_len: int) -> int:
  for size in (_MAX_BLOCK, 256, _LANE):
    if padded_len % size == 0:
      return size
  raise AssertionError(padded_len)


def block_sizes(q_len: int, kv_len: int) -> splash.BlockSizes:
  """Forward and backward tiles for padded lengths (multiples of 128)."""
  bq, bkv = _block(q_len), _block(kv_len)
  return splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)


def splash_attention(q, k, v, mask, *, scale: float, interpret: bool = False):
  """softmax(scale * q k^T + mask) v with the splash kernel.

  q [B, T, H, D]; k, v [B, S, KV, D]; mask [B, T, S] bool (True = may attend;
  every real query row must see at least one key). Returns [B, T, H, D].
  interpret=True runs the same kernel in the Pallas interpreter (CPU tests).
  """
  batch, length, heads, dim = q.shape
  keys, kv_heads = k.shape[1], k.shape[2]
  if mask.shape != (batch, length, keys):
    raise ValueError(f"mask shape {mask.shape} != [B, T, S] = "
                     f"{(batch, length, keys)}")
  _check_precision(q.dtype, interpret)
  q_pad, kv_pad = _round_up(length, _LANE), _round_up(keys, _LANE)
  # Same scaling as the XLA path: in float32, rounded once to q's dtype.
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  mask = mask.astype(jnp.bool_)
  if kv_pad != keys:
    k = jnp.pad(k, ((0, 0), (0, kv_pad - keys), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, kv_pad - keys), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, kv_pad - keys)))
  if q_pad != length:
    q = jnp.pad(q, ((0, 0), (0, q_pad - length), (0, 0), (0, 0)))
    # Padding queries see key 0: no empty softmax row, so no NaN that the
    # backward pass could carry into dk/dv.
    pad_rows = jnp.zeros((batch, q_pad - length, kv_pad), jnp.bool_)
    mask = jnp.concatenate([mask, pad_rows.at[:, :, 0].set(True)], axis=1)
  # Kernel layout: heads before sequence.
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  run = functools.partial(_splash_batch,
                          sizes=block_sizes(q_pad, kv_pad), interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    run = _shard_over(mesh, run, batch, heads, kv_heads)
  out = run(q, k, v, mask)
  return out.transpose(0, 2, 1, 3)[:, :length]


def _check_precision(dtype, interpret: bool):
  # Mosaic lowers the kernel's matmuls with the global default precision,
  # read at lowering time; a multi-pass one ("highest", as float32 parity
  # tests set) on bf16 operands fails inside libtpu with "Bad lhs type".
  precision = jax.config.jax_default_matmul_precision
  if (not interpret and dtype != jnp.float32 and
      precision not in (None, "default", "bfloat16", "fastest")):
    raise ValueError(
        f"splash attention on TPU with {jnp.dtype(dtype).name} inputs needs "
        f"the default matmul precision, but jax_default_matmul_precision="
        f"{precision!r}; unset it, or use model.attention=xla")


def _splash_batch(q, k, v, mask, *, sizes, interpret):
  """[B, H, T, D] attention: one dynamic-mask kernel per batch row."""

  def one_row(q, k, v, mask):
    kernel = splash.make_splash_mha(
        mask[None], block_sizes=sizes, head_shards=1, q_seq_shards=1,
        interpret=interpret)
    return _as_dynamic(kernel)(q, k, v)

  return jax.vmap(one_row)(q, k, v, mask)


def _as_dynamic(kernel: splash.SplashAttentionKernel):
  # make_splash_mha stores `is_dynamic_mask` through jnp.array, which turns
  # the Python flag into a traced value inside jit/vmap; the kernel branches
  # on it in Python, so put the plain bool back.
  def fix(info):
    return None if info is None else info._replace(is_dynamic_mask=True)
  return splash.SplashAttentionKernel(
      fix(kernel.fwd_mask_info), fix(kernel.dq_mask_info),
      fix(kernel.dkv_mask_info), **kernel.kwargs)


def _shard_over(mesh, run, batch: int, heads: int, kv_heads: int):
  """run under shard_map: batch over the data axes, heads over 'tensor'."""
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  split = math.prod(mesh.shape[a] for a in batch_axes)
  batch_spec = batch_axes if batch_axes and batch % split == 0 else None
  head_spec = None
  if HEAD_AXIS in mesh.axis_names:
    t = mesh.shape[HEAD_AXIS]
    if heads % t == 0 and kv_heads % t == 0:
      head_spec = HEAD_AXIS
  qkv = P(batch_spec, head_spec, None, None)
  return jax.shard_map(run, mesh=mesh,
                       in_specs=(qkv, qkv, qkv, P(batch_spec, None, None)),
                       out_specs=qkv, check_vma=False)
