"""Reading a space file: find it, apply `--set` overrides, validate every section, and
return a `Space`; every user error is a one-line `SpaceError` naming the file and key path."""

from __future__ import annotations

import copy
import difflib
import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from spaces.distributions import Distribution, Fail, describe, parse_distribution
from spaces.space import ExperimentSettings, Space, SpaceError
from trainable.config import LEAF_PATHS, ConfigError, TrainConfig, check_accumulation
from trainable.config_io import explain, nearest_path, parse_override, read_yaml, set_path, validate_config

__all__ = ["QUICKSTART", "SPACES_DIR", "list_spaces", "load_space", "resolve_space_path"]

logger = logging.getLogger(__name__)

SPACES_DIR = Path(__file__).resolve().parent
QUICKSTART: Path = SPACES_DIR / "quickstart.yaml"
"""The packaged default space: a small real search that runs on a laptop CPU."""

SECTIONS = ("experiment", "train", "search", "production")
_MAX_COMBINATIONS = 1_000_000


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
        raise SpaceError(explain(err, src, model=ExperimentSettings, prefix="experiment")) from None

    # search: structure of each distribution
    raw_search = data.get("search") or {}
    if not raw_search:
        raise fail("search", "empty; list at least one key path to search, e.g. mix.mode: {choice: [none, cutmix]}")
    search: dict[str, Distribution] = {}
    for path, raw in raw_search.items():
        path = str(path)
        _check_key_path(path, fail)
        search[path] = parse_distribution(raw, f"search.{path}", fail)

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
                    raise fail(where, f"when: {key} = {v!r} is impossible: {key} is {describe(other)}")
    _check_cycles(search, fail)

    _check_accumulation(base, search, fail)

    # scheduler
    if "run.epochs" in search:
        raise fail(
            "search.run.epochs",
            "cannot be searched: every trial's score is its metric after train.run.epochs (ASHA's "
            "max_t and the confirmation budget); set it in the train section",
        )
    sched = experiment.scheduler
    if sched.kind == "asha" and sched.grace_period > base.run.epochs:
        raise fail(
            "experiment.scheduler.grace_period",
            f"{sched.grace_period} is more than train.run.epochs {base.run.epochs}; "
            "ASHA could never stop a trial (lower grace_period or raise run.epochs)",
        )
    if sched.kind == "asha" and base.run.val_every > 1:
        raise fail(
            "train.run.val_every",
            f"{base.run.val_every} with ASHA: a rung would compare stale scores; use 1 or scheduler kind fifo",
        )
    _check_rung_schedule(experiment, base, search, fail, src)

    production = _production(data.get("production") or {}, base, fail)
    return Space(
        experiment=experiment, train=base, search=search, source=src, sha256=sha, overrides=overrides,
        production=production,
    )


def _check_rung_schedule(
    experiment: ExperimentSettings, base: TrainConfig, search: dict[str, Distribution], fail: Fail, src: str
) -> None:
    """ASHA's rungs and the LR schedule. The `rung` schedule restarts a cosine at every rung,
    each warmed up over the configured train.schedule.warmup_epochs (the largest searched
    value when it is searched), as production warms up: a warmup longer than one of its
    cosines is refused, one as long as the first ends at the first rung (a warning); a `step`
    schedule is not annealed at rungs and is refused. With `plain`, a warning when the first
    rung falls inside the warmup."""
    sched = experiment.scheduler
    if sched.kind != "asha":
        return
    names = {base.schedule.name, *(search["schedule.name"].values if "schedule.name" in search else [])}
    warmup = max([base.schedule.warmup_epochs,
                  *(search["schedule.warmup_epochs"].edge_values() if "schedule.warmup_epochs" in search else [])])
    if sched.schedule == "rung" and "step" in names:
        raise fail(
            "experiment.scheduler.schedule",
            "rung anneals a cosine LR at every rung, and train.schedule.name step is not annealed at rungs; "
            "use train.schedule.name cosine or experiment.scheduler.schedule plain",
        )
    rungs = sched.rungs(base.run.epochs)
    if sched.schedule == "rung" and rungs:
        ends = [0, *rungs, base.run.epochs]
        start, end = min(zip(ends, ends[1:]), key=lambda c: c[1] - c[0])
        if warmup > end - start:
            raise fail(
                "train.schedule.warmup_epochs",
                f"{warmup:g} is longer than the rung schedule's cosine from epoch {start} to {end} "
                f"(rungs {rungs}, train.run.epochs {base.run.epochs}): it would never anneal; lower "
                f"warmup_epochs to at most {end - start}, raise experiment.scheduler.grace_period, or use "
                "experiment.scheduler.schedule plain",
            )
    if warmup >= sched.grace_period:
        where, how = (("ends with", "at their peak LR, before their cosine anneals") if sched.schedule == "rung"
                      else ("ends inside", "before they trained at full LR"))
        logger.warning(
            "%s: warning: experiment.scheduler.grace_period %d %s the LR warmup (train.schedule.warmup_epochs %g): "
            "the first rung compares trials %s", src, sched.grace_period, where, warmup, how,
        )


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in LEAF_PATHS:
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _production(raw: Mapping[str, Any], base: TrainConfig, fail: Fail) -> dict[str, Any]:
    """The production section as key path -> value (nested or dotted keys), each checked on the base."""
    flat = _flatten(raw)
    data = base.model_dump()
    for path, value in flat.items():
        if path not in LEAF_PATHS:
            near = nearest_path(path)
            hint = f"; did you mean {near!r}?" if near else ""
            raise fail(f"production.{path}", f"unknown key path{hint}")
        set_path(data, path, value)
    try:
        validate_config(data)
    except ConfigError as err:
        raise fail("", "production: " + str(err)) from None
    return flat


