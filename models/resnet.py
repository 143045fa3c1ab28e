"""ResNet family (ResNet-B, -C and -D of "Bag of Tricks", He et al. 2019) and its builders.

State dicts match timm's resnet18d/34d/50d/101d/152d, resnet50 and resnet50c key for key.
Names and data configs live in the torch-free `models.registry`; every builder here is
registered under one of those names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from models.registry import check_model_name, list_models

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "create_model",
    "register_model",
]


def _conv3x3(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_chs: int, out_chs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_chs, out_chs, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs; the first carries the stride."""

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_chs, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.relu(x + shortcut)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, ResNet-B), 1x1 expand."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = _conv1x1(in_chs, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, out_chs)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return self.relu(x + shortcut)


Block = type[BasicBlock] | type[Bottleneck]


def _make_downsample(in_chs: int, out_chs: int, stride: int, avg_down: bool) -> nn.Sequential:
    """Projection shortcut.

    avg_down (ResNet-D): [AvgPool 2x2 s2 when stride > 1, else Identity] -> 1x1 conv -> BN.
    Otherwise (ResNet-B/C): 1x1 conv with the stride -> BN.
    """
    if avg_down:
        pool: nn.Module = (
            nn.AvgPool2d(2, stride=2, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        )
        return nn.Sequential(pool, _conv1x1(in_chs, out_chs), nn.BatchNorm2d(out_chs))
    return nn.Sequential(_conv1x1(in_chs, out_chs, stride), nn.BatchNorm2d(out_chs))


class ResNet(nn.Module):
    """Generic ResNet: stem, four stages of residual blocks, global average pool, linear classifier.

    deep_stem: three 3x3 convs (stem_width, stem_width, 2*stem_width) instead of one 7x7 conv (ResNet-C).
    avg_down: average-pool shortcut in downsampling blocks (ResNet-D).
    small_input: stem keeps full resolution (stride 1, no max pool), for 32-64 px images.
    zero_init_last: zero gamma on the last BN of every residual branch.
    """

    def __init__(
        self,
        block: Block,
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_chans: int = 3,
        deep_stem: bool = False,
        stem_width: int = 64,
        avg_down: bool = False,
        small_input: bool = False,
        zero_init_last: bool = True,
    ) -> None:
        super().__init__()
        _check_positive("num_classes", num_classes)
        _check_positive("in_chans", in_chans)
        self.num_classes = num_classes
        stem_stride = 1 if small_input else 2

        if deep_stem:
            stem_out = stem_width * 2
            self.conv1: nn.Module = nn.Sequential(
                _conv3x3(in_chans, stem_width, stem_stride),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                _conv3x3(stem_width, stem_width),
                nn.BatchNorm2d(stem_width),
                nn.ReLU(inplace=True),
                _conv3x3(stem_width, stem_out),
            )
        else:
            stem_out = 64
            self.conv1 = nn.Conv2d(in_chans, stem_out, kernel_size=7, stride=stem_stride, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_out)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity() if small_input else nn.MaxPool2d(3, stride=2, padding=1)

        in_chs = stem_out
        stages = []
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            out_chs = planes * block.expansion
            downsample = None
            if stride != 1 or in_chs != out_chs:
                downsample = _make_downsample(in_chs, out_chs, stride, avg_down)
            blocks = [block(in_chs, planes, stride, downsample)]
            blocks += [block(out_chs, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs = out_chs
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        self.num_features = in_chs
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        self._init_weights(zero_init_last)

    def _init_weights(self, zero_init_last: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.global_pool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------
# Registry

_MODELS: dict[str, Callable[..., ResNet]] = {}


def register_model(fn: Callable[..., ResNet]) -> Callable[..., ResNet]:
    """Decorator: register a builder under its function name, which must be in `models.registry`."""
    if fn.__name__ not in list_models():
        raise ValueError(f"model {fn.__name__!r} has no data config in models.registry")
    _MODELS[fn.__name__] = fn
    return fn


def create_model(name: str, num_classes: int = 1000, in_chans: int = 3, **kwargs: Any) -> ResNet:
    """Build a registered model; kwargs (small_input, zero_init_last) go to ResNet."""
    check_model_name(name)
    return _MODELS[name](num_classes=num_classes, in_chans=in_chans, **kwargs)


def _resnet_d(block: Block, layers: tuple[int, int, int, int], **kwargs: Any) -> ResNet:
    return ResNet(block, layers, deep_stem=True, stem_width=32, avg_down=True, **kwargs)


@register_model
def resnet18_vd(**kwargs: Any) -> ResNet:
    return _resnet_d(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34_vd(**kwargs: Any) -> ResNet:
    return _resnet_d(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50_vd(**kwargs: Any) -> ResNet:
    return _resnet_d(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet101_vd(**kwargs: Any) -> ResNet:
    return _resnet_d(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def resnet152_vd(**kwargs: Any) -> ResNet:
    return _resnet_d(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_model
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-B (torchvision v1.5): 7x7 stem, stride on the 3x3 conv, strided 1x1 conv shortcut."""
    return ResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50_vc(**kwargs: Any) -> ResNet:
    """ResNet-C: deep 3x3 stem, strided 1x1 conv shortcut."""
    return ResNet(Bottleneck, (3, 4, 6, 3), deep_stem=True, stem_width=32, **kwargs)

