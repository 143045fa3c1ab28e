"""Every use of Ray's and Optuna's private parts, in one place, for the versions it was
written for.

Resuming a search reads and corrects what Ray Tune and Optuna keep privately: a Tune
logger's `_restore_from_remote`, `OptunaSearch`'s `_ot_trials` / `_ot_study` /
`_completed_trials`, `Trial.from_json_state`, the pickled search generator's keys
(`counter`, `name:ConcurrencyLimiter`), `ResultGrid._experiment_analysis`, ASHA's
brackets and rungs, and the TPE sampler's random states. None of it is a public API: the
installed versions are checked at import, and `--resume` refuses with one line when they
are not the ones below (`check_resume`), rather than resume into a silently different state.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import pyarrow.fs
import ray

from trainable.config import ConfigError

if TYPE_CHECKING:
    from ray.tune.experiment import Trial

__all__ = [
    "OPTUNA_VERSION", "RAY_VERSION", "KeptLoggerFile", "asha_rungs", "check_resume", "completed_trials",
    "experiment_analysis", "fix_search_generator", "ot_study", "ot_trials", "reseed_sampler",
    "save_tune_state", "trial_from_json", "version_mismatch",
]

logger = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"
OPTUNA_VERSION = "5.1.0"


def version_mismatch(ray_version: str | None = None, optuna_version: str | None = None) -> str | None:
    """None when the installed Ray and Optuna are the versions this module was written for;
    otherwise one line saying which differs."""
    have = {"ray": ray_version or ray.__version__, "optuna": optuna_version or optuna.__version__}
    want = {"ray": RAY_VERSION, "optuna": OPTUNA_VERSION}
    wrong = [f"{k} {have[k]} (written for {want[k]})" for k in want if have[k] != want[k]]
    if not wrong:
        return None
    return (
        "--resume reads Ray Tune's and Optuna's private state, and the installed " + " and ".join(wrong)
        + f" may keep it differently; install ray=={RAY_VERSION} optuna=={OPTUNA_VERSION} to resume this experiment"
    )


MISMATCH = version_mismatch()
if MISMATCH:
    logger.warning("%s", MISMATCH)


def check_resume() -> None:
    """Refuse to resume (`ConfigError`, one line) with other Ray or Optuna versions."""
    if MISMATCH:
        raise ConfigError(MISMATCH)


# Tune ----------------------------------------------------------------------------------------------
class KeptLoggerFile:
    """Mixin for a Tune logger callback whose file lives in the experiment: Tune's private
    `_restore_from_remote` hook takes the experiment's copy back for any trial, not only a
    trial resumed from a Tune checkpoint, and over any copy the driver's staging folder
    still holds: a trial keeps the staging folder of the driver that started it, and a
    driver resumed on the same Ray instance finds there the file as an earlier killed
    driver left it, behind the experiment's (Tune would sync it back over the rows kept)."""

    def _restore_from_remote(self, file_name: str, trial: Trial) -> None:
        from pathlib import Path

        local = Path(trial.local_path, file_name)
        remote = f"{trial.storage.trial_fs_path}/{file_name}"
        fs = trial.storage.storage_filesystem
        if fs.get_file_info(remote).type == pyarrow.fs.FileType.NotFound:
            return
        if isinstance(fs, pyarrow.fs.LocalFileSystem) and local.exists() and local.samefile(remote):
            return
        local.parent.mkdir(parents=True, exist_ok=True)
        pyarrow.fs.copy_files(remote, str(local), source_filesystem=fs)


def trial_from_json(trial_json: str, metadata_json: str) -> Trial:
    """A Tune trial (a stub) from one entry of Tune's experiment state."""
    from ray.tune.experiment import Trial

    trial = Trial.from_json_state(trial_json, stub=True)
    trial.restore_run_metadata(metadata_json)
    return trial


