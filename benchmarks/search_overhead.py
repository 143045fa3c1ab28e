"""Search overhead: how long a trial takes to reach its first optimizer step against a bare
Ray Tune + Ray Train trial in the same run, how much of a trial's time is training, and how
busy the search keeps its trial slots.

Ours: the quickstart space run in this process by search.run (prepare + run_search) with N
trials, FIFO (no early stopping), no confirmation or ablation, at the quickstart's own
epochs and data subset unless --epochs / --subset say otherwise.
Bare reference: a Tune function trainable with the same resources as search.run's trial
driver ({"CPU": 0, "memory": 1 MiB}) that starts a `ray.train.torch.TorchTrainer` with the
same workers, whose train loop only calls `ray.train.report({"first_step_at": time.time()})`
once, reported to Tune through `TuneReportCallback`. Both run --concurrent trials at a time.

A Tune callback records every trial's `on_trial_start` and `on_trial_complete` wall times.
Per trial of ours:
  in steps           last reported `train_seconds` / trial wall time (the workers live for
                     the whole trial, so this is the fraction of worker time spent training)
  start-to-step      `first_step_at` - trial start
For the bare trial, start-to-step is the time to its one report: what Ray Tune and Ray Train
themselves take to start a trial and its workers. Ours - bare is what our set-up adds
(imports, data, model build, SyncBN, DDP wrap, the first step itself).
Search utilisation: the trials' wall time summed / (trial slots x the search's wall time,
from `run_search` called to returned); the slots are the trials run at a time.

    python benchmarks/search_overhead.py                 # N=3, the quickstart's epochs and subset
    python benchmarks/search_overhead.py --trials 5 --epochs 2 --subset 0.5 --concurrent 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from ray import tune  # noqa: E402


class TrialTimer(tune.Callback):
    """Wall-clock start and end of every trial, and its last reported result."""

    def __init__(self) -> None:
        self.start: dict[str, float] = {}
        self.end: dict[str, float] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.start.setdefault(trial.trial_id, time.time())  # a retried trial keeps its first start

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        self.last[trial.trial_id] = dict(result)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.end[trial.trial_id] = time.time()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.end[trial.trial_id] = time.time()
        self.errors[trial.trial_id] = str(getattr(trial, "error_file", "") or "error")

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for tid in sorted(self.start, key=self.start.get):
            start, end, last = self.start[tid], self.end.get(tid), self.last.get(tid, {})
            wall = end - start if end is not None else float("nan")
            first = last.get("first_step_at")
            train = last.get("train_seconds")
            out.append(
                {
                    "trial": tid,
                    "wall": wall,
                    "train_seconds": train,
                    "fraction": train / wall if train is not None and wall > 0 else None,
                    "to_first_step": first - start if first is not None else None,
                    "error": self.errors.get(tid),
                }
            )
        return out


# Ours ----------------------------------------------------------------------------------------------
def our_overrides(args: argparse.Namespace) -> list[str]:
    """The quickstart as a plain search of N trials (no early stopping, no confirmation)."""
    sets = [
        f"experiment.num_samples={args.trials}",
        f"experiment.max_concurrent_trials={args.concurrent}",
        "experiment.scheduler={kind: fifo}",
        "experiment.confirm=null",
        "experiment.ablate=false",
    ]
    if args.epochs is not None:
        sets.append(f"train.run.epochs={args.epochs}")
    if args.subset is not None:
        sets.append(f"train.data.subset={args.subset}")
    return [*sets, *args.set]


def run_ours(args: argparse.Namespace, storage: str, name: str) -> tuple[list[dict[str, Any]], float]:
    from search.run import prepare, run_search

    space, exp, sets = prepare(None, our_overrides(args), False, name, storage)
    timer = TrialTimer()
    t = time.time()
    run_search(space, exp, sets, callbacks=[timer])
    return timer.rows(), time.time() - t


# Bare reference ------------------------------------------------------------------------------------
def _bare_loop(config: dict[str, Any]) -> None:
    import ray.train

    ray.train.report({"first_step_at": time.time()})


def _bare_trial(config: dict[str, Any], workers: int, cpus_per_worker: float, runs: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _bare_loop,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            callbacks=[TuneReportCallback()], storage_path=runs, name=tune.get_context().get_trial_id()
        ),
    )
    trainer.fit()


def run_bare(
    args: argparse.Namespace, storage: str, name: str, workers: int, cpus: float
) -> tuple[list[dict[str, Any]], float]:
    from search.phases.trial import DRIVER_MEMORY

    timer = TrialTimer()
    trainable = tune.with_resources(
        tune.with_parameters(_bare_trial, workers=workers, cpus_per_worker=cpus, runs=f"{storage}/{name}/runs"),
        {"CPU": 0, "memory": DRIVER_MEMORY},
    )
    t = time.time()
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=args.concurrent),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[timer]),
    )
    tuner.fit()
    return timer.rows(), time.time() - t


# Report ----------------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None and r["error"] is None]
    return statistics.median(vals) if vals else None


def in_steps(rows: list[dict[str, Any]]) -> float | None:
    """All trials' training-step seconds over all trials' wall seconds."""
    ok = [r for r in rows if r["train_seconds"] is not None and r["error"] is None and r["wall"] == r["wall"]]
    wall = sum(r["wall"] for r in ok)
    return sum(r["train_seconds"] for r in ok) / wall if wall > 0 else None


def utilisation(rows: list[dict[str, Any]], slots: int, wall: float) -> float | None:
    """The fraction of the search's trial slots busy with a trial over its wall time."""
    busy = sum(r["wall"] for r in rows if r["wall"] == r["wall"])
    return busy / (slots * wall) if wall > 0 and slots > 0 else None


