"""Indexing an image folder (`root/train/<class>/**`, `root/val/<class>/**`): which files
are readable images of which class. Reads file headers with PIL; no torch, so the search
driver can check a data set before anything is reserved.

Reading every file's header takes minutes on a large folder, and every rank of every trial
needs the index. So an index is kept in the data cache (`trainable.datacache`), keyed by the
folder and `skip_corrupt`, and reused while no folder in it changed (each folder's mtime
is recorded; adding, removing or renaming a file changes its folder's). The search driver
indexes the folder before the first trial; trials and retries on that machine then read
the index in well under a second. A file rewritten in place (same name) keeps its cached
verdict; its decode is still checked when it is loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from trainable.config import DataError
from trainable.datacache import SETTLE_S, data_cache_dir, write_atomic_text

__all__ = ["IMAGE_EXTENSIONS", "FolderIndex", "Split", "class_mismatch", "index_image_folder", "is_hidden"]

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


IMAGE_EXTENSIONS = {ext.lower() for ext in Image.registered_extensions()} | {".jpg", ".jpeg", ".png"}


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


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def class_mismatch(train: list[str], val: list[str]) -> str:
    """How two class lists differ: `only in train: a; only in val: c`."""
    parts = []
    only_train = sorted(set(train) - set(val))
    only_val = sorted(set(val) - set(train))
    if only_train:
        parts.append(f"only in train: {', '.join(only_train)}")
    if only_val:
        parts.append(f"only in val: {', '.join(only_val)}")
    return "; ".join(parts)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not is_hidden(e.name))


def _class_files(class_dir: Path, mtimes: dict[str, int]) -> list[str]:
    """Every file under `class_dir`; each folder's mtime goes into `mtimes`, taken before
    the folder is listed (a change during the scan then shows as a newer mtime)."""
    out: list[str] = []
    mtimes[str(class_dir)] = os.stat(class_dir).st_mtime_ns
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            mtimes[sub] = os.stat(sub).st_mtime_ns
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not is_hidden(f))
    return out


def _scan_split(
    split_dir: Path, classes: list[str], skip_corrupt: bool, mtimes: dict[str, int]
) -> tuple[list[str], list[int], int]:
    """Paths and labels of the readable images of one split, and how many were skipped.

    Files with an image extension whose header PIL cannot read are corrupt (an error, or
    skipped and counted with `skip_corrupt`); files with another extension are kept when PIL
    reads them and otherwise ignored (a README, a Thumbs.db).
    """
    start = time.perf_counter()
    per_class = [_class_files(split_dir / c, mtimes) for c in classes]
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
            elif Path(path).suffix.lower() not in IMAGE_EXTENSIONS:
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
    each split with their labels; every mistake in the folder is one DataError line. An
    index of the unchanged folder in the data cache is used instead of a scan."""
    root = Path(root_path).expanduser()
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (data.root for data.kind 'imagefolder')")
    train_dir, val_dir = root / "train", root / "val"
    for d in (train_dir, val_dir):
        if not d.is_dir():
            raise DataError(f"{d}: missing; data.root must hold train/<class>/ and val/<class>/ folders")
    cache = _cache_file(root, skip_corrupt)
    cached = _read_cached(cache, root) if cache is not None else None
    if cached is not None:
        logger.debug("%s: index read from %s", root, cache)
        return cached
    started = time.time()
    mtimes = {str(d): os.stat(d).st_mtime_ns for d in (train_dir, val_dir)}
    classes = _class_dirs(train_dir)
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    val_classes = _class_dirs(val_dir)
    if val_classes != classes:
        raise DataError(f"{val_dir}: class folders differ from {train_dir} ({class_mismatch(classes, val_classes)})")
    train = Split(*_scan_split(train_dir, classes, skip_corrupt, mtimes))
    val = Split(*_scan_split(val_dir, classes, skip_corrupt, mtimes))
    index = FolderIndex(str(root), classes, train, val)
    # A folder changed within the last seconds may change again within its mtime's
    # resolution without its mtime moving: such an index is not kept.
    if cache is not None and max(mtimes.values()) < (started - SETTLE_S) * 1e9:
        _write_cached(cache, index, mtimes)
    return index


# The index cache ----------------------------------------------------------------------------------
_INDEX_FORMAT = 1


def _cache_file(root: Path, skip_corrupt: bool) -> Path | None:
    try:
        where = str(root.resolve())
    except OSError:
        return None
    key = hashlib.sha256(f"{_INDEX_FORMAT}|{where}|{skip_corrupt}".encode()).hexdigest()[:24]
    return data_cache_dir() / "imagefolder" / f"{key}.json"


def _read_cached(path: Path, root: Path) -> FolderIndex | None:
    """The cached index when every folder it recorded still has its mtime, else None."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _INDEX_FORMAT or data.get("root") != str(root):
            return None
        for d, mtime in data["mtimes"].items():
            if os.stat(d).st_mtime_ns != mtime:
                return None
        base = str(root)
        splits = [
            Split([os.path.join(base, p) for p in data[s]["paths"]], list(data[s]["labels"]), int(data[s]["skipped"]))
            for s in ("train", "val")
        ]
        return FolderIndex(base, list(data["classes"]), *splits)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # no cache, a folder gone, or a damaged file: scan again


def _write_cached(path: Path, index: FolderIndex, mtimes: dict[str, int]) -> None:
    base = index.root + os.sep

    def split(s: Split) -> dict[str, Any]:
        return {"paths": [p.removeprefix(base) for p in s.paths], "labels": s.labels, "skipped": s.skipped}

    data = {"format": _INDEX_FORMAT, "root": index.root, "mtimes": mtimes, "classes": index.classes,
            "train": split(index.train), "val": split(index.val)}
    write_atomic_text(path, json.dumps(data, separators=(",", ":")))
