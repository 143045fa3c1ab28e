"""Gradient accumulation: 2 DDP workers x k micro-batches == one step on the whole batch,
with one gradient all-reduce per update."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.conftest import spawn_workers

from trainable.step import optimizer_update

WORLD, K, B = 2, 3, 2
UPDATES = 2
TOL = 1e-5


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5)
    )


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)


def _batch(update: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of one update: WORLD * K * B samples."""
    g = torch.Generator().manual_seed(50 + update)
    n = WORLD * K * B
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _micro_batches(update: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _batch(update)
    per = K * B
    x, y = x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]
    return [(x[j * B : (j + 1) * B], y[j * B : (j + 1) * B]) for j in range(K)]


def _counting_hook(state: dict, bucket):
    state["count"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _worker(rank: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        model = _model()
        ddp = DDP(model, bucket_cap_mb=1000)
        counter = {"count": 0}
        ddp.register_comm_hook(counter, _counting_hook)
        opt = _optimizer(ddp)
        res: dict = {"losses": [], "counts": []}
        for u in range(UPDATES):
            loss = optimizer_update(ddp, opt, _micro_batches(u, rank), nn.functional.cross_entropy)
            assert loss.requires_grad is False and loss.ndim == 0
            res["losses"].append(loss)
            res["counts"].append(counter["count"])
            if u == 0:
                res["params_1"] = [p.detach().clone() for p in model.parameters()]
            assert all(p.grad is None for p in model.parameters())
        res["params"] = [p.detach().clone() for p in model.parameters()]

        # Without no_sync every micro-batch backward all-reduces.
        before = counter["count"]
        for x, y in _micro_batches(0, rank):
            (nn.functional.cross_entropy(ddp(x), y) / K).backward()
        res["naive_count"] = counter["count"] - before
        torch.save(res, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference() -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
    model = _model()
    opt = _optimizer(model)
    params, losses = [], []
    for u in range(UPDATES):
        x, y = _batch(u)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
        params.append([p.detach().clone() for p in model.parameters()])
    return params, losses


def test_ddp_accumulation_equals_big_batch_and_syncs_once(tmp_path):
    results = spawn_workers(_worker, tmp_path, WORLD)
    ref_params, ref_losses = _reference()
    for rank in range(WORLD):
        got = results[rank]
        for name, ref in (("params_1", ref_params[0]), ("params", ref_params[1])):
            for a, b in zip(got[name], ref, strict=True):
                torch.testing.assert_close(a, b, atol=TOL, rtol=0)
        # One bucket (small model, large bucket_cap_mb): one all-reduce per update.
        assert got["counts"] == [1, 2]
        assert got["naive_count"] == K
    # The ranks' returned mean losses average to the global batch's loss.
    for u in range(UPDATES):
        mean = sum(results[r]["losses"][u] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, ref_losses[u], atol=TOL, rtol=0)
    # The update moved the parameters (so the equality is not vacuous).
    assert not torch.allclose(ref_params[0][0], _model()[0].weight)


def test_single_process_accumulation_scaler_and_autocast():
    x, y = _batch(0)
    micro = [(x[j * 4 : (j + 1) * 4], y[j * 4 : (j + 1) * 4]) for j in range(3)]
    ref_params, ref_losses = _reference()

    model = _model()
    loss = optimizer_update(model, _optimizer(model), micro, nn.functional.cross_entropy)
    for a, b in zip(model.parameters(), ref_params[0], strict=True):
        torch.testing.assert_close(a.detach(), b, atol=TOL, rtol=0)
    torch.testing.assert_close(loss, ref_losses[0], atol=TOL, rtol=0)

    # A GradScaler (power-of-two scale) unscales before the step: same result.
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    optimizer_update(model, _optimizer(model), micro, nn.functional.cross_entropy, scaler=scaler)
    for a, b in zip(model.parameters(), ref_params[0], strict=True):
        torch.testing.assert_close(a.detach(), b, atol=TOL, rtol=0)

    # bf16 autocast runs and returns a float32 loss close to the float one.
    model = _model()
    loss = optimizer_update(
        model, _optimizer(model), micro, nn.functional.cross_entropy, autocast_dtype=torch.bfloat16, device_type="cpu"
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_losses[0], atol=5e-2, rtol=0)

    with pytest.raises(ValueError):
        optimizer_update(model, _optimizer(model), [], nn.functional.cross_entropy)


# Gradient-norm clipping (optimizer.clip_grad_norm) ----------------------------------------------------
def _linear_problem() -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """A 3 -> 2 linear map and a batch of 6 regression targets, all fixed."""
    g = torch.Generator().manual_seed(7)
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 3, generator=g))
        model.bias.copy_(torch.randn(2, generator=g))
    return model, torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g) * 5


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).sum(dim=1).mean()


