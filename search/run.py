"""`python -m search.run`: the trick search.

Ray Tune drives it: Optuna's TPE proposes trick combinations from the space, ASHA stops
the poor trials early on the validation metric, and every trial is one Ray Train
`TorchTrainer` run of the `TrainConfig` the space and the proposal make together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spaces import QUICKSTART, Space, load_space, resolve_space_path
from trainable.cluster import check_storage, connect, error_line
from trainable.config import ConfigError
from trainable.storage import Storage, expand_storage, local_mirror

logger = logging.getLogger(__name__)

SPACE_COPY = "space.yaml"
SEARCH_INFO = "search.json"
RUNS_DIR = "runs"
TRIAL_NAME_PREFIX = "trial_"
DRIVER_MEMORY = 2**20
STORAGE_ENV = "TRICK_SEARCH_STORAGE"  # the default --storage-path (set once per cluster)


# The experiment folder --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experiment:
    """Where a search keeps everything: `<storage>/<name>/`, a local folder or a URI."""

    storage: str
    name: str

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    @property
    def store(self) -> Storage:
        return Storage(self.path)

    @property
    def local(self) -> str:
        """Where files that must sit on a local disk live (the SQLite study, TensorBoard's
        HParams files while they are written): the experiment itself when it is local, else
        a mirror that is uploaded as the search runs."""
        return self.path if self.store.is_local else str(local_mirror(self.path))

    @property
    def study_db(self) -> str:
        from search.study import STUDY_FILE

        return f"{self.local}/{STUDY_FILE}"

    @property
    def runs(self) -> str:
        return f"{self.path}/{RUNS_DIR}"


def experiment_for(space: Space) -> Experiment:
    return Experiment(expand_storage(space.experiment.storage_path), space.experiment.name)


def record_space(exp: Experiment, space: Space, overrides: list[str]) -> None:
    """Keep the space as given (and the overrides) inside the experiment, so `--resume` and
    the export read exactly what the search ran."""
    store = exp.store
    store.write_text(SPACE_COPY, Path(space.source).read_text())
    info = {"space_file": str(space.source), "sha256": space.sha256, "overrides": overrides}
    store.write_text(SEARCH_INFO, json.dumps(info, indent=2) + "\n")


def recorded_space(exp_path: str, extra: list[str] | None = None) -> tuple[Space, dict[str, Any]]:
    """The space an experiment ran, with its overrides (and `extra` ones)."""
    store = Storage(exp_path)
    if not store.exists(SEARCH_INFO):
        raise ConfigError(f"{exp_path}: not an experiment of this tool (no {SEARCH_INFO})")
    info = json.loads(store.read_text(SEARCH_INFO))
    if store.is_local:
        space_file = Path(store.fs_path(SPACE_COPY))
    else:
        space_file = local_mirror(store.root) / SPACE_COPY
        space_file.write_text(store.read_text(SPACE_COPY))
    space = load_space(space_file, list(info["overrides"]) + list(extra or []))
    return space, info


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
def run_trial(config: dict[str, Any], space: Space, runs_path: str) -> None:
    """One Tune trial: the sampled tricks on top of the space's base config, trained by a
    TorchTrainer named after the trial, so a restarted trial resumes from its checkpoint."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from search.sampling import sampled_values
    from trainable.train import build_trainer

    cfg = space.config_for(sampled_values(config))
    trial_id = tune.get_context().get_trial_id()
    trainer = build_trainer(cfg, f"{TRIAL_NAME_PREFIX}{trial_id}", runs_path, callbacks=[TuneReportCallback()])
    trainer.fit()


def make_scheduler(space: Space) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = space.experiment.scheduler
    if s.kind == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        metric=space.experiment.metric,
        mode=space.experiment.mode,
        max_t=space.train.run.epochs,
        grace_period=s.grace_period,
        reduction_factor=s.reduction_factor,
    )


def build_tuner(
    space: Space, exp: Experiment, concurrent: int, resume: bool, callbacks: list[Any] | None = None
) -> Any:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from search.hparams import HParamsCallback
    from search.study import StudyBackup, make_searcher

    # The trial driver only waits on its TorchTrainer, whose workers reserve their own
    # resources: it holds no CPU slot (Ray needs some non-zero request: 1 MiB of memory).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, runs_path=exp.runs), {"CPU": 0, "memory": DRIVER_MEMORY}
    )
    if resume:
        return tune.Tuner.restore(exp.path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"  # our own TensorBoard files, no copies
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(space, exp.study_db),
            scheduler=make_scheduler(space),
            num_samples=space.experiment.num_samples,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(
            name=exp.name,
            storage_path=exp.storage,
            failure_config=tune.FailureConfig(max_failures=space.experiment.max_failures),
            callbacks=[
                CSVLoggerCallback(),
                JsonLoggerCallback(),
                HParamsCallback(space, exp.local, upload=None if exp.store.is_local else exp.store.upload),
                *([] if exp.store.is_local else [StudyBackup(exp.study_db, exp.store)]),
                *(callbacks or []),
            ],
        ),
    )


# Results --------------------------------------------------------------------------------------------------
@dataclass
class TrialRow:
    trial_id: str
    values: dict[str, Any]
    best: float | None
    epochs: int
    status: str


