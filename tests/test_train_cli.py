"""Tests for the production CLI (`python -m trainable.train`), trainable/cluster.py and the
storage check:
user errors end in one `error:` line and exit code 2 before any training starts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from trainable.cluster import error_line
from trainable.config import ConfigError, TrainConfig
from trainable.config_io import save_config
from trainable.storage import Storage
from trainable.train import prepare_config

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str]) -> tuple[subprocess.CompletedProcess[str], float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("RAY_ADDRESS", None)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trainable.train", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc, time.monotonic() - start


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def small_config(tmp_path: Path) -> Path:
    return write(
        tmp_path / "small.yaml",
        {
            "model": {"name": "resnet18_vd", "small_input": True},
            "data": {"image_size": 32},
            "batch": {"global_batch": 128, "micro_batch": 32},
            "distributed": {"num_workers": 2},
            "run": {"epochs": 5},
        },
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], storage: Path, *parts: str) -> str:
    """Exit 2, one `error:` line on stderr naming `parts`, no traceback, no training."""
    out, err = proc.stdout, proc.stderr
    assert "Traceback" not in out + err, out + err
    assert proc.returncode == 2, (proc.returncode, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("error: "), line
    for part in parts:
        assert part in line, (part, line)
    # No training started: nothing announced, no run folder made.
    assert "training " not in out and "run folder" not in out, out
    assert not storage.exists() or os.listdir(storage) == []
    return line


# CLI user errors ---------------------------------------------------------------------------------------
def test_cli_bad_key(tmp_path: Path) -> None:
    cfg = write(tmp_path / "bad.yaml", {"mix": {"mdoe": "cutmix"}})
    storage = tmp_path / "storage"
    proc, _ = run_cli(["--config", str(cfg), "--storage-path", str(storage)])
    line = assert_user_error(proc, storage)
    assert line == f"error: {cfg}: mix.mdoe: unknown key; did you mean 'mix.mode'?"


def test_cli_missing_file(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    missing = tmp_path / "missing.yaml"
    proc, _ = run_cli(["--config", str(missing), "--storage-path", str(storage)])
    line = assert_user_error(proc, storage)
    assert line == f"error: {missing}: no such file"


def test_cli_yaml_syntax_error(tmp_path: Path) -> None:
    cfg = tmp_path / "syntax.yaml"
    cfg.write_text("run:\n  epochs: [1, 2\n")
    storage = tmp_path / "storage"
    proc, _ = run_cli(["--config", str(cfg), "--storage-path", str(storage)])
    line = assert_user_error(proc, storage)
    assert line.startswith(f"error: {cfg}: line ")


@pytest.mark.parametrize(
    "item, parts",
    [
        ("mix.mode=blend", ["mix.mode: ", "'cutmix'", "'blend'"]),
        ("run.epochs=0", ["run.epochs: ", "(got 0)"]),
        ("run.epochs", ["--set 'run.epochs': expected key.path=value"]),
    ],
)
def test_cli_bad_set_value(tmp_path: Path, item: str, parts: list[str]) -> None:
    storage = tmp_path / "storage"
    proc, _ = run_cli(["--config", str(small_config(tmp_path)), "--set", item, "--storage-path", str(storage)])
    assert_user_error(proc, storage, *parts)


def test_cli_num_workers_cannot_split_global_batch(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    proc, _ = run_cli(["--config", str(small_config(tmp_path)), "--num-workers", "3", "--storage-path", str(storage)])
    line = assert_user_error(proc, storage, "128", "3 workers")
    assert "batch.global_batch" in line


def test_cli_num_workers_zero(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    proc, _ = run_cli(["--config", str(small_config(tmp_path)), "--num-workers", "0", "--storage-path", str(storage)])
    assert_user_error(proc, storage, "--num-workers 0: must be >= 1")


def test_cli_unwritable_storage(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    storage = afile / "sub"
    proc, _ = run_cli(["--config", str(small_config(tmp_path)), "--storage-path", str(storage)])
    assert_user_error(proc, storage, f"--storage-path {storage}: cannot write there")
    assert afile.read_text() == "not a folder\n"


def test_cli_address_nobody_listens(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    proc, elapsed = run_cli(
        ["--config", str(small_config(tmp_path)), "--address", "127.0.0.1:1", "--storage-path", str(storage)]
    )
    assert_user_error(proc, storage, "--address 127.0.0.1:1", "no Ray cluster answers there")
    assert elapsed < 30, elapsed


# prepare_config ----------------------------------------------------------------------------------------------
def test_prepare_config_num_workers_rederives_accumulation(tmp_path: Path) -> None:
    path = small_config(tmp_path)
    base = prepare_config(str(path))
    assert (base.distributed.num_workers, base.batch.micro_batch, base.accum_steps) == (2, 32, 2)
    cfg = prepare_config(str(path), num_workers=4)
    assert cfg.batch.global_batch == 128
    assert cfg.distributed.num_workers == 4
    assert cfg.batch.micro_batch == 32 and cfg.accum_steps == 1
    assert cfg.lr == base.lr
    one = prepare_config(str(path), num_workers=1)
    assert (one.batch.global_batch, one.batch.micro_batch, one.accum_steps) == (128, 32, 4)
    with pytest.raises(ConfigError, match=r"128 cannot be split over 3 workers"):
        prepare_config(str(path), num_workers=3)


def test_prepare_config_use_gpu_and_set(tmp_path: Path) -> None:
    path = small_config(tmp_path)
    assert prepare_config(str(path)).distributed.use_gpu is False
    cfg = prepare_config(str(path), overrides=["run.epochs=1"], num_workers=8, use_gpu=True)
    assert cfg.distributed.use_gpu is True
    assert cfg.run.epochs == 1
    assert (cfg.distributed.num_workers, cfg.batch.global_batch, cfg.batch.micro_batch, cfg.accum_steps) == (
        8,
        128,
        16,
        1,
    )
    # --use-gpu left off does not turn a GPU config into a CPU one.
    gpu_file = save_config(cfg, tmp_path / "gpu.yaml")
    assert prepare_config(str(gpu_file)).distributed.use_gpu is True


def test_prepare_config_reads_exported_file(tmp_path: Path) -> None:
    cfg = TrainConfig().with_num_workers(4)
    data = {"provenance": {"experiment": "e", "trial": "t1"}, **cfg.model_dump(mode="json")}
    path = write(tmp_path / "best.yaml", data)
    assert prepare_config(str(path)) == cfg


# cluster.error_line -----------------------------------------------------------------------------------------
DIVERGED = (
    "diverged: non-finite loss at epoch 2, step 37 (update 5 of the epoch), lr 0.8; "
    "lower optimizer.base_lr or lengthen schedule.warmup_epochs"
)
REMOTE_TRACE = (
    "ray::_RayTrainWorker__execute.get_next() (pid=123, ip=10.0.0.1)\n"
    "Traceback (most recent call last):\n"
    '  File "/work/main/trainable/loop.py", line 418, in _check_finite\n'
    "    raise TrainingDiverged(\n"
    f"trainable.loop.TrainingDiverged: {DIVERGED}\n"
)


class RemoteError(Exception):
    """Like Ray's RayTaskError: the message holds the remote traceback, `cause` the error."""

    def __init__(self, text: str, cause: BaseException | None = None) -> None:
        super().__init__(text)
        self.cause = cause


