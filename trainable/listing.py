"""An image folder on object storage (`s3://`, `gs://`, whatever `pyarrow.fs` reaches),
indexed from the object listing alone: classes, files, sizes, modification times. Nothing
is downloaded, so the search driver checks a bucket's data set before anything is reserved,
and each node knows what to stage (`trainable.staging`). No torch.

The layout is the local one (`root/train/<class>/**`, `root/val/<class>/**`) and so are the
rules: hidden names (a leading dot) are skipped, class folders are sorted, and the files of
a class come in the order `os.walk` gives on a local copy (a folder's files sorted, then its
sub-folders in sorted order), so the index of a staged copy equals the local index of the
same folder and a run reads the same images in the same order. Only files with an image
extension are kept (headers are not read here: a corrupt image is found where it is
decoded, `data.skip_corrupt` as for local folders).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.fs

from trainable.config import DataError
from trainable.imagefolder import IMAGE_EXTENSIONS, FolderIndex, Split, class_mismatch, is_hidden

__all__ = ["ListedFolder", "ListedSplit", "SPLITS", "list_image_folder", "open_uri", "walk_order"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")
_LIST_THREADS = 32
"""Class folders listed at once (one LIST request per 1000 objects each)."""


@dataclass(frozen=True)
class ListedSplit:
    rels: list[str]
    """Paths relative to the root, `train/<class>/...`, in the local index's order."""
    labels: list[int]
    sizes: list[int]
    mtimes: list[int | None]
    """The objects' modification times (ns) where the store gives one."""


