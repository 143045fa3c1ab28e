"""Label smoothing, mixup and cutmix on a device batch, with soft targets.

A batch is mixed with its own reversal (`images.flip(0)`), so no second batch is loaded.
All randomness (whether to mix, which mix, lambda, the cutmix box) is drawn on the host
from a seeded numpy generator: runs are reproducible and nothing waits on the device.
Label smoothing is applied exactly once, to each of the two one-hot targets before they
are mixed (which equals smoothing the mixed one-hot target).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from trainable.config import MixConfig

__all__ = ["Mixer", "one_hot_smooth", "soft_target_cross_entropy"]


def one_hot_smooth(targets: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(N,) class indices -> (N, num_classes) float32: (1-s) * onehot + s / num_classes."""
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, dtype=torch.float32, device=targets.device)
    # scatter_ rather than F.one_hot: no value check, hence no host-device sync on CUDA.
    return out.scatter_(1, targets.view(-1, 1).long(), 1.0 - smoothing + off)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c soft[c] * log_softmax(logits)[c], in float32."""
    return torch.sum(-soft_targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _box_from_centre(h: int, w: int, lam: float, cy: int, cx: int) -> tuple[int, int, int, int, float]:
    """Box of area ratio about (1 - lam) centred at (cy, cx), clipped to the image.

    Returns (y0, y1, x0, x1, lam) with lam corrected to the clipped box:
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w).
    """
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(h * ratio), int(w * ratio)
    y0, x0 = cy - cut_h // 2, cx - cut_w // 2
    y1, x1 = y0 + cut_h, x0 + cut_w
    y0, y1 = min(max(y0, 0), h), min(max(y1, 0), h)
    x0, x1 = min(max(x0, 0), w), min(max(x1, 0), w)
    lam = 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)
    return y0, y1, x0, x1, lam


def _cutmix_box(h: int, w: int, lam: float, generator: np.random.Generator) -> tuple[int, int, int, int, float]:
    """A cutmix box with a uniformly random centre (see `_box_from_centre`)."""
    cy = int(generator.integers(0, h))
    cx = int(generator.integers(0, w))
    return _box_from_centre(h, w, lam, cy, cx)


def _as_numpy_rng(generator: np.random.Generator | torch.Generator | None, default: np.random.Generator) -> np.random.Generator:
    if generator is None:
        return default
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        # Consume one draw of the torch generator to seed a numpy one: deterministic.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return np.random.default_rng(seed)
    raise TypeError(f"generator must be a numpy or torch Generator, got {type(generator).__name__}")


class Mixer:
    """Mixup / cutmix / both on a batch, returning soft (smoothed, mixed) targets.

    `seed` seeds the host RNG; in DDP give each rank its own (e.g. run seed + rank) so that
    ranks do not mix identically. After each call `last_lam` is the label weight of the
    unflipped batch (1.0 when not mixed) and `last_mode` is "none", "mixup" or "cutmix".
    """

    def __init__(self, mix_cfg: MixConfig, num_classes: int, label_smoothing: float = 0.0, seed: int = 0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.cfg = mix_cfg
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.rng = np.random.default_rng(seed)
        self.last_lam = 1.0
        self.last_mode = "none"

    def _choose(self, rng: np.random.Generator) -> str:
        mode = self.cfg.mode
        if mode == "none" or rng.random() >= self.cfg.prob:
            return "none"
        if mode == "mixup_cutmix":
            return "cutmix" if rng.random() < self.cfg.switch_prob else "mixup"
        return mode

    def __call__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        generator: np.random.Generator | torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rng = _as_numpy_rng(generator, self.rng)
        mode = self._choose(rng)
        smooth = one_hot_smooth(targets, self.num_classes, self.label_smoothing)
        lam = 1.0
        if mode == "mixup":
            lam = float(rng.beta(self.cfg.mixup_alpha, self.cfg.mixup_alpha))
            images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
        elif mode == "cutmix":
            if images.ndim != 4:
                raise ValueError(f"cutmix needs (N, C, H, W) images, got shape {tuple(images.shape)}")
            lam = float(rng.beta(self.cfg.cutmix_alpha, self.cfg.cutmix_alpha))
            h, w = images.shape[-2:]
            y0, y1, x0, x1, lam = _cutmix_box(h, w, lam, rng)
            flipped_box = images[:, :, y0:y1, x0:x1].flip(0)
            images = images.clone()
            images[:, :, y0:y1, x0:x1] = flipped_box
        self.last_lam = lam
        self.last_mode = mode
        if mode != "none":
            smooth = smooth.mul(lam).add_(smooth.flip(0), alpha=1.0 - lam)
        return images, smooth
