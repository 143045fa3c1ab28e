"""One training run: the function every Ray Train worker runs.

Read it top to bottom: set-up (model, SyncBN, DDP, optimizer, schedule, data), resume
from a checkpoint, then per epoch: train with mixing and accumulation, validate exactly
over the whole validation set, report metrics and a checkpoint to Ray Train.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models import create_model
from trainable.config import ConfigError, DataError, TrainConfig
from trainable.data import Loaders, build_loaders, denormalize, normalize
from trainable.distributed import all_gather, all_reduce_sum, rng_state, seed_everything, set_rng_state
from trainable.failures import out_of_memory
from trainable.micro_batch import resolve_micro_batch
from trainable.mix import Mixer
from trainable.optim import build_optimizer, build_scheduler
from trainable.precision import Precision, resolve_precision
from trainable.resume import CHECKPOINT_FILE, check_same_run, config_hash, load_resume_state
from trainable.status import DIVERGED, RUN_ERROR, RUN_STATUS, WORST
from trainable.step import optimizer_update
from trainable.syncbn import convert_sync_batchnorm
from trainable.tensorboard import TensorBoard

logger = logging.getLogger(__name__)

METRICS = (
    "val_acc", "val_acc5", "val_loss", "best_val_acc", "train_loss", "lr", "epoch",
    "images_per_s", "accum_steps", "global_batch", "train_seconds", "first_step_at", "seed", "repeat",
)
"""Reported every epoch. `train_seconds`: time inside training steps so far (this attempt);
`first_step_at`: wall-clock time of this attempt's first optimizer update; `seed` and `repeat`:
which of the config's `run.repeats` runs the report belongs to."""
STARTUP_METRICS = ("startup_s", "staging_s", "staging_bytes", "staging_files")
"""Reported every epoch, the same in each report of one attempt. `startup_s`: seconds from the
start of rank 0's run to the end of its first optimizer update, staging included;
`staging_s`: of which bringing the data to the nodes (`trainable.staging`; the slowest rank,
lock waits included); `staging_bytes`, `staging_files`: what the trial's nodes downloaded for it
(all 0 when the data is read in place or was already staged)."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite (raised on every rank together, at a logging point)."""

    def __init__(self, message: str, epoch: int = 0) -> None:
        super().__init__(message)
        self.epoch = epoch
        """The epoch (from 1) in which the loss stopped being finite."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.epoch))


def diverged_metrics(err: TrainingDiverged) -> dict[str, Any]:
    """The final report of a diverged run (`trainable.status`): `error` names the epoch, step
    and lr; the run then returns normally."""
    return {**WORST, "epoch": err.epoch, RUN_STATUS: DIVERGED, RUN_ERROR: str(err)}


# Model -----------------------------------------------------------------------------------------------
def load_pretrained(model: nn.Module, path: str) -> None:
    """Load a checkpoint of this project (`state.pt`) or a timm-format state dict; a
    classifier whose class count differs keeps its fresh initialisation."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head = [k for k in ("fc.weight", "fc.bias") if k in state and state[k].shape != own[k].shape]
    for k in head:
        del state[k]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a shape differs beyond the classifier
        reason = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err))
        raise ConfigError(f"model.pretrained {path}: does not fit the model ({reason})") from None
    missing = [k for k in missing if k not in head]
    if unexpected or missing:
        keys = [f"{len(ks)} {what} keys, e.g. {', '.join(ks[:3])}" for what, ks in
                (("missing", missing), ("unexpected", unexpected)) if ks]
        raise ConfigError(f"model.pretrained {path}: does not fit the model ({'; '.join(keys)})")
    if head:
        logger.info("%s: classifier re-initialised for %d classes", path, own["fc.weight"].shape[0])


def build_model(cfg: TrainConfig, num_classes: int, device: torch.device, precision: Precision) -> nn.Module:
    m = cfg.model
    model = create_model(m.name, num_classes=num_classes, small_input=m.small_input, zero_init_last=m.zero_init_last)
    if m.pretrained:
        load_pretrained(model, m.pretrained)
    if precision.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.distributed.compile:
        model.compile()  # in place: state_dict keys, DDP wrapping and checkpoints stay as they are
    return model


