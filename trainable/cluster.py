"""Connecting to Ray and turning run failures into one line. Shared by the production CLI
and the search."""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
from typing import Any

from trainable.config import ConfigError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0


def _probe(address: str) -> None:
    """Fail within seconds, not minutes, when nothing listens at host:port."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address {address!r}: expected host:port (the head's GCS port, usually 6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({err.strerror or err})") from None


# Console lines from Ray that look like failures when nothing failed ----------------------------------
SKIP_LINES_ENV = "RAY_DEDUP_LOGS_SKIP_REGEX"
_QUIET_PATTERNS = (
    r"Actor with class name: 'PreemptionWatcher' .* has constructor arguments in the object store",
    r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
    r"WARNING: \d+ PYTHON worker processes have been started on node",
)
QUIET_WORKER_LINES = "|".join(_QUIET_PATTERNS)
"""Worker output the driver does not print (`RAY_DEDUP_LOGS_SKIP_REGEX`, which a user's own
value overrides); it stays in the session's log files. Each is printed for every trial
when nothing failed:
- Ray Train's controller starts a restartable `PreemptionWatcher` actor with the worker
  actors' handles as arguments; Ray Core then logs an ERROR, once per controller process,
  that such arguments might not survive a restart. The arguments and the actor are Ray's
  own, and a new watcher is started with every worker group.
- When Tune ends a trial on its last result or ASHA stops it, the trial's TorchTrainer
  controller ends with it, and Ray Train's placement-group cleaner releases the workers'
  resources with a WARNING, as designed. A trial that failed reports its own error.
- The raylet warns when more Python processes start at once than a node has CPUs: every
  trial starts several small ones (Tune's trial, Ray Train's controller and helpers)."""
TOKEN_AUTH_DEFAULT = "Token authentication is enabled for this Ray cluster"
"""Ray's WARNING when `ray.init` starts (or finds) a cluster and turns token authentication
on by default, as it should: authentication stays on, the line goes."""


class _DropMessages(logging.Filter):
    """Drops records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_DROP_TOKEN_AUTH_DEFAULT = _DropMessages(TOKEN_AUTH_DEFAULT)


def quiet_ray_console() -> None:
    """Keep lines that look like failures out of a console where nothing failed (see
    `QUIET_WORKER_LINES`, `TOKEN_AUTH_DEFAULT`). Call before `ray.init`; harmless twice."""
    os.environ.setdefault(SKIP_LINES_ENV, QUIET_WORKER_LINES)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_DROP_TOKEN_AUTH_DEFAULT)
    # Ray reads the variable when it is imported: a driver that imported it already gets
    # the pattern set on the printers of worker output (when the user set none).
    ray_logging = sys.modules.get("ray._private.ray_logging")
    for name in ("stdout_deduplicator", "stderr_deduplicator"):
        printer = getattr(ray_logging, name, None)
        if printer is not None and getattr(printer, "skip_re", "absent") is None:
            printer.skip_re = re.compile(os.environ[SKIP_LINES_ENV])


# Ray settings for short runs -------------------------------------------------------------------------
RAY_SETTINGS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "900"}
"""Ray Train's controller acts on its worker group once per health check, every 2 s by
default, and a run needs several of those rounds to start and one to end: a trivial
TorchTrainer run took 16.4 s at 2 s and 11.2 s at 0.5 s (median of 3 each, 2 cores), with
no further gain at 0.2 s or 0.1 s. A check is one small call per worker. Ray Train gives up on
a worker group that has not started within 60 s by default, which a loaded machine (workers
importing torch on busy cores) exceeds while nothing is wrong: 900 s. A value already in the
environment is kept."""


def ray_env() -> dict[str, str]:
    """`RAY_SETTINGS`, each overridden by the environment, also put into it (a TorchTrainer
    built in this process passes them on to its controller and workers)."""
    for key, value in RAY_SETTINGS.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in RAY_SETTINGS}


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the Ray cluster at `address`; with None, the cluster already running on this
    machine when there is one, else a new local instance. The console is kept for people
    (`quiet_ray_console`) and Ray Train is tuned for short runs (`RAY_SETTINGS`): a new
    local instance inherits them from this process, the job on an existing cluster gets
    them through its runtime environment."""
    quiet_ray_console()
    env = ray_env()
    import ray

    if ray.is_initialized():
        return
    joined = dict(init_kwargs)
    runtime_env = dict(joined.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env, **(runtime_env.get("env_vars") or {})}
    joined["runtime_env"] = runtime_env
    if address:
        _probe(address)
        try:
            ray.init(address=address, **joined)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise ConfigError(f"--address {address}: cannot join the Ray cluster ({err})") from None
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**joined)
        return
    try:
        ray.init(address="auto", **joined)
        logger.info("joined the Ray cluster running on this machine")
    except (ConnectionError, ValueError, RuntimeError):
        ray.init(**init_kwargs)


def error_line(err: BaseException) -> str:
    """The one line worth printing from a (possibly nested, remote) training failure."""
    failures = getattr(err, "worker_failures", None)
    if failures:
        first = failures[min(failures)]
        cause = getattr(first, "cause", None) or first
        return f"{type(cause).__name__}: {_last_line(str(cause))}"
    inner = getattr(err, "controller_failure", None)
    if inner is not None:
        return error_line(inner)
    return f"{type(err).__name__}: {_last_line(str(err))}"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "diverged:" in ln:
            return ln[ln.index("diverged:"):]
    return lines[-1] if lines else ""