def print_rows(label: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{label}")
    print(f"  {'trial':<12s} {'wall s':>8s} {'train s':>8s} {'in steps':>9s} {'start->1st step s':>18s}")
    for r in rows:
        print(
            f"  {r['trial']:<12s} {r['wall']:8.1f} {_f(r['train_seconds'], '8.1f'):>8s} "
            f"{_f(r['fraction'], '9.1%'):>9s} {_f(r['to_first_step'], '18.1f'):>18s}"
            + (f"  ERROR {r['error']}" if r["error"] else "")
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=3, help="trials of each kind (N)")
    p.add_argument("--concurrent", type=int, default=1, help="trials at a time, of each kind")
    p.add_argument("--epochs", type=int, help="train.run.epochs of our trials (default: the quickstart's)")
    p.add_argument("--subset", type=float, help="train.data.subset of our trials (default: the quickstart's)")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray instance")
    p.add_argument("--order", choices=["bare-first", "ours-first"], default="bare-first",
                   help="which search runs first (the first one pays the cold start of the Ray instance)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="further override of the quickstart space, e.g. train.batch.micro_batch=8")
    args = p.parse_args(argv)
    for key in ("trials", "epochs", "num_cpus", "concurrent"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.subset is not None and not 0 < args.subset <= 1:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from search.phases.trial import trial_resources
    from spaces import QUICKSTART, load_space

    space = load_space(QUICKSTART, our_overrides(args))
    workers, cpus, _ = trial_resources(space)
    if not ray.is_initialized():
        from trainable.cluster import quiet_ray_console, ray_env

        quiet_ray_console()
        ray_env()  # Ray as connect() sets it up; the bare trials inherit it too
        # the dashboard stays on, as in a search: Ray Train's placement-group cleaner asks it
        ray.init(num_cpus=args.num_cpus)
    print(
        f"search overhead: N={args.trials} trials each, {args.concurrent} at a time; ours: quickstart space, "
        f"FIFO, epochs={space.train.run.epochs}, subset={space.train.data.subset:g}, {workers} workers x {cpus:g} "
        f"CPU; bare: TorchTrainer, {workers} workers x {cpus:g} CPU, one report; Ray: {args.num_cpus} CPUs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="search_bench_") as storage:
        runs, walls = {}, {}
        order = ["bare", "ours"] if args.order == "bare-first" else ["ours", "bare"]
        for kind in order:
            if kind == "ours":
                runs[kind], walls[kind] = run_ours(args, storage, "ours")
            else:
                runs[kind], walls[kind] = run_bare(args, storage, "bare", workers, cpus)
            print(f"{kind}: {args.trials} trials in {walls[kind]:.1f} s", flush=True)

    print_rows("ours (search.run, quickstart)", runs["ours"])
    print_rows("bare (Tune + TorchTrainer, one report)", runs["bare"])
    ours, bare = _median(runs["ours"], "to_first_step"), _median(runs["bare"], "to_first_step")
    slots = min(args.concurrent, args.trials)
    print()
    print(f"fraction of worker time in training steps (ours): median {_f(_median(runs['ours'], 'fraction'), '.1%')}, "
          f"all trials {_f(in_steps(runs['ours']), '.1%')}")
    print(f"search utilisation (trial slots busy, {slots} slot{'s' if slots > 1 else ''}): "
          f"ours {_f(utilisation(runs['ours'], slots, walls['ours']), '.1%')}, "
          f"bare {_f(utilisation(runs['bare'], slots, walls['bare']), '.1%')}")
    print(f"median trial start -> first optimizer step, ours: {_f(ours, '.1f')} s")
    print(f"median trial start -> first report, bare Tune + Ray Train: {_f(bare, '.1f')} s")
    if ours is not None and bare is not None:
        print(f"our set-up adds {ours - bare:.1f} s per trial start; ratio ours/bare {ours / bare:.2f}")
    failed = [r for rows in runs.values() for r in rows if r["error"]]
    return 1 if failed or ours is None or bare is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
