"""`python -m search.run`: the trick search, read top to bottom.

prepare (the space, the storage, the data: before anything is reserved) -> search (Ray
Tune: TPE proposes, ASHA stops early, every trial one Ray Train `TorchTrainer` run;
`search.phases.search`) -> confirm (the best configs and the baseline on paired seeds;
`search.phases.confirm`) -> ablate (the winner's tricks one at a time) -> answer
(`search.answer`) -> report (`<experiment>/report/`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from search.experiment.faults import storage_failure
from search.experiment.folder import Experiment, experiment_for, record_space, recorded_space, restore_study
from search.experiment.trials import TrialRow, finished, format_table, summarise
from spaces import QUICKSTART, Space, load_space, resolve_space_path
from trainable.cluster import connect
from trainable.config import ConfigError
from trainable.feasibility import check_space_feasible
from trainable.status import DIVERGED, FAILED
from trainable.storage import STORAGE_ENV, Storage

if TYPE_CHECKING:
    from ray.tune import ResultGrid

logger = logging.getLogger(__name__)


# Entry points ------------------------------------------------------------------------------------------------
@dataclass
class SearchOutcome:
    """The experiment, its trials as rows (the best first) and Tune's `ResultGrid`."""

    experiment: Experiment
    rows: list[TrialRow]
    results: ResultGrid
    answer: dict[str, Any] | None = None
    """The answer (`search.answer.build.build_answer`), also written as the experiment's report."""


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
    (`search.experiment.resume.reconcile`, with the scheduler's decisions read back from
    `scheduler/audit.json`); one killed before Tune saved anything starts Tune afresh. The driver holds
    the experiment's lease (`search.experiment.lease`) throughout: a second driver is refused."""
    from search.experiment.audit import read_audit
    from search.experiment.lease import DriverLease
    from search.phases.schedulers import make_scheduler
    from search.phases.search import build_tuner
    from search.phases.trial import check_resources

    lease = DriverLease(exp.store, exp.path)
    if resume:
        from search.experiment.ray_private import check_resume

        check_resume()
    lease.acquire()
    try:
        connect(address)
        fits = check_resources(space)
        concurrent = space.experiment.max_concurrent_trials or fits
        restore = False
        if resume:
            from search.experiment.resume import reconcile

            restore = reconcile(exp, space, make_scheduler(space, exp)).tune_state
        else:
            record_space(exp, space, sets)
        tuner = build_tuner(space, exp, concurrent, restore, callbacks)
        results = tuner.fit()
        rows = summarise(results, space, audited=read_audit(exp))
        run_confirmation(space, exp, rows, concurrent, callbacks)
        return SearchOutcome(exp, rows, results, write_answer(exp, space))
    finally:
        lease.release()


def run_confirmation(
    space: Space, exp: Experiment, rows: list[TrialRow], concurrent: int, callbacks: list[Any] | None = None,
    launch: Callable[[Any, str, str], None] | None = None,
) -> None:
    """The confirmation of the search's best configs and the baseline on paired seeds, then
    the ablation of the winner (`search.phases.confirm`); each is skipped when off, and resumed
    when its state exists."""
    from search.answer.decide import decide
    from search.experiment.phases import ABLATE, CONFIRM, phase_exists, read_phase
    from search.phases.confirm import ablation_plan, confirm_plan, run_phase

    if not space.confirmed or not finished(rows):
        return
    if any(r.status == "unfinished" for r in rows):  # --resume completes the search first
        logger.warning("confirmation not started: some search trials did not end (see below)")
        return
    errored = [r for r in rows if r.status == "error"]
    if errored:  # the confirmation starts from the trials that finished; --resume may retry these
        logger.warning("%d of %d search trials failed (%s); the confirmation starts from the others",
                       len(errored), len(rows), ", ".join(r.trial_id for r in errored))
    plan = confirm_plan(rows, space)
    logger.info("confirmation: %s on seeds %s", ", ".join(e.label for e in plan), space.confirm_seeds)
    confirmed = read_phase(exp, CONFIRM, space, run_phase(space, exp, CONFIRM, plan, concurrent, callbacks, launch))
    decision = decide(confirmed, space)
    if decision is None or not space.experiment.ablate:
        return
    ablations = ablation_plan(decision.winner.entry, space)
    if ablations or phase_exists(exp, ABLATE):
        logger.info("ablation of %s: %s", decision.winner.entry.label, ", ".join(e.label for e in ablations))
        run_phase(space, exp, ABLATE, ablations, concurrent, callbacks, launch, seeds=decision.winner.seeds)


def write_answer(exp: Experiment, space: Space) -> dict[str, Any]:
    """Build the answer and write the report into `<experiment>/report/`."""
    from search.answer.build import build_answer
    from search.answer.report import publish_report
    from search.experiment.phases import ABLATE, CONFIRM, read_phase
    from search.experiment.study import record_phase

    for phase in (CONFIRM, ABLATE):
        measured = read_phase(exp, phase, space)
        if measured:
            record_phase(exp.study_db, exp.name, phase, measured, space.experiment.mode, space.experiment.metric)
    answer = build_answer(exp, space)
    publish_report(exp, answer)
    return answer


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
    p.add_argument("--verbose", action="store_true",
                   help="Ray's own console too (its trial table, each trial's config and results, worker lines)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the space, e.g. train.run.epochs=2 or experiment.num_samples=4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from search.phases.console import PhaseProgress, answer_block, configure_console, header

    # progress to stdout: stderr carries only the one `error:` line of a user error
    configure_console(args.verbose)
    sets = list(args.set)
    if args.num_samples is not None:
        sets.append(f"experiment.num_samples={args.num_samples}")
    if args.max_concurrent_trials is not None:
        sets.append(f"experiment.max_concurrent_trials={args.max_concurrent_trials}")
    exp = None
    try:
        space, exp, sets = prepare(args.space, sets, args.resume, args.name, args.storage_path)
        print(header(space, exp), flush=True)
        progress = [] if args.verbose else [PhaseProgress(space)]
        outcome = run_search(space, exp, sets, resume=args.resume, address=args.address, callbacks=progress)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a storage that stopped taking writes: one line, else a bug
        line = storage_failure(exp, err) if exp is not None else None
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 1
    if args.verbose:  # the phases' summaries said it already
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
    state = (outcome.answer or {}).get("state")
    if state != "finished":  # the report's state says why (searching, confirming, ablating)
        print(f"error: the experiment ended without an answer (state: {state}); the report says why, "
              f"and --resume continues it", file=sys.stderr)
        return 1
    return 1 if ended_badly and not done else 0


if __name__ == "__main__":
    sys.exit(main())
