"""The experiment folder `<storage>/<name>/` (a local folder or a URI): its paths and the
space it ran.

The folder holds Tune's state and results, the space the search ran (`space.yaml` and
`search.json`), the Optuna study, TensorBoard's files and every trial's training run
(`runs/trial_<id>`, `runs/confirm_<id>`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from spaces import Space, load_space
from trainable.config import ConfigError
from trainable.storage import Storage, expand_storage, local_mirror

logger = logging.getLogger(__name__)

__all__ = [
    "EXPERIMENT_ID",
    "RUNS_DIR",
    "SEARCH_INFO",
    "SPACE_COPY",
    "STUDY_FILE",
    "TRIAL_NAME_PREFIX",
    "Experiment",
    "claim_mirror",
    "experiment_for",
    "open_experiment",
    "read_info",
    "record_space",
    "recorded_space",
    "restore_study",
]

SPACE_COPY = "space.yaml"  # the space file as given
SEARCH_INFO = "search.json"  # where it came from, its hash, the overrides
STUDY_FILE = "optuna.db"  # the Optuna study (SQLite)
EXPERIMENT_ID = "experiment_id"  # in search.json, and a file naming the experiment a local mirror belongs to
RUNS_DIR = "runs"  # one TorchTrainer run per trial
TRIAL_NAME_PREFIX = "trial_"  # runs/trial_<Tune trial id>: a search trial's TorchTrainer run


# The folder ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Experiment:
    """Where a search keeps everything: `<storage>/<name>/`."""

    storage: str
    name: str

    @classmethod
    def at(cls, path: str) -> Experiment:
        """The experiment whose folder is `path`."""
        storage, _, name = expand_storage(path).rpartition("/")
        return cls(storage, name)

    @property
    def path(self) -> str:
        return f"{self.storage}/{self.name}"

    @cached_property
    def store(self) -> Storage:
        return Storage(self.path)

    @property
    def local(self) -> str:
        """Where files that must sit on a local disk live (the SQLite study, TensorBoard's
        HParams files while they are written): the experiment itself when it is local, else
        a mirror that is uploaded as the search runs."""
        return self.path if self.store.is_local else str(local_mirror(self.path))

    @property
    def study_db(self) -> str:
        return f"{self.local}/{STUDY_FILE}"

    @property
    def runs(self) -> str:
        return f"{self.path}/{RUNS_DIR}"

    def exists(self) -> bool:
        """Whether a search of this tool was started here."""
        return self.store.exists(SEARCH_INFO)


def experiment_for(space: Space) -> Experiment:
    return Experiment(expand_storage(space.experiment.storage_path), space.experiment.name)


def open_experiment(path: str) -> Experiment:
    """The experiment at `path` (a folder or a URI) for reading: one line when it is missing,
    unreadable or not an experiment of this tool."""
    exp = Experiment.at(path)
    try:
        if not exp.store.exists():
            raise ConfigError(f"--experiment {path}: no such folder")
        if not exp.exists():
            raise ConfigError(f"--experiment {path}: not an experiment of this tool (no {SEARCH_INFO})")
    except OSError as err:  # an unreachable bucket, missing credentials
        raise ConfigError(f"--experiment {path}: cannot read it ({str(err).splitlines()[0]})") from None
    return exp


def record_space(exp: Experiment, space: Space, overrides: list[str]) -> None:
    """Keep the space as given (and the overrides) inside the experiment, so `--resume` and
    the export read exactly what the search ran."""
    store = exp.store
    experiment_id = uuid.uuid4().hex
    claim_mirror(exp, experiment_id)
    store.write_text(SPACE_COPY, Path(space.source).read_text())
    info = {"space_file": str(space.source), "sha256": space.sha256, "overrides": overrides,
            EXPERIMENT_ID: experiment_id}
    store.write_text(SEARCH_INFO, json.dumps(info, indent=2) + "\n")


def recorded_space(exp: Experiment, extra: list[str] | None = None) -> tuple[Space, dict[str, Any]]:
    """The space an experiment ran, with its overrides (and `extra` ones), and its
    `search.json`."""
    store = exp.store
    if not store.exists(SEARCH_INFO):
        raise ConfigError(f"{exp.path}: not an experiment of this tool (no {SEARCH_INFO})")
    info = read_info(exp)
    if store.is_local:
        space_file = Path(store.fs_path(SPACE_COPY))
    else:
        space_file = local_mirror(exp.path) / SPACE_COPY
        space_file.write_text(store.read_text(SPACE_COPY))
    space = load_space(space_file, list(info["overrides"]) + list(extra or []))
    return space, info


def read_info(exp: Experiment) -> dict[str, Any]:
    """The experiment's `search.json`, checked: a damaged file is one line, not a traceback."""
    where = f"{exp.path}/{SEARCH_INFO}"
    try:
        info = json.loads(exp.store.read_text(SEARCH_INFO))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{where}: unreadable ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if not isinstance(info, dict) or not isinstance(info.get("overrides"), list):
        raise ConfigError(f"{where}: damaged (expected a JSON object with an 'overrides' list)")
    return info


def restore_study(exp: Experiment) -> None:
    """On a remote storage the study's SQLite file lives on this machine and a copy in the
    experiment; a machine without the local file (a new head), or whose local file belongs
    to another experiment of the same name, takes the copy."""
    if exp.store.is_local:
        return
    experiment_id = read_info(exp).get(EXPERIMENT_ID)
    if experiment_id:  # experiments started before identities were recorded keep their mirror
        claim_mirror(exp, experiment_id)
    if not os.path.exists(exp.study_db) and exp.store.exists(STUDY_FILE):
        exp.store.download(STUDY_FILE, exp.study_db)


def claim_mirror(exp: Experiment, experiment_id: str) -> None:
    """Make a remote experiment's local mirror belong to `experiment_id`. A mirror left by
    another experiment of the same name (one deleted and started again) is moved aside,
    never reused or deleted, so its study cannot leak into this one."""
    if exp.store.is_local:
        return
    mirror = local_mirror(exp.path)
    tag = mirror / EXPERIMENT_ID
    owner = tag.read_text().strip() if tag.is_file() else None
    if owner == experiment_id:
        return
    kept = [p.name for p in mirror.iterdir() if p.name not in (SPACE_COPY, EXPERIMENT_ID)]
    if owner is not None or kept:
        aside = mirror.with_name(f"{mirror.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        mirror.rename(aside)
        logger.warning(
            "%s: the local mirror %s belonged to another experiment of that name; moved it to %s",
            exp.path, mirror, aside,
        )
        mirror.mkdir(parents=True)
    tag.write_text(experiment_id + "\n")
