"""Which failures of a training run are worth a retry.

Ray Train restarts a run's worker group after any worker error (up to
`distributed.max_failures`), and a search restarts a failed trial. Both help only when the
cause can go away: a lost worker or node, an OOM kill. A `ConfigError` (`DataError`
included, and so `trainable.staging.NodeCacheError`: a node whose data cache folder cannot be
written or is too small for the staged data would fail the same way on the next attempt)
raised while making the config or on a worker comes back on every attempt, so it
ends the run at once (`EndOnUserError`; the search's trial asks `deterministic_cause`). A
run that diverged does not fail at all: the worker loop turns it into a final result
(`trainable.loop.diverged_metrics`).
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from trainable.config import ConfigError

__all__ = ["EndOnUserError", "FixedMicroBatchOutOfMemory", "deterministic_cause", "out_of_memory"]


class FixedMicroBatchOutOfMemory(ConfigError):
    """A CUDA out-of-memory at a fixed `batch.micro_batch`: the same config on the same
    device runs out of memory on every attempt, so it is not retried."""


def out_of_memory(err: BaseException, cfg: Any, device_memory: int | None = None) -> BaseException:
    """What a worker raises for the CUDA out-of-memory `err` while training `cfg` (a
    `TrainConfig`): with a fixed micro-batch, a `FixedMicroBatchOutOfMemory` naming the
    global batch, the micro-batch, the workers and the device's memory (bytes; None when
    unknown) and suggesting `micro_batch: auto`; with `auto` (probed), `err` itself, retried
    like any other failure."""
    b = cfg.batch
    if b.micro_batch == "auto":
        return err
    memory = f" on a device with {device_memory / 2**30:.1f} GiB" if device_memory else ""
    return FixedMicroBatchOutOfMemory(
        f"CUDA out of memory at batch.global_batch {b.global_batch} with batch.micro_batch {b.micro_batch} "
        f"(x {cfg.distributed.num_workers} workers){memory}: the same config runs out of memory on every "
        "attempt, so it is not retried; set batch.micro_batch: auto (the largest micro-batch that fits) or "
        "a smaller micro_batch"
    )


def deterministic_cause(err: BaseException | list[BaseException]) -> BaseException | None:
    """The user error behind a failure when no retry can help: a `ConfigError` raised by the
    config or on any worker (`TrainingFailedError.worker_failures` holds each failed rank's
    own exception), with no worker lost (a lost worker, node or OOM kill is a Ray error: it is
    retried, whatever the other ranks raised after it). None otherwise."""
    from ray.exceptions import RayError

    causes = [c for e in (err if isinstance(err, list) else [err]) for c in _causes(e)]
    if any(isinstance(c, RayError) for c in causes):
        return None
    return next((c for c in causes if isinstance(c, ConfigError)), None)


def _causes(err: BaseException, depth: int = 0) -> list[BaseException]:
    """The innermost exceptions of a (nested, remote) failure."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, dict) and failures and depth < 8:
        return [c for f in failures.values() for c in _causes(f, depth + 1)]
    for attr in ("controller_failure", "cause"):  # Ray Train's ControllerError, Ray's RayTaskError
        inner = getattr(err, attr, None)
        if isinstance(inner, BaseException) and inner is not err and depth < 8:
            return _causes(inner, depth + 1)
    return [err]


class EndOnUserError(UserCallback):
    """A Ray Train callback (run by the controller) that ends a run at its first config or
    data error instead of restarting its workers: it raises that error, and an error raised
    in a callback is a controller error, which Ray Train's failure policy never retries.
    `fit()` then raises a `ControllerError` whose `controller_failure` is the user error."""

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        cause = deterministic_cause(list(worker_exceptions.values()))
        if cause is not None:
            raise cause
