"""The data cache of this machine: what every rank of every trial would otherwise rebuild
(an image folder's index, decoded small data sets) made once and reused.

Everything in it is derived from the data and can be deleted at any time. An entry is
named by a hash of its stamp (what it was made from: a folder with its files' sizes and
mtimes, a package version), so a changed source makes a new entry instead of being read
stale. Entries are written to a temporary name and renamed into place, so ranks reading
while another writes see a whole entry or none. No torch here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CACHE_ENV", "SETTLE_S", "cached_arrays", "data_cache_dir", "file_stamp", "settled", "write_atomic_text"]

logger = logging.getLogger(__name__)

CACHE_ENV = "TRICK_SEARCH_CACHE"
SETTLE_S = 2.0
"""A source changed less than this many seconds ago may change again within its mtime's
resolution without the mtime moving: nothing made from it is cached."""


def data_cache_dir() -> Path:
    """`$TRICK_SEARCH_CACHE`, else `$XDG_CACHE_HOME/trick-search`, else `~/.cache/trick-search`."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "trick-search"


def _key(stamp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:20]


def file_stamp(paths: list[Path]) -> dict[str, list[int]]:
    """{path: [size, mtime_ns]} of each file (raises OSError when one is missing)."""
    out = {}
    for p in paths:
        st = os.stat(p)
        out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out


def settled(stamp: Mapping[str, list[int]], now: float | None = None) -> bool:
    """Whether every file of a `file_stamp` is older than `SETTLE_S`."""
    limit = ((time.time() if now is None else now) - SETTLE_S) * 1e9
    return all(mtime < limit for _, mtime in stamp.values())


def cached_arrays(
    name: str, stamp: Mapping[str, Any], make: Callable[[], dict[str, np.ndarray]], mmap: bool = False
) -> dict[str, np.ndarray]:
    """The arrays `make()` returns for `stamp`, from the cache when it has them (with `mmap`
    read-only memory maps: ranks on one machine share the pages), else made and kept.
    Arrays must not hold Python objects (strings are fine)."""
    folder = data_cache_dir() / "arrays" / f"{name}-{_key(stamp)}"
    names = _complete(folder)
    if names:
        try:
            return {n: np.load(folder / f"{n}.npy", mmap_mode="r" if mmap else None, allow_pickle=False) for n in names}
        except (OSError, ValueError) as err:
            logger.debug("%s: unreadable (%s); making it again", folder, err)
    arrays = make()
    _write(folder, arrays, stamp)
    return arrays


def _complete(folder: Path) -> list[str]:
    try:
        info = json.loads((folder / "stamp.json").read_text())
        return [str(n) for n in info["arrays"]]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _write(folder: Path, arrays: dict[str, np.ndarray], stamp: Mapping[str, Any]) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            for n, a in arrays.items():
                np.save(tmp / f"{n}.npy", np.ascontiguousarray(a), allow_pickle=False)
            (tmp / "stamp.json").write_text(json.dumps({"stamp": stamp, "arrays": list(arrays)}))
            try:
                os.rename(tmp, folder)
            except OSError:  # another rank put it there first, or an entry cut short is there
                if not _complete(folder):
                    shutil.rmtree(folder, ignore_errors=True)
                    os.rename(tmp, folder)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except OSError as err:  # a read-only or full cache: the arrays are only not kept
        logger.debug("%s: not cached (%s)", folder, err)


def write_atomic_text(path: Path, text: str, strict: bool = False) -> None:
    """Write `path` through a temporary file and a rename; a failure only logs (raises
    with `strict`)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        if strict:
            raise
        logger.debug("%s: not cached (%s)", path, err)
