"""Resuming a run safely.

A run's identity is what decides its training maths: its config minus the settings that
only say how often to log, validate or save, or what cluster shape reaches the global
batch (`IDENTITY_EXCLUDED`), and the class list of its data. Every checkpoint carries both,
and `run.json` beside the run carries the config, so `python -m trainable.train` refuses
to resume another config under the same name before anything starts.

Reading a checkpoint falls back to the previous one when the latest is damaged (a run keeps
two), with a warning. No torch at import: the CLI uses this module before Ray starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

from trainable.config import LEAF_PATHS, ConfigError, TrainConfig
from trainable.config_io import get_path
from trainable.storage import Storage

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "state.pt"
RUN_FILE = "run.json"
CHECKPOINT_PREFIX = "checkpoint_"  # Ray Train's checkpoint folders: checkpoint_<date>, in time order
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints
STATE_KEYS = ("model", "optimizer", "scheduler", "epoch")

IDENTITY_EXCLUDED = frozenset({
    "run.log_every",  # how often the loss is logged
    "run.checkpoint_every",  # how often state is saved
    "run.val_every",  # how often the model is measured, not how it is trained
    "distributed.num_workers",  # cluster shape: the global batch stays, accumulation is re-derived
    "batch.micro_batch",  # cluster shape, as above
    "distributed.use_gpu",  # where it runs (amp, written as given, still counts)
    "distributed.cpus_per_worker",  # resources
    "data.loader_workers",  # decoding processes
    "distributed.channels_last",  # memory layout only
    "distributed.max_failures",  # fault policy
    "distributed.compile",  # the same model, compiled or not
    "data.decode",  # where JPEGs are decoded and augmented, not how
    "data.cache_dir",  # where a node keeps its copy of the data
})
"""Key paths that do not change the training maths: a run resumes across them."""


# Identity ------------------------------------------------------------------------------------------
def identity(cfg: TrainConfig) -> dict[str, Any]:
    """The config's key paths that decide the training maths, with their values."""
    data = cfg.model_dump(mode="json")
    return {p: get_path(data, p) for p in sorted(LEAF_PATHS) if p not in IDENTITY_EXCLUDED}


def config_hash(cfg: TrainConfig) -> str:
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def config_difference(stored: dict[str, Any], cfg: TrainConfig) -> str | None:
    """None when the stored config (a `model_dump`) has the same identity as `cfg`, else
    the first differing key path as `path: stored -> now`. The stored config is validated
    again first, so fields added since it was written take their defaults."""
    try:
        old = identity(TrainConfig.model_validate(stored))
    except ValueError:
        return "the stored config is no longer valid"
    now = identity(cfg)
    for path in now:
        if old.get(path) != now[path]:
            return f"{path}: {old.get(path)!r} -> {now[path]!r}"
    return None


def check_same_run(state: dict[str, Any], cfg: TrainConfig, classes: list[str], where: str) -> None:
    """Raise a one-line ConfigError when the checkpoint `state` (read from `where`) was
    written by another config or for other classes."""
    stored = state.get("config")
    if isinstance(stored, dict):
        diff = config_difference(stored, cfg)
    else:
        diff = None if state.get("config_hash") in (None, config_hash(cfg)) else "its config hash differs"
    if diff is not None:
        raise ConfigError(
            f"{where}: written by another config ({diff}); train it under another --name (nothing was changed)"
        )
    old = state.get("classes")
    if old is not None and list(old) != list(classes):
        raise ConfigError(
            f"{where}: trained on other classes ({_classes(old)}; the data now has {_classes(classes)}); "
            "train it under another --name (nothing was changed)"
        )


def _classes(names: list[str]) -> str:
    shown = ", ".join(map(str, names[:5]))
    return f"{len(names)} classes: {shown}{', ...' if len(names) > 5 else ''}"


