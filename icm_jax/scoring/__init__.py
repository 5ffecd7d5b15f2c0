"""Leave-one-out scoring kernel: exact and one-pass ("parallel") modes."""

from icm_jax.scoring.scorer import LOOScorer, Scores, ScoringConfig

__all__ = ["LOOScorer", "Scores", "ScoringConfig"]
