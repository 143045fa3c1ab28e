"""Indexing an image folder (`root/train/<class>/**`, `root/val/<class>/**`): which files
are readable images of which class. Reads file headers with PIL; no torch, so the search
driver can check a data set before anything is reserved."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from trainable.config import DataError

__all__ = ["FolderIndex", "Split", "index_image_folder"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    paths: list[str]
    labels: list[int]
    skipped: int
    """Corrupt image files left out (with data.skip_corrupt)."""


@dataclass(frozen=True)
class FolderIndex:
    root: str
    classes: list[str]
    train: Split
    val: Split


_IMAGE_EXTENSIONS = {ext.lower() for ext in Image.registered_extensions()} | {".jpg", ".jpeg", ".png"}


def _probe(path: str) -> str | None:
    """None when PIL reads the header (only the header is read), else the reason."""
    try:
        with Image.open(path) as im:
            w, h = im.size
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except OSError as err:
        return err.strerror or str(err) or type(err).__name__
    except Exception as err:  # noqa: BLE001 - PIL plugins raise assorted errors on bad headers
        return f"{type(err).__name__}: {err}"
    if w < 1 or h < 1:
        return "image has zero size"
    return None


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not _is_hidden(e.name))


def _class_files(class_dir: Path) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not _is_hidden(f))
    return out


def _scan_split(
    split_dir: Path, classes: list[str], skip_corrupt: bool
) -> tuple[list[str], list[int], int]:
    """Paths and labels of the readable images of one split, and how many were skipped.

    Files with an image extension whose header PIL cannot read are corrupt (an error, or
    skipped and counted with `skip_corrupt`); files with another extension are kept when PIL
    reads them and otherwise ignored (a README, a Thumbs.db).
    """
    start = time.perf_counter()
    per_class = [_class_files(split_dir / c) for c in classes]
    flat = [p for files in per_class for p in files]
    # Header reads are mostly waiting on file I/O (which releases the GIL): threads overlap them.
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
        reasons = list(pool.map(_probe, flat, chunksize=64))
    logger.info("%s: checked %d file headers in %.1f s", split_dir, len(flat), time.perf_counter() - start)
    paths: list[str] = []
    labels: list[int] = []
    skipped = ignored = 0
    pos = 0
    for label, (cls, files) in enumerate(zip(classes, per_class)):
        n_before = len(paths)
        class_skipped = 0
        for path in files:
            reason = reasons[pos]
            pos += 1
            if reason is None:
                paths.append(path)
                labels.append(label)
            elif Path(path).suffix.lower() not in _IMAGE_EXTENSIONS:
                ignored += 1
            elif skip_corrupt:
                logger.warning("skipping corrupt image %s (%s)", path, reason)
                skipped += 1
                class_skipped += 1
            else:
                raise DataError(
                    f"{path}: corrupt or unreadable image ({reason}); remove it or set data.skip_corrupt: true"
                )
        if len(paths) == n_before:
            extra = f" ({class_skipped} corrupt skipped)" if class_skipped else ""
            raise DataError(f"{split_dir / cls}: no images in class folder{extra}")
    if ignored:
        logger.info("%s: ignored %d files that are not images", split_dir, ignored)
    return paths, labels, skipped


def index_image_folder(root_path: str, skip_corrupt: bool) -> FolderIndex:
    """Scan `root/train/<class>/**` and `root/val/<class>/**` once: the readable images of
    each split with their labels; every mistake in the folder is one DataError line."""
    root = Path(root_path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.root for data.kind 'imagefolder')")
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataError(f"{d}: missing; data.root must hold train/<class>/ and val/<class>/ folders")
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    val_classes = _class_dirs(val_dir)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(classes))
        parts = []
        if only_train:
            parts.append(f"only in train: {', '.join(only_train)}")
        if only_val:
            parts.append(f"only in val: {', '.join(only_val)}")
        raise DataError(f"{val_dir}: class folders differ from {train_dir} ({'; '.join(parts)})")
    train = Split(*_scan_split(train_dir, classes, skip_corrupt))
    val = Split(*_scan_split(val_dir, classes, skip_corrupt))
    return FolderIndex(str(root), classes, train, val)
