"""Folders on the local disk or on object storage (s3://, gs://), through pyarrow's
filesystems: what the search, the export and the training runs read and write beside Ray."""

from __future__ import annotations

import hashlib
import os
import uuid
from functools import cached_property
from pathlib import Path

import pyarrow.fs

from trainable.config import ConfigError
from trainable.config_io import write_atomic

CACHE_DIR = "~/.cache/trick-search"
STORAGE_ENV = "TRICK_SEARCH_STORAGE"
"""Where experiments and production runs go when no --storage-path is given (set once per cluster)."""


def is_uri(path: str) -> bool:
    return "://" in path


def expand_storage(path: str) -> str:
    """A local folder as an absolute path (Ray requires one); URIs as given."""
    if is_uri(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


class Storage:
    """One folder, local or remote. Relative paths use '/'. The filesystem is resolved on
    first use, so building one never fails."""

    def __init__(self, root: str) -> None:
        self.root = expand_storage(root)

    @cached_property
    def _resolved(self) -> tuple[pyarrow.fs.FileSystem, str]:
        if is_uri(self.root):
            return pyarrow.fs.FileSystem.from_uri(self.root)
        return pyarrow.fs.LocalFileSystem(), self.root

    @property
    def fs(self) -> pyarrow.fs.FileSystem:
        return self._resolved[0]

    @property
    def base(self) -> str:
        """The root as a path of `fs`."""
        return self._resolved[1]

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pyarrow.fs.LocalFileSystem)

    def fs_path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self.fs_path(rel)).type != pyarrow.fs.FileType.NotFound

    def read_text(self, rel: str) -> str:
        with self.fs.open_input_stream(self.fs_path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str, overwrite: bool = False) -> None:
        """Never replaces an existing file unless `overwrite`."""
        if self.is_local:
            write_atomic(self.fs_path(rel), text, overwrite=overwrite)
            return
        if not overwrite and self.exists(rel):
            raise ConfigError(f"{self.root}/{rel}: already exists (nothing was overwritten)")
        with self.fs.open_output_stream(self.fs_path(rel)) as f:  # one PUT: all or nothing
            f.write(text.encode())

    def upload(self, local: str | os.PathLike[str], rel: str) -> None:
        """Copy a local file or folder into this storage (replacing what is there)."""
        local = str(local)
        if os.path.isdir(local):
            pyarrow.fs.copy_files(local, self.fs_path(rel), destination_filesystem=self.fs)
        else:
            self.fs.create_dir(self.fs_path(rel).rsplit("/", 1)[0], recursive=True)
            pyarrow.fs.copy_files(local, self.fs_path(rel), destination_filesystem=self.fs)

    def download(self, rel: str, local: str | os.PathLike[str]) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(self.fs_path(rel), str(local), source_filesystem=self.fs)

    def check_writable(self, flag: str = "--storage-path") -> None:
        """Create the folder and write (then delete) a probe file in it; raise a one-line
        ConfigError naming `flag` when that fails, before anything starts."""
        probe = f".write-check-{uuid.uuid4().hex[:8]}"
        try:
            if not is_uri(self.root):
                os.makedirs(self.root, exist_ok=True)
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(self.fs_path(probe)) as f:
                f.write(b"ok")
            self.fs.delete_file(self.fs_path(probe))
        except Exception as err:  # pyarrow raises OSError subclasses, botocore others
            text = str(err).strip()
            reason = text.splitlines()[0] if text else type(err).__name__
            raise ConfigError(f"{flag} {self.root}: cannot write there ({reason})") from None


def local_mirror(uri: str) -> Path:
    """A stable local folder standing in for a remote folder (files that must live on a
    local disk, such as SQLite databases, or that are written locally and uploaded)."""
    digest = hashlib.sha1(uri.encode()).hexdigest()[:12]
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    path = Path(os.path.expanduser(CACHE_DIR)) / "mirrors" / f"{name}-{digest}"
    path.mkdir(parents=True, exist_ok=True)
    return path
