"""A resumed search is the same search.

Fast: the real searcher and audited ASHA on recorded curves (the replay's simulated clock),
the scheduler rebuilt from the experiment folder after a decision, at every result of a
search, must decide exactly as the one never restarted.

Slow: the real driver (`tests.fake_driver`: the real
searcher, audited ASHA, reconciliation, confirmation, ablation and answer, with each trial's
training replaced by fixed curves and a checkpoint record), one trial at a time, is killed
with SIGKILL at chosen events (right after a rung decision, right after a study write and
before Tune's row, between a training checkpoint and its report, during the confirmation
and the ablation) and resumed with `--resume`; the trials, every stop/promote decision, the
confirmation plan and the answer must be exactly those of the same search never killed."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.replay.replay import HERE as REPLAY, load_table, replay_search, replay_space
from search.experiment.audit import read_scheduler_state
from search.experiment.folder import SEARCH_INFO, Experiment
from search.experiment.study import ABANDONED, DUPLICATE_OF, DUPLICATES, TUNE_TRIAL_ID, load_study
from tests.conftest import PYTHON, ROOT, cli_env
from tests.fake_driver import EVENTS, KILL_AT

NAME = "eq"
KILLS = int(os.environ.get("RESUME_KILLS", "20"))
PLANNED = KILLS + 6  # kill points planned: a resumed chain repeats fewer events than the reference has
SETS = [
    "experiment.num_samples=5",
    "experiment.max_concurrent_trials=1",  # one trial at a time: a deterministic order
    "experiment.sampler.n_startup_trials=3",
    "experiment.scheduler.grace_period=1",
    "experiment.scheduler.reduction_factor=2",
    "experiment.scheduler.audit=0.5",
    "train.run.epochs=3",
    "experiment.confirm.top_k=1",
    "experiment.confirm.seeds=2",
    "experiment.ablate=true",
    # two tricks (mix.mode with its alphas, label_smoothing): an ablation of at most two
    "search.augment.randaugment.enabled=null",
    "search.augment.randaugment.magnitude=null",
    "search.batch.global_batch=null",
]
DRIVER_TIMEOUT_S = 240


class Drivers:
    """`tests.fake_driver --serve`: each driver a fork of one process that imported
    everything once, joined to the test session's Ray instance (no driver starts Ray)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.proc = subprocess.Popen([PYTHON, "-m", "tests.fake_driver", "--serve"], cwd=ROOT, env=cli_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def drive(self, storage: Path, events: Path, kill_at: int = 0) -> int | None:
        """One driver on the experiment under `storage` (`--resume` once it exists); its exit
        status (-9: killed at event `kill_at`)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        resume = (storage / NAME / SEARCH_INFO).exists()
        argv = [self.address, "--storage-path", str(storage), "--name", NAME,
                *[a for s in SETS for a in ("--set", s)], *(["--resume"] if resume else [])]
        log = storage / "drivers.log"
        with log.open("a") as out:
            out.write(f"\n=== kill at {kill_at}{' --resume' if resume else ''}\n")
        request = {"argv": argv, "env": {EVENTS: str(events), KILL_AT: str(kill_at)}, "log": str(log),
                   "timeout_s": DRIVER_TIMEOUT_S}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], DRIVER_TIMEOUT_S + 30)
        assert ready, f"the driver factory did not answer within {DRIVER_TIMEOUT_S + 30}s"
        line = self.proc.stdout.readline()
        assert line, f"the driver factory ended (exit {self.proc.wait(timeout=10)})"
        return json.loads(line)["rc"]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def drivers(ray_address: str) -> Iterator[Drivers]:
    d = Drivers(ray_address)
    yield d
    d.close()


def _story(storage: Path) -> dict[str, Any]:
    """What the search decided, with Tune's random trial ids replaced by their order."""
    exp = Experiment.at(str(storage / NAME))
    study = load_study(exp.study_db, NAME)
    search = [t for t in study.trials if TUNE_TRIAL_ID in t.user_attrs and not t.user_attrs.get(ABANDONED)
              and DUPLICATE_OF not in t.user_attrs]
    order = {t.user_attrs[TUNE_TRIAL_ID]: i for i, t in enumerate(sorted(search, key=lambda t: t.number))}
    trials = sorted(
        (order[t.user_attrs[TUNE_TRIAL_ID]], t.state.name, json.dumps(t.params, sort_keys=True),
         sorted(t.intermediate_values.items()), t.value)
        for t in search
    )
    state = read_scheduler_state(exp)
    decisions = {order[t]: d for t, d in state.decisions.items()}
    audited = {order[t]: e for t, e in state.audited.items()}
    answer = json.loads((Path(exp.path) / "report" / "report.json").read_text())
    plan = [(c["label"], json.dumps(c["config"], sort_keys=True), c["values"]) for c in answer["confirm"]]
    ablation = [(a["trick"], a["delta"]) for a in answer.get("ablation") or []]
    return {"trials": trials, "decisions": decisions, "audited": audited, "confirm": plan, "ablation": ablation,
            "verdict": answer["verdict"], "state": answer["state"],
            "winner": json.dumps((answer.get("winner") or {}).get("config"), sort_keys=True),
            "duplicates": study.user_attrs.get(DUPLICATES, 0)}