def test_error_line_plain_exception_with_traceback_text() -> None:
    line = error_line(RuntimeError(REMOTE_TRACE))
    assert "\n" not in line
    assert line == f"RuntimeError: {DIVERGED}"


def test_error_line_nested_worker_and_controller_failures() -> None:
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    rank0 = RemoteError(REMOTE_TRACE)
    rank1 = RuntimeError("Traceback (most recent call last):\n  ...\nRuntimeError: gloo connection closed")
    group = WorkerGroupError("worker 0 and 1 failed\n" + REMOTE_TRACE, {1: rank1, 0: rank0})
    line = error_line(group)
    assert "\n" not in line and "diverged:" in line
    assert line == f"RemoteError: {DIVERGED}"

    nested = ControllerError(group)
    line = error_line(nested)
    assert "\n" not in line and "diverged:" in line
    assert line == f"RemoteError: {DIVERGED}"


def test_error_line_uses_the_cause_and_the_last_line() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    cause = ValueError("first\nsecond\nfinal reason")
    group = WorkerGroupError("failed", {0: RemoteError("wrapper text\nTraceback ...", cause=cause)})
    assert error_line(group) == "ValueError: final reason"
    assert error_line(RuntimeError("")) == "RuntimeError: "


# Storage.check_writable -----------------------------------------------------------------------------------
def test_check_writable_folder_is_left_clean(tmp_path: Path) -> None:
    target = tmp_path / "new" / "storage"
    Storage(str(target)).check_writable()
    assert target.is_dir()
    assert os.listdir(target) == []


def test_check_writable_under_a_file(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    target = afile / "sub"
    with pytest.raises(ConfigError) as info:
        Storage(str(target)).check_writable()
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"--storage-path {target}: cannot write there (")
    assert afile.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores folder permissions")
def test_check_writable_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ConfigError) as info:
            Storage(str(ro)).check_writable()
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith(f"--storage-path {ro}: cannot write there (")
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o700)
