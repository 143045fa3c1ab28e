"""One optimizer update from k micro-batches (gradient accumulation), with optional
gradient-norm clipping.

The global batch is the trick; accumulation is how a cluster reaches it. Under DDP the
first k-1 backward passes run inside `no_sync()`, so gradients are all-reduced once per
update, on the last micro-batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["optimizer_update"]


def optimizer_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[Any, Any]],
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
    clip_grad_norm: float | None = None,
) -> torch.Tensor:
    """Forward/backward every (inputs, targets) micro-batch, then one optimizer step.

    Each micro-batch loss is divided by k before backward, so the accumulated gradient is
    that of the mean loss over the k micro-batches. With `clip_grad_norm`, the global L2
    norm of that gradient (all-reduced, and unscaled first when a GradScaler is in use) is
    clipped to it before the step. Gradients are set to None afterwards.
    Returns the mean loss over the micro-batches, detached, on the device (no host sync).
    The caller steps the LR scheduler once per call.
    """
    k = len(micro_batches)
    if k == 0:
        raise ValueError("optimizer_update needs at least one micro-batch")
    is_ddp = isinstance(model, DistributedDataParallel)
    total: torch.Tensor | None = None
    for i, (inputs, targets) in enumerate(micro_batches):
        sync = model.no_sync() if is_ddp and i < k - 1 else contextlib.nullcontext()
        amp = (
            torch.autocast(device_type=device_type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with sync:
            with amp:
                loss = loss_fn(model(inputs), targets)
            scaled = loss.float() / k
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        detached = loss.detach().float()
        total = detached if total is None else total + detached
    if clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)  # clip the true gradient; step() will not unscale again
        # on the device, no host sync; a non-finite norm is left for the scaler / divergence check
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert total is not None
    return total / k
