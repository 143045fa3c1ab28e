"""Tests for models/: timm parity, shapes, init, param groups, data configs, errors."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import timm
import torch
from torch import nn

import models
from models import ModelDataConfig, create_model, data_config, list_models, param_groups
from models.resnet import _MODELS, BasicBlock, Bottleneck
from tests.conftest import ROOT

TIMM_NAMES = {
    "resnet18_vd": "resnet18d",
    "resnet34_vd": "resnet34d",
    "resnet50_vd": "resnet50d",
    "resnet101_vd": "resnet101d",
    "resnet152_vd": "resnet152d",
    "resnet50": "resnet50",
    "resnet50_vc": "resnet50c",
}


def _randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    """Give every BN non-trivial affine params and running stats, so parity covers them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)


def test_list_models() -> None:
    assert list_models() == sorted(TIMM_NAMES)


def test_builders_and_torch_free_names_are_the_same_set() -> None:
    assert set(_MODELS) == set(list_models())


def _run_python(code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr


def test_names_and_data_configs_import_no_torch() -> None:
    code = (
        "import sys, models; names = models.list_models(); cfg = models.data_config('resnet50_vd'); "
        "assert names and cfg.crop_pct > 0; "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "assert not bad, bad"
    )
    _run_python(code)
    # the lazy names still resolve, and then torch is loaded
    _run_python("import sys, models; models.create_model; assert 'torch' in sys.modules")


def test_lazy_attributes() -> None:
    assert models.create_model is create_model
    assert models.ResNet is type(create_model("resnet18_vd", num_classes=2))
    assert {"ResNet", "create_model", "param_groups", "data_config"} <= set(dir(models))
    with pytest.raises(AttributeError, match="no_such_thing"):
        models.no_such_thing  # noqa: B018


# Bag-of-Tricks evaluation for every model; timm's default pretrained cfgs describe the
# evaluation of particular released weights and differ here (see models/registry.py).
TIMM_CFG_DIFFERENCES = {
    "resnet18_vd": {"interpolation": "bicubic"},
    "resnet34_vd": {"interpolation": "bicubic"},
    "resnet50_vd": {"interpolation": "bicubic"},
    "resnet101_vd": {"interpolation": "bicubic", "input_size": (3, 256, 256), "crop_pct": 0.95},
    "resnet152_vd": {"interpolation": "bicubic", "input_size": (3, 256, 256), "crop_pct": 0.95},
    "resnet50": {"interpolation": "bicubic", "crop_pct": 0.95},
    "resnet50_vc": {"interpolation": "bicubic"},
}


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_data_config_against_timm(name: str) -> None:
    cfg = data_config(name)
    assert cfg == ModelDataConfig(
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), input_size=(3, 224, 224),
        crop_pct=0.875, interpolation="bilinear",
    )
    timm_cfg = timm.models.get_pretrained_cfg(TIMM_NAMES[name]).to_dict()
    fields = [f.name for f in dataclasses.fields(ModelDataConfig)]
    differing = {k: tuple(timm_cfg[k]) if k in ("mean", "std", "input_size") else timm_cfg[k] for k in fields}
    differing = {k: v for k, v in differing.items() if v != getattr(cfg, k)}
    assert differing == TIMM_CFG_DIFFERENCES[name]


def test_data_config_is_frozen_and_checked() -> None:
    cfg = data_config("resnet18_vd")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.crop_pct = 1.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="resnet51_vd"):
        data_config("resnet51_vd")
    for bad in ({"crop_pct": 0.0}, {"crop_pct": 1.5}, {"std": (0.2, 0.0, 0.2)}, {"mean": (0.5,)},
                {"input_size": (3, 224)}, {"interpolation": "lanczos"}):
        with pytest.raises(ValueError):
            ModelDataConfig(**bad)
    grey = ModelDataConfig(mean=(0.5,), std=(0.25,), input_size=(1, 28, 28), crop_pct=1.0)
    assert grey.mean == (0.5,)


@pytest.mark.parametrize("name", sorted(TIMM_NAMES))
def test_timm_parity(name: str) -> None:
    torch.manual_seed(0)
    ref = timm.create_model(TIMM_NAMES[name], pretrained=False)
    _randomize_bn(ref, torch.Generator().manual_seed(1))
    ours = create_model(name)

    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert list(our_sd) == list(ref_sd)
    assert {k: v.shape for k, v in our_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)

    ref.eval()
    ours.eval()
    # 72 px: odd feature map (9x9) before layer4, so the shortcut pool needs ceil_mode
    x = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert got.shape == (2, 1000)
    assert expected.abs().max() > 1e-2  # the comparison is not between two zeros
    assert (got - expected).abs().max().item() < 1e-5


def test_timm_parity_other_head_and_channels() -> None:
    torch.manual_seed(0)
    ref = timm.create_model("resnet18d", pretrained=False, num_classes=7, in_chans=1)
    _randomize_bn(ref, torch.Generator().manual_seed(1))
    ours = create_model("resnet18_vd", num_classes=7, in_chans=1)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.eval()
    ours.eval()
    x = torch.randn(3, 1, 40, 40)
    with torch.no_grad():
        assert (ours(x) - ref(x)).abs().max().item() < 1e-5


