"""Scaling out, as far as one machine shows it: a real two-node Ray cluster with a node
lost mid-training, and a search whose experiment lives on S3 (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, cli_env

TINY = [
    "--set", "train.model.small_input=false",
    "--set", "train.data.subset=0.5",
    "--set", "experiment.scheduler={kind: fifo}",
    "--set", "experiment.confirm=null",
    "--set", "train.distributed.num_workers=2",  # a trial fills a 2-CPU node: one trial per node
    "--set", "train.batch.micro_batch=16",
]


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """A process's stdout lines, readable with a timeout."""
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _next_json(q: queue.Queue, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = q.get(timeout=max(0.1, deadline - time.monotonic()))
        if line is None:
            raise RuntimeError("process ended")
        if line.startswith("{"):
            return json.loads(line)
    raise TimeoutError


def _results(exp: Path) -> dict[str, list[dict]]:
    out = {}
    for f in exp.glob("*/result.json"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


# Two nodes, one lost -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_node_search_survives_losing_a_node(tmp_path):
    cluster = subprocess.Popen([PYTHON, "-m", "tests.two_nodes"], cwd=ROOT, env=cli_env(), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out = _lines(cluster)
    search = None
    try:
        nodes = _next_json(out, timeout=120)
        args = ["-m", "search.run", "--address", nodes["address"], "--storage-path", str(tmp_path),
                "--name", "two", "--num-samples", "2", "--max-concurrent-trials", "2",
                "--set", "train.run.epochs=4", "--set", "experiment.max_failures=2", *TINY]
        log = open(tmp_path / "search.log", "w")
        search = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=cli_env(), stdout=log, stderr=subprocess.STDOUT)
        exp = tmp_path / "two"

        # both trials are training, one on each node, and each has a checkpoint
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            res = _results(exp)
            if len(res) == 2 and all(len(r) >= 1 for r in res.values()):
                break
            assert search.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
            time.sleep(1)
        res = _results(exp)
        where = {tid: rows[-1]["node_id"] for tid, rows in res.items()}
        assert set(where.values()) == {nodes["head"], nodes["worker"]}, where
        lost = next(tid for tid, node in where.items() if node == nodes["worker"])

        cluster.stdin.write("remove\n")
        cluster.stdin.flush()
        assert _next_json(out, timeout=60)["removed"] == nodes["worker"]

        rc = search.wait(timeout=900)
        text = (tmp_path / "search.log").read_text()
        assert rc == 0, text[-4000:]
    finally:
        if search is not None and search.poll() is None:
            search.kill()
        if cluster.poll() is None:
            cluster.stdin.write("quit\n")
            cluster.stdin.flush()
            try:
                cluster.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cluster.kill()

    res = _results(exp)
    assert len(res) == 2
    for tid, rows in res.items():
        assert rows[-1]["epoch"] == 4, (tid, [r["epoch"] for r in rows])
    # the lost trial finished on the head, from its last checkpoint rather than from scratch
    epochs = [r["epoch"] for r in res[lost]]
    assert res[lost][-1]["node_id"] == nodes["head"]
    assert epochs.count(1) == 1, epochs
    assert "resumed from epoch" in text


# Experiments on S3 ------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3(tmp_path):
    """A local S3 server (moto) with one bucket, and the environment that points at it."""
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    # this environment's moto (a `moto_server` found on PATH may belong to another Python)
    proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "HOME": str(tmp_path / "home"),  # the local mirror of the study starts empty
    }
    client = None
    for _ in range(100):
        try:
            client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                                  aws_access_key_id="testing", aws_secret_access_key="testing")
            client.create_bucket(Bucket="trick-bucket")
            break
        except Exception:
            time.sleep(0.2)
    try:
        yield client, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _keys(client, prefix: str) -> list[str]:
    keys, token = [], None
    while True:
        kw = {"Bucket": "trick-bucket", "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = client.list_objects_v2(**kw)
        keys += [o["Key"] for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


@pytest.mark.slow
def test_search_resume_and_export_on_s3(s3, tmp_path):
    client, aws = s3
    uri = "s3://trick-bucket/exps"
    env = cli_env(**aws)
    # `--address local`: a Ray instance of its own, whose workers see this S3 endpoint (the
    # session's instance was started without it)
    args = ["-m", "search.run", "--address", "local", "--storage-path", uri, "--name", "ons3", "--num-samples", "2",
            "--max-concurrent-trials", "1", "--set", "train.run.epochs=2", *TINY]
    first = subprocess.run([PYTHON, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    keys = _keys(client, "exps/ons3/")
    names = [k.removeprefix("exps/ons3/") for k in keys]
    assert "search.json" in names and "space.yaml" in names and "optuna.db" in names
    assert any(n.startswith("experiment_state") for n in names)
    assert any(n.startswith("hparams/") and "tfevents" in n for n in names)
    assert any(n.startswith("runs/trial_") and "/tensorboard/" in n and "tfevents" in n for n in names)
    assert any(n.startswith("runs/trial_") and n.endswith("/state.pt") for n in names)

    # a new head: nothing local, everything comes back from the bucket
    shutil.rmtree(aws["HOME"], ignore_errors=True)
    again = subprocess.run([PYTHON, *args, "--set", "train.run.epochs=5", "--resume"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 2 and "--resume continues" in again.stderr  # a changed search is refused
    resume = subprocess.run([PYTHON, "-m", "search.run", "--address", "local", "--storage-path", uri, "--name", "ons3",
                             "--resume"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resume.returncode == 0, (resume.stdout + resume.stderr)[-4000:]
    db = Path(aws["HOME"]).glob(".cache/trick-search/mirrors/*/optuna.db")
    import optuna

    study = optuna.load_study(study_name="ons3", storage=f"sqlite:///{next(db)}")
    assert len(study.trials) == 2  # recovered from the bucket, each trial once

    out = tmp_path / "best.yaml"
    exported = subprocess.run([PYTHON, "-m", "search.export", "--experiment", f"{uri}/ons3", "--out", str(out),
                               "--allow-unconfirmed"],  # experiment.confirm=null: no final answer
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert "provenance" in out.read_text() and "s3://trick-bucket/exps/ons3" in out.read_text()


def test_unwritable_storage_is_one_line_before_anything_starts(s3, tmp_path):
    _, aws = s3
    r = subprocess.run([PYTHON, "-m", "search.run", "--storage-path", "s3://no-such-bucket/x", "--name", "n"],
                       cwd=ROOT, env=cli_env(**aws), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "cannot write there" in r.stderr and "no-such-bucket" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    # a local folder that cannot be created
    (tmp_path / "afile").write_text("x")
    r = subprocess.run([PYTHON, "-m", "search.run", "--storage-path", str(tmp_path / "afile" / "sub")],
                       cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot write there" in r.stderr


def test_address_without_cluster_fails_fast(tmp_path):
    start = time.monotonic()
    r = subprocess.run([PYTHON, "-m", "search.run", "--address", f"127.0.0.1:{_free_port()}",
                        "--storage-path", str(tmp_path)], cwd=ROOT, env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no Ray cluster answers there" in r.stderr
    assert time.monotonic() - start < 30
