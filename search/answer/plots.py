"""The report's plots, one small function each: `plot(answer, path) -> bool` draws from the
answer dict of `search.answer.build.build_answer` and writes a PNG at `path`, or writes nothing and
returns False when there is no data to draw. The caller selects the Agg backend."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

__all__ = ["PLOTS", "plot_ablation", "plot_confirm", "plot_curves", "plot_rungs", "rung_points"]

MAX_CATEGORIES = 6  # a numeric trick with more distinct values is coloured on a scale


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scale(answer: dict[str, Any]) -> tuple[float, str]:
    """Accuracies are drawn in %, differences of accuracies in pp; losses as they are."""
    metric = answer.get("metric") or "metric"
    return (100.0, f"{metric} (%)") if "acc" in metric else (1.0, metric)


def _save(fig: Any, path: Path) -> None:
    """Write the figure through a temporary file and a rename (a reader never sees half a PNG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def plot_curves(answer: dict[str, Any], path: Path) -> bool:
    """Learning curves of the search trials, one panel per trick, coloured by its value;
    audited trials dashed."""
    trials = [t for t in answer.get("trials") or [] if t.get("phase") == "search" and t.get("curve")]
    tricks = list(answer.get("tricks") or {}) or list(answer.get("searched_keys") or [])
    if not trials or not tricks:
        return False
    k, (scale, ylabel) = len(tricks), _scale(answer)
    cols = min(3, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, trick in zip(axes.flat, tricks):
        values = [(t.get("values") or {}).get(trick) for t in trials]
        numeric = [v for v in values if _ok(v)]
        scaled = len(numeric) == len(values) and len(set(numeric)) > MAX_CATEGORIES
        if scaled:
            lo, hi = min(numeric), max(numeric)
            cmap = plt.get_cmap("viridis")
            colour = {v: cmap((v - lo) / (hi - lo) if hi > lo else 0.5) for v in numeric}
        else:
            cats = list(dict.fromkeys("unset" if v is None else str(v) for v in values))
            colour = {c: plt.get_cmap("tab10")(i % 10) for i, c in enumerate(cats)}
        seen: set[str] = set()
        for t, v in zip(trials, values):
            key = v if scaled else ("unset" if v is None else str(v))
            xs = [p[0] for p in t["curve"] if _ok(p[1])]
            ys = [p[1] * scale for p in t["curve"] if _ok(p[1])]
            label = None if scaled or key in seen else str(key)
            seen.add(str(key))
            ax.plot(xs, ys, color=colour[key], linestyle="--" if t.get("audited") else "-",
                    marker="o", markersize=2.5, linewidth=1.2, alpha=0.85, label=label)
        if scaled:
            sm = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(min(numeric), max(numeric)))
            fig.colorbar(sm, ax=ax, label=trick)
        else:
            ax.legend(title=trick, fontsize=7, title_fontsize=8)
        ax.set(title=trick, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[k:]:
        ax.set_visible(False)
    fig.suptitle("search trials (dashed: audited, run to the end although ASHA would have stopped them)",
                 fontsize=9, y=1.02)
    _save(fig, path)
    return True


def plot_ablation(answer: dict[str, Any], path: Path) -> bool:
    """Forest plot: each trick's Δ (winner minus the winner without it) with its 95% CI."""
    rows = [r for r in answer.get("ablation") or [] if _ok(r.get("delta"))]
    if not rows:
        return False
    scale, _ = _scale(answer)
    unit = "pp" if scale == 100.0 else (answer.get("metric") or "")
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(rows) + 1.2))
    for y, r in enumerate(reversed(rows)):
        d, ci = r["delta"] * scale, r.get("ci95") or [None, None]
        err = [[d - ci[0] * scale], [ci[1] * scale - d]] if _ok(ci[0]) and _ok(ci[1]) else None
        ax.errorbar(d, y, xerr=err, fmt="o", color="tab:blue", capsize=4)
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [str(r.get("trick")) for r in reversed(rows)])
    ax.set(xlabel=f"Δ {unit} (positive: the trick helps)", title="leave-one-trick-out ablation, 95% CI")
    ax.grid(axis="x", alpha=0.3)
    _save(fig, path)
    return True


