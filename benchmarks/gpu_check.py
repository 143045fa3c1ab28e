"""GPU check: what one device does with this project, every figure against a reference
measured in the same run.

(a) model: train-step images/s (forward, cross-entropy, backward, SGD) of our model beside
    timm's counterpart, in the precision `distributed.amp: auto` picks and channels_last on
    CUDA, with compile off and on (first-step seconds show the compile time), and the
    micro-batch `batch.micro_batch: auto` picks for that model and size;
(b) loader: images/s of the training loader (`trainable.data.build_loaders`, full
    augmentation with RandAugment) from a generated JPEG folder, decoded by CPU loader
    workers (`data.decode: cpu`) against read by them and decoded on the device (`gpu`);
(c) trial: one short trial of a search (`python -m search.run`, a generated image-folder
    space, 1 trial, 1 epoch, FIFO) and its start-up: seconds from the command's start (and
    from the trial's start) to the first optimizer step, which the run reports as `first_step_at`.

    bash benchmarks/gpu_check.sh                 # one GPU: resnet50_vd at 224 px, <= 8 minutes
    bash benchmarks/gpu_check.sh --device cpu    # tiny sizes (resnet18_vd, 32 px), ~2 minutes
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Preset:
    model: str
    ref: str  # timm's counterpart
    size: int
    batch: int
    steps: int
    warmup: int
    repeats: int
    images: int  # training JPEGs generated for (b) and (c)
    image_px: tuple[int, int]
    loader_epochs: int
    probe_cap: int  # global batch of the micro-batch probe (one worker)
    trial_batch: tuple[int, int]  # global, micro
    trial_timeout: int


PRESETS = {
    "full": Preset("resnet50_vd", "resnet50d", 224, 256, 20, 5, 3, 1024, (500, 375), 2, 1024, (256, 128), 330),
    "tiny": Preset("resnet18_vd", "resnet18d", 32, 8, 5, 2, 3, 64, (64, 48), 2, 64, (16, 8), 300),
}


def say(line: str) -> None:
    print(line, flush=True)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# (a) model -------------------------------------------------------------------------------------
def _stepper(model: Any, batch: int, size: int, device: Any, amp: str, channels_last: bool) -> Callable[[], None]:
    import torch
    import torch.nn.functional as F

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return step


def part_model(device: Any, p: Preset, backend: str) -> None:
    import timm
    import torch

    from models import create_model
    from trainable.config import TrainConfig
    from trainable.micro_batch import probe_micro_batch
    from trainable.precision import auto_amp

    amp, cl = auto_amp(device), device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    say(f"(a) model {p.model} vs timm {p.ref}: {p.size} px, batch {p.batch}, amp {amp}, "
        f"channels_last {'on' if cl else 'off'}, {p.steps} steps x {p.repeats} repeats")
    for compiled in (False, True):
        torch.manual_seed(0)
        models = {"ours": create_model(p.model), "timm": timm.create_model(p.ref, pretrained=False)}
        steps, first = {}, {}
        for name, m in models.items():
            m = m.to(device).train()
            if cl:
                m = m.to(memory_format=torch.channels_last)
            if compiled:
                m.compile(backend=backend)
            steps[name] = _stepper(m, p.batch, p.size, device, amp, cl)
            t = time.perf_counter()
            for _ in range(max(1, p.warmup)):
                steps[name]()
            _sync(device)
            first[name] = time.perf_counter() - t
        ips: dict[str, list[float]] = {"ours": [], "timm": []}
        for _ in range(p.repeats):
            for name, step in steps.items():  # alternate: a busy machine slows both alike
                _sync(device)
                t = time.perf_counter()
                for _ in range(p.steps):
                    step()
                _sync(device)
                ips[name].append(p.steps * p.batch / (time.perf_counter() - t))
        ours, ref = statistics.median(ips["ours"]), statistics.median(ips["timm"])
        mode = f"on ({backend})" if compiled else "off"
        say(f"(a) compile {mode}: ours {ours:.1f} img/s, timm {ref:.1f} img/s, ratio ours/timm {ours / ref:.3f} "
            f"(warm-up incl. compile: ours {first['ours']:.1f} s, timm {first['timm']:.1f} s)")
        del models, steps
        if device.type == "cuda":
            torch.cuda.empty_cache()
    cfg = TrainConfig.model_validate({
        "model": {"name": p.model}, "data": {"kind": "synthetic", "image_size": p.size},
        "batch": {"global_batch": p.probe_cap, "micro_batch": "auto"},
        "distributed": {"num_workers": 1, "use_gpu": device.type == "cuda"},
    })
    t = time.perf_counter()
    chosen = probe_micro_batch(cfg, device, p.probe_cap)
    say(f"(a) micro_batch auto: {chosen} (at most {p.probe_cap}; probe {time.perf_counter() - t:.1f} s)")


# (b) loader --------------------------------------------------------------------------------------
def _write_jpeg(args: tuple[str, int, int, int]) -> None:
    from PIL import Image

    path, w, h, seed = args
    rng = np.random.default_rng(seed)
    low = rng.random((h // 16 + 2, w // 16 + 2, 3)) * 255
    img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 10, img.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: Path, images: int, px: tuple[int, int], classes: int = 4) -> Path:
    """`images` training and images/8 validation JPEGs of random smooth content, sizes
    jittered around `px` (width, height), in `classes` classes."""
    jobs = []
    for split, n in (("train", images), ("val", max(classes, images // 8))):
        for i in range(n):
            d = root / split / f"class_{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (int(v * (0.8 + 0.4 * ((i * 0.618) % 1.0))) for v in px)
            jobs.append((str(d / f"{i:05d}.jpg"), w, h, i + (0 if split == "train" else 1_000_000)))
    with Pool(min(8, os.cpu_count() or 1)) as pool:
        pool.map(_write_jpeg, jobs, chunksize=16)
    return root


def _loader_cfg(root: Path, p: Preset, device: Any, decode: str, workers: int) -> Any:
    from trainable.config import RandAugmentConfig, TrainConfig

    ra: dict[str, Any] = {"num_ops": 2, "magnitude": 9}
    if "enabled" in RandAugmentConfig.model_fields:
        ra["enabled"] = True
    return TrainConfig.model_validate({
        "model": {"name": p.model},
        "data": {"kind": "imagefolder", "root": str(root), "image_size": p.size, "loader_workers": workers,
                 "decode": decode},
        "augment": {"hflip": 0.5, "randaugment": ra},
        "batch": {"global_batch": p.batch, "micro_batch": p.batch},
        "distributed": {"num_workers": 1, "use_gpu": device.type == "cuda"},
    })


def part_loader(device: Any, p: Preset, root: Path, workers: int) -> None:
    import torch

    from trainable.data import build_loaders

    say(f"(b) loader: {p.images} JPEGs around {p.image_px[0]}x{p.image_px[1]} -> {p.size} px, batch {p.batch}, "
        f"RandAugment(2, 9) + flip, {workers} loader workers")
    rates = {}
    for decode in ("cpu", "gpu"):
        torch.manual_seed(0)
        loaders = build_loaders(_loader_cfg(root, p, device, decode, workers), 0, 1, seed=0)
        for epoch in range(1 + p.loader_epochs):  # epoch 0: workers start, files reach the page cache
            if epoch == 1:
                _sync(device)
                t, n = time.perf_counter(), 0
            for images, _ in loaders.train:
                x = images.to(device, non_blocking=True)
                if epoch >= 1:
                    n += x.shape[0]
        _sync(device)
        rates[decode] = n / (time.perf_counter() - t)
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == (3, p.size, p.size), (x.dtype, x.shape)
        say(f"(b) decode {decode}: {rates[decode]:.1f} img/s")
        del loaders
    say(f"(b) ratio gpu/cpu decode: {rates['gpu'] / rates['cpu']:.3f}")


# (c) trial ---------------------------------------------------------------------------------------
def _space(root: Path, store: Path, p: Preset, device: Any) -> dict[str, Any]:
    cuda = device.type == "cuda"
    cpus = max(1, min(8, (os.cpu_count() or 2) - 2)) if cuda else 1
    return {
        "experiment": {
            "name": "gpu_check", "metric": "val_acc", "num_samples": 1, "max_concurrent_trials": 1,
            "scheduler": {"kind": "fifo"}, "sampler": {"kind": "random", "seed": 0},
            "confirm": None, "ablate": False, "storage_path": str(store),
        },
        "train": {
            "model": {"name": p.model, "small_input": False},
            "data": {"kind": "imagefolder", "root": str(root), "image_size": p.size, "decode": "gpu",
                     "loader_workers": "auto" if cuda else 0},
            "batch": {"global_batch": p.trial_batch[0], "micro_batch": p.trial_batch[1]},
            "distributed": {"num_workers": 1, "use_gpu": cuda, "cpus_per_worker": cpus},
            "run": {"epochs": 1, "log_every": 10},
        },
        "search": {"label_smoothing": {"choice": [0.0, 0.1]}},
    }


def _result_rows(store: Path) -> list[dict[str, Any]]:
    rows = []
    for path in glob.glob(str(store / "**" / "result.json"), recursive=True):
        with open(path) as f:
            rows += [r for r in (json.loads(ln) for ln in f if ln.strip()) if r.get("first_step_at")]
    return rows


def part_trial(device: Any, p: Preset, root: Path, work: Path) -> None:
    import yaml

    store = work / "store"
    space = work / "space.yaml"
    space.write_text(yaml.safe_dump(_space(root, store, p, device), sort_keys=False))
    say(f"(c) trial: {p.model} at {p.size} px on {device.type}, data.decode gpu, 1 trial, 1 epoch, FIFO")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "search.run", "--space", str(space), "--address", "local"]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=p.trial_timeout)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, out = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    wall = time.time() - start
    rows = _result_rows(store)
    if not rows:
        tail = "\n".join(str(out).splitlines()[-15:])
        say(f"(c) trial failed: exit {code} after {wall:.0f} s, no result reported\n{tail}")
        return
    if code != 0:  # the trial trained; what came after it (the answer, the report) did not end well
        last_line = next((ln for ln in reversed(str(out).splitlines()) if ln.strip()), "")
        say(f"(c) search command: exit {code} after the trial: {last_line.strip()}")
    first = min(rows, key=lambda r: r.get("time_total_s", 0.0))
    last = max(rows, key=lambda r: r.get("epoch", 0))
    trial_start = first["timestamp"] - first.get("time_total_s", 0.0)
    say(f"(c) trial ok: start-up {first['first_step_at'] - start:.1f} s from the command's start "
        f"({first['first_step_at'] - trial_start:.1f} s from the trial's start) to the first optimizer step; "
        f"val_acc {last.get('val_acc', float('nan')):.3f}, {last.get('images_per_s', float('nan')):.1f} img/s, "
        f"micro_batch {last.get('micro_batch')}, whole command {wall:.0f} s")


# Main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (the default with --device cpu)")
    ap.add_argument("--parts", default="model,loader,trial", help="comma-separated subset of model,loader,trial")
    ap.add_argument("--compile-backend", default=None,
                    help="torch.compile backend for (a) (default: inductor on CUDA, eager on the CPU, where "
                    "inductor's compile alone takes minutes)")
    ap.add_argument("--loader-workers", type=int, default=None, help="default: CPUs - 1 (1 with --tiny)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads with --device cpu (default 1, as in a Ray worker of 1 CPU)")
    ap.add_argument("--workdir", help="keep the generated folder and the experiment here (default: a temp folder)")
    args = ap.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in ("model", "loader", "trial")]
    if bad or not parts:
        ap.error(f"--parts: unknown {', '.join(bad) or '(none)'}; choose from model, loader, trial")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: CUDA is not available here", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    preset = PRESETS["tiny" if args.tiny or device.type == "cpu" else "full"]
    if device.type == "cpu":
        torch.set_num_threads(max(1, args.threads))
    backend = args.compile_backend or ("inductor" if device.type == "cuda" else "eager")
    workers = args.loader_workers if args.loader_workers is not None else (
        1 if preset is PRESETS["tiny"] else max(1, (os.cpu_count() or 2) - 1))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    cap = ".".join(map(str, torch.cuda.get_device_capability(device))) if device.type == "cuda" else "-"
    say(f"gpu_check: device {device.type} ({name}, capability {cap}), {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"preset {'tiny' if preset is PRESETS['tiny'] else 'full'}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.workdir or tmp)
        root = work / "images"
        if "loader" in parts or "trial" in parts:
            t = time.perf_counter()
            if not (root / "train").is_dir():
                make_jpeg_folder(root, preset.images, preset.image_px)
            say(f"generated {preset.images} JPEGs in {time.perf_counter() - t:.1f} s")
        if "model" in parts:
            part_model(device, preset, backend)
        if "loader" in parts:
            part_loader(device, preset, root, workers)
        if "trial" in parts:
            part_trial(device, preset, root, work)
    say(f"gpu_check: done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
