"""What can be known about a run before anything is reserved: the training set's size and
classes (without torch and without downloading), whether every global batch a run can have
gives at least one full optimizer update per epoch, and whether a pretrained checkpoint is
there to read.

The search driver (`search.run`) and the production CLI (`trainable.train`) call this before
Ray starts, so a run that could only fail on its workers fails here, in one line.
Searched keys are read from any object with `kind`, `values`, `low`, `high` and `when`
(`spaces.Distribution`): `trainable/` stays below `spaces/`.
"""

from __future__ import annotations

import logging

import itertools
import pickle
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from trainable.config import ConfigError, DataConfig, DataError, TrainConfig
from trainable.imagefolder import index_image_folder
from trainable.listing import list_image_folder
from trainable.storage import is_uri

__all__ = [
    "CIFAR_FILES",
    "DIGITS_TRAIN_PER_CLASS",
    "TrainingSet",
    "check_config_feasible",
    "check_pretrained",
    "check_space_feasible",
    "subset_class_count",
    "subset_size",
    "training_set",
    "updates_per_epoch",
]

DIGITS_TRAIN_PER_CLASS: tuple[int, ...] = (142, 146, 142, 146, 145, 145, 145, 143, 139, 144)
"""Images per class in the training part of scikit-learn's digits (1437 of 1797), as
`trainable.datasets` splits them (stratified 80/20, random_state 0); a test keeps the two equal."""

CIFAR_FILES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, str]] = {
    # kind: (folder, train files, test files, meta file, meta key): torchvision's layout
    "cifar10": (
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        ("test_batch",),
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ("train",), ("test",), "meta", "fine_label_names"),
}
_CIFAR_KNOWN = {"cifar10": (10, 5000), "cifar100": (100, 500)}  # classes, training images per class

# Keys whose values decide the training set, its size, one update's size, or a file to read.
_SOURCE_KEYS = ("data.kind", "data.root", "data.skip_corrupt", "data.synthetic.num_classes",
                "data.synthetic.train_per_class")
_SUBSET = "data.subset"
logger = logging.getLogger(__name__)

_BATCH_KEYS = ("batch.global_batch", "batch.micro_batch", "distributed.num_workers")
_PRETRAINED = "model.pretrained"
_MAX_LISTED = 8


class DistributionLike(Protocol):
    kind: str
    values: list[Any] | None
    low: float | int | None
    high: float | int | None
    when: dict[str, list[Any]]

    def active(self, sampled: Mapping[str, Any]) -> bool:
        """Whether the key is sampled in a trial whose searched keys took `sampled`."""
        ...


class _Other:
    """A value of a range key that no `when` condition names."""

    def __repr__(self) -> str:
        return "<another value>"


_OTHER = _Other()


def reachable(
    base: TrainConfig, search: Mapping[str, DistributionLike], paths: Sequence[str],
    values: Callable[[str], list[Any]],
) -> list[tuple[Any, ...]]:
    """Every combination of values of `paths` that a trial can have (distinct, in a stable
    order): a searched key takes each of `values(path)` in the trials where its `when`
    holds and its base value in the others; an unsearched key keeps its base value. Keys
    that only decide a condition take their choices (a range: each value a condition names,
    and another); a searched range in `paths` also takes the values conditions name."""
    named: dict[str, list[Any]] = {}
    for dist in search.values():
        for key, allowed in dist.when.items():
            named.setdefault(key, []).extend(allowed)
    needed: list[str] = []
    stack = [p for p in paths if p in search]
    while stack:
        p = stack.pop()
        if p not in needed:
            needed.append(p)
            stack.extend(k for k in search[p].when if k in search)

    def options(p: str) -> list[Any]:
        dist = search[p]
        if p in paths:
            own = list(values(p))
            return own if dist.kind == "choice" else [*own, *named.get(p, [])]
        return list(dist.values or []) if dist.kind == "choice" else [*named.get(p, []), _OTHER]

    out: dict[str, tuple[Any, ...]] = {}

    def walk(pending: list[str], assigned: dict[str, Any], sampled: dict[str, Any]) -> None:
        if not pending:
            combo = tuple(assigned[p] if p in assigned else _base_value(base, p) for p in paths)
            out.setdefault(repr(combo), combo)
            return
        # a key whose conditions are decided (a cycle, refused when the space loads, takes the first)
        p = next((q for q in pending if all(k in assigned for k in search[q].when if k in search)), pending[0])
        rest = [q for q in pending if q != p]
        if search[p].active(sampled):
            for v in options(p):
                walk(rest, {**assigned, p: v}, {**sampled, p: v})
        else:
            walk(rest, {**assigned, p: _base_value(base, p)}, sampled)

    walk(needed, {}, {})
    return list(out.values())


