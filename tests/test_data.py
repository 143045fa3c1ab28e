"""trainable.data, datasets, transforms: dataset kinds, corrupt files, subsets, sharding, transforms, normalize."""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import trainable.transforms
from models import ModelDataConfig, data_config
from trainable.config import TrainConfig
from trainable.data import build_loaders, denormalize, normalize
from trainable.datasets import DataError, build_datasets
from trainable.transforms import val_resize_px


def make_cfg(**sections: Any) -> TrainConfig:
    data: dict[str, Any] = {
        "model": {"name": "resnet18_vd", "small_input": True},
        "data": {"image_size": 32, "loader_workers": 0},
        "augment": {"hflip": 0.0, "crop_scale": [0.35, 1.0]},
        "batch": {"global_batch": 8, "micro_batch": 4},
        "distributed": {"num_workers": 2},
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return TrainConfig.model_validate(data)


def as_array(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


# digits ----------------------------------------------------------------------------------------
def test_digits_sizes_dtype_shape_and_fixed_split():
    cfg = make_cfg(data={"kind": "digits", "image_size": 24})
    train, val, classes = build_datasets(cfg)
    assert (len(train), len(val)) == (1437, 360)
    assert classes == [str(d) for d in range(10)]
    img, label = val[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and isinstance(label, int)
    img, label = train[5]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and 0 <= label < 10
    # stratified 80/20: every class has about a fifth of its images in val
    counts_val, counts_all = Counter(val.targets.tolist()), Counter(train.targets.tolist() + val.targets.tolist())
    for c in range(10):
        assert abs(counts_val[c] - 0.2 * counts_all[c]) <= 1
    # the same split and pixels on a second build (also with another run seed)
    train2, val2, _ = build_datasets(make_cfg(data={"kind": "digits", "image_size": 24}, run={"seed": 7}))
    assert np.array_equal(train.targets, train2.targets) and np.array_equal(val.targets, val2.targets)
    for i in (0, 100, 359):
        assert torch.equal(val[i][0], val2[i][0])
    # real digits, scaled to 0..255: dark background, bright strokes
    px = val[0][0]
    assert int(px.max()) > 200 and int(px.min()) == 0


def test_subset_is_stratified_deterministic_and_keeps_every_class():
    full, _, _ = build_datasets(make_cfg(data={"kind": "digits"}))
    per_class = Counter(full.targets.tolist())
    sub, _, _ = build_datasets(make_cfg(data={"kind": "digits", "subset": 0.2}))
    got = Counter(sub.targets.tolist())
    for c, n in per_class.items():
        assert got[c] == max(1, round(0.2 * n))
    sub2, _, _ = build_datasets(make_cfg(data={"kind": "digits", "subset": 0.2}, run={"seed": 99}))
    assert np.array_equal(sub.indices, sub2.indices)
    # the subset's images are the base set's images at those indices
    i = 3
    base_idx = int(sub.indices[i])
    assert sub.targets[i] == full.targets[base_idx]
    tiny, _, _ = build_datasets(make_cfg(data={"kind": "digits", "subset": 0.001}))
    assert sorted(Counter(tiny.targets.tolist()).values()) == [1] * 10


# imagefolder --------------------------------------------------------------------------------------
def _write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None}[mode]
    shape = (size[1], size[0]) if channels is None else (size[1], size[0], channels)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


def make_tree(root: Path, classes=("cat", "dog", "fox"), corrupt: bool = True) -> Path:
    specs = [("a.jpg", (40, 30), "RGB"), ("b.PNG", (23, 51), "L"), ("c.JPEG", (64, 48), "RGB"), ("d.png", (30, 30), "RGBA")]
    for split, n in (("train", 4), ("val", 2)):
        for ci, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for k, (name, size, mode) in enumerate(specs[:n]):
                _write_image(d / name, size, mode, seed=100 * ci + k)
    (root / "train" / "cat" / "notes.txt").write_text("not an image, ignored\n")
    if corrupt:
        (root / "train" / "dog" / "x.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    return root


def folder_cfg(root: Path, **data: Any) -> TrainConfig:
    return make_cfg(data={"kind": "imagefolder", "root": str(root), "image_size": 16, **data})


def test_imagefolder_corrupt_file_raises_naming_it(tmp_path):
    root = make_tree(tmp_path / "ds")
    with pytest.raises(DataError) as err:
        build_datasets(folder_cfg(root))
    msg = str(err.value)
    assert str(root / "train" / "dog" / "x.jpg") in msg and "skip_corrupt" in msg and "\n" not in msg


def test_imagefolder_skip_corrupt_counts_and_loads_everything(tmp_path):
    root = make_tree(tmp_path / "ds")
    train, val, classes = build_datasets(folder_cfg(root, skip_corrupt=True))
    assert classes == ["cat", "dog", "fox"]
    assert (len(train), len(val)) == (12, 6)  # notes.txt ignored, x.jpg skipped
    assert train.skipped + val.skipped == 1
    assert not any(p.endswith(("x.jpg", "notes.txt")) for p in train.paths)
    assert Counter(train.targets.tolist()) == {0: 4, 1: 4, 2: 4}
    for ds in (train, val):
        for i in range(len(ds)):
            img, label = ds[i]
            assert img.dtype == torch.uint8 and img.shape == (3, 16, 16) and label == ds.targets[i]
    loaders = build_loaders(folder_cfg(root, skip_corrupt=True), rank=0, world_size=1, seed=0)
    assert loaders.skipped == 1 and loaders.num_train == 12 and loaders.num_classes == 3


def test_imagefolder_decode_failure_at_load_time(tmp_path):
    root = make_tree(tmp_path / "ds", corrupt=False)
    good = root / "train" / "dog" / "c.JPEG"
    data = good.read_bytes()
    bad = root / "train" / "dog" / "b2.jpg"  # header fine, data truncated: passes the up-front check
    bad.write_bytes(data[: len(data) // 3])
    train, _, _ = build_datasets(folder_cfg(root))
    i = train.paths.index(str(bad))
    with pytest.raises(DataError, match="b2.jpg"):
        train[i]
    train, _, _ = build_datasets(folder_cfg(root, skip_corrupt=True))
    assert train.skipped == 0
    img, label = train[i]  # substituted by the next image, deterministically
    assert label == 1 and img.shape == (3, 16, 16)
    assert train.paths[i + 1] == str(good)
    torch.manual_seed(0)
    a = train[i][0]
    torch.manual_seed(0)
    b = train[i + 1][0]
    assert torch.equal(a, b)


def test_imagefolder_val_class_mismatch_names_classes(tmp_path):
    root = make_tree(tmp_path / "ds", corrupt=False)
    (root / "val" / "fox").rename(root / "val" / "wolf")
    with pytest.raises(DataError) as err:
        build_datasets(folder_cfg(root))
    msg = str(err.value)
    assert "only in train: fox" in msg and "only in val: wolf" in msg and str(root / "val") in msg


def test_imagefolder_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        build_datasets(folder_cfg(tmp_path / "nope"))
    root = make_tree(tmp_path / "ds", corrupt=False)
    for f in (root / "val" / "dog").iterdir():
        f.unlink()
    with pytest.raises(DataError) as err:
        build_datasets(folder_cfg(root))
    assert str(root / "val" / "dog") in str(err.value) and "no images" in str(err.value)
    (root / "val").rename(root / "validation")
    with pytest.raises(DataError) as err:
        build_datasets(folder_cfg(root))
    assert str(root / "val") in str(err.value) and "missing" in str(err.value)


# cifar10 ----------------------------------------------------------------------------------------
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
    """An archive in the CIFAR-10 python format (as torchvision reads it: pickles with
    `data` (N, 3072) uint8 and `labels`, and `batches.meta` with `label_names`)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written: dict[str, np.ndarray] = {}

    def dump(name: str, n: int) -> None:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f, protocol=2)
        written[name] = data

    for k in range(1, 6):
        dump(f"data_batch_{k}", per_batch)
    dump("test_batch", n_test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}, f, protocol=2)
    return written


def test_cifar10_loads_test_archive_without_network(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tried to download")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    written = write_cifar10(tmp_path / "c10")
    cfg = make_cfg(data={"kind": "cifar10", "root": str(tmp_path / "c10"), "image_size": 32, "val_resize": 32})
    train, val, classes = build_datasets(cfg)
    assert classes == CIFAR_CLASSES and (len(train), len(val)) == (20, 6)
    img, label = val[2]
    expected = written["test_batch"][2].reshape(3, 32, 32)
    assert img.dtype == torch.uint8 and np.array_equal(img.numpy(), expected)
    assert isinstance(label, int)
    assert train[0][0].shape == (3, 32, 32)


def test_cifar10_missing_file_would_download(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tv_cifar

    calls: list[Any] = []

    def offline(*args: Any, **kwargs: Any) -> None:
        calls.append(args)
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    write_cifar10(tmp_path / "c10")
    (tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_3").unlink()
    cfg = make_cfg(data={"kind": "cifar10", "root": str(tmp_path / "c10")})
    with pytest.raises(DataError, match="cifar-10-batches-py: cannot load cifar10"):
        build_datasets(cfg)
    assert len(calls) == 1


# loaders ----------------------------------------------------------------------------------------
def synth_cfg(**over: Any) -> TrainConfig:
    data = {"kind": "synthetic", "image_size": 16, "synthetic": {"num_classes": 3, "train_per_class": 8, "val_per_class": 5}}
    data.update(over)
    return make_cfg(data=data)


def test_loaders_world_size_2_shard_val_exactly_once_and_shuffle_per_epoch():
    cfg = synth_cfg()
    seen_val: list[int] = []
    val_images = 0
    train_epoch0: list[list[int]] = []
    for rank in range(2):
        ld = build_loaders(cfg, rank=rank, world_size=2, seed=3)
        assert ld.num_val == 15 and ld.num_train == 24 and ld.num_classes == 3
        assert ld.val.batch_size == 8 and ld.train.batch_size == 4 and ld.train.drop_last
        seen_val.extend(ld.val.dataset.indices)
        for images, labels in ld.val:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 16, 16)
            val_images += len(labels)
        ld.train_sampler.set_epoch(0)
        e0 = list(ld.train_sampler)
        ld.train_sampler.set_epoch(1)
        e1 = list(ld.train_sampler)
        assert e0 != e1 and sorted(e0) != list(range(24))  # a rank's share, reshuffled
        assert len(ld.train) == 12 // 4
        train_epoch0.append(e0)
        batches = list(ld.train)
        assert len(batches) == 3 and all(b[0].shape == (4, 3, 16, 16) for b in batches)
    assert sorted(seen_val) == list(range(15)) and val_images == 15
    assert not set(train_epoch0[0]) & set(train_epoch0[1])


def test_loaders_with_a_worker_process():
    ld = build_loaders(synth_cfg(loader_workers=1), rank=0, world_size=1, seed=0)
    assert ld.train.persistent_workers and ld.train.num_workers == 1
    images, labels = next(iter(ld.train))
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.uint8


def test_loaders_too_few_images_for_a_micro_batch():
    cfg = make_cfg(
        data={"kind": "synthetic", "synthetic": {"num_classes": 2, "train_per_class": 1, "val_per_class": 1}}
    )
    with pytest.raises(DataError, match="no full micro-batch"):
        build_loaders(cfg, rank=0, world_size=2, seed=0)


# synthetic ----------------------------------------------------------------------------------------
def test_synthetic_is_learnable_by_nearest_class_mean_and_deterministic():
    cfg = make_cfg(
        data={"kind": "synthetic", "image_size": 16, "synthetic": {"num_classes": 10, "train_per_class": 15, "val_per_class": 8}}
    )
    train, val, classes = build_datasets(cfg)
    assert len(classes) == 10 and (len(train), len(val)) == (150, 80)
    # raw pixels, both sets through the (deterministic) val transform
    xtr = np.stack([val.transform(train.load(i)).numpy().astype(np.float32).ravel() for i in range(len(train))])
    means = np.stack([xtr[train.targets == c].mean(0) for c in range(10)])
    xva = np.stack([val[i][0].numpy().astype(np.float32).ravel() for i in range(len(val))])
    pred = ((xva[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    acc = float((pred == val.targets).mean())
    assert acc >= 0.9, acc  # chance is 0.1
    train2, val2, _ = build_datasets(cfg)
    for i in (0, 77, 149):
        assert np.array_equal(np.asarray(train.load(i)), np.asarray(train2.load(i)))
    assert torch.equal(val[5][0], val2[5][0])
    # images differ within a class (noise, jitter): not one picture repeated
    assert not np.array_equal(np.asarray(train.load(0)), np.asarray(train.load(1)))


# normalize ------------------------------------------------------------------------------------------
IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


@pytest.mark.parametrize("name", ["resnet18_vd", "resnet50_vd", "resnet50"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_matches_naive(name, channels_last):
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN_255).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(1, 3, 1, 1)
    want = (x.float() - mean) / std
    got = normalize(x, data_config(name), channels_last=channels_last)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    # bit for bit what the fused op gave with the former 0..255-scale ImageNet constants
    m64 = torch.tensor(IMAGENET_MEAN_255, dtype=torch.float64).view(1, 3, 1, 1)
    s64 = torch.tensor(IMAGENET_STD_255, dtype=torch.float64).view(1, 3, 1, 1)
    before = torch.addcmul((-m64 / s64).float(), x, (1.0 / s64).float())
    assert torch.equal(got, before)
    with pytest.raises(ValueError):
        normalize(x.float(), data_config(name), channels_last=False)
    with pytest.raises(ValueError, match="uint8"):
        normalize(x[:, :1], data_config(name))


def test_normalize_uses_the_data_config_mean_and_std():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    imagenet = data_config("resnet50_vd")
    other = ModelDataConfig(mean=(0.5, 0.25, 0.0), std=(0.5, 0.125, 1.0))
    got = normalize(x, other)
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (other.mean, other.std))
    torch.testing.assert_close(got, ((x.double() / 255 - mean) / std).float(), rtol=1e-6, atol=1e-6)
    assert got[:, 2].min() >= 0 and got[:, 2].max() <= 1  # mean 0, std 1: x / 255
    assert (got - normalize(x, imagenet)).abs().amax(dim=(0, 2, 3)).min() > 0.1  # every channel moved
    # the per-(device, mean, std) cache does not hand one config's constants to another
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN_255, IMAGENET_STD_255))
    torch.testing.assert_close(normalize(x, imagenet), (x.float() - mean) / std, rtol=1e-5, atol=1e-5)
    grey = ModelDataConfig(mean=(0.5,), std=(0.25,), input_size=(1, 8, 8))
    g = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(normalize(g, grey), (g.float() / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_denormalize_inverts_normalize():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    for cfg in (data_config("resnet50_vd"), ModelDataConfig(mean=(0.5, 0.25, 0.0), std=(0.5, 0.125, 1.0))):
        torch.testing.assert_close(denormalize(normalize(x, cfg), cfg), x.float() / 255, rtol=0, atol=1e-5)


def test_val_resize_follows_the_model_crop_pct(monkeypatch):
    cfg = make_cfg(data={"kind": "digits", "image_size": 32}, model={"name": "resnet50"})
    assert data_config("resnet50").crop_pct == 0.875
    assert val_resize_px(cfg) == 37  # round(32 / 0.875): as before the data configs
    loaders = build_loaders(cfg, 0, 2, seed=0)
    assert loaders.data_config == data_config("resnet50")

    monkeypatch.setattr(trainable.transforms, "data_config", lambda name: ModelDataConfig(crop_pct=0.5))
    assert val_resize_px(cfg) == 64
    _, val, _ = build_datasets(cfg)
    assert val.transform.transforms[0].size == [64]
    assert val[0][0].shape == (3, 32, 32)
    explicit = make_cfg(data={"kind": "digits", "image_size": 32, "val_resize": 40})
    assert val_resize_px(explicit) == 40


# transforms ------------------------------------------------------------------------------------------
def test_train_transform_random_val_transform_fixed():
    cfg = make_cfg(
        data={"kind": "digits", "image_size": 24},
        augment={"randaugment": {"enabled": True, "magnitude": 9}},
        mix={"mode": "none"},
    )
    train, val, _ = build_datasets(cfg)
    a, b = train[10][0], train[10][0]
    assert not torch.equal(a, b)
    assert torch.equal(val[10][0], val[10][0])


def test_every_augmentation_on_keeps_shape_and_dtype():
    cfg = make_cfg(
        data={"kind": "synthetic", "image_size": 20},
        augment={
            "hflip": 0.5,
            "color_jitter": {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4},
            "randaugment": {"enabled": True, "num_ops": 2, "magnitude": 15},
            "grayscale_prob": 0.5,
            "blur_prob": 0.5,
            "erasing_prob": 0.5,
        },
    )
    train, _, _ = build_datasets(cfg)
    names = [type(t).__name__ for t in train.transform.transforms]
    assert names == [
        "RandomResizedCrop", "RandomHorizontalFlip", "ColorJitter", "RandAugment", "RandomGrayscale",
        "RandomApply", "ToImage", "RandomErasing", "ToPureTensor",
    ]
    for i in range(0, len(train), 97):
        img, _ = train[i]
        assert type(img) is torch.Tensor and img.dtype == torch.uint8 and img.shape == (3, 20, 20)
