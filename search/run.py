"""`python -m search.run`: the trick search.

Ray Tune drives it: Optuna's TPE proposes trick combinations from the space, ASHA stops
the poor trials early on the validation metric, and every trial is one Ray Train
`TorchTrainer` run of the `TrainConfig` the space and the proposal make together.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search.experiment import (
    DIVERGED,
    FAILED,
    RUN_ERROR,
    RUN_STATUS,
    Experiment,
    TrialRow,
    experiment_for,
    finished,
    format_table,
    record_space,
    recorded_space,
    restore_study,
    summarise,
    worst_value,
)
from search.faults import storage_failure
from spaces import QUICKSTART, Space, load_space, resolve_space_path
from trainable.cluster import connect
from trainable.config import ConfigError
from trainable.feasibility import check_space_feasible
from trainable.storage import Storage

if TYPE_CHECKING:
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)

TRIAL_NAME_PREFIX = "trial_"
DRIVER_MEMORY = 2**20
STORAGE_ENV = "TRICK_SEARCH_STORAGE"  # the default --storage-path (set once per cluster)


# Resources ---------------------------------------------------------------------------------------------
def trial_resources(space: Space) -> tuple[int, float, float]:
    """(workers, CPUs per worker, GPUs per worker) of the largest trial the space can make."""

    def most(path: str, base: Any) -> Any:
        dist = space.search.get(path)
        if dist is None:
            return base
        return max(dist.values) if dist.kind == "choice" else dist.high

    d = space.train.distributed
    workers = most("distributed.num_workers", d.num_workers)
    cpus = most("distributed.cpus_per_worker", d.cpus_per_worker)
    gpus = 1.0 if most("distributed.use_gpu", d.use_gpu) else 0.0
    return int(workers), float(cpus), gpus


def check_resources(space: Space) -> int:
    """Fail at once when the cluster can never host a trial; return how many trials fit at
    the same time."""
    import ray

    workers, cpus, gpus = trial_resources(space)
    total = ray.cluster_resources()
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    need_gpu, need_cpu = workers * gpus, workers * cpus
    if need_gpu > have_gpu:
        raise ConfigError(
            f"a trial needs {need_gpu:g} GPUs (distributed.num_workers {workers} x 1 GPU) but the "
            f"cluster has {have_gpu:g}; lower distributed.num_workers or add GPU nodes"
        )
    if need_cpu > have_cpu:
        raise ConfigError(
            f"a trial needs {need_cpu:g} CPUs (distributed.num_workers {workers} x "
            f"distributed.cpus_per_worker {cpus:g}) but the cluster has {have_cpu:g}"
        )
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(n.get("CPU", 0) >= cpus and n.get("GPU", 0) >= gpus for n in nodes):
        raise ConfigError(
            f"one worker needs {cpus:g} CPUs and {gpus:g} GPUs on one node, and no node has that much"
        )
    fits = math.floor(have_cpu / need_cpu) if need_cpu else 10**6
    if need_gpu:
        fits = min(fits, math.floor(have_gpu / need_gpu))
    return max(1, fits)


# The trial -----------------------------------------------------------------------------------------------
def run_trial(
    config: dict[str, Any], space: Space, runs_path: str, launch: Callable[[Any, str, str], None] | None = None
) -> None:
    """One Tune trial: the sampled tricks on top of the space's base config, trained by a
    TorchTrainer named after the trial (`launch_trainer`), so a restarted trial resumes from
    its checkpoint.

    Only a failure that another attempt could cure (a lost worker or node, an OOM kill) is
    raised, for Tune to retry. A failure no retry changes (a `ConfigError`, `DataError`
    included, from the sampled config or raised on a worker) ends the trial at once with one
    final result: `run_status: "failed"`, `error: <one line>` and the metric at its worst.
    A run that diverged has already ended with its own final result (`trainable.loop`)."""
    from ray import tune

    from search.sampling import sampled_values

    trial_id = tune.get_context().get_trial_id()
    train_or_report_failure(
        lambda: space.trial_config(sampled_values(config)), f"{TRIAL_NAME_PREFIX}{trial_id}", runs_path, space, launch
    )


def train_or_report_failure(
    make_config: Callable[[], Any], name: str, runs_path: str, space: Space,
    launch: Callable[[Any, str, str], None] | None = None,
) -> None:
    """Train the config `make_config` builds as the TorchTrainer run `name`; a failure no
    retry changes becomes the trial's final result (see `run_trial`), any other is raised."""
    from ray import tune

    from trainable.failures import deterministic_cause

    try:
        (launch or launch_trainer)(make_config(), name, runs_path)
    except Exception as err:
        cause = deterministic_cause(err)
        if cause is None:
            raise
        reason = " ".join(str(cause).split()) or type(cause).__name__
        logger.error("%s failed (not retried: the same config fails the same way): %s", name, reason)
        metric = space.experiment.metric
        tune.report({metric: worst_value(metric), RUN_STATUS: FAILED, RUN_ERROR: reason})


