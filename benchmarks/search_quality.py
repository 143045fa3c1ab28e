"""Does the search find the truth? On the digits proxy (the quickstart's data and model),
with a small discrete space:

1. brute force: every combination x 3 seeds at the full budget, in-process (no Ray):
   the true mean of every config;
2. the whole pipeline (`python -m search.run`: search, then confirmation) R times, with
   different sampler seeds;
3. for each run: is the confirmed winner's true mean within 0.5 pp of the true best, or
   statistically tied with it (paired 95% CI of the difference over the truth seeds
   contains 0)? Trial-epochs it used against the brute force's, and the rung taus.

    python benchmarks/search_quality.py                 # R=5, schedule rung
    python benchmarks/search_quality.py --repeats 3 --schedule plain
    python benchmarks/search_quality.py --brute-only    # only the true means (cached)

The brute force is cached in --work (default ~/trick-search-bench/quality), so runs with
other schedules or more repeats reuse it. Prints one line per run and the summary last.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SPACE_KEYS = {
    "mix.mode": ["none", "mixup", "cutmix"],
    "label_smoothing": [0.0, 0.1],
    "augment.randaugment.enabled": [False, True],
    "batch.global_batch": [32, 64],
}
TRUTH_SEEDS = [2000, 2001, 2002]  # apart from the search's (0) and the confirmation's (1000...)
WITHIN = 0.005  # 0.5 pp


def combos() -> list[dict[str, Any]]:
    return [dict(zip(SPACE_KEYS, vals)) for vals in itertools.product(*SPACE_KEYS.values())]


def key(values: dict[str, Any]) -> str:
    return json.dumps({k: values[k] for k in SPACE_KEYS}, sort_keys=True)


def space_overrides(schedule: str, samples: int, seed: int) -> list[str]:
    sets = [
        "search.mix.mixup_alpha=null", "search.mix.cutmix_alpha=null", "search.augment.randaugment.magnitude=null",
        "search.mix.mode={choice: [none, mixup, cutmix]}", "search.label_smoothing={choice: [0.0, 0.1]}",
        "search.augment.randaugment.enabled={choice: [false, true]}", "search.batch.global_batch={choice: [32, 64]}",
        f"experiment.num_samples={samples}", f"experiment.sampler.seed={seed}",
        f"experiment.scheduler.schedule={schedule}", "experiment.confirm={top_k: 2, seeds: 3}", "experiment.ablate=false",
    ]
    return sets


def train_one(args: tuple[str, int]) -> tuple[str, int, float]:
    """One full-budget run of a combination on one seed, in this process (1 thread)."""
    import torch

    from search.experiment.folder import Experiment  # noqa: F401  (the project on the path)
    from spaces import QUICKSTART, load_space
    from trainable.loop import run_training

    torch.set_num_threads(1)
    values, seed = json.loads(args[0]), args[1]
    space = load_space(QUICKSTART, space_overrides("plain", 1, 0))
    cfg = space.config_for(values)
    data = cfg.model_dump()
    data["run"]["seed"] = seed
    cfg = type(cfg).model_validate(data)
    last: dict[str, float] = {}
    import trainable.loop as loop

    loop._report_with_checkpoint = lambda report, m, state: report(m)
    run_training(cfg, 0, 1, torch.device("cpu"), report=lambda m, checkpoint=None: last.update(m))
    return args[0], seed, float(last["val_acc"])


def brute_force(work: Path, procs: int) -> dict[str, list[float]]:
    cache = work / "truth.json"
    truth: dict[str, dict[str, float]] = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [(key(c), s) for c in combos() for s in TRUTH_SEEDS if str(s) not in truth.get(key(c), {})]
    start = time.time()
    if todo:
        print(f"brute force: {len(todo)} runs on {procs} processes", flush=True)
        with ProcessPoolExecutor(procs) as pool:
            for k, seed, acc in pool.map(train_one, todo):
                truth.setdefault(k, {})[str(seed)] = acc
                cache.write_text(json.dumps(truth, indent=1))
        print(f"brute force: {time.time() - start:.0f} s", flush=True)
    return {k: [v[str(s)] for s in TRUTH_SEEDS] for k, v in truth.items()}


def run_pipeline(work: Path, schedule: str, samples: int, seed: int, address: str = "local") -> dict[str, Any]:
    name = f"q-{schedule}-{samples}-{seed}"
    exp = work / "experiments" / name
    if not (exp / "report" / "report.json").exists():
        cmd = [sys.executable, "-m", "search.run", "--address", address, "--storage-path", str(work / "experiments"),
               "--name", name, *(a for s in space_overrides(schedule, samples, seed) for a in ("--set", s))]
        if exp.exists():
            cmd.append("--resume")
        start = time.time()
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)})
        (work / f"{name}.log").write_text(out.stdout + out.stderr)
        if not (exp / "report" / "report.json").exists():
            raise SystemExit(f"{name}: no report (see {work / f'{name}.log'})")
        (exp / "wall_s").write_text(f"{time.time() - start:.0f}\n")
    report = json.loads((exp / "report" / "report.json").read_text())
    report["wall_s"] = float((exp / "wall_s").read_text()) if (exp / "wall_s").exists() else None
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="pipeline runs, sampler seeds 0..R-1")
    p.add_argument("--schedule", default="rung", choices=["rung", "plain"])
    p.add_argument("--samples", type=int, default=8, help="search trials per pipeline run")
    p.add_argument("--procs", type=int, default=2, help="processes for the brute force")
    p.add_argument("--work", default=str(Path.home() / "trick-search-bench" / "quality"))
    p.add_argument("--brute-only", action="store_true")
    p.add_argument("--address", default="local",
                   help="Ray cluster for the pipeline runs (default: a new local one per run; never run two "
                        "benchmarks with their own local instances side by side: Ray Train's clean-up of "
                        "stopped trials fails when a machine has several Ray instances)")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    from search.answer.stats import paired_difference, summarise_values

    truth = brute_force(work, args.procs)
    means = {k: sum(v) / len(v) for k, v in truth.items()}
    best = max(means, key=means.get)
    print(f"true best: {best} val_acc {means[best]:.4f}; worst {min(means.values()):.4f}; "
          f"{len(means)} configs x {len(TRUTH_SEEDS)} seeds")
    for k in sorted(means, key=means.get, reverse=True)[:5]:
        s = summarise_values(truth[k])
        print(f"  {means[k]:.4f} [{s.ci95[0]:.4f}, {s.ci95[1]:.4f}]  {k}")
    if args.brute_only:
        return
    brute_epochs = len(truth) * len(TRUTH_SEEDS) * 5
    right, used, taus = 0, [], []
    for r in range(args.repeats):
        rep = run_pipeline(work, args.schedule, args.samples, r, args.address)
        win = key(rep["winner"]["config"])
        gap = means[best] - means[win]
        diff = paired_difference(truth[best], truth[win])
        ok = gap <= WITHIN or diff.contains_zero
        right += ok
        epochs = rep["budget"]["trial_epochs_search"] + rep["budget"]["trial_epochs_confirm"]
        used.append(epochs)
        taus.extend(t["tau"] for t in rep["rung_tau"] if t["tau"] is not None)
        rung = ", ".join(f"rung {t['rung']}: {t['tau'] if t['tau'] is None else round(t['tau'], 2)} (n={t['n']})"
                         for t in rep["rung_tau"])
        print(f"run {r}: {rep['verdict']}: winner true mean {means[win]:.4f} (best {means[best]:.4f}, gap "
              f"{100 * gap:.2f} pp) {'right' if ok else 'WRONG'}; {epochs} trial-epochs; {rung}; "
              f"wall {rep['wall_s']} s", flush=True)
    mean_tau = sum(taus) / len(taus) if taus else float("nan")
    print(f"schedule {args.schedule}: {right}/{args.repeats} runs right ({100 * right / args.repeats:.0f}%), "
          f"trial-epochs {sum(used) / len(used):.0f} per run = {sum(used) / len(used) / brute_epochs:.2f} of the "
          f"brute force ({brute_epochs}); mean rung tau {mean_tau:.2f}")


if __name__ == "__main__":
    main()
