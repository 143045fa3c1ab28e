"""`<experiment>/scheduler/audit.json`: what the search's scheduler decided, kept in the
experiment as it decides, because Tune does not checkpoint schedulers (a restored Tuner
rebuilds ASHA from the pickle written when the search started, with empty rungs).

It lives in a folder of its own: a restored Tuner copies every `.json` and `.pkl` file at the
experiment's top level into its driver's staging folder and, when it syncs, copies them all
back, so a file there that the driver changed since would be put back as it was at the
restore.

It holds the trials the rung audit ran to the end (trial id -> the rung epoch at which ASHA
would have stopped them) and the number of stop decisions so far, ASHA's rung records
(rung epoch -> trial id -> the signed metric ASHA compared) and every decision taken at a
rung (trial id -> epoch -> "STOP" or "CONTINUE"). A restarted driver's scheduler reads it
back (`search.phases.schedulers.AuditedASHA`) and repeats a decision it already took
instead of taking it again, so a resumed search stops and promotes the same trials.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from search.experiment.folder import Experiment

__all__ = ["AUDIT_FILE", "AuditLog", "SchedulerState", "read_audit", "read_scheduler_state"]

AUDIT_FILE = "scheduler/audit.json"
LEGACY_AUDIT_FILE = "audit.json"  # where experiments made before kept it: read, never written


def read_audit(exp: Experiment) -> dict[str, int]:
    """The audited trials of an experiment: trial id -> the rung epoch ASHA stopped it at."""
    return AuditLog(exp.path).load()[0]


def read_scheduler_state(exp: Experiment) -> SchedulerState:
    """Everything the scheduler of an experiment decided so far."""
    return AuditLog(exp.path).load_state()


@dataclass
class SchedulerState:
    """The scheduler's memory (see the module)."""

    audited: dict[str, int] = field(default_factory=dict)
    stop_decisions: int = 0
    num_stopped: int = 0
    rungs: dict[str, dict[str, float]] = field(default_factory=dict)
    """Rung milestone (as ASHA writes it, e.g. "1.0", "2.5") -> trial id -> signed metric."""
    decisions: dict[str, dict[str, str]] = field(default_factory=dict)
    """Trial id -> epoch (as a string) -> "STOP" or "CONTINUE"."""

    def stopped_at(self, trial_id: str) -> int | None:
        """The epoch at which the scheduler stopped the trial, or None."""
        stops = [int(e) for e, a in self.decisions.get(trial_id, {}).items() if a == "STOP"]
        return min(stops) if stops else None

    def to_json(self) -> str:
        data = {"audited": self.audited, "stop_decisions": self.stop_decisions, "num_stopped": self.num_stopped,
                "rungs": self.rungs, "decisions": self.decisions}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> SchedulerState:
        data = json.loads(text)
        return cls(
            audited={str(k): int(v) for k, v in data["audited"].items()},
            stop_decisions=int(data["stop_decisions"]),
            num_stopped=int(data.get("num_stopped", 0)),
            rungs={str(m): {str(t): float(v) for t, v in r.items()} for m, r in data.get("rungs", {}).items()},
            decisions={str(t): {str(e): str(a) for e, a in d.items()} for t, d in data.get("decisions", {}).items()},
        )


class AuditLog:
    """`scheduler/audit.json` of one experiment (picklable: Tune keeps the scheduler in its state)."""

    def __init__(self, experiment_path: str) -> None:
        self.path = experiment_path

    def load_state(self) -> SchedulerState:
        store = Experiment.at(self.path).store
        name = next((n for n in (AUDIT_FILE, LEGACY_AUDIT_FILE) if store.exists(n)), None)
        if name is None:
            return SchedulerState()
        try:
            return SchedulerState.from_json(store.read_text(name))
        except (ValueError, KeyError, TypeError, AttributeError):
            return SchedulerState()

    def load(self) -> tuple[dict[str, int], int]:
        state = self.load_state()
        return state.audited, state.stop_decisions

    def save_state(self, state: SchedulerState) -> None:
        Experiment.at(self.path).store.write_text(AUDIT_FILE, state.to_json(), overwrite=True)
