"""Faults a long run meets: a damaged latest checkpoint, a killed training worker, a
search's local study mirror left by a deleted experiment of the same name, and a storage
that stops accepting writes part-way through a search."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from search.experiment.folder import EXPERIMENT_ID, SEARCH_INFO, STUDY_FILE, Experiment, claim_mirror, recorded_space, restore_study
from search.experiment.trials import read_results, summarise
from search.experiment.faults import storage_failure
from tests.conftest import PYTHON, ROOT, cli_env, tiny_train
from tests.test_scale_out import s3  # noqa: F401  (a local S3 server)
from trainable.config import ConfigError
from trainable.config_io import validate_config
from trainable.resume import checkpoint_candidates, load_resume_state
from trainable.storage import local_mirror



# A damaged latest checkpoint ------------------------------------------------------------------------------
def _checkpoint(run: Path, second: int, epoch: int) -> Path:
    """A checkpoint folder as Ray Train names them (checkpoint_<date>, in time order)."""
    folder = run / f"checkpoint_2026-01-01_00-00-{second:02d}.000000"
    folder.mkdir(parents=True)
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": epoch}, folder / "state.pt")
    return folder


def _ray_checkpoint(folder: Path):
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(folder))


def test_readable_latest_checkpoint_is_used_without_warning(tmp_path, caplog):
    _checkpoint(tmp_path, 1, 1)
    latest = _checkpoint(tmp_path, 2, 2)
    with caplog.at_level(logging.WARNING, logger="trainable.resume"):
        state, source = load_resume_state(_ray_checkpoint(latest))
    assert state["epoch"] == 2 and source.path == str(latest)
    assert not caplog.records


@pytest.mark.parametrize("damage", ["truncated", "empty", "missing", "not a state"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    previous = _checkpoint(tmp_path, 1, 1)
    latest = _checkpoint(tmp_path, 2, 2)
    _checkpoint(tmp_path, 3, 3)  # newer than the latest Ray knows: an unfinished upload, never used
    state_file = latest / "state.pt"
    if damage == "truncated":
        state_file.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    elif damage == "empty":
        state_file.write_bytes(b"")
    elif damage == "missing":
        state_file.unlink()
    else:
        torch.save({"epoch": 2}, state_file)
    with caplog.at_level(logging.WARNING, logger="trainable.resume"):
        state, source = load_resume_state(_ray_checkpoint(latest))
    assert state["epoch"] == 1 and source.path == str(previous)
    [record] = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert message.startswith(f"unreadable checkpoint {latest} (") and message.endswith(f"falling back to {previous}")


def test_candidates_are_the_latest_then_older_ones_newest_first(tmp_path):
    older = [_checkpoint(tmp_path, s, s) for s in (1, 2)]
    latest = _checkpoint(tmp_path, 3, 3)
    _checkpoint(tmp_path, 4, 4)
    (tmp_path / "tensorboard").mkdir()
    paths = [c.path for c in checkpoint_candidates(_ray_checkpoint(latest))]
    assert paths == [str(latest), str(older[1]), str(older[0])]


def test_no_readable_checkpoint_is_one_line(tmp_path):
    only = _checkpoint(tmp_path, 1, 1)
    (only / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError) as err:
        load_resume_state(_ray_checkpoint(only))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"no readable checkpoint to resume from: {only} (")
    assert "--name" in msg


def test_every_rank_takes_the_checkpoint_the_unluckiest_rank_could_read(tmp_path):
    _checkpoint(tmp_path, 1, 1)
    latest = _checkpoint(tmp_path, 2, 2)
    # this rank reads the latest; another could not: the agreement says index 1
    state, _ = load_resume_state(_ray_checkpoint(latest), agree=lambda index: max(index, 1))
    assert state["epoch"] == 1
    with pytest.raises(ConfigError, match="another worker could not read them"):
        load_resume_state(_ray_checkpoint(latest), agree=lambda index: 2)


def test_resuming_with_other_classes_stops_the_worker_with_one_line(tmp_path):
    """The worker's own check (the CLI cannot know the classes before the data is read)."""
    from trainable.loop import run_training

    cfg = validate_config(tiny_train(epochs=4))
    folder = tmp_path / "checkpoint_2026-01-01_00-00-01.000000"
    folder.mkdir()
    classes = [str(i) for i in range(9)]  # the digits have 10
    torch.save({"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "config": cfg.model_dump(mode="json"),
                "classes": classes}, folder / "state.pt")
    with pytest.raises(ConfigError) as err:
        run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: None,
                     checkpoint=_ray_checkpoint(folder))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{folder}: trained on other classes (9 classes: 0, 1, 2, 3, 4, ...;")
    assert "10 classes" in msg


# A killed training worker ------------------------------------------------------------------------------------
def _train_workers(address: str) -> list[int]:
    """The pids of the live Ray Train workers of the Ray instance at `address`."""
    from ray.util.state import list_actors

    actors = list_actors(address=address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
                         timeout=30)
    return [a.pid for a in actors]


def _registered_epoch(run: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered for the run (0: none)."""
    try:
        snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not there yet, or being written
        return 0
    return max((int(r["metrics"]["epoch"]) for r in snapshot.get("checkpoint_results", [])), default=0)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_the_run_resumes_from_its_last_checkpoint(ray_address, tmp_path):
    data = tiny_train(epochs=4)
    data["distributed"] = {"num_workers": 2, "max_failures": 1}
    config = tmp_path / "killed.yaml"
    config.write_text(validate_config(data).to_yaml())
    storage = tmp_path / "runs"
    cmd = [PYTHON, "-m", "trainable.train", "--config", str(config), "--address", ray_address,
           "--storage-path", str(storage)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []
    killed = None
    try:
        deadline = time.monotonic() + 300
        for line in proc.stdout:
            lines.append(line)
            # epoch 2 is logged, then its checkpoint is reported: once Ray Train has
            # registered it, the workers are in epoch 3 (or later)
            if "epoch 2/4" in line:
                while (registered := _registered_epoch(storage / "killed")) < 2:
                    assert time.monotonic() < deadline, "".join(lines[-20:])
                    time.sleep(0.1)
                pids = _train_workers(ray_address)
                assert len(pids) == 2, pids
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "".join(lines[-20:])
        rest, _ = proc.communicate(timeout=400)
        lines.append(rest)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    out = "".join(lines)
    assert killed is not None, out[-3000:]
    assert proc.returncode == 0, out[-3000:]
    resumed = [int(e) for e in re.findall(r"resumed from epoch (\d+)", out)]
    assert resumed and resumed[0] >= registered >= 2, out[-3000:]  # only the epoch in progress is lost
    epochs = [int(e) for e in re.findall(r"epoch (\d+)/4", out)]
    start = resumed[0]
    assert epochs[:2] == [1, 2] and epochs[len(epochs) - (4 - start):] == list(range(start + 1, 5)), (epochs, start)
    assert "after 4 epochs" in out


# A stale local mirror of a remote experiment ------------------------------------------------------------------------
def _remote_experiment(s3, monkeypatch, tmp_path) -> Experiment:  # noqa: F811
    _, aws = s3
    for key, value in aws.items():
        monkeypatch.setenv(key, value)  # HOME too: the mirrors live under it
    return Experiment("s3://trick-bucket/exps", "again")


def test_a_new_experiment_moves_a_stale_mirror_aside(s3, monkeypatch, tmp_path):  # noqa: F811
    from search.run import prepare
    from search.experiment.folder import record_space

    client, _ = s3
    remote = _remote_experiment(s3, monkeypatch, tmp_path)
    space, exp, sets = prepare(None, [], False, "again", "s3://trick-bucket/exps")
    assert exp == remote
    record_space(exp, space, sets)
    first_id = json.loads(exp.store.read_text(SEARCH_INFO))[EXPERIMENT_ID]
    mirror = Path(exp.local)
    assert (mirror / EXPERIMENT_ID).read_text().strip() == first_id
    (mirror / STUDY_FILE).write_text("the first experiment's study")

    # the experiment is deleted from the bucket, and one of the same name is started
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="trick-bucket", Prefix="exps/again/")["Contents"]]
    client.delete_objects(Bucket="trick-bucket", Delete={"Objects": [{"Key": k} for k in keys]})
    space, exp, sets = prepare(None, [], False, "again", "s3://trick-bucket/exps")
    record_space(exp, space, sets)
    second_id = json.loads(exp.store.read_text(SEARCH_INFO))[EXPERIMENT_ID]
    assert second_id != first_id
    assert sorted(p.name for p in mirror.iterdir()) == [EXPERIMENT_ID]  # a fresh study
    assert (mirror / EXPERIMENT_ID).read_text().strip() == second_id
    [aside] = mirror.parent.glob(f"{mirror.name}.stale-*")  # kept, never deleted
    assert (aside / STUDY_FILE).read_text() == "the first experiment's study"


def test_resume_replaces_a_mirror_of_another_experiment_with_the_bucket_copy(s3, monkeypatch, tmp_path):  # noqa: F811
    exp = _remote_experiment(s3, monkeypatch, tmp_path)
    exp.store.write_text(SEARCH_INFO, json.dumps({EXPERIMENT_ID: "current", "overrides": []}))
    exp.store.write_text(STUDY_FILE, "this experiment's study")
    mirror = local_mirror(exp.path)
    claim_mirror(exp, "deleted-one")
    (mirror / STUDY_FILE).write_text("a deleted experiment's study")
    restore_study(exp)
    assert (mirror / STUDY_FILE).read_text() == "this experiment's study"
    assert (mirror / EXPERIMENT_ID).read_text().strip() == "current"
    [aside] = mirror.parent.glob(f"{mirror.name}.stale-*")
    assert (aside / STUDY_FILE).read_text() == "a deleted experiment's study"
    restore_study(exp)  # its own mirror now: left alone
    assert len(list(mirror.parent.glob(f"{mirror.name}.stale-*"))) == 1


def test_mirrors_of_experiments_from_before_identities_are_kept(s3, monkeypatch, tmp_path):  # noqa: F811
    exp = _remote_experiment(s3, monkeypatch, tmp_path)
    exp.store.write_text(SEARCH_INFO, json.dumps({"overrides": []}))  # no experiment id
    mirror = local_mirror(exp.path)
    (mirror / STUDY_FILE).write_text("its study")
    restore_study(exp)
    assert (mirror / STUDY_FILE).read_text() == "its study"
    assert not list(mirror.parent.glob(f"{mirror.name}.stale-*"))


# A storage that stops accepting writes -------------------------------------------------------------------------------
def test_storage_errors_are_found_in_causes_and_trial_lines(tmp_path):
    exp = Experiment(str(tmp_path), "exp")
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "exp" / "optuna.db"))
    try:
        try:
            raise full
        except OSError as inner:
            raise RuntimeError("An exception is raised during the commit.") from inner
    except RuntimeError as outer:
        line = storage_failure(exp, outer)
    assert line is not None and "\n" not in line
    assert f"no space left: {tmp_path}/exp/optuna.db" in line
    assert line.endswith(f"python -m search.run --storage-path {tmp_path} --name exp --resume")
    trial = "OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space left on device"
    assert "[Errno 28]" in storage_failure(exp, trial_errors=["ValueError: diverged", trial])
    assert storage_failure(exp, ValueError("diverged: non-finite loss"), ["ZeroDivisionError: x"]) is None


def filling_trial(config: dict, space, runs_path: str) -> None:
    """A trial that reports fixed curves; with a `<disk>.fill` file beside the disk, it fills
    the disk after its first epoch."""
    from ray import tune

    disk = Path(runs_path).parents[1]
    for epoch in (1, 2):
        if epoch == 2 and disk.with_name(disk.name + ".fill").exists():
            with open(disk / "filler", "ab") as f:
                try:
                    while True:
                        f.write(b"\0" * 2**16)
                        f.flush()
                except OSError:
                    pass
        tune.report({"epoch": epoch, "val_acc": 0.1 * epoch + config["label_smoothing"], "val_loss": 1.0})


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB file system of its own (a tmpfs: needs root and mount rights)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_full_disk_mid_search_is_one_line_and_the_search_resumes(ray_address, small_disk, monkeypatch, capsys):
    import search.phases.search
    import search.run

    monkeypatch.setattr(search.phases.search, "run_trial", filling_trial)
    args = ["--address", ray_address, "--storage-path", str(small_disk), "--name", "full", "--num-samples", "3",
            "--max-concurrent-trials", "1", "--set", "train.run.epochs=2",
            "--set", "experiment.scheduler={kind: fifo}", "--set", "experiment.max_failures=0",
            "--set", "experiment.confirm=null"]
    fill = small_disk.with_name(small_disk.name + ".fill")
    fill.write_text("")
    assert search.run.main(args) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"error: the storage of experiment {small_disk}/full stopped accepting writes ("), err
    assert "Traceback" not in err
    assert lines[-1].endswith(f"--storage-path {small_disk} --name full --resume")

    assert not list((small_disk / "full").glob(".write-check-*"))  # the probe leaves nothing behind

    fill.unlink()
    (small_disk / "filler").unlink()  # space again
    assert search.run.main([*args[:6], "--resume"]) == 0, capsys.readouterr()
    exp = Experiment(str(small_disk), "full")
    space, _ = recorded_space(exp)
    rows = summarise(read_results(exp.path), space)
    assert [r.status for r in rows] == ["done"] * 3, rows
