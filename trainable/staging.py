"""Staging an image folder from object storage into a node-local cache, once per node.

`stage_image_folder(uri, cache_dir)` runs in every rank that builds its data sets
(`trainable.datasets`). Per node and data set there is one folder and one lock:

    <cache>/<name>.lock            flock: one process stages, the others wait
    <cache>/<name>/files/...       the copy: train/<class>/..., val/<class>/...
    <cache>/<name>/partial/        downloads in flight (each renamed into files/ when whole)
    <cache>/<name>/index.json      the listing the copy was made from
    <cache>/<name>/complete.json   written last, after every file was checked

The first process to take the lock lists the URI (`trainable.listing`), checks the files
already there against the listing (size and the object's modification time, which every
downloaded file is given), downloads the missing or different ones with many parallel
requests (each object's MD5 ETag, where the store gives one, is checked against its bytes),
deletes what the listing no longer has, and writes `complete.json` last. A copy without it
is never used as whole: a download killed halfway is completed by the next process (files
already renamed into place are kept, `partial/` is cleared). The lock is an `fcntl.flock`
on the lock file, which the OS releases when its holder dies, killed or not.

Processes that took the lock within `REUSE_S` seconds of a check (the other ranks of a
trial, trials starting together) use that check instead of listing again; later trials
on the node list the URI again, so a changed bucket is noticed (changed files are fetched
again, nothing else).

A cache folder that cannot be written, or a disk too small for the data, ends the run
with one `NodeCacheError` line naming the node, the folder and the bytes needed (a
`DataError`: `trainable.failures` does not retry it). No torch.

`python -m trainable.staging s3://bucket/folder` stages on this machine ahead of a search
(a first trial on a node otherwise waits for the download, and so do the other nodes of a
trial that spans several).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from trainable.config import DataError
from trainable.datacache import data_cache_dir, write_atomic_text
from trainable.imagefolder import FolderIndex
from trainable.listing import ListedFolder, list_image_folder, open_uri

__all__ = [
    "DATA_CACHE_ENV",
    "NodeCacheError",
    "REUSE_S",
    "Staged",
    "StagingStats",
    "node_lock",
    "stage_image_folder",
    "staging_root",
]

logger = logging.getLogger(__name__)

DATA_CACHE_ENV = "TRICK_SEARCH_DATA_CACHE"
"""The default of `data.cache_dir` on a node (the cluster files set it to the large disk)."""
REUSE_S = 60.0
_THREADS = 32
_CHUNK = 64 << 20  # one ranged GET per object up to this size
_RETRIES = 3
_FORMAT = 1
_MD5 = re.compile(r'^"?([0-9a-fA-F]{32})"?$')


class NodeCacheError(DataError):
    """This node cannot hold the staged copy (folder not writable, disk too small)."""


@dataclass
class StagingStats:
    files: int = 0
    """Files this process downloaded (0 when the node's copy was already there)."""
    bytes: int = 0
    seconds: float = 0.0
    """Time until the data was local: lock wait, listing, checks and downloads."""
    waited_s: float = 0.0
    """Of which waiting for another process of this node."""

    def metrics(self) -> dict[str, float]:
        """What a run reports (`trainable.loop`)."""
        return {"staging_s": self.seconds, "staging_bytes": float(self.bytes), "staging_files": float(self.files)}


@dataclass(frozen=True)
class Staged:
    local_root: str
    index: FolderIndex
    stats: StagingStats


def staging_root(cache_dir: str | None) -> Path:
    """`cache_dir`, else `$TRICK_SEARCH_DATA_CACHE`, else `staged/` in the data cache."""
    chosen = (cache_dir or "").strip() or os.environ.get(DATA_CACHE_ENV, "").strip()
    return Path(chosen).expanduser() if chosen else data_cache_dir() / "staged"


def _folder_name(uri: str) -> str:
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:40] or "data"
    return f"{tail}-{hashlib.sha1(uri.rstrip('/').encode()).hexdigest()[:12]}"


def _node() -> str:
    return socket.gethostname()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _cache_error(uri: str, folder: Path, need: int, reason: str) -> NodeCacheError:
    return NodeCacheError(
        f"node {_node()}: cannot stage {uri} into {folder} ({reason}); it needs {_size(need)} ({need} bytes) "
        f"there; set data.cache_dir (or ${DATA_CACHE_ENV} on the nodes) to a writable folder on a large disk"
    )


def _out_of_space(err: OSError) -> bool:
    return err.errno in (errno.ENOSPC, errno.EDQUOT)


