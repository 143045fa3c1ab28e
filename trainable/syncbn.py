"""Synchronised batch norm that works over any `torch.distributed` backend (gloo on CPU too).

`torch.nn.SyncBatchNorm` refuses CPU tensors; this module computes the same thing with
plain collectives so CPU (gloo) runs of the tool get the trick too. On CUDA,
`convert_sync_batchnorm` uses torch's own fused implementation.

Semantics (matching torch's SyncBatchNorm):
- forward: per-channel statistics over the whole process group's batch (one all_reduce of
  [sum, sum of squares, count]); biased variance normalises, unbiased variance updates
  `running_var`.
- backward: the input gradient uses the group-wide [sum(dy), sum(dy * xhat)] (one
  all_reduce), so rank r receives d(sum over ranks of their losses)/dx_r; the weight and
  bias gradients are local sums. DDP then averages parameter gradients over ranks, so
  DDP + SyncBatchNorm with a per-rank mean loss equals BatchNorm over the full batch with
  the loss averaged over ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.ndim)]


def _channel_view(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.view(1, -1, *([1] * (x.ndim - 2)))


class _SyncBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor | None,
        running_var: torch.Tensor | None,
        eps: float,
        momentum: float,
        process_group,
    ) -> torch.Tensor:
        channels = x.shape[1]
        dims = _reduce_dims(x)
        x32 = x.float()
        n_local = x.numel() // channels if channels else 0

        # Local statistics in float32 (two-pass via var_mean, numerically stable), then
        # [sum, sum of squares, count] in float64 for the reduction so that
        # E[x^2] - E[x]^2 does not cancel badly.
        if n_local > 0:
            var_l, mean_l = torch.var_mean(x32, dim=dims, correction=0)
            mean_l = mean_l.double()
            sum_l = mean_l * n_local
            sumsq_l = var_l.double() * n_local + mean_l * mean_l * n_local
        else:
            sum_l = torch.zeros(channels, dtype=torch.float64, device=x.device)
            sumsq_l = torch.zeros_like(sum_l)
        count_l = torch.full((1,), float(n_local), dtype=torch.float64, device=x.device)
        stats = torch.cat([sum_l, sumsq_l, count_l])
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=process_group)
        total_sum, total_sq, count = stats[:channels], stats[channels : 2 * channels], stats[2 * channels :]

        if count.device.type == "cpu" and count.item() <= 1:
            # Same condition as torch's batch norm; a sync on CPU only (free there).
            raise ValueError(
                f"Expected more than 1 value per channel when training over the process group, "
                f"got input size {tuple(x.shape)} and a group-wide count of {int(count.item())}"
            )
        mean64 = total_sum / count
        var64 = (total_sq / count - mean64 * mean64).clamp_min(0.0)

        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var64 * count / (count - 1).clamp_min(1.0)
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

        mean = mean64.float()
        invstd = torch.rsqrt(var64 + eps).float()
        out = (x32 - _channel_view(mean, x)) * _channel_view(invstd, x)
        if weight is not None:
            out = out * _channel_view(weight.float(), x)
        if bias is not None:
            out = out + _channel_view(bias.float(), x)

        ctx.process_group = process_group
        ctx.save_for_backward(x, weight, mean, invstd, count.float())
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        x, weight, mean, invstd, count = ctx.saved_tensors
        dims = _reduce_dims(x)
        channels = x.shape[1]
        dy = grad_out.float()
        xhat = (x.float() - _channel_view(mean, x)) * _channel_view(invstd, x)
        sum_dy = dy.sum(dim=dims)
        sum_dy_xhat = (dy * xhat).sum(dim=dims)

        grad_x = grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = sum_dy_xhat.to(weight.dtype)  # local: DDP reduces parameter grads
        if weight is not None and ctx.needs_input_grad[2]:
            grad_b = sum_dy.to(weight.dtype, copy=True)
        if ctx.needs_input_grad[0]:
            combined = torch.cat([sum_dy, sum_dy_xhat])
            dist.all_reduce(combined, op=dist.ReduceOp.SUM, group=ctx.process_group)
            mean_dy = combined[:channels] / count
            mean_dy_xhat = combined[channels:] / count
            scale = invstd if weight is None else invstd * weight.float()
            grad_x = (
                (dy - _channel_view(mean_dy, x) - xhat * _channel_view(mean_dy_xhat, x))
                * _channel_view(scale, x)
            ).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span a process group, on any backend.

    Input (N, C, *): (N, C), (N, C, L), (N, C, H, W), ... Synchronises only in training
    mode with an initialised process group of more than one rank; otherwise it is plain
    batch norm. Statistics are computed in float32 (float64 for the reduction) whatever
    the input dtype; the output has the input's dtype. `momentum=None` gives the
    cumulative moving average, as in torch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...), got {input.dim()}D input")
        if input.shape[1] != self.num_features:
            raise ValueError(f"expected {self.num_features} channels in dim 1, got input of shape {tuple(input.shape)}")

    def _sync_world_size(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return dist.get_world_size(group)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)

        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked.item())

        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None

        if not (bn_training and self.training and self._sync_world_size() > 1):
            return F.batch_norm(
                input, running_mean, running_var, self.weight, self.bias, bn_training, factor, self.eps
            )
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return _SyncBatchNormFn.apply(
            input, self.weight, self.bias, running_mean, running_var, self.eps, factor, group
        )


def _first_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _convert(module: nn.Module, process_group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            raise ValueError(f"cannot convert an uninitialised {type(module).__name__}; run a forward first")
        out = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group=process_group if process_group is not None else getattr(module, "process_group", None),
        )
        # Share the very tensors (as torch's conversion does): values, requires_grad,
        # device and dtype are kept, and an optimizer built earlier still holds them.
        if module.affine:
            out.weight = module.weight
            out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert(child, process_group))
    return out


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str | None = None, process_group=None) -> nn.Module:
    """Replace every BatchNorm of `model` by a synchronised one and return the model.

    On CUDA (the given device, else that of the model's first parameter) this is
    `torch.nn.SyncBatchNorm.convert_sync_batchnorm`; elsewhere every `_BatchNorm` becomes
    this module's `SyncBatchNorm`, sharing its parameters and running statistics.
    """
    dev = torch.device(device) if device is not None else _first_device(model)
    if dev.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    return _convert(model, process_group)
