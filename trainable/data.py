"""Loaders for one training run, and device-side normalisation.

Every dataset yields `(image, label)`: `image` a uint8 CHW tensor of shape (3, S, S) with
S = `cfg.data.image_size`, `label` an int. Images are not normalised here: the training
loop moves the uint8 batch to the device (4x fewer bytes than float) and calls
`normalize` there with the model's data config (`models.data_config`), which also gives
the validation crop fraction and the resize interpolation.

The data sets of each `data.kind` live in `trainable.datasets`. Knows nothing of Ray or Tune.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from models import ModelDataConfig, data_config
from trainable.config import TrainConfig
from trainable.config import DataError
from trainable.datasets import build_datasets

__all__ = ["Loaders", "build_loaders", "denormalize", "normalize"]

logger = logging.getLogger(__name__)


# Device-side normalisation ----------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _scale_shift(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[Tensor, Tensor]:
    """(1 / (255 std), -mean / std) as float32 (1, C, 1, 1) tensors on `device`."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    scale = (1.0 / (255.0 * s)).to(torch.float32)
    shift = (-m / s).to(torch.float32)
    return scale.to(device), shift.to(device)


def normalize(images_uint8: Tensor, data_cfg: ModelDataConfig, channels_last: bool = False) -> Tensor:
    """float32 `(x / 255 - mean) / std` of a uint8 NCHW batch, on the batch's device, with the
    mean and std of the model's data config.

    One fused op (`x * scale + shift` through `addcmul`, which reads the uint8 input
    directly); scale and shift are cached per (device, mean, std) so no host-device copy
    happens per step. With `channels_last` the (cheap, uint8) layout change happens first
    and the float result keeps it.
    """
    channels = len(data_cfg.mean)
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != channels:
        raise ValueError(
            f"normalize expects a uint8 (N, {channels}, H, W) batch, "
            f"got {images_uint8.dtype} {tuple(images_uint8.shape)}"
        )
    scale, shift = _scale_shift(images_uint8.device, tuple(data_cfg.mean), tuple(data_cfg.std))
    x = images_uint8
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.addcmul(shift, x, scale)


def denormalize(images: Tensor, data_cfg: ModelDataConfig) -> Tensor:
    """Inverse of `normalize` for display: float32 images in [0, 1] on the CPU."""
    mean = torch.tensor(data_cfg.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(data_cfg.std, device=images.device).view(1, -1, 1, 1)
    return (images.float() * std + mean).clamp(0, 1).cpu()


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader
    train_sampler: DistributedSampler
    num_classes: int
    classes: list[str]
    num_train: int
    """Training images over all ranks (after data.subset)."""
    num_val: int
    """Validation images over all ranks; the val shards together hold each exactly once."""
    skipped: int
    """Corrupt files skipped up front (train and val)."""
    data_config: ModelDataConfig
    """The model's data config: what `normalize` needs."""
    staging: dict[str, float]
    """What bringing the data to this node cost this rank (`trainable.staging`: `staging_s`,
    `staging_bytes`, `staging_files`); empty when the data is read in place."""


def _val_indices(num_val: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_val, world_size))


_PREFETCH_BATCHES = 4
"""Batches each loader process keeps ready (torch's default is 2): evens out slow files."""


def build_loaders(cfg: TrainConfig, rank: int, world_size: int, seed: int) -> Loaders:
    """This rank's loaders: a shuffled, padded-free (drop_last) DistributedSampler for train
    and a non-padding stride shard (rank::world_size) for val."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    train, val, classes = build_datasets(cfg)
    staging = dict(train.staging)
    if cfg.data.decode == "gpu":  # workers read files; decoding and augmentation run on the device
        from trainable.gpu_decode import encoded_datasets

        train, val = encoded_datasets(cfg, train, val)
    micro = cfg.batch.micro_batch
    workers = cfg.loader_workers
    pin = bool(cfg.distributed.use_gpu and torch.cuda.is_available())
    common: dict[str, Any] = {
        "num_workers": workers,
        "pin_memory": pin,
        "persistent_workers": workers > 0,
    }
    if workers > 0:
        common["prefetch_factor"] = _PREFETCH_BATCHES
    sampler = DistributedSampler(
        train, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    # Seeds the workers' augmentation RNG (base seed + worker id): distinct per rank,
    # reproducible per run. With num_workers=0 augmentation draws from the global torch RNG.
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
    train_loader = DataLoader(
        train, batch_size=micro, sampler=sampler, drop_last=True, generator=gen,
        collate_fn=getattr(train, "collate", None), **common
    )
    if len(train_loader) == 0:
        where = cfg.data.root or f"data.kind {cfg.data.kind!r}"
        raise DataError(
            f"{where}: {len(train)} training images give no full micro-batch of {micro} "
            f"on each of {world_size} workers; use more data or a smaller batch.micro_batch"
        )
    val_shard = torch.utils.data.Subset(val, _val_indices(len(val), rank, world_size))
    val_loader = DataLoader(val_shard, batch_size=micro * 2, shuffle=False, drop_last=False,
                            collate_fn=getattr(val, "collate", None), **common)
    return Loaders(
        train=train_loader,
        val=val_loader,
        train_sampler=sampler,
        num_classes=len(classes),
        classes=classes,
        num_train=len(train),
        num_val=len(val),
        skipped=train.skipped + val.skipped,
        data_config=data_config(cfg.model.name),
        staging=staging,
    )
