"""Shared fixtures: one local Ray instance for the whole session, with more logical CPUs
than the machine has cores, so 2-worker trials can run side by side with their drivers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_address() -> str:
    """The GCS address of a session-wide local Ray instance (8 logical CPUs)."""
    import ray

    if not ray.is_initialized():
        # The dashboard stays on: Ray Train's placement-group cleaner asks the State API it
        # serves whether a stopped trial's controller is gone; without it, every trial ASHA
        # stops would keep its workers' CPUs reserved.
        ray.init(num_cpus=8, configure_logging=False, log_to_driver=False)
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
