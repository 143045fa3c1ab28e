"""`batch.micro_batch: auto`: the largest power of two that fits the worker's memory.

Probed once per run on each worker, before the data and the model are built:
- CUDA: a training step (forward, loss, backward, in the run's precision and memory layout)
  at micro-batches 2, 4, 8, ... until the step's peak allocation plus the optimizer's and
  DDP's per-parameter buffers would exceed the device's free memory less `CUDA_HEADROOM`,
  or the step runs out of memory.
- CPU: an estimate instead of trying (running out of host memory kills the process rather
  than raising): one probe step at micro-batch 2 counts the bytes autograd saves for the
  backward pass; a micro-batch b needs `PARAM_COPIES` x the parameter bytes plus
  `ACTIVATION_FACTOR` x b x the saved bytes per image, within `CPU_SHARE` of the host's
  available memory divided among the workers sharing the host.

The result is capped at `micro_batch_cap(global_batch, num_workers)`, the largest power of
two dividing the per-worker batch, so accumulation reaches the global batch exactly, and
all ranks take the smallest value any of them found (DDP needs the same accumulation on
every rank). The value is logged and reported as `micro_batch` in the run's metrics.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import create_model
from trainable.config import TrainConfig, micro_batch_cap
from trainable.precision import resolve_precision

__all__ = [
    "available_host_memory",
    "cpu_memory_estimate",
    "largest_power_of_two",
    "probe_micro_batch",
    "resolve_micro_batch",
]

logger = logging.getLogger(__name__)

CUDA_HEADROOM = 0.2
"""Fraction of the device's free memory left unused: allocator fragmentation, cuDNN
workspaces of other algorithms, the data pipeline's device tensors (GPU decode), mixing."""
CPU_SHARE = 0.5
"""Fraction of the worker's share of available host memory the estimate may plan for: the
rest is for loader processes, prefetched batches, the allocator's slack and the OS."""
PARAM_COPIES = 4
"""Weights, gradients, momentum and DDP's gradient buckets: one parameter-sized copy each."""
ACTIVATION_FACTOR = 2.0
"""Bound on peak per-image memory over the saved activations: during the backward pass the
saved tensors are freed as their gradients are made, so live activation gradients never
exceed the saved activations themselves."""
PROBE_CLASSES = 1000
"""Classifier width of the probe model (the class count is not known yet; 1000 is ImageNet's)."""


def largest_power_of_two(cap: int, fits: Callable[[int], bool], start: int = 2) -> int:
    """The largest power of two b <= cap with fits(b), trying start, 2 start, ... and
    stopping at the first that does not fit (memory grows with b); at least 1."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    best, b = 1, start
    while b <= cap:
        if not fits(b):
            break
        best, b = b, b * 2
    return best


def available_host_memory() -> int:
    """Bytes the host can still give: MemAvailable, lowered to the cgroup's remaining limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            avail = min(avail, max(0, int(limit) - usage))
        break
    return avail


def _param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _probe_model(cfg: TrainConfig, device: torch.device, channels_last: bool) -> nn.Module:
    m = cfg.model
    model = create_model(m.name, num_classes=PROBE_CLASSES, small_input=m.small_input, zero_init_last=m.zero_init_last)
    model = model.to(device).train()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _step(model: nn.Module, batch: int, size: int, device: torch.device, dtype: torch.dtype | None,
          channels_last: bool) -> None:
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, PROBE_CLASSES, (batch,), device=device)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        loss = F.cross_entropy(model(x).float(), y)
    loss.backward()
    model.zero_grad(set_to_none=True)