# run.json ------------------------------------------------------------------------------------------
def check_run(storage: str, name: str, cfg: TrainConfig) -> bool:
    """Before a production run starts: True when `<storage>/<name>` holds a run of the
    same config (it resumes), False when there is none; a one-line ConfigError when it
    was started with another config."""
    run = Storage(f"{storage}/{name}")
    if not run.exists(RUN_FILE):
        return run.exists(RAY_SNAPSHOT)  # a run from before run.json: its workers check
    try:
        stored = json.loads(run.read_text(RUN_FILE))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{run.root}/{RUN_FILE}: unreadable ({err}); use another --name") from None
    config = stored.get("config") if isinstance(stored, dict) else None
    diff = config_difference(config, cfg) if isinstance(config, dict) else "no config recorded"
    if diff is not None:
        raise ConfigError(
            f"run {run.root} was started with another config ({diff}); pass --name to start a new run "
            "(nothing was changed)"
        )
    return True


def record_run(storage: str, name: str, cfg: TrainConfig) -> None:
    """Write `<storage>/<name>/run.json` (the config and its hash) for a new run."""
    run = Storage(f"{storage}/{name}")
    if run.exists(RUN_FILE) or run.exists(RAY_SNAPSHOT):  # recorded, or a run from before run.json
        return
    if run.is_local:
        run.fs.create_dir(run.base, recursive=True)
    text = json.dumps({"config_hash": config_hash(cfg), "config": cfg.model_dump(mode="json")}, indent=2)
    run.write_text(RUN_FILE, text + "\n")


# Reading checkpoints ----------------------------------------------------------------------------------
def checkpoint_candidates(checkpoint: Any) -> list[Any]:
    """The checkpoint to resume from, then the older ones beside it, newest first (folders
    newer than it were never completed)."""
    import pyarrow.fs
    from ray.train import Checkpoint

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent, _, latest = path.rpartition("/")
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(parent))
    except OSError:
        return [checkpoint]
    older = sorted(
        (i.base_name for i in infos
         if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith(CHECKPOINT_PREFIX)
         and i.base_name < latest),
        reverse=True,
    )
    return [checkpoint, *(Checkpoint(path=f"{parent}/{n}", filesystem=fs) for n in older)]


def read_state(checkpoint: Any) -> dict[str, Any]:
    """The state a checkpoint holds; raises when it is missing, truncated or incomplete."""
    from pathlib import Path

    import torch

    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{CHECKPOINT_FILE} lacks {', '.join(missing)}")
    return state


def _agree_on_max(index: int) -> int:
    """The largest `index` over all ranks, so every rank loads the same checkpoint."""
    import torch
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return index
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([index], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def load_resume_state(checkpoint: Any, agree: Callable[[int], int] = _agree_on_max) -> tuple[dict[str, Any], Any]:
    """(state, the checkpoint it came from): the latest readable checkpoint, falling back to
    older ones with a warning; every rank takes the same one (`agree`). Raises a one-line
    ConfigError when none is readable."""
    candidates = checkpoint_candidates(checkpoint)
    failures: list[str] = []
    state, index = None, len(candidates)
    for i, ckpt in enumerate(candidates):
        try:
            state, index = read_state(ckpt), i
            break
        except Exception as err:  # a truncated zip, a missing file, storage errors
            failures.append(f"{ckpt.path} ({_reason(err)})")
    chosen = agree(index)
    if chosen >= len(candidates):
        found = "; ".join(failures) or "another worker could not read them"
        raise ConfigError(f"no readable checkpoint to resume from: {found}; train it under another --name")
    if chosen != index:  # another worker could not read the one this worker read
        state, index = read_state(candidates[chosen]), chosen
    for failure in failures[:index]:
        logger.warning("unreadable checkpoint %s; falling back to %s", failure, candidates[index].path)
    return state, candidates[index]


def _reason(err: BaseException) -> str:
    """The error's first sentence."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    first = text.split(". ")[0].rstrip(".")
    return f"{type(err).__name__}: {first}" if first else type(err).__name__
