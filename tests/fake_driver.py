"""Test-only driver: `python -m tests.fake_driver <ray address> <search.run args>` runs the
real `search.run.main` (searcher, audited ASHA, reconciliation, confirmation, ablation,
answer) on an existing Ray instance, with every trial's training replaced by a fake that
reports fixed curves (a function of the config and the seed) and keeps a checkpoint record
the way Ray Train does (`checkpoint_manager_snapshot.json`, written before the result goes
to Tune), so a restarted trial resumes after it.

Kill points: every scheduler decision and study write in the driver, and every report of a
fake training, is an event counted in the file `$FAKE_EVENTS`; when the count reaches
`$FAKE_KILL_AT`, the driver is killed with SIGKILL (by itself, or by the trial's worker).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sys
import zlib
from pathlib import Path
from typing import Any

EVENTS, KILL_AT, DRIVER_PID = "FAKE_EVENTS", "FAKE_KILL_AT", "FAKE_DRIVER_PID"


def event(what: str) -> None:
    """Count one event; kill the driver when the count reaches $FAKE_KILL_AT."""
    path = os.environ.get(EVENTS)
    if not path:
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = len(f.read().splitlines()) + 1
        f.write(f"{what}\n")
        f.flush()
        os.fsync(f.fileno())
    kill_at = int(os.environ.get(KILL_AT) or 0)
    if kill_at and n == kill_at:
        os.kill(int(os.environ[DRIVER_PID]), signal.SIGKILL)


def value(config: dict[str, Any], seed: int, epoch: int) -> float:
    """The fake metric: a config's level, a small seed effect, rising with the epochs."""
    key = json.dumps(config, sort_keys=True, default=str)
    level = (zlib.crc32(key.encode()) % 1000) / 4000
    noise = (zlib.crc32(f"{key}:{seed}".encode()) % 100) / 10000
    return round(0.5 + level + noise + 0.02 * epoch, 6)


def fake_launch(cfg: Any, name: str, runs_path: str) -> None:
    from ray import tune

    run = Path(runs_path) / name
    run.mkdir(parents=True, exist_ok=True)
    record = run / "checkpoint_manager_snapshot.json"
    start = 1
    if record.exists():
        start = int(json.loads(record.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]) + 1
    config = cfg.model_dump(mode="json")
    config["run"].pop("seed", None)
    seed = cfg.run.seed
    for epoch in range(start, cfg.run.epochs + 1):
        metrics = {"epoch": epoch, "val_acc": value(config, seed, epoch), "seed": seed}
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"checkpoint_results": [], "latest_checkpoint_result": {"metrics": metrics}}))
        os.replace(tmp, record)
        event(f"report {name} {epoch}")
        tune.report(metrics)


def patch_worker() -> None:
    """Ray's worker setup hook: every trial trains with `fake_launch`."""
    import search.phases.trial

    search.phases.trial.launch_trainer = fake_launch


def _patch_driver() -> None:
    from search.experiment.study import StudySearch
    from search.phases.schedulers import AuditedASHA

    decide = AuditedASHA.on_trial_result

    def on_trial_result(self: Any, controller: Any, trial: Any, result: dict[str, Any]) -> str:
        action = decide(self, controller, trial, result)
        if controller is not None:
            event(f"decision {trial.trial_id} {result.get('epoch')} {action}")
        return action

    AuditedASHA.on_trial_result = on_trial_result
    tell = StudySearch.on_trial_result

    def searcher_result(self: Any, trial_id: str, result: dict) -> None:
        tell(self, trial_id, result)
        event(f"study {trial_id} {result.get('epoch')}")

    StudySearch.on_trial_result = searcher_result


def main(argv: list[str]) -> int:
    from trainable.cluster import quiet_ray_console

    quiet_ray_console()  # before Ray is imported, as search.run's connect() would
    import ray

    address, args = argv[0], argv[1:]
    os.environ[DRIVER_PID] = str(os.getpid())
    env = {k: os.environ[k] for k in (EVENTS, KILL_AT, DRIVER_PID, "PYTHONPATH") if k in os.environ}
    ray.init(address=address, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "tests.fake_driver.patch_worker"})
    _patch_driver()
    from search.run import main as run_main

    return run_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
