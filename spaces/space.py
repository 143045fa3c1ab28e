"""The search space model: experiment settings, the base `TrainConfig`, and the
distributions over its key paths. Data only: no Ray, no Optuna, no torch."""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spaces.distributions import Distribution
from trainable.config import LEAF_PATHS, ConfigError, TrainConfig
from trainable.config_io import nearest_path, set_path, validate_config

__all__ = [
    "METRICS",
    "ConfirmSettings",
    "ExperimentSettings",
    "SamplerSettings",
    "SchedulerSettings",
    "Space",
    "SpaceError",
    "dependency_order",
]

METRICS: dict[str, Literal["max", "min"]] = {
    "val_acc": "max",
    "val_acc5": "max",
    "val_loss": "min",
    "train_loss": "min",
}
"""The metrics a training run reports, with the direction in which they improve."""

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")


class SpaceError(ConfigError):
    """A user error in a space file: the message is one line, ready to print."""


# Experiment settings --------------------------------------------------------------------------
class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SchedulerSettings(_Settings):
    kind: Literal["asha", "fifo"] = "asha"
    """`asha`: stop poor trials early (max_t = train.run.epochs); `fifo`: run every trial to the end."""
    grace_period: int = Field(1, ge=1)
    """ASHA: epochs every trial runs before it can be stopped."""
    reduction_factor: float = Field(3, gt=1)
    """ASHA: 1 in reduction_factor trials goes on at each rung."""
    schedule: Literal["rung", "plain"] = "rung"
    """ASHA: `rung`: a trial's cosine LR reaches its floor at every rung and re-warms when the
    trial goes on, so rungs compare annealed models; `plain`: one cosine over train.run.epochs,
    so a rung sees each trial at a high LR."""
    audit: float = Field(0.25, ge=0.0, le=1.0)
    """ASHA: this fraction of the trials ASHA stops run to the end anyway, to measure how well
    a rung's ranking predicts the final one (rank correlation per rung in the report)."""

    def rungs(self, max_t: int) -> list[int]:
        """The epochs below max_t at which ASHA compares trials. Its milestones are
        grace_period * reduction_factor**k, as many as Ray's ASHA makes for max_t, and it
        compares a trial at the first epoch it reports at or after a milestone: a fractional
        milestone (grace 2, factor 2.5: 12.5) is compared at its ceiling (epoch 13), so that
        is the rung, and where the rung schedule re-warms the LR."""
        if self.kind != "asha":
            return []
        rf, grace = self.reduction_factor, self.grace_period
        count = int(math.log(max_t / grace) / math.log(rf) + 1)  # as Ray's ASHA bracket (s = 0) counts them
        return sorted({e for e in (math.ceil(grace * rf**k) for k in range(max(count, 0))) if e < max_t})


class ConfirmSettings(_Settings):
    top_k: int = Field(3, ge=1, le=20)
    """The best distinct configs of the search that are confirmed (besides the baseline)."""
    seeds: int = Field(3, ge=1, le=100)
    """Seeds per config, the same for every config (paired); 1 leaves the answer unconfirmed."""
    first_seed: int = Field(1000, ge=0)
    """Confirmation seeds are first_seed, first_seed + 1, ...: apart from the search's seed."""
    racing: bool = False
    """Seeds in rounds: every config on the first two seeds, then one more seed per round
    for the configs not yet shown worse than the best (paired 95% CI), until one candidate
    is left and its difference to the baseline is clear, or `seeds` is reached. The baseline
    always runs every round. Off: every config on every seed."""


class SamplerSettings(_Settings):
    kind: Literal["tpe", "random"] = "tpe"
    seed: int | None = 0
    """null: a different sequence every run."""
    n_startup_trials: int = Field(10, ge=0)
    """TPE: trials sampled at random before the model of good and bad trials is used."""


