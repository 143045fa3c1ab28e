"""Staging an image folder from object storage, measured against references in the same run.

On a local S3 server (moto, 127.0.0.1) holding a folder of small JPEGs:
--part copy    files/s and MB/s of `trainable.staging.stage_image_folder` (listing, HEAD + GET
               per object, checks, renames, completion marker) into an empty cache, against
               pyarrow's own recursive copy (`pyarrow.fs.copy_files`, its I/O threads) and a
               plain boto3 copy (one GET per object from a thread pool of the same size).
               Runs alternate ours/references; each starts from an empty folder.
--part epoch   a training epoch (in this process, world size 1, `--epoch-subset` of the
               training images) reading the staged copy against the same images in the
               local folder they were uploaded from: the median `images_per_s` of epoch 2
               of each run; runs alternate.
--part all     both, then the time to stage ImageNet-1k per node from the measured rates.

    python benchmarks/staging.py --part all --images 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMAGENET_FILES = 1_281_167
IMAGENET_BYTES = 140e9
CLOUD_MBPS = (1250.0, 3125.0)
"""Typical single-node read bandwidth from cloud object storage, MB/s (10 and 25 Gbit/s NICs)."""


def make_folder(root: Path, images: int, px: int, classes: int = 10) -> Path:
    from tests.conftest import image_folder

    per = max(1, images // classes)
    return image_folder(root, classes=tuple(f"c{i:02d}" for i in range(classes)), train=per - per // 10,
                        val=per // 10 or 1, size=px)


def _timed(fn: Callable[[Path], None], parent: Path) -> float:
    dest = Path(tempfile.mkdtemp(dir=parent))
    start = time.perf_counter()
    fn(dest)
    secs = time.perf_counter() - start
    shutil.rmtree(dest, ignore_errors=True)
    return secs


def part_copy(uri: str, server: object, files: int, nbytes: int, repeats: int, threads: int,
              work: Path) -> dict[str, float]:
    import boto3
    import pyarrow
    import pyarrow.fs

    from trainable.staging import stage_image_folder

    bucket, _, prefix = uri.removeprefix("s3://").partition("/")

    def ours(dest: Path) -> None:
        staged = stage_image_folder(uri, str(dest), threads=threads)
        assert staged.stats.files == files

    def arrow(dest: Path) -> None:
        pyarrow.set_io_thread_count(threads)
        fs, base = pyarrow.fs.FileSystem.from_uri(uri)
        pyarrow.fs.copy_files(base, str(dest / "copy"), source_filesystem=fs, use_threads=True)

    def plain(dest: Path) -> None:
        client = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",  # type: ignore[attr-defined]
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        keys = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
            keys += [o["Key"] for o in page.get("Contents", [])]

        def get(key: str) -> None:
            out = dest / key
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(client.get_object(Bucket=bucket, Key=key)["Body"].read())

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(get, keys))

    times: dict[str, list[float]] = {"ours": [], "pyarrow copy_files": [], "boto3 GETs": []}
    for _ in range(repeats):
        for name, fn in (("ours", ours), ("pyarrow copy_files", arrow), ("boto3 GETs", plain)):
            times[name].append(_timed(fn, work))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nstaging {files} files, {nbytes / 1e6:.1f} MB ({nbytes / files / 1e3:.1f} KB each), {threads} threads, "
          f"median of {repeats}:")
    for name, secs in med.items():
        print(f"  {name:20s} {secs:7.2f} s  {files / secs:8.0f} files/s  {nbytes / 1e6 / secs:7.2f} MB/s"
              f"  ours/this: {med['ours'] / secs:5.2f}x time")
    return {"files_per_s": files / med["ours"], "mb_per_s": nbytes / 1e6 / med["ours"],
            "ref_files_per_s": files / med["boto3 GETs"]}


def part_epoch(uri: str, local: Path, repeats: int, work: Path, subset: float) -> None:
    import torch

    from trainable.config import TrainConfig
    from trainable.loop import run_training
    from trainable.staging import stage_image_folder

    torch.set_num_threads(2)
    staged = stage_image_folder(uri, str(work / "epoch-cache"))

    def epoch_rate(root: str) -> float:
        cfg = TrainConfig.model_validate({
            "model": {"name": "resnet18_vd", "small_input": False},
            "data": {"kind": "imagefolder", "root": root, "image_size": 32, "loader_workers": 0,
                     "cache_dir": str(work / "epoch-cache"), "subset": subset},
            "batch": {"global_batch": 64, "micro_batch": 64}, "distributed": {"num_workers": 1},
            "run": {"epochs": 2, "log_every": 100},
        })
        rates: list[float] = []
        run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: rates.append(m["images_per_s"]))
        return rates[-1]

    got: dict[str, list[float]] = {"staged copy": [], "local folder": []}
    for _ in range(repeats):
        got["staged copy"].append(epoch_rate(uri))  # the run stages (already there: nothing fetched) and reads the copy
        got["local folder"].append(epoch_rate(str(local)))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"\nepoch 2 images/s, median of {repeats} (copy at {staged.local_root}):")
    for name, rate in med.items():
        print(f"  {name:14s} {rate:8.1f} images/s")
    print(f"  staged/local: {med['staged copy'] / med['local folder']:.3f}x")


def on_paper(rates: dict[str, float], nodes: int = 4) -> None:
    per_object_h = IMAGENET_FILES / rates["files_per_s"] / 3600
    print(f"\nImageNet-1k ({IMAGENET_FILES} files, {IMAGENET_BYTES / 1e9:.0f} GB) per node:")
    print(f"  at the measured per-object rate ({rates['files_per_s']:.0f} files/s): {per_object_h:.1f} h")
    for mbps in CLOUD_MBPS:
        minutes = IMAGENET_BYTES / (mbps * 1e6) / 60
        print(f"  at {mbps:.0f} MB/s (bandwidth-bound; needs {IMAGENET_FILES / (minutes * 60):.0f} objects/s): "
              f"{minutes:.0f} min")
    print(f"  a {nodes}-node search: the nodes stage at the same time (the same wall time), "
          f"{nodes * IMAGENET_BYTES / 1e9:.0f} GB and {nodes * IMAGENET_FILES * 2 / 1e6:.1f} M requests in all")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("copy", "epoch", "all"), default="all")
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--px", type=int, default=96, help="JPEG side (random content: ~%(default)s px -> a few KB)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--epoch-subset", type=float, default=0.3, help="data.subset of the training runs")
    args = p.parse_args()

    from tests.conftest import S3Server

    with tempfile.TemporaryDirectory(prefix="staging-bench-") as tmp:
        work = Path(tmp)
        server = S3Server(work / "s3")
        try:
            import os

            os.environ.update(server.env)
            local = make_folder(work / "local", args.images, args.px)
            files = [f for f in local.rglob("*") if f.is_file()]
            nbytes = sum(f.stat().st_size for f in files)
            uri = server.upload(local, "bench")
            print(f"{len(files)} JPEGs of {args.px} px uploaded to {uri} (moto at {server.endpoint})")
            if args.part in ("copy", "all"):
                rates = part_copy(uri, server, len(files), nbytes, args.repeats, args.threads, work)
                if args.part == "all":
                    on_paper(rates)
            if args.part in ("epoch", "all"):
                part_epoch(uri, local, args.repeats, work, args.epoch_subset)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
