"""Tests for spaces/ (the space format and its loader) and search/sampling.py (Optuna)."""

from __future__ import annotations

import copy
import hashlib
import pickle
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from search.experiment.sampling import define_by_run, make_sampler, sampled_values
from spaces import (
    QUICKSTART,
    Space,
    SpaceError,
    list_spaces,
    load_space,
    resolve_space_path,
)
from trainable.config import ConfigError, TrainConfig
from trainable.storage import expand_storage

optuna.logging.set_verbosity(optuna.logging.WARNING)

BASE: dict[str, Any] = {
    "experiment": {
        "name": "t",
        "num_samples": 4,
        "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 3},
        "sampler": {"kind": "random", "seed": 0},
    },
    "train": {
        "model": {"name": "resnet18_vd", "small_input": True},
        "data": {"kind": "digits", "image_size": 32},
        "batch": {"global_batch": 64, "micro_batch": 32},
        "distributed": {"num_workers": 2},
        "run": {"epochs": 3},
    },
    "search": {
        "mix.mode": {"choice": ["none", "mixup", "cutmix", "mixup_cutmix"]},
        "mix.mixup_alpha": {"uniform": [0.1, 0.4], "when": {"mix.mode": ["mixup", "mixup_cutmix"]}},
        "mix.cutmix_alpha": {"uniform": [0.5, 1.0], "when": {"mix.mode": ["cutmix", "mixup_cutmix"]}},
        "label_smoothing": {"uniform": [0.0, 0.2]},
        "augment.randaugment.magnitude": {"int": [0, 15], "step": 3},
        "batch.global_batch": {"choice": [64, 128, 256]},
        "optimizer.base_lr": {"loguniform": [0.05, 1.0]},
    },
}


