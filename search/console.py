"""The search's console: one line per trial that ended, for people.

    trial c50932a5  mix.mode=mixup mixup_alpha=0.263 label_smoothing=0.1 global_batch=64  val_acc 0.8583  epochs 5/5  done
    trial 6b75a67e  mix.mode=none label_smoothing=0 global_batch=128  val_acc 0.4410  epochs 2/5  stopped early by ASHA
    trial 77d1c2a0  mix.mode=cutmix cutmix_alpha=0.61 ...  val_acc -  epochs 1/5  diverged: non-finite loss at epoch 2, ...
    trial 40b1e_00000  candidate 1: mix.mode=mixup mixup_alpha=0.126  val_acc 0.9194  epochs 5/5  done (mean of 3 seeds)

The score is the metric at the trial's last reported epoch (what ASHA compared and Optuna
was told), not its best epoch; a trial that trained several seeds one after another
(`run.repeats`) scores the mean over its seeds of each seed's last epoch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from ray.tune import Callback

from search.experiment import DIVERGED, FAILED, RUN_ERROR, RUN_STATUS
from spaces import Space
from trainable.cluster import error_line

__all__ = ["TrialLines", "short_names", "trial_line"]

_GENERIC = {"mode", "name", "kind", "enabled"}  # last parts that say nothing alone


def short_names(paths: list[str]) -> dict[str, str]:
    """A short name per key path: its last part when that is unique among `paths` and says
    something alone, else its last two parts (`mix.mode`), else the whole path."""
    last = [p.rpartition(".")[2] for p in paths]
    out = {}
    for path, leaf in zip(paths, last):
        two = ".".join(path.split(".")[-2:])
        if leaf not in _GENERIC and last.count(leaf) == 1:
            out[path] = leaf
        elif sum(".".join(p.split(".")[-2:]) == two for p in paths) == 1:
            out[path] = two
        else:
            out[path] = path
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trial_line(
    trial_id: str, values: str, metric: str, score: float | None, epochs: int, target: int, why: str
) -> str:
    """`trial <id>  <values>  <metric> <score>  epochs <run>/<target>  <why it ended>`."""
    shown = "-" if score is None else f"{score:.4f}"
    parts = [f"trial {trial_id}", values, f"{metric} {shown}", f"epochs {epochs}/{target}", why]
    return "  ".join(p for p in parts if p)


class TrialLines(Callback):
    """A Tune callback printing one line to `stream` (stdout) for every trial that ended:
    done, stopped early by the scheduler, diverged, or failed (with its one-line reason).
    Works for the search's trials (Optuna's values in the config) and for the confirmation
    and ablation trials (an `entry` with a label in the config)."""

    def __init__(self, space: Space, stream: TextIO | None = None) -> None:
        self.space = space
        self.stream = stream
        self.metric = space.experiment.metric
        self.names = short_names(space.searched_paths)
        self._runs: dict[str, dict[Any, tuple[int, float]]] = {}  # trial -> repeat -> (epoch, metric)
        self._last: dict[str, dict[str, Any]] = {}
        self._printed: set[str] = set()

    # Tune's hooks -------------------------------------------------------------------------------------
    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        tid = str(trial.trial_id)
        self._last[tid] = dict(result)
        if result.get(RUN_STATUS) is not None or "epoch" not in result or result.get(self.metric) is None:
            return  # the final result of a diverged or failed run carries no score
        runs = self._runs.setdefault(tid, {})
        runs[result.get("repeat", result.get("seed", 0))] = (int(result["epoch"]), float(result[self.metric]))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._print(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._print(trial, error=_trial_error(trial))

    # The line -----------------------------------------------------------------------------------------
    def _print(self, trial: Any, error: str | None) -> None:
        tid = str(trial.trial_id)
        if tid in self._printed:
            return
        self._printed.add(tid)
        print(self.line(trial, error), file=self.stream or sys.stdout, flush=True)

    def line(self, trial: Any, error: str | None = None) -> str:
        """The line of `trial` as it ended (`error`: Tune's reason when it failed)."""
        tid = str(trial.trial_id)
        last = self._last.get(tid) or dict(getattr(trial, "last_result", None) or {})
        config = dict(getattr(trial, "config", None) or {})
        values, label = self._values(config)
        runs = self._runs.get(tid, {})
        if not runs and last.get(RUN_STATUS) is None and last.get("epoch") and last.get(self.metric) is not None:
            runs = {0: (int(last["epoch"]), float(last[self.metric]))}  # its results came before this driver
        epochs = max((e for e, _ in runs.values()), default=0)  # epochs with a score
        target = int(values.get("run.epochs", self.space.train.run.epochs))
        score = sum(m for _, m in runs.values()) / len(runs) if runs else None
        why = self._why(last, error, epochs, target, len(runs))
        if why.startswith((DIVERGED, FAILED)):
            score = None
        return trial_line(tid, self._shown(values, label), self.metric, score, epochs, target, why)

    def _values(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        entry = config.get("entry")
        if isinstance(entry, Mapping):  # a confirmation or ablation trial
            return dict(entry.get("values") or {}), str(entry.get("label") or "")
        from search.sampling import sampled_values

        return sampled_values(config), None

    def _shown(self, values: dict[str, Any], label: str | None) -> str:
        if label is not None:  # its label, and what differs from the baseline
            base = self.space.base_values
            changed = {k: v for k, v in values.items() if k in base and base[k] != v}
            body = " ".join(f"{self.names.get(k, k)}={_value(v)}" for k, v in changed.items())
            return f"{label}: {body}" if body else label
        order = [p for p in self.space.searched_paths if p in values]
        return " ".join(f"{self.names.get(p, p)}={_value(values[p])}" for p in order)

    def _why(self, last: Mapping[str, Any], error: str | None, epochs: int, target: int, seeds: int) -> str:
        status = last.get(RUN_STATUS)
        if error is not None:
            return f"failed: {_one_line(error)}"
        if status == FAILED:
            return f"failed: {_one_line(last.get(RUN_ERROR) or 'error')}"
        if status == DIVERGED:
            reason = _one_line(last.get(RUN_ERROR) or "")
            return f"diverged: {reason.removeprefix('diverged:').strip()}" if reason else DIVERGED
        if epochs >= target:
            return f"done (mean of {seeds} seeds)" if seeds > 1 else "done"
        if self.space.experiment.scheduler.kind == "asha":
            return "stopped early by ASHA"
        return "stopped early"


def _trial_error(trial: Any) -> str:
    """The one-line reason of a trial Tune gave up on: from its error files on this machine
    (Tune writes them there first, then copies them to the experiment), else from storage."""

    def local_pickled() -> BaseException | None:
        path = getattr(trial, "pickled_error_file", None)
        if not path or not os.path.isfile(path):
            return None
        from ray import cloudpickle

        with open(path, "rb") as f:
            return cloudpickle.load(f)

    def local_text() -> BaseException | None:
        path = getattr(trial, "error_file", None)
        if not path or not os.path.isfile(path):
            return None
        with open(path) as f:
            return RuntimeError(f.read())

    for read in (local_pickled, getattr(trial, "get_pickled_error", None), local_text,
                 getattr(trial, "get_error", None)):
        try:
            err = read() if read is not None else None
        except Exception:  # noqa: BLE001, S112 - an unreadable error file: try the next form
            continue
        if err is not None:
            line = error_line(err)
            return line.removeprefix("RuntimeError: ") if read is local_text else line
    path = getattr(trial, "error_file", None)
    return f"see {path}" if path else "error"
