"""One driver per experiment: a second driver is refused at once with one line naming the
holder; a stale or dead holder's lease is taken over; two real processes."""

from __future__ import annotations

import json
import subprocess
import time

from search.experiment.lease import LEASE_FILE, DriverLease, LeaseHeld
from tests.conftest import PYTHON, ROOT, cli_env
from trainable.storage import Storage

HOLD = """
import sys, time
from search.experiment.lease import DriverLease
from trainable.storage import Storage
lease = DriverLease(Storage(sys.argv[1]), "exp", heartbeat_s=0.2)
lease.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_driver_is_refused_while_the_first_lives_and_takes_over_once_it_is_killed(tmp_path):
    first = subprocess.Popen([PYTHON, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                             text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        second = subprocess.run([PYTHON, "-c", HOLD, str(tmp_path)], cwd=ROOT, env=cli_env(), capture_output=True,
                                text=True, timeout=60)
        assert second.returncode != 0
        line = second.stderr.strip().splitlines()[-1]
        assert f"pid {first.pid}" in line and "heartbeat" in line and "s ago" in line, line
    finally:
        first.kill()
        first.wait(timeout=30)
    # its process is gone: taken over at once
    lease = DriverLease(Storage(str(tmp_path)), "exp")
    lease.acquire()
    lease.release()


def test_a_stale_lease_is_taken_over_and_a_fresh_one_refused(tmp_path, caplog):
    store = Storage(str(tmp_path))
    stale = {"host": "elsewhere", "pid": 1, "token": "x", "heartbeat": time.time() - 3600}
    store.write_text(LEASE_FILE, json.dumps(stale), overwrite=True)
    lease = DriverLease(store, "exp", stale_s=60)
    lease.acquire()
    assert "taking over" in caplog.text
    lease.release()
    store.write_text(LEASE_FILE, json.dumps({**stale, "heartbeat": time.time()}), overwrite=True)
    try:
        DriverLease(store, "exp").acquire()
    except LeaseHeld as err:
        assert "host elsewhere pid 1" in str(err)
    else:
        raise AssertionError("a live lease of another host was not refused")


def test_a_lease_left_by_this_process_is_its_own_and_an_unwritable_release_is_one_warning(tmp_path, caplog):
    store = Storage(str(tmp_path))
    first = DriverLease(store, "exp")
    first.acquire()
    first._stop.set()  # a driver of this process that ended without releasing (its storage failed)
    second = DriverLease(store, "exp")
    second.acquire()  # the same process: not another driver
    assert json.loads(store.read_text(LEASE_FILE))["token"] == second.token

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    second.store.write_text = full  # type: ignore[method-assign]
    second.release()  # no exception: the lease goes stale
    assert "was not released" in caplog.text
