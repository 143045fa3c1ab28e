"""Which failures of a training run are worth a retry.

Ray Train restarts a run's worker group after any worker error (up to
`distributed.max_failures`), and a search restarts a failed trial. Both help only when the
cause can go away: a lost worker or node, an OOM kill. A `ConfigError` (`DataError`
included) raised while making the config or on a worker comes back on every attempt, so it
ends the run at once (`EndOnUserError`; the search's trial asks `deterministic_cause`). A
run that diverged does not fail at all: the worker loop turns it into a final result
(`trainable.loop.diverged_metrics`).
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from trainable.config import ConfigError

__all__ = ["EndOnUserError", "deterministic_cause"]


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