def cpu_memory_estimate(model: nn.Module, size: int, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(fixed bytes, bytes per image) of a training step of `model` at `size` px on the CPU:
    fixed = PARAM_COPIES x parameter bytes; per image = ACTIVATION_FACTOR x the bytes autograd
    saves per image for the backward pass, measured in one step at micro-batch 2 (everything
    saved apart from the parameters scales with the batch, bar per-channel statistics: a
    slight overestimate)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(batch: int) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _step(model, batch, size, torch.device("cpu"), dtype, False)
        return sum(seen.values())

    per_image = saved_bytes(2) / 2
    return PARAM_COPIES * _param_bytes(model), int(ACTIVATION_FACTOR * per_image)


def _host_share(cfg: TrainConfig) -> float:
    """This worker's share of the host: the smaller of its CPU share (Ray places trials by CPUs,
    so concurrent trials on one host divide it so) and 1 / the workers of this run on the host."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    by_cpu = min(1.0, max(1.0, cfg.distributed.cpus_per_worker) / (os.cpu_count() or 1))
    return min(1.0 / local, by_cpu)


def _cuda_fits(model: nn.Module, cfg: TrainConfig, device: torch.device, dtype: torch.dtype | None,
               channels_last: bool, budget: int, base: int) -> Callable[[int], bool]:
    extra = 2 * _param_bytes(model)  # momentum, DDP buckets (weights and grads are in the peak)

    def fits(batch: int) -> bool:
        torch.cuda.reset_peak_memory_stats(device)
        try:
            _step(model, batch, cfg.data.image_size, device, dtype, channels_last)
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return False
        need = torch.cuda.max_memory_allocated(device) - base + extra
        logger.debug("micro-batch probe: %d images need %.2f GiB of %.2f", batch, need / 2**30, budget / 2**30)
        return need <= budget

    return fits


def probe_micro_batch(cfg: TrainConfig, device: torch.device, cap: int) -> int:
    """The largest power of two <= cap that fits this worker's memory (see the module doc)."""
    if cap <= 1:
        return 1
    precision = resolve_precision(cfg, device, 1)
    dtype, channels_last = precision.autocast_dtype, precision.channels_last
    size = cfg.data.image_size
    if device.type == "cuda":
        torch.cuda.empty_cache()
        free, _total = torch.cuda.mem_get_info(device)
        base = torch.cuda.memory_allocated(device)
        budget = int(free * (1.0 - CUDA_HEADROOM))
        model = _probe_model(cfg, device, channels_last)
        try:
            return largest_power_of_two(cap, _cuda_fits(model, cfg, device, dtype, channels_last, budget, base))
        finally:
            del model
            torch.cuda.empty_cache()
    model = _probe_model(cfg, torch.device("cpu"), False)
    fixed, per_image = cpu_memory_estimate(model, size, dtype)
    budget = int(available_host_memory() * CPU_SHARE * _host_share(cfg))
    logger.debug("micro-batch estimate: %.0f MiB fixed, %.1f MiB per image, budget %.0f MiB",
                 fixed / 2**20, per_image / 2**20, budget / 2**20)
    return largest_power_of_two(cap, lambda b: fixed + b * per_image <= budget)


def _agree(value: int, device: torch.device, world_size: int) -> int:
    """The smallest value over all ranks (every rank must accumulate the same number of steps)."""
    if world_size <= 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device if "nccl" in str(dist.get_backend()) else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def resolve_micro_batch(cfg: TrainConfig, device: torch.device, world_size: int,
                        probe: Callable[[TrainConfig, torch.device, int], int] = probe_micro_batch) -> TrainConfig:
    """`cfg` with `batch.micro_batch: auto` replaced by the probed value (unchanged otherwise).
    Every rank calls it: the ranks agree on the smallest value any of them found."""
    if cfg.batch.micro_batch != "auto":
        return cfg
    gb, nw = cfg.batch.global_batch, cfg.distributed.num_workers
    cap = micro_batch_cap(gb, nw)
    chosen = _agree(probe(cfg, device, cap), device, world_size)
    data = cfg.model_dump()
    data["batch"]["micro_batch"] = chosen
    resolved = TrainConfig.model_validate(data)
    logger.info(
        "batch.micro_batch auto: %d on %s (at most %d: global batch %d = %d x %d workers x %d accumulation steps)",
        chosen, device.type, cap, gb, chosen, nw, resolved.accum_steps,
    )
    return resolved