# The lock ------------------------------------------------------------------------------------------
@contextmanager
def node_lock(path: Path, what: str, timeout: float | None = None, poll_s: float = 0.1) -> Iterator[float]:
    """Hold an exclusive `flock` on `path` (created when missing); yields the seconds spent
    waiting. The OS releases it when the holder exits or is killed. `timeout`: raise
    TimeoutError after that many seconds of waiting (None: wait as long as it takes)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        start = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("%s: another process on this node is staging it; waiting", what)
            while True:
                if timeout is not None and time.monotonic() - start > timeout:
                    raise TimeoutError(f"{path}: still locked after {timeout:.0f} s") from None
                time.sleep(poll_s)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    continue
        try:
            yield time.monotonic() - start
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# Staging ----------------------------------------------------------------------------------------------
def stage_image_folder(
    uri: str, cache_dir: str | None = None, threads: int = _THREADS, reuse_s: float = REUSE_S
) -> Staged:
    """The image folder at `uri` as a complete local copy on this node, with its index
    (the listing's order, which is the local index's), staging it first when needed."""
    started = time.perf_counter()
    uri = uri.rstrip("/")
    root = staging_root(cache_dir)
    folder = root / _folder_name(uri)
    held = ExitStack()
    try:
        root.mkdir(parents=True, exist_ok=True)
        waited = held.enter_context(node_lock(root / f"{folder.name}.lock", uri))
    except OSError as err:
        need = list_image_folder(uri).bytes  # for the message: what this node would have to hold
        reason = "no space left" if _out_of_space(err) else (err.strerror or str(err))
        raise _cache_error(uri, root, need, reason) from None
    with held:
        stats = StagingStats(waited_s=waited)
        listed = _recent(folder, uri, reuse_s)
        if listed is None:
            listed = list_image_folder(uri)
            _make_whole(listed, folder, stats, threads)
        stats.seconds = time.perf_counter() - started
    files = str(folder / "files")
    return Staged(files, listed.folder_index(files), stats)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _recent(folder: Path, uri: str, reuse_s: float) -> ListedFolder | None:
    """The listing of a copy checked less than `reuse_s` seconds ago, else None."""
    done = _read_json(folder / "complete.json")
    if not done or done.get("format") != _FORMAT or done.get("uri") != uri:
        return None
    if not time.time() - float(done.get("checked_at", 0)) < reuse_s:
        return None
    index = _read_json(folder / "index.json")
    try:
        listed = ListedFolder.from_json(index or {})
    except (KeyError, TypeError, ValueError):
        return None
    if listed.fingerprint != done.get("fingerprint"):
        return None
    logger.debug("%s: staged copy in %s checked %.0f s ago", uri, folder, time.time() - done["checked_at"])
    return listed


def _whole(path: Path, size: int, mtime: int | None) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_size == size and (mtime is None or st.st_mtime_ns == mtime)


def _make_whole(listed: ListedFolder, folder: Path, stats: StagingStats, threads: int) -> None:
    """Bring `folder` to a complete, checked copy of `listed` (the caller holds the lock)."""
    uri = listed.uri
    files = folder / "files"
    done = _read_json(folder / "complete.json")
    same = bool(done) and done.get("fingerprint") == listed.fingerprint and done.get("uri") == uri  # type: ignore[union-attr]
    wanted = [(rel, size, mtime) for s in listed.splits() for rel, size, mtime in zip(s.rels, s.sizes, s.mtimes)]
    missing = [f for f in wanted if not _whole(files / f[0], f[1], f[2])]
    if same and not missing:
        _write_marker(folder, listed)  # checked now: the next processes reuse the check
        return
    need = sum(size for _, size, _ in missing)
    try:
        (folder / "complete.json").unlink(missing_ok=True)  # from here on the copy is not whole
        shutil.rmtree(folder / "partial", ignore_errors=True)
        (folder / "partial").mkdir(parents=True, exist_ok=True)
        files.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = "no space left" if _out_of_space(err) else (err.strerror or str(err))
        raise _cache_error(uri, folder, need, reason) from None
    if not same:
        _remove_extra(files, {rel for rel, _, _ in wanted})
    free = shutil.disk_usage(folder).free
    if need > free:
        raise _cache_error(uri, folder, need, f"{_size(free)} free")
    if missing:
        logger.info("%s: staging %d files (%s) into %s on node %s", uri, len(missing), _size(need), folder, _node())
        start = time.perf_counter()
        _download(listed, folder, missing, threads, need)
        secs = time.perf_counter() - start
        stats.files, stats.bytes = len(missing), need
        logger.info("%s: staged on node %s: %d files, %s in %.1f s (%.1f MB/s, %.0f files/s)", uri, _node(),
                    len(missing), _size(need), secs, need / 1e6 / max(secs, 1e-9), len(missing) / max(secs, 1e-9))
    bad = [rel for rel, size, mtime in wanted if not _whole(files / rel, size, mtime)]
    if bad:  # a file changed under the copy while it was made: the next attempt fetches it again
        raise RuntimeError(f"{uri}: {len(bad)} staged files differ from the listing after download, e.g. {bad[0]}")
    shutil.rmtree(folder / "partial", ignore_errors=True)
    try:
        write_atomic_text(folder / "index.json", json.dumps(listed.to_json(), separators=(",", ":")), strict=True)
        _write_marker(folder, listed)
    except OSError as err:
        raise _cache_error(uri, folder, need, err.strerror or str(err)) from None


def _write_marker(folder: Path, listed: ListedFolder) -> None:
    marker = {"format": _FORMAT, "uri": listed.uri, "fingerprint": listed.fingerprint, "files": listed.files,
              "bytes": listed.bytes, "checked_at": time.time(), "node": _node()}
    write_atomic_text(folder / "complete.json", json.dumps(marker), strict=True)


def _remove_extra(files: Path, keep: set[str]) -> None:
    """Delete files of an earlier copy that the listing no longer has."""
    removed = 0
    for dirpath, _, filenames in os.walk(files):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.relpath(path, files).replace(os.sep, "/") not in keep:
                os.unlink(path)
                removed += 1
    if removed:
        logger.info("%s: removed %d files the listing no longer has", files, removed)


def _download(listed: ListedFolder, folder: Path, todo: list[tuple[str, int, int | None]], threads: int,
              need: int) -> None:
    fs, base = open_uri(listed.uri)
    files, partial = folder / "files", folder / "partial"
    # MD5 ETags are checked against the bytes until the store shows its ETags are not MD5s
    # (encrypted objects): two downloads of one object with the same bytes and another ETag.
    etags = {"md5": True}

    def fetch(job: tuple[int, tuple[str, int, int | None]]) -> None:
        i, (rel, size, mtime) = job
        src, dest, tmp = f"{base}/{rel}", files / rel, partial / f"{i}.part"
        digests: list[str] = []
        for attempt in range(_RETRIES + 1):
            try:
                digest, etag = _fetch_one(fs, src, tmp, size)
            except FileNotFoundError:
                raise RuntimeError(f"{listed.uri}/{rel}: gone since the listing (the bucket changed)") from None
            except OSError as err:
                if isinstance(err, (PermissionError, IsADirectoryError, NotADirectoryError)) or _out_of_space(err) \
                        or attempt == _RETRIES:
                    raise
                time.sleep(0.2 * 2**attempt)
                continue
            expected = _MD5.match(etag or "")
            if not etags["md5"] or expected is None or expected.group(1).lower() == digest:
                break
            if digest in digests:  # the same bytes twice: this store's ETags are not MD5s
                etags["md5"] = False
                logger.info("%s: ETags are not MD5 checksums here; checking sizes only", listed.uri)
                break
            digests.append(digest)
            if attempt == _RETRIES:
                raise RuntimeError(f"{listed.uri}/{rel}: checksum differs from its ETag after {_RETRIES + 1} downloads")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if mtime is not None:
            os.utime(tmp, ns=(mtime, mtime))
        os.replace(tmp, dest)

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(todo)))) as pool:
            for _ in pool.map(fetch, enumerate(todo)):
                pass
    except OSError as err:
        if _out_of_space(err) or isinstance(err, PermissionError) or err.errno in (errno.EROFS, errno.ENOTDIR):
            reason = "no space left" if _out_of_space(err) else (err.strerror or str(err))
            raise _cache_error(listed.uri, folder, need, reason) from None
        raise


def _fetch_one(fs: pyarrow.fs.FileSystem, src: str, tmp: Path, size: int) -> tuple[str, str | None]:
    """Download one object into `tmp`; its MD5 and the store's ETag (if any)."""
    md5 = hashlib.md5(usedforsecurity=False)
    with fs.open_input_stream(src) as stream, open(tmp, "wb") as out:
        meta = stream.metadata() or {}
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            md5.update(chunk)
            out.write(chunk)
        got = out.tell()
    if got != size:
        raise OSError(errno.EIO, f"{src}: got {got} bytes, the listing says {size}")
    etag = meta.get(b"ETag") or meta.get("ETag")
    return md5.hexdigest(), etag.decode() if isinstance(etag, bytes) else etag


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainable.staging",
                                description="Stage an image folder on object storage into this machine's data cache.")
    p.add_argument("uri", help="the data.root URI (s3://bucket/folder, gs://...)")
    p.add_argument("--cache-dir", help=f"data.cache_dir (default ${DATA_CACHE_ENV}, else the machine's data cache)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        staged = stage_image_folder(args.uri, args.cache_dir, reuse_s=0)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = staged.stats
    print(f"{args.uri}: complete at {staged.local_root} ({s.files} files, {_size(s.bytes)} downloaded in {s.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
