"""From a validated Space to Optuna: a define-by-run function and a sampler.

Ray Tune's `OptunaSearch(space=define_by_run(space), sampler=make_sampler(space))` calls
the function on each new Optuna trial and hands the suggested params to Tune as the
trial's config; `sampled_values(config)` turns that config back into TrainConfig key paths
for `Space.config_for`. No Ray here.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import optuna
from optuna.exceptions import ExperimentalWarning

from spaces import Distribution, Space
from trainable.config import LEAF_PATHS

__all__ = ["DefineByRun", "define_by_run", "make_sampler", "sampled_values", "suggest"]


def suggest(trial: optuna.Trial, path: str, dist: Distribution) -> Any:
    """Suggest one value of dist under the param name path (the TrainConfig key path)."""
    if dist.kind == "choice":
        return trial.suggest_categorical(path, list(dist.values or []))
    if dist.kind == "uniform":
        return trial.suggest_float(path, float(dist.low), float(dist.high), step=dist.step)  # type: ignore[arg-type]
    if dist.kind == "loguniform":
        return trial.suggest_float(path, float(dist.low), float(dist.high), log=True)  # type: ignore[arg-type]
    if dist.kind == "int":
        return trial.suggest_int(path, int(dist.low), int(dist.high), step=int(dist.step or 1))  # type: ignore[arg-type]
    raise AssertionError(f"unknown distribution kind {dist.kind!r}")


class DefineByRun:
    """The define-by-run function of a space: a picklable callable (Ray's OptunaSearch
    pickles its space when it saves the searcher's state)."""

    def __init__(self, space: Space) -> None:
        self.space = space
        self.order = space.searched_paths

    def __call__(self, trial: optuna.Trial) -> None:
        sampled: dict[str, Any] = {}
        for path in self.order:
            dist = self.space.search[path]
            if dist.active(sampled):
                sampled[path] = suggest(trial, path, dist)
        return None  # OptunaSearch then uses the suggested params as the Tune config

    def __repr__(self) -> str:
        return f"DefineByRun({self.space.source!r}: {', '.join(self.order)})"


def define_by_run(space: Space) -> Callable[[optuna.Trial], None]:
    """Suggests each searched key path in dependency order (param name = key path), a
    conditional key only when its `when` holds for the values suggested so far."""
    return DefineByRun(space)


def sampled_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """{key.path: value} from a Tune trial config made by OptunaSearch.

    OptunaSearch returns `unflatten_dict(optuna_params)` (delimiter "/"), so with our
    param names the config is flat (`{"mix.mode": "cutmix"}`); a param named with "/"
    would come back nested (`{"mix": {"mode": ...}}`). Both are accepted: nested levels
    are joined with ".", "/" read as ".". Keys that are not TrainConfig key paths
    (anything else the caller put into the Tune config) are left out."""
    out: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            path = prefix + str(key).replace("/", ".")
            if isinstance(value, Mapping) and path not in LEAF_PATHS:
                walk(value, path + ".")
            elif path in LEAF_PATHS:
                out[path] = value

    walk(params, "")
    return out


def make_sampler(space: Space) -> optuna.samplers.BaseSampler:
    """The Optuna sampler of experiment.sampler: TPE (multivariate, grouped so that
    conditional keys are modelled together with the keys they depend on) or random."""
    settings = space.experiment.sampler
    if settings.kind == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=settings.seed,
            n_startup_trials=settings.n_startup_trials,
            multivariate=True,
            group=True,
        )
