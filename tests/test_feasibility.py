"""trainable.feasibility: the training set's size without torch agrees with what the run
builds, the update count agrees with the run's samplers and loaders, and every run a
config or a space can make is checked before anything is reserved, in one line."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spaces import QUICKSTART, load_space
from tests.conftest import PYTHON, ROOT, cli_env
from trainable.config import ConfigError, DataError, TrainConfig
from trainable.feasibility import (
    CIFAR_FILES,
    DIGITS_TRAIN_PER_CLASS,
    check_config_feasible,
    check_pretrained,
    check_space_feasible,
    subset_class_count,
    subset_size,
    training_set,
    updates_per_epoch,
)


def cfg_of(**sections: dict) -> TrainConfig:
    data: dict = {"model": {"name": "resnet18_vd", "small_input": True}, "data": {"image_size": 16}}
    data.update(sections)
    return TrainConfig.model_validate(data)


def write_folder(root: Path, train: dict[str, int], val: dict[str, int], corrupt: str | None = None) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (i * 20 % 255, 80, 160)).save(d / f"{i}.png")
    if corrupt:
        (root / corrupt).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


# The same arithmetic as the run ----------------------------------------------------------------------
def test_subset_count_is_the_one_the_datasets_use():
    from trainable.datasets import stratified_subset_indices

    rng = np.random.default_rng(0)
    for _ in range(60):
        counts = rng.integers(1, 40, size=int(rng.integers(1, 12)))
        targets = np.repeat(np.arange(len(counts)), counts)
        for fraction in (0.01, 0.1, 0.25, 0.5, 0.35, 0.999, float(rng.uniform(0.001, 1.0))):
            chosen = stratified_subset_indices(targets, fraction)
            assert len(chosen) == subset_size(counts.tolist(), fraction), (counts, fraction)
            per_class = np.bincount(targets[chosen], minlength=len(counts))
            assert per_class.tolist() == [subset_class_count(int(n), fraction) for n in counts]
    # ties round like Python's round(), at least one per class
    assert subset_class_count(5, 0.5) == 2 and subset_class_count(7, 0.5) == 4 and subset_class_count(3, 0.01) == 1


def test_updates_per_epoch_matches_the_samplers_and_loaders_of_a_run():
    """Each worker's drop_last DistributedSampler, a drop_last DataLoader of micro-batches,
    and accum_steps micro-batches per update: what trainable.loop counts."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    checked = 0
    for n, micro, workers, accum in itertools.product((1, 7, 31, 32, 33, 64, 100), (1, 4, 8), (1, 2, 3), (1, 2, 4)):
        gb = micro * workers * accum
        ds = list(range(n))
        lens = {
            len(DataLoader(ds, batch_size=micro, drop_last=True,
                           sampler=DistributedSampler(ds, num_replicas=workers, rank=r, shuffle=True, drop_last=True)))
            for r in range(workers)
        }
        assert len(lens) == 1
        expected = lens.pop() // accum
        assert updates_per_epoch(n, gb, micro, workers) == expected, (n, gb, micro, workers)
        # a whole accumulation makes it as simple as it looks: one update needs global_batch images
        assert (expected >= 1) == (n >= gb)
        checked += 1
    assert checked == 189


def test_digits_class_counts_are_the_datasets_split():
    from trainable.datasets import _digits_arrays

    _, ytr, _, _ = _digits_arrays(8)
    assert tuple(np.bincount(ytr).tolist()) == DIGITS_TRAIN_PER_CLASS
    assert training_set(cfg_of().data).size == len(ytr) == 1437


def test_cifar_layout_is_torchvisions():
    from torchvision.datasets import CIFAR10, CIFAR100

    for kind, cls in (("cifar10", CIFAR10), ("cifar100", CIFAR100)):
        folder, train, test, meta, key = CIFAR_FILES[kind]
        assert (folder, list(train), list(test)) == (
            cls.base_folder, [f for f, _ in cls.train_list], [f for f, _ in cls.test_list])
        assert (meta, key) == (cls.meta["filename"], cls.meta["key"])


