"""The GPU path on the CPU: precision by compute capability, torch.compile, loader options,
JPEGs decoded and augmented by the device-side pipeline (`data.decode: gpu`, run here with
device cpu), `batch.micro_batch: auto`, and `benchmarks/gpu_check.sh --device cpu`."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import trainable.gpu_decode as gd
import trainable.micro_batch as mb
from tests.conftest import PYTHON, ROOT, cli_env, tiny_train
from trainable.config import ConfigError, DataError, RandAugmentConfig, TrainConfig, check_accumulation, micro_batch_cap
from trainable.config_io import validate_config
from trainable.data import build_loaders, normalize
from trainable.precision import resolve_precision

CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it


def cfg_of(**sections: Any) -> TrainConfig:
    data = tiny_train()
    for k, v in sections.items():
        data[k] = {**data.get(k, {}), **v} if isinstance(v, dict) else v
    return validate_config(data)


def randaugment_on(magnitude: int = 9) -> dict[str, Any]:
    ra: dict[str, Any] = {"num_ops": 2, "magnitude": magnitude}
    if "enabled" in RandAugmentConfig.model_fields:
        ra["enabled"] = True
    return ra


# Precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("capability", "dtype", "scaled"), [
    ((9, 0), torch.bfloat16, False),  # H100/H200
    ((8, 0), torch.bfloat16, False),  # A100
    ((7, 0), torch.float16, True),  # V100: no bf16 tensor cores
    ((7, 5), torch.float16, True),  # T4
])
def test_amp_auto_follows_compute_capability(monkeypatch, capability, dtype, scaled):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    p = resolve_precision(cfg_of(), CUDA, 1)
    assert p.autocast_dtype is dtype and (p.scaler is not None) is scaled
    assert p.channels_last and not p.sync_bn


def test_amp_auto_is_off_on_cpu_and_explicit_values_win(monkeypatch):
    p = resolve_precision(cfg_of(), torch.device("cpu"), 2)
    assert p.autocast_dtype is None and p.scaler is None and not p.channels_last and p.sync_bn
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    p = resolve_precision(cfg_of(distributed={"amp": "bf16", "channels_last": False}), CUDA, 1)
    assert p.autocast_dtype is torch.bfloat16 and p.scaler is None and not p.channels_last


def test_loop_uses_the_precision_module():
    import trainable.loop as loop
    import trainable.precision as precision

    assert loop.resolve_precision is precision.resolve_precision and loop.Precision is precision.Precision


# torch.compile, micro-batch auto: one real run ---------------------------------------------------
def test_compiled_model_with_auto_micro_batch_trains_and_reports(monkeypatch):
    """distributed.compile compiles the model in place (state_dict keys unchanged) and the run
    trains; batch.micro_batch auto is resolved and reported. The compile uses the eager backend
    here: inductor's code generation alone takes minutes on this CPU (gpu_check measures it)."""
    import trainable.loop as loop

    compiled: list[torch.nn.Module] = []
    real = torch.nn.Module.compile

    def eager_compile(self: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        compiled.append(self)
        real(self, backend="eager")

    monkeypatch.setattr(torch.nn.Module, "compile", eager_compile)
    monkeypatch.setattr(loop, "_report_with_checkpoint", lambda report, m, state: report(m))
    cfg = cfg_of(distributed={"num_workers": 1, "compile": True}, batch={"micro_batch": "auto"},
                 run={"epochs": 1, "log_every": 1})
    reports: list[dict[str, Any]] = []
    loop.run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: reports.append(m),
                      max_updates=2)
    assert len(compiled) == 1 and compiled[0]._compiled_call_impl is not None
    plain = loop.build_model(cfg_of(), 10, torch.device("cpu"), resolve_precision(cfg_of(), torch.device("cpu"), 1))
    assert list(compiled[0].state_dict()) == list(plain.state_dict())
    m = reports[-1]
    assert isinstance(m["micro_batch"], int) and m["micro_batch"] & (m["micro_batch"] - 1) == 0
    assert m["micro_batch"] * m["accum_steps"] == m["global_batch"] == 64
    assert np.isfinite(m["train_loss"])


