"""Rank 0's TensorBoard event files of a training run, beside its checkpoints."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

__all__ = ["TENSORBOARD_DIR", "TensorBoard"]

TENSORBOARD_DIR = "tensorboard"


class TensorBoard:
    """Rank 0's event writer. On a remote storage (s3://, gs://) the events are written
    locally and copied to the run's folder after every epoch."""

    def __init__(self, enabled: bool, subdir: str | None = None) -> None:
        self.writer = None
        self._remote: tuple[Any, str] | None = None
        logdir = self._logdir(subdir) if enabled else None
        if logdir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=logdir)

    def _logdir(self, subdir: str | None) -> str | None:
        import pyarrow.fs

        try:
            import ray.train

            storage = ray.train.get_context().get_storage()
            fs, exp_path = storage.storage_filesystem, storage.experiment_fs_path
        except Exception:  # outside Ray Train (tests, benchmarks): no event files
            return None
        target = f"{exp_path}/{TENSORBOARD_DIR}" + (f"/{subdir}" if subdir else "")
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            return target
        self._remote = (fs, target)
        return tempfile.mkdtemp(prefix="tensorboard-")

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}{k}", v, step)

    def images(self, tag: str, images: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images, nrow=8), step)

    def flush(self) -> None:
        if self.writer is None:
            return
        self.writer.flush()
        if self._remote is not None:
            import pyarrow.fs

            fs, target = self._remote
            pyarrow.fs.copy_files(self.writer.log_dir, target, destination_filesystem=fs)

    def close(self) -> None:
        if self.writer is not None:
            self.flush()
            self.writer.close()
