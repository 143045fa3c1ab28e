"""Shared fixtures and helpers: one local Ray instance for the whole session, with more
logical CPUs than the machine has cores, so 2-worker trials can run side by side with their
drivers; a free port; real multi-process (gloo) workers with a bounded wait."""

from __future__ import annotations

import copy
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_address() -> str:
    """The GCS address of a session-wide local Ray instance (8 logical CPUs)."""
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train's placement-group cleaner asks the State API it
        # serves whether a stopped trial's controller is gone; without it, every trial ASHA
        # stops would keep its workers' CPUs reserved.
        # address="local": always a new instance of this session, never one already running here
        ray.init(address="local", num_cpus=8, configure_logging=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for running the project's CLIs as subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


PYTHON = sys.executable

TINY_TRAIN: dict[str, Any] = {
    # resnet18_vd with the ImageNet stem on 32 px digits: small enough for a 2-core CI machine
    "model": {"name": "resnet18_vd", "small_input": False},
    "data": {"kind": "digits", "image_size": 32, "loader_workers": 0},
    "augment": {"hflip": 0.0, "crop_scale": [0.35, 1.0]},
    "batch": {"global_batch": 64, "micro_batch": 16},
    "optimizer": {"base_lr": 0.4, "weight_decay": 5.0e-5},
    "schedule": {"warmup_epochs": 0.5},
    "run": {"epochs": 3, "log_every": 10},
}
"""A tiny real training run's config (plain data: copy it before changing it)."""


def tiny_train(epochs: int = 3) -> dict[str, Any]:
    """A fresh copy of TINY_TRAIN with `run.epochs` set."""
    data = copy.deepcopy(TINY_TRAIN)
    data["run"]["epochs"] = epochs
    return data


def free_port() -> int:
    """A TCP port nobody listens on right now (for gloo rendezvous, local servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_workers(fn: Callable[..., None], outdir: Path, world: int, timeout: float = 90.0) -> list[Any]:
    """Run `fn(rank, port, outdir)` in `world` fresh processes and return what each saved
    to `outdir/rank<r>.pt`; fail the test if they do not finish within `timeout` seconds."""
    import pytest
    import torch
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(free_port(), str(outdir)), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"workers did not finish within {timeout}s")
    return [torch.load(outdir / f"rank{r}.pt", weights_only=False) for r in range(world)]


# A local S3 server with a request log ------------------------------------------------------------------
class S3Server:
    """moto's S3 server on 127.0.0.1, its every request logged (to count what was downloaded)."""

    BUCKET = "trick-data"

    def __init__(self, folder: Path, enforce_auth: bool = False) -> None:
        import subprocess

        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "s3-requests.log"
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        self.env = {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        server_env = dict(os.environ)
        if enforce_auth:  # every request needs credentials moto knows: "testing" is refused
            server_env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                         cwd=folder, env=server_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"moto's S3 server did not start: {self.log.read_text()[-2000:]}")
                time.sleep(0.1)
        if not enforce_auth:
            self.client().create_bucket(Bucket=self.BUCKET)

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def upload(self, local: Path, prefix: str) -> str:
        """Every file under `local` as `prefix/<relative path>`; the folder's URI."""
        client = self.client()
        for p in sorted(local.rglob("*")):
            if p.is_file():
                client.upload_file(str(p), self.BUCKET, f"{prefix}/{p.relative_to(local).as_posix()}")
        return f"s3://{self.BUCKET}/{prefix}"

    def object_gets(self, prefix: str = "") -> dict[str, int]:
        """GET requests per object key under `prefix` so far (listings are not counted)."""
        import re
        from urllib.parse import unquote

        counts: dict[str, int] = {}
        for m in re.finditer(r'"(?:\x1b\[[0-9;]*m)*GET /([^ ?]+) HTTP', self.log.read_text(errors="replace")):
            bucket, _, key = unquote(m.group(1)).partition("/")
            if bucket == self.BUCKET and key and key.startswith(prefix):
                counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()


def image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "emu"), train: int = 8, val: int = 4,
                 size: int = 32, seed: int = 0) -> Path:
    """A small JPEG image folder (`root/train/<class>/*.jpg`, `root/val/<class>/*.jpg`) whose
    classes differ in colour, so a tiny model learns something in an epoch or two."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train), ("val", val)):
        for c, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((size, size, 3), dtype=np.float32)
                base[..., c % 3] = 180.0
                img = np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    return root


@pytest.fixture(autouse=True)
def _tune_writes_its_own_result_files(monkeypatch):
    """A search run in this process turns Tune's own result loggers off for itself (it keeps its
    rows with its own loggers); no later test's plain Tuner inherits that."""
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