# Arithmetic shared with the training run --------------------------------------------------------
def subset_class_count(n: int, fraction: float) -> int:
    """Images of a class of `n` that `data.subset` keeps: a rounded share, at least one
    (`trainable.datasets.stratified_subset_indices` uses this)."""
    return max(1, round(fraction * n))


def subset_size(class_counts: Iterable[int], fraction: float) -> int:
    """Training images after `data.subset` (every class present keeps at least one)."""
    if fraction >= 1.0:
        return sum(class_counts)
    return sum(subset_class_count(n, fraction) for n in class_counts if n > 0)


def updates_per_epoch(train_size: int, global_batch: int, micro_batch: int, num_workers: int) -> int:
    """Optimizer updates of one epoch, as the training loop counts them: a drop_last
    DistributedSampler gives each worker train_size // num_workers images, a drop_last
    loader makes full micro-batches of those, and every accum_steps micro-batches are one update."""
    per_worker = train_size // num_workers
    micro_batches = per_worker // micro_batch
    accum_steps = global_batch // (micro_batch * num_workers)
    return micro_batches // accum_steps if accum_steps >= 1 else 0


# The training set -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingSet:
    """A run's training set before `data.subset`: what it is and how many images per class."""

    description: str
    class_counts: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(self.class_counts)

    def after_subset(self, fraction: float) -> int:
        return subset_size(self.class_counts, fraction)

    def smallest_subset(self, images: int) -> float | None:
        """The smallest `data.subset` (3 decimals, rounded up) that keeps at least `images`."""
        if self.size < images:
            return None
        lo, hi = 1, 1000  # the count only grows with the fraction: bisect in thousandths
        while lo < hi:
            mid = (lo + hi) // 2
            if self.after_subset(mid / 1000) >= images:
                hi = mid
            else:
                lo = mid + 1
        return lo / 1000


def training_set(data: DataConfig) -> TrainingSet:
    """The training set of `data`, read the way the run reads it but without torch: an
    image folder is indexed (every DataError the run would raise comes here; one on object
    storage from its listing, without downloading), CIFAR's labels
    are counted when its extracted folder is there (else the download's known sizes)."""
    if data.kind == "digits":
        return TrainingSet("digits", DIGITS_TRAIN_PER_CLASS)
    if data.kind == "synthetic":
        s = data.synthetic
        return TrainingSet(f"synthetic, {s.num_classes} classes x {s.train_per_class}",
                           (s.train_per_class,) * s.num_classes)
    assert data.root is not None  # the config guarantees it
    if data.kind == "imagefolder" and is_uri(data.root):  # from the listing: nothing downloaded
        listed = list_image_folder(data.root)
        return TrainingSet(f"{listed.uri}/train", listed.class_counts())
    if data.kind == "imagefolder":
        index = index_image_folder(data.root, data.skip_corrupt)
        counts = Counter(index.train.labels)
        return TrainingSet(f"{Path(index.root) / 'train'}", tuple(counts[i] for i in range(len(index.classes))))
    return _cifar(data.kind, data.root)


