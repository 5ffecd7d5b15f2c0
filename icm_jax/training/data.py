"""Labelled examples -> fixed-shape host batches for the train step.

The data order is a pure function of (seed, step): the example stream is the
concatenation of one permutation per epoch, each drawn from
`np.random.default_rng([seed, epoch])`, and step k takes stream rows
[k*B, (k+1)*B). A resumed run therefore needs nothing but the step number.
The last step may be short; it is padded with weight-0 rows, so no example is
dropped and none is repeated within an epoch.

Each row is `header + prompt`, right-padded to a power-of-two bucket length
(>= min_seq_len, <= the model's max_position_embeddings) so a run compiles
only a few shapes. The target is the label word right after the prompt.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from icm_jax.tokenization import ExampleTokens


def check_labels(examples: ExampleTokens, labels) -> np.ndarray:
  """labels as int32 [N] in {0, 1}; anything else names the example id."""
  labels = np.asarray(labels)
  if labels.shape != (examples.num_examples,):
    raise ValueError(f"labels has shape {labels.shape}, expected "
                     f"({examples.num_examples},) (one per example)")
  if labels.dtype == bool:
    labels = labels.astype(np.int32)
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers 0 (False) / 1 (True), got dtype "
                     f"{labels.dtype}")
  bad = np.flatnonzero((labels != 0) & (labels != 1))
  if bad.size:
    i = int(bad[0])
    raise ValueError(
        f"example {examples.ids[i]!r} has label {labels[i]!r}; training needs "
        f"0 (False) or 1 (True) ({bad.size} such examples; filter unlabelled "
        "examples out before training)")
  return labels.astype(np.int32)


def check_lengths(examples: ExampleTokens, max_len: int) -> np.ndarray:
  """Row lengths (header + prompt); a row over max_len names the example."""
  if examples.num_examples == 0:
    raise ValueError("no examples to train on")
  lengths = len(examples.header) + examples.prompt_lengths
  for i in np.flatnonzero(examples.prompt_lengths == 0):
    raise ValueError(f"example {examples.ids[i]!r} has an empty prompt")
  too_long = np.flatnonzero(lengths > max_len)
  if too_long.size:
    i = int(too_long[0])
    raise ValueError(
        f"example {examples.ids[i]!r} is {lengths[i]} tokens (header + prompt),"
        f" longer than the model's max_position_embeddings={max_len} "
        f"({too_long.size} such examples)")
  return lengths.astype(np.int32)


def num_steps(num_examples: int, num_epochs: int, batch_size: int) -> int:
  return math.ceil(num_examples * num_epochs / batch_size)


def step_example_indices(step: int, num_examples: int, num_epochs: int,
                         batch_size: int, seed: int) -> np.ndarray:
  """[batch_size] example indices of 0-based step `step`; -1 marks padding."""
  total = num_examples * num_epochs
  start = step * batch_size
  if not 0 <= start < total:
    steps = num_steps(num_examples, num_epochs, batch_size)
    raise ValueError(f"step {step} is outside the {steps} steps of this run")
  rows = np.arange(start, min(start + batch_size, total))
  epochs = rows // num_examples
  out = np.full(batch_size, -1, np.int64)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_examples)
    here = epochs == epoch
    out[:len(rows)][here] = perm[rows[here] % num_examples]
  return out


def bucket_length(length: int, min_seq_len: int, max_len: int) -> int:
  """Smallest power of two >= max(length, min_seq_len), capped at max_len."""
  bucket = 1 << (max(length, min_seq_len, 1) - 1).bit_length()
  return min(bucket, max_len)


@dataclasses.dataclass(frozen=True)
class HostBatch:
  """One optimizer step's rows as [grad_accum_steps, micro_batch, ...] arrays.

  Padding rows have weight 0, length 1 (one token 0, so attention never sees
  an all-masked row) and label 0.
  """

  tokens: np.ndarray   # [A, M, T] int32, right-padded with 0
  lengths: np.ndarray  # [A, M] int32 real tokens per row
  labels: np.ndarray   # [A, M] int32 in {0, 1}
  weights: np.ndarray  # [A, M] float32: 1 real row, 0 padding

  @property
  def num_tokens(self) -> int:
    """Real (non-pad) tokens of the step."""
    return int(np.sum(self.lengths * (self.weights > 0)))

  def arrays(self) -> dict:
    return {"tokens": self.tokens, "lengths": self.lengths,
            "labels": self.labels, "weights": self.weights}


def build_batch(examples: ExampleTokens, labels: np.ndarray,
                indices: np.ndarray, grad_accum_steps: int, min_seq_len: int,
                max_len: int) -> HostBatch:
  """Rows `indices` (-1 = padding) as a HostBatch of one bucketed length."""
  header = np.asarray(examples.header, np.int32)
  rows = [None if i < 0 else
          np.concatenate([header, np.asarray(examples.prompts[i], np.int32)])
          for i in indices]
  longest = max(len(r) for r in rows if r is not None)
  length = bucket_length(longest, min_seq_len, max_len)
  batch = len(indices)
  tokens = np.zeros((batch, length), np.int32)
  lengths = np.ones(batch, np.int32)
  row_labels = np.zeros(batch, np.int32)
  weights = np.zeros(batch, np.float32)
  for b, (i, row) in enumerate(zip(indices, rows)):
    if row is None:
      continue
    tokens[b, :len(row)] = row
    lengths[b] = len(row)
    row_labels[b] = labels[i]
    weights[b] = 1.0
  shape = (grad_accum_steps, batch // grad_accum_steps)
  return HostBatch(tokens.reshape(shape + (length,)), lengths.reshape(shape),
                   row_labels.reshape(shape), weights.reshape(shape))
