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
import time
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
    """The fake metric: a config's level (higher with mixing on, so the search finds a winner
    with a trick to ablate), a small seed effect, rising with the epochs."""
    key = json.dumps(config, sort_keys=True, default=str)
    level = (zlib.crc32(key.encode()) % 1000) / 4000 + (0.3 if config.get("mix", {}).get("mode") != "none" else 0.0)
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


def _import_driver() -> None:
    """Everything a driver imports, once: Ray's console settings first, as search.run's
    connect() would, then Ray, Tune and every room of the search."""
    from trainable.cluster import quiet_ray_console

    quiet_ray_console()
    import ray  # noqa: F401
    import ray.tune  # noqa: F401
    import search.answer.build  # noqa: F401
    import search.answer.report  # noqa: F401
    import search.experiment.resume  # noqa: F401
    import search.phases.confirm  # noqa: F401
    import search.phases.search  # noqa: F401
    import search.run  # noqa: F401


def main(argv: list[str]) -> int:
    """One driver: join the Ray instance at argv[0] with the fake training on its workers and
    run `search.run.main(argv[1:])` with the counted decisions and study writes."""
    _import_driver()
    import ray

    address, args = argv[0], argv[1:]
    os.environ[DRIVER_PID] = str(os.getpid())
    env = {k: os.environ[k] for k in (EVENTS, KILL_AT, DRIVER_PID, "PYTHONPATH") if k in os.environ}
    ray.init(address=address, configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": env, "worker_process_setup_hook": "tests.fake_driver.patch_worker"})
    _patch_driver()
    from search.run import main as run_main

    return run_main(args)


def serve() -> None:
    """A driver factory: import everything once, then for each request on stdin (one JSON
    line: `argv` for `main`, `env`, `log`, `timeout_s`) fork a fresh driver process, its
    output appended to `log`, and answer its exit status on stdout (`-9`: killed by SIGKILL,
    `null`: still running after `timeout_s`, then killed). A forked driver starts in well
    under a second instead of re-importing Ray, Tune, torch and the search for each run;
    it is a separate process, so a SIGKILL ends it exactly as it would end `search.run`."""
    _import_driver()
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the driver
            code = 1
            try:
                os.environ.update(request["env"])
                fd = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                code = main(request["argv"])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        deadline = time.monotonic() + float(request["timeout_s"])
        status: int | None = None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(raw)
            elif time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            else:
                time.sleep(0.05)
        print(json.dumps({"rc": status}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(main(sys.argv[1:]))
