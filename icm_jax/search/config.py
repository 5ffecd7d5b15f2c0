"""Search hyperparameters (paper appendix and official code defaults)."""

from __future__ import annotations

import dataclasses
import math

from icm_jax.search.objective import OBJECTIVES

SCHEDULES = ("log", "paper", "exp")
FIXES = ("official", "hard", "unfixed_baseline")
ALPHA_RULES = ("fixed", "step_spread")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Simulated-annealing ICM search over one batch of examples.

  objective: P(D). "mean_log_odds" (official code; what alpha=50 is calibrated
    for) is the mean over labelled examples of the assigned label's log-odds
    log P(y) - log P(not y); "sum_log_prob" is the paper's sum of log P(y_i|rest);
    "class_balanced" averages the mean log-odds of each assigned label
    (search.objective module), so a constant labelling is not rewarded in full.
  schedule: temperature. "log" (official): T0 / (1 + 2 ln(1 + flips));
    "paper": T0 / (1 + decay ln n) at iteration n >= 1; "exp": T0 * decay^flips.
    All floored at final_temperature. "flips" counts accepted changes.
  fix: Algorithm 2, the consistency fix of each tentative assignment.
    "hard" is the default: "official" left seeded contradictions in place on
    real comparative runs at the paper's alpha (README, search section).
    "official" (github Jiaxin-Wen/Unsupervised-Elicitation, ICM.py
    `fix_inconsistency`): in the main loop the first inconsistent pair
    examined is resolved whatever it costs (the official code passes a dummy
    current metric); then, for up to `consistency_fix_rounds` rounds, the
    inconsistent pairs are walked in random order and the first whose best
    consistent option scores U >= the best U so far is applied; a round that
    applies nothing, or I = 0, ends the fix. At initialisation the baseline is
    the seed set's real U. "hard": every tentative assignment is made fully
    consistent (I = 0): each group with an inconsistent pair gets its
    best-U consistent assignment, the proposed label held fixed, so only
    consistent assignments are ever accepted (groups of at most 13 claims).
    "unfixed_baseline": this project's earlier fix (U of the unfixed tentative set is the baseline and
    the fix stops at the first sampled pair that does not beat it); kept to
    reproduce the README's comparison, where it ends comparative tasks
    mostly one label with most labelled pairs inconsistent.
  fix_pairs_per_call: inconsistent pairs whose options go to the scorer in
    one call during the official fix's walk (the decisions do not depend on
    it: more pairs per call means fewer calls, some of them wasted).
  unlabelled_group_weight: sampling weight of an unlabelled example sharing a
    consistency group with a labelled one (others weigh 1).
  alpha_rule: where alpha comes from. "fixed": `alpha`. "step_spread":
    from the search's own step scale, label-free. After initialisation,
    `calibration_steps` neighbours of the initial labels are scored, each a
    labelled example of a different consistency group with its label
    flipped and then consistency-fixed the way a step is (`keep` = that
    example); alpha = initial_temperature / median |P(neighbour) - P(init)|
    (over the neighbours whose P moved; none moved: `alpha` is kept).
    A median-sized worse step is then accepted with probability 1/e at T0;
    under the log schedule T has fallen 5.8x by the 10th accepted flip
    (probability about 0.003): exploratory first, nearly greedy later. The
    neighbours are evaluated, never applied, and cost one U(D) call each
    under the hard fix. `alpha` is still what the official fix weighs I(D)
    against inside them. The alpha chosen is logged, written to metrics.jsonl
    (iteration 0), the checkpoint and summary.json, and kept on resume.
  calibration_steps: neighbours the step_spread rule scores (at most one per
    consistency group; fewer when the batch has fewer groups).
  score_cache: scorer rows kept (least recently used dropped; 0 = none), so
    an assignment or prediction scored before is not scored again; the
    decisions are the same with any size. Each row is N floats x 2, stored
    in the checkpoint too (64 rows of a 256-claim batch: about 0.6 MB).
  stop_when_converged: also stop once every example is labelled and a full
    pass (each example drawn at least once since the last accepted change)
    changed nothing.
  """

  alpha: float = 50.0
  alpha_rule: str = "fixed"
  calibration_steps: int = 8
  score_cache: int = 64
  objective: str = "mean_log_odds"
  initial_size: int = 8
  max_iterations: int = 3000
  schedule: str = "log"
  initial_temperature: float = 10.0
  final_temperature: float = 0.01
  decay: float = 0.99
  fix: str = "hard"
  consistency_fix_rounds: int = 10
  fix_pairs_per_call: int = 1
  unlabelled_group_weight: float = 100.0
  stop_when_converged: bool = False
  checkpoint_every: int = 10
  seed: int = 0

  def __post_init__(self):
    def bad(key, why):
      raise ValueError(f"search.{key}={getattr(self, key)!r}: {why}")
    if self.objective not in OBJECTIVES:
      bad("objective", f"not in {OBJECTIVES}")
    if self.fix not in FIXES:
      bad("fix", f"not in {FIXES}")
    if self.schedule not in SCHEDULES:
      bad("schedule", f"not in {SCHEDULES}")
    if self.alpha_rule not in ALPHA_RULES:
      bad("alpha_rule", f"not in {ALPHA_RULES}")
    for key in ("alpha", "initial_temperature", "final_temperature", "decay",
                "unlabelled_group_weight"):
      value = getattr(self, key)
      if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        bad(key, "must be a finite number > 0")
    if self.final_temperature > self.initial_temperature:
      bad("final_temperature", "exceeds initial_temperature")
    if self.schedule == "exp" and self.decay >= 1:
      bad("decay", "the exp schedule needs decay < 1")
    for key in ("initial_size", "max_iterations", "checkpoint_every",
                "fix_pairs_per_call", "calibration_steps"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        bad(key, "must be a positive int")
    for key in ("consistency_fix_rounds", "score_cache"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        bad(key, "must be an int >= 0")
    if not isinstance(self.seed, int) or isinstance(self.seed, bool):
      bad("seed", "must be an int")

  def temperature(self, iteration: int, flips: int) -> float:
    """Temperature at 1-based `iteration` after `flips` accepted changes."""
    t0, t_min = self.initial_temperature, self.final_temperature
    if self.schedule == "log":
      t = t0 / (1 + 2 * math.log(1 + flips))
    elif self.schedule == "paper":
      t = t0 / (1 + self.decay * math.log(max(iteration, 1)))
    else:
      t = t0 * self.decay ** flips
    return max(t_min, t)
