"""The distributions of a search space: `{choice: [...]}`, `{uniform: [lo, hi]}`,
`{loguniform: [lo, hi]}`, `{int: [lo, hi]}`, with an optional `step` (uniform, int) and an
optional `when: {other.key: value-or-list}` condition; and their parser, whose errors are
one line each."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from trainable.config import ConfigError

__all__ = ["DISTRIBUTION_KINDS", "Distribution", "Fail", "describe", "parse_distribution"]

DISTRIBUTION_KINDS = ("choice", "uniform", "loguniform", "int")

Fail = Callable[[str, str], ConfigError]
"""`fail(key_path, message)`: the one-line error to raise, naming the file."""


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

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def parse_distribution(raw: Any, where: str, fail: Fail) -> Distribution:
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


def _parse_when(raw: Any, where: str, fail: Fail) -> dict[str, list[Any]]:
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


def describe(dist: Distribution) -> str:
    if dist.kind == "choice":
        return f"a choice of {dist.values}"
    step = f" step {dist.step}" if dist.step is not None else ""
    cont = "" if dist.kind == "int" or dist.step is not None else " (continuous: no single value is ever drawn)"
    return f"{dist.kind} [{dist.low}, {dist.high}]{step}{cont}"