def write_space(tmp_path: Path, data: Any, name: str = "space.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


def edited(**changes: Any) -> dict[str, Any]:
    """BASE with `section.key.path=value` changes (search keys: `search:<key.path>`),
    a value of `...` deleting the key."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        if dotted.startswith("search:"):
            node, last = data["search"], dotted.removeprefix("search:")
        else:
            *parents, last = dotted.split(".")
            node = data
            for part in parents:
                node = node.setdefault(part, {})
        if value is ...:
            node.pop(last, None)
        else:
            node[last] = value
    return data


def load_error(tmp_path: Path, data: Any, overrides: list[str] | None = None) -> str:
    p = write_space(tmp_path, data)
    with pytest.raises(SpaceError) as info:
        load_space(p, overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(f"{p}: "), msg
    assert isinstance(info.value, ConfigError)
    return msg


# Shipped spaces ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["quickstart", "imagenet_r50vd"])
def test_shipped_spaces_load(name: str) -> None:
    path = resolve_space_path(name)
    assert path.name == f"{name}.yaml" and path.is_file()
    space = load_space(path)
    assert space.experiment.name == name
    assert space.sha256 == hashlib.sha256(path.read_text().encode()).hexdigest()
    assert space.source == str(path)
    assert {"mix.mode", "mix.mixup_alpha", "batch.global_batch", "augment.randaugment.enabled"} <= set(space.search)
    # the baseline is the train section: every searched trick off
    base = space.base_values
    assert base["mix.mode"] == "none" and base["label_smoothing"] == 0.0
    assert base["augment.randaugment.enabled"] is False
    assert space.confirmed and space.experiment.ablate
    assert space.production["data.subset"] == 1.0 and space.production["run.epochs"] > space.train.run.epochs
    # every global-batch choice is reachable with accumulation on this cluster shape
    for gb in space.search["batch.global_batch"].values or []:
        cfg = space.config_for({"batch.global_batch": gb})
        assert cfg.accum_steps * cfg.batch.micro_batch * cfg.distributed.num_workers == gb


def test_quickstart_is_the_laptop_default() -> None:
    space = load_space(QUICKSTART)
    assert resolve_space_path("quickstart") == QUICKSTART
    assert set(list_spaces()) >= {"quickstart", "imagenet_r50vd"}
    t = space.train
    assert t.data.kind == "digits" and not t.model.small_input and t.data.image_size == 16
    assert t.distributed.num_workers == 1 and not t.distributed.use_gpu and t.data.subset == 1.0
    assert space.experiment.confirm.seeds >= 3 and space.experiment.scheduler.schedule == "rung"
    assert space.experiment.scheduler.kind == "asha" and space.experiment.sampler.kind == "tpe"
    assert space.experiment.max_concurrent_trials is None  # as many as fit: 2 on 2 cores
    assert space.experiment.num_samples == 8 and t.model.name == "resnet18_vd"
    assert space.rung_epochs() == [2] and t.run.epochs == 4  # a rung ASHA decides at, then the end
    assert space.experiment.mode == "max" and space.experiment.metric == "val_acc"


def test_imagenet_reference_study() -> None:
    space = load_space(resolve_space_path("imagenet_r50vd"))
    t = space.train
    assert t.model.name == "resnet50_vd" and not t.model.small_input
    assert t.data.kind == "imagefolder" and t.data.image_size == 224
    assert t.distributed.num_workers == 8 and t.distributed.use_gpu
    assert t.schedule.name == "cosine" and t.schedule.warmup_epochs < space.experiment.scheduler.grace_period
    assert space.search["batch.global_batch"].values == [256, 512, 1024, 2048]
    assert expand_storage(space.experiment.storage_path).startswith("s3://")


def test_readme_example_space_is_an_imagenet_style_search(tmp_path: Path) -> None:
    """The space a user writes from the README's example loads as is and trains sanely:
    the library defaults fill what it leaves out, not the CPU quickstart's settings."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Search spaces", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    space = load_space(write_space(tmp_path, yaml.safe_load(block)))
    t = space.train
    assert t.model.name == "resnet50_vd" and t.model.small_input is False
    assert t.augment.hflip == 0.5 and t.augment.crop_scale == (0.08, 1.0)
    assert t.data.loader_workers == "auto" and t.distributed.use_gpu is True
    for gb in space.search["batch.global_batch"].values:
        assert space.config_for({"batch.global_batch": gb}).accum_steps == gb // 256


def test_resolve_space_path(tmp_path: Path) -> None:
    p = write_space(tmp_path, BASE, "mine.yaml")
    assert resolve_space_path(p) == p
    assert resolve_space_path(str(p)) == p
    with pytest.raises(SpaceError, match="quickstat: no such space.*did you mean 'quickstart'"):
        resolve_space_path("quickstat")
    with pytest.raises(SpaceError, match="no such file"):
        resolve_space_path(tmp_path / "missing.yaml")


def test_storage_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    space = load_space(QUICKSTART)
    assert expand_storage(space.experiment.storage_path) == str(Path("~/trick-search").expanduser())
    monkeypatch.chdir(tmp_path)
    assert expand_storage("runs/x") == f"{tmp_path}/runs/x"  # relative folders become absolute
    assert expand_storage("s3://bucket/exp/") == "s3://bucket/exp"  # URIs as given, no trailing slash
    assert expand_storage("gs://b") == "gs://b"


# --set overrides -------------------------------------------------------------------------------
def test_overrides(tmp_path: Path) -> None:
    p = write_space(tmp_path, BASE)
    space = load_space(
        p,
        [
            "experiment.num_samples=7",
            "train.run.epochs=2",
            "search.label_smoothing={uniform: [0.0, 0.1]}",
            "search.mix.mode={choice: [none, cutmix]}",
            "search.mix.mixup_alpha=null",
            "search.mix.cutmix_alpha={uniform: [0.3, 0.6], when: {mix.mode: cutmix}}",
            "search.optimizer.nesterov={choice: [true, false]}",
        ],
    )
    assert space.experiment.num_samples == 7
    assert space.train.run.epochs == 2
    assert space.search["label_smoothing"].high == 0.1
    assert space.search["mix.mode"].values == ["none", "cutmix"]
    assert "mix.mixup_alpha" not in space.search
    assert space.search["mix.cutmix_alpha"].when == {"mix.mode": ["cutmix"]}
    assert list(space.search)[-1] == "optimizer.nesterov"
    assert space.search["optimizer.nesterov"].values == [True, False]
    # the hash is of the file as read, before the overrides
    assert space.sha256 == hashlib.sha256(p.read_text().encode()).hexdigest()
    assert space.overrides[0] == "experiment.num_samples=7"
    # the file itself is untouched
    assert yaml.safe_load(p.read_text()) == BASE


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("search.mix.mdoe={choice: [none]}", ["search.mix.mdoe: unknown key path", "did you mean 'mix.mode'?"]),
        ("train.run.epochs=0", ["train.run.epochs:", "greater than or equal to 1"]),
        ("experiment.num_samples=0", ["experiment.num_samples:", "greater than or equal to 1"]),
        ("search.mix.mode=null", ["search.mix.mixup_alpha: when: mix.mode is unsampled"]),
        ("search.label_smoothing={uniform: [0.3, 0.1]}", ["search.label_smoothing:", "low 0.3 must be below high 0.1"]),
        ("search.optimizer.momentum=null", ["search.optimizer.momentum=null", "not searched"]),
        ("search={}", ["expected search.<key.path>"]),
        ("run.epochs", ["expected key.path=value"]),
        ("train.run.epochs=1", ["experiment.scheduler.grace_period"]),
    ],
)
def test_overrides_are_validated_like_the_file(tmp_path: Path, override: str, words: list[str]) -> None:
    data = edited(**{"experiment.scheduler.grace_period": 2})
    msg = load_error(tmp_path, data, [override])
    for w in words:
        assert w in msg, msg


