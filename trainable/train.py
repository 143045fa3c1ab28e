"""Production training: `python -m trainable.train --config best.yaml`.

Runs one `TrainConfig` as a Ray Train `TorchTrainer` on this machine or on a running Ray
cluster. Running it again with the same `--name` resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any

from trainable.cluster import connect, error_line
from trainable.config import ConfigError, TrainConfig
from trainable.config_io import load_config
from trainable.feasibility import check_config_feasible
from trainable.resume import check_run, record_run
from trainable.storage import STORAGE_ENV, Storage  # production runs go under $STORAGE_ENV/train

logger = logging.getLogger(__name__)

DEFAULT_STORAGE = "~/trick-search/train"


def default_storage() -> str:
    """`$TRICK_SEARCH_STORAGE/train` when that is set, else ~/trick-search/train."""
    root = os.environ.get(STORAGE_ENV, "").strip()
    return f"{root.rstrip('/')}/train" if root else DEFAULT_STORAGE


def _quiet_worker_logs() -> None:
    """Ray Train logs every `ray.train.report` of every worker at INFO, metrics and all,
    through loggers named after their files (outside `ray.train`, so `LoggingConfig` does
    not reach them): WARNING and above only."""
    for module in ("ray.train.v2._internal.execution.context", "ray.train.collective.collectives"):
        try:
            spec = importlib.util.find_spec(module)
        except ImportError:  # another Ray layout: nothing to quiet
            continue
        if spec is not None and spec.origin:
            logging.getLogger(spec.origin).setLevel(logging.WARNING)


def run_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs. The training loop (torch, torchvision, the data
    stack) is imported here, on the worker: the process that builds the trainer (a search
    trial's driver) never needs it."""
    _quiet_worker_logs()
    from trainable.loop import train_loop_per_worker

    train_loop_per_worker(config)


def build_trainer(
    cfg: TrainConfig,
    name: str,
    storage_path: str,
    callbacks: list[Any] | None = None,
    keep_checkpoints: int | None = 2,
) -> Any:
    """The TorchTrainer for one run of `cfg` (used by production training and by every
    search trial). A config or data error raised by a worker ends the run at once: only
    infrastructure failures are retried (`distributed.max_failures`)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainable.failures import EndOnUserError

    d = cfg.distributed
    per_worker: dict[str, float] = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        per_worker["GPU"] = 1
    return TorchTrainer(
        run_worker,
        train_loop_config=cfg.model_dump(mode="json"),
        scaling_config=ScalingConfig(num_workers=d.num_workers, use_gpu=d.use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=FailureConfig(max_failures=d.max_failures),
            callbacks=[EndOnUserError(), *(callbacks or [])],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def prepare_config(
    path: str, overrides: list[str] | None = None, num_workers: int | None = None, use_gpu: bool = False
) -> TrainConfig:
    cfg = load_config(path, overrides)
    if use_gpu and not cfg.distributed.use_gpu:
        data = cfg.model_dump()
        data["distributed"]["use_gpu"] = True
        cfg = TrainConfig.model_validate(data)
    if num_workers is not None and num_workers != cfg.distributed.num_workers:
        cfg = cfg.with_num_workers(num_workers)
    return cfg


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m trainable.train",
        description="Run one training (a TrainConfig YAML, e.g. an exported best.yaml) on Ray Train.",
    )
    p.add_argument("--config", required=True, help="TrainConfig YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one key of the config, e.g. run.epochs=1 (repeatable)")
    p.add_argument("--address", help="Ray cluster address (host:port); default: this machine")
    p.add_argument("--num-workers", type=int, help="workers to train on; accumulation is re-derived "
                   "so batch.global_batch stays the same")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--storage-path", help=f"where runs are kept (default ${STORAGE_ENV}/train, else {DEFAULT_STORAGE})")
    p.add_argument("--name", help="run name (default: the config file's name); the same name and config resume")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # progress to stdout: stderr carries only the one `error:` line of a user error
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        if args.num_workers is not None and args.num_workers < 1:
            raise ConfigError(f"--num-workers {args.num_workers}: must be >= 1")
        cfg = prepare_config(args.config, args.set, args.num_workers, args.use_gpu)
        name = args.name or Path(args.config).stem
        store = Storage(args.storage_path or default_storage())
        store.check_writable()
        storage = store.root
        resuming = check_run(storage, name, cfg)  # another config under this name: refused
        check_config_feasible(cfg, args.config)  # data, batch vs training set, checkpoint: before Ray
        connect(args.address)
        record_run(storage, name, cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    print(
        f"training {cfg.model.name} on {cfg.data.kind}: {cfg.run.epochs} epochs, global batch "
        f"{cfg.batch.global_batch} = {cfg.batch.micro_batch} x {cfg.distributed.num_workers} workers "
        f"x {cfg.accum_steps} accumulation steps, lr {cfg.lr:.4g}"
    )
    print(f"run folder: {storage}/{name}   (tensorboard --logdir {storage}/{name})")
    if resuming:
        print("resuming: that folder holds a run of this config")
    try:
        result = build_trainer(cfg, name, storage).fit()
    except Exception as err:  # a failed run: one line, the details are in the log above
        print(f"error: training failed: {error_line(err)}", file=sys.stderr)
        return 1
    from trainable.status import DIVERGED, RUN_ERROR, RUN_STATUS

    m = result.metrics or {}
    if m.get(RUN_STATUS) == DIVERGED:  # a result, not retried: the same run would diverge again
        print(f"error: {m.get(RUN_ERROR) or DIVERGED}", file=sys.stderr)
        return 1
    ckpt = result.checkpoint.path if result.checkpoint is not None else "none"
    print(
        f"done: best val_acc {m.get('best_val_acc', float('nan')):.4f}, last val_acc "
        f"{m.get('val_acc', float('nan')):.4f} after {m.get('epoch', 0)} epochs; checkpoint: {ckpt}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
