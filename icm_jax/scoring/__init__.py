"""Leave-one-out scoring kernel: exact mode and the one-pass "shared" and
"parallel" modes."""

from icm_jax.scoring.scorer import LOOScorer, Scores, ScoringConfig

__all__ = ["LOOScorer", "Scores", "ScoringConfig"]