# Bad spaces: one line each, naming the file and the key path ----------------------------------
BAD_CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "unknown section": (
        edited(serach={"mix.mode": {"choice": ["none"]}}),
        ["serach: unknown section", "did you mean 'search'?"],
    ),
    "unknown experiment key": (
        edited(**{"experiment.num_sample": 3}),
        ["experiment.num_sample: unknown key", "did you mean 'experiment.num_samples'?"],
    ),
    "unknown nested experiment key": (
        edited(**{"experiment.scheduler.grace": 3}),
        ["experiment.scheduler.grace: unknown key", "did you mean 'experiment.scheduler.grace_period'?"],
    ),
    "unsafe experiment name": (
        edited(**{"experiment.name": "../evil"}),
        ["experiment.name:", "not a safe folder name"],
    ),
    "unknown metric": (
        edited(**{"experiment.metric": "val_accuracy"}),
        ["experiment.metric:", "not a metric the run reports", "did you mean 'val_acc'?", "val_loss"],
    ),
    "bad mode": (
        edited(**{"experiment.mode": "maximize"}),
        ["experiment.mode:", "must be max or min"],
    ),
    "mode against the metric": (
        edited(**{"experiment.metric": "val_loss", "experiment.mode": "max"}),
        ["experiment.mode 'max' would pick the worst trials", "use mode: min"],
    ),
    "grace period over epochs": (
        edited(**{"experiment.scheduler.grace_period": 5}),
        ["experiment.scheduler.grace_period:", "5 is more than train.run.epochs 3"],
    ),
    "bad train key": (
        edited(**{"train.mix": {"mdoe": "cutmix"}}),
        ["train.mix.mdoe: unknown key", "did you mean 'train.mix.mode'?"],
    ),
    "bad train value": (
        edited(**{"train.label_smoothing": 1.5}),
        ["train.label_smoothing:", "less than 1", "1.5"],
    ),
    "bad train model": (
        edited(**{"train.model": {"name": "resnet51_vd"}}),
        ["train.model.name:", "unknown model 'resnet51_vd'"],
    ),
    "base accumulation": (
        edited(**{"train.batch": {"global_batch": 96, "micro_batch": 32}, "search:batch.global_batch": ...}),
        ["train: batch.global_batch 96 is not a whole multiple", "micro_batch 32", "num_workers 2"],
    ),
    "unknown search key path": (
        edited(**{"search:mix.mdoe": {"choice": ["none"]}}),
        ["search.mix.mdoe: unknown key path", "did you mean 'mix.mode'?"],
    ),
    "search key is a whole section": (
        edited(**{"search:mix": {"choice": ["none"]}}),
        ["search.mix: is a whole section", "mix.mode"],
    ),
    "unknown distribution kind": (
        edited(**{"search:label_smoothing": {"unifrom": [0.0, 0.1]}}),
        ["search.label_smoothing: unknown distribution kind 'unifrom'", "did you mean 'uniform'?"],
    ),
    "two kinds": (
        edited(**{"search:label_smoothing": {"uniform": [0.0, 0.1], "choice": [0.1]}}),
        ["search.label_smoothing: two distribution kinds (uniform, choice)"],
    ),
    "unknown key beside a kind": (
        edited(**{"search:label_smoothing": {"uniform": [0.0, 0.1], "stpe": 0.1}}),
        ["search.label_smoothing: unknown key 'stpe'", "did you mean 'step'?"],
    ),
    "not a mapping": (
        edited(**{"search:label_smoothing": 0.1}),
        ["search.label_smoothing: expected a distribution"],
    ),
    "empty choice": (
        edited(**{"search:mix.mode": {"choice": []}, "search:mix.mixup_alpha": ..., "search:mix.cutmix_alpha": ...}),
        ["search.mix.mode: choice is empty"],
    ),
    "duplicate choice": (
        edited(**{"search:batch.global_batch": {"choice": [64, 128, 64]}}),
        ["search.batch.global_batch: choice value 64 is listed twice"],
    ),
    "low not below high": (
        edited(**{"search:label_smoothing": {"uniform": [0.2, 0.2]}}),
        ["search.label_smoothing: uniform low 0.2 must be below high 0.2"],
    ),
    "loguniform at zero": (
        edited(**{"search:optimizer.base_lr": {"loguniform": [0.0, 1.0]}}),
        ["search.optimizer.base_lr: loguniform needs low > 0"],
    ),
    "loguniform with step": (
        edited(**{"search:optimizer.base_lr": {"loguniform": [0.1, 1.0], "step": 0.1}}),
        ["search.optimizer.base_lr: step is not allowed with loguniform"],
    ),
    "int bounds not integers": (
        edited(**{"search:augment.randaugment.magnitude": {"int": [0.5, 15]}}),
        ["search.augment.randaugment.magnitude: int bounds must be integers"],
    ),
    "step not positive": (
        edited(**{"search:label_smoothing": {"uniform": [0.0, 0.2], "step": 0}}),
        ["search.label_smoothing: step must be a number > 0", "got 0"],
    ),
    "step not dividing the range": (
        edited(**{"search:augment.randaugment.magnitude": {"int": [0, 15], "step": 4}}),
        ["search.augment.randaugment.magnitude:", "not a whole number of steps of 4"],
    ),
    "when on an unknown key": (
        edited(**{"search:mix.mixup_alpha": {"uniform": [0.1, 0.4], "when": {"mix.mdoe": "mixup"}}}),
        ["search.mix.mixup_alpha: when: unknown key path 'mix.mdoe'", "did you mean 'mix.mode'?"],
    ),
    "when on an unsampled key": (
        edited(**{"search:mix.mixup_alpha": {"uniform": [0.1, 0.4], "when": {"mix.prob": 1.0}}}),
        ["search.mix.mixup_alpha: when: mix.prob is unsampled"],
    ),
    "when on itself": (
        edited(**{"search:mix.mixup_alpha": {"uniform": [0.1, 0.4], "when": {"mix.mixup_alpha": 0.2}}}),
        ["search.mix.mixup_alpha: when: mix.mixup_alpha cannot depend on itself"],
    ),
    "when with an impossible choice": (
        edited(**{"search:mix.mixup_alpha": {"uniform": [0.1, 0.4], "when": {"mix.mode": ["mixpu"]}}}),
        ["search.mix.mixup_alpha: when: mix.mode = 'mixpu' is impossible", "'mixup'"],
    ),
    "when outside a range": (
        edited(**{"search:mix.prob": {"uniform": [0.5, 1.0], "when": {"augment.randaugment.magnitude": 16}}}),
        ["search.mix.prob: when: augment.randaugment.magnitude = 16 is impossible", "int [0, 15] step 3"],
    ),
    "when off the step grid": (
        edited(**{"search:mix.prob": {"uniform": [0.5, 1.0], "when": {"augment.randaugment.magnitude": 4}}}),
        ["search.mix.prob: when: augment.randaugment.magnitude = 4 is impossible"],
    ),
    "when on one value of a continuous key": (
        edited(**{"search:mix.prob": {"uniform": [0.5, 1.0], "when": {"label_smoothing": 0.1}}}),
        ["search.mix.prob: when: label_smoothing = 0.1 is impossible", "continuous"],
    ),
    "when cycle": (
        edited(
            **{
                "search:mix.mode": {"choice": ["none", "cutmix"], "when": {"optimizer.nesterov": True}},
                "search:optimizer.nesterov": {"choice": [True, False], "when": {"mix.mode": "cutmix"}},
                "search:mix.mixup_alpha": ...,
                "search:mix.cutmix_alpha": ...,
            }
        ),
        ["search.mix.mode: when conditions form a cycle: mix.mode -> optimizer.nesterov -> mix.mode"],
    ),
    "choice value out of range": (
        edited(**{"search:mix.mode": {"choice": ["none", "mixpu"]}}),
        ["search.mix.mode: value 'mixpu' out of range", "mix.mode:"],
    ),
    "upper bound out of range": (
        edited(**{"search:label_smoothing": {"uniform": [0.0, 1.5]}}),
        ["search.label_smoothing: value 1.5 out of range", "less than 1"],
    ),
    "lower bound out of range": (
        edited(**{"search:augment.randaugment.magnitude": {"int": [-3, 15], "step": 3}}),
        ["search.augment.randaugment.magnitude: value -3 out of range", "greater than or equal to 0"],
    ),
    "yaml boolean for a word": (
        edited(**{"search:distributed.amp": {"choice": [False, "bf16"]}}),
        ["search.distributed.amp: value False out of range", "quote the word"],
    ),
    "uniform on an integer key": (
        edited(**{"search:run.epochs": {"uniform": [1.0, 3.0]}}),
        ["search.run.epochs: uniform gives fractional values", "use int or choice"],
    ),
    "range on a non-number": (
        edited(**{"search:mix.mode": {"int": [0, 3]}, "search:mix.mixup_alpha": ..., "search:mix.cutmix_alpha": ...}),
        ["search.mix.mode: int gives numbers but mix.mode is not a number"],
    ),
    "global batch unreachable": (
        edited(**{"search:batch.global_batch": {"choice": [32, 64, 128]}}),
        [
            "search.batch.global_batch: no accumulation reaches global batch 32",
            "batch.micro_batch 32",
            "distributed.num_workers 2",
        ],
    ),
    "global batch unreachable with a searched micro-batch": (
        edited(**{"search:batch.micro_batch": {"choice": [16, 48]}}),
        ["search.batch.global_batch: no accumulation reaches global batch 64", "micro_batch 48", "num_workers 2"],
    ),
    "global batch unreachable with searched workers": (
        edited(**{"search:distributed.num_workers": {"choice": [1, 2, 4]}}),
        ["search.batch.global_batch: no accumulation reaches global batch 64", "micro_batch 32", "num_workers 4"],
    ),
    "empty search": (
        edited(search={}),
        ["search: empty"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_space(tmp_path: Path, case: str) -> None:
    data, words = BAD_CASES[case]
    msg = load_error(tmp_path, data)
    for w in words:
        assert w in msg, msg


def test_base_case_is_valid(tmp_path: Path) -> None:
    """The BAD_CASES edit a valid space: each error comes from its one edit."""
    space = load_space(write_space(tmp_path, BASE))
    assert space.experiment.mode == "max"
    assert space.experiment.sampler.kind == "random"


def test_searched_workers_and_micro_batch_that_fit(tmp_path: Path) -> None:
    data = edited(
        **{
            "search:distributed.num_workers": {"choice": [1, 2]},
            "search:batch.micro_batch": {"choice": [16, 32]},
        }
    )
    space = load_space(write_space(tmp_path, data))
    cfg = space.config_for({"distributed.num_workers": 1, "batch.micro_batch": 16, "batch.global_batch": 256})
    assert cfg.accum_steps == 16


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- a\n- b\n")
    with pytest.raises(SpaceError, match=r"list.yaml: expected a mapping with sections"):
        load_space(p)
    p = tmp_path / "broken.yaml"
    p.write_text("search: {mix.mode: [\n")
    with pytest.raises(SpaceError, match=r"broken.yaml: line"):
        load_space(p)
    with pytest.raises(SpaceError, match="no such file"):
        load_space(tmp_path / "missing.yaml")


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    data = edited(**{"experiment.name": ...})
    space = load_space(write_space(tmp_path, data, "my-study.yaml"))
    assert space.experiment.name == "my-study"


# Ordering, config_for -------------------------------------------------------------------------
def test_searched_paths_put_conditions_first(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    search = data["search"]
    # dependents first in the file
    data["search"] = {k: search[k] for k in ["mix.cutmix_alpha", "label_smoothing", "mix.mixup_alpha", "mix.mode"]}
    space = load_space(write_space(tmp_path, data))
    assert list(space.search) == ["mix.cutmix_alpha", "label_smoothing", "mix.mixup_alpha", "mix.mode"]
    order = space.searched_paths
    assert order == ["label_smoothing", "mix.mode", "mix.cutmix_alpha", "mix.mixup_alpha"]


def test_config_for(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, BASE))
    values = {
        "mix.mode": "cutmix",
        "mix.cutmix_alpha": 0.75,
        "label_smoothing": 0.05,
        "augment.randaugment.magnitude": 9,
        "batch.global_batch": 256,
        "optimizer.base_lr": 0.2,
    }
    cfg = space.config_for(values)
    assert isinstance(cfg, TrainConfig)
    assert cfg.mix.mode == "cutmix" and cfg.mix.cutmix_alpha == 0.75
    assert cfg.mix.mixup_alpha == space.train.mix.mixup_alpha  # not sampled: the base value
    assert cfg.label_smoothing == 0.05 and cfg.augment.randaugment.magnitude == 9
    assert cfg.batch.global_batch == 256 and cfg.accum_steps == 4
    assert cfg.lr == pytest.approx(0.2)
    assert cfg.run.epochs == 3 and cfg.data.kind == "digits"  # the base
    assert space.train.batch.global_batch == 64  # the base is not changed
    with pytest.raises(ConfigError, match="unknown key path 'mix.mdoe'"):
        space.config_for({"mix.mdoe": "cutmix"})
    with pytest.raises(ConfigError, match="label_smoothing"):
        space.config_for({"label_smoothing": 2.0})


# Optuna ------------------------------------------------------------------------------------------
def run_study(
    space: Space, sampler: optuna.samplers.BaseSampler, n: int, fn: Any = None
) -> list[dict[str, Any]]:
    study = optuna.create_study(direction="maximize", sampler=sampler)
    fn = fn or define_by_run(space)

    def objective(trial: optuna.Trial) -> float:
        assert fn(trial) is None
        return float(trial.params.get("label_smoothing", 0.0)) + trial.params.get("mix.mixup_alpha", 0.0)

    study.optimize(objective, n_trials=n)
    return [t.params for t in study.trials]


def test_define_by_run_conditions(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path, BASE))
    all_params = run_study(space, optuna.samplers.RandomSampler(seed=0), 30)
    modes = set()
    for params in all_params:
        mode = params["mix.mode"]
        modes.add(mode)
        assert ("mix.mixup_alpha" in params) == (mode in ("mixup", "mixup_cutmix")), params
        assert ("mix.cutmix_alpha" in params) == (mode in ("cutmix", "mixup_cutmix")), params
        unconditional = {"mix.mode", "label_smoothing", "augment.randaugment.magnitude",
                         "batch.global_batch", "optimizer.base_lr"}
        assert unconditional <= set(params)
        assert params["augment.randaugment.magnitude"] in range(0, 16, 3)
        assert params["batch.global_batch"] in (64, 128, 256)
        assert 0.05 <= params["optimizer.base_lr"] <= 1.0
        assert 0.1 <= params.get("mix.mixup_alpha", 0.1) <= 0.4
        cfg = space.config_for(params)
        assert cfg.mix.mode == mode and cfg.batch.global_batch == params["batch.global_batch"]
    assert modes == {"none", "mixup", "cutmix", "mixup_cutmix"}


def test_define_by_run_with_dependents_first_in_file(tmp_path: Path) -> None:
    data = copy.deepcopy(BASE)
    data["search"] = dict(reversed(list(data["search"].items())))
    space = load_space(write_space(tmp_path, data))
    for params in run_study(space, optuna.samplers.RandomSampler(seed=1), 20):
        assert ("mix.cutmix_alpha" in params) == (params["mix.mode"] in ("cutmix", "mixup_cutmix"))


def test_define_by_run_is_picklable(tmp_path: Path) -> None:
    """Ray's OptunaSearch pickles its space when it saves its state."""
    space = load_space(write_space(tmp_path, BASE))
    fn = pickle.loads(pickle.dumps(define_by_run(space)))
    again = run_study(space, optuna.samplers.RandomSampler(seed=0), 5, fn=fn)
    assert again == run_study(space, optuna.samplers.RandomSampler(seed=0), 5)
    assert any("mix.mixup_alpha" in p for p in again) or any("mix.cutmix_alpha" in p for p in again)


def test_make_sampler(tmp_path: Path) -> None:
    space = load_space(QUICKSTART)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # experimental warnings are suppressed
        sampler = make_sampler(space)
    assert isinstance(sampler, optuna.samplers.TPESampler)
    # seeded: two studies propose the same trials, TPE phase included
    n = space.experiment.sampler.n_startup_trials + 4
    first = run_study(space, make_sampler(space), n)
    assert first == run_study(space, make_sampler(space), n)
    for params in first:
        assert ("mix.mixup_alpha" in params) == (params["mix.mode"] in ("mixup", "mixup_cutmix"))

    random_space = load_space(write_space(tmp_path, BASE))
    assert isinstance(make_sampler(random_space), optuna.samplers.RandomSampler)


# Ray's format --------------------------------------------------------------------------------------
def test_sampled_values_formats() -> None:
    flat = {"mix.mode": "cutmix", "mix.cutmix_alpha": 0.7, "batch.global_batch": 128}
    assert sampled_values(flat) == flat
    nested = {"mix": {"mode": "cutmix", "cutmix_alpha": 0.7}, "batch": {"global_batch": 128}}
    assert sampled_values(nested) == flat
    slashed = {"mix/mode": "cutmix", "mix/cutmix_alpha": 0.7, "batch/global_batch": 128}
    assert sampled_values(slashed) == flat
    assert sampled_values({**flat, "not_a_key": 1, "trial_meta": {"x": 1}}) == flat


def test_sampled_values_from_ray_optuna_search(tmp_path: Path) -> None:
    optuna_search = pytest.importorskip("ray.tune.search.optuna")
    space = load_space(QUICKSTART)
    searcher = optuna_search.OptunaSearch(
        space=define_by_run(space), metric="val_acc", mode="max", sampler=make_sampler(space)
    )
    for i in range(6):
        config = searcher.suggest(f"trial_{i}")
        values = sampled_values(config)
        assert set(values) == set(searcher._ot_trials[f"trial_{i}"].params)
        assert values == searcher._ot_trials[f"trial_{i}"].params
        cfg = space.config_for(values)
        assert cfg.mix.mode == values["mix.mode"]
        assert cfg.batch.global_batch == values["batch.global_batch"]
        searcher.on_trial_complete(f"trial_{i}", {"val_acc": 0.1 * i, "training_iteration": 1})
    searcher.save(str(tmp_path / "searcher.pkl"))  # the define-by-run function pickles


# The answer's settings -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sets, message",
    [
        (["search.run.epochs={choice: [2, 4]}"], "search.run.epochs: cannot be searched"),
        (["train.run.val_every=2"], "train.run.val_every: 2 with ASHA: a rung would compare stale scores"),
        (["production={run.epoch: 30}"], "production.run.epoch: unknown key path; did you mean 'run.epochs'?"),
        (["production={data.subset: 2.0}"], "production: data.subset"),
        (["experiment.confirm={top_k: 0}"], "experiment.confirm.top_k"),
        (["experiment.scheduler.audit=1.5"], "experiment.scheduler.audit"),
        (["experiment.scheduler.schedule=restart"], "experiment.scheduler.schedule"),
    ],
)
def test_answer_settings_are_checked(sets, message):
    with pytest.raises(SpaceError) as err:
        load_space(QUICKSTART, sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_early_rungs_and_warmup_get_one_line_warnings(caplog):
    from trainable.feasibility import check_space_feasible

    with caplog.at_level("WARNING"):
        space = load_space(QUICKSTART, ["train.schedule.warmup_epochs=2"])
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "warning: experiment.scheduler.grace_period 2 ends with the LR warmup (train.schedule.warmup_epochs 2): "
        "the first rung compares trials at their peak LR, before their cosine anneals"]
    caplog.clear()
    space = load_space(QUICKSTART, ["experiment.scheduler.grace_period=1", "train.data.subset=0.3"])
    with caplog.at_level("WARNING"):
        check_space_feasible(space.train, space.search, space.source, space.rung_epochs()[0])
    (record,) = caplog.records
    assert "first rung (epoch 1) comes after only 3 optimizer updates with batch.global_batch 128" in record.getMessage()
    caplog.clear()
    space = load_space(QUICKSTART)  # the shipped space: none
    with caplog.at_level("WARNING"):
        check_space_feasible(space.train, space.search, space.source, space.rung_epochs()[0])
    assert not caplog.records


def test_tricks_baseline_and_trial_configs():
    space = load_space(QUICKSTART)
    assert space.tricks == {"mix.mode": ["mix.mixup_alpha", "mix.cutmix_alpha"], "label_smoothing": [],
                            "augment.randaugment.enabled": ["augment.randaugment.magnitude"],
                            "batch.global_batch": []}
    assert space.trial_config({"mix.mode": "cutmix"}).schedule.restarts == space.rung_epochs() == [2]
    plain = load_space(QUICKSTART, ["experiment.scheduler.schedule=plain"])
    assert plain.trial_config({"mix.mode": "cutmix"}).schedule.restarts == []
    confirm = space.confirm_config({"mix.mode": "cutmix"})
    assert (confirm.run.seed, confirm.run.repeats, confirm.schedule.restarts) == (1000, 3, [])
