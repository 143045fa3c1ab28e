"""How a run ended, as its last report says it: one definition for the training loop, the
search and the report. No torch here.

A run that ended without a usable score reports one last result with `run_status`
("diverged": the loss became NaN or infinite, `trainable.loop`; "failed": an error of the
config or the data that no retry changes, `search.phases.trial`), `error` (one line) and
the metrics at their worst (accuracies 0, losses infinite), so whatever ranks runs by a
metric puts it last. Neither is retried, nor rerun by `--resume`.
"""

from __future__ import annotations

import math

__all__ = ["DIVERGED", "FAILED", "RUN_ERROR", "RUN_STATUS", "WORST", "worst_value"]

RUN_STATUS, RUN_ERROR = "run_status", "error"
DIVERGED, FAILED = "diverged", "failed"
WORST = {"val_acc": 0.0, "val_acc5": 0.0, "val_loss": math.inf, "train_loss": math.inf}
"""The worst value of every metric a run can be ranked by."""


def worst_value(metric: str) -> float:
    """The worst value a metric can take: 0 for an accuracy, infinity for a loss."""
    return WORST[metric]
