"""TensorBoard's HParams view of the search: one session per trial with its searched
tricks, best and final value of the metric and epochs run, updated as results arrive
(early-stopped trials included)."""

from __future__ import annotations

import os
from typing import Any, Callable

from ray.tune import Callback
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from spaces import Space

HPARAMS_DIR = "hparams"


def _hparam_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class HParamsCallback(Callback):
    """A Tune callback, run in the search driver, writing `<logdir>/hparams/...`."""

    def __init__(self, space: Space, logdir: str, upload: Callable[[str, str], None] | None = None) -> None:
        """`logdir` is a local folder; with `upload(local_dir, relative_path)` each trial's
        files are also copied to the experiment's storage after every write."""
        self.metric = space.experiment.metric
        self.mode = space.experiment.mode
        self.paths = list(space.searched_paths)
        self.root = os.path.join(logdir, HPARAMS_DIR)
        self.metric_tags = [f"hparams/best_{self.metric}", f"hparams/final_{self.metric}", "hparams/epochs"]
        self.upload = upload
        self._writers: dict[str, SummaryWriter] = {}
        self._best: dict[str, float] = {}

    def _writer(self, trial: Any) -> SummaryWriter:
        w = self._writers.get(trial.trial_id)
        if w is None:
            w = SummaryWriter(log_dir=os.path.join(self.root, trial.trial_id))
            hp = {p: _hparam_value(trial.config.get(p)) for p in self.paths}  # None: not sampled
            _, start, _ = hparams_summaries(hp, {t: 0.0 for t in self.metric_tags})
            w.file_writer.add_summary(start)
            self._writers[trial.trial_id] = w
        return w

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value, epoch = result.get(self.metric), result.get("epoch")
        if value is None or epoch is None:
            return
        best = self._best.get(trial.trial_id)
        better = best is None or (value > best if self.mode == "max" else value < best)
        if better:
            self._best[trial.trial_id] = best = value
        w = self._writer(trial)
        step = int(epoch)
        w.add_scalar(self.metric_tags[0], best, step)
        w.add_scalar(self.metric_tags[1], value, step)
        w.add_scalar(self.metric_tags[2], step, step)
        w.flush()
        self._sync(trial)

    def _sync(self, trial: Any) -> None:
        if self.upload is not None:
            self.upload(os.path.join(self.root, trial.trial_id), f"{HPARAMS_DIR}/{trial.trial_id}")

    def _end(self, trial: Any) -> None:
        w = self._writers.pop(trial.trial_id, None)
        if w is not None:
            _, _, end = hparams_summaries({}, {})
            w.file_writer.add_summary(end)
            w.close()
            self._sync(trial)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for w in self._writers.values():
            w.close()
        self._writers.clear()