# Loader options ----------------------------------------------------------------------------------
def test_loader_workers_prefetch_persistent_and_pinned(monkeypatch):
    loaders = build_loaders(cfg_of(data={"loader_workers": "auto"}, distributed={"cpus_per_worker": 4}), 0, 1, 0)
    t = loaders.train
    assert (t.num_workers, t.persistent_workers, t.prefetch_factor, t.pin_memory) == (3, True, 4, False)
    t = build_loaders(cfg_of(data={"loader_workers": 0}), 0, 1, 0).train
    assert (t.num_workers, t.persistent_workers, t.prefetch_factor) == (0, False, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert build_loaders(cfg_of(distributed={"use_gpu": True}), 0, 1, 0).val.pin_memory


# GPU decode on the CPU ---------------------------------------------------------------------------
def write_photo(path: Path, size: tuple[int, int], seed: int, fmt: str = "JPEG") -> None:
    """Smooth random content plus noise: decodes and resizes like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    low = Image.fromarray((rng.random((h // 8 + 2, w // 8 + 2, 3)) * 255).astype(np.uint8))
    arr = np.asarray(low.resize((w, h), Image.BICUBIC), dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, format=fmt, quality=90)


def make_folder(root: Path, per_class: int = 6) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("ant", "bee")):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                write_photo(d / f"{i}.jpg", (40 + 7 * i, 72 - 5 * i), seed=100 * c + i + (50 if split == "val" else 0))
            write_photo(d / "z.png", (50, 41), seed=999 + c, fmt="PNG")  # not a JPEG: decoded by PIL
    return root


def folder_cfg(root: Path, decode: str, **data: Any) -> TrainConfig:
    return cfg_of(
        data={"kind": "imagefolder", "root": str(root), "image_size": 24, "loader_workers": 0, "decode": decode, **data},
        augment={"hflip": 0.5, "randaugment": randaugment_on(), "color_jitter": {"brightness": 0.3}},
        batch={"global_batch": 4, "micro_batch": 4}, distributed={"num_workers": 1},
    )


def test_gpu_decode_train_batches_keep_the_loader_contract(tmp_path):
    root = make_folder(tmp_path / "ds")
    loaders = build_loaders(folder_cfg(root, "gpu", loader_workers=1), 0, 1, 0)  # one worker process
    seen = 0
    for batch, targets in loaders.train:
        assert isinstance(batch, gd.EncodedBatch) and len(batch) == 4
        x = batch.to("cpu", non_blocking=True)
        assert x.dtype == torch.uint8 and x.shape == (4, 3, 24, 24) and x.is_contiguous()
        assert targets.dtype == torch.long and set(targets.tolist()) <= {0, 1}
        assert x.float().std() > 5  # real content, not a constant fill
        assert normalize(x, loaders.data_config).dtype == torch.float32
        seen += 1
    assert seen == 14 // 4


def test_gpu_decode_validation_is_deterministic_and_matches_the_cpu_pipeline(tmp_path):
    root = make_folder(tmp_path / "ds")

    def val_images(decode: str) -> tuple[torch.Tensor, torch.Tensor]:
        loaders = build_loaders(folder_cfg(root, decode), 0, 1, 0)
        pairs = [(b.to("cpu") if decode == "gpu" else b, t) for b, t in loaders.val]
        return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])

    gpu, gpu_t = val_images("gpu")
    again, _ = val_images("gpu")
    cpu, cpu_t = val_images("cpu")
    assert torch.equal(gpu, again) and torch.equal(gpu_t, cpu_t) and gpu.shape == cpu.shape == (14, 3, 24, 24)
    # Both decoders are libjpeg-turbo with the same IDCT, and torchvision's uint8 antialiased
    # bilinear resize follows PIL's fixed-point arithmetic: only rounding may differ (<= 1
    # measured; 2 allowed). A wrong crop, size, channel order or interpolation moves many
    # pixels by tens of levels.
    diff = (gpu.int() - cpu.int()).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.1


def test_randaugment_per_operation_batched_equals_per_image():
    op = v2.RandAugment(num_ops=2, magnitude=15, num_magnitude_bins=31)
    x = torch.randint(0, 256, (5, 3, 20, 18), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for name, (magnitudes_fn, _signed) in op._AUGMENTATION_SPACE.items():
        mags = magnitudes_fn(31, 20, 18)
        m = float(mags[op.magnitude]) if mags is not None else 0.0
        batched = gd.randaugment_op(op, x, name, m)
        single = torch.stack([gd.randaugment_op(op, x[i:i + 1], name, m)[0] for i in range(5)])
        assert torch.equal(batched, single), name


def test_random_ops_draw_per_image_and_follow_the_seed():
    x = torch.randint(0, 256, (3, 30, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    pipeline = v2.Compose([v2.RandomResizedCrop(16, antialias=True), v2.RandomHorizontalFlip(0.5),
                           v2.RandAugment(2, 15, 31), v2.ToImage(), v2.ToPureTensor()])
    t = gd.DeviceTransform(pipeline)
    torch.manual_seed(3)
    a = t([x] * 16)
    torch.manual_seed(3)
    assert torch.equal(a, t([x] * 16))
    assert a.shape == (16, 3, 16, 16) and len({bytes(img.numpy()) for img in a}) == 16
    flip = gd.DeviceTransform(v2.Compose([v2.RandomHorizontalFlip(0.5)]))([x] * 32)
    flipped = [torch.equal(img, x.flip(-1)) for img in flip]
    assert all(f or torch.equal(img, x) for f, img in zip(flipped, flip)) and 0 < sum(flipped) < 32


def test_device_decoder_refusal_falls_back_to_pil(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "ds")
    batch, _ = next(iter(build_loaders(folder_cfg(root, "gpu"), 0, 1, 0).val))
    expected = batch.decode("cpu")

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("nvjpeg: unsupported")

    monkeypatch.setattr(gd, "decode_jpeg", refuse)
    for a, b in zip(batch.decode("cpu"), expected):
        assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 2


def test_truncated_jpeg_is_named_or_replaced_as_on_the_cpu_path(tmp_path):
    root = make_folder(tmp_path / "ds")
    bad = root / "train" / "bee" / "0.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # header intact, so the folder index keeps it
    ds = build_loaders(folder_cfg(root, "gpu"), 0, 1, 0).train.dataset
    i = ds.paths.index(str(bad))
    with pytest.raises(DataError, match=re.escape(str(bad))):
        ds[i]
    ds = build_loaders(folder_cfg(root, "gpu", skip_corrupt=True), 0, 1, 0).train.dataset
    item, label, path = ds[i]
    assert path == ds.paths[i + 1] and label == ds.targets[i + 1] and item.dim() == 1


def test_gpu_decode_needs_an_image_folder():
    for kind in ("digits", "synthetic"):
        with pytest.raises(ConfigError) as err:
            validate_config({"data": {"kind": kind, "decode": "gpu"}})
        msg = str(err.value)
        assert msg.startswith("data.decode: ") and "imagefolder" in msg and kind in msg and "\n" not in msg


# micro_batch auto --------------------------------------------------------------------------------
def test_cap_is_the_largest_power_of_two_dividing_the_per_worker_batch():
    assert [micro_batch_cap(g, w) for g, w in [(256, 2), (96, 1), (6, 2), (768, 3), (24, 2), (1, 1)]] == \
        [128, 32, 1, 256, 4, 1]


def test_largest_power_of_two_stops_at_the_first_misfit():
    tried: list[int] = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= 20

    assert mb.largest_power_of_two(64, fits) == 16 and tried == [2, 4, 8, 16, 32]
    assert mb.largest_power_of_two(8, lambda b: True) == 8
    assert mb.largest_power_of_two(64, lambda b: False) == 1
    assert mb.largest_power_of_two(1, lambda b: pytest.fail("no probe needed")) == 1


def test_auto_micro_batch_config_rules():
    cfg = validate_config({"batch": {"global_batch": 256, "micro_batch": "auto"}, "distributed": {"num_workers": 2}})
    assert check_accumulation(256, "auto", 2) == 1 and check_accumulation(96, "auto", 1) == 3
    with pytest.raises(ConfigError, match="auto"):
        _ = cfg.accum_steps
    assert cfg.with_num_workers(4).batch.micro_batch == "auto"
    with pytest.raises(ConfigError, match="not a multiple of 3"):
        cfg.with_num_workers(3)
    for bad, words in (({"global_batch": 100, "micro_batch": "auto"}, "distributed.num_workers 3"),
                       ({"micro_batch": "big"}, "must be auto or an integer >= 1 (got 'big')"),
                       ({"micro_batch": 0}, "must be auto or an integer >= 1 (got 0)")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            validate_config({"batch": bad, "distributed": {"num_workers": 3}})
    assert validate_config({"batch": {"micro_batch": 32}}).accum_steps == 4  # integers as before


def test_cpu_estimate_grows_with_pixels():
    model = mb._probe_model(cfg_of(), torch.device("cpu"), False)
    fixed, small = mb.cpu_memory_estimate(model, 32)
    _, large = mb.cpu_memory_estimate(model, 64)
    n_params = sum(p.numel() for p in model.parameters())
    assert fixed == mb.PARAM_COPIES * 4 * n_params
    assert 3.0 < large / small < 5.0  # activations scale with the pixel count


def test_cpu_probe_fits_the_memory_it_is_given(monkeypatch):
    cfg = cfg_of(batch={"micro_batch": "auto"}, distributed={"num_workers": 1})
    fixed, per_image = mb.cpu_memory_estimate(mb._probe_model(cfg, torch.device("cpu"), False), 32)
    monkeypatch.setattr(mb, "_host_share", lambda cfg: 1.0)
    monkeypatch.setattr(mb, "available_host_memory", lambda: int((fixed + 5.5 * per_image) / mb.CPU_SHARE))
    resolved = mb.resolve_micro_batch(cfg, torch.device("cpu"), 1)
    assert resolved.batch.micro_batch == 4 and resolved.accum_steps == 16
    monkeypatch.setattr(mb, "available_host_memory", lambda: 1 << 50)
    assert mb.resolve_micro_batch(cfg, torch.device("cpu"), 1).batch.micro_batch == 64  # the cap
    assert mb.resolve_micro_batch(cfg_of(), torch.device("cpu"), 1) == cfg_of()  # an integer stays


def _two_ranks_probe(rank: int, port: int, outdir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = cfg_of(batch={"micro_batch": "auto"})  # 64 over 2 workers: at most 32
        found = {0: 16, 1: 8}[rank]  # e.g. two GPUs with different free memory
        resolved = mb.resolve_micro_batch(cfg, torch.device("cpu"), 2, probe=lambda c, d, cap: min(found, cap))
        torch.save(resolved.batch.micro_batch, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_micro_batch(tmp_path):
    from tests.conftest import spawn_workers

    assert spawn_workers(_two_ranks_probe, tmp_path, world=2) == [8, 8]


def test_cuda_probe_stops_at_out_of_memory_or_budget(monkeypatch):
    """The CUDA probe's logic with a fake step: peak memory 1 MiB per image, out of memory above 16."""
    peak = {"bytes": 0}

    def fake_step(model, batch, size, device, dtype, channels_last):
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory")
        peak["bytes"] = batch << 20

    monkeypatch.setattr(mb, "_step", fake_step)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: peak["bytes"])
    model = torch.nn.Linear(4, 4)  # 80 bytes of parameters: 160 bytes of optimizer and DDP buffers
    for budget, expected in ((1 << 40, 16), (5 << 20, 4), (1 << 20, 1)):
        fits = mb._cuda_fits(model, cfg_of(), CUDA, None, False, budget, base=0)
        assert mb.largest_power_of_two(64, fits) == expected


