"""`TrainConfig`: the one description of a training run.

A search space is a `TrainConfig` with some fields replaced by distributions, an
exported result is a `TrainConfig` with provenance, and production training runs a
`TrainConfig` as is. Nothing else carries trick settings.

The global batch is the trick; the micro-batch and the number of workers are how a
cluster reaches it, and the accumulation steps are derived from the three.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A user error in a config: the message is one line, ready to print."""


class DataError(ConfigError):
    """A user error in the data: one line naming the path and what is wrong."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "resnet50_vd"
    small_input: bool = False
    """True: the stem keeps full resolution (stride 1, no max-pool), for 32-64 px images."""
    zero_init_last: bool = True
    pretrained: str | None = None
    """Path to a checkpoint (this project's or a timm-format state dict); a classifier
    with another class count is re-initialised."""

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from models import list_models

        names = list_models()
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown model {name!r}{hint} (valid: {', '.join(names)})")
        return name


class SyntheticConfig(_Section):
    num_classes: int = Field(10, ge=2, le=1000)
    train_per_class: int = Field(100, ge=1)
    val_per_class: int = Field(20, ge=1)


class DataConfig(_Section):
    kind: Literal["imagefolder", "cifar10", "cifar100", "digits", "synthetic"] = "digits"
    root: str | None = None
    """`imagefolder`: folder holding train/<class>/* and val/<class>/*, or a URI of one on
    object storage (`s3://bucket/prefix`, `gs://...`: indexed from the listing, staged once
    per node into `cache_dir`); `cifar10`/`cifar100`: torchvision's dataset folder
    (downloaded when missing)."""
    cache_dir: str | None = None
    """Where each node stages a `root` URI (a local folder on the node's large disk); empty:
    `$TRICK_SEARCH_DATA_CACHE` on that node, else `staged/` in the machine's data cache
    (`trainable.staging`). Unused for local roots, which are read in place."""
    image_size: int = Field(224, ge=8, le=1024)
    val_resize: int | None = Field(None, ge=8, le=2048)
    """Shorter side before the centre crop at validation; default round(image_size / crop_pct),
    with crop_pct from the model's data config (`models.data_config(model.name)`)."""
    subset: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of the training set, stratified by class and deterministic."""
    loader_workers: int | Literal["auto"] = "auto"
    """Decoding processes per training worker; auto: distributed.cpus_per_worker - 1."""
    skip_corrupt: bool = False
    decode: Literal["cpu", "gpu"] = "cpu"
    """`imagefolder` only. cpu: loader workers decode and augment; gpu: loader workers only
    read the files, JPEGs are decoded in batches on the training device (nvJPEG on CUDA) and
    augmented there (`trainable.gpu_decode`)."""
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("loader_workers")
    @classmethod
    def _workers_range(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 0 <= v <= 64:
            raise ValueError(f"must be auto or 0..64 (got {v})")
        return v

    @model_validator(mode="after")
    def _root_given(self) -> DataConfig:
        if self.kind in ("imagefolder", "cifar10", "cifar100") and not self.root:
            raise ValueError(f"data.root: required when data.kind is {self.kind!r}")
        if self.root and "://" in self.root and self.kind != "imagefolder":
            raise ValueError(f"data.root: a URI ({self.root}) is read for data.kind imagefolder only, not {self.kind!r}")
        if self.cache_dir and "://" in self.cache_dir:
            raise ValueError(f"data.cache_dir: must be a folder on the node, not a URI ({self.cache_dir})")
        if self.val_resize is not None and self.val_resize < self.image_size:
            raise ValueError(
                f"data.val_resize: {self.val_resize} must be >= data.image_size ({self.image_size})"
            )
        if self.decode == "gpu" and self.kind != "imagefolder":
            raise ValueError(f"data.decode: gpu decodes JPEG folders only (data.kind imagefolder), not {self.kind!r}")
        return self


class ColorJitterConfig(_Section):
    brightness: float = Field(0.0, ge=0.0, le=1.0)
    contrast: float = Field(0.0, ge=0.0, le=1.0)
    saturation: float = Field(0.0, ge=0.0, le=1.0)


class RandAugmentConfig(_Section):
    enabled: bool = False
    """RandAugment on or off: a switch of its own, since every magnitude (0 included)
    applies the magnitude-free operations (equalize, autocontrast, posterize at its limit)."""
    num_ops: int = Field(2, ge=1, le=10)
    magnitude: int = Field(9, ge=0, le=30)
    """On torchvision's 0..30 scale; used when enabled."""


class AugmentConfig(_Section):
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Random-resized-crop area range."""
    hflip: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: ColorJitterConfig = ColorJitterConfig()
    randaugment: RandAugmentConfig = RandAugmentConfig()
    grayscale_prob: float = Field(0.0, ge=0.0, le=1.0)
    blur_prob: float = Field(0.0, ge=0.0, le=1.0)
    erasing_prob: float = Field(0.0, ge=0.0, le=1.0)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"must satisfy 0 < lo <= hi <= 1 (got [{lo}, {hi}])")
        return v


class MixConfig(_Section):
    mode: Literal["none", "mixup", "cutmix", "mixup_cutmix"] = "none"
    mixup_alpha: float = Field(0.2, gt=0.0, le=10.0)
    cutmix_alpha: float = Field(1.0, gt=0.0, le=10.0)
    switch_prob: float = Field(0.5, ge=0.0, le=1.0)
    """With `mixup_cutmix`: probability of cutmix for a batch."""
    prob: float = Field(1.0, ge=0.0, le=1.0)
    """Probability that a batch is mixed at all."""


class OptimizerConfig(_Section):
    name: Literal["sgd", "lars"] = "sgd"
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(1e-4, ge=0.0, le=0.1)
    no_bias_decay: bool = True
    base_lr: float = Field(0.1, gt=0.0, le=100.0)
    """Learning rate per 256 images; the run's LR is base_lr * global_batch / 256."""
    lars_trust: float = Field(0.001, gt=0.0, le=1.0)
    clip_grad_norm: float | None = Field(None, gt=0.0)
    """Clip the global L2 norm of the accumulated (unscaled) gradient to this value before
    each update; null: no clipping."""

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimizerConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("optimizer.nesterov: requires optimizer.momentum > 0")
        return self


class ScheduleConfig(_Section):
    name: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0.0)
    warmup_start_factor: float = Field(0.1, gt=0.0, le=1.0)
    min_lr_factor: float = Field(0.0, ge=0.0, le=1.0)
    """Cosine floor as a fraction of the peak LR."""
    step_milestones: list[int] = [30, 60, 80]
    """`step`: epochs at which the LR is multiplied by step_gamma."""
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    restarts: list[int] = []
    """`cosine`: epochs at which the cosine reaches its floor and a new cosine starts, re-warmed
    over warmup_epochs (cosine with restarts). The search sets them at ASHA's rungs so every
    rung compares annealed models; []: one cosine over the whole run."""

    @field_validator("restarts")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if any(e < 1 for e in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"must be increasing epochs >= 1 (got {v})")
        return v


class BatchConfig(_Section):
    global_batch: int = Field(256, ge=1)
    """The effective batch of one optimizer update: the trick."""
    micro_batch: int | Literal["auto"] = 64
    """Per worker per forward/backward: what fits in memory. auto: the largest power of two
    that fits the worker's memory and divides global_batch / num_workers, probed once on the
    worker at the start of the run (`trainable.micro_batch`) and reported as `micro_batch`."""

    @field_validator("micro_batch", mode="before")
    @classmethod
    def _micro_range(cls, v: Any) -> Any:
        bad_word = isinstance(v, str) and v != "auto" and not v.strip().isdigit()
        if bad_word or (isinstance(v, int) and v < 1):
            raise ValueError(f"must be auto or an integer >= 1 (got {v!r})")
        return v


class DistributedConfig(_Section):
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0.0, le=256)
    sync_bn: bool | Literal["auto"] = "auto"
    """auto: on when the world size is above 1."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """auto: bf16 autocast on CUDA compute capability >= 8.0, fp16 with a GradScaler below
    (V100), off on CPU."""
    channels_last: bool | Literal["auto"] = "auto"
    """auto: on with CUDA."""
    compile: bool = False
    """torch.compile the model: a one-off compile time at the start of every run (and of every
    retry) against faster steps; `benchmarks/gpu_check.sh` measures both."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts from the last checkpoint before the run fails (-1: forever)."""


class RunConfig(_Section):
    epochs: int = Field(12, ge=1, le=10000)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(1, ge=1)
    val_every: int = Field(1, ge=1)
    log_every: int = Field(50, ge=1)
    """Optimizer updates between progress log lines (the only host syncs of the hot loop)."""
    repeats: int = Field(1, ge=1, le=100)
    """Train the config this many times, one after another, with seeds seed, seed + 1, ...
    (confirmation on several seeds); every report carries its `seed`."""


class TrainConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    mix: MixConfig = MixConfig()
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    batch: BatchConfig = BatchConfig()
    distributed: DistributedConfig = DistributedConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _whole_accumulation(self) -> TrainConfig:
        check_accumulation(self.batch.global_batch, self.batch.micro_batch, self.distributed.num_workers)
        return self

    @model_validator(mode="after")
    def _restarts_inside_run(self) -> TrainConfig:
        r = self.schedule.restarts
        if r and self.schedule.name != "cosine":
            raise ValueError("schedule.restarts: only with schedule.name cosine")
        if r and r[-1] >= self.run.epochs:
            raise ValueError(f"schedule.restarts: {r[-1]} must be below run.epochs ({self.run.epochs})")
        return self

    # Derived values -----------------------------------------------------------------
    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer update; a `batch.micro_batch: auto` must be resolved
        first (`trainable.micro_batch.resolve_micro_batch`, on the worker)."""
        if self.batch.micro_batch == "auto":
            raise ConfigError(
                "batch.micro_batch is auto: the accumulation steps are known once a worker has "
                "probed its memory (the run reports them as accum_steps)"
            )
        return self.batch.global_batch // (self.batch.micro_batch * self.distributed.num_workers)

    @property
    def lr(self) -> float:
        return self.optimizer.base_lr * self.batch.global_batch / 256

    @property
    def loader_workers(self) -> int:
        """data.loader_workers with `auto` resolved: the worker's CPUs beyond the one training."""
        if self.data.loader_workers == "auto":
            return max(0, int(self.distributed.cpus_per_worker) - 1)
        return self.data.loader_workers

    def for_repeat(self, repeat: int) -> TrainConfig:
        """The run of `run.repeats` number `repeat` (from 0): the same config with seed + repeat."""
        if repeat == 0:
            return self
        data = self.model_dump()
        data["run"]["seed"] = self.run.seed + repeat
        return TrainConfig.model_validate(data)

    def with_num_workers(self, num_workers: int) -> TrainConfig:
        """The same run on another number of workers: the global batch (the trick) stays,
        the accumulation is re-derived, and the micro-batch shrinks only when no whole
        accumulation reaches the global batch with it; `auto` stays auto."""
        gb, micro = self.batch.global_batch, self.batch.micro_batch
        if num_workers < 1:
            raise ConfigError(f"num_workers {num_workers}: must be >= 1")
        if gb % num_workers:
            raise ConfigError(
                f"batch.global_batch {gb} cannot be split over {num_workers} workers "
                f"(not a multiple of {num_workers})"
            )
        per_worker = gb // num_workers
        if micro != "auto":
            micro = max(m for m in range(1, min(micro, per_worker) + 1) if per_worker % m == 0)
        data = self.model_dump()
        data["distributed"]["num_workers"] = num_workers
        data["batch"]["micro_batch"] = micro
        return TrainConfig.model_validate(data)

    # YAML -------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def micro_batch_cap(global_batch: int, num_workers: int) -> int:
    """The largest micro-batch `batch.micro_batch: auto` may pick: the largest power of two
    dividing global_batch / num_workers (so the global batch stays exact through accumulation)."""
    per_worker = global_batch // num_workers
    return per_worker & -per_worker if per_worker >= 1 else 0


def check_accumulation(global_batch: int, micro_batch: int | str, num_workers: int) -> int:
    """Accumulation steps for the three numbers, or a ValueError that names them. With
    micro_batch `auto` the global batch must split evenly over the workers; the steps
    returned are then the fewest auto can reach (at `micro_batch_cap`)."""
    if micro_batch == "auto":
        if global_batch % num_workers or global_batch < num_workers:
            raise ValueError(
                f"batch.global_batch {global_batch} is not a whole multiple of distributed.num_workers "
                f"{num_workers}, as batch.micro_batch auto needs; choose a global batch the workers split evenly"
            )
        return global_batch // (micro_batch_cap(global_batch, num_workers) * num_workers)
    per_update = micro_batch * num_workers
    if global_batch % per_update or global_batch < per_update:
        raise ValueError(
            f"batch.global_batch {global_batch} is not a whole multiple of batch.micro_batch "
            f"{micro_batch} x distributed.num_workers {num_workers} (= {per_update}); "
            "choose values whose product divides the global batch"
        )
    return global_batch // per_update


# Field paths ------------------------------------------------------------------------------
def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_fields(ann, path + "."))
        else:
            out[path] = info
    return out


LEAF_PATHS: dict[str, Any] = _fields(TrainConfig)
"""Every settable key path of a TrainConfig (`mix.mode`, `batch.global_batch`, ...)."""
