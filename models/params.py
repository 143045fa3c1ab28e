"""Optimiser parameter groups for any model."""

from __future__ import annotations

from torch import nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool = True) -> list[dict]:
    """Two optimiser groups of the trainable parameters, in model order.

    The first holds the weights (ndim > 1) with `weight_decay`; the second the 1-d
    parameters (BN affine, biases), with no decay when `no_bias_decay` ("no bias decay",
    He et al. 2019) and with `weight_decay` otherwise.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0 if no_bias_decay else weight_decay},
    ]
