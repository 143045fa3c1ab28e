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
