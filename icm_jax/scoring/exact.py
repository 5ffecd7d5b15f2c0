"""Exact leave-one-out scoring: row i = every other demonstration + prompt i.

Rows are assembled on device from (labels, query index) so only O(N) integers
cross from the host per call; `lax.map` walks micro-batches of rows so memory
is bounded by `rows_per_chunk` rows, not by N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from icm_jax.model import forward, masks
from icm_jax.scoring.common import ExampleArrays, constrain_batch, label_log_probs


def exact_row_tokens(data: ExampleArrays, labels: jax.Array, query: jax.Array,
                     *, seq_len: int, header_len: int, sep_len: int):
  """Tokens [seq_len] and true length of one LOO row.

  Row = header + demos (prompt_j, label token, separator) of every labelled
  j != query, in example order + prompt_query; right-padded with 0.
  """
  num, width = data.prompt_tokens.shape
  prompt_len = data.prompt_len
  included = (labels >= 0) & (jnp.arange(num) != query)
  demo_len = jnp.where(included, prompt_len + 1 + sep_len, 0)
  ends = header_len + jnp.cumsum(demo_len)
  starts = ends - demo_len
  demo_end = ends[-1]
  row_len = demo_end + prompt_len[query]

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
