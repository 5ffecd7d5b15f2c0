"""Log-probs of the label words for query prompts, zero- or many-shot.

Zero-shot a query reads `header + prompt`; many-shot it reads
`header + demo_0 + ... + demo_{k-1} + prompt` where a demonstration is
`prompt_j + label_token[label_j] + separator` (the layout the ICM search
scores, so prompting with ICM labels measures exactly what the search saw).
The prediction is read at the query's last prompt token: log P(word) is the
log-sum-exp of the full-vocabulary log-softmax over every token spelling the
word (`ExampleTokens.label_token_sets`).

All queries share the demonstration prefix, so its keys/values are computed
once (batch 1) and every batch of queries attends to that cache. Query rows
are right-padded to a length bucket (two per power of two) and the batch is padded to a
fixed size, so scoring hundreds of queries compiles only a couple of times.
The prefix is padded to a bucket too (its pad keys are masked), so gold and
ICM demonstrations of the same examples share one compilation.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from icm_jax import sharding
from icm_jax.model import KVCache, LlamaConfig, forward, masks, param_shapes
from icm_jax.scoring.buckets import bucket
from icm_jax.scoring.common import label_log_probs as _word_log_probs
from icm_jax.tokenization import ExampleTokens


def select_demonstrations(tokens: ExampleTokens, candidates: Sequence[int],
                          queries: Sequence[int], max_context: int
                          ) -> list[int]:
  """The longest prefix of `candidates` that fits next to every query.

  Fits means len(header) + sum of demo_length(d) + the longest query prompt
  <= max_context. The prefix is greedy and stops at the first candidate that
  does not fit, so which demonstrations are chosen never depends on labels.
  Raises ValueError if even the longest query alone (with the header) does
  not fit, naming that query's id.
  """
  queries = _check_indices(tokens, queries, "query")
  candidates = _check_indices(tokens, candidates, "candidate")
  if not queries:
    raise ValueError("select_demonstrations: no queries")
  lengths = tokens.prompt_lengths
  longest = max(queries, key=lambda q: lengths[q])
  used = len(tokens.header) + int(lengths[longest])
  if used > max_context:
    raise ValueError(
        f"query {tokens.ids[longest]!r}: header + prompt is {used} tokens > "
        f"max_context {max_context}, even with no demonstrations")
  chosen = []
  for d in candidates:
    if used + tokens.demo_length(d) > max_context:
      break
    used += tokens.demo_length(d)
    chosen.append(d)
  return chosen


def label_log_probs(model_config: LlamaConfig, params, tokens: ExampleTokens,
                    queries: Sequence[int], *, demos: Sequence[int] = (),
                    demo_labels=None, mesh=None, batch_size: int = 8,
                    min_seq_len: int = 16, progress: bool = False
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(log_p_false[Q], log_p_true[Q]) of each query's label word.

  Context of query q: header + (prompt_d + label_token[label_d] + separator
  for each demo d in order) + prompt_q. Zero-shot when `demos` is empty.
  demo_labels: one 0 (False) / 1 (True) per demo. With `mesh`, params should
  be placed by icm_jax.sharding.param_shardings; query batches are split over
  ('data', 'fsdp') (batch_size is rounded up to a multiple of the mesh's
  batch divisor). Raises ValueError on a context longer than the model's,
  a demo that is also a query, or bad demo labels (naming the example id).
  """
  queries = _check_indices(tokens, queries, "query")
  demos = _check_indices(tokens, demos, "demo")
  if batch_size < 1 or min_seq_len < 1:
    raise ValueError(f"batch_size ({batch_size}) and min_seq_len "
                     f"({min_seq_len}) must be positive")
  _check_vocab(model_config, tokens)
  prefix = _prefix_tokens(tokens, demos, demo_labels, queries)
  context = model_config.max_position_embeddings
  lengths = tokens.prompt_lengths
  for q in queries:
    total = len(prefix) + int(lengths[q])
    if total > context:
      raise ValueError(
          f"query {tokens.ids[q]!r}: context of {total} tokens "
          f"({len(demos)} demonstrations, {len(prefix)} prefix tokens + "
          f"{int(lengths[q])} prompt tokens) > model context {context}")
  num = len(queries)
  out_false = np.empty(num, np.float32)
  out_true = np.empty(num, np.float32)
  if not num:
    return out_false, out_true

  fns = _compiled(model_config, mesh)
  if mesh is not None:
    divisor = sharding.batch_divisor(mesh)
    batch_size = -(-batch_size // divisor) * divisor
  token_sets = tuple(np.asarray(s, np.int32) for s in tokens.label_token_sets)
  with _mesh_scope(mesh):
    cache = None
    if demos:
      # The header sits inside the cached prefix; queries are bare prompts.
      prefix_pad = _length_bucket(len(prefix), min_seq_len)
      row = np.zeros((1, prefix_pad), np.int32)
      row[0, :len(prefix)] = prefix
      cache = fns.prefix(params, row, np.array([len(prefix)], np.int32))
      row_head = np.zeros(0, np.int32)
    else:
      row_head = np.asarray(tokens.header, np.int32)
    # Longest first, so each batch's length bucket is tight.
    order = sorted(range(num), key=lambda k: -int(lengths[queries[k]]))
    batches = [order[s:s + batch_size] for s in range(0, num, batch_size)]
    if progress:
      batches = _with_progress(batches)
    for batch in batches:
      rows = [np.concatenate([row_head, tokens.prompts[queries[k]]])
              for k in batch]
      width = _length_bucket(max(len(r) for r in rows), min_seq_len)
      row_tokens = np.zeros((batch_size, width), np.int32)
      row_lengths = np.ones(batch_size, np.int32)  # pad rows: one token
      for b, r in enumerate(rows):
        row_tokens[b, :len(r)] = r
        row_lengths[b] = len(r)
      if cache is None:
        lf, lt = fns.zero_shot(params, row_tokens, row_lengths, token_sets)
      else:
        lf, lt = fns.many_shot(params, cache, np.int32(len(prefix)),
                               row_tokens, row_lengths, token_sets)
      lf, lt = np.asarray(lf), np.asarray(lt)
      out_false[batch] = lf[:len(batch)]
      out_true[batch] = lt[:len(batch)]
  return out_false, out_true


# -----------------------------------------------------------------------------
# Input checks and host-side assembly
# -----------------------------------------------------------------------------


def _check_indices(tokens: ExampleTokens, indices, what: str) -> list[int]:
  out = []
  for i in indices:
    if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
      raise TypeError(f"{what} index {i!r} is not an int")
    if not 0 <= i < tokens.num_examples:
      raise ValueError(f"{what} index {i} out of range for "
                       f"{tokens.num_examples} examples")
    out.append(int(i))
  return out


def _check_vocab(model_config: LlamaConfig, tokens: ExampleTokens):
  vocab = model_config.vocab_size
  pieces = list(tokens.prompts) + [tokens.label_token, tokens.separator,
                                   tokens.header, *tokens.label_token_sets]
  ids = np.concatenate([np.asarray(p, np.int64).ravel() for p in pieces])
  if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
    raise ValueError(f"token ids outside the model vocabulary [0, {vocab}): "
                     "tokenizer and model do not match")


def _prefix_tokens(tokens: ExampleTokens, demos, demo_labels, queries
                   ) -> np.ndarray:
  """header + demonstrations, validated; just the header when no demos."""
  if not demos:
    if demo_labels is not None and len(demo_labels):
      raise ValueError(f"{len(demo_labels)} demo_labels given but no demos")
    return np.asarray(tokens.header, np.int32)
  if demo_labels is None:
    raise ValueError(f"{len(demos)} demos need demo_labels (0/1 each)")
  demo_labels = list(np.asarray(demo_labels).ravel()) if not isinstance(
      demo_labels, (list, tuple)) else list(demo_labels)
  if len(demo_labels) != len(demos):
    raise ValueError(f"{len(demo_labels)} demo_labels for {len(demos)} demos")
  query_set = set(queries)
  pieces = [np.asarray(tokens.header, np.int32)]
  for d, label in zip(demos, demo_labels):
    if d in query_set:
      raise ValueError(f"example {tokens.ids[d]!r} is both a demonstration "
                       "and a query")
    if isinstance(label, (bool, np.bool_)) or label not in (0, 1):
      raise ValueError(f"demo {tokens.ids[d]!r}: label {label!r} is not 0 "
                       "(False) or 1 (True)")
    pieces += [tokens.prompts[d], tokens.label_token[int(label)][None],
               np.asarray(tokens.separator, np.int32)]
  return np.concatenate(pieces).astype(np.int32)


def _length_bucket(n: int, minimum: int) -> int:
  """The next of {2^k, 3·2^(k-1)} >= n, at least `minimum`: two buckets per
  power of two, so a 45-token prompt pads to 48, not 64 (a quarter of the
  many-shot evaluation's compute on short claims)."""
  return bucket(n, minimum)


def _with_progress(batches):
  try:
    from tqdm.auto import tqdm
  except ImportError:  # progress is cosmetic
    return batches
  return tqdm(batches, desc="label log-probs", unit="batch")


def _mesh_scope(mesh):
  """`jax.set_mesh(mesh)` as a context when a mesh is given, else a no-op."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


# -----------------------------------------------------------------------------
# Jitted kernels, one set per (model config, mesh); jax caches each shape.
# -----------------------------------------------------------------------------


class _Kernels:
  """prefix(params, tokens[1,S], length[1]) -> KVCache (batch 1);
  many_shot(params, cache, prefix_len, tokens[B,T], lengths[B], token_sets);
  zero_shot(params, tokens[B,T], lengths[B], token_sets)."""

  def __init__(self, config: LlamaConfig, mesh):
    self.config = config
    self.mesh = mesh
    if mesh is None:
      self.prefix = jax.jit(self._prefix)
      self.many_shot = jax.jit(self._many_shot)
      self.zero_shot = jax.jit(self._zero_shot)
      return
    params = sharding.param_shardings(param_shapes(config), mesh)
    replicated = NamedSharding(mesh, P())
    rows, per_row = (sharding.batch_sharding(mesh, 2),
                     sharding.batch_sharding(mesh, 1))
    # A batch-1 prefix cannot be split over the batch axes: its batch dim is
    # replicated (heads over 'tensor' as usual) and broadcast to each batch.
    spec = sharding.kv_cache_spec(config, mesh).k
    prefix_cache = NamedSharding(mesh, P(None, None, None, spec[3], None))
    self._batch_cache = sharding.kv_cache_sharding(config, mesh)
    cache = KVCache(prefix_cache, prefix_cache)
    sets = (replicated, replicated)
    self.prefix = jax.jit(self._prefix,
                          in_shardings=(params, replicated, replicated),
                          out_shardings=cache)
    self.many_shot = jax.jit(
        self._many_shot,
        in_shardings=(params, cache, replicated, rows, per_row, sets),
        out_shardings=(per_row, per_row))
    self.zero_shot = jax.jit(
        self._zero_shot, in_shardings=(params, rows, per_row, sets),
        out_shardings=(per_row, per_row))

  def _prefix(self, params, row, length):
    width = row.shape[1]
    # Only the keys/values are needed: read hidden states at one position.
    _, cache = forward(params, row, masks.default_positions(1, width),
                       masks.padded_causal_mask(length, width),
                       config=self.config, return_kv=True, return_hidden=True,
                       logit_positions=jnp.zeros((1, 1), jnp.int32))
    return cache

  def _many_shot(self, params, cache, prefix_len, row_tokens, row_lengths,
                 token_sets):
    batch, width = row_tokens.shape
    num_layers, _, prefix_width, heads, dim = cache.k.shape
    shape = (num_layers, batch, prefix_width, heads, dim)
    kv = KVCache(jnp.broadcast_to(cache.k, shape),
                 jnp.broadcast_to(cache.v, shape))
    if self.mesh is not None:
      kv = jax.lax.with_sharding_constraint(kv, self._batch_cache)
    prefix_keys = jnp.broadcast_to(
        jnp.arange(prefix_width) < prefix_len, (batch, width, prefix_width))
    mask = jnp.concatenate(
        [prefix_keys, masks.padded_causal_mask(row_lengths, width)], axis=2)
    positions = masks.default_positions(batch, width) + prefix_len
    logits = forward(params, row_tokens, positions, mask, config=self.config,
                     kv_cache=kv, logit_positions=(row_lengths - 1)[:, None])
    return _word_log_probs(logits[:, 0], token_sets)

  def _zero_shot(self, params, row_tokens, row_lengths, token_sets):
    batch, width = row_tokens.shape
    logits = forward(params, row_tokens, masks.default_positions(batch, width),
                     masks.padded_causal_mask(row_lengths, width),
                     config=self.config,
                     logit_positions=(row_lengths - 1)[:, None])
    return _word_log_probs(logits[:, 0], token_sets)


@functools.lru_cache(maxsize=16)
def _compiled(config: LlamaConfig, mesh) -> _Kernels:
  return _Kernels(config, mesh)
