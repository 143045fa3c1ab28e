"""A resumed search is the same search: the real driver (`tests.fake_driver`: the real
searcher, audited ASHA, reconciliation, confirmation, ablation and answer, with each trial's
training replaced by fixed curves and a checkpoint record), one trial at a time, is killed
with SIGKILL at chosen events (right after a rung decision, right after a study write and
before Tune's row, between a training checkpoint and its report, during the confirmation
and the ablation) and resumed with `--resume`; the trials, every stop/promote decision, the
confirmation plan and the answer must be exactly those of the same search never killed."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import pytest

from search.experiment.audit import read_scheduler_state
from search.experiment.folder import SEARCH_INFO, Experiment
from search.experiment.study import ABANDONED, DUPLICATES, TUNE_TRIAL_ID, load_study
from tests.conftest import PYTHON, ROOT, cli_env
from tests.fake_driver import EVENTS, KILL_AT

NAME = "eq"
KILLS = int(os.environ.get("RESUME_KILLS", "20"))
SEED = int(os.environ.get("RESUME_SEED", "3"))
SETS = [
    "experiment.num_samples=6",
    "experiment.max_concurrent_trials=1",  # one trial at a time: a deterministic order
    "experiment.sampler.n_startup_trials=3",
    "experiment.scheduler.grace_period=1",
    "experiment.scheduler.reduction_factor=2",
    "experiment.scheduler.audit=0.5",
    "train.run.epochs=4",
    "experiment.confirm.top_k=2",
    "experiment.confirm.seeds=2",
]
DRIVER_TIMEOUT_S = 240


def _drive(address: str, storage: Path, events: Path, kill_at: int = 0) -> int:
    exp = storage / NAME
    args = ["-m", "tests.fake_driver", address, "--storage-path", str(storage), "--name", NAME,
            *[a for s in SETS for a in ("--set", s)]]
    if (exp / SEARCH_INFO).exists():
        args.append("--resume")
    env = cli_env(**{EVENTS: str(events), KILL_AT: str(kill_at)})
    log = storage / "drivers.log"
    with log.open("a") as out:
        out.write(f"\n=== kill at {kill_at} {args[-1]}\n")
        out.flush()
        proc = subprocess.run([PYTHON, *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                              timeout=DRIVER_TIMEOUT_S)
    return proc.returncode


def _story(storage: Path) -> dict[str, Any]:
    """What the search decided, with Tune's random trial ids replaced by their order."""
    exp = Experiment.at(str(storage / NAME))
    study = load_study(exp.study_db, NAME)
    search = [t for t in study.trials if TUNE_TRIAL_ID in t.user_attrs and not t.user_attrs.get(ABANDONED)]
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


def test_killed_and_resumed_search_decides_exactly_as_one_never_killed(ray_address, tmp_path):
    ref_dir, ref_events = tmp_path / "reference", tmp_path / "reference.events"
    ref_dir.mkdir()
    assert _drive(ray_address, ref_dir, ref_events) == 0, (ref_dir / "drivers.log").read_text()[-4000:]
    reference = _story(ref_dir)
    assert reference["state"] == "finished" and reference["confirm"], reference
    assert any("STOP" in d.values() for d in reference["decisions"].values()), reference  # ASHA stopped some
    events = ref_events.read_text().splitlines()
    kinds = [e.split()[0] for e in events]
    assert {"decision", "study", "report"} <= set(kinds)

    rng = random.Random(SEED)
    killed_dir, killed_events = tmp_path / "killed", tmp_path / "killed.events"
    killed_dir.mkdir()
    step = max(2, 2 * len(events) // KILLS)
    kills: list[str] = []
    at = 0
    for _ in range(KILLS):
        at += rng.randint(1, step)
        rc = _drive(ray_address, killed_dir, killed_events, kill_at=at)
        lines = killed_events.read_text().splitlines() if killed_events.exists() else []
        if rc == 0:
            break  # the search ended before this kill
        assert rc == -9, (rc, (killed_dir / "drivers.log").read_text()[-4000:])
        kills.append(lines[at - 1])
    assert _drive(ray_address, killed_dir, killed_events) == 0, (killed_dir / "drivers.log").read_text()[-4000:]
    print(f"\n{len(kills)} kills:", *kills, sep="\n  ")
    assert len(kills) >= KILLS, kills
    assert {k.split()[0] for k in kills} == {"decision", "study", "report"}, kills
    assert _story(killed_dir) == reference