def test_resnet50_vd_param_count() -> None:
    model = create_model("resnet50_vd")
    assert sum(p.numel() for p in model.parameters()) == 25_576_264


@pytest.mark.parametrize("size", [25, 176, 193, 224])
def test_odd_input_sizes(size: int) -> None:
    model = create_model("resnet50_vd", num_classes=10).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 10)
    assert torch.isfinite(out).all()


def _layer1_size(model: nn.Module, size: int) -> tuple[int, int]:
    seen: list[torch.Size] = []
    handle = model.layer1.register_forward_hook(lambda _m, _i, out: seen.append(out.shape))
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, size, size))
    handle.remove()
    return seen[0][-2], seen[0][-1]


@pytest.mark.parametrize("name", ["resnet18_vd", "resnet50"])
def test_small_input_keeps_resolution(name: str) -> None:
    assert _layer1_size(create_model(name, num_classes=10, small_input=True), 32) == (32, 32)
    assert _layer1_size(create_model(name, num_classes=10), 32) == (8, 8)
    out = create_model(name, num_classes=10, small_input=True)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]


@pytest.mark.parametrize("name", ["resnet18_vd", "resnet50_vd", "resnet50"])
def test_zero_init_last_placement(name: str) -> None:
    model = create_model(name)
    blocks = _blocks(model)
    assert blocks
    zeroed = set()
    for block in blocks:
        last = block.last_bn
        assert torch.all(last.weight == 0)
        zeroed.add(id(last))
        if block.downsample is not None:
            shortcut_bn = [m for m in block.downsample if isinstance(m, nn.BatchNorm2d)]
            assert len(shortcut_bn) == 1 and torch.all(shortcut_bn[0].weight == 1)
    # every other BN (stem, first BNs of each branch, shortcuts) has gamma 1, and all betas are 0
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.bias == 0)
            if id(m) not in zeroed:
                assert torch.all(m.weight == 1)
    stem_bns = [m for m in model.conv1.modules() if isinstance(m, nn.BatchNorm2d)] + [model.bn1]
    assert all(torch.all(bn.weight == 1) for bn in stem_bns)


def test_zero_init_last_off() -> None:
    model = create_model("resnet18_vd", zero_init_last=False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1)


def test_conv_kaiming_fan_out() -> None:
    torch.manual_seed(0)
    model = create_model("resnet50_vd")
    conv = model.layer4[1].conv2  # 512 -> 512, 3x3: fan_out = 512 * 9
    expected_std = math.sqrt(2.0 / (512 * 9))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.02
    assert abs(conv.weight.mean().item()) < expected_std * 0.01


def test_shortcut_structure() -> None:
    vd = create_model("resnet50_vd")
    assert isinstance(vd.layer1[0].downsample[0], nn.Identity)  # stride 1: no pool
    pool = vd.layer2[0].downsample[0]
    assert isinstance(pool, nn.AvgPool2d) and pool.ceil_mode and not pool.count_include_pad
    assert vd.layer2[0].conv2.stride == (2, 2) and vd.layer2[0].conv1.stride == (1, 1)
    vc = create_model("resnet50_vc")
    assert vc.layer2[0].downsample[0].stride == (2, 2)
    assert vc.layer2[0].downsample[0].kernel_size == (1, 1)


def test_param_groups() -> None:
    model = create_model("resnet18_vd")
    model.conv1[0].weight.requires_grad_(False)
    decay_group, no_decay_group = param_groups(model, 5e-5)
    assert decay_group["weight_decay"] == 5e-5 and no_decay_group["weight_decay"] == 0.0

    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(p.ndim > 1 for p in decay_group["params"])
    assert all(p.ndim <= 1 for p in no_decay_group["params"])
    assert len(decay_group["params"]) == sum(p.ndim > 1 for p in trainable)
    assert len(no_decay_group["params"]) == sum(p.ndim <= 1 for p in trainable)
    grouped = [id(p) for g in (decay_group, no_decay_group) for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in trainable)
    assert id(model.conv1[0].weight) not in grouped
    assert id(model.fc.bias) in {id(p) for p in no_decay_group["params"]}
    torch.optim.SGD(param_groups(model, 1e-4), lr=0.1)  # accepted by an optimizer

    same_split = param_groups(model, 5e-5, no_bias_decay=False)
    assert [g["weight_decay"] for g in same_split] == [5e-5, 5e-5]
    for g, h in zip(same_split, (decay_group, no_decay_group)):
        assert [id(p) for p in g["params"]] == [id(p) for p in h["params"]]


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError) as info:
        create_model("resnet51_vd")
    message = str(info.value)
    assert "resnet51_vd" in message
    for name in list_models():
        assert name in message


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"num_classes": -1}, {"in_chans": 0}])
def test_bad_sizes(kwargs: dict[str, int]) -> None:
    key = next(iter(kwargs))
    with pytest.raises(ValueError, match=key):
        create_model("resnet18_vd", **kwargs)
