"""Evaluation: label-word log-probs (zero/many-shot), accuracy reports, plots.

Measures what the paper's Figure 3 compares (zero-shot, many-shot with gold or
ICM labels, fine-tuned on gold or ICM labels, random labels as a floor) and
the follow-up work's baselines (random-label many-shot, bootstrap +
consistency), read thresholded, by group-consistent decoding and by AUC, from
token pieces, index lists and label arrays only; it never imports the search,
labelling, training or task stages.
"""

from icm_jax.evaluation.bootstrap import bootstrap_labels
from icm_jax.evaluation.decoding import group_consistent_labels, roc_auc
from icm_jax.evaluation.plots import (plot_accuracy_bars,
                                      plot_search_trajectory, read_metrics)
from icm_jax.evaluation.prompting import label_log_probs, select_demonstrations
from icm_jax.evaluation.report import (MethodResult, format_table,
                                       method_result, read_report, results_of,
                                       summarize, write_report)

__all__ = ["label_log_probs", "select_demonstrations", "MethodResult",
           "method_result", "write_report", "read_report", "results_of",
           "format_table", "plot_accuracy_bars", "plot_search_trajectory",
           "read_metrics", "bootstrap_labels", "group_consistent_labels",
           "roc_auc", "summarize"]
