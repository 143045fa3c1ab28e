"""The search's console: one line per ended trial (`search.console.TrialLines`), Ray's lines
that look like failures when nothing failed, Ray Train's per-report dumps on workers, and
'did you mean' hints that name real key paths."""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from search.phases.console import TrialLines, short_names
from spaces import SpaceError, load_space

SPACE = """
experiment:
  name: console
  metric: val_acc
  num_samples: 4
  scheduler: {kind: asha, grace_period: 1, reduction_factor: 3}
train:
  model: {name: resnet18_vd, small_input: true}
  data: {kind: digits, image_size: 32}
  mix: {mode: none}
  label_smoothing: 0.1
  optimizer: {base_lr: 0.4}
  batch: {global_batch: 64, micro_batch: 16}
  distributed: {num_workers: 2}
  run: {epochs: 3}
search:
  mix.mode: {choice: [none, mixup, cutmix]}
  mix.mixup_alpha: {uniform: [0.1, 0.4], when: {mix.mode: [mixup]}}
  label_smoothing: {uniform: [0.0, 0.2]}
  optimizer.base_lr: {loguniform: [0.1, 1.0]}
"""


@pytest.fixture
def space(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return load_space(path)


def fake_trial(tid: str, config: dict[str, Any], error: BaseException | None = None) -> SimpleNamespace:
    return SimpleNamespace(
        trial_id=tid, config=config, last_result={}, error_file=f"/x/{tid}/error.txt",
        get_pickled_error=lambda: error, get_error=lambda: None,
    )


def feed(cb: TrialLines, trial: SimpleNamespace, results: list[dict[str, Any]]) -> None:
    for r in results:
        trial.last_result = r
        cb.on_trial_result(0, [trial], trial, dict(r))


def curve(*accs: float, **extra: Any) -> list[dict[str, Any]]:
    return [{"epoch": i + 1, "val_acc": a, "val_loss": 1.0 - a, **extra} for i, a in enumerate(accs)]


MIXUP = {"mix.mode": "mixup", "mix.mixup_alpha": 0.2271, "label_smoothing": 0.12918, "optimizer.base_lr": 0.61905}


def test_done_trial_scores_its_last_epoch_not_its_best(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    t = fake_trial("aaa00001", MIXUP)
    feed(cb, t, curve(0.50, 0.80, 0.70))
    cb.on_trial_complete(0, [t], t)
    line = out.getvalue()
    assert line.count("\n") == 1
    assert line.startswith("trial aaa00001  ")
    assert "val_acc 0.7000" in line and "0.8000" not in line
    assert "epochs 3/3" in line and line.rstrip().endswith("done")
    assert "mix.mode=mixup mixup_alpha=0.227 label_smoothing=0.129 base_lr=0.619" in line


def test_trial_stopped_by_asha(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    t = fake_trial("aaa00002", {"mix.mode": "none", "label_smoothing": 0.05, "optimizer.base_lr": 0.3})
    feed(cb, t, curve(0.31))
    cb.on_trial_complete(0, [t], t)
    line = out.getvalue().strip()
    assert "val_acc 0.3100" in line and "epochs 1/3" in line and line.endswith("stopped early by ASHA")
    assert "mixup_alpha" not in line  # not sampled in this trial


def test_diverged_trial_names_the_epoch_and_has_no_score(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    t = fake_trial("aaa00003", MIXUP)
    reason = "diverged: non-finite loss at epoch 2, step 17 (update 2 of the epoch), lr 3.1; lower optimizer.base_lr"
    feed(cb, t, [*curve(0.4), {"epoch": 2, "val_acc": 0.0, "run_status": "diverged", "error": reason}])
    cb.on_trial_complete(0, [t], t)
    line = out.getvalue().strip()
    assert "val_acc -" in line and "epochs 1/3" in line
    assert line.endswith("diverged: non-finite loss at epoch 2, step 17 (update 2 of the epoch), lr 3.1; lower optimizer.base_lr")


def test_failed_trials_give_their_one_line_reason(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    user = fake_trial("aaa00004", MIXUP)  # ended at once: a config or data error
    feed(cb, user, [{"val_acc": 0.0, "run_status": "failed", "error": "DataError: /data/x.jpg: cannot decode\nimage"}])
    cb.on_trial_complete(0, [user], user)
    crash = fake_trial("aaa00005", MIXUP, error=RuntimeError("first line\nworker died: OOM"))  # retries spent
    feed(cb, crash, curve(0.2))
    cb.on_trial_error(0, [crash], crash)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("failed: DataError: /data/x.jpg: cannot decode image") and "val_acc -" in lines[0]
    assert "epochs 0/3" in lines[0]
    assert lines[1].endswith("failed: RuntimeError: worker died: OOM") and "epochs 1/3" in lines[1]


def test_error_read_from_the_local_error_files_before_storage(space, tmp_path):
    """Tune writes a trial's error files on the driver's machine first and copies them to
    the experiment later: the callback may run before the copy exists."""
    from ray import cloudpickle

    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    pickled = tmp_path / "error.pkl"
    pickled.write_bytes(cloudpickle.dumps(ValueError("bad thing\nin two lines")))
    t = fake_trial("aaa00009", MIXUP)
    t.pickled_error_file = str(pickled)
    t.get_pickled_error = lambda: (_ for _ in ()).throw(FileNotFoundError("not copied yet"))
    cb.on_trial_error(0, [t], t)
    text = tmp_path / "error.txt"
    text.write_text("Failure # 1 (occurred at 2026-11-30_00-18-53)\nThe actor died unexpectedly.\n"
                    "The actor never ran - it was cancelled before it started running.\n")
    u = fake_trial("aaa00010", MIXUP)
    u.error_file = str(text)
    u.get_pickled_error = lambda: (_ for _ in ()).throw(FileNotFoundError("not copied yet"))
    cb.on_trial_error(0, [u], u)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("failed: ValueError: in two lines")
    assert lines[1].endswith("failed: The actor never ran - it was cancelled before it started running.")


def test_unreadable_error_points_at_the_error_file(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    t = fake_trial("aaa00006", MIXUP)
    t.get_pickled_error = lambda: (_ for _ in ()).throw(OSError("gone"))
    cb.on_trial_error(0, [t], t)
    assert out.getvalue().strip().endswith("failed: see /x/aaa00006/error.txt")


def test_one_line_per_trial_even_when_tune_reports_its_end_twice(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    t = fake_trial("aaa00007", MIXUP)
    feed(cb, t, curve(0.5, 0.6, 0.65))
    cb.on_trial_complete(0, [t], t)
    cb.on_trial_complete(0, [t], t)
    cb.on_trial_error(0, [t], t)
    assert len(out.getvalue().splitlines()) == 1


def test_confirmation_trial_shows_its_label_and_the_mean_over_seeds(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)
    values = {**space.base_values, "label_smoothing": 0.05}
    t = fake_trial("bbb00001", {"entry": {"label": "candidate 1", "role": "candidate", "values": values}})
    for rep, accs in enumerate([(0.5, 0.6, 0.90), (0.5, 0.7, 0.80), (0.4, 0.6, 0.70)]):
        feed(cb, t, curve(*accs, repeat=rep, seed=1000 + rep))
    cb.on_trial_complete(0, [t], t)
    line = out.getvalue().strip()
    assert "candidate 1: label_smoothing=0.05  " in line  # only what differs from the baseline
    assert "val_acc 0.8000" in line and "epochs 3/3" in line and line.endswith("done (mean of 3 seeds)")
    base = fake_trial("bbb00002", {"entry": {"label": "baseline", "role": "baseline", "values": space.base_values}})
    feed(cb, base, curve(0.5, 0.6, 0.6))
    cb.on_trial_complete(0, [base], base)
    assert out.getvalue().splitlines()[1].startswith("trial bbb00002  baseline  val_acc 0.6000")


def test_results_from_before_a_resume_come_from_the_trial(space):
    out = io.StringIO()
    cb = TrialLines(space, stream=out)  # a new driver: it saw none of the trial's results
    t = fake_trial("aaa00008", MIXUP)
    t.last_result = {"epoch": 3, "val_acc": 0.75}
    cb.on_trial_complete(0, [t], t)
    assert "val_acc 0.7500  epochs 3/3  done" in out.getvalue()


def test_short_names():
    paths = ["mix.mode", "mix.mixup_alpha", "optimizer.base_lr", "augment.randaugment.magnitude",
             "a.x.size", "b.y.size", "model.name"]
    assert short_names(paths) == {
        "mix.mode": "mix.mode", "mix.mixup_alpha": "mixup_alpha", "optimizer.base_lr": "base_lr",
        "augment.randaugment.magnitude": "magnitude", "a.x.size": "x.size", "b.y.size": "y.size",
        "model.name": "model.name",
    }


@pytest.mark.slow
def test_lines_from_a_real_tuner_with_asha(ray_address, tmp_path, space, capsys):
    """Tune's own Trial objects and hooks: an ASHA-stopped trial, a finished one."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    curves = {"mixup": [0.2, 0.3, 0.35], "none": [0.6, 0.8, 0.75]}

    def trainable(config: dict[str, Any]) -> None:
        for i, acc in enumerate(curves[config["mix.mode"]]):
            tune.report({"epoch": i + 1, "val_acc": acc})

    out = io.StringIO()
    tuner = tune.Tuner(
        trainable,
        param_space={"mix.mode": tune.grid_search(["none", "mixup"]), "label_smoothing": 0.1},
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=3, grace_period=1,
                                    reduction_factor=2),
            max_concurrent_trials=1,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="lines", callbacks=[TrialLines(space, out)],
                                  verbose=0),
    )
    tuner.fit()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    done = next(ln for ln in lines if "mix.mode=none" in ln)
    stopped = next(ln for ln in lines if "mix.mode=mixup" in ln)
    assert "val_acc 0.7500  epochs 3/3  done" in done
    assert "val_acc 0.2000  epochs 1/3  stopped early by ASHA" in stopped


# Ray's console --------------------------------------------------------------------------------------
def test_quiet_ray_console_drops_only_the_default_token_warning(monkeypatch):
    from trainable.cluster import QUIET_WORKER_LINES, SKIP_LINES_ENV, quiet_ray_console

    monkeypatch.delenv(SKIP_LINES_ENV, raising=False)
    quiet_ray_console()
    quiet_ray_console()  # twice is harmless
    assert os.environ[SKIP_LINES_ENV] == QUIET_WORKER_LINES
    log = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def kept(msg: str) -> bool:
        rec = log.makeRecord(log.name, logging.WARNING, __file__, 1, msg, (), None)
        return log.filter(rec)

    assert not kept("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.")
    assert kept("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    assert len([f for f in log.filters if type(f).__name__ == "_DropMessages"]) == 1


def test_lines_that_look_like_failures_are_dropped_and_nothing_else():
    """The exact lines Ray 2.60 prints for every trial of a search where nothing failed."""
    from ray._private.ray_logging import LogDeduplicator

    from trainable.cluster import QUIET_WORKER_LINES

    noise = [
        ("[2026-11-29 23:23:42,375 E 3047 3103] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
         "and ID: 'bc230c28592618b9a561028f01000000' has constructor arguments in the object store and "
         "max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart "
         "will fail. See https://github.com/ray-project/ray/issues/53727 for more details."),
        ("Detected that the Ray Train controller actor (436118b7b35968db389ae9ac01000000) is dead. Cleaning up "
         "placement group = [PlacementGroupID(3d96fc033ab64d84574c0cc81c1b01000000)] created by this run."),
        ("WARNING: 8 PYTHON worker processes have been started on node: 3b66fba6 with address: 192.0.2.2, which is "
         "4x the maximum expected startup concurrency (2)."),
    ]
    kept = [
        noise[0].replace("PreemptionWatcher", "MyActor"),
        "Detected that the placement group is gone",
        "epoch 1/3 val_acc 0.5",
        "ValueError: a real failure",
    ]
    dedup = LogDeduplicator(5, None, QUIET_WORKER_LINES)
    out = dedup.deduplicate({"ip": "1", "pid": 2, "lines": [*noise, *kept]})
    printed = [ln for batch in out for ln in batch["lines"]]
    assert printed == kept


def test_quiet_ray_console_reaches_a_driver_that_imported_ray_already(monkeypatch):
    import ray._private.ray_logging as rl

    from trainable.cluster import QUIET_WORKER_LINES, SKIP_LINES_ENV, quiet_ray_console

    monkeypatch.setattr(rl.stderr_deduplicator, "skip_re", None)
    monkeypatch.setattr(rl.stdout_deduplicator, "skip_re", None)
    monkeypatch.delenv(SKIP_LINES_ENV, raising=False)
    quiet_ray_console()
    assert rl.stderr_deduplicator.skip_re.pattern == QUIET_WORKER_LINES
    mine = re.compile("mine")
    monkeypatch.setattr(rl.stderr_deduplicator, "skip_re", mine)
    quiet_ray_console()
    assert rl.stderr_deduplicator.skip_re is mine  # a user's own pattern is left alone


def test_worker_reports_are_not_logged_at_info(monkeypatch):
    """Ray Train logs each report (metrics and all) through a logger named by its file."""
    import ray.train.v2._internal.execution.context as ctx

    from trainable.train import _quiet_worker_logs

    logger = logging.getLogger(ctx.__file__)
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    assert ctx.logger is logger and logger.isEnabledFor(logging.INFO) == logging.getLogger().isEnabledFor(logging.INFO)
    _quiet_worker_logs()
    assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)


def test_building_a_trainer_imports_no_training_loop():
    """A search trial's driver builds the TorchTrainer; torchvision and the loop are the
    workers' business (seconds of imports per trial otherwise)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from trainable.config import TrainConfig\n"
        "from trainable.train import build_trainer\n"
        "t = build_trainer(TrainConfig.model_validate({'data': {'kind': 'digits'}}), 'x', sys.argv[1])\n"
        "bad = [m for m in ('torchvision', 'trainable.loop', 'trainable.data', 'sklearn') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code, "/tmp/unused"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr


# 'did you mean' ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, expected, wrong",
    [
        ("train.model.name=resnet50vd", "did you mean 'resnet50_vd'?", "train.resnet50_vd"),  # a model, not a key
        ("train.model.name=resnet18d", "did you mean 'resnet18_vd'?", "train.resnet18_vd"),
        ("train.mix.mdoe=cutmix", "did you mean 'train.mix.mode'?", None),
        ("train.modle.name=resnet18_vd", "did you mean 'train.model'?", None),
        ("train.label_smothing=0.1", "did you mean 'train.label_smoothing'?", None),
    ],
)
def test_hints_name_real_key_paths_or_values(tmp_path, override, expected, wrong):
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    with pytest.raises(SpaceError) as err:
        load_space(path, [override])
    msg = str(err.value)
    assert expected in msg and "\n" not in msg
    if wrong:
        assert wrong not in msg
    hint = re.search(r"did you mean '([^']+)'", msg)[1]
    if hint.startswith("train."):  # a key path: it must exist
        from trainable.config import LEAF_PATHS

        key = hint.removeprefix("train.")
        assert key in LEAF_PATHS or any(p.startswith(key + ".") for p in LEAF_PATHS)


# Ray settings for short runs ---------------------------------------------------------------------------
def test_connect_hands_ray_settings_to_a_joined_cluster_and_keeps_the_users(monkeypatch):
    import ray

    from trainable import cluster

    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        calls.append(kwargs)
        if kwargs.get("address") == "auto":
            raise ConnectionError("no cluster here")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key in cluster.RAY_SETTINGS:
        monkeypatch.delenv(key, raising=False)
    assert cluster.RAY_SETTINGS["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"
    cluster.connect()
    for key, value in cluster.RAY_SETTINGS.items():
        assert os.environ[key] == value  # a new local instance inherits them
    assert calls[0]["runtime_env"] == {"env_vars": dict(cluster.RAY_SETTINGS)}  # a cluster joined gets them
    assert "runtime_env" not in calls[1]  # the new local instance
    calls.clear()
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    cluster.connect("local", runtime_env={"env_vars": {"A": "1"}, "pip": ["x"]})
    assert calls[0]["runtime_env"]["env_vars"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"  # the user's value
    assert calls[0]["runtime_env"]["env_vars"]["A"] == "1" and calls[0]["runtime_env"]["pip"] == ["x"]


# The console for people: header, progress per phase, trial lines, summaries, answer ------------------------
def _rendered(text: str) -> list[str]:
    """The lines a terminal shows after `text`: a status line redrawn in place (`\\r`, erase)
    leaves only its last state, or nothing once erased."""
    out = []
    for raw in text.split("\n"):
        shown = raw.rsplit("\r", 1)[-1].replace("\x1b[K", "")
        out.append(shown)
    while out and out[-1] == "":
        out.pop()
    return out


class FakeTrial(SimpleNamespace):
    pass


def _trials(states: list[str], phase: str = "console") -> list[FakeTrial]:
    return [FakeTrial(trial_id=f"t{i}", status=s, config={"label_smoothing": 0.1}, last_result={},
                      experiment_dir_name=phase) for i, s in enumerate(states)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_eta_from_the_trial_times_measured_so_far():
    from search.phases.console import clock_time, eta_seconds

    assert eta_seconds([], [5.0], 3, 2) is None  # nothing measured yet
    # 2 at a time, trials of 60 s on average: 3 to go (180 s of work) and one running for 20 s (40 s left)
    assert eta_seconds([40.0, 80.0], [20.0], 3, 2) == pytest.approx((180 + 40) / 2)
    assert eta_seconds([40.0], [90.0], 0, 1) == 0.0  # a running trial past the mean: nothing more counted
    assert clock_time(65) == "1:05" and clock_time(3725) == "1:02:05" and clock_time(-3) == "0:00"


def _answer_for_console(**changes: Any) -> dict[str, Any]:
    row = {"label": "candidate 1", "role": "candidate", "mean": 0.96, "ci95": [0.95, 0.97], "changed": ["mix.mode"],
           "unstable_seeds": [], "vs_baseline": {"delta": 0.03, "ci95": [0.025, 0.035], "std": 0.002, "n": 3}}
    shaky = {**row, "label": "candidate 2", "mean": 0.955, "unstable_seeds": [1002], "vs_baseline": None,
             "changed": ["label_smoothing"]}
    base = {**row, "label": "baseline", "role": "baseline", "mean": 0.93, "changed": [], "vs_baseline": None}
    answer = {"message": "Winner: candidate 1 (mix.mode), val_acc 96.00%.", "verdict": "winner", "state": "finished",
              "verdict_reason": None, "weak": False, "confirm": [row, shaky, base], "ablation": [],
              "ablation_note": None, "notes": ["the gain over the baseline is adjusted for its selection."],
              "failed": None}
    return {**answer, **changes}


def test_the_answer_block_shows_the_answer_fields(tmp_path):
    from search.experiment.folder import Experiment
    from search.phases.console import answer_block

    exp = Experiment.at(str(tmp_path / "exp"))
    lines = answer_block(_answer_for_console(), exp).splitlines()
    assert lines[0] == "answer: Winner: candidate 1 (mix.mode), val_acc 96.00%."
    assert "  candidate 1  0.9600 [0.9500, 0.9700]  vs baseline +0.0300 [+0.0250, +0.0350]  mix.mode" in lines
    assert ("  candidate 2  0.9550 [0.9500, 0.9700]  unstable (seed 1002), never the answer  label_smoothing"
            in lines)
    assert "  baseline     0.9300 [0.9500, 0.9700]  (no trick changed)" in lines
    assert "  note: the gain over the baseline is adjusted for its selection." in lines
    assert not any(ln.startswith(("  not final", "  unconfirmed", "  weak", "  ablation:", "failed:")) for ln in lines)
    failed = {"count": 1, "of": 8, "line": "1 of 8 search trials failed: t3 (failed): DataError: bad image."}
    stale = "the recorded ablation was planned for another config than the winner (candidate 1)"
    lines = answer_block(_answer_for_console(
        message="Unconfirmed: the best search trial scored val_acc 90.00% on one seed.", verdict="unconfirmed",
        verdict_reason="no config finished every confirmation seed", state="ablating", weak=True,
        ablation_note=stale, failed=failed), exp).splitlines()
    assert "  not final: the experiment is ablating, so this answer may still change" in lines
    assert "  unconfirmed: no config finished every confirmation seed" in lines
    assert "  weak: fewer than 3 seeds, the intervals are wide" in lines
    assert f"  ablation: {stale}" in lines
    assert f"failed:     {failed['line']}" in lines
    assert lines[-1].startswith("export it:")
    # the reason and weakness are said once: not again when the message says them
    lines = answer_block(_answer_for_console(message="Unconfirmed: one seed. Weak: only 2 seeds.", verdict="unconfirmed",
                                             verdict_reason="one seed", weak=True), exp).splitlines()
    assert not any(ln.startswith(("  unconfirmed", "  weak")) for ln in lines)


@pytest.mark.parametrize("tty", [False, True])
def test_progress_of_a_phase(space, tty, monkeypatch):
    from search.phases.console import PhaseProgress

    monkeypatch.setenv("COLUMNS", "80")
    out, clock = io.StringIO(), Clock()
    cb = PhaseProgress(space, stream=out, tty=tty, interval=60.0, clock=clock)
    cb.setup(total_num_samples=4)
    trials = _trials(["RUNNING", "RUNNING"])
    for t in trials:
        cb.on_trial_start(0, trials, t)
    clock.now += 30
    cb.on_step_end(0, trials)
    trials[0].status = "TERMINATED"
    feed(cb, trials[0], curve(0.5, 0.6, 0.7))
    cb.on_trial_complete(0, trials, trials[0])  # measured: 30 s
    trials.append(FakeTrial(trial_id="t2", status="RUNNING", config={}, last_result={}, experiment_dir_name="console"))
    cb.on_trial_start(0, trials, trials[2])
    clock.now += 61
    cb.on_step_end(0, trials)
    status = cb.status(trials)
    # 1 done, 2 running (t1 for 91 s, past the 30 s mean; t2 for 61 s), 1 to go: 30 s of work on 2 slots
    if tty:
        assert status == "search [###.........] 1/4 done, ETA 0:15, 1:31 elapsed, 2 running, 1 to go"
        assert "\r\x1b[K" + status in out.getvalue()  # drawn in place
        assert all(len(part) <= 79 for part in out.getvalue().split("\r\x1b[K"))  # never wrapped by the terminal
    else:
        assert status == "search: 1/4 done, 2 running, 1 to go, 1:31 elapsed, ETA 0:15"
    for t in trials[1:]:
        t.status = "TERMINATED"
        feed(cb, t, curve(0.4))
        cb.on_trial_complete(0, trials, t)
    cb.on_experiment_end(trials)
    shown = _rendered(out.getvalue())
    assert shown[0] == "search: 4 trials"
    assert shown[-1] == ("search ended after 1:31: 3 trials, 1 ran all their epochs, 2 stopped early by ASHA; "
                         "best val_acc 0.7000 (trial t0)")
    if tty:  # the bar was redrawn in place and erased at the end
        assert len(shown) == 2 and "ETA after the first trial" in out.getvalue()
    else:  # the first ETA as soon as a trial ended, then one plain line a minute
        assert shown[1:-1] == ["search: 1/4 done, 2 running, 1 to go, 0:30 elapsed, ETA 0:30",
                               "search: 1/4 done, 2 running, 1 to go, 1:31 elapsed, ETA 0:15"]
        assert "\r" not in out.getvalue()


def test_trial_lines_go_above_the_status_line(space):
    from search.phases.console import LIVE, PhaseProgress

    out = io.StringIO()
    progress = PhaseProgress(space, stream=out, tty=True, clock=Clock())
    lines = TrialLines(space, stream=out)
    progress.setup(total_num_samples=2)
    trials = _trials(["RUNNING", "RUNNING"])
    progress.on_trial_start(0, trials, trials[0])
    feed(lines, trials[0], curve(0.5, 0.6, 0.7))
    trials[0].status = "TERMINATED"
    lines.on_trial_complete(0, trials, trials[0])
    text = out.getvalue()
    assert text.endswith(LIVE.text) and LIVE.text.startswith("search [")  # redrawn under the trial's line
    assert _rendered(text)[:2] == ["search: 2 trials", "trial t0  label_smoothing=0.1  val_acc 0.7000  epochs 3/3  done"]
    progress.on_experiment_end(trials)
    assert LIVE.text == ""


def _console_launch(cfg, name: str, runs_path: str) -> None:
    """A fake run: a curve rising to a final val_acc that mixup and smoothing raise, per seed."""
    from ray import tune

    final = 0.8 + 0.05 * (cfg.mix.mode == "mixup") + 0.3 * cfg.label_smoothing + 0.002 * (cfg.run.seed % 3)
    for repeat in range(cfg.run.repeats):
        for epoch in range(1, cfg.run.epochs + 1):
            tune.report({"epoch": epoch, "val_acc": final * epoch / cfg.run.epochs,
                         "seed": cfg.run.seed + repeat, "repeat": repeat})


def _run_console(space, exp, sets, callbacks) -> SimpleNamespace:
    """The CLI's path through the phases with the fake run: search, confirmation, ablation, answer."""
    from ray import tune

    from search.experiment.folder import record_space
    from search.experiment.study import make_searcher
    from search.experiment.trials import summarise
    from search.phases.console import ray_verbosity
    from search.phases.schedulers import make_scheduler
    from search.phases.trial import run_trial
    from search.run import run_confirmation, write_answer

    record_space(exp, space, sets)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, space=space, runs_path=exp.runs, launch=_console_launch),
                            {"CPU": 0, "memory": 2**20}),
        tune_config=tune.TuneConfig(search_alg=make_searcher(space, exp.study_db), scheduler=make_scheduler(space, exp),
                                    num_samples=space.experiment.num_samples, max_concurrent_trials=8),
        run_config=tune.RunConfig(name=exp.name, storage_path=exp.storage, verbose=ray_verbosity(callbacks),
                                  callbacks=[TrialLines(space), *callbacks]),
    )
    rows = summarise(tuner.fit(), space)
    run_confirmation(space, exp, rows, concurrent=8, callbacks=callbacks, launch=_console_launch)
    return SimpleNamespace(rows=rows, answer=write_answer(exp, space))


@pytest.mark.slow
def test_the_whole_console_of_a_quickstart_shaped_search(ray_address, tmp_path, capsys, monkeypatch):
    """The quickstart's shape (10 trials, ASHA, 2 candidates and the baseline on 3 seeds, an
    ablation) with a fake run: the console is the header, each phase's title, one line per
    ended trial, its progress and summary, and the answer; nothing of Ray's, at most 80
    lines. The terminal's bar is checked on a second stream fed by the same Tune runs."""
    from search.experiment.folder import experiment_for
    from search.phases.console import (
        LIVE,
        NEW_OUTPUT_ENV,
        QUIET_LOGGERS,
        PhaseProgress,
        answer_block,
        configure_console,
        header,
    )
    from spaces import QUICKSTART
    from trainable.cluster import SKIP_LINES_ENV

    sets = [f"experiment.storage_path={tmp_path}", "experiment.name=console", "train.run.epochs=4",
            "experiment.sampler={kind: random, seed: 1}", "search.batch.global_batch=null"]
    space = load_space(QUICKSTART, sets)
    exp = experiment_for(space)
    for key in (NEW_OUTPUT_ENV, SKIP_LINES_ENV):
        monkeypatch.delenv(key, raising=False)  # restored at the end
    names = ["", "search", "spaces", "trainable", *QUIET_LOGGERS]
    levels, handlers = {n: logging.getLogger(n).level for n in names}, list(logging.getLogger().handlers)
    configure_console(verbose=False)
    tty = io.StringIO()
    plain = PhaseProgress(space, tty=False, interval=10.0)  # on stdout, as the CLI's
    bar = PhaseProgress(space, stream=tty, tty=True)
    try:
        print(header(space, exp))
        outcome = _run_console(space, exp, sets, [plain, bar])
        print(answer_block(outcome.answer, exp))
    finally:
        logging.getLogger().handlers[:] = handlers
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
    captured = capsys.readouterr()
    console = captured.out + captured.err
    lines = console.splitlines()
    assert len(lines) <= 80, console
    assert lines[0].startswith("experiment: console") and f"tensorboard --logdir {exp.path}" in console
    assert f"optuna-dashboard sqlite:///{exp.study_db}" in console
    seeds = len(space.confirm_seeds)
    n_confirm = seeds * (space.experiment.confirm.top_k + 1)
    trial_lines = [ln for ln in lines if ln.startswith("trial ")]
    assert len([ln for ln in trial_lines if " seed " not in ln]) == space.experiment.num_samples  # every search trial
    assert len([ln for ln in trial_lines if ("candidate" in ln or "baseline" in ln) and " seed " in ln]) == n_confirm
    later = [ln for ln in trial_lines if " seed " in ln and f" seed {space.confirm_seeds[0]}" not in ln]
    assert later and not any("=" in ln for ln in later)  # a config's values once, on its first seed's line
    for phase, n in (("search", space.experiment.num_samples), ("confirmation", n_confirm)):
        assert f"{phase}: {n} {'trials' if phase == 'search' else 'runs'}" in lines
        assert any(ln.startswith(f"{phase} ended after ") for ln in lines)
        assert any(re.match(rf"{phase}: \d+/{n} done, \d+ running, \d+ to go, \d+:\d\d elapsed, ETA ", ln)
                   for ln in lines), phase
    assert any(ln.startswith("answer: ") for ln in lines)
    assert lines[-1].startswith("export it:")
    # nothing of Ray's or of libraries: no tables, config boxes, result dicts or stray lines
    known = ("experiment:", "space:", "results:", "watch:", "study:", "trial ", "search", "confirmation",
             "ablation", "answer:", "  ", "report:", "export it:")
    assert [ln for ln in lines if not ln.startswith(known)] == []
    assert not re.search(r"╭|│|\+-{3,}|Trial status|'trick': |View detailed results|fontManager", console)
    # the terminal: the bar was drawn per phase and erased; what stays is the same lines
    assert "confirmation [" in tty.getvalue() and LIVE.text == ""
    shown = _rendered(tty.getvalue())
    assert [ln for ln in shown if not ln.startswith(("search", "confirmation", "ablation"))] == []
    assert [ln for ln in shown if " ended after " in ln] == [ln for ln in lines if " ended after " in ln]


def test_without_verbose_worker_lines_stay_off_the_console_but_failures_do_not():
    from ray._private.ray_logging import LogDeduplicator

    from search.phases.console import SHUTDOWN_LINES, WORKER_LINES
    from trainable.cluster import QUIET_WORKER_LINES

    dedup = LogDeduplicator(5, None, f"{QUIET_WORKER_LINES}|{SHUTDOWN_LINES}|{WORKER_LINES}")
    lines = ["epoch 1/5  val_acc 0.5123  val_loss 1.2  train_loss 1.5  lr 0.1  812 img/s",
             "Setting up process group for: env:// [rank=0, world_size=2]",
             # a trial driver's interpreter shutting down after Tune ended it: no failure
             "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7fea2cec2520>",
             "Traceback (most recent call last):",
             "    raise_sys_exit_with_custom_error_message(",
             '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
             "ValueError: a real failure", "worker killed: out of memory"]
    out = dedup.deduplicate({"ip": "1", "pid": 2, "lines": lines})
    assert [ln for batch in out for ln in batch["lines"]] == lines[-2:]
