"""TensorBoard's HParams view (`search.phases.hparams`): the columns in the reader's order
with their values' kinds, and one session per trial of every phase, written from fake
trials and read back with TensorBoard's own event reader."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from search.phases.hparams import HParamsCallback, columns
from spaces import QUICKSTART, load_space


def _events(folder: Path) -> list:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return [e for f in sorted(folder.glob("events.out.tfevents.*")) for e in EventFileLoader(str(f)).Load()]


def _plugin_data(folder: Path, tag: str):
    from tensorboard.plugins.hparams import plugin_data_pb2

    for e in _events(folder):
        for v in e.summary.value:
            if v.tag == tag:
                return plugin_data_pb2.HParamsPluginData.FromString(v.metadata.plugin_data.content)
    raise AssertionError(f"no {tag} in {folder}")


def _value(v):
    return getattr(v, v.WhichOneof("kind"))


@pytest.fixture
def written(tmp_path):
    space = load_space(QUICKSTART)
    cb = HParamsCallback(space, str(tmp_path))
    cb.setup()
    base = space.base_values
    trials = [
        SimpleNamespace(trial_id="s1", config={"mix.mode": "mixup", "mix.mixup_alpha": 0.3, "label_smoothing": 0.1,
                                              "augment.randaugment.enabled": True,
                                              "augment.randaugment.magnitude": 12, "batch.global_batch": 64}),
        SimpleNamespace(trial_id="c1_00001", config={"seed": 1001, "entry": {
            "label": "candidate 1", "role": "candidate",
            "values": {**base, "mix.mode": "mixup", "mix.mixup_alpha": 0.3}}}),
        SimpleNamespace(trial_id="a1_00000", config={"seed": 1000, "entry": {
            "label": "without mix.mode", "role": "ablation", "values": dict(base)}}),
    ]
    for t in trials:
        cb.on_trial_result(0, trials, t, {"epoch": 1, "val_acc": 0.5})
        cb.on_trial_result(0, trials, t, {"epoch": 2, "val_acc": 0.7})
        cb.on_trial_complete(0, trials, t)
    return space, tmp_path / "hparams"


def test_the_columns_come_in_the_readers_order_with_their_values_kinds(written):
    from tensorboard.plugins.hparams import api_pb2, metadata

    space, root = written
    infos = _plugin_data(root / "experiment", metadata.EXPERIMENT_TAG).experiment.hparam_infos
    shown = [i.display_name for i in sorted(infos, key=lambda i: i.name)]  # TensorBoard sorts by name
    assert shown == ["mix.mode", "label_smoothing", "augment.randaugment.enabled", "batch.global_batch",
                     "mix.mixup_alpha", "mix.cutmix_alpha", "augment.randaugment.magnitude", "phase", "label", "seed"]
    by_key = {i.display_name: i for i in infos}
    assert by_key["mix.mode"].type == api_pb2.DATA_TYPE_STRING
    assert [_value(v) for v in by_key["mix.mode"].domain_discrete.values] == ["none", "mixup", "cutmix"]
    on_off = by_key["augment.randaugment.enabled"]
    assert on_off.type == api_pb2.DATA_TYPE_BOOL and [_value(v) for v in on_off.domain_discrete.values] == [False, True]
    assert [_value(v) for v in by_key["label_smoothing"].domain_discrete.values] == [0.0, 0.1]  # a numeric choice
    alpha = space.search["mix.mixup_alpha"]  # a range
    assert (by_key["mix.mixup_alpha"].domain_interval.min_value, by_key["mix.mixup_alpha"].domain_interval.max_value) \
        == (alpha.low, alpha.high)
    assert "baseline" in [_value(v) for v in by_key["label"].domain_discrete.values]
    assert [_value(v) for v in by_key["phase"].domain_discrete.values] == ["search", "confirm", "ablate"]
    assert by_key["phase"].type == by_key["label"].type == api_pb2.DATA_TYPE_STRING


def test_every_phase_has_its_sessions_with_phase_label_seed_and_only_the_keys_it_uses(written):
    from tensorboard.plugins.hparams import metadata

    space, root = written
    key_of = {name: key for key, name in columns(space).items()}

    def session(run: str) -> dict:
        start = _plugin_data(root / run, metadata.SESSION_START_INFO_TAG).session_start_info
        return {key_of[k]: _value(v) for k, v in start.hparams.items()}

    search = session("s1")
    assert search["augment.randaugment.enabled"] is True  # a bool, not 1.0
    assert search["phase"] == "search" and search["mix.mode"] == "mixup"
    confirm = session("confirm_c1_00001")
    assert (confirm["phase"], confirm["label"], confirm["seed"]) == ("confirm", "candidate 1", 1001.0)
    assert confirm["mix.mixup_alpha"] == pytest.approx(0.3) and "mix.cutmix_alpha" not in confirm  # not used
    ablation = session("ablate_a1_00000")
    assert (ablation["phase"], ablation["label"]) == ("ablate", "without mix.mode")
    assert "mix.mixup_alpha" not in ablation and ablation["mix.mode"] == space.base_values["mix.mode"]
    scalars = {(v.tag, e.step): v.simple_value if v.HasField("simple_value") else None
               for e in _events(root / "confirm_c1_00001") for v in e.summary.value}
    assert ("hparams/best_val_acc", 2) in scalars
    assert _plugin_data(root / "s1", metadata.SESSION_END_INFO_TAG).session_end_info.status == 1  # success
