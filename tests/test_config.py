"""Tests for trainable/config.py and config_io.py: the TrainConfig contract, its YAML files, its error
messages, overrides and the derived batch values."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from models import list_models
from trainable import config as config_mod
from trainable import config_io
from trainable.config import LEAF_PATHS, ConfigError, TrainConfig
from trainable.config_io import (
    apply_overrides,
    load_config,
    parse_override,
    save_config,
    validate_config,
    write_atomic,
)


def write_yaml(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_error(tmp_path: Path, data: Any, name: str = "bad.yaml") -> tuple[Path, str]:
    """Write `data` to a file, load it, return (path, the ConfigError's message)."""
    path = write_yaml(tmp_path / name, data)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, str(info.value)


def assert_one_line_from(msg: str, path: Path) -> None:
    assert "\n" not in msg and "\r" not in msg, f"not one line: {msg!r}"
    assert msg.startswith(f"{path}: "), f"does not start with the file name: {msg!r}"


def non_default_data() -> dict[str, Any]:
    """A config whose every section differs from the defaults (None values, tuples and the
    nested synthetic section included)."""
    return {
        "model": {"name": "resnet50_vd", "small_input": False, "zero_init_last": False, "pretrained": None},
        "data": {
            "kind": "synthetic",
            "root": None,
            "image_size": 48,
            "val_resize": 56,
            "subset": 0.25,
            "loader_workers": 3,
            "skip_corrupt": True,
            "synthetic": {"num_classes": 7, "train_per_class": 13, "val_per_class": 5},
        },
        "augment": {
            "crop_scale": (0.08, 0.9),
            "hflip": 0.5,
            "color_jitter": {"brightness": 0.4, "contrast": 0.3, "saturation": 0.2},
            "randaugment": {"num_ops": 3, "magnitude": 9},
            "grayscale_prob": 0.1,
            "blur_prob": 0.05,
            "erasing_prob": 0.25,
        },
        "mix": {"mode": "mixup_cutmix", "mixup_alpha": 0.4, "cutmix_alpha": 0.7, "switch_prob": 0.3, "prob": 0.8},
        "label_smoothing": 0.05,
        "optimizer": {
            "name": "lars",
            "momentum": 0.85,
            "nesterov": True,
            "weight_decay": 1e-4,
            "no_bias_decay": False,
            "base_lr": 0.15,
            "lars_trust": 0.02,
        },
        "schedule": {
            "name": "step",
            "warmup_epochs": 2.5,
            "warmup_start_factor": 0.01,
            "min_lr_factor": 0.05,
            "step_milestones": [3, 7],
            "step_gamma": 0.2,
        },
        "batch": {"global_batch": 512, "micro_batch": 16},
        "distributed": {
            "num_workers": 4,
            "use_gpu": True,
            "cpus_per_worker": 0.5,
            "sync_bn": True,
            "amp": "fp16",
            "channels_last": False,
            "max_failures": -1,
        },
        "run": {"epochs": 3, "seed": 17, "checkpoint_every": 2, "val_every": 3, "log_every": 7},
    }


# Defaults ------------------------------------------------------------------------------------
def test_every_leaf_has_a_default() -> None:
    required = [path for path, info in LEAF_PATHS.items() if info.is_required()]
    assert required == []
    for name, info in TrainConfig.model_fields.items():
        assert not info.is_required(), name


def test_default_config_is_an_imagenet_style_run() -> None:
    """What a space written from the README inherits: a real ResNet50-vd training, not the
    CPU quickstart (whose space carries its own small settings)."""
    cfg = TrainConfig()
    assert cfg == TrainConfig.model_validate({}) == validate_config(None) == validate_config({})
    assert cfg.model.name == "resnet50_vd" and cfg.model.small_input is False
    assert cfg.data.image_size == 224
    assert cfg.augment.hflip == 0.5 and cfg.augment.crop_scale == (0.08, 1.0)
    assert cfg.data.loader_workers == "auto"
    assert cfg.optimizer.base_lr == 0.1 and cfg.optimizer.weight_decay == 1e-4
    assert cfg.batch.global_batch == 256
    assert cfg.distributed.use_gpu is False
    assert cfg.accum_steps == cfg.batch.global_batch // (cfg.batch.micro_batch * cfg.distributed.num_workers)


@pytest.mark.parametrize("cpus, workers", [(1, 0), (0.5, 0), (2, 1), (8, 7), (8.5, 7)])
def test_auto_loader_workers_leave_one_cpu_to_training(cpus: float, workers: int) -> None:
    cfg = validate_config({"distributed": {"cpus_per_worker": cpus}})
    assert cfg.loader_workers == workers
    assert validate_config({"data": {"loader_workers": 3}}).loader_workers == 3
    with pytest.raises(ConfigError, match="data.loader_workers: must be auto or 0..64"):
        validate_config({"data": {"loader_workers": 65}})


def test_non_default_data_really_differs_from_defaults_in_every_section() -> None:
    cfg = validate_config(non_default_data())
    default = TrainConfig()
    for section in TrainConfig.model_fields:
        if section == "label_smoothing":
            assert cfg.label_smoothing != default.label_smoothing
            continue
        assert getattr(cfg, section) != getattr(default, section), section
    assert cfg.data.synthetic != default.data.synthetic


# YAML round trip -----------------------------------------------------------------------------
def test_save_load_round_trip_is_lossless(tmp_path: Path) -> None:
    cfg = validate_config(non_default_data())
    path = save_config(cfg, tmp_path / "run.yaml")
    assert path == tmp_path / "run.yaml"
    back = load_config(path)
    assert back == cfg
    assert back.model_dump() == cfg.model_dump()
    assert isinstance(back.augment.crop_scale, tuple) and back.augment.crop_scale == (0.08, 0.9)
    assert back.model.pretrained is None and back.data.root is None
    assert back.data.synthetic.num_classes == 7
    assert back.distributed.sync_bn is True and back.distributed.channels_last is False
    # The file is plain YAML (safe_load) holding every section, and a second trip is identical.
    assert yaml.safe_load(path.read_text()) == cfg.model_dump(mode="json")
    assert back.to_yaml() == path.read_text()


def test_round_trip_with_strings_and_defaults(tmp_path: Path) -> None:
    data = non_default_data()
    data["model"]["pretrained"] = "/ckpt/null.pt"
    data["data"].update(kind="imagefolder", root="yes", val_resize=None)
    data["distributed"].update(sync_bn="auto", amp="off")
    cfg = validate_config(data)
    back = load_config(save_config(cfg, tmp_path / "b.yaml"))
    assert back == cfg
    assert back.data.root == "yes"  # stays a string, not a YAML bool
    assert back.data.val_resize is None and back.distributed.sync_bn == "auto"

    default_back = load_config(save_config(TrainConfig(), tmp_path / "d.yaml"))
    assert default_back == TrainConfig()


def test_load_ignores_provenance_block(tmp_path: Path) -> None:
    cfg = validate_config(non_default_data())
    data = {"provenance": {"experiment": "exp1", "trial_id": "abc", "val_acc": 0.91, "sampled": {"x": 1}}}
    data.update(cfg.model_dump(mode="json"))
    path = write_yaml(tmp_path / "best.yaml", data)
    assert load_config(path) == cfg
    assert load_config(write_yaml(tmp_path / "p.yaml", {"provenance": {"a": 1}})) == TrainConfig()


def test_provenance_is_only_ignored_at_top_level(tmp_path: Path) -> None:
    _, msg = load_error(tmp_path, {"mix": {"provenance": 1}})
    assert "mix.provenance: unknown key" in msg


# Bad input: unknown keys -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, expected",
    [
        ({"mix": {"mdoe": "cutmix"}}, "mix.mdoe: unknown key; did you mean 'mix.mode'?"),
        ({"optimiser": {"base_lr": 0.1}}, "optimiser: unknown key; did you mean 'optimizer'?"),
        ({"mixx": {}}, "mixx: unknown key; did you mean 'mix'?"),
        (
            {"data": {"synthetic": {"num_clases": 3}}},
            "data.synthetic.num_clases: unknown key; did you mean 'data.synthetic.num_classes'?",
        ),
        ({"batch": {"globalbatch": 64}}, "batch.globalbatch: unknown key; did you mean 'batch.global_batch'?"),
        (
            {"augment": {"randaugment": {"magnitud": 3}}},
            "augment.randaugment.magnitud: unknown key; did you mean 'augment.randaugment.magnitude'?",
        ),
    ],
)
def test_unknown_key_names_path_and_nearest(tmp_path: Path, data: dict[str, Any], expected: str) -> None:
    path, msg = load_error(tmp_path, data)
    assert_one_line_from(msg, path)
    assert msg == f"{path}: {expected}"