@dataclass(frozen=True)
class ListedFolder:
    uri: str
    classes: list[str]
    train: ListedSplit
    val: ListedSplit

    def splits(self) -> tuple[ListedSplit, ListedSplit]:
        return self.train, self.val

    @property
    def files(self) -> int:
        return len(self.train.rels) + len(self.val.rels)

    @property
    def bytes(self) -> int:
        return sum(self.train.sizes) + sum(self.val.sizes)

    def class_counts(self) -> tuple[int, ...]:
        """Training images per class."""
        counts = Counter(self.train.labels)
        return tuple(counts[i] for i in range(len(self.classes)))

    def to_json(self) -> dict[str, Any]:
        def split(s: ListedSplit) -> dict[str, Any]:
            return {"rels": s.rels, "labels": s.labels, "sizes": s.sizes, "mtimes": s.mtimes}

        return {"uri": self.uri, "classes": self.classes, "train": split(self.train), "val": split(self.val)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ListedFolder:
        def split(d: dict[str, Any]) -> ListedSplit:
            return ListedSplit(list(d["rels"]), list(d["labels"]), list(d["sizes"]), list(d["mtimes"]))

        return cls(str(data["uri"]), list(data["classes"]), split(data["train"]), split(data["val"]))

    @property
    def fingerprint(self) -> str:
        """Changes when any file is added, removed, resized or rewritten."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:32]

    def folder_index(self, local_root: str) -> FolderIndex:
        """The index of a copy of this folder at `local_root`."""
        def split(s: ListedSplit) -> Split:
            return Split([os.path.join(local_root, r) for r in s.rels], list(s.labels), 0)

        return FolderIndex(local_root, list(self.classes), split(self.train), split(self.val))


def walk_order(rel: str) -> tuple[tuple[int, str], ...]:
    """Sort key giving `os.walk`'s top-down order: a folder's files (by name) before its
    sub-folders (by name), each sub-folder whole before the next."""
    parts = rel.split("/")
    return (*((1, p) for p in parts[:-1]), (0, parts[-1]))


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text.split(" (Request ID")[0] or type(err).__name__


def _listing_error(uri: str, err: BaseException) -> DataError:
    reason = _reason(err)
    upper = reason.upper().replace(" ", "_")
    if any(k in upper for k in ("ACCESS_DENIED", "ACCESSDENIED", "INVALID_ACCESS_KEY", "SIGNATURE", "FORBIDDEN",
                                "403", "EXPIRED", "CREDENTIALS", "PERMISSION")):
        return DataError(f"{uri}: cannot list it with this machine's credentials ({reason})")
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        return DataError(f"{uri}: no such bucket ({reason})")
    return DataError(f"{uri}: cannot list it ({reason})")


def open_uri(uri: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """The filesystem and path of a URI; one DataError line when pyarrow cannot reach it."""
    try:
        return pyarrow.fs.FileSystem.from_uri(uri.rstrip("/"))
    except (OSError, ValueError, pyarrow.ArrowException) as err:
        raise DataError(f"{uri}: cannot open ({_reason(err)}) (data.root for data.kind 'imagefolder')") from None


def _entries(fs: pyarrow.fs.FileSystem, path: str, uri: str, recursive: bool) -> list[pyarrow.fs.FileInfo]:
    try:
        return fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=recursive, allow_not_found=True))
    except (OSError, pyarrow.ArrowException) as err:
        raise _listing_error(uri, err) from None


def list_image_folder(uri: str, threads: int = _LIST_THREADS) -> ListedFolder:
    """Index the image folder at `uri` from its listing; every mistake in it is one
    DataError line naming the URI (the messages of `trainable.imagefolder` for local folders)."""
    started = time.perf_counter()
    uri = uri.rstrip("/")
    fs, base = open_uri(uri)
    try:
        info = fs.get_file_info(base)
    except (OSError, pyarrow.ArrowException) as err:
        raise _listing_error(uri, err) from None
    if info.type == pyarrow.fs.FileType.File:
        raise DataError(f"{uri}: not a folder (data.root for data.kind 'imagefolder')")
    if info.type == pyarrow.fs.FileType.NotFound:
        try:  # a missing bucket says so here
            fs.get_file_info(pyarrow.fs.FileSelector(base))
        except FileNotFoundError:
            pass
        except (OSError, pyarrow.ArrowException) as err:
            raise _listing_error(uri, err) from None
        raise DataError(f"{uri}: no such folder (data.root for data.kind 'imagefolder')")
    tops: dict[str, list[str]] = {}
    for split in SPLITS:
        entries = _entries(fs, f"{base}/{split}", f"{uri}/{split}", recursive=False)
        if not entries:
            raise DataError(f"{uri}/{split}: missing; data.root must hold train/<class>/ and val/<class>/ folders")
        tops[split] = sorted(e.base_name for e in entries
                             if e.type == pyarrow.fs.FileType.Directory and not is_hidden(e.base_name))
    classes = tops["train"]
    if not classes:
        raise DataError(f"{uri}/train: no class folders")
    if tops["val"] != classes:
        raise DataError(f"{uri}/val: class folders differ from {uri}/train ({class_mismatch(classes, tops['val'])})")

    jobs = [(split, label, cls) for split in SPLITS for label, cls in enumerate(classes)]

    def list_class(job: tuple[str, int, str]) -> list[tuple[str, int, int | None]]:
        split, _, cls = job
        prefix = f"{base}/"
        out = []
        for e in _entries(fs, f"{base}/{split}/{cls}", f"{uri}/{split}/{cls}", recursive=True):
            if e.type != pyarrow.fs.FileType.File:
                continue
            rel = e.path.removeprefix(prefix)
            if any(is_hidden(p) for p in rel.split("/")):
                continue
            if os.path.splitext(e.base_name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            out.append((rel, int(e.size), e.mtime_ns))
        out.sort(key=lambda f: walk_order(f[0]))
        return out

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
        listed = list(pool.map(list_class, jobs))
    splits: dict[str, ListedSplit] = {s: ListedSplit([], [], [], []) for s in SPLITS}
    for (split, label, cls), files in zip(jobs, listed):
        if not files:
            raise DataError(f"{uri}/{split}/{cls}: no images in class folder")
        s = splits[split]
        for rel, size, mtime in files:
            s.rels.append(rel)
            s.labels.append(label)
            s.sizes.append(size)
            s.mtimes.append(mtime)
    folder = ListedFolder(uri, classes, splits["train"], splits["val"])
    logger.info("%s: listed %d images (%.1f MB) in %.1f s", uri, folder.files, folder.bytes / 1e6,
                time.perf_counter() - started)
    return folder