def plot_confirm(answer: dict[str, Any], path: Path) -> bool:
    """The confirmed configs' means with their 95% CI and per-seed values; the baseline in red."""
    rows = [c for c in answer.get("confirm") or [] if _ok(c.get("mean"))]
    if not rows:
        return False
    scale, ylabel = _scale(answer)
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2.5, 3.6))
    for x, c in enumerate(rows):
        colour = "tab:red" if c.get("role") == "baseline" else "tab:blue"
        m, ci = c["mean"] * scale, c.get("ci95") or [None, None]
        err = [[m - ci[0] * scale], [ci[1] * scale - m]] if _ok(ci[0]) and _ok(ci[1]) else None
        ax.errorbar(x, m, yerr=err, fmt="s", color=colour, capsize=5, markersize=7)
        seeds = [v * scale for v in c.get("values") or [] if _ok(v)]
        ax.scatter([x + 0.15] * len(seeds), seeds, s=10, color=colour, alpha=0.5)
    ax.set_xticks(range(len(rows)), [str(c.get("label")) for c in rows], rotation=20, ha="right")
    ax.set(ylabel=ylabel, title="confirmation: mean and 95% CI over seeds (red: baseline)")
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def rung_points(answer: dict[str, Any], entry: dict[str, Any]) -> list[tuple[float, float]]:
    """(rung score, final score) pairs of one rung: the entry's `points` ([rung_score, final]
    or {rung_score, final}) when given, else read off the curves of the search trials that
    ran to the end, at the rung's `epoch` (or its `rung`, which is the epoch ASHA compares at)."""
    if entry.get("points"):
        pairs = [(p["rung_score"], p["final"]) if isinstance(p, dict) else (p[-2], p[-1]) for p in entry["points"]]
        return [(a, b) for a, b in pairs if _ok(a) and _ok(b)]
    epoch = entry.get("epoch", entry.get("rung"))
    if not _ok(epoch):
        return []
    out = []
    for t in answer.get("trials") or []:
        if t.get("phase") != "search" or t.get("status") != "done" or not _ok(t.get("score")):
            continue
        at = [p[1] for p in t.get("curve") or [] if p[0] == epoch and _ok(p[1])]
        if at:
            out.append((at[0], t["score"]))
    return out


def plot_rungs(answer: dict[str, Any], path: Path) -> bool:
    """Each rung's score against the final score of the same trials, one colour per rung,
    with Kendall's τ in the legend."""
    series = [(e, rung_points(answer, e)) for e in answer.get("rung_tau") or []]
    series = [(e, pts) for e, pts in series if pts]
    if not series:
        return False
    scale, label = _scale(answer)
    fig, ax = plt.subplots(figsize=(5, 4.2))
    for i, (e, pts) in enumerate(series):
        tau = f"{e['tau']:.2f}" if _ok(e.get("tau")) else "n/a"
        ax.scatter([a * scale for a, _ in pts], [b * scale for _, b in pts], color=plt.get_cmap("tab10")(i % 10),
                   label=f"rung {e.get('rung')}: τ = {tau} (n = {e.get('n', len(pts))})", alpha=0.8)
    ax.set(xlabel=f"score at the rung, {label}", ylabel=f"final score, {label}",
           title="rung audit: does the rung rank as the end does?")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


# section of report.md -> (file name, plot function)
PLOTS: dict[str, tuple[str, Callable[[dict[str, Any], Path], bool]]] = {
    "confirm": ("confirmation.png", plot_confirm),
    "ablation": ("ablation.png", plot_ablation),
    "rungs": ("rung_audit.png", plot_rungs),
    "curves": ("learning_curves.png", plot_curves),
}