def test_unknown_nested_key_names_its_full_path(tmp_path: Path) -> None:
    path, msg = load_error(tmp_path, {"data": {"synthetic": {"foo": 1}}})
    assert_one_line_from(msg, path)
    assert msg.startswith(f"{path}: data.synthetic.foo: unknown key")
    # A suggestion, when given, is a key of the same section.
    hint = re.search(r"did you mean '([^']+)'\?", msg)
    if hint:
        assert hint.group(1).startswith("data.synthetic.")
        assert hint.group(1).rsplit(".", 1)[1] in config_mod.SyntheticConfig.model_fields


def test_unknown_top_level_section_without_source() -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"trainer": {"epochs": 1}})
    msg = str(info.value)
    assert msg.startswith("trainer: unknown key")
    assert "\n" not in msg


# Bad input: types and ranges -------------------------------------------------------------------
@pytest.mark.parametrize(
    "data, path_in_msg, parts",
    [
        ({"label_smoothing": 1.0}, "label_smoothing", ["less than 1", "(got 1.0)"]),
        ({"data": {"subset": 0}}, "data.subset", ["greater than 0", "(got 0)"]),
        ({"optimizer": {"base_lr": "x"}}, "optimizer.base_lr", ["valid number", "(got 'x')"]),
        ({"run": {"epochs": 0}}, "run.epochs", ["greater than or equal to 1", "(got 0)"]),
        ({"data": {"image_size": 4096}}, "data.image_size", ["less than or equal to 1024", "(got 4096)"]),
        ({"augment": {"crop_scale": [0.9, 0.5]}}, "augment.crop_scale", ["0 < lo <= hi <= 1", "[0.9, 0.5]"]),
        ({"data": {"synthetic": {"num_classes": 1}}}, "data.synthetic.num_classes", ["greater than or equal to 2"]),
    ],
)
def test_wrong_value_names_path_and_bound(
    tmp_path: Path, data: dict[str, Any], path_in_msg: str, parts: list[str]
) -> None:
    path, msg = load_error(tmp_path, data)
    assert_one_line_from(msg, path)
    assert msg.startswith(f"{path}: {path_in_msg}: "), msg
    for part in parts:
        assert part in msg, (part, msg)