def _is_key_path(path: str) -> bool:
    return path in LEAF_PATHS or any(p.startswith(path + ".") for p in LEAF_PATHS)


def _prefix_train(msg: str) -> str:
    """explain()'s `path: what` as `train.path: what`."""
    msg = re.sub(
        r"did you mean '([^']+)'",
        lambda m: f"did you mean 'train.{m[1]}'" if _is_key_path(m[1]) else m[0],  # not a model's name
        msg,
    )
    head, sep, rest = msg.partition(": ")
    if sep and (head in LEAF_PATHS or head.split(".")[0] in TrainConfig.model_fields):
        return f"train.{head}: {rest}"
    return f"train: {msg}"


def _check_key_path(path: str, fail: Fail) -> None:
    if path in LEAF_PATHS:
        return
    section = [p for p in LEAF_PATHS if p.startswith(path + ".")]
    if section:
        keys = ", ".join(section[:4]) + (", ..." if len(section) > 4 else "")
        raise fail(f"search.{path}", f"is a whole section, not a key; search its keys ({keys})")
    near = nearest_path(path)
    hint = f"; did you mean {near!r}?" if near else ""
    raise fail(f"search.{path}", f"unknown key path{hint}")


def _check_cycles(search: Mapping[str, Distribution], fail: Fail) -> None:
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


def _check_field_kind(path: str, dist: Distribution, fail: Fail) -> None:
    field = _field_kind(path)
    where = f"search.{path}"
    if field == "int" and dist.kind in ("uniform", "loguniform"):
        raise fail(where, f"{dist.kind} gives fractional values but {path} takes integers; use int or choice")
    if field == "other" and dist.kind != "choice":
        raise fail(where, f"{dist.kind} gives numbers but {path} is not a number; use choice")


def _check_value(base_data: dict[str, Any], path: str, value: Any, fail: Fail) -> None:
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
        batch["global_batch"] = (batch["micro_batch"] if batch["micro_batch"] != "auto" else 1) * value
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


def _check_accumulation(base: TrainConfig, search: Mapping[str, Distribution], fail: Fail) -> None:
    trio = ("batch.global_batch", "batch.micro_batch", "distributed.num_workers")
    searched = [p for p in trio if p in search]
    if not searched:
        return
    where = f"search.{searched[0]}"
    sets = [_values_of(base, search, p) for p in trio]
    if any(s is None for s in sets) or math.prod(len(s) for s in sets) > _MAX_COMBINATIONS:  # type: ignore[arg-type]
        raise fail(where, "too many batch combinations to check; search these keys with choice")
    from trainable.feasibility import reachable  # here: it reads data folders, which loading a space never needs

    # only the combinations a trial can have: a key sampled under `when` keeps its base value elsewhere
    for gb, mb, nw in reachable(base, search, trio, lambda p: search[p].all_values(limit=_MAX_COMBINATIONS) or []):
        try:
            check_accumulation(gb, mb, nw)
        except ValueError as err:
            raise fail(where, f"no accumulation reaches global batch {gb}: {err}") from None