# benchmarks/gpu_check.sh ---------------------------------------------------------------------------
FLOAT = r"[0-9]+(?:\.[0-9]+)?"


def _check_model_and_loader_lines(out: str) -> None:
    for mode in ("off", r"on \(eager\)"):
        assert re.search(rf"^\(a\) compile {mode}: ours {FLOAT} img/s, timm {FLOAT} img/s, ratio ours/timm {FLOAT}",
                         out, re.M), out
    assert re.search(r"^\(a\) micro_batch auto: [0-9]+ \(at most 64", out, re.M), out
    for decode in ("cpu", "gpu"):
        assert re.search(rf"^\(b\) decode {decode}: {FLOAT} img/s$", out, re.M), out
    assert re.search(rf"^\(b\) ratio gpu/cpu decode: {FLOAT}$", out, re.M), out


def test_gpu_check_model_and_loader_parts_on_cpu():
    proc = subprocess.run(
        [PYTHON, "benchmarks/gpu_check.py", "--device", "cpu", "--parts", "model,loader"],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_model_and_loader_lines(proc.stdout)
    assert "(c)" not in proc.stdout


@pytest.mark.slow
def test_gpu_check_script_on_cpu_with_a_search_trial():
    proc = subprocess.run(
        ["bash", str(Path("benchmarks") / "gpu_check.sh"), "--device", "cpu", "--tiny"],
        cwd=ROOT, env=cli_env(PYTHON=PYTHON), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_model_and_loader_lines(proc.stdout)
    m = re.search(rf"^\(c\) trial ok: start-up ({FLOAT}) s from the command's start \((-?{FLOAT}) s from the "
                  rf"trial's start\).*micro_batch 8", proc.stdout, re.M)
    assert m, proc.stdout
    assert 0 < float(m.group(1)) < 600
