"""What `distributed.amp`, `channels_last` and `sync_bn` resolve to on a worker's device.

`amp: auto` picks bf16 autocast on CUDA devices with bf16 tensor cores (compute capability
8.0 and above: A100, H100, H200, L4, RTX 30xx+), fp16 autocast with a `GradScaler` below
(V100, T4: bf16 there is emulated and slower than fp32), and no autocast on the CPU.
`channels_last: auto` is on with CUDA (cuDNN's fast convolution layout), off on the CPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from trainable.config import TrainConfig

__all__ = ["BF16_MIN_CAPABILITY", "Precision", "auto_amp", "resolve_precision"]

logger = logging.getLogger(__name__)

BF16_MIN_CAPABILITY = (8, 0)
"""The first CUDA compute capability with bf16 tensor cores (Ampere)."""


@dataclass
class Precision:
    """What `auto` resolves to on this device."""

    autocast_dtype: torch.dtype | None
    channels_last: bool
    sync_bn: bool
    scaler: torch.amp.GradScaler | None


def auto_amp(device: torch.device) -> str:
    """`amp: auto` on `device`: "bf16", "fp16" or "off"."""
    if device.type != "cuda":
        return "off"
    capability = tuple(torch.cuda.get_device_capability(device))
    return "bf16" if capability >= BF16_MIN_CAPABILITY else "fp16"


def resolve_precision(cfg: TrainConfig, device: torch.device, world_size: int) -> Precision:
    d = cfg.distributed
    cuda = device.type == "cuda"
    amp = auto_amp(device) if d.amp == "auto" else d.amp
    if amp == "bf16" and cuda and tuple(torch.cuda.get_device_capability(device)) < BF16_MIN_CAPABILITY:
        logger.warning("distributed.amp bf16 on compute capability < 8.0 is emulated (slow); auto picks fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    channels_last = cuda if d.channels_last == "auto" else bool(d.channels_last)
    sync_bn = world_size > 1 if d.sync_bn == "auto" else bool(d.sync_bn)
    return Precision(dtype, channels_last, sync_bn, scaler)
