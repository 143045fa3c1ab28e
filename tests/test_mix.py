import numpy as np
import pytest
import torch
from torch import nn

from trainable.config import MixConfig
from trainable.mix import Mixer, _box_from_centre, _cutmix_box, one_hot_smooth, soft_target_cross_entropy

C = 7


def _batch(n=6, h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h, w, generator=g)
    targets = torch.randint(0, C, (n,), generator=g)
    return images, targets


@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
def test_soft_ce_equals_torch_label_smoothing(s):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, C, generator=g) * 3
    y = torch.randint(0, C, (9,), generator=g)
    ours = soft_target_cross_entropy(logits, one_hot_smooth(y, C, s))
    ref = nn.CrossEntropyLoss(label_smoothing=s)(logits, y)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)


def test_one_hot_smooth_values():
    t = one_hot_smooth(torch.tensor([0, 2]), 4, 0.2)
    assert torch.allclose(t, torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.85, 0.05]]), atol=1e-7)


def test_smoothing_then_mixing_equals_mixing_then_smoothing():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randint(0, C, (16,), generator=g), torch.randint(0, C, (16,), generator=g)
    s, lam = 0.1, 0.37
    smooth_then_mix = lam * one_hot_smooth(a, C, s) + (1 - lam) * one_hot_smooth(b, C, s)
    mixed = lam * one_hot_smooth(a, C, 0.0) + (1 - lam) * one_hot_smooth(b, C, 0.0)
    mix_then_smooth = (1 - s) * mixed + s / C
    assert torch.allclose(smooth_then_mix, mix_then_smooth, atol=1e-6, rtol=0)


def test_mixer_targets_smoothed_once():
    images, y = _batch()
    mixer = Mixer(MixConfig(mode="mixup", mixup_alpha=0.4), C, label_smoothing=0.2, seed=3)
    _, soft = mixer(images, y)
    lam = mixer.last_lam
    expected = (1 - 0.2) * (lam * one_hot_smooth(y, C) + (1 - lam) * one_hot_smooth(y.flip(0), C)) + 0.2 / C
    assert torch.allclose(soft, expected, atol=1e-6, rtol=0)
    assert torch.allclose(soft.sum(1), torch.ones(len(y)), atol=1e-6)


def test_mixup_is_convex_combination_with_flip():
    images, y = _batch()
    mixer = Mixer(MixConfig(mode="mixup", mixup_alpha=1.0), C, 0.1, seed=0)
    out, soft = mixer(images, y)
    lam = mixer.last_lam
    assert mixer.last_mode == "mixup" and 0.0 < lam < 1.0
    assert torch.allclose(out, lam * images + (1 - lam) * images.flip(0), atol=1e-6)
    assert torch.allclose(soft.sum(1), torch.ones(len(y)), atol=1e-6)
    assert (soft >= 0).all()


def test_box_clipped_at_border_lam_corrected():
    h, w, lam = 8, 10, 0.5
    y0, y1, x0, x1, lam_c = _box_from_centre(h, w, lam, cy=0, cx=w - 1)
    # Unclipped box would be int(8*0.707)=5 by int(10*0.707)=7; the corner clips it.
    assert (y0, y1, x0, x1) == (0, 3, 6, 10)
    assert lam_c == pytest.approx(1 - 3 * 4 / (h * w))
    assert lam_c != pytest.approx(lam)


def test_cutmix_box_lam_identity_and_some_clipped():
    rng = np.random.default_rng(0)
    h, w = 8, 10
    clipped = 0
    for _ in range(50):
        lam = float(rng.beta(1.0, 1.0))
        y0, y1, x0, x1, lam_c = _cutmix_box(h, w, lam, rng)
        assert 0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w
        assert lam_c == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (h * w))
        ratio = np.sqrt(1 - lam)
        clipped += (y1 - y0) * (x1 - x0) < int(h * ratio) * int(w * ratio)
    assert clipped > 0


def test_cutmix_pastes_exactly_the_box_from_flipped_batch():
    images, y = _batch(h=8, w=10)
    seed = 5
    mixer = Mixer(MixConfig(mode="cutmix", cutmix_alpha=1.0), C, 0.0)
    out, soft = mixer(images, y, generator=np.random.default_rng(seed))
    # Replay the same draws to recover the box.
    rng = np.random.default_rng(seed)
    rng.random()  # the prob draw
    lam0 = float(rng.beta(1.0, 1.0))
    y0, y1, x0, x1, lam = _cutmix_box(8, 10, lam0, rng)
    assert mixer.last_mode == "cutmix" and mixer.last_lam == pytest.approx(lam)
    assert (y1 - y0) * (x1 - x0) > 0
    mask = torch.zeros(8, 10, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    assert torch.equal(out[:, :, mask], images.flip(0)[:, :, mask])
    assert torch.equal(out[:, :, ~mask], images[:, :, ~mask])
    area = mask.float().mean().item()
    assert lam == pytest.approx(1 - area)
    assert torch.allclose(soft, lam * one_hot_smooth(y, C) + (1 - lam) * one_hot_smooth(y.flip(0), C), atol=1e-6)
    assert torch.equal(images, _batch(h=8, w=10)[0])  # input untouched


def test_mode_none_and_prob_zero_leave_images():
    images, y = _batch()
    for cfg in (MixConfig(mode="none"), MixConfig(mode="mixup_cutmix", prob=0.0)):
        mixer = Mixer(cfg, C, 0.1)
        out, soft = mixer(images, y)
        assert torch.equal(out, images)
        assert mixer.last_lam == 1.0 and mixer.last_mode == "none"
        assert torch.allclose(soft, one_hot_smooth(y, C, 0.1))


def test_mixup_cutmix_switches_and_is_reproducible():
    images, y = _batch()
    cfg = MixConfig(mode="mixup_cutmix", switch_prob=0.5, prob=0.8)
    runs = []
    for _ in range(2):
        mixer = Mixer(cfg, C, 0.1, seed=11)
        seq = []
        for _ in range(30):
            out, _ = mixer(images, y)
            seq.append((mixer.last_mode, mixer.last_lam, out.sum().item()))
        runs.append(seq)
    assert runs[0] == runs[1]
    modes = {m for m, _, _ in runs[0]}
    assert modes == {"none", "mixup", "cutmix"}
    # A torch.Generator works too and is deterministic.
    a = Mixer(cfg, C, 0.1)(images, y, generator=torch.Generator().manual_seed(4))
    b = Mixer(cfg, C, 0.1)(images, y, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
