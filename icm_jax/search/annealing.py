"""ICM search: simulated annealing (Algorithm 1) with consistency fix (Alg. 2).

Host-side loop over one batch of N examples; every LOO evaluation goes to a
`score_fn` (the jitted scoring kernel, or a stub in tests):

    score_fn(labels [C, N] in {-1, 0, 1}, queries=None | [C, N] bool) -> Scores

returning log P(False) / log P(True) of each queried example given all other
labelled examples of its assignment (default queries: the labelled ones).
Several candidate assignments go to the kernel in one call (Algorithm 2
scores the tentative assignment and all its fix options together).

Gold labels never enter: the only inputs are scores and the consistency
structure. `report(labels) -> dict` may add numbers (e.g. agreement with gold)
to the metrics log; its output is written, never read.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np

from icm_jax import storage
from icm_jax.metrics_log import MetricsLog
from icm_jax.search import state as state_lib
from icm_jax.search.config import SearchConfig
from icm_jax.search.objective import mutual_predictability
from icm_jax.search.consistency import UNLABELLED, Consistency
from icm_jax.search.outputs import write_labels
from icm_jax.search.state import Evaluation, SearchState

log = logging.getLogger(__name__)

STATE_FILE = "search_state.json"
METRICS_FILE = "metrics.jsonl"
LABELS_FILE = "labels.jsonl"


# The hard fix enumerates every labelling of a group's labelled members but
# the proposed one: 2^12 candidates at most.
MAX_HARD_FIX_MEMBERS = 12
# Second entropy word of the alpha calibration's random stream.
CALIBRATION_STREAM = 0xA1FA


def accepts(delta: float, temperature: float, rng: np.random.Generator) -> bool:
  """Metropolis rule: a better assignment always, a worse one with
  probability exp(delta / T) (one uniform draw either way)."""
  u = rng.random()
  return delta > 0 or u < math.exp(min(delta / temperature, 0.0))


class SearchError(RuntimeError):
  """The search cannot go on (e.g. a NaN/Inf score)."""


@dataclasses.dataclass
class SearchResult:
  ids: tuple
  labels: np.ndarray       # [N] int8; -1 where never labelled
  log_p_false: np.ndarray  # [N] final LOO scores (unlabelled: given all labelled)
  log_p_true: np.ndarray
  utility: float
  predictability: float
  inconsistency: int
  iterations: int
  flips: int
  score_seconds: float     # this process: time inside score_fn
  total_seconds: float     # this process: time in run()
  score_calls: int
  alpha: float             # the alpha U(D) used (search.alpha_rule)

  @property
  def score(self) -> np.ndarray:
    return self.log_p_true - self.log_p_false


class ICMSearch:
  """Searches labels for one batch of examples."""

  def __init__(self, score_fn: Callable, consistency: Consistency,
               config: SearchConfig = SearchConfig(),
               ids: Optional[Sequence[str]] = None,
               report: Optional[Callable[[np.ndarray], dict]] = None):
    n = consistency.num_examples
    if config.initial_size > n:
      raise ValueError(f"search.initial_size={config.initial_size} > "
                       f"{n} examples in the batch")
    if config.fix == "hard" and len(consistency.group):
      sizes = np.bincount(consistency.group)
      if sizes.max() > MAX_HARD_FIX_MEMBERS + 1:
        raise ValueError(
            f"search.fix='hard' enumerates the labellings of a consistency "
            f"group: at most {MAX_HARD_FIX_MEMBERS + 1} members, but a group "
            f"here has {sizes.max()}")
    self.score_fn = score_fn
    self.consistency = consistency
    self.config = config
    self.n = n
    self.ids = tuple(ids) if ids is not None else tuple(map(str, range(n)))
    if len(self.ids) != n:
      raise ValueError(f"{len(self.ids)} ids for {n} examples")
    self.report = report
    self._fingerprint = state_lib.fingerprint(dataclasses.asdict(config),
                                              self.ids)
    self.score_seconds = 0.0
    self.score_calls = 0
    # The alpha of U(D): config.alpha until a step_spread calibration or a
    # resumed checkpoint sets it.
    self.alpha = config.alpha
    self.cache = ScoreCache(config.score_cache)

  # -- scoring ----------------------------------------------------------------

  def _score(self, labels: np.ndarray, queries=None):
    t = time.perf_counter()
    scores = self.score_fn(labels, queries)
    self.score_seconds += time.perf_counter() - t
    self.score_calls += 1
    return (np.asarray(scores.log_p_false, np.float32).reshape(labels.shape),
            np.asarray(scores.log_p_true, np.float32).reshape(labels.shape))

  def _check_finite(self, lf, lt, mask, what):
    bad = mask & ~(np.isfinite(lf) & np.isfinite(lt))
    if bad.any():
      cand, ex = np.nonzero(bad)
      names = sorted({self.ids[e] for e in ex})
      raise SearchError(f"non-finite LOO score ({what}, candidate "
                        f"{sorted(set(cand.tolist()))}) for examples {names}")

  def evaluate(self, candidates: np.ndarray, what: str) -> list:
    """U(D) of each assignment in `candidates` [C, N], in one kernel call
    for those not in the score cache (none if all are)."""
    candidates = np.atleast_2d(candidates).astype(np.int8)
    labelled = candidates != UNLABELLED
    keys = [_key(row) for row in candidates]
    found = {k: self.cache.get(k) for k in dict.fromkeys(keys)}
    missing = [k for k, row in found.items() if row is None]
    if missing:
      rows = np.stack([np.frombuffer(k[1], np.int8) for k in missing])
      mf, mt = self._score(rows)
      self._check_finite(mf, mt, rows != UNLABELLED, what)
      for k, f, t in zip(missing, mf, mt):
        found[k] = (f, t)
        self.cache.put(k, f, t)
    lf, lt = (np.stack(a) for a in zip(*(found[k] for k in keys)))
    p = mutual_predictability(self.config.objective, candidates, lf, lt)
    inconsistency = self.consistency.count(candidates)
    utility = self.alpha * p - inconsistency
    return [Evaluation(float(utility[c]), float(p[c]), int(inconsistency[c]),
                       np.where(labelled[c], lf[c], np.nan).astype(np.float32),
                       np.where(labelled[c], lt[c], np.nan).astype(np.float32))
            for c in range(len(candidates))]

  # -- Algorithm 2 -------------------------------------------------------------

  def fix(self, labels: np.ndarray, current: Optional[Evaluation],
          rng: np.random.Generator, keep: Sequence[int] = (),
          what: str = "fix"):
    """Consistency fix of `labels` (`config.fix`); returns it with its U.

    `current` is the evaluation of `labels` when known (initialisation: the
    baseline a fix must reach); None is the main loop's call, where the
    official fix resolves the first pair it examines whatever it costs.
    `keep`: examples the hard fix may not change (the proposed label).
    Returns (labels, evaluation), or None when the hard fix finds no
    consistent assignment that keeps `keep`.
    """
    if self.config.fix == "hard":
      return self._fix_hard(labels, keep, what)
    if self.config.fix == "unfixed_baseline":
      return self._fix_unfixed_baseline(labels, current, rng, keep, what)
    return self._fix_official(labels, current, rng, what)

  def _options(self, labels: np.ndarray, pairs: np.ndarray):
    """Every consistent option of each pair as a candidate assignment."""
    candidates, owner = [], []
    for k, (a, b) in enumerate(pairs):
      for ya, yb in self.consistency.options(int(a), int(b)):
        cand = labels.copy()
        cand[a], cand[b] = ya, yb
        candidates.append(cand)
        owner.append(k)
    return np.stack(candidates), np.array(owner)

  def _fix_official(self, labels, current, rng, what):
    labels = labels.copy()
    best = -math.inf if current is None else current.utility
    per_call = self.config.fix_pairs_per_call
    for _ in range(self.config.consistency_fix_rounds):
      pairs = self.consistency.pairs(labels)
      if len(pairs) == 0:
        break
      pairs = pairs[rng.permutation(len(pairs))]
      applied = None
      for start in range(0, len(pairs), per_call):
        candidates, owner = self._options(labels, pairs[start:start + per_call])
        evaluations = self.evaluate(candidates, what)
        utility = np.array([e.utility for e in evaluations])
        for k in range(owner.max() + 1):
          # The better of the pair's options (the first on a tie) ...
          mine = np.flatnonzero(owner == k)
          c = int(mine[np.argmax(utility[mine])])
          # ... is applied if it is no worse than the best U so far.
          if utility[c] >= best:
            applied = candidates[c], evaluations[c]
            break
        if applied is not None:
          break
      if applied is None:
        break
      labels, current = applied
      best = current.utility
    if current is None:
      current = self.evaluate(labels[None], what)[0]
    return labels, current

  def _fix_hard(self, labels, keep, what):
    """Each group holding an inconsistent pair, in group order, is set to its
    best-U consistent assignment of its labelled members (`keep` held)."""
    labels = labels.copy()
    cons = self.consistency
    current = None
    held = np.zeros(self.n, bool)
    held[list(keep)] = True
    while True:
      bad = cons.inconsistent(labels)
      if not bad.any():
        break
      g = int(cons.group[cons.pair_i[bad][0]])
      free = np.flatnonzero((cons.group == g) & (labels != UNLABELLED) & ~held)
      bits = (np.arange(2 ** len(free))[:, None] >> np.arange(len(free))) & 1
      candidates = np.repeat(labels[None], len(bits), axis=0)
      candidates[:, free] = bits
      in_group = cons.group[cons.pair_i] == g
      ok = ~(cons.inconsistent(candidates) & in_group).any(axis=1)
      if not ok.any():
        return None
      candidates = candidates[ok]
      evaluations = self.evaluate(candidates, what)
      c = int(np.argmax([e.utility for e in evaluations]))
      labels, current = candidates[c], evaluations[c]
    if current is None:
      current = self.evaluate(labels[None], what)[0]
    return labels, current

  def _fix_unfixed_baseline(self, labels, current, rng, focus, what):
    """This project's earlier fix, kept for comparison (see SearchConfig)."""
    labels = labels.copy()
    touched = set(int(i) for i in focus)
    for _ in range(self.config.consistency_fix_rounds):
      pairs = self.consistency.pairs(labels)
      if len(pairs) == 0:
        break
      near = np.array([p for p in pairs if touched & {int(p[0]), int(p[1])}],
                      np.int64).reshape(-1, 2)
      pool = near if len(near) else pairs
      a, b = (int(x) for x in pool[rng.integers(len(pool))])
      candidates, _ = self._options(labels, np.array([[a, b]]))
      if current is None:
        candidates = np.concatenate([labels[None], candidates])
      evaluations = self.evaluate(candidates, what)
      if current is None:
        current, evaluations = evaluations[0], evaluations[1:]
        candidates = candidates[1:]
      best = int(np.argmax([e.utility for e in evaluations]))
      if evaluations[best].utility < current.utility:
        break
      labels, current = candidates[best], evaluations[best]
      touched |= {a, b}
    if current is None:
      current = self.evaluate(labels[None], what)[0]
    return labels, current

  # -- Algorithm 1 ---------------------------------------------------------------

  def initial_state(self) -> SearchState:
    """K seed examples (whole groups first, in random group order) with
    balanced random labels, then consistency-fixed against their real U."""
    cfg = self.config
    rng = np.random.default_rng(cfg.seed)
    group_rank = np.argsort(rng.permutation(self.consistency.group.max() + 1))
    order = np.lexsort((np.arange(self.n), group_rank[self.consistency.group]))
    seeds = order[:cfg.initial_size]
    seed_labels = np.array([1] * (cfg.initial_size // 2) +
                           [0] * (cfg.initial_size - cfg.initial_size // 2),
                           np.int8)
    rng.shuffle(seed_labels)
    labels = np.full(self.n, UNLABELLED, np.int8)
    labels[seeds] = seed_labels
    seeded = self.evaluate(labels[None], "initialisation")[0]
    fixed = self.fix(labels, seeded, rng, what="initialisation")
    labels, current = fixed if fixed is not None else (labels, seeded)
    if cfg.alpha_rule == "step_spread":
      self.alpha = self.calibrated_alpha(labels, current)
      current = dataclasses.replace(
          current, utility=self.alpha * current.predictability
          - current.inconsistency)
    return SearchState(labels=labels, current=current, iteration=0, flips=0,
                       visited=np.zeros(self.n, bool),
                       rng_state=rng.bit_generator.state, alpha=self.alpha)

  def calibrated_alpha(self, labels: np.ndarray, current: Evaluation) -> float:
    """search.alpha_rule="step_spread": T0 / median |Delta P| of a step.

    The neighbours are built from scores and the consistency structure only
    (no gold), on a random stream of their own, so the main loop draws the
    same examples as under a fixed alpha.
    """
    cfg = self.config
    rng = np.random.default_rng([cfg.seed, CALIBRATION_STREAM])
    labelled = np.flatnonzero(labels != UNLABELLED)
    seen_groups, deltas = set(), []
    for i in rng.permutation(labelled):
      if len(deltas) == cfg.calibration_steps:
        break
      group = int(self.consistency.group[i])
      if group in seen_groups:
        continue
      seen_groups.add(group)
      tentative = labels.copy()
      tentative[i] = 1 - tentative[i]
      fixed = self.fix(tentative, None, rng, keep=(int(i),),
                       what="alpha calibration")
      if fixed is None or np.array_equal(fixed[0], labels):
        continue
      deltas.append(abs(fixed[1].predictability - current.predictability))
    deltas = np.array(deltas)
    spread = float(np.median(deltas[deltas > 0])) if (deltas > 0).any() else 0.0
    if not spread > 0:
      log.warning("alpha calibration: %d neighbours all scored P = %.6g; "
                  "keeping search.alpha=%g", len(deltas),
                  current.predictability, cfg.alpha)
      return float(cfg.alpha)
    alpha = cfg.initial_temperature / spread
    log.info("alpha = %.4g from %d calibration neighbours: median |dP| = "
             "%.4g, T0 = %g (a median worse step is accepted with p = 1/e "
             "at T0)", alpha, len(deltas), spread, cfg.initial_temperature)
    return float(alpha)

  def step(self, st: SearchState, rng: np.random.Generator) -> dict:
    """One iteration; mutates `st`, returns its metrics record.

    A proposal whose fixed tentative assignment equals the current one is no
    change: not accepted, not a flip, and the converged-stop bookkeeping goes
    on (the official code counts it as an accepted flip with Delta = 0).
    """
    cfg = self.config
    st.iteration += 1
    labelled = st.labels != UNLABELLED
    weights = np.where(~labelled & self.consistency.same_group(labelled),
                       cfg.unlabelled_group_weight, 1.0)
    i = int(rng.choice(self.n, p=weights / weights.sum()))
    key = _key(st.labels, query=i)
    cached = self.cache.get(key)
    if cached is None:
      queries = np.zeros((1, self.n), bool)
      queries[0, i] = True
      lf, lt = self._score(st.labels[None], queries)
      self._check_finite(lf, lt, queries,
                         f"iteration {st.iteration} prediction")
      cached = lf[0, i:i + 1], lt[0, i:i + 1]
      self.cache.put(key, *cached)
    lf_i, lt_i = cached
    new_label = int(lt_i[0] > lf_i[0])
    temperature = cfg.temperature(st.iteration, st.flips)
    record = {"iteration": st.iteration, "example": self.ids[i],
              "proposed": new_label != st.labels[i], "accepted": False,
              "no_change": False, "delta": None}
    if new_label != st.labels[i]:
      tentative = st.labels.copy()
      tentative[i] = new_label
      fixed = self.fix(tentative, None, rng, keep=(i,),
                       what=f"iteration {st.iteration}")
      if fixed is None or np.array_equal(fixed[0], st.labels):
        record["no_change"] = True
      else:
        tentative, evaluation = fixed
        delta = evaluation.utility - st.current.utility
        accept = accepts(delta, temperature, rng)
        record.update(delta=delta, accepted=accept)
        if accept:
          st.labels, st.current = tentative, evaluation
          st.flips += 1
          st.visited[:] = False
    st.visited[i] = True
    record["T"] = temperature
    return record

  def converged(self, st: SearchState) -> bool:
    return bool((st.labels != UNLABELLED).all() and st.visited.all())

  def run(self, workdir: Optional[str] = None, progress: bool = True,
          after_iteration: Optional[Callable[[SearchState], None]] = None
          ) -> SearchResult:
    """Runs (or resumes from `workdir`) to the end; writes the outputs there.

    Files in `workdir`: search_state.json (checkpoint every
    `checkpoint_every` iterations, atomic), metrics.jsonl, labels.jsonl.
    """
    start = time.perf_counter()
    self.score_seconds, self.score_calls = 0.0, 0
    cfg = self.config
    path = storage.join(workdir, STATE_FILE) if workdir else None
    st = state_lib.load(path, self._fingerprint) if path else None
    metrics = None
    if workdir:
      metrics = MetricsLog(storage.join(workdir, METRICS_FILE),
                           resume=None if st is None else st.iteration)
    if st is not None:
      log.info("resuming the search from %s at iteration %d", path,
               st.iteration)
    rng = np.random.default_rng(cfg.seed)
    self.alpha = cfg.alpha
    self.cache = ScoreCache(cfg.score_cache)
    if st is None:
      st = self.initial_state()
      rng.bit_generator.state = st.rng_state
      self._log(metrics, st, {"iteration": 0, "example": None,
                              "proposed": False, "accepted": True,
                              "delta": None, "T": cfg.temperature(0, 0),
                              "alpha": st.alpha})
      if path:
        self._save(path, st)
    else:
      rng.bit_generator.state = st.rng_state
      if st.alpha is not None:
        self.alpha = st.alpha
      self.cache = ScoreCache.from_json(cfg.score_cache, st.score_cache)
    bar = _progress(cfg.max_iterations, st.iteration, progress)
    try:
      # `done` is re-derived, so a finished run resumed with a larger
      # max_iterations goes on.
      st.done = False
      while True:
        if st.iteration >= cfg.max_iterations or (
            cfg.stop_when_converged and self.converged(st)):
          st.done = True
          break
        record = self.step(st, rng)
        st.rng_state = rng.bit_generator.state
        self._log(metrics, st, record)
        bar.update(1)
        bar.set_postfix(U=f"{record['U']:.3f}",
                        labelled=f"{record['labelled']}/{self.n}",
                        refresh=False)
        if path and st.iteration % cfg.checkpoint_every == 0:
          metrics.flush()  # never behind the checkpoint it resumes from
          self._save(path, st)
        if after_iteration is not None:
          after_iteration(st)
    finally:
      bar.close()
      if metrics:
        metrics.close()
    lf, lt = self._final_scores(st)
    if path:
      self._save(path, st)
      write_labels(storage.join(workdir, LABELS_FILE), self.ids, st.labels,
                   lf, lt)
    c = st.current
    return SearchResult(self.ids, st.labels.copy(), lf, lt, c.utility,
                        c.predictability, c.inconsistency, st.iteration,
                        st.flips, self.score_seconds,
                        time.perf_counter() - start, self.score_calls,
                        self.alpha)

  def _save(self, path, st: SearchState):
    st.score_cache = self.cache.to_json()
    state_lib.save(path, st, self._fingerprint)

  def _final_scores(self, st: SearchState):
    """Labelled: the current LOO scores; unlabelled: given all labelled."""
    lf, lt = st.current.log_p_false.copy(), st.current.log_p_true.copy()
    unlabelled = st.labels == UNLABELLED
    if unlabelled.any() and not unlabelled.all():
      qf, qt = self._score(st.labels[None], unlabelled[None])
      lf[unlabelled], lt[unlabelled] = qf[0, unlabelled], qt[0, unlabelled]
    return lf, lt

  def _log(self, metrics, st, record):
    """Adds the state after the decision to `record`; writes it if logging."""
    c = st.current
    record.update(U=c.utility, P=c.predictability, I=c.inconsistency,
                  labelled=int((st.labels != UNLABELLED).sum()),
                  flips=st.flips)
    if metrics is None:
      return
    if self.report is not None:
      # Reporting only: computed from the labels after the decision.
      record.update(self.report(st.labels.copy()))
    metrics.write(record)


def _key(labels: np.ndarray, query: int = -1) -> tuple:
  """Cache key of one scorer row: the assignment and which example is
  queried (-1: every labelled one, as for U(D))."""
  return (int(query), np.asarray(labels, np.int8).tobytes())


class ScoreCache:
  """The last `capacity` scorer rows, least recently used dropped first.

  A proposal the search has scored before (the same example flipped back,
  a rejected step drawn again, a calibration neighbour) is not sent to the
  scorer again. The scorer is a deterministic function of the assignment,
  so a hit returns what a new call would. The cache is part of the
  checkpoint, so a resumed run reuses exactly the rows an uninterrupted one
  would (a recomputation could differ in the last bit when the row shares
  a call with other candidates).
  """

  def __init__(self, capacity: int):
    self.capacity = capacity
    self._rows = collections.OrderedDict()

  def get(self, key):
    row = self._rows.get(key)
    if row is not None:
      self._rows.move_to_end(key)
    return row

  def put(self, key, log_p_false, log_p_true):
    if self.capacity <= 0:
      return
    self._rows[key] = (np.array(log_p_false, np.float32),
                       np.array(log_p_true, np.float32))
    self._rows.move_to_end(key)
    while len(self._rows) > self.capacity:
      self._rows.popitem(last=False)

  def to_json(self) -> list:
    """Oldest first: [query, labels, log_p_false, log_p_true] per row."""
    return [[q, np.frombuffer(labels, np.int8).tolist(),
             [float(x) for x in f], [float(x) for x in t]]
            for (q, labels), (f, t) in self._rows.items()]

  @classmethod
  def from_json(cls, capacity: int, rows) -> "ScoreCache":
    cache = cls(capacity)
    for q, labels, f, t in rows or ():
      cache.put(_key(np.array(labels, np.int8), q), f, t)
    return cache


def _progress(total, initial, enabled):
  if not enabled:
    return _NoBar()
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc="ICM search", unit="it")


class _NoBar:
  def update(self, n): pass
  def set_postfix(self, **kw): pass
  def close(self): pass