def test_mix_mode_lists_allowed_values(tmp_path: Path) -> None:
    path, msg = load_error(tmp_path, {"mix": {"mode": "blend"}})
    assert_one_line_from(msg, path)
    assert msg.startswith(f"{path}: mix.mode: ")
    for allowed in ("'none'", "'mixup'", "'cutmix'", "'mixup_cutmix'"):
        assert allowed in msg
    assert "'blend'" in msg


# The rule asks for the allowed range, for a wrong type as well as a value out of range.
def test_wrong_type_names_allowed_range(tmp_path: Path) -> None:
    _, msg = load_error(tmp_path, {"optimizer": {"base_lr": "x"}})
    assert "100" in msg  # base_lr is allowed in (0, 100]


@pytest.mark.parametrize(
    "data, got, other_bound",
    [
        ({"label_smoothing": 1.0}, "(got 1.0)", r"\b0(\.0)?\b"),  # allowed [0, 1)
        ({"data": {"subset": 0}}, "(got 0)", r"\b1(\.0)?\b"),  # allowed (0, 1]
    ],
)
def test_out_of_range_names_both_bounds(tmp_path: Path, data: dict[str, Any], got: str, other_bound: str) -> None:
    _, msg = load_error(tmp_path, data)
    body = msg.split(": ", 2)[2].replace(got, "")
    assert re.search(other_bound, body), msg


def test_accumulation_not_whole_names_the_three_numbers(tmp_path: Path) -> None:
    path, msg = load_error(
        tmp_path, {"batch": {"global_batch": 100, "micro_batch": 32}, "distributed": {"num_workers": 3}}
    )
    assert_one_line_from(msg, path)
    assert "batch.global_batch 100" in msg
    assert "batch.micro_batch 32" in msg
    assert "distributed.num_workers 3" in msg
    assert "(= 96)" in msg


def test_accumulation_global_smaller_than_one_step(tmp_path: Path) -> None:
    data = {"batch": {"global_batch": 32, "micro_batch": 32}, "distributed": {"num_workers": 2}}
    path, msg = load_error(tmp_path, data)
    assert_one_line_from(msg, path)
    assert "batch.global_batch 32" in msg and "batch.micro_batch 32" in msg and "distributed.num_workers 2" in msg


