"""Model names and each model's data config, importable without torch.

Config validation and search spaces check model names through `list_models`; they must
not pay for importing torch, so this module holds only plain data. `models.resnet` builds
the networks and refuses to register a builder whose name is missing here.

A data config describes the input a model expects, as timm's `pretrained_cfg` does:
channel mean and std (RGB, on the 0..1 scale), the default input size, the centre-crop
fraction used at validation, and the resize interpolation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelDataConfig",
    "check_model_name",
    "data_config",
    "list_models",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means, RGB, 0..1 scale (timm's IMAGENET_DEFAULT_MEAN)."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations, RGB, 0..1 scale (timm's IMAGENET_DEFAULT_STD)."""

Interpolation = Literal["nearest", "bilinear", "bicubic"]


@dataclass(frozen=True)
class ModelDataConfig:
    """The input a model expects.

    mean, std: per channel, RGB, on the 0..1 scale; a uint8 pixel p becomes (p/255 - mean) / std.
    input_size: (channels, height, width) the model was designed for.
    crop_pct: validation centre crop as a fraction of the resized shorter side, so the
        shorter side is resized to round(image_size / crop_pct) before cropping image_size.
    interpolation: resampling used when resizing.
    """

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.875
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (channels, height, width) >= 1, got {self.input_size}")
        channels = self.input_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean and std need {channels} values each, got {self.mean} and {self.std}")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")


# ImageNet normalisation, 224 px, resize 256 -> centre crop 224, bilinear: the evaluation
# protocol of "Bag of Tricks" (He et al., 2019), the same for every model so that models
# are compared on the same validation images. timm's default pretrained cfgs share the mean
# and std, but describe the evaluation of particular released weights: bicubic for all
# seven, crop_pct 0.95 for resnet50 (a1_in1k), and 256 px with crop_pct 0.95 for
# resnet101d and resnet152d (ra2_in1k). tests/test_models.py pins these differences.
_BAG_OF_TRICKS = ModelDataConfig()

_DATA_CONFIGS: Mapping[str, ModelDataConfig] = MappingProxyType(
    {
        "resnet18_vd": _BAG_OF_TRICKS,
        "resnet34_vd": _BAG_OF_TRICKS,
        "resnet50_vd": _BAG_OF_TRICKS,
        "resnet101_vd": _BAG_OF_TRICKS,
        "resnet152_vd": _BAG_OF_TRICKS,
        "resnet50": _BAG_OF_TRICKS,
        "resnet50_vc": _BAG_OF_TRICKS,
    }
)


def list_models() -> list[str]:
    """Sorted names accepted by `create_model` and `data_config`."""
    return sorted(_DATA_CONFIGS)


def check_model_name(name: str) -> None:
    """Raise ValueError naming `name` and the valid names when `name` is not a model."""
    if name not in _DATA_CONFIGS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")


def data_config(name: str) -> ModelDataConfig:
    """The data config of model `name`."""
    check_model_name(name)
    return _DATA_CONFIGS[name]