def test_cifar_counts_an_extracted_folder_and_knows_the_download(tmp_path):
    from tests.test_data import write_cifar10
    from trainable.datasets import build_datasets

    write_cifar10(tmp_path / "c10", per_batch=5)
    cfg = cfg_of(data={"kind": "cifar10", "root": str(tmp_path / "c10"), "image_size": 32, "val_resize": 32,
                       "subset": 0.5})
    ts = training_set(cfg.data)
    train, _, _ = build_datasets(cfg)
    assert ts.size == 25 and ts.after_subset(0.5) == len(train)

    missing = training_set(cfg_of(data={"kind": "cifar100", "root": str(tmp_path / "none")}).data)
    assert (missing.size, len(missing.class_counts)) == (50000, 100)
    assert not (tmp_path / "none").exists()  # nothing downloaded, nothing made

    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="afile: not a folder"):
        training_set(cfg_of(data={"kind": "cifar10", "root": str(tmp_path / "afile")}).data)
    (tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(DataError, match="cifar-10-batches-py: cannot load cifar10"):
        training_set(cfg.data)


def test_image_folder_counts_readable_images_and_names_the_first_bad_file(tmp_path):
    root = write_folder(tmp_path / "d", {"a": 3, "b": 4}, {"a": 1, "b": 1}, corrupt="train/b/zz.jpg")
    skip = cfg_of(data={"kind": "imagefolder", "root": str(root), "skip_corrupt": True}).data
    assert training_set(skip).class_counts == (3, 4)
    strict = cfg_of(data={"kind": "imagefolder", "root": str(root)}).data
    with pytest.raises(DataError, match=r"train/b/zz\.jpg: corrupt or unreadable image"):
        training_set(strict)


# The checks ----------------------------------------------------------------------------------------
def test_a_global_batch_of_exactly_the_training_set_fits_and_one_more_does_not():
    synthetic = {"kind": "synthetic", "synthetic": {"num_classes": 4, "train_per_class": 8}}  # 32 images
    check_config_feasible(cfg_of(data=synthetic, batch={"global_batch": 32, "micro_batch": 4}), "ok.yaml")
    with pytest.raises(ConfigError) as info:
        check_config_feasible(cfg_of(data=synthetic, batch={"global_batch": 64, "micro_batch": 4}), "big.yaml")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("big.yaml: batch.global_batch: 64 is more than the 32 training images")
    assert "lower it to at most 32" in line


def test_the_check_agrees_with_the_loaders_the_run_builds():
    """At the boundary the run's own loaders give one update; one image less, none."""
    from trainable.data import build_loaders

    for per_class, feasible in ((4, True), (3, False)):  # 2 classes: 8 or 6 images, global batch 8
        cfg = cfg_of(data={"kind": "synthetic", "image_size": 8, "loader_workers": 0,
                           "synthetic": {"num_classes": 2, "train_per_class": per_class, "val_per_class": 1}},
                     batch={"global_batch": 8, "micro_batch": 2}, distributed={"num_workers": 2})
        loaders = build_loaders(cfg, 0, 2, 0)
        assert (len(loaders.train) // cfg.accum_steps >= 1) == feasible
        if feasible:
            check_config_feasible(cfg, "c.yaml")
        else:
            with pytest.raises(ConfigError, match="8 is more than the 6 training images"):
                check_config_feasible(cfg, "c.yaml")


def test_the_fix_it_proposes_fits():
    cfg = cfg_of(data={"subset": 0.1}, batch={"global_batch": 256, "micro_batch": 16})
    with pytest.raises(ConfigError) as info:
        check_config_feasible(cfg, "x.yaml")
    line = str(info.value)
    assert "142 training images (digits, data.subset 0.1 of 1437)" in line
    assert "at most 128 (a multiple of batch.micro_batch 16 x 2 workers)" in line
    assert "raise data.subset to at least 0.178" in line
    check_config_feasible(cfg_of(data={"subset": 0.1}, batch={"global_batch": 128, "micro_batch": 16}), "x.yaml")
    check_config_feasible(cfg_of(data={"subset": 0.178}, batch={"global_batch": 256, "micro_batch": 16}), "x.yaml")
    with pytest.raises(ConfigError):
        check_config_feasible(cfg_of(data={"subset": 0.177}, batch={"global_batch": 256, "micro_batch": 16}), "x.yaml")


def _space(*sets: str):
    return load_space(QUICKSTART, list(sets))


def _space_error(*sets: str) -> str:
    space = _space(*sets)
    with pytest.raises(ConfigError) as info:
        check_space_feasible(space.train, space.search, space.source)
    assert "\n" not in str(info.value)
    return str(info.value).removeprefix(f"{space.source}: ")


def test_the_shipped_quickstart_is_feasible():
    space = _space()
    check_space_feasible(space.train, space.search, space.source)


def test_a_searched_global_batch_names_the_value_and_those_that_fit():
    line = _space_error("train.data.subset=0.05")  # 70 images; choice [32, 64, 128]
    assert line.startswith("search.batch.global_batch: 128 is more than the 70 training images")
    assert line.endswith("values that fit: 32, 64")
    line = _space_error("train.data.subset=0.1", "search.batch.global_batch={int: [32, 256], step: 32}")
    assert line.startswith("search.batch.global_batch: 256") and line.endswith("upper bound to at most 142")


def test_a_conditional_global_batch_also_checks_the_base_value():
    line = _space_error(
        "train.data.subset=0.05", "train.batch.global_batch=128",
        "search.batch.global_batch={choice: [32, 64], when: {mix.mode: [cutmix]}}")
    assert line.startswith("search.batch.global_batch: 128 is more than the 70") and "fit: 32, 64" in line


def test_a_searched_subset_names_the_smallest_that_fits():
    line = _space_error("search.data.subset={uniform: [0.01, 0.5]}")
    assert line.startswith("search.data.subset: 0.01 leaves 10 of the 1437 training images (digits)")
    assert "fewer than batch.global_batch 128" in line and line.endswith("smallest data.subset that fits is 0.089")
    line = _space_error("search.data.subset={choice: [0.01, 0.1, 0.5]}")
    assert line.endswith("(values that fit: 0.1, 0.5)")


def test_the_base_global_batch_when_nothing_batch_related_is_searched():
    line = _space_error("train.data.subset=0.02", "search.batch.global_batch=null")
    assert line.startswith("train.batch.global_batch: 64 is more than the 30 training images")
    assert "raise data.subset to at least 0.045" in line


def test_a_searched_data_key_is_named():
    line = _space_error("train.data.kind=synthetic", "search.batch.global_batch={choice: [128]}",
                        "search.data.synthetic.train_per_class={choice: [1, 100]}")
    assert line.startswith("search.data.synthetic.train_per_class: 1 gives 10 training images")


def test_pretrained_must_be_a_readable_file(tmp_path):
    ckpt = tmp_path / "ok.pt"
    ckpt.write_bytes(b"weights")
    check_pretrained(str(ckpt), "k")
    check_pretrained(None, "k")
    with pytest.raises(ConfigError, match=r"^k: .*missing\.pt: no such file"):
        check_pretrained(str(tmp_path / "missing.pt"), "k")
    with pytest.raises(ConfigError, match="is a folder, not a checkpoint file"):
        check_pretrained(str(tmp_path), "k")
    cfg = cfg_of(model={"name": "resnet18_vd", "pretrained": str(tmp_path / "missing.pt")})
    with pytest.raises(ConfigError, match=r"^c\.yaml: model\.pretrained: "):
        check_config_feasible(cfg, "c.yaml")
    line = _space_error(f"search.model.pretrained={{choice: [null, {ckpt}, {tmp_path / 'gone.pt'}]}}")
    assert line.startswith("search.model.pretrained: ") and "gone.pt: no such file" in line


def test_image_folder_errors_come_from_the_space_check(tmp_path):
    root = write_folder(tmp_path / "d", {"a": 2, "b": 2}, {"a": 1, "c": 1})
    space = _space("train.data.kind=imagefolder", f"train.data.root={root}")
    with pytest.raises(DataError, match="only in train: b; only in val: c"):
        check_space_feasible(space.train, space.search, space.source)


def test_the_check_imports_no_torch(tmp_path):
    code = (
        "import sys\n"
        "from spaces import QUICKSTART, load_space\n"
        "from trainable.feasibility import check_space_feasible\n"
        "s = load_space(QUICKSTART, ['train.data.subset=0.05'])\n"
        "try:\n"
        "    check_space_feasible(s.train, s.search, s.source)\n"
        "except Exception as e:\n"
        "    print(e)\n"
        "assert not [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]\n"
    )
    r = subprocess.run([PYTHON, "-c", code], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "values that fit: 32, 64" in r.stdout
