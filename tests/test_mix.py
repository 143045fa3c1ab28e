import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from trainable.config import MixConfig
from trainable.mix import Mixer

C = 7


def _batch(n=6, h=8, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, h, w, generator=g)
    targets = torch.randint(0, C, (n,), generator=g)
    return images, targets


def _one_hot_smooth(y, num_classes, s=0.0):
    """Reference: (1-s) * onehot + s / num_classes, float32."""
    return (1 - s) * F.one_hot(y, num_classes).float() + s / num_classes


def _soft_ce(logits, soft):
    """Reference: batch mean of -sum_c soft[c] * log_softmax(logits)[c]."""
    return torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _copy(generator):
    g = torch.Generator()
    g.set_state(generator.get_state())
    return g


def _seeded(seed, fn):
    """Run fn with torch's global CPU generator seeded as Mixer.apply seeds it."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return fn()


def _draw_until(mixer, mode, seed=0):
    """A fresh generator and the seed of the first call on it that draws `mode`."""
    g = _gen(seed)
    for _ in range(100):
        before = _copy(g)
        m, s = mixer.draw(g)
        if m == mode:
            return before, s
    raise AssertionError(f"{mode} never drawn")


# Loss --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("lam", [1.0, 0.37])
def test_cross_entropy_label_smoothing_equals_smoothed_then_mixed_soft_ce(s, lam):
    g = _gen(1)
    logits = torch.randn(9, C, generator=g) * 3
    a, b = torch.randint(0, C, (9,), generator=g), torch.randint(0, C, (9,), generator=g)
    smoothed_then_mixed = lam * _one_hot_smooth(a, C, s) + (1 - lam) * _one_hot_smooth(b, C, s)
    ref = _soft_ce(logits, smoothed_then_mixed)
    mixed = lam * _one_hot_smooth(a, C) + (1 - lam) * _one_hot_smooth(b, C)
    ours = F.cross_entropy(logits, mixed, label_smoothing=s)
    assert torch.allclose(ours, ref, atol=1e-6, rtol=0)
    if lam == 1.0:  # and the reference is torch's class-index label smoothing
        assert torch.allclose(ref, F.cross_entropy(logits, a, label_smoothing=s), atol=1e-6, rtol=0)


def test_smoothing_then_mixing_equals_mixing_then_smoothing():
    g = _gen(2)
    a, b = torch.randint(0, C, (16,), generator=g), torch.randint(0, C, (16,), generator=g)
    s, lam = 0.1, 0.37
    smooth_then_mix = lam * _one_hot_smooth(a, C, s) + (1 - lam) * _one_hot_smooth(b, C, s)
    mixed = lam * _one_hot_smooth(a, C) + (1 - lam) * _one_hot_smooth(b, C)
    mix_then_smooth = (1 - s) * mixed + s / C
    assert torch.allclose(smooth_then_mix, mix_then_smooth, atol=1e-6, rtol=0)


def test_mixer_loss_smooths_exactly_once():
    images, y = _batch()
    s = 0.2
    mixer = Mixer(MixConfig(mode="mixup", mixup_alpha=0.4), C, label_smoothing=s)
    _, soft = mixer(images, y, generator=_gen(3))
    # Targets come back unsmoothed: only the two mixed classes are non-zero.
    assert ((soft > 0).sum(1) <= 2).all() and (soft.max(1).values < 1).any()
    logits = torch.randn(len(y), C, generator=_gen(4)).mul(3).to(torch.bfloat16)
    loss = mixer.loss(logits, soft)
    once = _soft_ce(logits.float(), (1 - s) * soft + s / C)
    twice = _soft_ce(logits.float(), (1 - s) * ((1 - s) * soft + s / C) + s / C)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, once, atol=1e-6, rtol=0)
    assert not torch.allclose(loss, twice, atol=1e-3, rtol=0)


# Mixup -------------------------------------------------------------------------------------------
def test_mixup_is_convex_combination_with_roll():
    images, y = _batch()
    mixer = Mixer(MixConfig(mode="mixup", mixup_alpha=1.0), C, 0.1)
    g = _gen(0)
    mode, seed = mixer.draw(_copy(g))
    out, soft = mixer(images, y, generator=g)
    lam = _seeded(seed, lambda: v2.MixUp(alpha=1.0, num_classes=C).make_params([images])["lam"])
    assert mode == "mixup" and 0.0 < lam < 1.0
    assert torch.equal(out, lam * images + (1 - lam) * images.roll(1, 0))
    onehot = _one_hot_smooth(y, C)
    assert torch.equal(soft, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    assert soft.dtype == torch.float32 and (soft >= 0).all()
    assert torch.allclose(soft.sum(1), torch.ones(len(y)), atol=1e-6)
    assert torch.equal(images, _batch()[0])  # input untouched


# Cutmix ------------------------------------------------------------------------------------------
def _reference_box(h, w, alpha, seed):
    """The raw draws (lam, centre) replayed, and the box of half-size int(sqrt(1-lam)/2 * side)
    around the centre clipped to the image; lam corrected to the clipped area."""

    def raw():
        lam = float(torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])).sample(()))
        return lam, int(torch.randint(w, (1,))), int(torch.randint(h, (1,)))

    lam, cx, cy = _seeded(seed, raw)
    r = 0.5 * math.sqrt(1.0 - lam)
    hw, hh = int(r * w), int(r * h)
    x0, x1 = max(cx - hw, 0), min(cx + hw, w)
    y0, y1 = max(cy - hh, 0), min(cy + hh, h)
    return lam, (x0, y0, x1, y1), 1.0 - (x1 - x0) * (y1 - y0) / (h * w), (2 * hw) * (2 * hh)


def test_cutmix_box_clipped_and_lam_corrected():
    h, w = 8, 10
    images = torch.zeros(2, 3, h, w)
    cutmix = v2.CutMix(alpha=1.0, num_classes=C)
    clipped = 0
    for seed in range(200):
        params = _seeded(seed, lambda: cutmix.make_params([images]))
        lam, box, lam_c, unclipped_area = _reference_box(h, w, 1.0, seed)
        assert params["box"] == box
        x0, y0, x1, y1 = box
        assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h
        assert params["lam_adjusted"] == lam_c
        area = (x1 - x0) * (y1 - y0)
        if area < unclipped_area:
            clipped += 1
            assert lam_c > lam + 1e-6
    assert clipped > 10


def test_cutmix_pastes_exactly_the_box_from_rolled_batch():
    h, w = 8, 10
    images, y = _batch(h=h, w=w)
    mixer = Mixer(MixConfig(mode="cutmix", cutmix_alpha=1.0), C, 0.0)
    g, seed = _draw_until(mixer, "cutmix", seed=5)
    out, soft = mixer(images, y, generator=g)
    _, (x0, y0, x1, y1), lam, _ = _reference_box(h, w, 1.0, seed)
    assert (y1 - y0) * (x1 - x0) > 0
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    assert torch.equal(out[:, :, mask], images.roll(1, 0)[:, :, mask])
    assert torch.equal(out[:, :, ~mask], images[:, :, ~mask])
    assert lam == 1 - mask.sum().item() / mask.numel()
    onehot = _one_hot_smooth(y, C)
    assert torch.equal(soft, lam * onehot + (1 - lam) * onehot.roll(1, 0))
    assert torch.equal(images, _batch(h=h, w=w)[0])  # input untouched


_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=_CUDA)])
@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_channels_last_kept_and_values_equal(mode, device):
    images, y = _batch(n=5, h=9, w=11)
    mixer = Mixer(MixConfig(mode=mode), C, 0.0)
    out, soft = mixer(images, y, generator=_gen(8))
    assert not torch.equal(out, images)
    cl = images.to(device).contiguous(memory_format=torch.channels_last)
    out_cl, soft_cl = mixer(cl, y.to(device), generator=_gen(8))
    assert out_cl.device.type == soft_cl.device.type == device
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    if device == "cpu":
        assert torch.equal(out_cl, out) and torch.equal(soft_cl, soft)
    else:
        assert torch.allclose(out_cl.cpu(), out, atol=1e-6, rtol=0)
        assert torch.allclose(soft_cl.cpu(), soft, atol=1e-6, rtol=0)


@_CUDA
@pytest.mark.parametrize("mode", ["none", "mixup", "cutmix"])
def test_cuda_batch_needs_no_host_device_sync(mode):
    images, y = _batch()
    images, y = images.cuda(), y.cuda()
    mixer = Mixer(MixConfig(mode=mode), C, 0.1)
    logits = torch.randn(len(y), C, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, soft = mixer(images, y, generator=_gen(0))
        loss = mixer.loss(logits, soft)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and soft.is_cuda and loss.is_cuda


def test_images_must_be_a_batch():
    images, y = _batch()
    for mode in ("mixup", "cutmix"):
        with pytest.raises(ValueError, match="4 dims"):
            Mixer(MixConfig(mode=mode), C)(images[0], y[:3], generator=_gen(0))


# Choice of mode, reproducibility ---------------------------------------------------------------
def test_mode_none_and_prob_zero_leave_images():
    images, y = _batch()
    for cfg in (MixConfig(mode="none"), MixConfig(mode="mixup_cutmix", prob=0.0)):
        mixer = Mixer(cfg, C, 0.1)
        assert mixer.draw(_gen(0))[0] == "none"
        out, soft = mixer(images, y, generator=_gen(0))
        assert out is images
        assert torch.equal(soft, _one_hot_smooth(y, C))


def test_prob_and_switch_prob_frequencies():
    n = 4000
    mixer = Mixer(MixConfig(mode="mixup_cutmix", prob=0.3, switch_prob=0.25), C)
    g = _gen(9)
    modes = [mixer.draw(g)[0] for _ in range(n)]
    mixed = n - modes.count("none")
    cut = modes.count("cutmix")

    def within(k, m, p):  # binomial count within 4 standard deviations
        return abs(k - m * p) < 4 * math.sqrt(m * p * (1 - p))

    assert within(mixed, n, 0.3)
    assert within(cut, mixed, 0.25)


def test_mixup_cutmix_switches_and_is_reproducible():
    images, y = _batch()
    cfg = MixConfig(mode="mixup_cutmix", switch_prob=0.5, prob=0.8)
    runs = []
    for _ in range(2):
        mixer, g = Mixer(cfg, C, 0.1), _gen(11)
        seq = []
        for _ in range(30):
            mode, _ = mixer.draw(_copy(g))
            out, soft = mixer(images, y, generator=g)
            seq.append((mode, out, soft))
        runs.append(seq)
    assert all(m0 == m1 and torch.equal(o0, o1) and torch.equal(s0, s1) for (m0, o0, s0), (m1, o1, s1) in zip(*runs))
    assert {m for m, _, _ in runs[0]} == {"none", "mixup", "cutmix"}
    mixed = [soft for mode, _, soft in runs[0] if mode != "none"]
    assert any(not torch.equal(mixed[0], soft) for soft in mixed[1:])  # lambda varies per call


def test_randomness_only_from_passed_generator():
    images, y = _batch()
    mixer = Mixer(MixConfig(mode="mixup_cutmix", prob=1.0), C)
    outs = []
    with torch.random.fork_rng(devices=[]):
        for global_seed in (0, 1):
            torch.default_generator.manual_seed(global_seed)
            before = torch.get_rng_state()
            outs.append(mixer(images, y, generator=_gen(12)))
            assert torch.equal(torch.get_rng_state(), before)  # global stream left as it was
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    # Resume: a generator restored from a saved state continues identically.
    g = _gen(13)
    mixer(images, y, generator=g)
    state = g.get_state()
    a = mixer(images, y, generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    b = mixer(images, y, generator=g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_generator_must_be_a_cpu_torch_generator():
    import numpy as np

    images, y = _batch()
    mixer = Mixer(MixConfig(mode="mixup"), C)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        mixer(images, y, generator=np.random.default_rng(0))
    with pytest.raises(TypeError):
        mixer(images, y)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"label_smoothing": 1.0}, {"label_smoothing": -0.1}])
def test_invalid_arguments(kwargs):
    args = {"num_classes": C, "label_smoothing": 0.0} | kwargs
    with pytest.raises(ValueError):
        Mixer(MixConfig(), **args)
