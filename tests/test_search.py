"""The search end to end on the digits data: Tune + Optuna + ASHA, the study's bookkeeping,
TensorBoard's HParams view, export, production training from the export, resume after
SIGKILL, and the errors that must come before anything starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from optuna.trial import TrialState

from search.experiment import SEARCH_INFO
from search.run import main, prepare, run_search
from search.study import TUNE_TRIAL_ID, load_study
from tests.conftest import PYTHON, ROOT, cli_env
from trainable.config import LEAF_PATHS
from trainable.config_io import load_config

# A quick but real search: 5 trials one after another, 3 epochs each, ASHA halving at
# epochs 1 and 2, so a trial worse than the median of those before it is stopped.
QUICK = [
    "experiment.num_samples=5",
    "experiment.max_concurrent_trials=1",
    "experiment.scheduler={kind: asha, grace_period: 1, reduction_factor: 2}",
    "experiment.sampler={kind: tpe, seed: 3, n_startup_trials: 5}",
    "train.model.small_input=false",
    "train.run.epochs=3",
]


def _run_cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def searched(ray_address, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    space, exp, sets = prepare(None, QUICK, False, "quick", str(storage))
    outcome = run_search(space, exp, sets, address=ray_address)
    return space, outcome


def _tune_results(exp: str) -> dict[str, list[dict]]:
    """Tune's own result rows of every trial, straight from its result.json."""
    out = {}
    for f in Path(exp).glob("*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def _best_finished(exp: str, metric: str = "val_acc", epochs: int = 3) -> dict[str, float]:
    """{trial id: best metric} of the trials whose Tune results reach the last epoch."""
    return {tid: max(r[metric] for r in rows) for tid, rows in _tune_results(exp).items()
            if rows[-1]["epoch"] == epochs}


@pytest.mark.slow
def test_search_runs_every_trial_and_asha_stops_some(searched):
    space, outcome = searched
    rows = outcome.rows
    assert len(rows) == 5
    statuses = [r.status for r in rows]
    assert "stopped early" in statuses, statuses
    assert "done" in statuses, statuses
    assert all(r.status != "error" for r in rows)
    tune_results = _tune_results(outcome.experiment.path)
    assert set(tune_results) == {r.trial_id for r in rows}
    for r in rows:
        reported = [x["epoch"] for x in tune_results[r.trial_id]]
        assert reported == list(range(1, len(reported) + 1))  # each epoch reported once
        assert r.epochs == reported[-1]
        assert r.status == ("done" if reported[-1] == 3 else "stopped early")
        assert r.best == pytest.approx(max(x["val_acc"] for x in tune_results[r.trial_id]))
        assert set(r.values) <= set(space.searched_paths)
        assert "mix.mode" in r.values
        # conditional keys only where their condition holds
        if "mix.cutmix_alpha" in r.values:
            assert r.values["mix.mode"] in ("cutmix", "mixup_cutmix")
        if "mix.mixup_alpha" in r.values:
            assert r.values["mix.mode"] in ("mixup", "mixup_cutmix")
    best = max(r.best for r in rows if r.status == "done")
    assert best > 0.3  # 10 classes: chance is 0.1
    exp = Path(outcome.experiment.path)
    assert (exp / "optuna.db").is_file() and (exp / SEARCH_INFO).is_file()


@pytest.mark.slow
def test_stopped_trials_reach_optuna_as_pruned_with_intermediate_values(searched):
    space, outcome = searched
    study = load_study(outcome.experiment.study_db, "quick")
    trials = study.get_trials(deepcopy=False)
    by_tune = {t.user_attrs[TUNE_TRIAL_ID]: t for t in trials}
    assert len(trials) == len(by_tune) == 5  # each trial once
    for row in outcome.rows:
        t = by_tune[row.trial_id]
        assert sorted(t.intermediate_values) == list(range(1, row.epochs + 1))
        if row.status == "stopped early":
            assert t.state == TrialState.PRUNED, (row, t.state)
            assert t.value == pytest.approx(t.intermediate_values[row.epochs])  # Optuna's convention
        else:
            assert t.state == TrialState.COMPLETE
            assert t.value == pytest.approx(t.intermediate_values[3])
        for path, value in row.values.items():
            assert t.params[path] == value


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    for f in sorted(folder.glob("events.out.tfevents.*")):
        yield from EventFileLoader(str(f)).Load()


@pytest.mark.slow
def test_hparams_view_lists_every_trial_with_its_tricks_and_accuracy(searched):
    from tensorboard.plugins.hparams import metadata as hp_metadata

    space, outcome = searched
    root = Path(outcome.experiment.path) / "hparams"
    for row in outcome.rows:
        hparams, scalars = {}, {}
        for event in _events(root / row.trial_id):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == hp_metadata.PLUGIN_NAME:
                    data = hp_metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content) \
                        if v.tag == hp_metadata.SESSION_START_INFO_TAG else None
                    if data is not None:
                        hparams = {k: json.loads(json.dumps(_value(x))) for k, x in data.hparams.items()}
                elif v.tag.startswith("hparams/"):
                    scalars.setdefault(v.tag, []).append((event.step, _scalar(v)))
        assert hparams.keys() == row.values.keys()
        for k, value in row.values.items():
            assert hparams[k] == pytest.approx(value) if isinstance(value, float) else hparams[k] == value
        assert scalars["hparams/best_val_acc"][-1] == (row.epochs, pytest.approx(row.best))
        assert [s for s, _ in scalars["hparams/final_val_acc"]] == list(range(1, row.epochs + 1))


