"""Production runs resume only themselves: a run's identity (the config hash without the
settings that leave the training maths alone, and its classes), `run.json` checked by the
CLI before Ray starts, the default storage, and a damaged latest checkpoint through the CLI."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, cli_env, tiny_train
from trainable.config import LEAF_PATHS, ConfigError, TrainConfig
from trainable.config_io import validate_config
from trainable.resume import (
    IDENTITY_EXCLUDED,
    RUN_FILE,
    check_run,
    check_same_run,
    config_difference,
    config_hash,
    record_run,
)
from trainable.storage import STORAGE_ENV
from trainable.train import DEFAULT_STORAGE, default_storage, parse_args



def _cfg(**changes: object) -> TrainConfig:
    """tiny_train() with `changes` given as {"section.key": value}."""
    data = tiny_train()
    for path, value in changes.items():
        section, _, key = path.rpartition(".")
        node = data
        for part in section.split(".") if section else []:
            node = node.setdefault(part, {})
        node[key] = value
    return validate_config(data)


def _write(path: Path, cfg: TrainConfig) -> Path:
    path.write_text(cfg.to_yaml())
    return path


# The identity -------------------------------------------------------------------------------------------
def test_excluded_keys_are_real_key_paths():
    assert IDENTITY_EXCLUDED <= set(LEAF_PATHS), IDENTITY_EXCLUDED - set(LEAF_PATHS)


@pytest.mark.parametrize("path, value", [
    ("run.log_every", 3), ("run.checkpoint_every", 2), ("run.val_every", 2), ("distributed.max_failures", 1),
    ("data.loader_workers", 2), ("distributed.cpus_per_worker", 4), ("distributed.channels_last", True),
])
def test_settings_outside_the_training_maths_keep_the_hash(path, value):
    assert config_hash(_cfg(**{path: value})) == config_hash(_cfg())


def test_cluster_shape_keeps_the_hash():
    cfg = _cfg()
    other = cfg.with_num_workers(1)  # 1 worker: micro-batch and accumulation re-derived
    assert (other.distributed.num_workers, other.accum_steps) != (cfg.distributed.num_workers, cfg.accum_steps)
    assert config_hash(other) == config_hash(cfg)


@pytest.mark.parametrize("path, value", [
    ("optimizer.base_lr", 0.2), ("run.epochs", 4), ("mix.mode", "cutmix"), ("batch.global_batch", 128),
    ("run.seed", 1), ("label_smoothing", 0.0), ("distributed.amp", "bf16"), ("data.subset", 0.5),
])
def test_training_maths_changes_the_hash(path, value):
    assert config_hash(_cfg(**{path: value})) != config_hash(_cfg())
    assert config_difference(_cfg().model_dump(mode="json"), _cfg(**{path: value})).startswith(f"{path}: ")


def test_a_stored_config_without_newer_fields_still_matches():
    stored = _cfg().model_dump(mode="json")
    del stored["mix"]["prob"]  # a field added after the checkpoint was written: its default
    assert config_difference(stored, _cfg()) is None


def test_worker_check_names_the_key_or_the_classes():
    cfg = _cfg()
    state = {"config": cfg.model_dump(mode="json"), "config_hash": config_hash(cfg), "classes": ["a", "b"]}
    check_same_run(state, cfg.with_num_workers(1), ["a", "b"], "ckpt")  # the same run: no error
    with pytest.raises(ConfigError) as err:
        check_same_run(state, _cfg(**{"optimizer.base_lr": 0.2}), ["a", "b"], "ckpt")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("ckpt: written by another config (optimizer.base_lr: 0.4 -> 0.2)")
    assert "--name" in msg
    with pytest.raises(ConfigError) as err:
        check_same_run(state, cfg, ["a", "b", "c"], "ckpt")
    assert "\n" not in str(err.value) and "trained on other classes (2 classes: a, b;" in str(err.value)
    with pytest.raises(ConfigError, match="config hash differs"):  # only a hash stored
        check_same_run({"config_hash": "0" * 16}, cfg, ["a", "b"], "ckpt")


# run.json beside the run -------------------------------------------------------------------------------
def test_run_file_resumes_the_same_config_and_refuses_another(tmp_path):
    storage = str(tmp_path)
    assert check_run(storage, "best", _cfg()) is False  # nothing there yet
    record_run(storage, "best", _cfg())
    recorded = (tmp_path / "best" / RUN_FILE).read_text()
    assert json.loads(recorded)["config_hash"] == config_hash(_cfg())
    assert check_run(storage, "best", _cfg()) is True
    assert check_run(storage, "best", _cfg(**{"run.log_every": 1}).with_num_workers(1)) is True
    with pytest.raises(ConfigError) as err:
        check_run(storage, "best", _cfg(**{"mix.mode": "mixup"}))
    msg = str(err.value)
    assert "\n" not in msg and f"run {tmp_path}/best was started with another config (mix.mode:" in msg
    assert "pass --name" in msg
    record_run(storage, "best", _cfg(**{"mix.mode": "mixup"}))  # never replaced
    assert (tmp_path / "best" / RUN_FILE).read_text() == recorded


def test_a_run_from_before_run_json_is_left_to_its_workers(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint_manager_snapshot.json").write_text("{}")
    assert check_run(str(tmp_path), "old", _cfg()) is True
    record_run(str(tmp_path), "old", _cfg())  # its config is unknown here: nothing recorded
    assert not (tmp_path / "old" / RUN_FILE).exists()


def _train_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    run_env = cli_env(**env)
    run_env.pop("RAY_ADDRESS", None)
    if STORAGE_ENV not in env:
        run_env.pop(STORAGE_ENV, None)
    return subprocess.run([PYTHON, "-m", "trainable.train", *args], cwd=ROOT, env=run_env, capture_output=True,
                          text=True, timeout=300)


def test_cli_refuses_another_config_under_the_same_name_before_ray(tmp_path):
    storage = tmp_path / "runs"
    record_run(str(storage), "best", _cfg())
    config = _write(tmp_path / "best.yaml", _cfg(**{"optimizer.base_lr": 0.8}))
    # an address nobody listens at: the refusal must come before any connection
    r = _train_cli(["--config", str(config), "--storage-path", str(storage), "--address", "127.0.0.1:1"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: run {storage}/best was started with another config")
    assert "optimizer.base_lr: 0.4 -> 0.8" in lines[0] and "--name" in lines[0]
    assert "training " not in r.stdout


# The default storage ---------------------------------------------------------------------------------------
def test_default_storage_follows_the_search_storage(monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert default_storage() == DEFAULT_STORAGE
    monkeypatch.setenv(STORAGE_ENV, "s3://bucket/trick-search/")
    assert default_storage() == "s3://bucket/trick-search/train"
    assert parse_args(["--config", "x.yaml"]).storage_path is None  # resolved in main, from the environment
    assert parse_args(["--config", "x.yaml", "--storage-path", "/data"]).storage_path == "/data"


def test_cli_uses_the_search_storage_from_the_environment(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")  # a folder under a file cannot be made: the check names the folder
    config = _write(tmp_path / "best.yaml", _cfg())
    r = _train_cli(["--config", str(config)], **{STORAGE_ENV: str(blocker)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"--storage-path {blocker}/train: cannot write there" in r.stderr


# Through Ray Train ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_resumes_its_own_run_and_skips_a_damaged_latest_checkpoint(ray_address, tmp_path):
    storage = tmp_path / "runs"
    config = _write(tmp_path / "prod.yaml", _cfg())
    cmd = ["--config", str(config), "--address", ray_address, "--storage-path", str(storage)]
    first = _train_cli(cmd)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-3000:]
    assert "after 3 epochs" in out
    run = storage / "prod"  # the default name: the config file's stem
    assert json.loads((run / RUN_FILE).read_text())["config_hash"] == config_hash(_cfg())
    checkpoints = sorted(run.glob("checkpoint_*/state.pt"))
    assert len(checkpoints) == 2, checkpoints  # the run keeps two: epochs 2 and 3

    (tmp_path / "other").mkdir()
    other = _write(tmp_path / "other" / "prod.yaml", _cfg(**{"mix.mode": "cutmix"}))  # same stem, same name
    refused = _train_cli(["--config", str(other), *cmd[2:]])
    assert refused.returncode == 2 and "started with another config (mix.mode: 'none' -> 'cutmix')" in refused.stderr

    latest = checkpoints[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])  # a truncated write
    again = _train_cli([*cmd, "--set", "run.log_every=5"])  # logging cadence: still the same run
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "resuming: that folder holds a run of this config" in out
    assert re.search(rf"unreadable checkpoint {re.escape(str(latest.parent))} \(RuntimeError: .*\); falling back to "
                     rf"{re.escape(str(checkpoints[0].parent))}", out), out[-3000:]
    assert "resumed from epoch 2" in out
    assert re.findall(r"epoch (\d+)/3", out) == ["3"]  # only the lost epoch is trained again
    assert "after 3 epochs" in out