def _cifar(kind: str, root_path: str) -> TrainingSet:
    root = Path(root_path).expanduser()
    if root.exists() and not root.is_dir():
        raise DataError(f"{root}: not a folder (data.root for data.kind {kind!r})")
    folder_name, train_files, test_files, meta, _ = CIFAR_FILES[kind]
    folder = root / folder_name
    if not all((folder / f).is_file() for f in (*train_files, *test_files, meta)):
        classes, per_class = _CIFAR_KNOWN[kind]  # the run downloads the official archive
        return TrainingSet(f"{kind} (downloaded into {root})", (per_class,) * classes)
    counts: Counter[int] = Counter()
    try:
        for name in train_files:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            counts.update(int(x) for x in entry["labels" if "labels" in entry else "fine_labels"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError) as err:
        raise DataError(f"{folder}: cannot load {kind} ({type(err).__name__}: {err})") from None
    return TrainingSet(f"{kind} in {folder}", tuple(n for _, n in sorted(counts.items())))


# Pretrained checkpoints -----------------------------------------------------------------------------------
def check_pretrained(path: str | None, where: str) -> None:
    """A one-line ConfigError (prefixed with `where`) unless `path` is None or a readable file."""
    if path is None:
        return
    p = Path(path)
    hint = "a checkpoint file to start from; leave model.pretrained empty to train from scratch"
    if p.is_dir():
        raise ConfigError(f"{where}: {path}: is a folder, not a checkpoint file ({hint})")
    if not p.is_file():
        raise ConfigError(f"{where}: {path}: no such file ({hint})")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ConfigError(f"{where}: {path}: cannot read ({err.strerror or err})") from None


# Checks -------------------------------------------------------------------------------------------------
KeyName = Callable[[str, bool], str]
"""`key(path, searched)`: how a message names a key path (with the file it comes from)."""


def check_config_feasible(cfg: TrainConfig, source: str) -> None:
    """Fail in one line (naming `source`) when `cfg` cannot train: its data, a global batch
    larger than the training set, or a missing pretrained checkpoint."""
    _Check(cfg, {}, set(), lambda path, searched: f"{source}: {path}").run()


def check_space_feasible(
    base: TrainConfig, search: Mapping[str, DistributionLike], source: str, first_rung: int | None = None
) -> None:
    """The same for every trial a space can make: the base config with any combination of
    the values its searched keys can take.

    A space with a value that cannot train is refused whole, naming the value and the values
    that fit, rather than searched without it: dropping a choice would change the user's
    search (and Optuna's distribution) behind their back, and the fix is one edit.
    `first_rung`: the epoch of the scheduler's first comparison; a warning (one line) when
    some trial reaches it after fewer than `FEW_UPDATES` optimizer updates."""
    options = {path: _possible(base, dist, path) for path, dist in search.items()}
    ranges = {path for path, dist in search.items() if dist.kind != "choice"}
    check = _Check(base, options, ranges, lambda path, searched: f"{source}: {'search' if searched else 'train'}.{path}",
                   search)
    check.run()
    if first_rung:
        fewest = min(
            (updates_per_epoch(ts.after_subset(subset), gb, 1 if mb == "auto" else mb, nw), gb)
            for ts, subset, gb, mb, nw in check.trials() if ts is not None and gb >= (1 if mb == "auto" else mb) * nw
        )
        if fewest[0] * first_rung < FEW_UPDATES:
            logger.warning(
                "%s: warning: ASHA's first rung (epoch %d) comes after only %d optimizer updates with "
                "batch.global_batch %d; rungs that early rank how fast trials start, not where they end "
                "(raise experiment.scheduler.grace_period)", source, first_rung, fewest[0] * first_rung, fewest[1],
            )


FEW_UPDATES = 20


def _base_value(cfg: TrainConfig, path: str) -> Any:
    node: Any = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _sampled(dist: DistributionLike) -> list[Any]:
    """The values to check for a searched key where it is sampled: every choice, or the two
    bounds of a range (every key checked here acts monotonically, so the bounds decide)."""
    values = list(dist.values or []) if dist.kind == "choice" else [dist.low, dist.high]
    if dist.kind == "int":
        values = [int(v) for v in values if v is not None]
    return list(dict.fromkeys(values))


def _possible(base: TrainConfig, dist: DistributionLike, path: str) -> list[Any]:
    """Every value a searched key can have in a trial (what messages list): its sampled
    values, and with a `when` condition also the base value, which trials where it does not
    hold keep."""
    values = _sampled(dist)
    if dist.when:
        values.append(_base_value(base, path))
    return list(dict.fromkeys(values))


@dataclass
class _Failure:
    picked: dict[str, Any]
    ts: TrainingSet
    subset: float
    global_batch: int
    micro_batch: int
    num_workers: int
    images: int


@dataclass
class _Check:
    base: TrainConfig
    options: Mapping[str, list[Any]]
    ranges: set[str]
    key: KeyName
    search: Mapping[str, DistributionLike] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._sets: dict[str, TrainingSet | None] = {}

    def values(self, path: str) -> list[Any]:
        return list(self.options.get(path) or [_base_value(self.base, path)])

    def combos(self, paths: Sequence[str]) -> list[tuple[Any, ...]]:
        """The combinations of `paths` a trial can have (`when` conditions followed)."""
        return reachable(self.base, self.search, paths, lambda p: _sampled(self.search[p]))

    def trials(self) -> list[tuple[TrainingSet | None, float, int, Any, int]]:
        """(training set, subset, global batch, micro-batch, workers) of every trial there
        can be; the training set is None where the config's own checks refuse the data keys."""
        n = len(_SOURCE_KEYS)
        return [(self._set(c[:n]), *c[n:]) for c in self.combos((*_SOURCE_KEYS, _SUBSET, *_BATCH_KEYS))]

    def run(self) -> None:
        for (value,) in self.combos((_PRETRAINED,)):
            check_pretrained(value, self.key(_PRETRAINED, _PRETRAINED in self.options))
        sources = self.sources()
        failures = []
        n = len(_SOURCE_KEYS)
        for combo in self.combos((*_SOURCE_KEYS, _SUBSET, *_BATCH_KEYS)):
            ts = self._set(combo[:n])
            subset, gb, mb, nw = combo[n:]
            mb = 1 if mb == "auto" else mb  # an update needs one micro-batch per worker, whatever its size
            if ts is None or gb < mb * nw:  # refused by the config's own checks (no whole accumulation)
                continue
            images = ts.after_subset(subset)
            if updates_per_epoch(images, gb, mb, nw) < 1:
                failures.append(_Failure(dict(zip(_SOURCE_KEYS, combo)), ts, subset, gb, mb, nw, images))
        if failures:
            worst = min(failures, key=lambda f: (f.images, -f.global_batch))
            raise ConfigError(self.explain(worst, sources))

    def sources(self) -> list[tuple[dict[str, Any], TrainingSet]]:
        """Every training set a run can have, with the values of the keys that chose it."""
        out = []
        for combo in self.combos(_SOURCE_KEYS):
            ts = self._set(combo)
            if ts is not None:
                out.append((dict(zip(_SOURCE_KEYS, combo)), ts))
        return out

    def _set(self, combo: Sequence[Any]) -> TrainingSet | None:
        """The training set the data keys `combo` (values of `_SOURCE_KEYS`) give, read once."""
        base_data = self.base.data.model_dump()
        data = {**base_data, "synthetic": dict(base_data["synthetic"])}
        for path, value in zip(_SOURCE_KEYS, combo):
            parts = path.split(".")[1:]
            (data["synthetic"] if len(parts) == 2 else data)[parts[-1]] = value
        try:
            cfg = DataConfig.model_validate(data)
        except ValidationError:  # a combination the config's own checks refuse in the trial
            return None
        ident = repr(cfg.model_dump(include={"kind", "root", "skip_corrupt", "synthetic"}))
        if ident not in self._sets:
            self._sets[ident] = training_set(cfg)
        return self._sets[ident]

    def explain(self, f: _Failure, sources: Sequence[tuple[dict[str, Any], TrainingSet]]) -> str:
        """One line: which value does not fit, the training set's size, and what would fit.
        Blamed first: a searched global batch when some of its values fit, then a searched
        data.subset, then a searched data key, then the global batch."""
        ts, gb, n = f.ts, f.global_batch, f.images
        subset = f", data.subset {f.subset:g} of {ts.size}" if f.subset < 1 else ""
        have = f"{n} training images ({ts.description}{subset})"
        why = "so no epoch has a full optimizer update"
        gb_path = "batch.global_batch"
        smallest = ts.smallest_subset(gb)
        raise_subset = f"raise data.subset to at least {smallest:g}" if f.subset < 1 and smallest is not None else ""
        fit: list[Any] = []
        if gb_path in self.options:
            fewest = min(t.after_subset(s) for (_, t), s in itertools.product(sources, self.values(_SUBSET)))
            fit = [g for g in self.values(gb_path) if self._fits(fewest, g)]
            if fit or (_SUBSET not in self.options and not any(p in self.options for p in _SOURCE_KEYS)):
                if gb_path in self.ranges:
                    hint = f"lower its upper bound to at most {fewest}"
                elif fit:
                    hint = f"values that fit: {_listed(fit)}"
                else:
                    hint = "no value fits; lower them" + (f" or {raise_subset}" if raise_subset else "")
                return f"{self.key(gb_path, True)}: {gb} is more than the {have} a trial has, {why}; {hint}"
        if _SUBSET in self.options:
            hint = (f"the smallest data.subset that fits is {smallest:g}" if smallest is not None
                    else f"even the whole training set ({ts.size}) is too small; lower batch.global_batch")
            fit = [s for s in self.values(_SUBSET) if ts.after_subset(s) >= gb]
            if _SUBSET not in self.ranges and fit:
                hint += f" (values that fit: {_listed(fit)})"
            return (f"{self.key(_SUBSET, True)}: {f.subset:g} leaves {n} of the {ts.size} training images "
                    f"({ts.description}), fewer than batch.global_batch {gb}, {why}; {hint}")
        searched = [p for p in _SOURCE_KEYS if p in self.options]
        if searched:
            p = searched[0]
            return (f"{self.key(p, True)}: {f.picked[p]!r} gives {have}, fewer than batch.global_batch {gb}, "
                    f"{why}; lower batch.global_batch or use more data")
        unit = f.micro_batch * f.num_workers
        most = n // unit * unit
        if most >= unit:
            fixes = [(f"lower it to at most {most} (a multiple of batch.micro_batch {f.micro_batch} x "
                      f"{f.num_workers} workers)")]
        else:
            fixes = [(f"lower batch.micro_batch (one micro-batch on each worker, {f.micro_batch} x {f.num_workers} "
                      f"workers = {unit}, is already more)")]
        if raise_subset:
            fixes.append(raise_subset)
        return f"{self.key(gb_path, False)}: {gb} is more than the {have}, {why}; {' or '.join(fixes)}"

    def _fits(self, images: int, global_batch: int) -> bool:
        pairs = itertools.product(*(self.values(p) for p in _BATCH_KEYS[1:]))
        return all(updates_per_epoch(images, global_batch, m, w) >= 1 for m, w in pairs if global_batch >= m * w)


def _listed(values: Sequence[Any]) -> str:
    shown = ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values[:_MAX_LISTED])
    return shown + (", ..." if len(values) > _MAX_LISTED else "")