def test_unknown_model_lists_valid_names(tmp_path: Path) -> None:
    path, msg = load_error(tmp_path, {"model": {"name": "vgg16"}})
    assert_one_line_from(msg, path)
    assert msg.startswith(f"{path}: model.name: unknown model 'vgg16'")
    names = list_models()
    assert "resnet18_vd" in names
    assert f"(valid: {', '.join(names)})" in msg


def test_model_typo_suggests_nearest(tmp_path: Path) -> None:
    _, msg = load_error(tmp_path, {"model": {"name": "resnet18vd"}})
    assert "did you mean 'resnet18_vd'?" in msg


@pytest.mark.parametrize(
    "data, part",
    [
        ({"data": {"kind": "imagefolder"}}, "data.root: required when data.kind is 'imagefolder'"),
        ({"data": {"image_size": 32, "val_resize": 16}}, "data.val_resize: 16 must be >= data.image_size (32)"),
        ({"optimizer": {"nesterov": True, "momentum": 0.0}}, "optimizer.nesterov: requires optimizer.momentum > 0"),
        (["a", "b"], "expected a mapping of sections, got list"),
    ],
)
def test_section_rules_one_line_from_file(tmp_path: Path, data: Any, part: str) -> None:
    path, msg = load_error(tmp_path, data)
    assert_one_line_from(msg, path)
    assert msg == f"{path}: {part}"


# Bad files ----------------------------------------------------------------------------------------
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "x.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file"


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "syntax.yaml"
    path.write_text("run:\n  epochs: 2\nmix: mode: cutmix\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert_one_line_from(msg, path)
    assert msg == f"{path}: line 3: mapping values are not allowed here"


def test_folder_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read")
    assert "\n" not in str(info.value)


def test_binary_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01 not text")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")


