"""Training throughput, measured against references in the same run.

--part loader   images/s PER LOADER PROCESS of our training dataset (trainable.data, imagefolder
                kind, 224 px, RandAugment 9, colour jitter 0.4, hflip 0.5) against the plain
                torchvision PIL pipeline (datasets.ImageFolder + transforms v1: RandomResizedCrop,
                RandomHorizontalFlip, ColorJitter(0.4, 0.4, 0.4), RandAugment(2, 9), PILToTensor),
                both through a DataLoader with num_workers=0 (the timed process decodes), on
                random-content ~500x375 JPEGs written to a temporary image folder. Runs alternate
                ours/ref; each run is one pass over all images after one untimed pass.
--part run      global images/s of whole training runs of a small CPU config (RUN_BASE: digits,
                resnet18_vd small_input 32 px, global batch 128 = micro 32 x 2 workers x 2)
                through Ray Train (build_trainer: TorchTrainer, DDP over 2 CPU workers of 1 CPU)
                against the same config in this process without Ray (world size 1, 2 torch
                threads, accumulation 4). Per run: the median of the per-epoch `images_per_s`
                after epoch 1. Runs alternate ray/single.
--part all      both.

    python benchmarks/train_throughput.py --part loader --images 256 --repeats 5
    python benchmarks/train_throughput.py --part run --epochs 3 --subset 0.5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# ------------------------------------------------------------------------------------------------
# Loader half
# ------------------------------------------------------------------------------------------------
_SIZES = [(500, 375), (375, 500), (480, 360), (512, 384), (500, 333)]


def write_jpeg_folder(root: Path, images: int, classes: int = 4, seed: int = 0) -> Path:
    """root/train/<class>/*.jpg (`images` in all) and root/val/<class>/*.jpg (one per class).

    Content: low-resolution random colours upsampled (smooth regions and edges, like photos
    compress) plus pixel noise, saved at JPEG quality 90; sizes around 500x375.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)

    def one(path: Path, k: int) -> None:
        w, h = _SIZES[k % len(_SIZES)]
        base = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR), dtype=np.int16)
        img = img + rng.integers(-20, 21, img.shape, dtype=np.int16)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)

    for split, count in (("train", images), ("val", classes)):
        for c in range(classes):
            (root / split / f"class{c}").mkdir(parents=True, exist_ok=True)
        for k in range(count):
            one(root / split / f"class{k % classes}" / f"{k:05d}.jpg", k)
    return root


def _ours(root: Path, size: int) -> torch.utils.data.Dataset:
    from trainable.config import TrainConfig
    from trainable.datasets import build_datasets

    cfg = TrainConfig.model_validate(
        {
            "data": {"kind": "imagefolder", "root": str(root), "image_size": size},
            "augment": {
                "crop_scale": [0.08, 1.0],  # the reference's RandomResizedCrop default
                "hflip": 0.5,
                "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
                "randaugment": {"num_ops": 2, "magnitude": 9},
            },
        }
    )
    train, _, _ = build_datasets(cfg)
    return train


def _reference(root: Path, size: int) -> torch.utils.data.Dataset:
    from torchvision import datasets
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.RandomResizedCrop(size),
            T.RandomHorizontalFlip(),
            T.ColorJitter(0.4, 0.4, 0.4),
            T.RandAugment(2, 9),
            T.PILToTensor(),
        ]
    )
    return datasets.ImageFolder(str(root / "train"), transform=tf)


def _one_pass(loader: torch.utils.data.DataLoader) -> tuple[float, float]:
    """(images per wall second, images per CPU second of this process). The CPU figure is
    what one loader process delivers when it has a core to itself; it is the steadier one
    on a shared machine."""
    n = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for images, _ in loader:
        n += images.shape[0]
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def loader_benchmark(args: argparse.Namespace) -> dict[str, list[float]]:
    """Images/s per loader process, ours vs the torchvision PIL reference; prints medians
    and the ratio, returns the per-run figures."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loader_bench_") as tmp:
        root = write_jpeg_folder(Path(tmp), args.images)
        loaders = {
            name: torch.utils.data.DataLoader(ds, batch_size=args.batch, shuffle=False, num_workers=0)
            for name, ds in (("ours", _ours(root, args.size)), ("ref", _reference(root, args.size)))
        }
        torch.manual_seed(0)
        for loader in loaders.values():  # untimed: page cache, first-call set-up
            _one_pass(loader)
        results: dict[str, list[float]] = {f"{name} {clock}": [] for name in loaders for clock in ("wall", "cpu")}
        for r in range(args.repeats):
            names = list(loaders) if r % 2 == 0 else list(reversed(loaders))
            for name in names:
                wall, cpu = _one_pass(loaders[name])
                results[f"{name} wall"].append(wall)
                results[f"{name} cpu"].append(cpu)
                print(
                    f"loader run {r + 1}/{args.repeats} {name:4s}: {wall:7.1f} images/s wall, "
                    f"{cpu:7.1f} images/CPU-s",
                    flush=True,
                )
    med = {key: statistics.median(v) for key, v in results.items()}
    for clock, unit in (("wall", "images/s"), ("cpu", "images/CPU-s")):
        print(
            f"median {clock}: ours (trainable.data, PIL, transforms v2) {med['ours ' + clock]:.1f}, "
            f"ref (torchvision ImageFolder, transforms v1) {med['ref ' + clock]:.1f} {unit} per loader process; "
            f"ratio ours/ref {med['ours ' + clock] / med['ref ' + clock]:.3f}"
        )
    return results


def add_loader_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("loader part")
    g.add_argument("--images", type=int, default=256, help="JPEG files written and read per run")
    g.add_argument("--size", type=int, default=224, help="training crop size")
    g.add_argument("--batch", type=int, default=32, help="loader batch size")
    g.add_argument("--repeats", type=int, default=5, help="runs per pipeline, interleaved")
    g.add_argument("--threads", type=int, default=1, help="torch threads in the timed process")


# ------------------------------------------------------------------------------------------------
# Run half
# ------------------------------------------------------------------------------------------------
RUN_BASE: dict[str, Any] = {
    "model": {"name": "resnet18_vd", "small_input": True},
    "data": {"kind": "digits", "image_size": 32, "loader_workers": 0},
    "augment": {"crop_scale": [0.35, 1.0], "hflip": 0.0},
    "optimizer": {"base_lr": 0.4, "weight_decay": 5.0e-5},
    "batch": {"global_batch": 128, "micro_batch": 32},
    "distributed": {"num_workers": 2},
}
"""The run part's config: a small CPU training (the library defaults are an ImageNet run)."""


def run_config(args: argparse.Namespace) -> Any:
    """RUN_BASE with the run part's options applied (--set first, then --epochs,
    --subset, --workers)."""
    import copy

    from trainable.config_io import apply_overrides, validate_config

    data = apply_overrides(copy.deepcopy(RUN_BASE), list(args.set))
    data.setdefault("run", {})["epochs"] = args.epochs
    data["run"]["checkpoint_every"] = 1  # every epoch's metrics come back with its checkpoint
    if args.subset is not None:
        data.setdefault("data", {})["subset"] = args.subset
    cfg = validate_config(data, "--set")
    if args.workers is not None and args.workers != cfg.distributed.num_workers:
        cfg = cfg.with_num_workers(args.workers)
    return cfg


def _steady(per_epoch: list[float]) -> float:
    """Median images/s over the epochs after the first (all of them when there is one)."""
    return statistics.median(per_epoch[1:] if len(per_epoch) > 1 else per_epoch)


def _ray_run(cfg: Any, storage: str, name: str) -> tuple[list[float], float]:
    """(per-epoch images/s, wall seconds) of one Ray Train run of cfg."""
    from trainable.train import build_trainer

    wall = time.perf_counter()
    result = build_trainer(cfg, name, storage, keep_checkpoints=None).fit()
    wall = time.perf_counter() - wall
    if result.error is not None:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    df = result.metrics_dataframe.sort_values("epoch")
    return [float(v) for v in df["images_per_s"]], wall


def _single_run(cfg: Any, threads: int) -> tuple[list[float], float]:
    """(per-epoch images/s, wall seconds) of the same run in this process: one worker, no
    Ray, no DDP, `threads` torch threads."""
    from trainable.loop import run_training

    cfg1 = cfg.with_num_workers(1)
    per_epoch: list[float] = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall = time.perf_counter()
    try:
        run_training(cfg1, 0, 1, torch.device("cpu"),
                     report=lambda m, checkpoint=None: per_epoch.append(float(m["images_per_s"])))
    finally:
        torch.set_num_threads(before)
    return per_epoch, time.perf_counter() - wall


def run_throughput(args: argparse.Namespace) -> dict[str, list[float]]:
    """Global images/s of whole training runs through Ray Train (TorchTrainer, DDP over
    `distributed.num_workers` CPU workers) against the same config in one process without
    Ray (world size 1, as many torch threads as the Ray workers have CPUs). Per run: the
    median of the per-epoch images/s after epoch 1. Runs alternate ray/single
    (`--run-repeats` of each); prints medians and the ratio ray/single."""

    import ray

    cfg = run_config(args)
    d = cfg.distributed
    if d.use_gpu:
        raise SystemExit("--part run measures CPU training; drop distributed.use_gpu")
    cpus = d.num_workers * d.cpus_per_worker
    threads = max(1, round(cpus))
    print(
        f"run: {cfg.model.name} small_input={cfg.model.small_input} {cfg.data.kind} {cfg.data.image_size}px "
        f"subset={cfg.data.subset:g} epochs={cfg.run.epochs}; global batch {cfg.batch.global_batch} = "
        f"{cfg.batch.micro_batch} x {d.num_workers} workers x {cfg.accum_steps} accum; "
        f"reference: 1 process, {threads} threads",
        flush=True,
    )
    if not ray.is_initialized():
        ray.init(num_cpus=max(cpus, 1), include_dashboard=False, log_to_driver=args.worker_logs)
    results: dict[str, list[float]] = {"ray": [], "single": []}
    with tempfile.TemporaryDirectory(prefix="run_bench_") as storage:
        for r in range(args.run_repeats):
            order = ("ray", "single") if r % 2 == 0 else ("single", "ray")
            for kind in order:
                if kind == "ray":
                    per_epoch, wall = _ray_run(cfg, storage, f"bench_{r}")
                else:
                    per_epoch, wall = _single_run(cfg, threads)
                results[kind].append(_steady(per_epoch))
                print(
                    f"run {r + 1}/{args.run_repeats} {kind:6s}: per-epoch images/s "
                    f"[{', '.join(f'{v:.1f}' for v in per_epoch)}] -> {results[kind][-1]:.1f}; "
                    f"{wall:.1f} s wall",
                    flush=True,
                )
    ray_med, single_med = statistics.median(results["ray"]), statistics.median(results["single"])
    print(
        f"median global images/s (epochs after the first): Ray Train {d.num_workers} workers x "
        f"{d.cpus_per_worker:g} CPU {ray_med:.1f}, one process without Ray ({threads} threads) "
        f"{single_med:.1f}; ratio ray/single {ray_med / single_med:.3f}"
    )
    return results


def add_run_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run part (RUN_BASE: digits, resnet18_vd 32 px, 2 CPU workers)")
    g.add_argument("--epochs", type=int, default=3, help="epochs per run; epoch 1 is left out of the figure")
    g.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: the config's, 2)")
    g.add_argument("--subset", type=float, default=0.5, help="data.subset, to shorten epochs (1: all)")
    g.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a TrainConfig key, e.g. batch.micro_batch=16 (repeatable)")
    g.add_argument("--run-repeats", type=int, default=1, help="runs of each kind, alternating")
    g.add_argument("--worker-logs", action="store_true", help="show the Ray workers' output")


def run_part(args: argparse.Namespace) -> Any:
    return run_throughput(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["loader", "run", "all"], default="all")
    add_loader_args(parser)
    add_run_args(parser)
    args = parser.parse_args(argv)
    for key in ("images", "size", "batch", "repeats", "threads", "epochs", "run_repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    if args.subset is not None and not 0 < args.subset <= 1:
        parser.error(f"--subset must be in (0, 1], got {args.subset}")

    print(f"torch={torch.__version__} threads={args.threads} part={args.part}")
    if args.part in ("loader", "all"):
        print(f"loader: images={args.images} size={args.size} batch={args.batch} repeats={args.repeats}")
        loader_benchmark(args)
    if args.part in ("run", "all"):
        run_part(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
