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

from search.experiment.folder import SEARCH_INFO
from search.run import main, prepare, run_search
from search.experiment.study import TUNE_TRIAL_ID, load_study
from tests.conftest import PYTHON, ROOT, cli_env
from trainable.config import LEAF_PATHS
from trainable.config_io import load_config

# A quick but real search: 5 trials one after another, 3 epochs each, ASHA halving at
# epochs 1 and 2, so a trial worse than the median of those before it is stopped; then the
# best config and the baseline on 2 paired seeds, and the ablation of the winner.
QUICK = [
    "experiment.num_samples=5",
    "experiment.max_concurrent_trials=1",
    "experiment.scheduler={kind: asha, grace_period: 1, reduction_factor: 2}",
    "experiment.sampler={kind: tpe, seed: 3, n_startup_trials: 5}",
    "experiment.confirm={top_k: 1, seeds: 2}",
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
        assert r.final == pytest.approx(tune_results[r.trial_id][-1]["val_acc"])  # the score: the last epoch
        assert set(r.values) <= set(space.searched_paths)
        assert "mix.mode" in r.values
        # conditional keys only where their condition holds
        if "mix.cutmix_alpha" in r.values:
            assert r.values["mix.mode"] in ("cutmix", "mixup_cutmix")
        if "mix.mixup_alpha" in r.values:
            assert r.values["mix.mode"] in ("mixup", "mixup_cutmix")
    best = max(r.final for r in rows if r.status == "done")
    assert best > 0.3  # 10 classes: chance is 0.1
    assert rows[0].final == best  # ranked by the score
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

    from search.phases.hparams import columns

    space, outcome = searched
    key_of = {name: key for key, name in columns(space).items()}
    root = Path(outcome.experiment.path) / "hparams"
    for row in outcome.rows:
        hparams, scalars = {}, {}
        for event in _events(root / row.trial_id):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == hp_metadata.PLUGIN_NAME:
                    data = hp_metadata.parse_session_start_info_plugin_data(v.metadata.plugin_data.content) \
                        if v.tag == hp_metadata.SESSION_START_INFO_TAG else None
                    if data is not None:
                        hparams = {key_of[k]: json.loads(json.dumps(_value(x))) for k, x in data.hparams.items()}
                elif v.tag.startswith("hparams/"):
                    scalars.setdefault(v.tag, []).append((event.step, _scalar(v)))
        assert hparams.keys() == {*row.values, "phase", "label", "seed"}
        assert (hparams["phase"], hparams["label"], hparams["seed"]) == ("search", "search", space.train.run.seed)
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
    answer = outcome.answer
    out = tmp_path / "best.yaml"
    r = _run_cli(["-m", "search.export", "--experiment", outcome.experiment.path, "--out", str(out)])
    assert r.returncode == 0, r.stderr
    data = yaml.safe_load(out.read_text())
    prov = data.pop("provenance")
    assert prov["label"] == answer["winner"]["label"] and prov["verdict"] == answer["verdict"]
    assert prov["seeds"] == [1000, 1001] and len(prov["values"]) == 2 and len(prov["ci95"]) == 2
    assert prov["mean"] == pytest.approx(sum(prov["values"]) / 2)
    assert prov["space_sha256"] == space.sha256 and prov["versions"]["torch"]
    cfg = load_config(out)
    assert all(_has(data, p) for p in LEAF_PATHS)  # every field, not only the searched ones
    for path, value in prov["searched"].items():
        assert _get(cfg.model_dump(), path) == value
    # production, not the search budget
    assert cfg.run.epochs == space.production["run.epochs"] and cfg.run.repeats == 1 and cfg.schedule.restarts == []
    assert "run.epochs: 3 -> 30 (production)" in r.stdout

    # the same file is never overwritten
    again = _run_cli(["-m", "search.export", "--experiment", outcome.experiment.path, "--out", str(out)])
    assert again.returncode == 2 and "already exists" in again.stderr

    # the runner-up of the confirmation, re-derived for two workers: the global batch (the trick) stays
    two = tmp_path / "two.yaml"
    r = _run_cli(["-m", "search.export", "--experiment", outcome.experiment.path, "--out", str(two),
                  "--num-workers", "2", "--rank", "2"])
    assert r.returncode == 0, r.stderr
    cfg2 = load_config(two)
    prov2 = yaml.safe_load(two.read_text())["provenance"]
    assert prov2["rank"] == 2 and prov2["label"] != prov["label"]
    assert {c["label"] for c in answer["confirm"]} == {prov["label"], prov2["label"]}
    assert cfg2.batch.global_batch == prov2["searched"]["batch.global_batch"]
    assert cfg2.distributed.num_workers == 2 and cfg2.accum_steps * cfg2.batch.micro_batch * 2 == cfg2.batch.global_batch

    train = _run_cli(["-m", "trainable.train", "--config", str(out), "--set", "run.epochs=1", "--address", ray_address,
                      "--storage-path", str(tmp_path / "prod")], timeout=400)
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    assert "after 1 epochs" in train.stdout


@pytest.mark.slow
def test_the_search_ends_with_a_confirmed_answer_and_a_report(searched):
    space, outcome = searched
    answer = outcome.answer
    assert answer["state"] == "finished"
    assert answer["verdict"] in ("winner", "tie", "no gain over baseline")
    labels = [c["label"] for c in answer["confirm"]]
    assert labels == ["candidate 1", "baseline"] or labels == ["baseline"]
    for c in answer["confirm"]:
        assert c["seeds"] == [1000, 1001] and len(c["values"]) == 2 and c["ci95"][0] <= c["mean"] <= c["ci95"][1]
    winner = answer["winner"]
    assert {a["trick"] for a in answer["ablation"]} == set(winner["changed"])
    assert [t["rung"] for t in answer["rung_tau"]] == [1, 2]
    phases = {t["phase"] for t in answer["trials"]}
    assert phases == {"search", "confirm", "ablate"} if winner["changed"] else {"search", "confirm"}
    report = Path(outcome.experiment.path) / "report"
    md = (report / "report.md").read_text()
    for section in ("## Answer", "## Confirmation", "## What each trick contributed", "## Importance",
                    "## Rung audit", "## Trials"):
        assert section in md
    assert json.loads((report / "report.json").read_text())["verdict"] == answer["verdict"]
    for png in ("learning_curves.png", "confirmation.png", "rung_audit.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the confirmation's runs train through Ray Train, one run (and one Tune trial) per (config, seed)
    confirm_runs = list(Path(outcome.experiment.runs).glob("confirm_*/tensorboard"))
    assert len(confirm_runs) == 2 * len(answer["confirm"])


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
            "--set", "experiment.scheduler={kind: fifo}", "--set", "experiment.confirm=null",
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