def launch_trainer(cfg: Any, name: str, runs_path: str) -> None:
    """Train `cfg` as the TorchTrainer run `name`, its reports forwarded to the Tune trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainable.train import build_trainer

    build_trainer(cfg, name, runs_path, callbacks=[TuneReportCallback()]).fit()


def make_scheduler(space: Space, exp: Experiment | None = None) -> Any:
    """FIFO, or ASHA with the rung audit (`search.schedulers`)."""
    from search.schedulers import make_scheduler as make

    return make(space, exp)


def build_tuner(
    space: Space, exp: Experiment, concurrent: int, resume: bool, callbacks: list[Any] | None = None
) -> Any:
    from ray import tune

    from search.hparams import HParamsCallback
    from search.console import TrialLines
    from search.resume import CsvRows, JsonRows
    from search.schedulers import AuditLog
    from search.study import StudyBackup, make_searcher

    # The trial driver only waits on its TorchTrainer, whose workers reserve their own
    # resources: it holds no CPU slot (Ray needs some non-zero request: 1 MiB of memory).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, runs_path=exp.runs), {"CPU": 0, "memory": DRIVER_MEMORY}
    )
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # our own TensorBoard files, no copies
    if resume:
        return tune.Tuner.restore(exp.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, exp.study_db, audit=AuditLog(exp.path).load),
            scheduler=make_scheduler(space, exp),
            num_samples=space.experiment.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=exp.storage,
            failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
            callbacks=[
                CsvRows(),  # Tune's own loggers, whose rows stay in the experiment across drivers
                JsonRows(),
                TrialLines(space),  # one line per ended trial on the console
                HParamsCallback(space, exp.local, upload=None if exp.store.is_local else exp.store.upload),
                *([] if exp.store.is_local else [StudyBackup(exp.study_db, exp.store)]),
                *(callbacks or []),
            ],
        ),
    )


# Entry points ------------------------------------------------------------------------------------------------
@dataclass
class SearchOutcome:
    """The experiment, its trials as rows (the best first) and Tune's `ResultGrid`."""

    experiment: Experiment
    rows: list[TrialRow]
    results: ResultGrid
    answer: dict[str, Any] | None = None
    """The answer (`search.answer.build_answer`), also written as the experiment's report."""


