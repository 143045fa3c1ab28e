"""The augmentation of a training run (`cfg.augment`) and the validation resize and crop:
PIL image in, uint8 CHW tensor out. The resize interpolation and the validation crop
fraction come from the model's data config (`models.data_config`)."""

from __future__ import annotations

from typing import Any

from torchvision.transforms import InterpolationMode, v2

from models import data_config
from trainable.config import TrainConfig

__all__ = ["train_transform", "val_resize_px", "val_transform"]


# Transforms ----------------------------------------------------------------------------------
#
# PIL or tensor? Measured on this project's 2-core CPU machine, one thread, 64 random-content
# 500x375 JPEGs (quality 90), image_size 224, RandomResizedCrop + hflip 0.5 + ColorJitter 0.4
# + RandAugment(2, 9), interleaved runs, median of 9:
#   PIL decode, augment on PIL, then to tensor:            223 images/s
#   torchvision.io.decode_jpeg, augment on uint8 tensors:  197 images/s
#   PIL decode, to tensor, augment on uint8 tensors:       187 images/s
# and at 32 px on in-memory uint8 arrays (digits/CIFAR-like), median of 7:
#   Image.fromarray, augment on PIL:   1518 images/s
#   augment on uint8 tensors:          1312 images/s
# So the pipeline runs on PIL images and converts to a uint8 tensor at the end (only
# RandomErasing, which has no PIL version, runs after the conversion). In-memory kinds keep
# uint8 numpy arrays and hand `Image.fromarray` views to the pipeline.


def _blur_kernel(image_size: int) -> int:
    k = max(3, round(0.1 * image_size))
    return k if k % 2 else k + 1


def _interpolation(cfg: TrainConfig) -> InterpolationMode:
    return InterpolationMode(data_config(cfg.model.name).interpolation)


def train_transform(cfg: TrainConfig) -> v2.Compose:
    """The training augmentation of `cfg.augment`: PIL RGB image in, uint8 CHW tensor out."""
    size = cfg.data.image_size
    aug = cfg.augment
    ops: list[Any] = [
        v2.RandomResizedCrop(size, scale=tuple(aug.crop_scale), interpolation=_interpolation(cfg), antialias=True)
    ]
    if aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(p=aug.hflip))
    cj = aug.color_jitter
    if cj.brightness > 0 or cj.contrast > 0 or cj.saturation > 0:
        ops.append(v2.ColorJitter(brightness=cj.brightness, contrast=cj.contrast, saturation=cj.saturation))
    ra = aug.randaugment
    if ra.enabled:
        ops.append(v2.RandAugment(num_ops=ra.num_ops, magnitude=ra.magnitude, num_magnitude_bins=31))
    if aug.grayscale_prob > 0:
        ops.append(v2.RandomGrayscale(p=aug.grayscale_prob))
    if aug.blur_prob > 0:
        blur = v2.GaussianBlur(kernel_size=_blur_kernel(size), sigma=(0.1, 2.0))
        ops.append(v2.RandomApply([blur], p=aug.blur_prob))
    ops.append(v2.ToImage())  # uint8 CHW
    if aug.erasing_prob > 0:
        ops.append(v2.RandomErasing(p=aug.erasing_prob, value=0))  # works on uint8 in v2
    ops.append(v2.ToPureTensor())
    return v2.Compose(ops)


def val_resize_px(cfg: TrainConfig) -> int:
    """Shorter side before the validation centre crop: `data.val_resize`, or by default
    `data.image_size / crop_pct` of the model's data config (rounded)."""
    return cfg.data.val_resize or round(cfg.data.image_size / data_config(cfg.model.name).crop_pct)


def val_transform(cfg: TrainConfig) -> v2.Compose:
    """Resize the shorter side to `val_resize_px(cfg)`, centre-crop `data.image_size`."""
    return v2.Compose(
        [
            v2.Resize(val_resize_px(cfg), interpolation=_interpolation(cfg), antialias=True),
            v2.CenterCrop(cfg.data.image_size),
            v2.ToImage(),
            v2.ToPureTensor(),
        ]
    )
