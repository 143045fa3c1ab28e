"""Search overhead: how much of a trial's time is training, and how long a trial takes to
reach its first optimizer step, against a bare Ray Tune + Ray Train trial in the same run.

Ours: the quickstart space run in this process by search.run (prepare + run_search) with
N trials one at a time, FIFO (no early stopping), few epochs on a small data subset.
Bare reference: a Tune function trainable with the same resources as search.run's trial
driver ({"CPU": 0, "memory": 1 MiB}) that starts a `ray.train.torch.TorchTrainer` with the
same workers, whose train loop only calls `ray.train.report({"first_step_at": time.time()})`
once, reported to Tune through `TuneReportCallback`.

A Tune callback records every trial's `on_trial_start` and `on_trial_complete` wall times.
Per trial of ours:
  in-steps fraction  last reported `train_seconds` / trial wall time (the workers live for
                     the whole trial, so this is the fraction of worker time spent training)
  start-to-step      `first_step_at` - trial start
For the bare trial, start-to-step is the time to its one report: what Ray Tune and Ray Train
themselves take to start a trial and its workers. Ours - bare is what our set-up adds
(imports, data, model build, SyncBN, DDP wrap, the first step itself).

    python benchmarks/search_overhead.py                 # N=3, 1 epoch, subset 0.25
    python benchmarks/search_overhead.py --trials 5 --epochs 2 --subset 0.5
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
def run_ours(args: argparse.Namespace, storage: str, name: str) -> list[dict[str, Any]]:
    from search.run import prepare, run_search

    sets = [
        f"experiment.num_samples={args.trials}",
        "experiment.max_concurrent_trials=1",
        "experiment.scheduler={kind: fifo}",
        f"train.run.epochs={args.epochs}",
        f"train.data.subset={args.subset}",
        *args.set,
    ]
    space, exp, sets = prepare(None, sets, False, name, storage)
    timer = TrialTimer()
    run_search(space, exp, sets, callbacks=[timer])
    return timer.rows()


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


def run_bare(args: argparse.Namespace, storage: str, name: str, workers: int, cpus: float) -> list[dict[str, Any]]:
    from search.run import DRIVER_MEMORY

    timer = TrialTimer()
    trainable = tune.with_resources(
        tune.with_parameters(_bare_trial, workers=workers, cpus_per_worker=cpus, runs=f"{storage}/{name}/runs"),
        {"CPU": 0, "memory": DRIVER_MEMORY},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(num_samples=args.trials, max_concurrent_trials=1),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[timer]),
    )
    tuner.fit()
    return timer.rows()


# Report ----------------------------------------------------------------------------------------------
def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r[key] is not None and r["error"] is None]
    return statistics.median(vals) if vals else None


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
    p.add_argument("--trials", type=int, default=3, help="trials of each kind (N), run one at a time")
    p.add_argument("--epochs", type=int, default=1, help="train.run.epochs of our trials")
    p.add_argument("--subset", type=float, default=0.25, help="train.data.subset of our trials")
    p.add_argument("--num-cpus", type=int, default=4, help="CPUs of the local Ray instance")
    p.add_argument("--order", choices=["bare-first", "ours-first"], default="bare-first",
                   help="which search runs first (the first one pays the cold start of the Ray instance)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="further override of the quickstart space, e.g. train.batch.micro_batch=8")
    args = p.parse_args(argv)
    for key in ("trials", "epochs", "num_cpus"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if not 0 < args.subset <= 1:
        p.error(f"--subset must be in (0, 1], got {args.subset}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray

    from search.run import trial_resources
    from spaces import QUICKSTART, load_space

    workers, cpus, _ = trial_resources(load_space(QUICKSTART, args.set))
    if not ray.is_initialized():
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    print(
        f"search overhead: N={args.trials} trials each, one at a time; ours: quickstart space, FIFO, "
        f"epochs={args.epochs}, subset={args.subset:g}, {workers} workers x {cpus:g} CPU; "
        f"bare: TorchTrainer, {workers} workers x {cpus:g} CPU, one report",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="search_bench_") as storage:
        runs = {}
        order = ["bare", "ours"] if args.order == "bare-first" else ["ours", "bare"]
        for kind in order:
            t = time.perf_counter()
            if kind == "ours":
                runs[kind] = run_ours(args, storage, "ours")
            else:
                runs[kind] = run_bare(args, storage, "bare", workers, cpus)
            print(f"{kind}: {args.trials} trials in {time.perf_counter() - t:.1f} s", flush=True)

    print_rows("ours (search.run, quickstart)", runs["ours"])
    print_rows("bare (Tune + TorchTrainer, one report)", runs["bare"])
    frac = _median(runs["ours"], "fraction")
    ours, bare = _median(runs["ours"], "to_first_step"), _median(runs["bare"], "to_first_step")
    print()
    print(f"median fraction of worker time in training steps (ours): {_f(frac, '.1%')}")
    print(f"median trial start -> first optimizer step, ours: {_f(ours, '.1f')} s")
    print(f"median trial start -> first report, bare Tune + Ray Train: {_f(bare, '.1f')} s")
    if ours is not None and bare is not None:
        print(f"our set-up adds {ours - bare:.1f} s per trial start; ratio ours/bare {ours / bare:.2f}")
    failed = [r for rows in runs.values() for r in rows if r["error"]]
    return 1 if failed or ours is None or bare is None else 0


if __name__ == "__main__":
    raise SystemExit(main())
