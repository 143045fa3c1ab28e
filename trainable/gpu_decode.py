"""`data.decode: gpu`: JPEG folders decoded and augmented on the training device.

The loader processes only read files: a JPEG stays its bytes (no decode on the CPU), so a
few processes feed a fast GPU. A batch arrives as an `EncodedBatch` (all JPEG bytes in one
flat tensor, one shared-memory transfer per batch) and becomes pixels when the training
loop moves it to its device, `batch.to(device)`:
1. `torchvision.io.decode_jpeg(list, device=...)` decodes the whole batch at once (nvJPEG's
   batched decoder on CUDA, libjpeg-turbo on the CPU);
2. the dataset's own augmentation (`trainable.transforms`, built from `cfg.augment`) runs on
   the decoded uint8 tensors: random-resized-crop per image (sizes differ) then one stacked
   batch; horizontal flip and RandAugment batched with per-image random draws (RandAugment
   groups the images by the operation each drew); any other augmentation per image;
   validation: the resize and centre crop, batched over images of the same size;
3. the result is a uint8 (N, 3, S, S) batch on the device: the same contract as the CPU
   loaders, so `trainable.data.normalize` and the loop are unchanged.

Random draws come from the training process's torch RNG (seeded per rank), on the host, so
no host-device synchronisation happens per image. Files that are not JPEGs, and JPEGs with
no end-of-image marker near their end (likely truncated), are decoded with PIL in the
loader process, where a corrupt file is an error or, with `data.skip_corrupt`, replaced by
the next image exactly as on the CPU path. A JPEG the device decoder refuses (e.g. CMYK on
nvJPEG) is decoded with PIL on the host instead.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop as _RRCv1
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from trainable.config import ConfigError, DataError, TrainConfig

__all__ = ["DeviceTransform", "EncodedBatch", "EncodedImages", "decode_batch", "encoded_datasets"]

logger = logging.getLogger(__name__)

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_EOI_WINDOW = 64  # bytes at the end searched for the end-of-image marker (some files carry trailing bytes)
_MAX_SUBSTITUTES = 16  # as trainable.datasets: unreadable files tolerated in a row


# Decoding ----------------------------------------------------------------------------------------
def _pil_pixels(data: bytes, path: str) -> Tensor:
    """uint8 RGB (3, H, W) from encoded bytes with PIL, or a DataError naming the file."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault
        raise DataError(f"{path}: cannot decode image ({str(err) or type(err).__name__})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _decode_one(data: Tensor, path: str, device: torch.device) -> Tensor:
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        logger.debug("%s: device decoder refused it (%s); decoding with PIL", path, err)
        return _pil_pixels(data.numpy().tobytes(), path).to(device)


def decode_batch(jpegs: Sequence[Tensor], paths: Sequence[str], device: torch.device) -> list[Tensor]:
    """uint8 RGB (3, H, W) tensors on `device` from JPEG byte tensors: one batched decode,
    per image (then PIL on the host) only for a batch the decoder refuses."""
    if not jpegs:
        return []
    try:
        return list(decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        return [_decode_one(d, p, device) for d, p in zip(jpegs, paths)]


# The device-side transform ---------------------------------------------------------------------
Images = list[Tensor] | Tensor  # a list while sizes may differ, else a stacked (N, C, H, W) batch
_SKIPPED = (v2.ToImage, v2.ToPureTensor)
_DETERMINISTIC = (v2.Resize, v2.CenterCrop)


def _as_list(x: Images) -> list[Tensor]:
    return list(x.unbind(0)) if isinstance(x, Tensor) else x


def _stack(x: Images) -> Tensor:
    if isinstance(x, Tensor):
        return x
    shapes = {tuple(t.shape) for t in x}
    if len(shapes) > 1:
        raise ValueError(f"images of different sizes after the transform: {sorted(shapes)[:3]}")
    return torch.stack(x)


def _random_resized_crop(op: v2.RandomResizedCrop, x: Images) -> Tensor:
    out = []
    for img in _as_list(x):
        top, left, h, w = _RRCv1.get_params(img, list(op.scale), list(op.ratio))
        out.append(TF.resized_crop(img, top, left, h, w, list(op.size), op.interpolation, antialias=op.antialias))
    return torch.stack(out)


def _hflip(op: v2.RandomHorizontalFlip, x: Images) -> Tensor:
    x = _stack(x)
    flip = (torch.rand(x.shape[0]) < op.p).view(-1, 1, 1, 1).to(x.device, non_blocking=True)
    return torch.where(flip, x.flip(-1), x)


def randaugment_op(op: v2.RandAugment, x: Tensor, name: str, magnitude: float) -> Tensor:
    """One RandAugment operation with one magnitude on a stacked batch (torchvision's own)."""
    return op._apply_image_or_video_transform(x, name, magnitude, interpolation=op.interpolation, fill=op._fill)


def _randaugment(op: v2.RandAugment, x: Images) -> Tensor:
    """torchvision's RandAugment with per-image draws: each of `num_ops` rounds draws an
    operation and a sign per image, as `v2.RandAugment` does per call, and applies every
    (operation, sign) group as one batch."""
    x = _stack(x).clone()
    n, (h, w) = x.shape[0], x.shape[-2:]
    names = list(op._AUGMENTATION_SPACE)
    for _ in range(op.num_ops):
        choice = torch.randint(len(names), (n,))
        negative = torch.rand(n) <= 0.5
        for k in choice.unique().tolist():
            name = names[k]
            magnitudes_fn, signed = op._AUGMENTATION_SPACE[name]
            magnitudes = magnitudes_fn(op.num_magnitude_bins, h, w)
            magnitude = float(magnitudes[op.magnitude]) if magnitudes is not None else 0.0
            chosen = choice == k
            groups = [(chosen & negative, -magnitude), (chosen & ~negative, magnitude)] if (
                signed and magnitudes is not None) else [(chosen, magnitude)]
            for mask, m in groups:
                idx = mask.nonzero().flatten()
                if idx.numel():
                    idx = idx.to(x.device)
                    x[idx] = randaugment_op(op, x[idx], name, m)
    return x


def _by_size(op: Callable[[Tensor], Tensor], x: Images) -> Images:
    """A deterministic op on each group of same-sized images as one batch."""
    if isinstance(x, Tensor):
        return op(x)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(x):
        groups.setdefault(tuple(t.shape), []).append(i)
    out: list[Tensor | None] = [None] * len(x)
    for idx in groups.values():
        for i, t in zip(idx, op(torch.stack([x[i] for i in idx])).unbind(0)):
            out[i] = t
    return out  # type: ignore[return-value]


def _per_image(op: Callable[[Tensor], Tensor], x: Images) -> Images:
    out = [torch.as_tensor(op(t)) for t in _as_list(x)]
    return torch.stack(out) if len({tuple(t.shape) for t in out}) == 1 else out


class DeviceTransform:
    """The ops of a CPU pipeline (`trainable.transforms`) applied to decoded uint8 tensors on
    their device, batched where the draws allow it (see the module doc)."""

    def __init__(self, pipeline: v2.Compose):
        self.ops = [op for op in pipeline.transforms if not isinstance(op, _SKIPPED)]

    def __call__(self, images: list[Tensor]) -> Tensor:
        x: Images = images
        for op in self.ops:
            if isinstance(op, v2.RandomResizedCrop):
                x = _random_resized_crop(op, x)
            elif isinstance(op, v2.RandomHorizontalFlip):
                x = _hflip(op, x)
            elif isinstance(op, v2.RandAugment):
                x = _randaugment(op, x)
            elif isinstance(op, _DETERMINISTIC):
                x = _by_size(op, x)
            else:  # random draws of their own per image (colour jitter, blur, erasing, ...)
                x = _per_image(op, x)
        return _stack(x)


# Batches -----------------------------------------------------------------------------------------
class EncodedBatch:
    """A micro-batch of undecoded JPEG bytes (one flat tensor) and PIL-decoded pixels;
    `.to(device)` decodes and transforms it into a uint8 (N, 3, S, S) batch there."""

    def __init__(self, flat: Tensor, spans: list[tuple[int, int, int]], pixels: dict[int, Tensor],
                 paths: list[str], transform: DeviceTransform):
        self.flat, self.spans, self.pixels, self.paths, self.transform = flat, spans, pixels, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def pin_memory(self, device: Any = None) -> EncodedBatch:
        self.flat = self.flat.pin_memory()
        self.pixels = {k: t.pin_memory() for k, t in self.pixels.items()}
        return self

    def decode(self, device: torch.device | str) -> list[Tensor]:
        """The images as uint8 (3, H, W) tensors on `device`, in batch order."""
        device = torch.device(device)
        jpegs = [self.flat[s:e] for _, s, e in self.spans]
        out: list[Tensor | None] = [None] * len(self.paths)
        decoded = decode_batch(jpegs, [self.paths[k] for k, _, _ in self.spans], device)
        for (k, _, _), img in zip(self.spans, decoded):
            out[k] = img
        for k, t in self.pixels.items():
            out[k] = t.to(device, non_blocking=True)
        return out  # type: ignore[return-value]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Tensor:
        return self.transform(self.decode(device))


class _Collate:
    def __init__(self, transform: DeviceTransform):
        self.transform = transform

    def __call__(self, samples: list[tuple[Tensor, int, str]]) -> tuple[EncodedBatch, Tensor]:
        spans, pixels, chunks, offset = [], {}, [], 0
        for k, (item, _, _) in enumerate(samples):
            if item.dim() == 1:
                spans.append((k, offset, offset + item.numel()))
                chunks.append(item)
                offset += item.numel()
            else:
                pixels[k] = item
        flat = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.uint8)
        targets = torch.tensor([y for _, y, _ in samples], dtype=torch.long)
        return EncodedBatch(flat, spans, pixels, [p for _, _, p in samples], self.transform), targets


class EncodedImages(Dataset):
    """The files of an image folder split, read but not decoded: item i is (JPEG bytes as a
    1-D uint8 tensor, or PIL-decoded (3, H, W) pixels for other files; label; path). Use with
    its `collate` as the loader's collate_fn."""

    def __init__(self, paths: list[str], targets: np.ndarray, classes: list[str], skipped: int,
                 skip_corrupt: bool, transform: DeviceTransform):
        self.paths = paths
        self.targets = np.asarray(targets, dtype=np.int64)
        self.classes = classes
        self.skipped = skipped
        self.skip_corrupt = skip_corrupt
        self.collate = _Collate(transform)

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> Tensor:
        path = self.paths[index]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise DataError(f"{path}: cannot read image ({err.strerror or err})") from None
        if data.startswith(_JPEG_SOI) and _JPEG_EOI in data[-_EOI_WINDOW:]:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return _pil_pixels(data, path)

    def __getitem__(self, index: int) -> tuple[Tensor, int, str]:
        n = len(self.paths)
        for attempt in range(min(n, _MAX_SUBSTITUTES)):
            i = (index + attempt) % n  # deterministic substitute: the next image
            try:
                item = self.read(i)
            except DataError as err:
                if not self.skip_corrupt:
                    raise
                logger.warning("%s; using image %d instead", err, (i + 1) % n)
                continue
            return item, int(self.targets[i]), self.paths[i]
        raise DataError(
            f"{self.paths[index]}: this and the next {min(n, _MAX_SUBSTITUTES) - 1} images cannot be decoded"
        )


def _paths_of(ds: Any) -> list[str]:
    """The file of every item of an image-folder dataset (or a subset of one)."""
    if hasattr(ds, "paths"):
        return list(ds.paths)
    if hasattr(ds, "base") and hasattr(ds, "indices"):
        base = _paths_of(ds.base)
        return [base[int(i)] for i in ds.indices]
    raise ConfigError(f"data.decode: gpu needs image files; {type(ds).__name__} has none (use data.decode cpu)")


def encoded_datasets(cfg: TrainConfig, train: Any, val: Any) -> tuple[EncodedImages, EncodedImages]:
    """The train and val sets of `trainable.datasets.build_datasets` (imagefolder, after
    data.subset) as undecoded files, each with its transform moved to the device."""
    out = []
    for ds in (train, val):
        transform = DeviceTransform(ds.transform)
        out.append(EncodedImages(_paths_of(ds), ds.targets, ds.classes, ds.skipped, cfg.data.skip_corrupt, transform))
    if not cfg.distributed.use_gpu:
        logger.info("data.decode gpu without distributed.use_gpu: images are decoded on the CPU in the training process")
    return out[0], out[1]
