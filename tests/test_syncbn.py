"""SyncBatchNorm over gloo (2 real processes) equals BatchNorm over the concatenated batch.

What is compared, per case (4D, 2D, uneven per-rank batches with momentum=None):
- outputs and input gradients of rank r == the rank-r slice of the single-process
  reference, where the reference loss is the sum of the ranks' losses
  (loss_r = sum(out_r * R_r), R a fixed random tensor);
- weight/bias gradients summed over ranks == the reference's (each rank holds the local
  part, as torch's SyncBatchNorm; DDP's average is that sum / world size, matching a
  per-rank mean loss averaged over ranks: checked end-to-end in the DDP case);
- running_mean, running_var, num_batches_tracked on every rank == the reference's,
  after two training steps; eval outputs == the reference's eval outputs.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from tests.conftest import spawn_workers

from trainable.syncbn import SyncBatchNorm, convert_sync_batchnorm

WORLD = 2
TOL = 1e-5
CASES = {
    "4d": dict(sizes=(4, 4), channels=3, spatial=(5, 5), momentum=0.1),
    "2d": dict(sizes=(4, 4), channels=3, spatial=(), momentum=0.1),
    "uneven": dict(sizes=(3, 5), channels=2, spatial=(2, 3), momentum=None),
}


# Multi-process harness ----------------------------------------------------------------
def _init(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )


# Cases --------------------------------------------------------------------------------
def _case_data(case: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    shape = (sum(case["sizes"]), case["channels"], *case["spatial"])
    shift = torch.arange(case["channels"], dtype=torch.float32).view(1, -1, *([1] * len(case["spatial"])))
    x = torch.randn(shape, generator=g) * 2.0 + 3.0 + shift
    r = torch.randn(shape, generator=g)
    return x, r


def _init_bn(bn: nn.Module, channels: int) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)


def _run_case(bn: nn.Module, case: dict, rows: slice) -> dict:
    out: dict = {"out": [], "xgrad": []}
    bn.train()
    for step in range(2):
        x, r = _case_data(case, step)
        x = x[rows].clone().requires_grad_(True)
        y = bn(x)
        (y * r[rows]).sum().backward()
        out["out"].append(y.detach())
        out["xgrad"].append(x.grad)
    bn.eval()
    out["eval"] = bn(_case_data(case, 0)[0][rows]).detach()
    out["wgrad"], out["bgrad"] = bn.weight.grad, bn.bias.grad
    out["rm"], out["rv"] = bn.running_mean.clone(), bn.running_var.clone()
    out["nbt"] = int(bn.num_batches_tracked)
    return out


def _rows(case: dict, rank: int) -> slice:
    start = sum(case["sizes"][:rank])
    return slice(start, start + case["sizes"][rank])


def _ddp_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def _ddp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 3, 6, 6, generator=g) + 1.0, torch.randint(0, 5, (8,), generator=g)


def _worker(rank: int, port: int, outdir: str) -> None:
    _init(rank, port)
    try:
        res = {}
        for name, case in CASES.items():
            bn = SyncBatchNorm(case["channels"], momentum=case["momentum"])
            _init_bn(bn, case["channels"])
            res[name] = _run_case(bn, case, _rows(case, rank))

        # bf16 input: statistics in float32, output and input grad in bf16.
        case = CASES["4d"]
        bn = SyncBatchNorm(case["channels"])
        _init_bn(bn, case["channels"])
        x = _case_data(case, 0)[0][_rows(case, rank)].bfloat16().requires_grad_(True)
        y = bn(x)
        y.float().sum().backward()
        res["bf16"] = {"out": y.detach(), "xgrad_dtype": x.grad.dtype}

        # DDP + converted model, per-rank mean loss: grads equal the full-batch model's.
        model = convert_sync_batchnorm(_ddp_model())
        ddp = DDP(model)
        xs, ys = _ddp_data()
        half = slice(rank * 4, rank * 4 + 4)
        nn.functional.cross_entropy(ddp(xs[half]), ys[half]).backward()
        res["ddp"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save(res, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _reference(case: dict) -> dict:
    bn = nn.BatchNorm2d(case["channels"], momentum=case["momentum"]) if case["spatial"] else nn.BatchNorm1d(
        case["channels"], momentum=case["momentum"]
    )
    _init_bn(bn, case["channels"])
    return _run_case(bn, case, slice(None))


def test_syncbn_matches_full_batch_bn(tmp_path):
    results = spawn_workers(_worker, tmp_path, WORLD)
    for name, case in CASES.items():
        ref = _reference(case)
        for rank in range(WORLD):
            got, rows = results[rank][name], _rows(case, rank)
            for step in range(2):
                torch.testing.assert_close(got["out"][step], ref["out"][step][rows], atol=TOL, rtol=0)
                torch.testing.assert_close(got["xgrad"][step], ref["xgrad"][step][rows], atol=TOL, rtol=0)
            torch.testing.assert_close(got["eval"], ref["eval"][rows], atol=TOL, rtol=0)
            torch.testing.assert_close(got["rm"], ref["rm"], atol=TOL, rtol=0)
            torch.testing.assert_close(got["rv"], ref["rv"], atol=TOL, rtol=0)
            assert got["nbt"] == ref["nbt"] == 2
        wsum = sum(results[r][name]["wgrad"] for r in range(WORLD))
        bsum = sum(results[r][name]["bgrad"] for r in range(WORLD))
        # Sums of ~200 float32 terms of magnitude ~10: compared relatively as well.
        torch.testing.assert_close(wsum, ref["wgrad"], atol=TOL, rtol=TOL)
        torch.testing.assert_close(bsum, ref["bgrad"], atol=TOL, rtol=TOL)
        # The per-rank local parts differ (so the sum above is a real check).
        assert not torch.allclose(results[0][name]["wgrad"], results[1][name]["wgrad"])

    # bf16
    case = CASES["4d"]
    ref = _reference(case)
    for rank in range(WORLD):
        got = results[rank]["bf16"]
        assert got["out"].dtype == torch.bfloat16 and got["xgrad_dtype"] == torch.bfloat16
        torch.testing.assert_close(got["out"].float(), ref["out"][0][_rows(case, rank)], atol=5e-2, rtol=2e-2)

    # DDP: averaged grads == full-batch grads of the plain-BN model with the mean loss.
    model = _ddp_model()
    xs, ys = _ddp_data()
    nn.functional.cross_entropy(model(xs), ys).backward()
    for n, p in model.named_parameters():
        for rank in range(WORLD):
            torch.testing.assert_close(results[rank]["ddp"][n], p.grad, atol=TOL, rtol=0, msg=n)


# Single process ---------------------------------------------------------------------------
def test_without_process_group_is_plain_bn():
    assert not dist.is_initialized()
    for case in CASES.values():
        ref = _reference(case)
        bn = SyncBatchNorm(case["channels"], momentum=case["momentum"])
        _init_bn(bn, case["channels"])
        got = _run_case(bn, case, slice(None))
        for key in ("rm", "rv", "eval", "wgrad", "bgrad"):
            torch.testing.assert_close(got[key], ref[key], atol=TOL, rtol=0)
        torch.testing.assert_close(got["xgrad"][1], ref["xgrad"][1], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="channels"):
        SyncBatchNorm(3)(torch.randn(2, 4))


def test_convert_resnet_keeps_state():
    models = pytest.importorskip("models")
    torch.manual_seed(0)
    model = models.create_model("resnet18_vd", num_classes=10, small_input=True)
    # Non-default state to be kept.
    n_bn = 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n_bn += 1
            with torch.no_grad():
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(5)
    first_bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn.weight.requires_grad_(False)
    first_bn.eps, first_bn.momentum = 1e-3, 0.2
    assert n_bn > 0
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)

    out = convert_sync_batchnorm(model)
    assert out is model
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(kinds) == n_bn and all(k is SyncBatchNorm for k in kinds)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    conv_first = next(m for m in model.modules() if isinstance(m, SyncBatchNorm))
    assert conv_first.eps == 1e-3 and conv_first.momentum == 0.2 and not conv_first.weight.requires_grad
    assert not conv_first.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, atol=1e-6, rtol=0)

    # A bare BN module is returned converted; no-parameter models convert too.
    bare = convert_sync_batchnorm(nn.BatchNorm1d(4))
    assert type(bare) is SyncBatchNorm
    assert type(convert_sync_batchnorm(nn.Sequential(nn.BatchNorm1d(4, affine=False)))[0]) is SyncBatchNorm
    # CUDA path delegates to torch (no CUDA tensors needed to check the dispatch).
    cuda_conv = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(2)), device="cuda")
    assert type(cuda_conv[0]) is nn.SyncBatchNorm