def wrap_ddp(model: nn.Module, device: torch.device, world_size: int) -> nn.Module:
    if world_size == 1 or not dist.is_initialized():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


# Validation -------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model: nn.Module, loaders: Loaders, device: torch.device, precision: Precision) -> dict[str, float]:
    """Exact top-1/top-5/loss over the whole validation set: every rank evaluates its
    disjoint shard and the sums are all-reduced."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, count
    k = min(5, loaders.num_classes)
    for images, targets in loaders.val:
        images = normalize(images.to(device, non_blocking=True), loaders.data_config, precision.channels_last)
        targets = targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=precision.autocast_dtype, enabled=precision.autocast_dtype is not None):
            logits = model(images)
        logits = logits.float()
        topk = logits.topk(k, dim=1).indices
        hit = topk == targets[:, None]
        sums[0] += hit[:, 0].sum()
        sums[1] += hit.any(dim=1).sum()
        sums[2] += F.cross_entropy(logits, targets, reduction="sum")
        sums[3] += targets.numel()
    all_reduce_sum(sums)
    c1, c5, loss, n = sums.tolist()
    n = max(n, 1.0)
    return {"val_acc": c1 / n, "val_acc5": c5 / n, "val_loss": loss / n}


# The run -----------------------------------------------------------------------------------------------
def _context() -> tuple[int, int, torch.device]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def _configure_logging() -> None:
    root = logging.getLogger()
    if not any(getattr(h, "_trick_search", False) for h in root.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._trick_search = True  # type: ignore[attr-defined]
        for name in ("trainable", "models"):
            logging.getLogger(name).addHandler(handler)
            logging.getLogger(name).setLevel(logging.INFO)
            logging.getLogger(name).propagate = False
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # not every report's full dict


def train_loop_per_worker(config_dict: dict[str, Any]) -> None:
    """The Ray Train worker function: `TorchTrainer(train_loop_per_worker,
    train_loop_config=cfg.model_dump(mode="json"), ...)`."""
    import ray
    import ray.train

    _configure_logging()
    cfg = TrainConfig.model_validate(config_dict)
    rank, world_size, device = _context()
    node_id = ray.get_runtime_context().get_node_id()

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        # rank 0's metrics reach Tune: `node_id` says where the run's first worker is
        ray.train.report({**metrics, "node_id": node_id}, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    first = 0
    if checkpoint is not None and cfg.run.repeats > 1:  # resume inside the repeat it was written by
        first = load_resume_state(checkpoint)[0].get("repeat", 0)
    for repeat in range(first, cfg.run.repeats):
        run_cfg = cfg.for_repeat(repeat)
        try:
            run_training(run_cfg, rank, world_size, device, report=report,
                         checkpoint=checkpoint if repeat == first else None, repeat=repeat)
        except TrainingDiverged as err:
            # a result, not a failure: every rank gets here together, and Ray Train must not
            # restart a run that would diverge again from the same checkpoint and RNG state
            if rank == 0:
                logger.error("%s", err)
            report({**diverged_metrics(err), "seed": run_cfg.run.seed, "repeat": repeat})
        except torch.OutOfMemoryError as err:  # deterministic at a fixed micro_batch: not retried
            memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
            fixed = out_of_memory(err, run_cfg, memory)
            if fixed is err:
                raise
            raise fixed from err


def run_training(
    cfg: TrainConfig,
    rank: int,
    world_size: int,
    device: torch.device,
    report: Any,
    checkpoint: Any = None,
    max_updates: int | None = None,
    repeat: int = 0,
) -> None:
    """Train `cfg` on this worker. `report(metrics, checkpoint=...)` receives every epoch's
    metrics; `checkpoint` is a `ray.train.Checkpoint` to resume from, or None.
    `max_updates` stops each epoch early (benchmarks only). `repeat`: which of the config's
    `run.repeats` this is (`cfg.for_repeat(repeat)`), recorded in reports and checkpoints."""
    started = time.perf_counter()
    if cfg.distributed.num_workers != world_size:
        cfg = cfg.with_num_workers(world_size)
    cfg = resolve_micro_batch(cfg, device, world_size)  # batch.micro_batch: auto -> probed
    accum = cfg.accum_steps
    precision = resolve_precision(cfg, device, world_size)
    seed_everything(cfg.run.seed * 1000 + rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    loaders = build_loaders(cfg, rank, world_size, cfg.run.seed)
    startup = _staging_metrics(loaders.staging, world_size)
    if loaders.skipped and rank == 0:
        logger.warning("skipped %d corrupt image files", loaders.skipped)
    model = build_model(cfg, loaders.num_classes, device, precision)
    ddp_model = wrap_ddp(model, device, world_size)
    optimizer = build_optimizer(model, cfg)
    updates_per_epoch = len(loaders.train) // accum
    if updates_per_epoch < 1:
        raise DataError(
            f"the training set ({loaders.num_train} images) is smaller than one update of "
            f"batch.global_batch {cfg.batch.global_batch}"
        )
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    mixer = Mixer(cfg.mix, loaders.num_classes, cfg.label_smoothing)
    mixer_gen = torch.Generator().manual_seed(cfg.run.seed * 1000 + rank)

    start_epoch, best_val_acc = 0, 0.0
    if checkpoint is not None:
        state, source = load_resume_state(checkpoint)  # the latest readable one
        check_same_run(state, cfg, loaders.classes, source.path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if precision.scaler is not None and state.get("scaler"):
            precision.scaler.load_state_dict(state["scaler"])
        start_epoch, best_val_acc = state["epoch"], state.get("best_val_acc", 0.0)
        rngs = state.get("rng", [])
        if len(rngs) == world_size:
            set_rng_state(rngs[rank], mixer_gen)
        else:  # another world size: a fresh but deterministic stream
            seed_everything(cfg.run.seed * 1000 + rank + 7919 * start_epoch)
        if rank == 0:
            logger.info("resumed from epoch %d", start_epoch)

    tb = TensorBoard(enabled=rank == 0, subdir=f"seed_{cfg.run.seed}" if cfg.run.repeats > 1 else None)
    train_seconds, first_step_at = 0.0, None
    val_metrics = {"val_acc": 0.0, "val_acc5": 0.0, "val_loss": float("nan")}
    per_update_images = cfg.batch.global_batch
    try:
        for epoch in range(start_epoch, cfg.run.epochs):
            loaders.train_sampler.set_epoch(epoch)
            ddp_model.train()
            loss_sum = torch.zeros((), device=device)
            bad_step = torch.full((), -1, dtype=torch.long, device=device)
            window_lrs: dict[int, float] = {}  # LR of each update since the last check
            batches = iter(loaders.train)
            n_updates = updates_per_epoch if max_updates is None else min(max_updates, updates_per_epoch)
            start = time.perf_counter()
            for update in range(n_updates):
                micro = []
                for _ in range(accum):
                    images, targets = next(batches)
                    images = normalize(
                        images.to(device, non_blocking=True), loaders.data_config, precision.channels_last
                    )
                    targets = targets.to(device, non_blocking=True)
                    micro.append(mixer(images, targets, generator=mixer_gen))
                if epoch == start_epoch == 0 and update == 0 and rank == 0:
                    tb.images("train/augmented_mixed_batch", denormalize(micro[0][0][:32], loaders.data_config), 0)
                loss = optimizer_update(
                    ddp_model, optimizer, micro, mixer.loss,
                    scaler=precision.scaler, autocast_dtype=precision.autocast_dtype, device_type=device.type,
                    clip_grad_norm=cfg.optimizer.clip_grad_norm,
                )
                if first_step_at is None:
                    first_step_at = time.time()
                    startup["startup_s"] = time.perf_counter() - started
                step = epoch * updates_per_epoch + update
                lr = window_lrs[step] = optimizer.param_groups[0]["lr"]
                scheduler.step()
                loss_sum += loss
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss), step, bad_step)
                if (update + 1) % cfg.run.log_every == 0 or update + 1 == n_updates:
                    _check_finite(bad_step, updates_per_epoch, window_lrs)
                    window_lrs.clear()
                    if rank == 0:
                        tb.scalars({"train/loss": loss.item(), "train/lr": lr}, step)
            elapsed = time.perf_counter() - start
            train_seconds += elapsed
            train_loss = all_reduce_sum(loss_sum.detach().clone()).item() / (world_size * n_updates)

            last = epoch + 1 == cfg.run.epochs
            if (epoch + 1) % cfg.run.val_every == 0 or last:
                val_metrics = validate(ddp_model, loaders, device, precision)
                best_val_acc = max(best_val_acc, val_metrics["val_acc"])
            metrics = {
                **val_metrics,
                "best_val_acc": best_val_acc,
                "train_loss": train_loss,
                "lr": optimizer.param_groups[0]["lr"],
                "epoch": epoch + 1,
                "images_per_s": per_update_images * n_updates / elapsed,
                "accum_steps": accum,
                "micro_batch": cfg.batch.micro_batch,
                "global_batch": cfg.batch.global_batch,
                "train_seconds": train_seconds,
                "first_step_at": first_step_at,
                "seed": cfg.run.seed,
                "repeat": repeat,
                **startup,
            }
            if rank == 0:
                tb.scalars({k: metrics[k] for k in METRICS if k not in ("epoch", "first_step_at", "seed", "repeat")},
                           epoch + 1,
                           prefix="epoch/")
                tb.flush()
                logger.info(
                    "epoch %d/%d  val_acc %.4f  val_loss %.4f  train_loss %.4f  lr %.4g  %.0f img/s",
                    epoch + 1, cfg.run.epochs, metrics["val_acc"], metrics["val_loss"],
                    train_loss, metrics["lr"], metrics["images_per_s"],
                )
            save = (epoch + 1) % cfg.run.checkpoint_every == 0 or last
            rngs = all_gather(rng_state(mixer_gen), world_size) if save else None
            if save and rank == 0:
                state = {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": precision.scaler.state_dict() if precision.scaler is not None else None,
                    "epoch": epoch + 1,
                    "repeat": repeat,
                    "best_val_acc": best_val_acc,
                    "rng": rngs,
                    "config": cfg.model_dump(mode="json"),
                    "config_hash": config_hash(cfg),
                    "classes": loaders.classes,
                }
                _report_with_checkpoint(report, metrics, state)
            else:
                report(metrics, checkpoint=None)
    finally:
        tb.close()


def _staging_metrics(mine: dict[str, float], world_size: int) -> dict[str, float]:
    """The run's staging cost from every rank's: the slowest rank's seconds, the bytes and
    files downloaded summed (one rank per node downloads, the others wait)."""
    ranks = all_gather({k: float(mine.get(k, 0.0)) for k in STARTUP_METRICS[1:]}, world_size)
    return {
        "startup_s": 0.0,
        "staging_s": max(r["staging_s"] for r in ranks),
        "staging_bytes": sum(r["staging_bytes"] for r in ranks),
        "staging_files": sum(r["staging_files"] for r in ranks),
    }


def _check_finite(bad_step: torch.Tensor, updates_per_epoch: int, lrs: dict[int, float]) -> None:
    """Stop every rank together when any rank saw a non-finite loss (one small all-reduce,
    only at logging points)."""
    flag = bad_step.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    step = int(flag.item())
    if step >= 0:
        raise TrainingDiverged(
            f"diverged: non-finite loss at epoch {step // updates_per_epoch + 1}, "
            f"step {step} (update {step % updates_per_epoch + 1} of the epoch), lr {lrs.get(step, float('nan')):.4g}; "
            "lower optimizer.base_lr or lengthen schedule.warmup_epochs",
            epoch=step // updates_per_epoch + 1,
        )


def _report_with_checkpoint(report: Any, metrics: dict[str, float], state: dict[str, Any]) -> None:
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory(prefix="ckpt-") as d:
        torch.save(state, os.path.join(d, CHECKPOINT_FILE))
        report(metrics, checkpoint=Checkpoint.from_directory(d))

