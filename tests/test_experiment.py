"""search.experiment: the experiment folder and the one reader of its trials, checked against
a real (tiny) Tune experiment whose trials report fixed curves, read both from the
`ResultGrid` that `Tuner.fit()` returns and from disk."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from search.experiment.folder import SEARCH_INFO, SPACE_COPY, Experiment, experiment_for, record_space, recorded_space
from search.experiment.trials import finished, format_table, read_results, summarise
from spaces import QUICKSTART, load_space
from tests.conftest import PYTHON, ROOT, cli_env
from trainable.config import ConfigError

EPOCHS = 3
# mix.mode -> the val_acc reported at each epoch; "error" trials raise after their curve
CURVES = {
    "none": [0.2, 0.5, 0.4],  # done: best 0.5, final 0.4
    "cutmix": [0.3, 0.6, 0.7],  # done: best 0.7
    "mixup": [0.1],  # stopped after one epoch
    "mixup_cutmix": [0.9, 0.95],  # fails at epoch 3
}
FAILS = {"mixup_cutmix"}


def _space(tmp_path: Path, *extra: str):
    return load_space(
        QUICKSTART,
        [f"experiment.storage_path={tmp_path}", "experiment.name=tiny", f"train.run.epochs={EPOCHS}", *extra],
    )


def fixed_curve(config: dict) -> None:
    from ray import tune

    mode = config["mix.mode"]
    for epoch, acc in enumerate(CURVES[mode], start=1):
        tune.report({"epoch": epoch, "val_acc": acc, "val_loss": 1.0 - acc})
    if mode in FAILS:
        raise ValueError(f"diverged: {mode} at epoch {len(CURVES[mode]) + 1}")


@pytest.fixture(scope="module")
def tiny(ray_address, tmp_path_factory):
    """A finished Tune experiment of `fixed_curve`: (space, experiment, live ResultGrid)."""
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    space = _space(tmp_path_factory.mktemp("storage"))
    exp = experiment_for(space)
    tuner = tune.Tuner(
        fixed_curve,
        param_space={"mix.mode": tune.grid_search(list(CURVES)), "label_smoothing": 0.1, "other": "not searched"},
        run_config=tune.RunConfig(
            name=exp.name, storage_path=exp.storage, verbose=0, callbacks=[CSVLoggerCallback(), JsonLoggerCallback()]
        ),
    )
    return space, exp, tuner.fit()


def _tune_rows(exp: Experiment) -> dict[str, list[dict]]:
    """Tune's own result rows, read straight from each trial's result.json."""
    out = {}
    for f in Path(exp.path).glob("*/result.json"):
        rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


def test_rows_follow_the_reported_curves(tiny):
    space, exp, grid = tiny
    rows = summarise(grid, space)
    tune_rows = _tune_rows(exp)
    assert {r.trial_id for r in rows} == set(tune_rows)  # every trial once, by Tune's id
    assert len(rows) == len(CURVES)
    for r in rows:
        mode = tune_rows[r.trial_id][0]["config"]["mix.mode"]
        curve = CURVES[mode]
        assert r.values == {"mix.mode": mode, "label_smoothing": 0.1}  # searched keys only
        assert r.epochs == len(curve) == len(tune_rows[r.trial_id])
        assert r.best == pytest.approx(max(curve)) and r.final == pytest.approx(curve[-1])
        if mode in FAILS:
            assert r.status == "error" and f"diverged: {mode} at epoch 3" in r.error
        else:
            assert r.status == ("done" if len(curve) == EPOCHS else "stopped early") and r.error is None
    # the best first, by the best value over epochs (the failed trial's 0.95 included)
    assert [r.best for r in rows] == sorted((max(c) for c in CURVES.values()), reverse=True)
    assert [r.values["mix.mode"] for r in finished(rows)] == ["cutmix", "none"]


def test_min_metric_ranks_the_lowest_first(tiny):
    _, exp, grid = tiny
    space = _space(Path(exp.storage), "experiment.metric=val_loss", "experiment.mode=min")
    rows = summarise(grid, space)
    assert [r.best for r in rows] == pytest.approx(sorted(1.0 - max(c) for c in CURVES.values()))
    assert [r.final for r in rows] == pytest.approx([1.0 - CURVES[r.values["mix.mode"]][-1] for r in rows])
    # a metric no trial reported: no best, no ranking, nothing finished
    rows = summarise(grid, _space(Path(exp.storage), "experiment.metric=val_acc5"))
    assert all(r.best is None for r in rows) and finished(rows) == []


def test_disk_reader_matches_the_live_grid(tiny):
    space, exp, grid = tiny
    assert summarise(read_results(exp.path), space) == summarise(grid, space)


def test_trials_that_have_not_ended_are_unfinished(tmp_path):
    """What a running experiment (or one whose driver was killed) holds besides ended trials."""
    import pandas as pd
    from ray.tune import Result

    def result(trial_id: str, accs: list[float], done: bool | None) -> Result:
        metrics = {"trial_id": trial_id}
        if accs:
            metrics |= {"epoch": len(accs), "val_acc": accs[-1], "config": {"mix.mode": "none"}, "done": done}
        df = pd.DataFrame({"epoch": range(1, len(accs) + 1), "val_acc": accs}) if accs else pd.DataFrame()
        return Result(metrics=metrics, checkpoint=None, error=None, path=str(tmp_path / trial_id), metrics_dataframe=df)

    results = [
        result("running", [0.4], False),
        result("waiting", [], None),
        result("stopped", [0.3], True),
        result("all_epochs", [0.1, 0.2, 0.5], False),  # its driver was killed before it returned
    ]
    rows = {r.trial_id: r for r in summarise(results, _space(tmp_path))}
    assert {k: r.status for k, r in rows.items()} == {
        "running": "unfinished", "waiting": "unfinished", "stopped": "stopped early", "all_epochs": "done"}
    assert rows["waiting"].values == {} and rows["waiting"].best is None and rows["waiting"].epochs == 0
    assert [r.trial_id for r in finished(list(rows.values()))] == ["all_epochs"]


def test_reading_a_folder_without_tune_state_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_results(str(tmp_path))
    assert "\n" not in str(info.value) and "no trial results yet" in str(info.value)


def test_format_table_lists_every_trial_in_aligned_columns(tiny):
    space, _, grid = tiny
    rows = summarise(grid, space)
    lines = format_table(rows, space).splitlines()
    head = lines[0].split()
    assert head[0] == "trial" and head[1 : 1 + len(space.searched_paths)] == space.searched_paths
    # a trial failed: a last column holds each failed trial's one-line reason
    assert " ".join(lines[0].split()[-5:]) == "best val_acc epochs status reason"
    assert set(lines[1]) <= {"-", " "} and len(lines) == 2 + len(rows)
    status_at, reason_at = lines[0].index("status"), lines[0].index("reason")
    for r, line in zip(rows, lines[2:]):
        assert line.startswith(r.trial_id + " ")
        assert line[status_at:reason_at].strip() == r.status
        assert line[reason_at:] == (r.error or "")
        cells = line[: status_at].split()
        assert cells[-1] == str(r.epochs) and cells[-2] == f"{r.best:.4g}"
        assert f" {r.values['mix.mode']} " in line
        missing = [p for p in space.searched_paths if p not in r.values]
        assert cells.count("-") == len(missing)  # keys a trial did not sample show as "-"


def test_experiment_folder_and_recorded_space(tmp_path):
    space = _space(tmp_path, "experiment.num_samples=3")
    exp = experiment_for(space)
    assert exp == Experiment(str(tmp_path), "tiny") == Experiment.at(exp.path)
    assert Experiment.at("s3://bucket/exps/one/") == Experiment("s3://bucket/exps", "one")
    assert exp.runs == f"{tmp_path}/tiny/runs" and exp.study_db == f"{tmp_path}/tiny/optuna.db"
    assert not exp.exists()
    with pytest.raises(ConfigError, match="not an experiment of this tool"):
        recorded_space(exp)

    sets = [f"experiment.storage_path={tmp_path}", "experiment.name=tiny", f"train.run.epochs={EPOCHS}",
            "experiment.num_samples=3"]
    record_space(exp, space, sets)
    assert exp.exists()
    assert (tmp_path / "tiny" / SPACE_COPY).read_text() == Path(QUICKSTART).read_text()
    again, info = recorded_space(exp, ["experiment.num_samples=5"])
    assert info == json.loads((tmp_path / "tiny" / SEARCH_INFO).read_text())
    assert info["overrides"] == sets and info["sha256"] == space.sha256
    assert again.train == space.train and again.experiment.num_samples == 5
    with pytest.raises(ConfigError, match="already exists"):  # never overwritten
        record_space(exp, space, [])


def test_search_modules_import_no_torch():
    code = (
        "import sys\n"
        "import search.run, search.report, search.export, search.experiment.folder, search.experiment.sampling\n"
        "import trainable.cluster, trainable.storage, trainable.train\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad[:5]\n"
    )
    r = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
