"""Analytic per-chip costs of a call: matmul and attention FLOPs, HBM bytes.

XLA's cost_analysis() counts every loop body once, and our kernels are loops
(scan over layers, map over rows), so the roofline uses these formulas;
icm_jax.aot.jaxpr_flops checks the matmul count against the traced program.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

from icm_jax.aot.layouts import (ExactLayout, ExactSharedLayout, ParallelLayout,
                                 SharedContextLayout)
from icm_jax.aot.topology import Chip
from icm_jax.aot.workload import Workload
from icm_jax.model import LlamaConfig
from icm_jax.training.config import TrainConfig


@dataclasses.dataclass
class Cost:
  """Per-chip work of one call.

  matmul_flops: projections + MLP of every token run (padding included) and
    the lm head at the positions read; attention_visible_flops /
    attention_dense_flops: 4 * heads * head_dim * layers per (query, key)
    pair the mask allows / of the whole padded grid; hbm_bytes: a lower bound on HBM
    traffic (weights once per micro-batch pass, KV cache reads, each matmul's
    activation input and output once, optimizer update).
  """

  matmul_flops: float = 0.0
  attention_visible_flops: float = 0.0
  attention_dense_flops: float = 0.0
  hbm_bytes: float = 0.0

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(*(a + b for a, b in zip(dataclasses.astuple(self),
                                        dataclasses.astuple(other))))

  def __mul__(self, k: float) -> "Cost":
    return Cost(*(a * k for a in dataclasses.astuple(self)))

  __rmul__ = __mul__

  @property
  def flops(self) -> float:
    """Matmul + visible-pair attention FLOPs (the roofline's compute)."""
    return self.matmul_flops + self.attention_visible_flops

  def seconds(self, chip: Chip) -> Tuple[float, float]:
    """(compute-bound, memory-bound) seconds on one chip at peak."""
    return self.flops / chip.peak_flops, self.hbm_bytes / chip.hbm_bandwidth

  def roofline(self, chip: Chip) -> float:
    return max(self.seconds(chip))


def _layer_matmul_params(cfg: LlamaConfig) -> int:
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return d * (q + 2 * kv) + q * d + 3 * d * f


def _activation_elements(cfg: LlamaConfig) -> int:
  """Per token per layer: each projection's input and output once."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return (d + q + 2 * kv) + (q + d) + (d + 2 * f) + (f + d)


def _kv_bytes_per_token(cfg: LlamaConfig) -> int:
  """K and V of one token over all layers, in the compute dtype."""
  return (cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim *
          cfg.compute_dtype.itemsize)


def _heads_split(cfg: LlamaConfig, tensor: int) -> int:
  return tensor if cfg.num_heads % tensor == 0 else 1


def _kv_split(cfg: LlamaConfig, tensor: int) -> int:
  return tensor if cfg.num_kv_heads % tensor == 0 else 1


def forward_cost(cfg: LlamaConfig, *, tokens: float, logits: float,
                 visible_pairs: float, dense_pairs: float,
                 cache_keys_read: float = 0.0, kv_written: float = 0.0,
                 passes: float = 1.0, tensor: int = 1) -> Cost:
  """One chip's forward over `tokens` tokens in `passes` micro-batch passes.

  cache_keys_read: prefix keys read (summed over rows); kv_written: tokens
  whose keys/values are returned (a KV cache output).
  """
  item = cfg.compute_dtype.itemsize
  lp = _layer_matmul_params(cfg) * cfg.num_layers
  head = cfg.hidden_size * cfg.vocab_size
  per_pair = (4 * cfg.num_heads * cfg.head_dim * cfg.num_layers /
              _heads_split(cfg, tensor))
  weights = (lp + (head if logits else 0)) * item * passes
  activations = tokens * _activation_elements(cfg) * cfg.num_layers * item
  kv = (cache_keys_read + kv_written) * _kv_bytes_per_token(cfg) / _kv_split(
      cfg, tensor)
  return Cost(
      matmul_flops=(2 * lp * tokens + 2 * head * logits) / tensor,
      attention_visible_flops=per_pair * visible_pairs,
      attention_dense_flops=per_pair * dense_pairs,
      hbm_bytes=(weights + activations) / tensor + kv)


def _causal_pairs(n) -> float:
  n = np.asarray(n, np.float64)
  return n * (n + 1) / 2


def _share(global_rows: int, divisor: int) -> Tuple[int, float]:
  """(rows a chip runs, its share of the real work) of a batch split over
  `divisor` chips; an uneven batch is padded, so C < divisor rows are run
  in full on every chip."""
  rows = -(-global_rows // divisor)
  return rows, rows / global_rows


def _full_pass_cost(cfg: LlamaConfig, candidates: int, full_len: int,
                    longest: int, divisor: int, tensor: int) -> Cost:
  """The causal pass over F (all demonstrations) of each assignment, keeping
  its keys/values."""
  rows, _ = _share(candidates, divisor)
  return forward_cost(
      cfg, tokens=rows * full_len, logits=0,
      visible_pairs=rows * _causal_pairs(longest),
      dense_pairs=rows * full_len ** 2, kv_written=rows * full_len,
      tensor=tensor)


def exact_shared_cost(cfg: LlamaConfig, lay: ExactSharedLayout, divisor: int,
                      tensor: int) -> Cost:
  """F's keys/values per assignment, then the packed suffix sequences."""
  plan = lay.plan
  prefix = _full_pass_cost(cfg, plan.candidates, plan.full_len,
                           plan.full.max(), divisor, tensor)
  batches = plan.num_seq // lay.groups
  seqs, share = _share(lay.groups, divisor)
  real = plan.slot_len > 0
  visible = (np.where(real, plan.slot_len * plan.slot_start, 0).sum() +
             _causal_pairs(plan.slot_len)[real].sum())
  suffixes = forward_cost(
      cfg, tokens=batches * seqs * plan.packed_len, logits=2 * batches * seqs,
      visible_pairs=visible * share,
      dense_pairs=batches * seqs * plan.packed_len * (plan.full_len +
                                                     plan.packed_len),
      # Each micro-batch gathers its candidates' F cache (a copy), reads it.
      cache_keys_read=2 * batches * seqs * plan.full_len, passes=batches,
      tensor=tensor)
  return prefix + suffixes


def tree_pass_cost(cfg: LlamaConfig, p, write: bool, divisor: int,
                   tensor: int) -> Cost:
  """One tree pass (tree_layout.TreePass): its segments split over the batch
  chips; a level pass writes keys/values into the pool, the leaf pass reads
  logits."""
  s, w, _, prefix, rows = p.shape
  real = p.length.astype(np.float64)
  visible = ((real * p.ranges[:, :, 1].sum(axis=1)).sum() +
             _causal_pairs(real).sum())
  per_chip = s / divisor
  return forward_cost(
      cfg, tokens=per_chip * w, logits=0 if write else per_chip,
      visible_pairs=visible / divisor,
      dense_pairs=per_chip * w * (prefix + w),
      # Each micro-batch gathers its segments' prefixes from the pool.
      cache_keys_read=per_chip * prefix,
      kv_written=per_chip * w if write else 0.0, passes=s / rows,
      tensor=tensor)


def tree_cost(cfg: LlamaConfig, plan, divisor: int, tensor: int) -> Cost:
  """Tree mode (icm_jax.scoring.tree_layout.TreePlan): its passes summed."""
  total = Cost()
  for p in plan.passes:
    total += tree_pass_cost(cfg, p, p is not plan.leaf, divisor, tensor)
  return total


def shared_context_cost(cfg: LlamaConfig, lay: SharedContextLayout,
                        divisor: int, tensor: int) -> Cost:
  """F's keys/values per assignment, then the packed query sequences."""
  plan = lay.plan
  prefix = _full_pass_cost(cfg, plan.candidates, plan.full_len,
                           lay.full.max(), divisor, tensor)
  per_seq = plan.seq_query.shape[1]
  q_len = per_seq * lay.width
  batches = plan.num_seq // lay.groups
  seqs, share = _share(lay.groups, divisor)
  visible = ((lay.query_lengths * lay.visible_cache_keys).sum() +
             _causal_pairs(lay.query_lengths).sum())
  queries = forward_cost(
      cfg, tokens=batches * seqs * q_len, logits=batches * seqs * per_seq,
      visible_pairs=visible * share,
      dense_pairs=batches * seqs * q_len * (plan.full_len + q_len),
      cache_keys_read=2 * batches * seqs * plan.full_len, passes=batches,
      tensor=tensor)
  return prefix + queries


def exact_cost(cfg: LlamaConfig, lay: ExactLayout, divisor: int,
               tensor: int) -> Cost:
  batches = lay.rows // lay.chunk
  rows, share = _share(lay.chunk, divisor)
  return forward_cost(
      cfg, tokens=batches * rows * lay.seq_len, logits=batches * rows,
      visible_pairs=_causal_pairs(lay.row_lengths).sum() * share,
      dense_pairs=batches * rows * lay.seq_len ** 2, passes=batches,
      tensor=tensor)


def parallel_cache_cost(cfg: LlamaConfig, workload: Workload,
                        lay: ParallelLayout, divisor: int, tensor: int
                        ) -> Cost:
  n, h = workload.num_examples, workload.header_len
  row_len = lay.width + 1 + workload.sep_len
  batches = -(-2 * n // lay.chunk)
  rows, share = _share(lay.chunk, divisor)
  real = np.concatenate([workload.lengths, workload.lengths]) + 1 + \
      workload.sep_len
  header = forward_cost(cfg, tokens=h, logits=0,
                        visible_pairs=_causal_pairs(h), dense_pairs=h * h,
                        kv_written=h, tensor=tensor) if h else Cost()
  demos = forward_cost(
      cfg, tokens=batches * rows * row_len, logits=0,
      visible_pairs=(_causal_pairs(real).sum() + real.sum() * h) * share,
      dense_pairs=batches * rows * row_len * (row_len + h),
      cache_keys_read=batches * rows * h, kv_written=batches * rows * row_len,
      passes=batches, tensor=tensor)
  return header + demos


def parallel_query_cost(cfg: LlamaConfig, lay: ParallelLayout, divisor: int,
                        tensor: int) -> Cost:
  per_group = lay.chunk // lay.groups
  q_len = per_group * lay.width
  batches = lay.rows // lay.chunk
  seqs, share = _share(lay.groups, divisor)
  visible = ((lay.query_lengths * lay.visible_cache_keys).sum() +
             _causal_pairs(lay.query_lengths).sum())
  return forward_cost(
      cfg, tokens=batches * seqs * q_len, logits=batches * seqs * per_group,
      visible_pairs=visible * share,
      dense_pairs=batches * seqs * q_len * (lay.cache_len + q_len),
      cache_keys_read=batches * seqs * lay.cache_len, passes=batches,
      tensor=tensor)


def train_step_cost(cfg: LlamaConfig, seq_len: int, train: TrainConfig,
                    divisor: int, tensor: int, sharding_chips: int,
                    real_lengths: Optional[np.ndarray] = None) -> Cost:
  """Forward, backward (2x) and, with remat, the recomputed forward; AdamW.

  The recomputation (remat) skips what the backward pass does not need: the
  lm head and each layer's down projection (whose output only feeds the next
  layer). real_lengths: the rows' true lengths (visible attention pairs);
  default every row full.
  """
  batches = train.grad_accum_steps
  rows, share = _share(train.micro_batch_size, divisor)
  if real_lengths is None:
    real_lengths = np.full(train.batch_size, seq_len)
  tokens, logits = batches * rows * seq_len, batches * rows
  fwd = forward_cost(
      cfg, tokens=tokens, logits=logits,
      visible_pairs=_causal_pairs(real_lengths).sum() * share,
      dense_pairs=batches * rows * seq_len ** 2, passes=batches,
      tensor=tensor)
  total = fwd * 3.0
  if cfg.remat:
    skipped = 2.0 * cfg.hidden_size * (
        cfg.intermediate_size * cfg.num_layers * tokens +
        cfg.vocab_size * logits) / tensor
    total = total + dataclasses.replace(
        fwd, matmul_flops=fwd.matmul_flops - skipped)
  # AdamW in the params' dtype: read p, g, mu, nu; write p, mu, nu; the
  # gradient accumulator written once. With LoRA only the adapters are
  # updated, and each micro-batch merges W + s·a·b (one rank-r product
  # forward, two backward) and reads W, writing the merged copy.
  trainable = cfg.num_params()
  if train.lora_rank:
    trainable = lora_params(cfg, train.lora_rank)
    lp = _layer_matmul_params(cfg) * cfg.num_layers
    total = total + Cost(
        matmul_flops=6 * train.lora_rank * lp * batches / sharding_chips,
        hbm_bytes=lp * (cfg.params_dtype.itemsize + cfg.compute_dtype.itemsize)
        * batches / sharding_chips)
  update = Cost(hbm_bytes=8 * trainable * cfg.params_dtype.itemsize /
                sharding_chips)
  return total + update


def lora_params(cfg: LlamaConfig, rank: int) -> int:
  """Adapter parameters: rank * (in + out) of q/k/v/o, gate/up/down."""
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return rank * cfg.num_layers * (7 * d + 2 * q + 2 * kv + 3 * f)
