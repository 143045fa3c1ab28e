"""Record learning curves of a discrete grid of configs x seeds with the project's own
training, through the function a search trial's worker runs (`trainable.loop.run_training`,
rank 0 of 1, one torch thread as a trial's one CPU), and store them as a table
(`benchmarks/replay/tables/<name>.json.gz`): per (config, seed) the per-epoch metric under the
search's schedule (the cosine restarted at the space's rungs, `Space.trial_config`) and under
one cosine over the whole run (`Space.confirm_config`'s schedule, also the `plain` search
schedule), with per-epoch seconds. Resumable: every finished run is appended to
`<table>.partial.jsonl` at once, and a restarted recorder skips what is there.

    nice -n 10 python -m benchmarks.replay.record --table quickstart
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TABLES = HERE / "tables"

RECIPES: dict[str, dict[str, Any]] = {
    # the quickstart space with every conditional value fixed, so the grid is the whole space
    "quickstart": {
        "space": "spaces/quickstart.yaml",
        "overrides": [
            "search.mix.mixup_alpha=null", "search.mix.cutmix_alpha=null", "search.mix.mode={choice: [none, cutmix]}",
            "search.augment.randaugment.magnitude=null",
            "train.mix.mixup_alpha=0.2", "train.mix.cutmix_alpha=1.0", "train.augment.randaugment.magnitude=9",
            "train.data.subset=0.35", "train.run.epochs=3",
            "experiment.scheduler.grace_period=1", "experiment.scheduler.schedule=plain",
            "search.batch.global_batch=null",
        ],
        "grid": {
            "mix.mode": ["none", "cutmix"],
            "label_smoothing": [0.0, 0.1],
            "augment.randaugment.enabled": [False, True],
        },
        "seeds": list(range(8)),
        # the search the replay runs on this space: fewer trials than configs
        "replay_overrides": ["experiment.num_samples=6"],
    },
    # a proxy where tricks matter: the baseline updates with a global batch of 128 (what a
    # production run on more workers would use) and 6 epochs of 35% of the digits are few
    # updates at that batch, so the search's batch choice, and the regularisers' effects at
    # each batch, change the score by more than the seed noise. The search runs the space's
    # default rung schedule (ASHA grace 2, factor 2: rungs at epochs 2 and 4), recorded beside
    # the plain schedule of the confirmation
    "tricks": {
        "space": "spaces/quickstart.yaml",
        "overrides": [
            "search.mix.mixup_alpha=null", "search.mix.cutmix_alpha=null",
            "search.augment.randaugment.magnitude=null",
            "train.mix.mixup_alpha=0.2", "train.mix.cutmix_alpha=1.0", "train.augment.randaugment.magnitude=9",
            "train.batch.global_batch=128",
            "train.data.subset=0.35", "train.run.epochs=6",
            "experiment.scheduler.grace_period=2", "experiment.scheduler.schedule=rung",
        ],
        "grid": {
            "mix.mode": ["none", "mixup", "cutmix"],
            "label_smoothing": [0.0, 0.1],
            "augment.randaugment.enabled": [False, True],
            "batch.global_batch": [32, 64, 128],
        },
        "seeds": list(range(8)),
        "schedules": ["plain", "rung"],
        # the search the replay runs: 24 trials of the 36 configs, and the product's default
        # confirmation (the top 3 configs and the baseline) on 5 seeds, where a 4 pp gain over
        # the baseline is shown (3 seeds show it about half the time)
        "replay_overrides": ["experiment.num_samples=24", "experiment.confirm={top_k: 3, seeds: 5}"],
    },
}


def recipe_space(recipe: dict[str, Any]) -> Any:
    from spaces import load_space

    return load_space(recipe["space"], overrides=list(recipe["overrides"]))


def grid_values(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    keys = list(recipe["grid"])
    return [dict(zip(keys, combo)) for combo in itertools.product(*(recipe["grid"][k] for k in keys))]


def config_key(space: Any, values: dict[str, Any]) -> str:
    """A config's identity in a table: its full values over the space's searched keys."""
    return json.dumps(space.full_values(values), sort_keys=True)


def train_curve(cfg: Any, metric: str) -> list[tuple[int, float, float, str | None]]:
    """[(epoch, metric, seconds, run_status)] of one training run of `cfg`, reported the way
    a trial's worker reports them (a run that diverged ends with its status)."""
    import torch

    from trainable.loop import TrainingDiverged, diverged_metrics, run_training
    from trainable.status import RUN_STATUS

    torch.set_num_threads(1)
    out: list[tuple[int, float, float, str | None]] = []
    last = [time.perf_counter()]

    def report(metrics: dict[str, Any], checkpoint: Any = None) -> None:
        now = time.perf_counter()
        out.append((int(metrics["epoch"]), float(metrics[metric]), now - last[0], metrics.get(RUN_STATUS)))
        last[0] = now

    try:
        run_training(cfg, 0, 1, torch.device("cpu"), report=report)
    except TrainingDiverged as err:
        report(diverged_metrics(err))
    return out