def test_empty_file_is_the_default_config(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == TrainConfig()


# Overrides ------------------------------------------------------------------------------------------
def test_parse_override_reads_values_as_yaml() -> None:
    assert parse_override("run.epochs=2") == ("run.epochs", 2)
    assert parse_override("mix.mode=cutmix") == ("mix.mode", "cutmix")
    assert parse_override("augment.crop_scale=[0.5, 1.0]") == ("augment.crop_scale", [0.5, 1.0])
    assert parse_override("distributed.use_gpu=true") == ("distributed.use_gpu", True)
    assert parse_override("model.pretrained=") == ("model.pretrained", None)
    assert parse_override(" run.seed = 3") == ("run.seed", 3)
    assert parse_override("data.root=a=b") == ("data.root", "a=b")


@pytest.mark.parametrize("item", ["run.epochs", "", "=3", " =3"])
def test_parse_override_without_key_or_equals_is_config_error(item: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_override(item)
    assert str(info.value) == f"--set {item!r}: expected key.path=value"


def test_apply_overrides_sets_nested_paths() -> None:
    data: dict[str, Any] = {"run": {"epochs": 5, "seed": 1}}
    out = apply_overrides(data, ["run.epochs=2", "mix.mode=cutmix", "augment.crop_scale=[0.5, 1.0]"])
    assert out == {
        "run": {"epochs": 2, "seed": 1},
        "mix": {"mode": "cutmix"},
        "augment": {"crop_scale": [0.5, 1.0]},
    }
    cfg = validate_config(out)
    assert cfg.run.epochs == 2 and cfg.run.seed == 1
    assert cfg.mix.mode == "cutmix"
    assert cfg.augment.crop_scale == (0.5, 1.0)


def test_apply_overrides_missing_equals_is_config_error() -> None:
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["run.epochs=2", "mix.mode"])


def test_load_config_applies_overrides(tmp_path: Path) -> None:
    path = save_config(validate_config(non_default_data()), tmp_path / "c.yaml")
    cfg = load_config(path, ["run.epochs=1", "mix.mode=cutmix", "augment.crop_scale=[0.5, 1.0]"])
    assert cfg.run.epochs == 1 and cfg.mix.mode == "cutmix" and cfg.augment.crop_scale == (0.5, 1.0)
    assert cfg.run.seed == 17  # the rest of the file stays


def test_load_config_bad_override_names_key(tmp_path: Path) -> None:
    path = save_config(TrainConfig(), tmp_path / "c.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["mix.mdoe=cutmix"])
    assert "mix.mdoe: unknown key; did you mean 'mix.mode'?" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(path, ["run.epochs=0"])
    assert "run.epochs: " in str(info.value) and "(got 0)" in str(info.value)


# Derived values ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "global_batch, micro, workers, base_lr, steps, lr",
    [
        (128, 32, 2, 0.4, 2, 0.2),
        (512, 16, 4, 0.1, 8, 0.2),
        (256, 64, 4, 1.0, 1, 1.0),
        (1024, 8, 1, 0.5, 128, 2.0),
    ],
)
def test_accum_steps_and_lr(global_batch: int, micro: int, workers: int, base_lr: float, steps: int, lr: float) -> None:
    cfg = validate_config(
        {
            "batch": {"global_batch": global_batch, "micro_batch": micro},
            "distributed": {"num_workers": workers},
            "optimizer": {"base_lr": base_lr},
        }
    )
    assert cfg.accum_steps == steps
    assert cfg.batch.micro_batch * cfg.distributed.num_workers * cfg.accum_steps == global_batch
    assert cfg.lr == pytest.approx(lr, rel=1e-12)


@pytest.mark.parametrize("workers, micro, steps", [(1, 32, 4), (2, 32, 2), (4, 32, 1), (8, 16, 1), (16, 8, 1)])
def test_with_num_workers_keeps_global_batch(workers: int, micro: int, steps: int) -> None:
    base = validate_config(
        {"batch": {"global_batch": 128, "micro_batch": 32}, "distributed": {"num_workers": 2}, "run": {"epochs": 3}}
    )
    moved = base.with_num_workers(workers)
    assert moved.batch.global_batch == 128
    assert moved.distributed.num_workers == workers
    assert moved.batch.micro_batch == micro
    assert moved.accum_steps == steps
    assert moved.lr == base.lr
    # Everything else is unchanged, and the original is untouched.
    a, b = moved.model_dump(), base.model_dump()
    for d in (a, b):
        del d["distributed"]["num_workers"], d["batch"]["micro_batch"]
    assert a == b
    assert base.distributed.num_workers == 2 and base.batch.micro_batch == 32


@pytest.mark.parametrize("workers", [3, 5, 256])
def test_with_num_workers_that_cannot_split_global_batch(workers: int) -> None:
    cfg = validate_config({"batch": {"global_batch": 128, "micro_batch": 32}})
    with pytest.raises(ConfigError) as info:
        cfg.with_num_workers(workers)
    msg = str(info.value)
    assert "\n" not in msg
    assert "128" in msg and f"{workers} workers" in msg
    assert msg.startswith("batch.global_batch 128")


# Writing files -----------------------------------------------------------------------------------------
def test_write_atomic_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    path.write_text("precious\n")
    with pytest.raises(ConfigError) as info:
        write_atomic(path, "new\n")
    assert str(info.value) == f"{path}: already exists; choose another path (nothing was overwritten)"
    assert path.read_text() == "precious\n"
    with pytest.raises(ConfigError, match="already exists"):
        save_config(TrainConfig(), path)
    assert path.read_text() == "precious\n"
    assert sorted(os.listdir(tmp_path)) == ["best.yaml"]


def test_write_atomic_overwrite_and_new_folders(tmp_path: Path) -> None:
    path = tmp_path / "best.yaml"
    path.write_text("old\n")
    assert write_atomic(path, "new\n", overwrite=True) == path
    assert path.read_text() == "new\n"
    cfg = validate_config(non_default_data())
    save_config(cfg, path, overwrite=True)
    assert load_config(path) == cfg
    assert sorted(os.listdir(tmp_path)) == ["best.yaml"]

    nested = tmp_path / "a" / "b" / "c.yaml"
    write_atomic(nested, "x: 1\n")
    assert nested.read_text() == "x: 1\n"
    assert os.listdir(nested.parent) == ["c.yaml"]


def test_write_atomic_race_keeps_the_other_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The target appears between the existence check and the rename: it is kept."""
    path = tmp_path / "best.yaml"
    real_mkstemp = config_io.tempfile.mkstemp

    def mkstemp_then_race(*args: Any, **kwargs: Any) -> Any:
        path.write_text("theirs\n")
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(config_io.tempfile, "mkstemp", mkstemp_then_race)
    with pytest.raises((ConfigError, FileExistsError)):
        write_atomic(path, "ours\n")
    assert path.read_text() == "theirs\n"
    assert sorted(os.listdir(tmp_path)) == ["best.yaml"]


def test_write_atomic_failure_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    path = tmp_path / "best.yaml"
    path.write_text("old\n")
    monkeypatch.setattr(config_io.os, "replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(path, "new\n", overwrite=True)
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["best.yaml"]
