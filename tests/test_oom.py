"""A CUDA out-of-memory at a fixed micro_batch is deterministic: not retried, one line naming
the global batch, the micro-batch and the device's memory, suggesting `micro_batch: auto`; at
`micro_batch: auto` it is retried like any other failure."""

from __future__ import annotations

import types

import pytest
import torch

import trainable.loop as loop
from trainable.config import TrainConfig
from trainable.failures import EndOnUserError, FixedMicroBatchOutOfMemory, deterministic_cause, out_of_memory
from tests.conftest import tiny_train

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.77 GiB total capacity)"


def config(micro_batch: object) -> TrainConfig:
    data = tiny_train()
    data["batch"] = {"global_batch": 1024, "micro_batch": micro_batch}
    data["distributed"] = {"num_workers": 4}
    return TrainConfig.model_validate(data)


def test_an_out_of_memory_at_a_fixed_micro_batch_is_deterministic_and_says_what_to_do():
    err = torch.cuda.OutOfMemoryError(OOM)
    line = out_of_memory(err, config(256), device_memory=16 * 2**30)
    assert isinstance(line, FixedMicroBatchOutOfMemory)
    assert str(line) == (
        "CUDA out of memory at batch.global_batch 1024 with batch.micro_batch 256 (x 4 workers) on a device with "
        "16.0 GiB: the same config runs out of memory on every attempt, so it is not retried; set "
        "batch.micro_batch: auto (the largest micro-batch that fits) or a smaller micro_batch")
    assert "on a device" not in str(out_of_memory(err, config(256)))  # memory unknown: not named
    assert deterministic_cause(line) is line  # the trial ends with it, never retried
    with pytest.raises(FixedMicroBatchOutOfMemory):  # and Ray Train ends the run at once
        EndOnUserError().after_exception(None, {0: line, 1: RuntimeError("gloo: connection closed by peer")})
    assert out_of_memory(err, config("auto")) is err  # probed micro-batch: retried
    assert deterministic_cause(err) is None


def test_the_worker_raises_it_in_place_of_the_out_of_memory(monkeypatch):
    def run_training(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(OOM)

    monkeypatch.setattr(loop, "run_training", run_training)
    monkeypatch.setattr(loop, "_context", lambda: (0, 1, torch.device("cpu")))
    import ray
    import ray.train

    monkeypatch.setattr(ray, "get_runtime_context", lambda: types.SimpleNamespace(get_node_id=lambda: "n"))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    with pytest.raises(FixedMicroBatchOutOfMemory, match="global_batch 1024 with batch.micro_batch 256") as err:
        loop.train_loop_per_worker(config(256).model_dump(mode="json"))
    assert isinstance(err.value.__cause__, torch.cuda.OutOfMemoryError)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        loop.train_loop_per_worker(config("auto").model_dump(mode="json"))
