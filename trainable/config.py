"""`TrainConfig`: the one description of a training run.

A search space is a `TrainConfig` with some fields replaced by distributions, an
exported result is a `TrainConfig` with provenance, and production training runs a
`TrainConfig` as is. Nothing else carries trick settings.

The global batch is the trick; the micro-batch and the number of workers are how a
cluster reaches it, and the accumulation steps are derived from the three.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A user error in a config: the message is one line, ready to print."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = "resnet18_vd"
    small_input: bool = True
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
    """`imagefolder`: folder holding train/<class>/* and val/<class>/*;
    `cifar10`/`cifar100`: torchvision's dataset folder (downloaded when missing)."""
    image_size: int = Field(32, ge=8, le=1024)
    val_resize: int | None = Field(None, ge=8, le=2048)
    """Shorter side before the centre crop at validation; default image_size / 0.875."""
    subset: float = Field(1.0, gt=0.0, le=1.0)
    """Fraction of the training set, stratified by class and deterministic."""
    loader_workers: int = Field(0, ge=0, le=64)
    skip_corrupt: bool = False
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _root_given(self) -> DataConfig:
        if self.kind in ("imagefolder", "cifar10", "cifar100") and not self.root:
            raise ValueError(f"data.root: required when data.kind is {self.kind!r}")
        if self.val_resize is not None and self.val_resize < self.image_size:
            raise ValueError(
                f"data.val_resize: {self.val_resize} must be >= data.image_size ({self.image_size})"
            )
        return self

    @property
    def val_resize_px(self) -> int:
        return self.val_resize or round(self.image_size / 0.875)


class ColorJitterConfig(_Section):
    brightness: float = Field(0.0, ge=0.0, le=1.0)
    contrast: float = Field(0.0, ge=0.0, le=1.0)
    saturation: float = Field(0.0, ge=0.0, le=1.0)


class RandAugmentConfig(_Section):
    num_ops: int = Field(2, ge=1, le=10)
    magnitude: int = Field(0, ge=0, le=30)
    """On torchvision's 0..30 scale; 0 turns RandAugment off."""


class AugmentConfig(_Section):
    crop_scale: tuple[float, float] = (0.35, 1.0)
    """Random-resized-crop area range."""
    hflip: float = Field(0.0, ge=0.0, le=1.0)
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
    weight_decay: float = Field(5e-5, ge=0.0, le=0.1)
    no_bias_decay: bool = True
    base_lr: float = Field(0.4, gt=0.0, le=100.0)
    """Learning rate per 256 images; the run's LR is base_lr * global_batch / 256."""
    lars_trust: float = Field(0.001, gt=0.0, le=1.0)

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


class BatchConfig(_Section):
    global_batch: int = Field(128, ge=1)
    """The effective batch of one optimizer update: the trick."""
    micro_batch: int = Field(32, ge=1)
    """Per worker per forward/backward: what fits in memory."""


class DistributedConfig(_Section):
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0.0, le=256)
    sync_bn: bool | Literal["auto"] = "auto"
    """auto: on when the world size is above 1."""
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    """auto: bf16 autocast on CUDA, off on CPU."""
    channels_last: bool | Literal["auto"] = "auto"
    """auto: on with CUDA."""
    max_failures: int = Field(0, ge=-1)
    """Worker-group restarts from the last checkpoint before the run fails (-1: forever)."""


class RunConfig(_Section):
    epochs: int = Field(12, ge=1, le=10000)
    seed: int = Field(0, ge=0)
    checkpoint_every: int = Field(1, ge=1)
    val_every: int = Field(1, ge=1)
    log_every: int = Field(50, ge=1)
    """Optimizer updates between progress log lines (the only host syncs of the hot loop)."""


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

    # Derived values -----------------------------------------------------------------
    @property
    def accum_steps(self) -> int:
        return self.batch.global_batch // (self.batch.micro_batch * self.distributed.num_workers)

    @property
    def lr(self) -> float:
        return self.optimizer.base_lr * self.batch.global_batch / 256

    def with_num_workers(self, num_workers: int) -> TrainConfig:
        """The same run on another number of workers: the global batch (the trick) stays,
        the accumulation is re-derived, and the micro-batch shrinks only when no whole
        accumulation reaches the global batch with it."""
        gb, micro = self.batch.global_batch, self.batch.micro_batch
        if num_workers < 1:
            raise ConfigError(f"num_workers {num_workers}: must be >= 1")
        if gb % num_workers:
            raise ConfigError(
                f"batch.global_batch {gb} cannot be split over {num_workers} workers "
                f"(not a multiple of {num_workers})"
            )
        per_worker = gb // num_workers
        micro = max(m for m in range(1, min(micro, per_worker) + 1) if per_worker % m == 0)
        data = self.model_dump()
        data["distributed"]["num_workers"] = num_workers
        data["batch"]["micro_batch"] = micro
        return TrainConfig.model_validate(data)

    # YAML -------------------------------------------------------------------------------
    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def check_accumulation(global_batch: int, micro_batch: int, num_workers: int) -> int:
    """Accumulation steps for the three numbers, or a ValueError that names them."""
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


def nearest_path(path: str, candidates: list[str] | None = None) -> str | None:
    """The valid key path a misspelt one most likely meant: first by its last part among
    keys of the same section, then among all keys, then by the whole path."""
    cands = candidates if candidates is not None else list(LEAF_PATHS)
    parent, _, leaf = path.rpartition(".")
    same = [c for c in cands if c.rpartition(".")[0] == parent]
    for pool in (same, cands):
        leaves: dict[str, str] = {}
        for c in pool:
            leaves.setdefault(c.rpartition(".")[2], c)
        near = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        if near:
            return leaves[near[0]]
    near = difflib.get_close_matches(path, cands, n=1, cutoff=0.6)
    return near[0] if near else None


def allowed_range(path: str) -> str | None:
    """`0 < value <= 100` from a field's bounds, or None for a field without any."""
    info = LEAF_PATHS.get(path)
    if info is None:
        return None
    lo = hi = ""
    for m in info.metadata:
        if getattr(m, "gt", None) is not None:
            lo = f"{m.gt} < "
        elif getattr(m, "ge", None) is not None:
            lo = f"{m.ge} <= "
        elif getattr(m, "lt", None) is not None:
            hi = f" < {m.lt}"
        elif getattr(m, "le", None) is not None:
            hi = f" <= {m.le}"
    return f"{lo}value{hi}" if lo or hi else None


def _section_paths(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Valid keys at the level of `loc` (for 'did you mean')."""
    for part in loc[:-1]:
        info = model.model_fields.get(str(part))
        if info is None or not (isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)):
            return []
        model = info.annotation
    prefix = "".join(f"{p}." for p in loc[:-1])
    return [prefix + k for k in model.model_fields]


def explain(err: ValidationError, source: str | None = None) -> str:
    """One line for the first error of a ValidationError, naming the key path."""
    e = err.errors(include_url=False)[0]
    loc = tuple(str(p) for p in e["loc"])
    path = ".".join(loc)
    where = f"{source}: " if source else ""
    if e["type"] == "extra_forbidden":
        near = nearest_path(path, _section_paths(TrainConfig, loc))
        hint = f"; did you mean {near!r}?" if near else ""
        return f"{where}{path}: unknown key{hint}"
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        msg = msg.removeprefix(prefix)
    got = e.get("input")
    if path and e["type"] not in ("value_error", "missing") and not isinstance(got, dict):
        allowed = allowed_range(path)
        msg = f"{msg} (got {got!r}); allowed: {allowed}" if allowed else f"{msg} (got {got!r})"
    if e["type"] == "missing":
        msg = "required"
    if path and msg.startswith(path + "."):  # a section's validator names the key itself
        return f"{where}{msg}"
    return f"{where}{path}: {msg}" if path else f"{where}{msg}"


def validate_config(data: Any, source: str | None = None) -> TrainConfig:
    """A TrainConfig from plain data, or a ConfigError with one line."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {type(data).__name__}")
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(explain(err, source)) from None


# Overrides ----------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[str, Any]:
    """`key.path=value` with the value read as YAML (`run.epochs=2`, `mix.mode=cutmix`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Set `a.b.c` in nested dicts, creating the levels that are missing."""
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def get_path(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        node = node[part]
    return node


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, value = parse_override(item)
        set_path(data, key, value)
    return data


# Files ---------------------------------------------------------------------------------------
def read_yaml(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not a UTF-8 text file") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read ({err.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ConfigError(f"{p}:{where}: {problem}") from None


def load_config(path: str | os.PathLike[str], overrides: list[str] | None = None) -> TrainConfig:
    """Read a TrainConfig YAML file (an exported best.yaml too: its `provenance` block is
    kept aside) and apply `key.path=value` overrides."""
    data = read_yaml(path)
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != "provenance"}
    if overrides:
        data = apply_overrides(data if isinstance(data, dict) else {}, overrides)
    return validate_config(data, str(path))


def write_atomic(path: str | os.PathLike[str], text: str, overwrite: bool = False) -> Path:
    """Write text to path through a temporary file and a rename; refuse to replace an
    existing file unless overwrite is set."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise ConfigError(f"{p}: already exists; choose another path (nothing was overwritten)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if overwrite:
            os.replace(tmp, p)
        else:
            try:
                os.link(tmp, p)  # fails if p appeared meanwhile
            except FileExistsError:
                raise ConfigError(f"{p}: already exists; choose another path (nothing was overwritten)") from None
            except OSError:  # a filesystem without hard links
                if p.exists():
                    raise ConfigError(f"{p}: already exists; choose another path (nothing was overwritten)") from None
                os.replace(tmp, p)
            if os.path.exists(tmp):
                os.unlink(tmp)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return p


def save_config(cfg: TrainConfig, path: str | os.PathLike[str], overwrite: bool = False) -> Path:
    return write_atomic(path, cfg.to_yaml(), overwrite=overwrite)
