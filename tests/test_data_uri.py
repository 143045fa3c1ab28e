"""An image folder on object storage (moto's S3 server on 127.0.0.1): indexed from the
listing alone, staged once per node with a lock that survives its holder, checked and
completed after a kill or a damaged file; one slow test runs a search and a production run
on a two-node local Ray cluster from the bucket."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, S3Server, cli_env, image_folder
from trainable.config import DataConfig, DataError, TrainConfig
from trainable.failures import deterministic_cause
from trainable.feasibility import training_set
from trainable.imagefolder import index_image_folder
from trainable.listing import list_image_folder
from trainable.staging import NodeCacheError, node_lock, stage_image_folder

pytest.importorskip("boto3")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A server with two image folders: `small` (nested folders, a hidden file, a note that
    is not an image) and `many` (300 files, for kills and waits mid-download)."""
    top = tmp_path_factory.mktemp("s3")
    server = S3Server(top / "server")
    small = image_folder(top / "small", train=6, val=3)
    (small / "train" / "cat" / "sub").mkdir()
    image_folder(top / "extra", classes=("cat",), train=2, val=1, seed=1)
    for p in (top / "extra" / "train" / "cat").iterdir():
        p.rename(small / "train" / "cat" / "sub" / p.name)
    (small / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    (small / "train" / "dog" / "notes.txt").write_text("not an image\n")
    many = image_folder(top / "many", train=90, val=10, size=16)
    server.upload(small, "small")
    server.upload(many, "many")
    server.local = {"small": small, "many": many}  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(s3, monkeypatch, tmp_path):
    """This process reaches the server (pyarrow reads the endpoint when a filesystem is made)."""
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TRICK_SEARCH_CACHE", str(tmp_path / "machine-cache"))
    monkeypatch.delenv("TRICK_SEARCH_DATA_CACHE", raising=False)
    return s3


def _uri(s3: S3Server, name: str) -> str:
    return f"s3://{s3.BUCKET}/{name}"


def _staged_files(folder: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(folder))


def _copy(cache: Path) -> Path:
    """The one staged data set's folder in a cache."""
    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    return folder


# The index --------------------------------------------------------------------------------------------------
def test_index_from_the_listing_equals_the_local_index_and_downloads_nothing(aws):
    before = sum(aws.object_gets().values())
    listed = list_image_folder(_uri(aws, "small"))
    local = aws.local["small"]
    assert listed.folder_index(str(local)) == index_image_folder(str(local), False)
    assert listed.classes == ["cat", "dog", "emu"] and listed.class_counts() == (8, 6, 6)
    assert "train/cat/sub/0000.jpg" in listed.train.rels and listed.train.rels.index("train/cat/sub/0000.jpg") == 6
    data = DataConfig(kind="imagefolder", root=_uri(aws, "small") + "/")
    assert training_set(data).class_counts == training_set(DataConfig(kind="imagefolder", root=str(local))).class_counts
    assert sum(aws.object_gets().values()) == before  # the driver's checks read the listing only


# Staging ------------------------------------------------------------------------------------------------------
def test_staging_downloads_each_object_once_and_again_reads_nothing(aws, tmp_path):
    uri, cache = _uri(aws, "small"), tmp_path / "cache"
    listed = list_image_folder(uri)
    first = stage_image_folder(uri, str(cache))
    assert first.stats.files == listed.files == 29 and first.stats.bytes == listed.bytes
    gets = aws.object_gets("small/")
    assert len(gets) == listed.files and set(gets.values()) == {1}
    assert first.index == listed.folder_index(first.local_root)
    for rel in listed.train.rels + listed.val.rels:
        assert (Path(first.local_root) / rel).read_bytes() == (aws.local["small"] / rel).read_bytes()

    again = stage_image_folder(uri, str(cache), reuse_s=0)  # listed and checked again, nothing fetched
    soon = stage_image_folder(uri, str(cache))  # checked a moment ago: not even listed
    assert again.stats.files == soon.stats.files == again.stats.bytes == 0
    assert aws.object_gets("small/") == gets
    assert again.index == soon.index == first.index


def test_a_damaged_staged_file_is_found_and_fetched_again(aws, tmp_path):
    uri, cache = _uri(aws, "small"), tmp_path / "cache"
    staged = stage_image_folder(uri, str(cache))
    truncated = Path(staged.local_root) / "train" / "dog" / "0001.jpg"
    truncated.write_bytes(truncated.read_bytes()[:100])  # a size that differs
    rewritten = Path(staged.local_root) / "val" / "emu" / "0000.jpg"
    rewritten.write_bytes(bytes(len(rewritten.read_bytes())))  # same size, rewritten in place
    missing = Path(staged.local_root) / "val" / "cat" / "0002.jpg"
    missing.unlink()
    fixed = stage_image_folder(uri, str(cache), reuse_s=0)
    assert fixed.stats.files == 3
    for path in (truncated, rewritten, missing):
        assert path.read_bytes() == (aws.local["small"] / path.relative_to(staged.local_root)).read_bytes()


STAGE = """
import sys
from trainable.staging import stage_image_folder
stage_image_folder(sys.argv[1], sys.argv[2], threads=1)
"""


@contextlib.contextmanager
def _staging_process(aws: S3Server, uri: str, cache: Path) -> Iterator[subprocess.Popen]:
    """Another process staging `uri` into `cache` (one download at a time), killed at the end."""
    proc = subprocess.Popen([PYTHON, "-c", STAGE, uri, str(cache)], cwd=ROOT, env=cli_env(**aws.env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def _wait_for_files(cache: Path, at_least: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cache.is_dir() and any(p.is_dir() for p in cache.iterdir()) and _staged_files(_copy(cache) / "files") >= at_least:
            return
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.01)
    pytest.fail(f"staging did not reach {at_least} files in {timeout} s")


def test_a_staging_killed_halfway_is_completed_by_the_next(aws, tmp_path):
    uri, cache = _uri(aws, "many"), tmp_path / "cache"
    before = aws.object_gets("many/")
    with _staging_process(aws, uri, cache) as proc:
        _wait_for_files(cache, 20, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    folder = _copy(cache)
    assert not (folder / "complete.json").exists()  # never taken as a whole copy
    kept = _staged_files(folder / "files")
    assert 20 <= kept < 300

    staged = stage_image_folder(uri, str(cache))
    assert staged.stats.files == 300 - kept  # the files renamed into place are kept
    assert (folder / "complete.json").exists() and not (folder / "partial").exists()
    gets = {k: n - before.get(k, 0) for k, n in aws.object_gets("many/").items()}
    assert len(gets) == 300 and sum(gets.values()) <= 301  # at most the file in flight twice
    for rel in list_image_folder(uri).train.rels[:5]:
        assert (Path(staged.local_root) / rel).read_bytes() == (aws.local["many"] / rel).read_bytes()


def test_other_processes_wait_for_the_one_staging_and_download_nothing(aws, tmp_path):
    uri, cache = _uri(aws, "many"), tmp_path / "cache"
    before = aws.object_gets("many/")
    with _staging_process(aws, uri, cache) as proc:
        _wait_for_files(cache, 5, proc)
        staged = stage_image_folder(uri, str(cache))  # blocks on the lock until the other is done
        assert proc.wait(timeout=60) == 0
    assert staged.stats.files == 0 and staged.stats.waited_s > 0
    gets = {k: n - before.get(k, 0) for k, n in aws.object_gets("many/").items()}
    assert len(gets) == 300 and set(gets.values()) == {1}


HOLD = """
import sys, time
from pathlib import Path
from trainable.staging import node_lock
with node_lock(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    lock = tmp_path / "data.lock"
    proc = subprocess.Popen([PYTHON, "-c", HOLD, str(lock)], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        with pytest.raises(TimeoutError):
            with node_lock(lock, "test", timeout=0.5):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        start = time.monotonic()
        with node_lock(lock, "test", timeout=10) as waited:
            assert waited < 5
        assert time.monotonic() - start < 5
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_node_can_be_staged_ahead_from_the_command_line(aws, tmp_path, capsys):
    from trainable.staging import main

    assert main([_uri(aws, "small"), "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "complete at" in capsys.readouterr().out and (_copy(tmp_path / "cache") / "complete.json").exists()
    assert main([_uri(aws, "gone"), "--cache-dir", str(tmp_path / "cache")]) == 2
    assert capsys.readouterr().err == f"error: {_uri(aws, 'gone')}: no such folder (data.root for data.kind 'imagefolder')\n"


# A node that cannot hold the copy -------------------------------------------------------------------------
def _one_line_naming_node_folder_and_bytes(err: NodeCacheError, folder: Path, need: int) -> None:
    text = str(err)
    assert "\n" not in text and f"node {socket.gethostname()}" in text and str(folder) in text
    assert f"({need} bytes)" in text and "data.cache_dir" in text
    assert deterministic_cause(err) is err  # a DataError: never retried


def test_a_cache_folder_that_cannot_be_written_is_one_line(aws, tmp_path):
    (tmp_path / "afile").write_text("x")
    uri = _uri(aws, "small")
    with pytest.raises(NodeCacheError) as info:
        stage_image_folder(uri, str(tmp_path / "afile" / "cache"))
    _one_line_naming_node_folder_and_bytes(info.value, tmp_path / "afile" / "cache", list_image_folder(uri).bytes)


def test_a_disk_too_small_is_one_line_before_downloading(aws, tmp_path, monkeypatch):
    import shutil

    import trainable.staging as staging

    uri = _uri(aws, "small")
    before = aws.object_gets("small/")
    monkeypatch.setattr(staging.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NodeCacheError) as info:
        stage_image_folder(uri, str(tmp_path / "cache"))
    _one_line_naming_node_folder_and_bytes(info.value, _copy(tmp_path / "cache"), list_image_folder(uri).bytes)
    assert "1.0 KB free" in str(info.value) and aws.object_gets("small/") == before


def test_running_out_of_disk_while_staging_is_one_line(aws, tmp_path, monkeypatch):
    import errno

    import trainable.staging as staging

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "_fetch_one", full)
    uri = _uri(aws, "small")
    with pytest.raises(NodeCacheError) as info:
        stage_image_folder(uri, str(tmp_path / "cache"))
    _one_line_naming_node_folder_and_bytes(info.value, _copy(tmp_path / "cache"), list_image_folder(uri).bytes)
    assert "no space left" in str(info.value)


def test_the_default_cache_follows_the_nodes_environment(aws, tmp_path, monkeypatch):
    monkeypatch.setenv("TRICK_SEARCH_DATA_CACHE", str(tmp_path / "big-disk"))
    staged = stage_image_folder(_uri(aws, "small"))
    assert staged.local_root.startswith(str(tmp_path / "big-disk") + os.sep)
    monkeypatch.delenv("TRICK_SEARCH_DATA_CACHE")
    staged = stage_image_folder(_uri(aws, "small"))
    assert staged.local_root.startswith(str(tmp_path / "machine-cache" / "staged") + os.sep)


# The data sets a run reads ---------------------------------------------------------------------------------
def _config(root: str, **data) -> TrainConfig:
    return TrainConfig.model_validate({
        "model": {"name": "resnet18_vd", "small_input": True},
        "data": {"kind": "imagefolder", "root": root, "image_size": 32, "loader_workers": 0, **data},
        "batch": {"global_batch": 8, "micro_batch": 4},
    })


def test_a_run_reads_the_same_images_from_the_bucket_as_from_the_local_folder(aws, tmp_path):
    import torch

    from trainable.datasets import build_datasets

    remote = build_datasets(_config(_uri(aws, "small"), cache_dir=str(tmp_path / "cache")))
    local = build_datasets(_config(str(aws.local["small"])))
    assert remote[2] == local[2]
    for r, loc in zip(remote[:2], local[:2]):
        assert len(r) == len(loc) and list(r.targets) == list(loc.targets)
        for i in range(len(r)):
            torch.manual_seed(i)
            a = r[i]
            torch.manual_seed(i)
            b = loc[i]
            assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert remote[0].staging["staging_files"] == 29 and local[0].staging == {}


def test_a_corrupt_image_in_the_bucket_is_named_by_its_uri(aws, tmp_path):
    from trainable.datasets import build_datasets

    broken = tmp_path / "broken"
    image_folder(broken, classes=("a", "b"), train=2, val=1)
    (broken / "train" / "b" / "0001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    uri = aws.upload(broken, "broken")
    train, _, _ = build_datasets(_config(uri, cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match=f"^{uri}/train/b/0001.jpg: cannot decode image"):
        train[3]
    train, _, _ = build_datasets(_config(uri, cache_dir=str(tmp_path / "cache"), skip_corrupt=True))
    assert train[3][1] == 0  # the next image stands in (the first, wrapping around)


# End to end: a two-node local Ray cluster reading the bucket ----------------------------------------------
CLUSTER = """
import json, sys
from ray.cluster_utils import Cluster

head_cache, worker_cache = sys.argv[1:3]
cluster = Cluster(initialize_head=True, connect=False, head_node_args={
    "num_cpus": 2, "include_dashboard": False, "env_vars": {"TRICK_SEARCH_DATA_CACHE": head_cache}})
worker = cluster.add_node(num_cpus=2, env_vars={"TRICK_SEARCH_DATA_CACHE": worker_cache})
cluster.wait_for_nodes(timeout=60)
print(json.dumps({"address": cluster.address}), flush=True)
try:
    sys.stdin.readline()
finally:
    cluster.shutdown()
"""

E2E_SPACE = """\
experiment:
  name: bucket
  num_samples: 2
  max_concurrent_trials: 2
  scheduler: {{kind: fifo}}
  confirm: null
train:
  model: {{name: resnet18_vd, small_input: false}}
  data: {{kind: imagefolder, root: {root}, image_size: 32, loader_workers: 0}}
  augment: {{hflip: 0.0, crop_scale: [0.35, 1.0]}}
  batch: {{global_batch: 8, micro_batch: 4}}
  distributed: {{num_workers: 2}}
  optimizer: {{base_lr: 0.4, weight_decay: 5.0e-5}}
  schedule: {{warmup_epochs: 0.5}}
  run: {{epochs: 1, log_every: 2}}
search:
  label_smoothing: {{choice: [0.0, 0.1]}}
"""

E2E_TRAIN = """\
model: {{name: resnet18_vd, small_input: false}}
data: {{kind: imagefolder, root: {root}, image_size: 32, loader_workers: 0}}
augment: {{hflip: 0.0, crop_scale: [0.35, 1.0]}}
batch: {{global_batch: 16, micro_batch: 4}}
distributed: {{num_workers: 4}}
optimizer: {{base_lr: 0.4}}
run: {{epochs: 1, log_every: 1, seed: 3}}
"""


def _trial_rows(exp: Path) -> list[list[dict]]:
    out = []
    for f in exp.rglob("result.json"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        if rows and "trial_id" in rows[0]:
            out.append(rows)
    return out


def _train(args: list[str], env: dict[str, str]) -> tuple[str, Path]:
    r = subprocess.run([PYTHON, "-m", "trainable.train", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    done = next(line for line in r.stdout.splitlines() if line.startswith("done:"))
    return done.split("; checkpoint:")[0], Path(done.split("; checkpoint: ")[1].strip())


@pytest.mark.slow
def test_search_and_production_read_the_bucket_each_node_staging_once(tmp_path):
    import torch

    server = S3Server(tmp_path / "s3")
    cluster = None
    try:
        local = image_folder(tmp_path / "local", train=16, val=4)
        uri = server.upload(local, "e2e")
        env = cli_env(**server.env)
        nodes = tmp_path / "head-cache", tmp_path / "worker-cache"
        cluster = subprocess.Popen([PYTHON, "-c", CLUSTER, *map(str, nodes)], cwd=ROOT, env=env, text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert cluster.stdout is not None
        address = json.loads(cluster.stdout.readline())["address"]  # the cluster's own 60 s wait bounds this

        # the search: one 2-worker trial on each node, from the bucket
        (tmp_path / "space.yaml").write_text(E2E_SPACE.format(root=uri))
        search = subprocess.run([PYTHON, "-m", "search.run", "--space", str(tmp_path / "space.yaml"), "--address",
                                 address, "--storage-path", str(tmp_path / "exps")],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert search.returncode == 0, (search.stdout + search.stderr)[-4000:]
        trials = _trial_rows(tmp_path / "exps" / "bucket")
        assert len(trials) == 2 and all(rows[-1]["epoch"] == 1 for rows in trials)
        assert len({rows[-1]["node_id"] for rows in trials}) == 2  # both nodes trained
        for rows in trials:
            assert {"startup_s", "staging_s", "staging_bytes", "staging_files"} <= set(rows[0])
            assert rows[0]["startup_s"] >= rows[0]["staging_s"] > 0
        assert sum(rows[0]["staging_files"] for rows in trials) == 2 * 60  # each node fetched the 60 images once
        gets = server.object_gets("e2e/")
        assert len(gets) == 60 and set(gets.values()) == {2}, gets  # counted on the server: once per node
        for cache in nodes:
            assert _staged_files(_copy(cache) / "files") == 60

        # production on both nodes (4 workers of 1 CPU): from the bucket, then from the local folder
        (tmp_path / "bucket.yaml").write_text(E2E_TRAIN.format(root=uri))
        (tmp_path / "local.yaml").write_text(E2E_TRAIN.format(root=local))
        common = ["--address", address, "--storage-path", str(tmp_path / "runs")]
        remote_done, remote_ckpt = _train(["--config", str(tmp_path / "bucket.yaml"), *common], env)
        assert server.object_gets("e2e/") == gets  # both nodes had their copy: nothing downloaded again
        local_done, local_ckpt = _train(["--config", str(tmp_path / "local.yaml"), *common], env)
    finally:
        if cluster is not None:
            try:  # any line on stdin ends the cluster
                cluster.communicate("quit\n", timeout=60)
            except subprocess.TimeoutExpired:
                cluster.kill()
        server.stop()
    assert remote_done == local_done
    a = torch.load(remote_ckpt / "state.pt", weights_only=False)
    b = torch.load(local_ckpt / "state.pt", weights_only=False)
    assert a["classes"] == b["classes"] and a["epoch"] == b["epoch"] == 1
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit-identical on CPU
