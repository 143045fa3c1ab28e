"""The data cache: an image folder indexed once and reused while it is unchanged, digits
and CIFAR decoded once per machine, every entry whole or absent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_data import folder_cfg, make_cfg, make_tree, write_cifar10
from trainable import datasets, imagefolder
from trainable.datacache import CACHE_ENV, cached_arrays, data_cache_dir
from trainable.datasets import build_datasets
from trainable.imagefolder import index_image_folder


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(path))
    datasets._digits_arrays.cache_clear()
    yield path
    datasets._digits_arrays.cache_clear()


def age(root: Path, seconds: float = 60.0) -> None:
    """Make every folder and file under root look `seconds` old (a settled data set)."""
    t = time.time() - seconds
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (t, t))
        os.utime(dirpath, (t, t))


def no_header_reads(monkeypatch) -> None:
    def probe(path: str) -> None:
        raise AssertionError(f"read the header of {path}")

    monkeypatch.setattr(imagefolder, "_probe", probe)


# image folder --------------------------------------------------------------------------------------
def test_folder_index_is_reused_while_the_folder_is_unchanged(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "ds")
    age(root)
    first = index_image_folder(str(root), skip_corrupt=True)
    assert first.train.skipped == 1 and len(first.train.paths) == 12
    assert len(list((cache / "imagefolder").glob("*.json"))) == 1
    with monkeypatch.context() as m:
        no_header_reads(m)
        again = index_image_folder(str(root), skip_corrupt=True)
    assert again == first
    train, _, classes = build_datasets(folder_cfg(root, skip_corrupt=True))  # what a rank reads
    assert train.paths == first.train.paths and train.skipped == 1 and classes == ["cat", "dog", "fox"]


def test_folder_index_sees_added_removed_and_renamed_files(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "ds", corrupt=False)
    (root / "train" / "dog" / "deep").mkdir()
    age(root)
    base = index_image_folder(str(root), skip_corrupt=False)
    # a file added in a nested folder
    src = root / "train" / "dog" / "a.jpg"
    (root / "train" / "dog" / "deep" / "new.jpg").write_bytes(src.read_bytes())
    added = index_image_folder(str(root), skip_corrupt=False)
    assert str(root / "train" / "dog" / "deep" / "new.jpg") in added.train.paths
    assert len(added.train.paths) == len(base.train.paths) + 1
    age(root)
    index_image_folder(str(root), skip_corrupt=False)
    # a file renamed, a file removed
    (root / "val" / "cat" / "a.jpg").rename(root / "val" / "cat" / "z.jpg")
    (root / "train" / "fox" / "b.PNG").unlink()
    changed = index_image_folder(str(root), skip_corrupt=False)
    assert str(root / "val" / "cat" / "z.jpg") in changed.val.paths
    assert str(root / "val" / "cat" / "a.jpg") not in changed.val.paths
    assert str(root / "train" / "fox" / "b.PNG") not in changed.train.paths


def test_a_folder_still_being_written_is_not_cached(tmp_path, cache):
    root = make_tree(tmp_path / "ds", corrupt=False)  # just written
    index_image_folder(str(root), skip_corrupt=False)
    assert not (cache / "imagefolder").exists() or not list((cache / "imagefolder").iterdir())


def test_strict_and_skipping_indexes_are_kept_apart(tmp_path):
    from trainable.config import DataError

    root = make_tree(tmp_path / "ds")  # with a corrupt file
    age(root)
    index_image_folder(str(root), skip_corrupt=True)
    with pytest.raises(DataError, match="x.jpg"):
        index_image_folder(str(root), skip_corrupt=False)


def test_damaged_or_unwritable_cache_only_costs_a_scan(tmp_path, cache, monkeypatch):
    root = make_tree(tmp_path / "ds", corrupt=False)
    age(root)
    first = index_image_folder(str(root), skip_corrupt=False)
    (entry,) = (cache / "imagefolder").glob("*.json")
    entry.write_text('{"format": 1, "root": ')
    assert index_image_folder(str(root), skip_corrupt=False) == first
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv(CACHE_ENV, str(blocked))
    assert index_image_folder(str(root), skip_corrupt=False) == first


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_cache_dir() == tmp_path / "xdg" / "trick-search"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data_cache_dir() == Path("~/.cache/trick-search").expanduser()


# decoded data sets -------------------------------------------------------------------------------------
def test_digits_are_made_once_and_then_need_no_scikit_learn(cache):
    made = datasets._make_digits_arrays(24)
    cached = datasets._digits_arrays(24)
    for a, b in zip(made, cached):
        assert np.array_equal(a, b) and a.dtype == b.dtype
    code = (
        "import sys\n"
        "from trainable.config import TrainConfig\n"
        "from trainable.datasets import build_datasets\n"
        "tr, va, _ = build_datasets(TrainConfig.model_validate({'data': {'kind': 'digits', 'image_size': 24}}))\n"
        "print('SIZES', len(tr), len(va), 'sklearn' in sys.modules)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), CACHE_ENV: str(cache)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert "SIZES 1437 360 False" in out.stdout, out.stdout + out.stderr


def test_cifar_is_unpickled_once_then_memory_mapped(tmp_path, monkeypatch):
    written = write_cifar10(tmp_path / "c10")
    age(tmp_path / "c10")
    cfg = make_cfg(data={"kind": "cifar10", "root": str(tmp_path / "c10"), "image_size": 32, "val_resize": 32})
    train, val, classes = build_datasets(cfg)

    def unpickle(*args, **kwargs):
        raise AssertionError("unpickled the archive again")

    monkeypatch.setattr(datasets._LocalCIFAR10, "__init__", unpickle)
    train2, val2, classes2 = build_datasets(cfg)
    assert classes2 == classes and isinstance(train2.images, np.memmap) and not train2.images.flags.writeable
    assert np.array_equal(train2.images, train.images) and np.array_equal(train2.targets, train.targets)
    assert np.array_equal(val2.images[2].transpose(2, 0, 1).reshape(-1), written["test_batch"][2])
    img, label = val2[2]
    assert np.array_equal(img.numpy(), written["test_batch"][2].reshape(3, 32, 32)) and label == val.targets[2]


def test_changed_cifar_files_are_read_again(tmp_path):
    write_cifar10(tmp_path / "c10")
    age(tmp_path / "c10")
    cfg = make_cfg(data={"kind": "cifar10", "root": str(tmp_path / "c10"), "image_size": 32})
    build_datasets(cfg)
    rewritten = write_cifar10(tmp_path / "other")  # a different archive in the same place
    for f in (tmp_path / "other" / "cifar-10-batches-py").iterdir():
        os.replace(f, tmp_path / "c10" / "cifar-10-batches-py" / f.name)
    age(tmp_path / "c10", 30)
    second, _, _ = build_datasets(cfg)
    assert np.array_equal(second.images[0].transpose(2, 0, 1).reshape(-1), rewritten["data_batch_1"][0])


def test_cached_arrays_whole_or_absent(cache):
    calls = []

    def make():
        calls.append(1)
        return {"x": np.arange(6, dtype=np.uint8).reshape(2, 3), "names": np.asarray(["a", "bb"])}

    a = cached_arrays("t", {"v": 1}, make)
    b = cached_arrays("t", {"v": 1}, make, mmap=True)
    c = cached_arrays("t", {"v": 2}, make)  # another stamp: made again
    assert len(calls) == 2
    assert np.array_equal(a["x"], b["x"]) and list(b["names"]) == ["a", "bb"] and np.array_equal(c["x"], a["x"])
    folders = sorted(p.name for p in (cache / "arrays").iterdir())
    assert len(folders) == 2 and not any(n.startswith(".") for n in folders)
    for f in (cache / "arrays").iterdir():
        (f / "stamp.json").unlink()  # an entry cut short is made again
    cached_arrays("t", {"v": 1}, make)
    assert len(calls) == 3
    cached_arrays("t", {"v": 1}, make)  # and kept whole again
    assert len(calls) == 3