def prepare(
    space_path: str | None, overrides: list[str], resume: bool, name: str | None, storage_path: str | None
) -> tuple[Space, Experiment, list[str]]:
    """Validate everything before anything starts: the space (or, with `resume`, the one
    recorded in the experiment), the storage, and what every trial needs (its data, a
    training set of at least one global batch, a pretrained checkpoint)."""
    sets = list(overrides)
    if name:
        sets.append(f"experiment.name={name}")
    storage_path = storage_path or os.environ.get(STORAGE_ENV)
    if storage_path:
        sets.append(f"experiment.storage_path={storage_path}")
    space = load_space(resolve_space_path(space_path) if space_path else QUICKSTART, sets)
    exp = experiment_for(space)
    Storage(exp.storage).check_writable()
    exists = exp.exists()
    if resume:
        if not exists:
            raise ConfigError(f"--resume: no experiment at {exp.path} to resume")
        space, info = recorded_space(exp)
        changed = [o for o in overrides if o not in info["overrides"]]
        if changed:
            raise ConfigError(
                f"--resume continues {exp.path} as it was started; {changed[0]!r} was not part of it "
                "(start a new experiment with --name to change the search)"
            )
        check_space_feasible(space.train, space.search, space.source, _first_rung(space))
        restore_study(exp)
        return space, exp, sets
    if exists:
        raise ConfigError(
            f"experiment {exp.path} already exists; add --resume to continue it or --name to start another "
            "(nothing was changed)"
        )
    check_space_feasible(space.train, space.search, space.source, _first_rung(space))
    return space, exp, sets


def _first_rung(space: Space) -> int | None:
    rungs = space.rung_epochs()
    return rungs[0] if rungs else None


def run_search(
    space: Space,
    exp: Experiment,
    sets: list[str],
    resume: bool = False,
    address: str | None = None,
    callbacks: list[Any] | None = None,
) -> SearchOutcome:
    """Run (or with `resume`, continue) the search; `callbacks` are extra Tune callbacks.
    A resumed search first reconciles the study with Tune's last snapshot
    (`search.resume.reconcile`); one killed before Tune saved anything starts Tune afresh."""
    connect(address)
    fits = check_resources(space)
    concurrent = space.experiment.max_concurrent_trials or fits
    restore = False
    if resume:
        from search.resume import reconcile

        restore = reconcile(exp, space).tune_state
    else:
        record_space(exp, space, sets)
    tuner = build_tuner(space, exp, concurrent, restore, callbacks)
    results = tuner.fit()
    from search.schedulers import read_audit

    rows = summarise(results, space, audited=read_audit(exp))
    run_confirmation(space, exp, rows, concurrent, callbacks)
    return SearchOutcome(exp, rows, results, write_answer(exp, space))


def run_confirmation(
    space: Space, exp: Experiment, rows: list[TrialRow], concurrent: int, callbacks: list[Any] | None = None,
    launch: Callable[[Any, str, str], None] | None = None,
) -> None:
    """The confirmation of the search's best configs and the baseline on paired seeds, then
    the ablation of the winner (`search.confirm`); each is skipped when off, and resumed
    when its state exists."""
    from search.answer import decide
    from search.confirm import ABLATE, CONFIRM, ablation_plan, confirm_plan, phase_exists, read_phase, run_phase

    if not space.confirmed or not finished(rows):
        return
    if any(r.status in ("error", "unfinished") for r in rows):  # --resume completes the search first
        logger.warning("confirmation not started: some search trials did not end (see below)")
        return
    plan = confirm_plan(rows, space)
    logger.info("confirmation: %s on seeds %s", ", ".join(e.label for e in plan), _seeds(space))
    confirmed = read_phase(exp, CONFIRM, space, run_phase(space, exp, CONFIRM, plan, concurrent, callbacks, launch))
    decision = decide(confirmed, space)
    if decision is None or not space.experiment.ablate:
        return
    ablations = ablation_plan(decision.winner.entry, space)
    if ablations or phase_exists(exp, ABLATE):
        logger.info("ablation of %s: %s", decision.winner.entry.label, ", ".join(e.label for e in ablations))
        run_phase(space, exp, ABLATE, ablations, concurrent, callbacks, launch)


def _seeds(space: Space) -> list[int]:
    c = space.experiment.confirm
    return [c.first_seed + i for i in range(c.seeds)] if c else []


