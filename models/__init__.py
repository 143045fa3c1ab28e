"""Image classification models: the ResNet-vd family and its baselines.

`list_models`, `data_config` and `ModelDataConfig` import no torch; `ResNet`,
`create_model` and `param_groups` import torch on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from models.registry import ModelDataConfig, data_config, list_models

if TYPE_CHECKING:
    from models.params import param_groups
    from models.resnet import ResNet, create_model

__all__ = ["ModelDataConfig", "ResNet", "create_model", "data_config", "list_models", "param_groups"]

_LAZY = {"ResNet": "models.resnet", "create_model": "models.resnet", "param_groups": "models.params"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