def _clipped_sgd_by_hand(model: nn.Linear, x: torch.Tensor, t: torch.Tensor, lr: float, max_norm: float):
    """The SGD step on the mean loss over the batch, its gradient written out and its global
    norm clipped: g <- g * max_norm / (|g| + 1e-6) when |g| > max_norm (torch's formula)."""
    w, b = model.weight.detach().double(), model.bias.detach().double()
    x, t = x.double(), t.double()
    r = x @ w.T + b - t  # residuals (N, 2)
    gw, gb = 2 * r.T @ x / len(x), 2 * r.mean(dim=0)
    norm = torch.sqrt((gw**2).sum() + (gb**2).sum())
    coef = min(1.0, max_norm / (float(norm) + 1e-6))
    return w - lr * coef * gw, b - lr * coef * gb, float(norm)


def _micro(x: torch.Tensor, t: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[:3], t[:3]), (x[3:], t[3:])]  # 2 accumulated micro-batches


def test_clipped_update_equals_hand_computed_clipped_sgd_step():
    model, x, t = _linear_problem()
    lr = 0.1
    _, _, norm = _clipped_sgd_by_hand(model, x, t, lr, 1.0)
    max_norm = norm / 4  # clipping is active
    want_w, want_b, _ = _clipped_sgd_by_hand(model, x, t, lr, max_norm)
    unclipped_w, _, _ = _clipped_sgd_by_hand(model, x, t, lr, float("inf"))
    optimizer_update(model, torch.optim.SGD(model.parameters(), lr=lr), _micro(x, t), _mse, clip_grad_norm=max_norm)
    torch.testing.assert_close(model.weight.detach().double(), want_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.bias.detach().double(), want_b, atol=1e-6, rtol=0)
    assert not torch.allclose(want_w, unclipped_w, atol=1e-3)  # the clip changed the step


def test_clipping_with_a_huge_norm_equals_no_clipping():
    a, x, t = _linear_problem()
    b, _, _ = _linear_problem()
    optimizer_update(a, _optimizer(a), _micro(x, t), _mse)
    optimizer_update(b, _optimizer(b), _micro(x, t), _mse, clip_grad_norm=1e12)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_with_a_grad_scaler_the_unscaled_gradient_is_clipped():
    model, x, t = _linear_problem()
    lr = 0.1
    _, _, norm = _clipped_sgd_by_hand(model, x, t, lr, 1.0)
    max_norm = norm / 4
    want_w, want_b, _ = _clipped_sgd_by_hand(model, x, t, lr, max_norm)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)  # scaled |g| is 1024x the true one
    optimizer_update(model, torch.optim.SGD(model.parameters(), lr=lr), _micro(x, t), _mse, scaler=scaler,
                     clip_grad_norm=max_norm)
    torch.testing.assert_close(model.weight.detach().double(), want_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.bias.detach().double(), want_b, atol=1e-6, rtol=0)
    assert scaler.get_scale() == 2.0**10  # the step was taken (finite gradients), not skipped
