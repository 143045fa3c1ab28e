"""Resume under any kill: a real, tiny search run by the CLI (its own local Ray) is killed
with SIGKILL, driver and Ray together, at chosen and at random moments, and resumed with
`--resume` until it completes. Then Tune's results, the Optuna study and the trial table
must tell the same story: every Tune trial once in the study with its right state, no
epoch reported twice, no finished trial trained again, `num_samples` trials, and no Ray
process left behind."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from optuna.trial import TrialState

from search.experiment.folder import SEARCH_INFO, Experiment, recorded_space
from search.experiment.trials import format_table, read_results, summarise
from search.experiment.study import ABANDONED, DUPLICATE_OF, TUNE_TRIAL_ID, load_study
from tests.conftest import PYTHON, ROOT, cli_env

pytestmark = pytest.mark.slow

NUM_SAMPLES, EPOCHS = 4, 2
SETS = [
    "train.data.subset=1.0",  # trials long enough for a kill in each phase of the search
    "train.data.image_size=16",
    f"train.run.epochs={EPOCHS}",
    f"experiment.num_samples={NUM_SAMPLES}",
    "experiment.max_concurrent_trials=2",
    "train.distributed.num_workers=1",  # two 1-worker trials side by side on 2 cores
    "experiment.confirm=null",  # the search phase's story (the confirmation resumes as its own Tune run)
]
SEED = int(os.environ.get("CHAOS_SEED", "7"))
RUN_TIMEOUT_S = 900  # one driver's life, bounded
FINISHED = ("COMPLETE", "PRUNED")


def _a_trial_ended(db: Path) -> Callable[[], bool]:
    """True once the study holds more finished trials than at its first readable count."""
    counts: list[int] = []  # the first readable count, then the latest

    def fire() -> bool:
        n = _finished_in_study(db)
        if n is not None:
            counts.append(n)
        return len(counts) > 1 and counts[-1] > counts[0]

    return fire


def _finished_in_study(db: Path) -> int | None:
    """Trials the study has finished (read-only; the driver may be writing), or None while
    the study cannot be read (not created yet, or a killed writer's journal not yet rolled
    back)."""
    if not db.exists():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return con.execute(f"SELECT COUNT(*) FROM trials WHERE state IN {FINISHED}").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return None


def _group(pgid: int) -> set[int]:
    """Processes of a process group (the driver and the Ray it started: GCS, raylet, ...)."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            pids.add(int(stat.parent.name))
    return pids


def _ray_workers(raylets: set[int]) -> set[int]:
    """Ray's worker processes (own process groups) whose raylet is one of `raylets`."""
    pids = set()
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            text = env.read_bytes()
        except OSError:
            continue
        for var in text.split(b"\0"):
            if var.startswith(b"RAY_RAYLET_PID=") and int(var.split(b"=", 1)[1] or 0) in raylets:
                pids.add(int(env.parent.name))
    return pids


