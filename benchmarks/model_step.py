"""Training-step throughput of our resnet50_vd against timm's resnet50d, measured in the same run.

One step = forward, cross-entropy, backward, SGD step. Runs alternate ours/ref after one untimed
round per model; each run also starts with untimed warmup steps.

    python benchmarks/model_step.py --batch 8 --size 128 --steps 5 --repeats 5 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import create_model  # noqa: E402


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for but CUDA is not available")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    warmup: int,
) -> float:
    """Images/s over `steps` training steps after `warmup` untimed ones."""
    device = x.device
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * x.shape[0] / (time.perf_counter() - start)


def run_benchmark(
    batch: int, size: int, steps: int, repeats: int, threads: int, device_name: str, warmup: int = 2
) -> dict[str, list[float]]:
    """Alternate ours/ref runs; return images/s per run for each."""
    import timm

    torch.set_num_threads(threads)
    device = _pick_device(device_name)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    torch.manual_seed(0)
    models = {
        "ours": create_model("resnet50_vd"),
        "ref": timm.create_model("resnet50d", pretrained=False),
    }
    for name in models:
        models[name] = models[name].to(device, memory_format=memory_format).train()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randint(0, 1000, (batch,), device=device)

    for model in models.values():  # one untimed round: first-call kernel/allocator set-up
        _timed_run(model, x, y, 1, warmup)

    results: dict[str, list[float]] = {"ours": [], "ref": []}
    for r in range(repeats):
        for name, model in models.items():
            ips = _timed_run(model, x, y, steps, warmup)
            results[name].append(ips)
            print(f"run {r + 1}/{repeats} {name:4s}: {ips:8.2f} images/s", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per model, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args(argv)
    for key in ("batch", "size", "steps", "repeats", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")

    device = _pick_device(args.device)
    print(
        f"device={device} torch={torch.__version__} threads={args.threads} batch={args.batch} "
        f"size={args.size} steps={args.steps} warmup={args.warmup} repeats={args.repeats}"
    )
    results = run_benchmark(args.batch, args.size, args.steps, args.repeats, args.threads, args.device, args.warmup)
    ours, ref = statistics.median(results["ours"]), statistics.median(results["ref"])
    best_ours, best_ref = max(results["ours"]), max(results["ref"])
    print(f"median ours (resnet50_vd): {ours:.2f} images/s  (best {best_ours:.2f})")
    print(f"median ref  (timm resnet50d): {ref:.2f} images/s  (best {best_ref:.2f})")
    print(f"ratio ours/ref: {ours / ref:.3f}  (best/best {best_ours / best_ref:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
