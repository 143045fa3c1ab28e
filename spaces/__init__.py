"""Search spaces: one YAML file, three sections, validated completely before a search starts.

```yaml
experiment:            # how the search runs (ExperimentSettings)
  name: quickstart
  metric: val_acc
  ...
train:                 # the base TrainConfig: any subset, defaults fill the rest
  ...
search:                # distributions over TrainConfig key paths, in dependency order
  mix.mode: {choice: [none, mixup, cutmix, mixup_cutmix]}
  mix.mixup_alpha: {uniform: [0.1, 0.4], when: {mix.mode: [mixup, mixup_cutmix]}}
```

A distribution is exactly one of `{choice: [...]}`, `{uniform: [lo, hi]}`,
`{loguniform: [lo, hi]}`, `{int: [lo, hi]}`, with an optional `step` (uniform, int) and an
optional `when: {other.key: value-or-list}`: the key is sampled only in trials where every
listed key was itself sampled with one of the listed values; otherwise the trial keeps the
base value from `train`.

This module is data plus its loader: it knows nothing of Ray or Optuna.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainable.config import (
    LEAF_PATHS,
    ConfigError,
    TrainConfig,
    check_accumulation,
    explain,
    nearest_path,
    parse_override,
    read_yaml,
    set_path,
    validate_config,
)

__all__ = [
    "DISTRIBUTION_KINDS",
    "METRICS",
    "QUICKSTART",
    "Distribution",
    "ExperimentSettings",
    "SamplerSettings",
    "SchedulerSettings",
    "Space",
    "SpaceError",
    "list_spaces",
    "load_space",
    "resolve_space_path",
]

SPACES_DIR = Path(__file__).resolve().parent
QUICKSTART: Path = SPACES_DIR / "quickstart.yaml"
"""The packaged default space: a small real search that runs on a laptop CPU."""

METRICS: dict[str, Literal["max", "min"]] = {
    "val_acc": "max",
    "val_acc5": "max",
    "val_loss": "min",
    "train_loss": "min",
}
"""The metrics a training run reports, with the direction in which they improve."""

DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "int")
SECTIONS = ("experiment", "train", "search")
_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_COMBINATIONS = 1_000_000


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

    @property
    def storage_uri(self) -> str:
        """storage_path with `~` expanded and a local folder made absolute; URIs as given."""
        if "://" in self.storage_path:
            return self.storage_path.rstrip("/")
        return str(Path(os.path.expanduser(self.storage_path)).absolute())

    @property
    def experiment_dir(self) -> str:
        """<storage_path>/<name>: Tune state, TensorBoard events, optuna.db, checkpoints."""
        return f"{self.storage_uri}/{self.name}"


# Distributions -------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from 0 and 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _on_grid(value: float, low: float, step: float) -> bool:
    k = (value - low) / step
    return abs(k - round(k)) < 1e-9 * max(1.0, abs(k))


class Distribution(BaseModel):
    """One searched key: `choice` (values), or `uniform`/`loguniform`/`int` (low, high, step)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["choice", "uniform", "loguniform", "int"]
    values: list[Any] | None = None
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    when: dict[str, list[Any]] = {}
    """All listed keys must have been sampled with one of the listed values."""

    def active(self, sampled: Mapping[str, Any]) -> bool:
        """Whether this key is sampled, given the values sampled so far in the trial
        (a condition on a key that was not sampled does not hold)."""
        return all(
            key in sampled and any(_same(sampled[key], v) for v in allowed)
            for key, allowed in self.when.items()
        )

    def possible(self, value: Any) -> bool:
        """Whether a sample of this distribution can equal value (with non-zero probability)."""
        if self.kind == "choice":
            return any(_same(value, v) for v in self.values or [])
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        assert self.low is not None and self.high is not None
        if not self.low <= value <= self.high:
            return False
        if self.kind == "int":
            return float(value).is_integer() and _on_grid(value, self.low, self.step or 1)
        # a continuous key hits one exact value with probability zero
        return self.step is not None and _on_grid(value, self.low, self.step)

    def edge_values(self) -> list[Any]:
        """The values that bound what this distribution can give: every choice, or both bounds."""
        if self.kind == "choice":
            return list(self.values or [])
        return [self.low, self.high]

    def all_values(self, limit: int) -> list[Any] | None:
        """Every value it can give, when finite and at most limit of them; else None."""
        if self.kind == "choice":
            return list(self.values or [])
        if self.kind == "int":
            step = int(self.step or 1)
            n = (int(self.high) - int(self.low)) // step + 1
            return list(range(int(self.low), int(self.high) + 1, step)) if n <= limit else None
        return None

    def to_yaml_obj(self) -> dict[str, Any]:
        """The distribution as written in a space file."""
        out: dict[str, Any] = {
            self.kind: list(self.values or []) if self.kind == "choice" else [self.low, self.high]
        }
        if self.step is not None:
            out["step"] = self.step
        if self.when:
            out["when"] = {k: list(v) for k, v in self.when.items()}
        return out


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

    @property
    def searched_paths(self) -> list[str]:
        """The searched key paths, every `when` key before the keys that depend on it
        (otherwise in file order)."""
        return _dependency_order(self.search)

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