def _value(v):
    kind = v.WhichOneof("kind")
    return getattr(v, kind)


def _scalar(v) -> float:
    from tensorboard.util import tensor_util

    return float(tensor_util.make_ndarray(v.tensor)) if v.HasField("tensor") else v.simple_value


@pytest.mark.slow
def test_trial_runs_write_their_own_tensorboard_files(searched):
    _, outcome = searched
    runs = Path(outcome.experiment.runs)
    for row in outcome.rows:
        assert list((runs / f"trial_{row.trial_id}" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_export_then_production_training(searched, ray_address, tmp_path):
    space, outcome = searched
    out = tmp_path / "best.yaml"
    r = _run_cli(["-m", "search.export", "--experiment", outcome.experiment.path, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(out.read_text())
    prov = data.pop("provenance")
    bests = _best_finished(outcome.experiment.path)  # Tune's rows, not the export's reader
    ranked = sorted(bests.values(), reverse=True)
    assert bests[prov["trial_id"]] == pytest.approx(ranked[0]) and prov["epochs_run"] == 3
    assert prov["best_val_acc"] == pytest.approx(ranked[0])
    best = next(row for row in outcome.rows if row.trial_id == prov["trial_id"])
    study = {t.user_attrs[TUNE_TRIAL_ID]: t for t in load_study(outcome.experiment.study_db, "quick").get_trials()}
    assert prov["searched"] == best.values == study[prov["trial_id"]].params
    assert prov["space_sha256"] == space.sha256 and prov["versions"]["torch"]
    cfg = load_config(out)
    flat = {p for p in LEAF_PATHS}
    assert all(_has(data, p) for p in flat)  # every field, not only the searched ones
    for path, value in best.values.items():
        assert _get(cfg.model_dump(), path) == value

    # the same file is never overwritten
    again = _run_cli(["-m", "search.export", "--experiment", outcome.experiment.path, "--out", str(out)])
    assert again.returncode == 2 and "already exists" in again.stderr

    # re-derived for another cluster: the global batch (the trick) stays
    one = tmp_path / "one.yaml"
    r = _run_cli(["-m", "search.export", "--experiment", outcome.experiment.path, "--out", str(one),
                  "--num-workers", "1", "--rank", "2"])
    assert r.returncode == 0, r.stderr
    cfg1 = load_config(one)
    prov1 = yaml.safe_load(one.read_text())["provenance"]
    assert prov1["rank"] == 2 and prov1["trial_id"] != prov["trial_id"]
    assert bests[prov1["trial_id"]] == pytest.approx(ranked[1]) == prov1["best_val_acc"]
    # the second trial's values as Optuna sampled them, the rest from the space's base config
    params = study[prov1["trial_id"]].params
    assert prov1["searched"] == params
    dumped = cfg1.model_dump()
    for path in space.searched_paths:
        expected = params[path] if path in params else _get(space.train.model_dump(), path)
        assert _get(dumped, path) == expected, path
    assert cfg1.batch.global_batch == params.get("batch.global_batch", space.train.batch.global_batch)
    assert cfg1.distributed.num_workers == 1 and cfg1.accum_steps * cfg1.batch.micro_batch == cfg1.batch.global_batch

    train = _run_cli(["-m", "trainable.train", "--config", str(out), "--set", "run.epochs=1", "--address", ray_address,
                      "--storage-path", str(tmp_path / "prod")], timeout=400)
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    assert "after 1 epochs" in train.stdout


def _get(d, path):
    for p in path.split("."):
        d = d[p]
    return d


def _has(d, path):
    try:
        _get(d, path)
        return True
    except (KeyError, TypeError):
        return False


def test_export_errors_are_one_line(tmp_path):
    r = _run_cli(["-m", "search.export", "--experiment", str(tmp_path / "nope")])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder" in r.stderr
    (tmp_path / "empty").mkdir()
    r = _run_cli(["-m", "search.export", "--experiment", str(tmp_path / "empty")])
    assert r.returncode == 2 and "not an experiment" in r.stderr and "Traceback" not in r.stderr


# Errors before anything starts -----------------------------------------------------------------------
def test_bad_space_exits_2_and_launches_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiment: {name: bad}\nsearch:\n  mix.mdoe: {choice: [none, cutmix]}\n")
    r = _run_cli(["-m", "search.run", "--space", str(bad), "--storage-path", str(tmp_path / "store")])
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "mix.mdoe" in r.stderr and "mix.mode" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_unsatisfiable_trial_fails_at_once(ray_address, tmp_path, capsys):
    start = time.monotonic()
    rc = main(["--storage-path", str(tmp_path), "--name", "big", "--address", ray_address,
               "--set", "train.distributed.use_gpu=true", "--set", "train.distributed.num_workers=8",
               "--set", "train.batch.global_batch=256", "--set", "search.batch.global_batch=null"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "needs 8 GPUs" in err and "cluster has 0" in err
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_existing_experiment_needs_resume(searched, capsys):
    _, outcome = searched
    exp = Path(outcome.experiment.path)
    before = sorted(p.name for p in exp.iterdir())
    rc = main(["--storage-path", str(exp.parent), "--name", exp.name])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in exp.iterdir()) == before


# Resume after the driver is killed --------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_sigkill_finishes_the_experiment(ray_address, tmp_path):
    args = ["-m", "search.run", "--address", ray_address, "--storage-path", str(tmp_path), "--name", "killed",
            "--num-samples", "3", "--max-concurrent-trials", "1",
            "--set", "experiment.scheduler={kind: fifo}", "--set", "train.model.small_input=false",
            "--set", "train.run.epochs=3"]
    first = subprocess.Popen([PYTHON, *args], cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    exp = tmp_path / "killed"
    deadline = time.monotonic() + 400
    try:
        # kill once the first trial finished and the second has a checkpoint
        while time.monotonic() < deadline:
            runs = sorted((exp / "runs").glob("trial_*")) if (exp / "runs").exists() else []
            ckpts = [list(r.glob("checkpoint_*")) for r in runs]
            if len(runs) >= 2 and len(ckpts[0]) >= 2 and any(ckpts[1:]):
                break
            time.sleep(1)
        time.sleep(2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    assert time.monotonic() < deadline, "the search did not reach its second trial in time"

    r = _run_cli([*args, "--resume"], timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]

    study = load_study(str(exp / "optuna.db"), "killed")
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    assert len(finished) == 3, [(t.number, t.state) for t in study.get_trials()]
    assert len({t.user_attrs[TUNE_TRIAL_ID] for t in finished}) == 3  # each trial once
    assert all(sorted(t.intermediate_values) == [1, 2, 3] for t in finished)
    # finished trials were not rerun, unfinished ones resumed from their checkpoints: every
    # trial's results (Tune's result.json, kept across the kill) hold each epoch once
    results = sorted(exp.glob("*/result.json"))
    assert len(results) == 3
    for f in results:
        epochs = [json.loads(line)["epoch"] for line in f.read_text().splitlines() if line.strip()]
        assert epochs == [1, 2, 3], (f.parent.name, epochs)
    assert "resumed from epoch" in out
