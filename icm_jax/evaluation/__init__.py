"""Evaluation: label-word log-probs (zero/many-shot), accuracy reports, plots.

Measures what the paper's Figure 3 compares (zero-shot, many-shot with gold or
ICM labels, fine-tuned on gold or ICM labels) from token pieces, index lists
and label arrays only; it never imports the search, labelling, training or
task stages.
"""

from icm_jax.evaluation.prompting import label_log_probs, select_demonstrations

__all__ = ["label_log_probs", "select_demonstrations"]
