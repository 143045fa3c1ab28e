"""Config files and their errors: YAML in and out, `--set key.path=value` overrides, and
one-line explanations of validation errors that name the key path.

Shared by `TrainConfig` files (this package) and search-space files (`spaces`). No torch.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from trainable.config import LEAF_PATHS, ConfigError, TrainConfig

__all__ = [
    "allowed_range",
    "apply_overrides",
    "explain",
    "get_path",
    "load_config",
    "nearest_path",
    "parse_override",
    "read_yaml",
    "save_config",
    "set_path",
    "validate_config",
    "write_atomic",
]


# Key paths and error messages -------------------------------------------------------------
def nearest_path(path: str, candidates: list[str] | None = None) -> str | None:
    """The valid key path a misspelt one most likely meant: first by its last part among
    keys of the same section, then among all keys, then by the whole path."""
    cands = candidates if candidates is not None else list(LEAF_PATHS)
    parent, _, leaf = path.rpartition(".")
    same = [c for c in cands if c.rpartition(".")[0] == parent]
    for pool in (same, cands):
        leaves: dict[str, str] = {}
        for c in pool:
            leaves.setdefault(c.rpartition(".")[2], c)
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        if near:
            return leaves[near[0]]
    near = difflib.get_close_matches(path, cands, n=1, cutoff=0.6)
    return near[0] if near else None


def allowed_range(path: str) -> str | None:
    """`0 < value <= 100` from a TrainConfig field's bounds, or None for a field without any."""
    info = LEAF_PATHS.get(path)
    if info is None:
        return None
    lo = hi = ""
    for m in info.metadata:
        if getattr(m, "gt", None) is not None:
            lo = f"{m.gt} < "
        elif getattr(m, "ge", None) is not None:
            lo = f"{m.ge} <= "
        elif getattr(m, "lt", None) is not None:
            hi = f" < {m.lt}"
        elif getattr(m, "le", None) is not None:
            hi = f" <= {m.le}"
    return f"{lo}value{hi}" if lo or hi else None


def _section_paths(model: type[BaseModel], loc: tuple[str, ...]) -> list[str]:
    """Valid keys at the level of `loc` (for 'did you mean')."""
    for part in loc[:-1]:
        info = model.model_fields.get(part)
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return []
        model = info.annotation
    prefix = "".join(f"{p}." for p in loc[:-1])
    return [prefix + k for k in model.model_fields]


def explain(
    err: ValidationError, source: str | None = None, model: type[BaseModel] = TrainConfig, prefix: str = ""
) -> str:
    """One line for the first error of a ValidationError of `model`, naming the key path
    (written under `prefix`, e.g. `experiment`, when the model is a section of a file)."""
    e = err.errors(include_url=False)[0]
    loc = tuple(str(p) for p in e["loc"])
    shown = lambda p: f"{prefix}.{p}" if prefix and p else (p or prefix)  # noqa: E731
    path = shown(".".join(loc))
    where = f"{source}: " if source else ""
    if e["type"] == "extra_forbidden":
        siblings = _section_paths(model, loc)
        near = nearest_path(".".join(loc), siblings)
        if near:
            return f"{where}{path}: unknown key; did you mean {shown(near)!r}?"
        valid = ", ".join(s.rpartition(".")[2] for s in siblings)
        return f"{where}{path}: unknown key (valid: {valid})"
    msg = e["msg"]
    for pre in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(pre)
    got = e.get("input")
    if e["type"] == "missing":
        msg = "required"
    elif loc and e["type"] != "value_error" and not isinstance(got, dict):
        allowed = allowed_range(".".join(loc)) if model is TrainConfig else None
        msg = f"{msg} (got {got!r}); allowed: {allowed}" if allowed else f"{msg} (got {got!r})"
    if not loc or msg.startswith(path + "."):  # a model's own validator names its keys itself
        return f"{where}{msg}"
    return f"{where}{path}: {msg}"


def validate_config(data: Any, source: str | None = None) -> TrainConfig:
    """A TrainConfig from plain data, or a ConfigError with one line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(explain(err, source)) from None


# Overrides ----------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` with the value read as YAML (`run.epochs=2`, `mix.mode=cutmix`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating the levels that are missing."""
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
    return data


# Files ---------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}:{where}: {problem}") from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """Read a TrainConfig YAML file (an exported best.yaml too: its `provenance` block is
    kept aside) and apply `key.path=value` overrides."""
    data = read_yaml(path)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "provenance"}
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    return validate_config(data, str(path))


def write_atomic(path: str | os.PathLike[str], text: str, overwrite: bool = False) -> Path:
    """Write text to path through a temporary file and a rename; refuse to replace an
    existing file unless overwrite is set."""
    p = Path(path)
    exists = f"{p}: already exists; choose another path (nothing was overwritten)"
    if p.exists() and not overwrite:
        raise ConfigError(exists)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if p appeared meanwhile
            except FileExistsError:
                raise ConfigError(exists) from None
            except OSError:  # a filesystem without hard links
                if p.exists():
                    raise ConfigError(exists) from None
                os.replace(tmp, p)
            if os.path.exists(tmp):
                os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def save_config(cfg: TrainConfig, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    return write_atomic(path, cfg.to_yaml(), overwrite=overwrite)
