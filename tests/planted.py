"""A planted LOO scorer: a stand-in for the LM with a known hidden truth.

For example i in context D (all other labelled examples), with t = 2·truth − 1
and l = 2·label − 1 (0 when unlabelled):

    s_i(D) = t_i · (signal · agree_i + prior) + herd · majority_i + ε_i + η_i(D)

agree_i: mean of l_j·t_j over the context (how truth-aligned the context is;
the model follows the concept its demonstrations teach, as in-context learning
does, so the all-flipped labelling is a local optimum too); prior: a weak pull
towards the truth (the pretrained model's knowledge); majority_i: mean of l_j
(a copy-the-majority bias that makes "everything True" an attractor, the
degenerate solution consistency rules out in comparative tasks); ε_i: fixed
per-example noise (some claims the model gets wrong); η_i(D): noise that
depends deterministically on the whole assignment (prompt-to-prompt jitter).
Returned as log-probs with log P(True) − log P(False) = s.
"""

import zlib
from typing import NamedTuple

import numpy as np


class Scores(NamedTuple):
  log_p_false: np.ndarray
  log_p_true: np.ndarray


class PlantedScorer:

  def __init__(self, truth, *, signal=1.0, prior=0.3, herd=0.0, noise=0.5,
               context_noise=0.1, seed=0, nan_examples=()):
    self.truth = np.asarray(truth, np.int64)
    self.t = 2.0 * self.truth - 1.0
    self.signal, self.prior, self.herd = signal, prior, herd
    self.context_noise = context_noise
    self.eps = np.random.default_rng(seed).normal(0.0, noise, len(truth))
    self.nan_examples = np.array(nan_examples, np.int64)
    self.calls = 0

  def s(self, labels):
    """[C, N] LOO log-odds of every example (labelled or not)."""
    labels = np.atleast_2d(labels)
    l = np.where(labels >= 0, 2.0 * labels - 1.0, 0.0)
    count = (labels >= 0).sum(axis=1, keepdims=True) - (labels >= 0)
    denom = np.maximum(count, 1)
    agree = ((l * self.t).sum(axis=1, keepdims=True) - l * self.t) / denom
    majority = (l.sum(axis=1, keepdims=True) - l) / denom
    s = self.t * (self.signal * agree + self.prior) + self.herd * majority
    s = s + self.eps
    for c in range(len(labels)):
      seed = zlib.crc32(labels[c].astype(np.int8).tobytes())
      s[c] += np.random.default_rng(seed).normal(0.0, self.context_noise,
                                                 labels.shape[1])
    return s

  def __call__(self, labels, queries=None):
    self.calls += 1
    labels = np.atleast_2d(np.asarray(labels))
    if queries is None:
      queries = labels >= 0
    queries = np.broadcast_to(queries, labels.shape)
    s = self.s(labels)
    s[:, self.nan_examples] = np.nan
    with np.errstate(invalid="ignore"):
      lt = -np.logaddexp(0.0, -s)
      lf = -np.logaddexp(0.0, s)
    lt = np.where(queries, lt, np.nan).astype(np.float32)
    lf = np.where(queries, lf, np.nan).astype(np.float32)
    return Scores(lf, lt)