def _raylets(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if b"raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]:
                out.add(pid)
        except OSError:
            continue
    return out


class Driver:
    """One `python -m search.run` with its own Ray, in its own process group."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        self.started = time.monotonic()
        self.proc = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=cli_env(RAY_OVERRIDE_RESOURCES='{"CPU": 8}'),
                                     stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
        self.raylets: set[int] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        self.raylets |= _raylets(_group(self.proc.pid))
        return self.proc.poll() is None

    def kill(self) -> None:
        self.raylets |= _raylets(_group(self.proc.pid))
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def leftovers(self, wait_s: float = 60) -> set[int]:
        """Processes of this driver's Ray still alive after `wait_s` (workers exit once
        their raylet is gone); any found are killed, and returned."""
        deadline = time.monotonic() + wait_s
        while True:
            left = _group(self.proc.pid) | _ray_workers(self.raylets)
            if not left or time.monotonic() > deadline:
                break
            time.sleep(1)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def _wait(driver: Driver, fire: Callable[[], bool], timeout: float = RUN_TIMEOUT_S) -> bool:
    """Poll until `fire()` (then True) or the driver exits (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not driver.alive():
            return False
        if fire():
            return True
        time.sleep(0.2)
    driver.kill()
    pytest.fail(f"a driver ran over {timeout}s: {driver.output()[-3000:]}")


def test_search_survives_sigkills_and_resumes_to_one_consistent_story(tmp_path):
    rng = random.Random(SEED)
    exp_dir = tmp_path / "chaos"
    db = exp_dir / "optuna.db"
    # --verbose: the kills wait for worker lines ("data digits:"), which the quiet console leaves out
    base = ["-m", "search.run", "--verbose", "--address", "local", "--storage-path", str(tmp_path), "--name", "chaos",
            *[a for s in SETS for a in ("--set", s)]]
    drivers: list[Driver] = []
    kills: list[str] = []

    def launch() -> Driver:
        resume = ["--resume"] if (exp_dir / SEARCH_INFO).exists() else []  # killed before it recorded anything
        d = Driver(base + resume, tmp_path / f"driver{len(drivers)}.log")
        drivers.append(d)
        return d

    def in_first_epoch(d: Driver, delay: float) -> Callable[[], bool]:
        seen: list[float] = []

        def fire() -> bool:
            if not seen and "data digits:" in d.output():  # a worker loaded its data: epoch 1 runs
                seen.append(time.monotonic())
            return bool(seen) and time.monotonic() - seen[0] > delay

        return fire

    def after_trial_end(d: Driver) -> Callable[[], bool]:
        return _a_trial_ended(db)

    def at_random(d: Driver, after_s: float) -> Callable[[], bool]:
        return lambda: time.monotonic() - d.started > after_s

    plans = [
        ("during a trial's first epoch", lambda d: in_first_epoch(d, rng.uniform(2, 10))),
        ("right after a trial ended", after_trial_end),
        ("at random", lambda d: at_random(d, rng.uniform(20, 150))),
        ("right after a trial ended", after_trial_end),
    ]
    t0 = time.monotonic()
    try:
        for what, plan in plans:
            d = launch()
            if not _wait(d, plan(d)):
                break  # the search ended before this kill
            d.kill()
            kills.append(f"{what} at {time.monotonic() - t0:.0f}s (finished in study: {_finished_in_study(db)})")
            assert not d.leftovers(), f"Ray processes outlived the kill ({what})"
        final = launch()  # and now to the end
        _wait(final, lambda: False)
        assert final.proc.returncode == 0, final.output()[-4000:]
    finally:
        for d in drivers:
            if d.alive():
                d.kill()
        left = set().union(*(d.leftovers(wait_s=30) for d in drivers)) if drivers else set()
    print(f"\n{len(kills)} kills, {len(drivers)} drivers, {time.monotonic() - t0:.0f}s:", *kills, sep="\n  ")
    assert not left, f"Ray processes left behind: {sorted(left)}"
    assert len(kills) >= 3, kills
    assert "resume:" in "".join(d.output() for d in drivers[1:]), "no resume had anything to reconcile"

    exp = Experiment.at(str(exp_dir))
    space, _ = recorded_space(exp)
    results = read_results(exp.path)
    rows = summarise(results, space)
    study = load_study(str(db), "chaos")

    # num_samples Tune trials, each finished, each once in the study with its state
    assert len(rows) == NUM_SAMPLES
    assert {r.status for r in rows} <= {"done", "stopped early"}, format_table(rows, space)
    by_tid: dict[str, list] = {}
    for t in study.trials:
        if DUPLICATE_OF not in t.user_attrs:  # a proposal identical to an earlier trial: FAIL, never trained
            by_tid.setdefault(t.user_attrs.get(TUNE_TRIAL_ID), []).append(t)
    epochs_of = {r.metrics["trial_id"]: [int(e) for e in r.metrics_dataframe["epoch"]] for r in results}
    for row in rows:
        (t,) = by_tid.pop(row.trial_id)
        assert t.state == (TrialState.COMPLETE if row.status == "done" else TrialState.PRUNED), (row, t.state)
        # Tune's result rows: each epoch once, in order (none reported twice after a resume)
        reported = epochs_of[row.trial_id]
        assert reported == sorted(set(reported)) and reported[-1] == row.epochs, (row.trial_id, reported)
        # the trial table and the study agree on the epochs and the metric
        assert sorted(t.intermediate_values) == reported, (row.trial_id, t.intermediate_values, reported)
        assert row.best == pytest.approx(max(t.intermediate_values.values()))
        assert row.values == t.params, (row.trial_id, row.values, t.params)
        if t.state == TrialState.COMPLETE:
            assert t.value == pytest.approx(row.final)
        # no training started after the study recorded the trial's end (TensorBoard's event
        # files are named by the second their writer, i.e. a training run, started)
        ended = t.datetime_complete.timestamp()
        events = (exp_dir / "runs" / f"trial_{row.trial_id}").rglob("events.out.tfevents.*")
        starts = [int(re.match(r"events\.out\.tfevents\.(\d+)\.", p.name)[1]) for p in events]
        assert starts and max(starts) <= ended + 2, (row.trial_id, starts, datetime.fromtimestamp(ended))
    # what is left are the orphans: proposed, never recorded by Tune, FAIL in the study
    orphans = [t for ts in by_tid.values() for t in ts]
    assert all(t.state == TrialState.FAIL and t.user_attrs.get(ABANDONED) for t in orphans), orphans
    table = format_table(rows, space)
    assert set(table.splitlines()) <= set(final.output().splitlines())  # the CLI's table: the same trials
    print(table, f"orphans marked FAIL: {len(orphans)}", sep="\n")


ONE_AT_A_TIME = [
    "train.data.subset=1.0",
    "train.data.image_size=16",
    "train.run.epochs=2",
    "experiment.num_samples=4",
    "experiment.max_concurrent_trials=1",  # one trial at a time: the order, and so the search, is deterministic
    "experiment.scheduler.grace_period=1",  # a rung at epoch 1: ASHA stops and promotes
    "experiment.sampler.n_startup_trials=2",
    "train.distributed.num_workers=1",
    "experiment.confirm=null",
]


def _decisions(exp_dir: Path) -> dict:
    """The search's trials in the order they were proposed (values, epochs reported with their
    metric, final state) and ASHA's decision at each rung, keyed by that order."""
    from search.experiment.audit import read_scheduler_state

    study = load_study(str(exp_dir / "optuna.db"), exp_dir.name)
    search = sorted((t for t in study.trials if TUNE_TRIAL_ID in t.user_attrs and not t.user_attrs.get(ABANDONED)
                     and DUPLICATE_OF not in t.user_attrs), key=lambda t: t.number)
    order = {t.user_attrs[TUNE_TRIAL_ID]: i for i, t in enumerate(search)}
    state = read_scheduler_state(Experiment.at(str(exp_dir)))
    return {"trials": [(t.params, sorted(t.intermediate_values.items()), t.state.name) for t in search],
            "decisions": {order[tid]: d for tid, d in state.decisions.items()}}


def test_a_real_search_killed_three_times_decides_as_one_never_killed(tmp_path):
    """Real training, one trial at a time: the search killed (driver and its Ray) during a
    trial's first epoch and twice right after a trial ended, and resumed each time, trains the
    same configs to the same metrics and takes the same ASHA decisions as the search run once
    without a kill."""
    # the same experiment name in two storage folders: the name seeds the rung audit's picks
    def args(storage: str, resume: bool) -> list[str]:
        return ["-m", "search.run", "--verbose", "--address", "local", "--storage-path", str(tmp_path / storage),
                "--name", "once", *[a for s in ONE_AT_A_TIME for a in ("--set", s)], *(["--resume"] if resume else [])]

    reference = Driver(args("reference", False), tmp_path / "reference.log")
    _wait(reference, lambda: False)
    assert reference.proc.returncode == 0, reference.output()[-4000:]
    expected = _decisions(tmp_path / "reference" / "once")
    assert any("STOP" in d.values() for d in expected["decisions"].values()), expected  # ASHA stopped a trial
    assert len(expected["trials"]) == 4, expected

    exp_dir = tmp_path / "killed" / "once"
    db = exp_dir / "optuna.db"
    drivers: list[Driver] = []
    kills: list[str] = []

    def ended_trials_grow(d: Driver) -> Callable[[], bool]:
        return _a_trial_ended(db)

    def in_first_epoch(d: Driver) -> Callable[[], bool]:
        return lambda: d.output().count("data digits:") >= 1 and time.monotonic() - d.started > 5

    t0 = time.monotonic()
    try:
        for what, plan in [("during a trial's first epoch", in_first_epoch), ("right after a trial ended", ended_trials_grow),
                           ("right after a trial ended", ended_trials_grow)]:
            d = Driver(args("killed", (exp_dir / SEARCH_INFO).exists()), tmp_path / f"killed{len(drivers)}.log")
            drivers.append(d)
            if not _wait(d, plan(d)):
                break
            d.kill()
            kills.append(f"{what} at {time.monotonic() - t0:.0f}s (finished in study: {_finished_in_study(db)})")
        final = Driver(args("killed", True), tmp_path / "final.log")
        drivers.append(final)
        _wait(final, lambda: False)
        assert final.proc.returncode == 0, final.output()[-4000:]
    finally:
        for d in [reference, *drivers]:
            if d.alive():
                d.kill()
            d.leftovers(wait_s=30)
    print(f"\n{len(kills)} kills in {time.monotonic() - t0:.0f}s:", *kills, sep="\n  ")
    assert len(kills) == 3, kills
    assert _decisions(exp_dir) == expected
