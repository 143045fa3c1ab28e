"""The training run end to end: in one process, and through Ray Train with 2 gloo workers."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import PYTHON, ROOT, cli_env, tiny_train
from trainable.config_io import validate_config
from trainable.loop import METRICS, TrainingDiverged, run_training
from trainable.tensorboard import TENSORBOARD_DIR



def _cfg(**sections):
    data = tiny_train()
    for k, v in sections.items():
        data.setdefault(k, {})
        if isinstance(v, dict):
            data[k].update(v)
        else:
            data[k] = v
    return validate_config(data)


def test_in_process_run_learns_and_reports_every_metric(monkeypatch):
    cfg = _cfg(distributed={"num_workers": 1}, run={"epochs": 2}, mix={"mode": "cutmix"})
    reports = []
    monkeypatch.setattr("trainable.loop._report_with_checkpoint", lambda report, m, state: report(m))
    run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: reports.append(m))
    assert [r["epoch"] for r in reports] == [1, 2]
    assert set(METRICS) <= set(reports[-1])
    assert reports[-1]["accum_steps"] == 4 and reports[-1]["global_batch"] == 64
    assert reports[-1]["val_acc"] > 0.5  # 10 classes: chance is 0.1
    assert reports[-1]["val_acc5"] >= reports[-1]["val_acc"]
    assert reports[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine reaches its floor


def test_non_finite_loss_stops_with_epoch_step_and_lr(monkeypatch):
    cfg = _cfg(distributed={"num_workers": 1}, run={"epochs": 1, "log_every": 3})
    import trainable.loop as loop

    real = loop.normalize
    monkeypatch.setattr(loop, "normalize", lambda x, *args: real(x, *args) * float("nan"))
    with pytest.raises(TrainingDiverged) as err:
        run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: None)
    msg = str(err.value)
    assert msg.startswith("diverged: non-finite loss at epoch 1, step 0")
    assert "lr 0.01" in msg  # warmup starts at 0.1 x lr (0.1 x 0.4 x 64/256)


# Through Ray Train ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_train_two_workers_learn_report_and_write_tensorboard(ray_address, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from trainable.train import build_trainer

    cfg = _cfg(mix={"mode": "mixup"}, augment={"randaugment": {"magnitude": 9}})
    result = build_trainer(cfg, "digits2", str(tmp_path)).fit()
    m = result.metrics
    assert set(METRICS) <= set(m)
    assert m["epoch"] == 3 and m["accum_steps"] == 2 and m["global_batch"] == 64
    assert m["val_acc"] > 0.5, m
    assert result.checkpoint is not None and (Path(result.checkpoint.path) / "state.pt").is_file()

    events = list((tmp_path / "digits2" / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert events, "rank 0 writes TensorBoard events into the run folder"
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 4, "scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("epoch/val_acc")] == [1, 2, 3]
    assert "train/loss" in acc.Tags()["scalars"]
    assert "train/augmented_mixed_batch" in acc.Tags()["images"]


def _write_config(path: Path, **sections) -> Path:
    path.write_text(_cfg(**sections).to_yaml())
    return path


@pytest.mark.slow
def test_killed_run_resumes_from_its_checkpoint(ray_address, tmp_path):
    config = _write_config(tmp_path / "run.yaml", run={"epochs": 4})
    cmd = [PYTHON, "-m", "trainable.train", "--config", str(config), "--address", ray_address,
           "--storage-path", str(tmp_path / "runs"), "--name", "resumable"]
    first = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    seen = []
    deadline = time.monotonic() + 300
    try:
        for line in first.stdout:  # wait until epoch 2 is reported: epoch 1's checkpoint is safe
            seen.append(line)
            if re.search(r"epoch 2/4", line) or time.monotonic() > deadline:
                break
    finally:
        import os

        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert any("epoch 2/4" in s for s in seen), "".join(seen[-20:])

    second = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=400)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    resumed = re.search(r"resumed from epoch (\d+)", out)
    assert resumed, out[-3000:]
    start = int(resumed.group(1))
    assert start >= 1
    epochs_run = [int(e) for e in re.findall(r"epoch (\d+)/4", out)]
    assert epochs_run and epochs_run[0] == start + 1 and epochs_run[-1] == 4
    assert "after 4 epochs" in out


def test_rung_schedule_reports_the_floor_lr_at_every_rung(monkeypatch):
    cfg = _cfg(distributed={"num_workers": 1}, run={"epochs": 3}, schedule={"restarts": [1, 2], "min_lr_factor": 0.0})
    reports = []
    monkeypatch.setattr("trainable.loop._report_with_checkpoint", lambda report, m, state: report(m))
    run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: reports.append(m))
    assert [r["lr"] for r in reports] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


def test_repeats_train_one_config_on_consecutive_seeds(monkeypatch):
    """`run.repeats`: one worker function trains the config once per seed, every report
    says which seed it belongs to, and the seeds' runs differ."""
    import ray.train

    import trainable.loop as loop

    cfg = _cfg(distributed={"num_workers": 1}, run={"epochs": 1, "seed": 7, "repeats": 2})
    reports = []
    monkeypatch.setattr(loop, "_context", lambda: (0, 1, torch.device("cpu")))
    monkeypatch.setattr(loop, "_report_with_checkpoint", lambda report, m, state: report(m))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda m, checkpoint=None: reports.append(m))
    monkeypatch.setattr("ray.get_runtime_context", lambda: type("C", (), {"get_node_id": lambda self: "n"})())
    loop.train_loop_per_worker(cfg.model_dump(mode="json"))
    assert [(r["seed"], r["repeat"], r["epoch"]) for r in reports] == [(7, 0, 1), (8, 1, 1)]
    assert reports[0]["train_loss"] != reports[1]["train_loss"]
    assert cfg.for_repeat(1).run.seed == 8 and cfg.for_repeat(0) is cfg
