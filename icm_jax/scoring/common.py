"""Pieces shared by both LOO modes: device-side example arrays, label log-probs."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from icm_jax.tokenization import ExampleTokens


class ExampleArrays(NamedTuple):
  """ExampleTokens as padded device arrays (built once per example set).

  prompt_tokens [N, Lp] (right-padded with 0), prompt_len [N], label_token [2],
  separator [max(Ls, 1)], header [max(H, 1)]. True lengths of the separator and
  header are static Python ints kept by the caller (they fix shapes).
  """

  prompt_tokens: jax.Array
  prompt_len: jax.Array
  label_token: jax.Array
  separator: jax.Array
  header: jax.Array


def example_arrays(examples: ExampleTokens, prompt_width: int) -> ExampleArrays:
  n = examples.num_examples
  tokens = np.zeros((n, prompt_width), np.int32)
  for i, p in enumerate(examples.prompts):
    tokens[i, :len(p)] = p
  pad1 = lambda a: np.asarray(a if len(a) else [0], np.int32)
  return ExampleArrays(jnp.asarray(tokens), jnp.asarray(examples.prompt_lengths),
                       jnp.asarray(examples.label_token),
                       jnp.asarray(pad1(examples.separator)),
                       jnp.asarray(pad1(examples.header)))


def label_log_probs(logits: jax.Array, token_sets) -> tuple:
  """(log P(False), log P(True)) from next-token logits [..., V].

  Each is the log-sum-exp of the float32 log-softmax over its token set.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return tuple(
      jax.nn.logsumexp(logp[..., jnp.asarray(ids)], axis=-1) for ids in token_sets)


def constrain_batch(x: jax.Array, batch_sharding_fn: Optional[callable]):
  """Shards the leading (row) axis over the mesh's batch axes when meshed."""
  return x if batch_sharding_fn is None else jax.lax.with_sharding_constraint(
      x, batch_sharding_fn(x.ndim))
