"""One driver per experiment: `<experiment>/driver.lease`, held with a heartbeat.

A driver takes the lease before it touches the experiment and renews its heartbeat every
`HEARTBEAT_S` seconds from a background thread; a second driver is refused at once, with
one line naming the host and process that hold the lease and the age of their heartbeat. A
lease whose heartbeat is older than `STALE_S` (its driver was killed, or lost its machine),
or held by a process of this host that no longer exists, is taken over with a warning. The
lease lives where the experiment lives (a local folder or object storage, through
`trainable.storage.Storage`), so drivers on different machines see it too.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from trainable.config import ConfigError
from trainable.storage import Storage

__all__ = ["HEARTBEAT_S", "LEASE_FILE", "STALE_S", "DriverLease", "LeaseHeld"]

logger = logging.getLogger(__name__)

LEASE_FILE = "driver.lease"
HEARTBEAT_S = 10.0
STALE_S = 60.0
"""A heartbeat older than this (six missed beats) means its driver is gone."""


class LeaseHeld(ConfigError):
    """Another live driver holds the experiment."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class DriverLease:
    """The lease of one experiment for this process (`acquire` ... `release`, or a `with`)."""

    def __init__(self, store: Storage, label: str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S) -> None:
        self.store, self.label = store, label
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            if not self.store.exists(LEASE_FILE):
                return None
            data = json.loads(self.store.read_text(LEASE_FILE))
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def _write(self) -> None:
        data = {"host": self.host, "pid": self.pid, "token": self.token, "heartbeat": time.time()}
        self.store.write_text(LEASE_FILE, json.dumps(data) + "\n", overwrite=True)

    def holder(self) -> str | None:
        """Why another driver holds the lease (one line), or None when it is free or stale."""
        data = self._read()
        if data is None or data.get("token") == self.token or data.get("released"):
            return None
        age = time.time() - float(data.get("heartbeat", 0))
        host, pid = str(data.get("host")), int(data.get("pid", 0))
        if host == self.host and pid == self.pid:  # this process's own, left by a driver that ended
            return None
        gone = host == self.host and not _pid_alive(pid)
        if age > self.stale_s or gone:
            why = "its process is gone" if gone else f"its heartbeat is {age:.0f} s old (over {self.stale_s:.0f} s)"
            logger.warning("taking over the lease of %s from %s pid %d: %s", self.label, host, pid, why)
            return None
        return (
            f"{self.label} is driven by another process: host {host} pid {pid}, heartbeat {max(age, 0):.0f} s ago "
            f"(a lease is taken over once its heartbeat is {self.stale_s:.0f} s old); nothing was changed"
        )

    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeld` (one line) while another live driver holds it."""
        held = self.holder()
        if held:
            raise LeaseHeld(held)
        self._write()
        time.sleep(min(0.2, self.heartbeat_s))  # two drivers starting together: the last write wins
        data = self._read()
        if data is not None and data.get("token") != self.token:
            raise LeaseHeld(self.holder() or f"{self.label} was taken by another driver starting at the same time")
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="driver-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                data = self._read()
                if data is not None and data.get("token") != self.token:
                    logger.error("the lease of %s was taken over by %s pid %s", self.label, data.get("host"),
                                 data.get("pid"))
                    return
                self._write()
            except OSError as err:  # a storage hiccup: the next beat tries again
                logger.warning("lease heartbeat of %s not written: %s", self.label, err)

    def release(self) -> None:
        """Stop the heartbeat and free the lease (if still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s + 5)
            self._thread = None
        try:
            data = self._read()
            if data is not None and data.get("token") == self.token:
                self.store.write_text(LEASE_FILE, json.dumps({**data, "released": True, "heartbeat": 0}) + "\n",
                                      overwrite=True)
        except OSError as err:  # a storage that stopped taking writes: the lease goes stale instead
            logger.warning("the lease of %s was not released (%s); the next driver takes it over once it is stale "
                           "or this process has ended", self.label, err)

    def __enter__(self) -> DriverLease:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