def write_answer(exp: Experiment, space: Space) -> dict[str, Any]:
    """Build the answer and write the report into `<experiment>/report/`."""
    from search.answer import build_answer
    from search.report import publish_report

    from search.confirm import ABLATE, CONFIRM, read_phase
    from search.study import record_phase

    for phase in (CONFIRM, ABLATE):
        measured = read_phase(exp, phase, space)
        if measured:
            record_phase(exp.study_db, exp.name, phase, measured, space.experiment.mode)
    answer = build_answer(exp, space)
    publish_report(exp, answer)
    return answer


def answer_block(answer: dict[str, Any] | None, exp: Experiment) -> str:
    """The answer as the console shows it at the end of a search."""
    if answer is None:
        return "no answer"
    lines = ["answer: " + answer["message"]]
    for c in answer.get("confirm") or []:
        if c.get("mean") is None:
            continue
        ci = f" [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c.get("ci95") else ""
        lines.append(f"  {c['label']:<12} {c['mean']:.4f}{ci}  {', '.join(c['changed']) or '(no trick changed)'}")
    for a in answer.get("ablation") or []:
        lines.append(f"  trick {a['trick']}: {a['delta']:+.4f} [{a['ci95'][0]:+.4f}, {a['ci95'][1]:+.4f}]")
    lines.append(f"report:     {exp.path}/report/report.md")
    lines.append(f"export it:  python -m search.export --experiment {exp.path} --out best.yaml")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m search.run",
        description="Search which training tricks pay off: Ray Tune + Optuna (TPE) + ASHA over "
        "ResNet-vd DDP runs. With no arguments: the quickstart space on the digits data.",
    )
    p.add_argument("--space", help="space YAML file or a shipped space's name (default: quickstart)")
    p.add_argument("--address", help="Ray cluster address (host:port); default: the cluster running here, or a new "
                   "local one; 'local': always a new local one")
    p.add_argument("--name", help="experiment name (default: the space's experiment.name)")
    p.add_argument("--storage-path", help="folder or URI (s3://, gs://) holding experiments")
    p.add_argument("--num-samples", type=int, help="number of trials")
    p.add_argument("--max-concurrent-trials", type=int, help="trials at the same time (default: as many as fit)")
    p.add_argument("--resume", action="store_true", help="continue the experiment after an interruption")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the space, e.g. train.run.epochs=2 or experiment.num_samples=4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # progress to stdout: stderr carries only the one `error:` line of a user error
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    sets = list(args.set)
    if args.num_samples is not None:
        sets.append(f"experiment.num_samples={args.num_samples}")
    if args.max_concurrent_trials is not None:
        sets.append(f"experiment.max_concurrent_trials={args.max_concurrent_trials}")
    exp = None
    try:
        space, exp, sets = prepare(args.space, sets, args.resume, args.name, args.storage_path)
        print(f"experiment: {exp.path}")
        print(f"  watch:  tensorboard --logdir {exp.path}")
        print(f"  study:  optuna-dashboard sqlite:///{exp.study_db}")
        outcome = run_search(space, exp, sets, resume=args.resume, address=args.address)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a storage that stopped taking writes: one line, else a bug
        line = storage_failure(exp, err) if exp is not None else None
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    print()
    print(format_table(outcome.rows, space))
    done = finished(outcome.rows)
    print()
    print(answer_block(outcome.answer, exp))
    errors = [r for r in outcome.rows if r.status == "error"]
    ended_badly = [r for r in outcome.rows if r.status in ("error", FAILED, DIVERGED)]
    for r in ended_badly:
        how = {"error": "failed", FAILED: "failed (not retried)", DIVERGED: "ended"}[r.status]
        print(f"trial {r.trial_id} {how}: {r.error}", file=sys.stderr)
    line = storage_failure(exp, trial_errors=[r.error or "" for r in errors]) if errors else None
    if line is not None:
        print(f"error: {line}", file=sys.stderr)
        return 1
    return 1 if ended_badly and not done else 0


if __name__ == "__main__":
    sys.exit(main())