def _dependency_order(search: Mapping[str, Distribution]) -> list[str]:
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


# Finding space files ---------------------------------------------------------------------------
def list_spaces() -> list[str]:
    """Names of the packaged spaces (usable as `--space <name>`)."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def resolve_space_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A space file path, or a bare name (`quickstart`) meaning the packaged file."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    text = str(name_or_path)
    if os.sep not in text and "/" not in text and not p.suffix:
        packaged = SPACES_DIR / f"{text}.yaml"
        if packaged.is_file():
            return packaged
        near = difflib.get_close_matches(text, list_spaces(), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise SpaceError(
            f"{text}: no such space file or packaged space{hint} "
            f"(packaged: {', '.join(list_spaces())})"
        )
    raise SpaceError(f"{p}: no such file")


# Loading -----------------------------------------------------------------------------------------
def load_space(path: str | os.PathLike[str], overrides: list[str] | None = None) -> Space:
    """Read a space file, apply `--set` overrides, and validate everything; every user
    error is a SpaceError with one line that names the file and the key path.

    Overrides: `experiment.num_samples=4`, `train.run.epochs=2` (dotted paths into the
    file), `search.<key.path>={uniform: [0, 0.1]}` (replaces that key's distribution),
    `search.<key.path>=null` (stops searching it)."""
    p = Path(path)
    src = str(p)
    try:
        data = read_yaml(p)
        text = p.read_text()
    except ConfigError as err:
        raise SpaceError(str(err)) from None
    sha = hashlib.sha256(text.encode()).hexdigest()

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpaceError(
            f"{src}: expected a mapping with sections {', '.join(SECTIONS)}, "
            f"got {type(data).__name__}"
        )
    data = copy.deepcopy(data)
    for item in overrides or []:
        _apply_override(data, item, src)
    return _validate(data, src, sha, list(overrides or []), default_name=p.stem)


def _apply_override(data: dict[str, Any], item: str, src: str) -> None:
    try:
        key, value = parse_override(item)
    except ConfigError as err:
        raise SpaceError(f"{src}: {err}") from None
    if key == "search" or key.startswith("search."):
        path = key[len("search."):]
        if not path:
            raise SpaceError(f"{src}: --set {item!r}: expected search.<key.path>=<distribution or null>")
        search = data.get("search")
        if not isinstance(search, dict):
            search = {}
            data["search"] = search
        if value is None:
            if path not in search:
                raise SpaceError(f"{src}: --set {item!r}: search.{path} is not searched in the file")
            del search[path]
        else:
            search[path] = value
        return
    set_path(data, key, value)


def _validate(data: dict[str, Any], src: str, sha: str, overrides: list[str], default_name: str) -> Space:
    def fail(path: str, msg: str) -> SpaceError:
        return SpaceError(f"{src}: {path}: {msg}" if path else f"{src}: {msg}")

    # sections
    for key in data:
        if key not in SECTIONS:
            near = difflib.get_close_matches(str(key), SECTIONS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise fail(str(key), f"unknown section{hint} (valid: {', '.join(SECTIONS)})")
    for key in SECTIONS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise fail(key, f"expected a mapping, got {type(data[key]).__name__}")

    # experiment
    exp_data = dict(data.get("experiment") or {})
    exp_data.setdefault("name", default_name)
    try:
        experiment = ExperimentSettings.model_validate(exp_data)
    except ValidationError as err:
        raise SpaceError(_explain_settings(err, src)) from None

    # search: structure of each distribution
    raw_search = data.get("search") or {}
    if not raw_search:
        raise fail("search", "empty; list at least one key path to search, e.g. mix.mode: {choice: [none, cutmix]}")
    search: dict[str, Distribution] = {}
    for path, raw in raw_search.items():
        path = str(path)
        _check_key_path(path, fail)
        search[path] = _parse_distribution(raw, f"search.{path}", fail)

    # train: the base config
    raw_train = data.get("train") or {}
    try:
        base = validate_config(raw_train)
    except ConfigError as err:
        raise fail("", _prefix_train(str(err))) from None

    # search: every value in the TrainConfig's range
    base_data = base.model_dump()
    for path, dist in search.items():
        _check_field_kind(path, dist, fail)
        for value in dist.edge_values():
            _check_value(base_data, path, value, fail)

    # search: conditions
    for path, dist in search.items():
        for key, allowed in dist.when.items():
            where = f"search.{path}"
            if key == path:
                raise fail(where, f"when: {key} cannot depend on itself")
            if key not in LEAF_PATHS:
                near = nearest_path(key)
                hint = f"; did you mean {near!r}?" if near else ""
                raise fail(where, f"when: unknown key path {key!r}{hint}")
            if key not in search:
                raise fail(
                    where,
                    f"when: {key} is unsampled (not in the search section); "
                    "a condition can only name a searched key",
                )
            other = search[key]
            for v in allowed:
                if not other.possible(v):
                    raise fail(where, f"when: {key} = {v!r} is impossible: {key} is {_describe(other)}")
    _check_cycles(search, fail)

    _check_accumulation(base, search, fail)

    # scheduler
    epochs = [base.run.epochs]
    if "run.epochs" in search:
        dist = search["run.epochs"]
        epochs = dist.edge_values() + (epochs if dist.when else [])
    if experiment.scheduler.kind == "asha" and experiment.scheduler.grace_period > min(epochs):
        raise fail(
            "experiment.scheduler.grace_period",
            f"{experiment.scheduler.grace_period} is more than train.run.epochs {min(epochs)}; "
            "ASHA could never stop a trial (lower grace_period or raise run.epochs)",
        )

    return Space(
        experiment=experiment, train=base, search=search, source=src, sha256=sha, overrides=overrides
    )


def _explain_settings(err: ValidationError, src: str) -> str:
    e = err.errors(include_url=False)[0]
    loc = tuple(str(p) for p in e["loc"])
    path = ".".join(("experiment", *loc))
    if e["type"] == "extra_forbidden":
        model: type[BaseModel] = ExperimentSettings
        for part in loc[:-1]:
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else model
        prefix = ".".join(("experiment", *loc[:-1]))
        valid = list(model.model_fields)
        near = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{prefix}.{near[0]}'?" if near else ""
        return f"{src}: {path}: unknown key{hint} (valid: {', '.join(valid)})"
    msg = e["msg"]
    for pre in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(pre)
    if e["type"] == "missing":
        msg = "required"
    elif e["type"] != "value_error" and not isinstance(e.get("input"), dict):
        msg = f"{msg} (got {e.get('input')!r})"
    if not loc:  # a whole-model validator: its message names its keys
        return f"{src}: {msg}"
    return f"{src}: {path}: {msg}"


def _prefix_train(msg: str) -> str:
    """explain()'s `path: what` as `train.path: what`."""
    msg = re.sub(r"did you mean '([^']+)'", r"did you mean 'train.\1'", msg)
    head, sep, rest = msg.partition(": ")
    if sep and (head in LEAF_PATHS or head.split(".")[0] in TrainConfig.model_fields):
        return f"train.{head}: {rest}"
    return f"train: {msg}"


def _check_key_path(path: str, fail: Any) -> None:
    if path in LEAF_PATHS:
        return
    section = [p for p in LEAF_PATHS if p.startswith(path + ".")]
    if section:
        keys = ", ".join(section[:4]) + (", ..." if len(section) > 4 else "")
        raise fail(f"search.{path}", f"is a whole section, not a key; search its keys ({keys})")
    near = nearest_path(path)
    hint = f"; did you mean {near!r}?" if near else ""
    raise fail(f"search.{path}", f"unknown key path{hint}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _parse_distribution(raw: Any, where: str, fail: Any) -> Distribution:
    if not isinstance(raw, dict):
        raise fail(
            where,
            f"expected a distribution like {{choice: [a, b]}} or {{uniform: [lo, hi]}}, got {raw!r}",
        )
    kinds = [k for k in raw if k in DISTRIBUTION_KINDS]
    others = [str(k) for k in raw if k not in DISTRIBUTION_KINDS and k not in ("step", "when")]
    if len(kinds) > 1:
        raise fail(where, f"two distribution kinds ({', '.join(kinds)}) in one entry; give exactly one")
    if others:
        near = difflib.get_close_matches(others[0], [*DISTRIBUTION_KINDS, "step", "when"], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        what = "unknown key" if kinds else "unknown distribution kind"
        raise fail(where, f"{what} {others[0]!r}{hint} (valid: {', '.join(DISTRIBUTION_KINDS)}, step, when)")
    if not kinds:
        raise fail(where, f"no distribution kind; give one of {', '.join(DISTRIBUTION_KINDS)}")
    kind = kinds[0]
    arg = raw[kind]
    step = raw.get("step")
    when = _parse_when(raw.get("when"), where, fail)

    if kind == "choice":
        if not isinstance(arg, list):
            raise fail(where, f"choice expects a list of values, got {arg!r}")
        if not arg:
            raise fail(where, "choice is empty; list at least one value")
        for v in arg:
            if v is not None and not isinstance(v, (bool, int, float, str)):
                raise fail(where, f"choice value {v!r} is not a single value (null, bool, number or string)")
        for i, v in enumerate(arg):
            if any(_same(v, w) for w in arg[:i]):
                raise fail(where, f"choice value {v!r} is listed twice")
        if "step" in raw:
            raise fail(where, "step applies to uniform and int only, not to choice")
        return Distribution(kind=kind, values=list(arg), when=when)

    if not (isinstance(arg, list) and len(arg) == 2 and all(_is_number(v) for v in arg)):
        raise fail(where, f"{kind} expects [low, high] numbers, got {arg!r}")
    low, high = arg
    if low >= high:
        raise fail(where, f"{kind} low {low} must be below high {high}")
    if kind == "loguniform":
        if low <= 0:
            raise fail(where, f"loguniform needs low > 0 (got {low})")
        if "step" in raw:
            raise fail(where, "step is not allowed with loguniform (a log scale has no fixed step)")
    if kind == "int" and not all(isinstance(v, int) for v in arg):
        raise fail(where, f"int bounds must be integers (got [{low}, {high}])")
    if "step" in raw:
        if not _is_number(step) or step <= 0:
            raise fail(where, f"step must be a number > 0 (got {step!r})")
        if kind == "int" and not isinstance(step, int):
            raise fail(where, f"int step must be an integer (got {step})")
        if not _on_grid(high, low, step):
            raise fail(where, f"{kind} range [{low}, {high}] is not a whole number of steps of {step}")
    if kind in ("uniform", "loguniform"):
        low, high = float(low), float(high)
        step = float(step) if step is not None else None
    return Distribution(kind=kind, low=low, high=high, step=step, when=when)


def _parse_when(raw: Any, where: str, fail: Any) -> dict[str, list[Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise fail(where, f"when expects a mapping {{other.key: value or [values]}}, got {raw!r}")
    out: dict[str, list[Any]] = {}
    for key, allowed in raw.items():
        allowed = list(allowed) if isinstance(allowed, list) else [allowed]
        if not allowed:
            raise fail(where, f"when: {key} lists no values; the condition could never hold")
        out[str(key)] = allowed
    return out


def _describe(dist: Distribution) -> str:
    if dist.kind == "choice":
        return f"a choice of {dist.values}"
    step = f" step {dist.step}" if dist.step is not None else ""
    cont = "" if dist.kind == "int" or dist.step is not None else " (continuous: no single value is ever drawn)"
    return f"{dist.kind} [{dist.low}, {dist.high}]{step}{cont}"


def _check_cycles(search: Mapping[str, Distribution], fail: Any) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(path: str, trail: list[str]) -> None:
        state[path] = 1
        for dep in search[path].when:
            if state.get(dep) == 1:
                cycle = [*trail[trail.index(dep):], dep] if dep in trail else [path, dep]
                raise fail(f"search.{cycle[0]}", f"when conditions form a cycle: {' -> '.join(cycle)}")
            if state.get(dep) is None:
                visit(dep, [*trail, dep])
        state[path] = 2

    for path in search:
        if path not in state:
            visit(path, [path])


def _field_kind(path: str) -> str:
    """`int`, `float` or `other`: what values the TrainConfig field takes."""
    ann = LEAF_PATHS[path].annotation
    args = getattr(ann, "__args__", None)
    types = set(args) if args and type(None) in args else {ann}
    types.discard(type(None))
    if types == {int}:
        return "int"
    if types == {float}:
        return "float"
    return "other"


def _check_field_kind(path: str, dist: Distribution, fail: Any) -> None:
    field = _field_kind(path)
    where = f"search.{path}"
    if field == "int" and dist.kind in ("uniform", "loguniform"):
        raise fail(where, f"{dist.kind} gives fractional values but {path} takes integers; use int or choice")
    if field == "other" and dist.kind != "choice":
        raise fail(where, f"{dist.kind} gives numbers but {path} is not a number; use choice")


def _check_value(base_data: dict[str, Any], path: str, value: Any, fail: Any) -> None:
    """Validate the base with value set at path, apart from the accumulation rule (which
    _check_accumulation checks over every combination)."""
    data = copy.deepcopy(base_data)
    set_path(data, path, value)
    batch, dist = data["batch"], data["distributed"]
    if path == "batch.global_batch":
        batch["micro_batch"], dist["num_workers"] = 1, 1
    elif path == "batch.micro_batch" and isinstance(value, int) and value >= 1:
        batch["global_batch"] = value * dist["num_workers"]
    elif path == "distributed.num_workers" and isinstance(value, int) and value >= 1:
        batch["global_batch"] = batch["micro_batch"] * value
    try:
        TrainConfig.model_validate(data)
    except ValidationError as err:
        reason = explain(err)
        hint = ""
        if isinstance(value, bool):
            hint = " (YAML reads on/off/yes/no/true/false as booleans; quote the word to mean a string)"
        raise fail(f"search.{path}", f"value {value!r} out of range: {reason}{hint}") from None


def _values_of(base: TrainConfig, search: Mapping[str, Distribution], path: str) -> list[Any] | None:
    """Every value path can take in a trial: the base value when not searched; the
    distribution's values (plus the base value when conditional) when searched."""
    node: Any = base
    for part in path.split("."):
        node = getattr(node, part)
    dist = search.get(path)
    if dist is None:
        return [node]
    values = dist.all_values(limit=_MAX_COMBINATIONS)
    if values is None:
        return None
    return [*values, node] if dist.when else values


def _check_accumulation(base: TrainConfig, search: Mapping[str, Distribution], fail: Any) -> None:
    trio = ("batch.global_batch", "batch.micro_batch", "distributed.num_workers")
    searched = [p for p in trio if p in search]
    if not searched:
        return
    where = f"search.{searched[0]}"
    sets = [_values_of(base, search, p) for p in trio]
    if any(s is None for s in sets) or math.prod(len(s) for s in sets) > _MAX_COMBINATIONS:  # type: ignore[arg-type]
        raise fail(where, "too many batch combinations to check; search these keys with choice")
    for gb, mb, nw in itertools.product(*sets):  # type: ignore[misc]
        try:
            check_accumulation(gb, mb, nw)
        except ValueError as err:
            raise fail(where, f"no accumulation reaches global batch {gb}: {err}") from None
