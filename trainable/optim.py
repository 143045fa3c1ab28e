"""Optimizers (SGD, LARS) and the learning-rate schedule (warmup + cosine or step)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from models import param_groups
from trainable.config import ScheduleConfig, TrainConfig

__all__ = ["LARS", "build_optimizer", "build_scheduler", "lr_factor"]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al., 2017).

    For each parameter of a group with `lars_exclude=False`:
        local_lr = trust * ||w|| / (||g|| + wd * ||w||)   (1 when ||w|| or ||g|| is 0)
        d = (g + wd * w) * local_lr
    then, as SGD: buf = momentum * buf + d (buf = d at the first step),
    step = d + momentum * buf with nesterov else buf, and w -= lr * step.
    Groups with `lars_exclude=True` (BN parameters and biases) skip the trust ratio.
    The ratio stays a device tensor: no host-device sync.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust: float = 0.001,
        nesterov: bool = False,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"invalid momentum {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if trust <= 0.0:
            raise ValueError(f"invalid trust coefficient {trust}")
        if nesterov and momentum <= 0.0:
            raise ValueError("nesterov momentum requires momentum > 0")
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, trust=trust, nesterov=nesterov, lars_exclude=lars_exclude
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
            trust, nesterov, exclude = group["trust"], group["nesterov"], group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                d = g.add(p, alpha=wd) if wd != 0.0 else g.clone()
                if not exclude:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    ratio = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        trust * w_norm / (g_norm + wd * w_norm),
                        torch.ones_like(w_norm),
                    )
                    d.mul_(ratio)
                if momentum != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = d.clone()
                        state["momentum_buffer"] = buf
                    else:
                        buf.mul_(momentum).add_(d)
                    d = d.add(buf, alpha=momentum) if nesterov else buf
                p.add_(d, alpha=-lr)
        return loss


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or LARS at lr = base_lr * global_batch / 256.

    Groups: weights (ndim > 1) with weight decay; BN parameters and biases (ndim <= 1)
    without it when `optimizer.no_bias_decay`. With LARS the ndim <= 1 group is also
    excluded from the trust ratio.
    """
    o = cfg.optimizer
    groups = param_groups(model, o.weight_decay, o.no_bias_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    if o.name == "lars":
        groups[0]["lars_exclude"] = False
        groups[1]["lars_exclude"] = True
        return LARS(
            groups, lr=cfg.lr, momentum=o.momentum, weight_decay=o.weight_decay, trust=o.lars_trust, nesterov=o.nesterov
        )
    raise ValueError(f"unknown optimizer {o.name!r}")


def lr_factor(
    update: int,
    total_updates: int,
    warmup_updates: int,
    cfg_schedule: ScheduleConfig,
    updates_per_epoch: int,
) -> float:
    """Multiplier of the peak LR at optimizer update `update` (0-based).

    Linear warmup from `warmup_start_factor` (update 0) to 1.0 (update `warmup_updates`),
    then cosine from 1.0 to `min_lr_factor` (reached at `total_updates`), or `step`:
    times `step_gamma` at each milestone epoch (update milestone * updates_per_epoch).

    Cosine with `restarts` (epochs): each restart ends a cosine at its floor (the factor at
    update restart * updates_per_epoch is `min_lr_factor`); the next cosine re-warms
    linearly from the floor to 1.0 over `warmup_updates`. Every warmup is the configured one,
    as in a run without restarts (the search trains what production trains); a space whose
    warmup is longer than a cosine of its rung schedule is refused (`spaces.loader`).
    """
    if updates_per_epoch < 1:
        raise ValueError(f"updates_per_epoch must be >= 1, got {updates_per_epoch}")
    if total_updates < 1:
        raise ValueError(f"total_updates must be >= 1, got {total_updates}")
    warmup_updates = max(0, warmup_updates)
    s = cfg_schedule
    if s.name == "cosine":
        ends = [e * updates_per_epoch for e in s.restarts if e * updates_per_epoch < total_updates]
        k = sum(1 for b in ends if b < update)  # the cosine `update` belongs to
        start, end = ([0, *ends])[k], ([*ends, total_updates])[k]
        floor = s.min_lr_factor
        first = s.warmup_start_factor if k == 0 else floor
        warm = warmup_updates
        at = update - start
        if at < warm:
            return first + (1.0 - first) * at / warm
        progress = min(1.0, max(0.0, (at - warm) / max(1, end - start - warm)))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if s.name == "step":
        warm = 1.0
        if update < warmup_updates:
            warm = s.warmup_start_factor + (1.0 - s.warmup_start_factor) * update / warmup_updates
        passed = sum(1 for m in s.step_milestones if update >= m * updates_per_epoch)
        return warm * s.step_gamma**passed
    raise ValueError(f"unknown schedule {s.name!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, updates_per_epoch: int) -> LambdaLR:
    """LambdaLR stepped once per optimizer update over epochs * updates_per_epoch updates.

    The schedule comes from the config, not the state dict (a plain function is not
    saved by LambdaLR), so state_dict holds only the position. To resume: build the
    optimizer and this scheduler, then load the optimizer's state, then the scheduler's.
    """
    total = cfg.run.epochs * updates_per_epoch
    warmup = round(cfg.schedule.warmup_epochs * updates_per_epoch)
    schedule = cfg.schedule.model_copy()

    def factor(update: int) -> float:
        return lr_factor(update, total, warmup, schedule, updates_per_epoch)

    return LambdaLR(optimizer, factor)