def fix_search_generator(gen: dict[str, Any], live: set[str], count: int) -> bool:
    """Make the pickled search generator's state agree with Tune's trials: its trial counter
    `count`, and its concurrency limiter's live trials `live`. Returns whether it changed."""
    changed = False
    limiter = gen.get("name:ConcurrencyLimiter")
    if limiter is not None and set(limiter["live_trials"]) != live:
        limiter["live_trials"], limiter["num_unfinished_live_trials"] = live, len(live)
        changed = True
    if gen.get("counter") != count:
        gen["counter"] = count
        changed = True
    return changed


def save_tune_state(controller: Any, trial: Any = None) -> None:
    """Have Tune write its experiment state (its trials, `trial` included, and the searcher's
    state) into the experiment now and wait for it: `controller` is what Tune hands its
    schedulers (a wrapper around its `TuneController`, whose `checkpoint` is not public; a
    trial being added is only marked for its state after the scheduler has seen it)."""
    inner = getattr(controller, "_tune_controller", controller)
    if inner is None or not hasattr(inner, "save_to_dir"):
        return
    if trial is not None:
        inner._mark_trial_to_checkpoint(trial)
    inner.save_to_dir()  # into the driver's staging folder
    # Only this session's state files go to the experiment, the searcher's before Tune's:
    # Tune's own sync (`checkpoint`) would also copy the trials' result files as this driver
    # has them, over the rows that earlier drivers kept there.
    storage = inner._storage
    staging, session = storage.experiment_driver_staging_path, inner._session_str
    names = sorted((n for n in os.listdir(staging) if session in n and os.path.isfile(os.path.join(staging, n))),
                   key=lambda n: n.startswith("experiment_state"))
    fs = storage.storage_filesystem
    for name in names:
        remote = f"{storage.experiment_fs_path}/{name}"
        with open(os.path.join(staging, name), "rb") as f, fs.open_output_stream(remote + ".tmp") as out:
            out.write(f.read())
        fs.move(remote + ".tmp", remote)


def experiment_analysis(results: Any) -> Any:
    """The `ExperimentAnalysis` behind a `ResultGrid` (None if it has none)."""
    return getattr(results, "_experiment_analysis", None)


def asha_rungs(scheduler: Any) -> list[tuple[float, dict[str, float]]]:
    """ASHA's rungs (milestone, {trial id: signed metric}) of its one bracket, highest first."""
    return scheduler._brackets[0]._rungs


def asha_bracket_for(scheduler: Any, trial_id: str) -> None:
    """Put a trial ASHA never saw added (a restored one) into its bracket."""
    scheduler._trial_info.setdefault(trial_id, scheduler._brackets[0])


def asha_forget(scheduler: Any, trial_id: str) -> None:
    scheduler._trial_info.pop(trial_id, None)


def asha_knows(scheduler: Any, trial_id: str) -> bool:
    return trial_id in scheduler._trial_info


def asha_stopped(scheduler: Any, delta: int = 0) -> int:
    scheduler._num_stopped += delta
    return scheduler._num_stopped


# Optuna --------------------------------------------------------------------------------------------
def ot_trials(searcher: Any) -> dict[str, optuna.Trial]:
    """OptunaSearch's Tune trial id -> live Optuna trial."""
    return searcher._ot_trials


def ot_study(searcher: Any) -> optuna.Study:
    return searcher._ot_study


def completed_trials(searcher: Any) -> set[str]:
    return searcher._completed_trials


def reseed_sampler(sampler: optuna.samplers.BaseSampler, seed: int) -> None:
    """Set the sampler's random state to one made from `seed` (TPE: its own and its startup
    random sampler's), so a proposal depends on the study and `seed`, not on how many draws
    an earlier driver made."""
    samplers = [sampler, getattr(sampler, "_random_sampler", None)]
    for s in samplers:
        rng = getattr(s, "_rng", None)
        if rng is not None:
            rng.rng.seed(seed % 2**32)