def summarise(results: Any, space: Space) -> list[TrialRow]:
    metric, max_t = space.experiment.metric, space.train.run.epochs
    rows = []
    for r in results:
        df = r.metrics_dataframe
        m = r.metrics or {}
        best = None
        if df is not None and metric in df:
            col = df[metric].dropna()
            if len(col):
                best = float(col.max() if space.experiment.mode == "max" else col.min())
        epochs = int(m.get("epoch", 0) or 0)
        status = "error" if r.error else ("done" if epochs >= max_t else "stopped early")
        values = {p: r.config.get(p) for p in space.searched_paths if p in r.config}
        rows.append(TrialRow(str(m.get("trial_id", "?")), values, best, epochs, status))
    reverse = space.experiment.mode == "max"
    rows.sort(key=lambda t: (t.best is None, -(t.best or 0) if reverse else (t.best or 0)))
    return rows


def format_table(rows: list[TrialRow], space: Space) -> str:
    paths = list(space.searched_paths)
    head = ["trial", *paths, f"best {space.experiment.metric}", "epochs", "status"]
    body = []
    for t in rows:
        vals = [_fmt(t.values.get(p, "-")) for p in paths]
        body.append([t.trial_id, *vals, _fmt(t.best), str(t.epochs), t.status])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(b) for b in body)])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# Entry points ------------------------------------------------------------------------------------------------
@dataclass
class SearchOutcome:
    experiment: Experiment
    rows: list[TrialRow]
    results: Any


def prepare(
    space_path: str | None, overrides: list[str], resume: bool, name: str | None, storage_path: str | None
) -> tuple[Space, Experiment, list[str]]:
    """Validate everything before anything starts: the space (or, with `resume`, the one
    recorded in the experiment) and the storage."""
    sets = list(overrides)
    if name:
        sets.append(f"experiment.name={name}")
    storage_path = storage_path or os.environ.get(STORAGE_ENV)
    if storage_path:
        sets.append(f"experiment.storage_path={storage_path}")
    space = load_space(resolve_space_path(space_path) if space_path else QUICKSTART, sets)
    exp = experiment_for(space)
    check_storage(exp.storage)
    exists = exp.store.exists(SEARCH_INFO)
    if resume:
        if not exists:
            raise ConfigError(f"--resume: no experiment at {exp.path} to resume")
        space, info = recorded_space(exp.path)
        changed = [o for o in overrides if o not in info["overrides"]]
        if changed:
            raise ConfigError(
                f"--resume continues {exp.path} as it was started; {changed[0]!r} was not part of it "
                "(start a new experiment with --name to change the search)"
            )
        restore_study(exp)
        return space, exp, sets
    if exists:
        raise ConfigError(
            f"experiment {exp.path} already exists; add --resume to continue it or --name to start another "
            "(nothing was changed)"
        )
    return space, exp, sets


def restore_study(exp: Experiment) -> None:
    """On a remote storage the study's SQLite file lives on this machine and a copy in the
    experiment; a head that lost its disk takes the copy back."""
    from search.study import STUDY_FILE

    if not exp.store.is_local and not os.path.exists(exp.study_db) and exp.store.exists(STUDY_FILE):
        exp.store.download(STUDY_FILE, exp.study_db)


def run_search(
    space: Space,
    exp: Experiment,
    sets: list[str],
    resume: bool = False,
    address: str | None = None,
    callbacks: list[Any] | None = None,
) -> SearchOutcome:
    """Run (or with `resume`, continue) the search; `callbacks` are extra Tune callbacks."""
    connect(address)
    fits = check_resources(space)
    concurrent = space.experiment.max_concurrent_trials or fits
    if not resume:
        record_space(exp, space, sets)
    tuner = build_tuner(space, exp, concurrent, resume, callbacks)
    results = tuner.fit()
    return SearchOutcome(exp, summarise(results, space), results)


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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sets = list(args.set)
    if args.num_samples is not None:
        sets.append(f"experiment.num_samples={args.num_samples}")
    if args.max_concurrent_trials is not None:
        sets.append(f"experiment.max_concurrent_trials={args.max_concurrent_trials}")
    try:
        space, exp, sets = prepare(args.space, sets, args.resume, args.name, args.storage_path)
        print(f"experiment: {exp.path}")
        print(f"  watch:  tensorboard --logdir {exp.path}")
        print(f"  study:  optuna-dashboard sqlite:///{exp.study_db}")
        outcome = run_search(space, exp, sets, resume=args.resume, address=args.address)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print()
    print(format_table(outcome.rows, space))
    finished = [r for r in outcome.rows if r.status == "done" and r.best is not None]
    if finished:
        best = finished[0]
        print(f"\nbest trial {best.trial_id}: {space.experiment.metric} {best.best:.4f} with {best.values}")
        print(f"export it:  python -m search.export --experiment {exp.path} --out best.yaml")
    else:
        print("\nno trial finished all its epochs")
    errors = [r for r in outcome.rows if r.status == "error"]
    for r in outcome.results:
        if r.error:
            print(f"trial {r.metrics.get('trial_id', '?') if r.metrics else '?'} failed: {error_line(r.error)}", file=sys.stderr)
    return 1 if errors and not finished else 0


if __name__ == "__main__":
    sys.exit(main())