def record(name: str, limit_s: float | None = None, shard: tuple[int, int] = (0, 1)) -> Path:
    recipe = RECIPES[name]
    space = recipe_space(recipe)
    metric = space.experiment.metric
    TABLES.mkdir(exist_ok=True)
    partial = TABLES / f"{name}.partial.jsonl"
    done = set()
    if partial.exists():
        for line in partial.read_text().splitlines():
            row = json.loads(line)
            done.add((row["config"], row["seed"]))
    started = time.monotonic()
    # seeds outermost: a table stopped early has every config on its first seeds
    runs = [(seed, values) for seed in recipe["seeds"] for values in grid_values(recipe)]
    for i, (seed, values) in enumerate(runs):
        key = config_key(space, values)
        if i % shard[1] != shard[0] or (key, seed) in done:
            continue
        if limit_s is not None and time.monotonic() - started > limit_s:
            return partial
        from trainable.config import TrainConfig

        row: dict[str, Any] = {"config": key, "values": space.full_values(values), "seed": seed}
        for schedule in recipe.get("schedules", ["plain"]):
            cfg = (space.config_for(values) if schedule == "plain" else space.trial_config(values)).model_dump()
            cfg["run"]["seed"] = seed
            row[schedule] = train_curve(TrainConfig.model_validate(cfg), metric)
        with partial.open("a") as f:
            f.write(json.dumps(row) + "\n")
        logging.info("%s seed %d: %s", key, seed, row["plain"][-1][1])
    return partial


def finish(name: str) -> Path:
    """The compact table: recipe, versions, rows, and the sha256 of the rows."""
    recipe = RECIPES[name]
    rows = [json.loads(line) for line in (TABLES / f"{name}.partial.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: (r["config"], r["seed"]))
    body = json.dumps(rows, sort_keys=True, separators=(",", ":"))
    versions = {}
    for pkg in ("torch", "torchvision", "ray", "optuna", "numpy"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    table = {"name": name, "recipe": recipe, "versions": versions,
             "sha256": hashlib.sha256(body.encode()).hexdigest(), "rows": rows}
    out = TABLES / f"{name}.json.gz"
    with gzip.open(out, "wt") as f:
        json.dump(table, f, separators=(",", ":"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.replay.record", description=__doc__.splitlines()[0])
    p.add_argument("--table", default="quickstart", choices=sorted(RECIPES))
    p.add_argument("--limit-s", type=float, help="stop starting new runs after this many seconds")
    p.add_argument("--finish", action="store_true", help="only write the compact table from what is recorded")
    p.add_argument("--shard", default="0/1", help="I/N: record only every N-th run from the I-th (run N recorders at once)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.finish:
        i, n = (int(x) for x in args.shard.split("/"))
        record(args.table, args.limit_s, (i, n))
    print(finish(args.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