def kind(event: str) -> str:
    """decision, study (a study write, before Tune's row), or the phase of a training report
    (search, confirm, ablate), from the run's name."""
    what, *rest = event.split()
    if what != "report":
        return what
    return {"trial": "search"}.get(rest[0].split("_")[0], rest[0].split("_")[0])


def kill_points(events: list[str], n: int) -> list[int]:
    """`n` increasing 1-based event indices spread over the whole run, with the first event
    of each kind among them (a rung decision, a study write, a report of each phase)."""
    firsts = {kind(e): i + 1 for i, e in reversed(list(enumerate(events)))}
    spread = {round(1 + k * (len(events) - 2) / (n - 1)) for k in range(n)}
    points = sorted(spread | set(firsts.values()))
    while len(points) > n and len(points) > len(firsts):  # drop spread points next to another
        gaps = [(points[i + 1] - points[i - 1], points[i]) for i in range(1, len(points) - 1)
                if points[i] not in firsts.values()]
        points.remove(min(gaps)[1])
    return points


def _decided(run: Any, folder: Path) -> dict[str, Any]:
    state = read_scheduler_state(Experiment.at(str(folder)))
    rows = [(r.trial_id, r.status, r.epochs, json.dumps(r.values, sort_keys=True), r.final) for r in run.rows]
    return {"order": run.order, "rows": rows, "decisions": state.decisions, "audited": state.audited,
            "rungs": state.rungs, "stopped": state.num_stopped}


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_scheduler_rebuilt_after_any_decision_decides_as_one_never_rebuilt(tmp_path, concurrency):
    table = load_table(REPLAY / "tables" / "quickstart.json.gz")
    space = replay_space(table, ["experiment.num_samples=10", "experiment.scheduler.audit=0.5"])
    (tmp_path / "ref").mkdir()
    reference = replay_search(space, table, 0, concurrency, str(tmp_path / "ref"))
    decided = _decided(reference, tmp_path / "ref")
    actions = {a for _, _, a in reference.order}
    assert "STOP" in actions and "CONTINUE" in actions and decided["audited"], decided  # stops, promotions, audits
    n = len(reference.order)
    assert n >= 20, n
    # one kill after each decision, and one chain killed after every decision
    for k, restarts in [*((k, {k}) for k in range(1, n + 1)), ("all", set(range(1, n + 1)))]:
        folder = tmp_path / f"kill-{k}"
        folder.mkdir()
        run = replay_search(space, table, 0, concurrency, str(folder), restart_after=restarts)
        assert len(run.repeated) == len(restarts)
        assert all(before == again for _, _, before, again in run.repeated), (k, run.repeated)
        assert _decided(run, folder) == decided, k


@pytest.mark.slow
def test_killed_and_resumed_search_decides_exactly_as_one_never_killed(drivers, tmp_path):
    started = time.monotonic()
    ref_dir, ref_events = tmp_path / "reference", tmp_path / "reference.events"
    ref_dir.mkdir()
    assert drivers.drive(ref_dir, ref_events) == 0, (ref_dir / "drivers.log").read_text()[-4000:]
    reference = _story(ref_dir)
    assert reference["state"] == "finished" and reference["confirm"] and reference["ablation"], reference
    assert any("STOP" in d.values() for d in reference["decisions"].values()), reference  # ASHA stopped some
    events = ref_events.read_text().splitlines()
    assert {"decision", "study", "search", "confirm", "ablate"} <= {kind(e) for e in events}, events
    reference_s = time.monotonic() - started

    killed_dir, killed_events = tmp_path / "killed", tmp_path / "killed.events"
    killed_dir.mkdir()
    kills: list[str] = []
    for at in kill_points(events, PLANNED):  # one chain: each driver resumes where the last was killed
        t0 = time.monotonic()
        rc = drivers.drive(killed_dir, killed_events, kill_at=at)
        if rc == 0:
            break  # the search ended before this kill
        assert rc == -9, (rc, (killed_dir / "drivers.log").read_text()[-4000:])
        kills.append(f"{at}: {killed_events.read_text().splitlines()[at - 1]}  ({time.monotonic() - t0:.1f} s)")
    assert drivers.drive(killed_dir, killed_events) == 0, (killed_dir / "drivers.log").read_text()[-4000:]
    print(f"\nreference {reference_s:.0f} s, {len(events)} events; killed and resumed {len(kills)} times in "
          f"{time.monotonic() - started - reference_s:.0f} s:", *kills, sep="\n  ")
    assert len(kills) >= KILLS, kills
    assert {kind(k.split(": ", 1)[1].split("  (")[0]) for k in kills} >= {"decision", "study", "search", "confirm", "ablate"}, kills
    assert _story(killed_dir) == reference