class ExperimentSettings(_Settings):
    name: str
    """The experiment folder's name: <storage_path>/<name>."""
    metric: str = "val_acc"
    """What ASHA and the sampler optimise; one of METRICS."""
    mode: Literal["max", "min"] | None = None
    """Whether the metric is better high or low; default: the metric's own direction."""
    num_samples: int = Field(12, ge=1)
    """Trials in the study."""
    max_concurrent_trials: int | None = Field(None, ge=1)
    """null: as many as the cluster fits."""
    max_failures: int = Field(0, ge=-1)
    """Retries of a failed trial from its last checkpoint (-1: forever)."""
    scheduler: SchedulerSettings = SchedulerSettings()
    sampler: SamplerSettings = SamplerSettings()
    confirm: ConfirmSettings | None = ConfirmSettings()
    """After the search: the top_k configs and the baseline trained on the same seeds at
    the full budget; null: no confirmation (the answer then rests on one seed)."""
    ablate: bool = True
    """After the confirmation: the winner with one trick at a time reset to its base value,
    on the same seeds (what each trick contributed)."""
    storage_path: str = Field("~/trick-search", min_length=1)
    """A local folder or a URI (s3://, gs://) that every node of the cluster can reach."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise ValueError(
                f"{name!r} is not a safe folder name (letters, digits, '.', '_', '-' only)"
            )
        return name

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric not in METRICS:
            near = difflib.get_close_matches(metric, list(METRICS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(
                f"{metric!r} is not a metric the run reports{hint} (valid: {', '.join(METRICS)})"
            )
        return metric

    @field_validator("mode", mode="before")
    @classmethod
    def _known_mode(cls, mode: Any) -> Any:
        if mode is not None and mode not in ("max", "min"):
            raise ValueError(f"must be max or min (got {mode!r})")
        return mode

    @model_validator(mode="after")
    def _mode_matches_metric(self) -> ExperimentSettings:
        natural = METRICS[self.metric]
        if self.mode is None:
            self.mode = natural
        elif self.mode != natural:
            raise ValueError(
                f"experiment.mode {self.mode!r} would pick the worst trials: "
                f"{self.metric} is better when {'higher' if natural == 'max' else 'lower'} "
                f"(use mode: {natural}, or leave mode out)"
            )
        return self


# The space -------------------------------------------------------------------------------------
class Space(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: ExperimentSettings
    train: TrainConfig
    """The base config: every trial starts from it."""
    search: dict[str, Distribution]
    """Searched key paths, in file order."""
    source: str
    """The space file's path."""
    sha256: str
    """Of the file's text as read, before the --set overrides."""
    overrides: list[str] = []
    """The --set overrides applied after reading the file."""
    production: dict[str, Any] = {}
    """TrainConfig key paths set at export, for the production run (run.epochs, data.subset, ...)."""

    @property
    def searched_paths(self) -> list[str]:
        """The searched key paths, every `when` key before the keys that depend on it
        (otherwise in file order)."""
        return dependency_order(self.search)

    @property
    def confirmed(self) -> bool:
        """Whether the search ends with a confirmation on several seeds."""
        c = self.experiment.confirm
        return c is not None and c.seeds > 1

    @property
    def base_values(self) -> dict[str, Any]:
        """Every searched key's value in the base config (the train section): the baseline."""
        data = self.train.model_dump()
        out = {}
        for path in self.searched_paths:
            node: Any = data
            for part in path.split("."):
                node = node[part]
            out[path] = node
        return out

    @property
    def tricks(self) -> dict[str, list[str]]:
        """The tricks: each searched key without a `when`, with the keys sampled only under
        it (directly or through another such key), e.g. mix.mode: [mix.mixup_alpha, ...]."""
        out: dict[str, list[str]] = {}
        for path in self.searched_paths:
            roots = self._roots(path)
            for root in roots:
                out.setdefault(root, [])
                if root != path:
                    out[root].append(path)
        return out

    @property
    def confirm_seeds(self) -> list[int]:
        """The seeds of the confirmation and the ablation (paired: the same for every config),
        apart from the search's seed; [] without a confirmation."""
        c = self.experiment.confirm
        return [c.first_seed + i for i in range(c.seeds)] if c else []

    def full_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """Every searched key's value in a trial: sampled, or the base value where not sampled."""
        return {**self.base_values, **{k: v for k, v in values.items() if k in self.search}}

    def active_values(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The searched keys a config with these (full) values uses, with their values: a key
        under `when` is left out when its condition does not hold (cutmix_alpha in a mixup
        config), as the sampler would not have drawn it."""
        base, used = self.base_values, {}
        for path in self.searched_paths:
            if self.search[path].active(used):
                used[path] = values.get(path, base[path])
        return used

    def changed_tricks(self, values: Mapping[str, Any]) -> list[str]:
        """The tricks (searched keys without `when`, with their children) whose value differs
        from the base in `values` (full values)."""
        base = self.base_values
        return [t for t, children in self.tricks.items()
                if any(values.get(k, base[k]) != base[k] for k in (t, *children))]

    def _roots(self, path: str) -> list[str]:
        when = self.search[path].when
        if not when:
            return [path]
        return sorted({r for key in when if key in self.search for r in self._roots(key)})

    def rung_epochs(self) -> list[int]:
        """The epochs at which ASHA compares trials (below train.run.epochs)."""
        return self.experiment.scheduler.rungs(self.train.run.epochs)

    def trial_config(self, values: Mapping[str, Any]) -> TrainConfig:
        """A search trial's config: the sampled values on the base, and with the `rung`
        schedule, the cosine restarted at every rung."""
        cfg = self.config_for(values)
        s = self.experiment.scheduler
        if s.kind == "asha" and s.schedule == "rung" and cfg.schedule.name == "cosine":
            data = cfg.model_dump()
            data["schedule"]["restarts"] = self.rung_epochs()
            cfg = validate_config(data, f"{self.source} (rung schedule)")
        return cfg

    def confirm_config(self, values: Mapping[str, Any], seed: int | None = None) -> TrainConfig:
        """A confirmation run's config: the values on the base, one cosine over the whole run,
        trained on `seed`, or without one on every confirmation seed one after another
        (`run.repeats`)."""
        c = self.experiment.confirm or ConfirmSettings(seeds=1)
        data = self.config_for(values).model_dump()
        if seed is None:
            data["run"]["seed"], data["run"]["repeats"] = c.first_seed, c.seeds
        else:
            data["run"]["seed"], data["run"]["repeats"] = seed, 1
        return validate_config(data, f"{self.source} (confirmation)")

    def production_config(self, cfg: TrainConfig) -> tuple[TrainConfig, list[str]]:
        """`cfg` made ready for production: the `production` section applied, and without one
        for data.subset, the whole training set; with one line per key that changed or that
        was kept from the search budget."""
        data = cfg.model_dump()
        prod = dict(self.production)
        lines = []
        if "data.subset" not in prod and cfg.data.subset < 1.0:
            prod["data.subset"] = 1.0
        for path, value in prod.items():
            node: Any = data
            for part in path.split(".")[:-1]:
                node = node[part]
            old = node[path.split(".")[-1]]
            set_path(data, path, value)
            if old != value:
                lines.append(f"{path}: {old} -> {value} (production)")
        data["run"]["repeats"] = 1
        if "run.epochs" not in prod:
            lines.append(f"run.epochs: {cfg.run.epochs} kept from the search budget "
                         "(add production: {run.epochs: N} to the space to change it)")
        return validate_config(data, f"{self.source} (production)"), lines

    def config_for(self, values: Mapping[str, Any]) -> TrainConfig:
        """The base config with sampled values (dotted key paths) set, validated."""
        data = self.train.model_dump()
        for path, value in values.items():
            if path not in LEAF_PATHS:
                near = nearest_path(path)
                hint = f"; did you mean {near!r}?" if near else ""
                raise ConfigError(f"{self.source}: sampled value for unknown key path {path!r}{hint}")
            set_path(data, path, value)
        return validate_config(data, f"{self.source} (sampled {dict(values)})")


def dependency_order(search: Mapping[str, Distribution]) -> list[str]:
    """Stable topological order: repeatedly take the first key (in file order) whose
    conditions are all placed. Keys in a cycle (rejected by load_space) go last."""
    remaining = list(search)
    placed: list[str] = []
    done: set[str] = set()
    while remaining:
        for path in remaining:
            if all(k in done or k not in search for k in search[path].when):
                break
        else:
            placed.extend(remaining)
            break
        remaining.remove(path)
        placed.append(path)
        done.add(path)
    return placed
