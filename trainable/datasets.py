"""The data sets of a training run, one builder per `data.kind`.

Every dataset yields `(image, label)`: `image` a uint8 CHW tensor of shape (3, S, S) with
S = `cfg.data.image_size`, `label` an int; the transforms come from `trainable.data`.

Kinds (`cfg.data.kind`):
- `imagefolder`: `root/train/<class>/*` and `root/val/<class>/*`, any format PIL opens;
  `root` may be a URI on object storage, staged once per node (`trainable.staging`).
- `cifar10` / `cifar100`: torchvision's dataset folder (downloaded when missing).
- `digits`: scikit-learn's 8x8 handwritten digits, upsampled once, held in memory.
- `synthetic`: generated per index (any count, any size), deterministic and learnable.

Knows nothing of Ray or Tune.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100

from trainable.config import DataError, TrainConfig
from trainable.datacache import cached_arrays, file_stamp, settled
from trainable.feasibility import subset_class_count
from trainable.imagefolder import index_image_folder
from trainable.staging import stage_image_folder
from trainable.storage import is_uri
from trainable.transforms import train_transform, val_transform

__all__ = [
    "DataError",
    "ImageDataset",
    "ImageFolderDataset",
    "SyntheticDataset",
    "build_datasets",
    "stratified_subset_indices",
]

logger = logging.getLogger(__name__)

_SUBSET_SEED = 1_729  # fixed: a subset is the same on every rank and run, whatever run.seed
_SYNTH_SEED = 2_019  # fixed: the synthetic set is the same everywhere
_MAX_SUBSTITUTES = 16  # load-time decode failures tolerated in a row before giving up


# Datasets ----------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Base: `load(i)` gives an RGB PIL image, `transform` makes the uint8 tensor."""

    classes: list[str]
    targets: np.ndarray
    skipped: int = 0
    staging: dict[str, float] = {}
    """What bringing the data to this node cost (`trainable.staging`); empty when read in place."""

    def __init__(self, classes: list[str], targets: np.ndarray, transform: Callable[[Any], Tensor]):
        self.classes = list(classes)
        self.targets = np.asarray(targets, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def load(self, index: int) -> Image.Image:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.transform(self.load(index)), int(self.targets[index])


class _SubsetDataset(ImageDataset):
    """Selected indices of another dataset (its transform, its classes)."""

    def __init__(self, base: ImageDataset, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.classes = base.classes
        self.targets = base.targets[self.indices]
        self.skipped = base.skipped
        self.staging = base.staging

    @property
    def transform(self) -> Callable[[Any], Tensor]:  # type: ignore[override]
        return self.base.transform

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.base[int(self.indices[index])]


class _ArrayDataset(ImageDataset):
    """In-memory uint8 images: (N, H, W, 3) RGB or (N, H, W) grey."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, classes: list[str], transform: Callable):
        super().__init__(classes, targets, transform)
        self.images = images

    def load(self, index: int) -> Image.Image:
        img = Image.fromarray(self.images[index])
        return img if img.mode == "RGB" else img.convert("RGB")


# imagefolder ------------------------------------------------------------------------------------
class ImageFolderDataset(ImageDataset):
    """Images in `<split_dir>/<class>/**`, decoded with PIL and converted to RGB."""

    def __init__(
        self,
        paths: list[str],
        labels: list[int],
        classes: list[str],
        transform: Callable,
        skip_corrupt: bool,
        skipped: int = 0,
        source: tuple[str, str] | None = None,
    ):
        super().__init__(classes, np.asarray(labels, dtype=np.int64), transform)
        self.paths = paths
        self.skip_corrupt = skip_corrupt
        self.skipped = skipped
        self.source = source
        """(staged copy, URI): messages name an image by its URI."""

    def shown(self, path: str) -> str:
        if self.source is None:
            return path
        local, uri = self.source
        return uri + path[len(local):] if path.startswith(local) else path

    def load(self, index: int) -> Image.Image:
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")  # decodes fully: truncated data fails here
        except Exception as err:  # noqa: BLE001 - any decoder failure is the file's fault
            reason = (err.strerror if isinstance(err, OSError) else None) or str(err) or type(err).__name__
            raise DataError(f"{self.shown(path)}: cannot decode image ({reason})") from None

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self.paths)
        for attempt in range(min(n, _MAX_SUBSTITUTES)):
            i = (index + attempt) % n  # deterministic substitute: the next image
            try:
                img = self.load(i)
            except DataError as err:
                if not self.skip_corrupt:
                    raise
                logger.warning("%s; using image %d instead", err, (i + 1) % n)
                continue
            return self.transform(img), int(self.targets[i])
        raise DataError(
            f"{self.shown(self.paths[index])}: this and the next {min(n, _MAX_SUBSTITUTES) - 1} images cannot be decoded"
        )


def _imagefolder(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """A local folder is read in place; a URI is staged on this node first (once per node,
    `trainable.staging`) and its images are named by their URI in messages."""
    assert cfg.data.root is not None  # the config guarantees it
    source: tuple[str, str] | None = None
    staging: dict[str, float] = {}
    if is_uri(cfg.data.root):
        staged = stage_image_folder(cfg.data.root, cfg.data.cache_dir)
        index, staging = staged.index, staged.stats.metrics()
        source = (staged.local_root, cfg.data.root.rstrip("/"))
    else:
        index = index_image_folder(cfg.data.root, cfg.data.skip_corrupt)
    tr, va, skip = index.train, index.val, cfg.data.skip_corrupt
    train = ImageFolderDataset(tr.paths, tr.labels, index.classes, train_transform(cfg), skip, tr.skipped, source)
    val = ImageFolderDataset(va.paths, va.labels, index.classes, val_transform(cfg), skip, va.skipped, source)
    train.staging = staging
    return train, val, index.classes


# cifar10 / cifar100 -------------------------------------------------------------------------------
class _ExtractedFolder:
    """torchvision's CIFAR classes md5-hash every extracted file on each construction: in
    `_check_integrity` (which `download()` also asks before downloading) and in `_load_meta`.
    An extracted folder that is not byte-identical to the official one (a test archive, a
    re-pickled copy) then fails as "corrupted", and download=True would fetch the official
    archive over it. Here existence is enough: a complete extracted folder is loaded as is
    (no network, no hashing 170 MB on every rank), a missing one is downloaded (the archive's
    md5 is still checked by torchvision's `download_and_extract_archive`). A damaged file then
    fails when unpickled, which `_cifar` reports as a DataError naming the folder."""

    root: str
    base_folder: str
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        folder = os.path.join(self.root, self.base_folder)
        names = [f for f, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(folder, n)) for n in names)

    def _load_meta(self) -> None:
        path = os.path.join(self.root, self.base_folder, self.meta["filename"])
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="latin1")
        self.classes = list(data[self.meta["key"]])
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _LocalCIFAR10(_ExtractedFolder, CIFAR10):
    pass


class _LocalCIFAR100(_ExtractedFolder, CIFAR100):
    pass


def _cifar(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset, list[str]]:
    assert cfg.data.root is not None
    root = Path(cfg.data.root).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: not a folder (data.root for data.kind {cfg.data.kind!r})")
    cls = _LocalCIFAR10 if cfg.data.kind == "cifar10" else _LocalCIFAR100
    a = _cifar_arrays(cls, root, cfg.data.kind)
    classes = [str(c) for c in a["classes"]]
    return (
        _ArrayDataset(a["xtr"], a["ytr"], classes, train_transform(cfg)),
        _ArrayDataset(a["xva"], a["yva"], classes, val_transform(cfg)),
        classes,
    )


def _cifar_arrays(cls: type, root: Path, kind: str) -> dict[str, np.ndarray]:
    """Images (N, 32, 32, 3) uint8, labels and class names of both splits. Unpickling the
    archive takes seconds on every rank; once it is extracted, a copy in the data cache
    (keyed by the files' sizes and mtimes) is memory-mapped instead, shared by the ranks."""

    def load() -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for split, train in (("tr", True), ("va", False)):
            try:
                ds = cls(str(root), train=train, download=True)
            except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, ValueError) as err:
                folder = root / cls.base_folder
                raise DataError(f"{folder}: cannot load {kind} ({type(err).__name__}: {err})") from None
            out[f"x{split}"], out[f"y{split}"] = np.ascontiguousarray(ds.data), np.asarray(ds.targets, dtype=np.int64)
            out["classes"] = np.asarray([str(c) for c in ds.classes])
        return out

    folder = root / cls.base_folder
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    try:
        files = file_stamp([folder / n for n in names])
    except OSError:  # not extracted yet: torchvision downloads it, the next run caches it
        return load()
    if not settled(files):
        return load()
    return cached_arrays(kind, {"kind": kind, "files": files, "format": 1}, load, mmap=True)


# digits ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _digits_arrays(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/val grey images (N, size, size) uint8 and labels; the split is fixed. Made once
    per machine (`trainable.datacache`): scikit-learn, seconds to import, is then not needed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        sklearn = version("scikit-learn")
    except PackageNotFoundError:
        sklearn = "none"
    names = ("xtr", "ytr", "xva", "yva")
    stamp = {"kind": "digits", "size": size, "scikit-learn": sklearn, "format": 1}
    a = cached_arrays(f"digits-{size}px", stamp, lambda: dict(zip(names, _make_digits_arrays(size))))
    return a["xtr"], a["ytr"], a["xva"], a["yva"]


def _make_digits_arrays(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    idx = np.arange(len(y))
    tr, va = train_test_split(idx, test_size=0.2, stratify=y, random_state=0)
    tr, va = np.sort(tr), np.sort(va)
    imgs = torch.from_numpy(x.reshape(-1, 1, 8, 8) * (255.0 / 16.0)).float()
    imgs = torch.nn.functional.interpolate(imgs, size=(size, size), mode="bilinear", align_corners=False)
    imgs = imgs.round_().clamp_(0, 255).to(torch.uint8)[:, 0].numpy()
    return imgs[tr], y[tr], imgs[va], y[va]


def _digits(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset, list[str]]:
    xtr, ytr, xva, yva = _digits_arrays(cfg.data.image_size)
    classes = [str(d) for d in range(10)]
    return (
        _ArrayDataset(xtr, ytr, classes, train_transform(cfg)),
        _ArrayDataset(xva, yva, classes, val_transform(cfg)),
        classes,
    )


# synthetic --------------------------------------------------------------------------------------
def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)  # x, y in (0, 1)


class SyntheticDataset(ImageDataset):
    """Per class a stripe orientation and frequency, a colour and a disc position; per image
    random phase, small jitter of all of them, brightness and pixel noise. Image i of a split
    depends only on (split, i, size): generated on demand, the same everywhere."""

    def __init__(self, num_classes: int, per_class: int, size: int, split: int, transform: Callable):
        super().__init__(
            [f"class_{c:03d}" for c in range(num_classes)],
            np.repeat(np.arange(num_classes, dtype=np.int64), per_class),
            transform,
        )
        self.num_classes = num_classes
        self.per_class = per_class
        self.size = size
        self.split = split

    def _style(self, c: int) -> tuple[float, float, np.ndarray, tuple[float, float]]:
        golden = 0.6180339887498949
        theta = math.pi * ((c * golden) % 1.0)
        freq = 2.0 + 5.0 * ((c * 0.7548776662466927 + 0.3) % 1.0)  # cycles per image
        colour = _hsv_to_rgb(c / self.num_classes, 0.55 + 0.4 * ((c * 0.5698) % 1.0), 0.9)
        pos = (0.25 + 0.5 * ((c * 0.3247 + 0.1) % 1.0), 0.25 + 0.5 * ((c * 0.4656 + 0.7) % 1.0))
        return theta, freq, colour, pos

    def load(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(index)
        c = index // self.per_class
        theta, freq, colour, (px, py) = self._style(c)
        rng = np.random.default_rng([_SYNTH_SEED, self.split, index])
        xx, yy = _grid(self.size)
        th = theta + rng.normal(0.0, 0.08)
        f = freq * rng.uniform(0.9, 1.1)
        phase = rng.uniform(0.0, 2 * math.pi)
        stripes = np.sin((2 * math.pi * f) * (xx * math.cos(th) + yy * math.sin(th)) + phase)
        img = colour * (0.6 + 0.3 * stripes)[..., None]
        cx, cy = px + rng.normal(0.0, 0.04), py + rng.normal(0.0, 0.04)
        r = 0.16 + rng.uniform(-0.03, 0.03)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        img[disc] = 1.0 - colour * 0.8
        img = img * (255.0 * rng.uniform(0.85, 1.15)) + rng.normal(0.0, 12.0, img.shape).astype(np.float32)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def _synthetic(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset, list[str]]:
    s = cfg.data.synthetic
    size = cfg.data.image_size
    train = SyntheticDataset(s.num_classes, s.train_per_class, size, 0, train_transform(cfg))
    val = SyntheticDataset(s.num_classes, s.val_per_class, size, 1, val_transform(cfg))
    return train, val, train.classes


# Building ----------------------------------------------------------------------------------------
def stratified_subset_indices(targets: np.ndarray, fraction: float) -> np.ndarray:
    """Sorted indices of `fraction` of each class (at least 1 per class), chosen by a fixed
    seed: the same on every rank and run, independent of the run's seed."""
    targets = np.asarray(targets)
    chosen: list[np.ndarray] = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        k = subset_class_count(len(idx), fraction)
        rng = np.random.default_rng([_SUBSET_SEED, int(c)])
        chosen.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(chosen))


_BUILDERS: dict[str, Callable[[TrainConfig], tuple[ImageDataset, ImageDataset, list[str]]]] = {
    "imagefolder": _imagefolder,
    "cifar10": _cifar,
    "cifar100": _cifar,
    "digits": _digits,
    "synthetic": _synthetic,
}


def build_datasets(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset, list[str]]:
    """Train set (with `data.subset` applied), val set, class names.

    Each dataset also carries `classes`, `targets` (numpy int64) and `skipped` (corrupt
    files skipped up front).
    """
    train, val, classes = _BUILDERS[cfg.data.kind](cfg)
    if cfg.data.subset < 1.0:
        full = len(train)
        train = _SubsetDataset(train, stratified_subset_indices(train.targets, cfg.data.subset))
        logger.info("data.subset %.3g: %d of %d training images", cfg.data.subset, len(train), full)
    logger.info(
        "data %s: %d train, %d val images, %d classes%s",
        cfg.data.kind,
        len(train),
        len(val),
        len(classes),
        f", {train.skipped + val.skipped} corrupt skipped" if train.skipped + val.skipped else "",
    )
    return train, val, classes
