"""One trial of any phase, as Tune runs it: the config it trains, the resources it asks for,
and the one final result of a failure no retry changes.

A trial is Ray's `train_tune_interop.py` pattern: a Tune function that launches one
`TorchTrainer` named after the trial, so a restarted trial resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

from search.experiment.folder import TRIAL_NAME_PREFIX
from search.experiment.sampling import sampled_values
from spaces import Space
from trainable.config import ConfigError
from trainable.status import FAILED, RUN_ERROR, RUN_STATUS, worst_value

logger = logging.getLogger(__name__)

__all__ = ["DRIVER_MEMORY", "check_resources", "launch_trainer", "run_trial", "train_or_report_failure",
           "trial_resources", "trial_trainable"]

DRIVER_MEMORY = 2**20
"""A trial's Tune driver only waits on its TorchTrainer, whose workers reserve their own
resources: it holds no CPU slot (Ray needs some non-zero request: 1 MiB of memory)."""


def trial_trainable(fn: Callable[..., None], **params: Any) -> Any:
    """`fn` as a Tune trainable with `params` bound and the driver's resources."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(fn, **params), {"CPU": 0, "memory": DRIVER_MEMORY})


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
        cfg = make_config()
        if not _report_finished_run(cfg, name, runs_path):
            (launch or launch_trainer)(cfg, name, runs_path)
    except Exception as err:
        cause = deterministic_cause(err)
        if cause is None:
            raise
        reason = " ".join(str(cause).split()) or type(cause).__name__
        logger.error("%s failed (not retried: the same config fails the same way): %s", name, reason)
        metric = space.experiment.metric
        tune.report({metric: worst_value(metric), RUN_STATUS: FAILED, RUN_ERROR: reason})


def _report_finished_run(cfg: Any, name: str, runs_path: str) -> bool:
    """A trial restarted after its training ran all its epochs (its driver was killed before
    Tune recorded the end) would report nothing, and Tune would end it without a result:
    the last checkpoint's result is reported again instead. Whether it was."""
    from ray import tune

    from search.experiment.resume import run_record_metrics
    from trainable.storage import Storage

    metrics = run_record_metrics(Storage(runs_path), name)
    if metrics is None or int(metrics.get("epoch", 0)) < cfg.run.epochs:
        return False
    logger.info("%s had trained all its epochs: its last checkpoint's result reported again", name)
    tune.report(metrics)
    return True


def launch_trainer(cfg: Any, name: str, runs_path: str) -> None:
    """Train `cfg` as the TorchTrainer run `name`, its reports forwarded to the Tune trial."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainable.train import build_trainer

    build_trainer(cfg, name, runs_path, callbacks=[TuneReportCallback()]).fit()
