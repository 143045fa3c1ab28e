"""Mixup and cutmix on a device batch, returning probability targets, and the matching loss.

Mixing is done by torchvision's `transforms.v2.MixUp` / `CutMix`: each sample is paired with
the previous one in the batch (`roll(1, 0)`), the cutmix box is clipped to the image and lambda
corrected to its area. Every random draw comes from the `torch.Generator` passed per call, on
the host: whether and how to mix directly, and lambda and the box through the transforms, which
draw from torch's global CPU generator, reseeded from ours inside `torch.random.fork_rng` (so the
global stream is left as it was). Runs are reproducible per rank and across resume, and nothing
waits on the device. Targets come back unsmoothed; `Mixer.loss` applies label smoothing once,
through `F.cross_entropy(..., label_smoothing=...)`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from trainable.config import MixConfig

__all__ = ["MixMode", "Mixer"]

MixMode = Literal["none", "mixup", "cutmix"]


class Mixer:
    """Mixup / cutmix / either on a batch; `loss` is the soft-target cross-entropy to train with.

    `mixer(images, targets, generator=g)` = `mixer.apply(images, targets, *mixer.draw(g))`.
    In DDP give each rank its own generator so that ranks do not mix identically.
    """

    def __init__(self, mix_cfg: MixConfig, num_classes: int, label_smoothing: float = 0.0) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.cfg = mix_cfg
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self._mixup = v2.MixUp(alpha=mix_cfg.mixup_alpha, num_classes=num_classes)
        self._cutmix = v2.CutMix(alpha=mix_cfg.cutmix_alpha, num_classes=num_classes)

    def draw(self, generator: torch.Generator) -> tuple[MixMode, int]:
        """This batch's mode and the seed of its lambda / box draws.

        Takes the same number of draws from `generator` on every call, whatever the mode.
        """
        if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
            raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}")
        # torchvision has no "mix with probability prob", and v2.RandomChoice's no-op branch
        # would return class indices rather than probability targets: this choice stays here.
        u_mix, u_switch = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator))
        mode = self.cfg.mode
        if mode == "none" or u_mix >= self.cfg.prob:
            return "none", seed
        if mode == "mixup_cutmix":
            return ("cutmix" if u_switch < self.cfg.switch_prob else "mixup"), seed
        return mode, seed

    def apply(
        self, images: torch.Tensor, targets: torch.Tensor, mode: MixMode, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix (N, C, H, W) `images` and (N,) class `targets` as `mode` says, lambda and box drawn from `seed`.

        Returns (images, (N, num_classes) float32 probability targets, unsmoothed).
        """
        # F.one_hot with num_classes given skips its value check on CUDA: no host-device sync.
        targets = targets.long()
        if mode == "none":
            return images, F.one_hot(targets, self.num_classes).float()
        transform = {"mixup": self._mixup, "cutmix": self._cutmix}[mode]
        with torch.random.fork_rng(devices=[]):
            # Not torch.manual_seed: that would also reseed every CUDA generator.
            torch.default_generator.manual_seed(seed)
            mixed, soft = transform(images, targets)
        # On CUDA, Tensor.roll returns a contiguous (NCHW) tensor, so v2.MixUp's output loses
        # channels_last; give the batch back in the layout it came in.
        if images.is_contiguous(memory_format=torch.channels_last) and not mixed.is_contiguous(
            memory_format=torch.channels_last
        ):
            mixed = mixed.contiguous(memory_format=torch.channels_last)
        return mixed, soft

    def __call__(
        self, images: torch.Tensor, targets: torch.Tensor, *, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(images, targets, *self.draw(generator))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Batch-mean cross-entropy against probability targets, label smoothing applied here, in float32."""
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
