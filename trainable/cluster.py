"""Connecting to Ray and turning run failures into one line. Shared by the production CLI
and the search."""

from __future__ import annotations

import logging
import os
import socket
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


def connect(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the Ray cluster at `address`; with None, the cluster already running on this
    machine when there is one, else a new local instance."""
    import ray

    if ray.is_initialized():
        return
    if address:
        _probe(address)
        try:
            ray.init(address=address, **init_kwargs)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise ConfigError(f"--address {address}: cannot join the Ray cluster ({err})") from None
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
        return
    try:
        ray.init(address="auto", **init_kwargs)
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
