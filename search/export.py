"""`python -m search.export --experiment DIR`: the answer's complete TrainConfig, with its
evidence, made ready for production, for `python -m trainable.train --config best.yaml`."""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search.answer.build import build_answer
from search.answer.stats import prediction_interval, rounding_floor
from search.experiment.folder import open_experiment, recorded_space
from search.experiment.trials import finished, read_results, summarise
from trainable.config import ConfigError, TrainConfig
from trainable.config_io import write_atomic

PACKAGES = ("trick-search", "torch", "torchvision", "ray", "optuna")


@dataclass
class Exported:
    config: TrainConfig
    provenance: dict[str, Any]

    def to_yaml(self) -> str:
        data = self.config.model_dump(mode="json")
        data["provenance"] = self.provenance
        return "# A complete TrainConfig exported from a trick search; run it with\n" \
               "#   python -m trainable.train --config <this file>\n" + yaml.safe_dump(data, sort_keys=False)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def verify_rule(
    confirmed: list[float], fresh: list[float], floor: float = 0.0, bounds: tuple[float, float] = (-math.inf, math.inf),
) -> tuple[bool, tuple[float, float]]:
    """Whether the mean of the `fresh` seeds lies inside the 95% prediction interval of a mean of
    that many seeds from the `confirmed` values (`search.answer.stats.prediction_interval`): a
    config that did not change fails it in 5% of runs. Returns (inside, interval)."""
    fresh_f = [v for v in fresh if math.isfinite(v)]
    lo, hi = prediction_interval(confirmed, max(len(fresh_f), 1), floor=floor, bounds=bounds)
    if not fresh_f or len(fresh_f) < len(fresh):
        return False, (lo, hi)
    mean = sum(fresh_f) / len(fresh_f)
    return lo <= mean <= hi, (lo, hi)


def not_final_reason(answer: dict[str, Any]) -> str | None:
    """Why an answer is not final (None when it is): the search, confirmation or ablation still
    running, or an unconfirmed verdict with its reason."""
    if answer["state"] != "finished":
        return f"the experiment is still {answer['state']}, so its verdict can still change"
    if answer["verdict"] == "unconfirmed":
        return f"the verdict is unconfirmed ({answer.get('verdict_reason') or 'no confirmation'})"
    return None


def export_trial(
    experiment: str, rank: int = 1, num_workers: int | None = None, allow_unconfirmed: bool = False,
) -> Exported:
    """The confirmed winner (rank 1), or the `rank`-th config of the confirmation table by
    mean; without a confirmation, the `rank`-th search trial by score (marked unconfirmed).
    An answer that is not final (`not_final_reason`) is refused unless `allow_unconfirmed`.
    The search budget is replaced by the space's `production` section (`Space.production_config`)."""
    exp = open_experiment(experiment)
    if rank < 1:
        raise ConfigError(f"--rank {rank}: must be >= 1")
    space, info = recorded_space(exp)
    answer = build_answer(exp, space)
    why = not_final_reason(answer)
    if why and not allow_unconfirmed:
        raise ConfigError(f"--experiment {experiment}: not a final answer: {why}; "
                          "pass --allow-unconfirmed to export it anyway")
    confirmed = [c for c in answer["confirm"] if c.get("status") == "done" and c.get("mean") is not None]
    sign = 1.0 if space.experiment.mode == "max" else -1.0
    if confirmed and answer["winner"] and answer["winner"].get("role") in ("candidate", "baseline"):
        winner = answer["winner"]
        others = sorted((c for c in confirmed if c["label"] != winner["label"]), key=lambda c: -sign * c["mean"])
        table = [winner, *others]
        if rank > len(table):
            raise ConfigError(f"--rank {rank}: only {len(table)} confirmed configs")
        chosen = table[rank - 1]
        values = chosen["config"]
        evidence = {
            "label": chosen["label"], "verdict": answer["verdict"] if rank == 1 else "ranked by mean",
            "answer": answer["message"], "mean": chosen["mean"], "std": chosen["std"], "ci95": chosen["ci95"],
            "seeds": chosen["seeds"], "values": chosen["values"], "search_trial": chosen.get("search_trial"),
            "changed": chosen["changed"],
        }
        if why:
            evidence["verdict"] = f"unconfirmed ({why})"
        if space.experiment.metric.startswith("val_acc"):
            evidence["spread_floor"] = rounding_floor([v for c in confirmed for v in c["values"]])
    else:
        rows = finished(summarise(read_results(exp.path), space))
        if not rows:
            raise ConfigError(f"--experiment {experiment}: no trial has finished all its epochs yet")
        if rank > len(rows):
            raise ConfigError(f"--rank {rank}: only {len(rows)} finished trials")
        row = rows[rank - 1]
        values = row.values
        evidence = {"label": f"search trial {row.trial_id}", "verdict": "unconfirmed", "answer": answer["message"],
                    "mean": row.final, "std": None, "ci95": None, "seeds": [space.train.run.seed],
                    "values": [row.final], "search_trial": row.trial_id}
    cfg, changes = space.production_config(space.config_for(values))
    if num_workers is not None:
        if num_workers < 1:
            raise ConfigError(f"--num-workers {num_workers}: must be >= 1")
        cfg = cfg.with_num_workers(num_workers)
    provenance = {
        "experiment": exp.path,
        "rank": rank,
        "metric": space.experiment.metric,
        **evidence,
        "searched": values,
        "budget": {"search_epochs": space.train.run.epochs, "search_subset": space.train.data.subset},
        "production_changes": changes,
        "space_file": info["space_file"],
        "space_sha256": info["sha256"],
        "overrides": info["overrides"],
        "versions": _versions(),
        "git_commit": _git_commit(),
    }
    return Exported(cfg, provenance)


def verify(experiment: str, exported: Exported, seeds: int, address: str | None = None) -> tuple[bool, str]:
    """Train the exported config at the confirmation budget on `seeds` fresh seeds and say
    whether their mean lies inside the 95% prediction interval of the confirmed values
    (`verify_rule`): (inside, one line with both)."""
    import time

    from trainable.cluster import connect
    from trainable.train import build_trainer

    exp = open_experiment(experiment)
    space, _ = recorded_space(exp)
    prov = exported.provenance
    if not prov.get("ci95"):
        raise ConfigError("--verify: the exported config has no confirmed interval to check (unconfirmed answer)")
    c = space.experiment.confirm
    first = (c.first_seed + c.seeds if c else 1000) + 1000  # apart from the search's and the confirmation's
    data = space.confirm_config(prov["searched"]).model_dump()
    data["run"]["seed"], data["run"]["repeats"] = first, seeds
    cfg = TrainConfig.model_validate(data)
    connect(address)
    name = f"verify-{time.strftime('%Y%m%d-%H%M%S')}"
    result = build_trainer(cfg, name, f"{exp.path}/verify").fit()
    df = result.metrics_dataframe
    metric = prov["metric"]
    last = df[df["epoch"] == cfg.run.epochs].groupby("seed")[metric].last() if df is not None else []
    if len(last) < seeds:
        raise ConfigError(f"--verify: only {len(last)} of {seeds} runs finished (see {exp.path}/verify/{name})")
    mean = float(last.mean())
    bounds = (0.0, 1.0) if metric.startswith("val_acc") else (-math.inf, math.inf)
    inside, (lo, hi) = verify_rule(list(prov["values"]), [float(v) for v in last], prov.get("spread_floor", 0.0), bounds)
    line = (f"verify: {metric} {mean:.4f} over seeds {[int(s) for s in last.index]} "
            f"({', '.join(f'{v:.4f}' for v in last)}) {'inside' if inside else 'outside'} the 95% prediction "
            f"interval [{lo:.4f}, {hi:.4f}] of {len(last)} fresh seeds (confirmed mean {prov['mean']:.4f})")
    return inside, line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.export", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="experiment folder (<storage>/<name>)")
    p.add_argument("--out", default="best.yaml", help="file to write (default best.yaml; never overwritten)")
    p.add_argument("--num-workers", type=int, help="re-derive the accumulation for this many workers")
    p.add_argument("--rank", type=int, default=1,
                   help="export the K-th config of the confirmation table (default 1: the answer)")
    p.add_argument("--verify", type=int, nargs="?", const=2, metavar="SEEDS",
                   help="then train it at the confirmation budget on SEEDS fresh seeds (default 2) and "
                        "check their mean lies in the confirmed values' 95% prediction interval "
                        "(exit 0 inside, 1 outside)")
    p.add_argument("--allow-unconfirmed", action="store_true",
                   help="export an answer that is not final (still running, or an unconfirmed verdict)")
    p.add_argument("--address", help="Ray cluster address for --verify (default: the one running here, or a new one)")
    args = p.parse_args(argv)
    try:
        # what needs no experiment first: these errors come before Tune's results are read
        if Path(args.out).exists():
            raise ConfigError(f"{args.out}: already exists; choose another path (nothing was overwritten)")
        above = next((d for d in Path(args.out).absolute().parents if d.exists()), None)
        if above is not None and not above.is_dir():
            raise ConfigError(f"--out {args.out}: {above} is a file, not a folder")
        for flag, value in (("--rank", args.rank), ("--num-workers", args.num_workers), ("--verify", args.verify)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be >= 1")
        exported = export_trial(args.experiment, args.rank, args.num_workers, args.allow_unconfirmed)
        if args.verify and not exported.provenance.get("ci95"):
            raise ConfigError("--verify: the exported config has no confirmed interval to check (unconfirmed answer)")
        write_atomic(args.out, exported.to_yaml())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prov = exported.provenance
    ci = f" [{prov['ci95'][0]:.4f}, {prov['ci95'][1]:.4f}]" if prov.get("ci95") else ""
    print(f"wrote {args.out}: {prov['label']} ({prov['verdict']}): {prov['metric']} {prov['mean']:.4f}{ci} "
          f"over {len(prov['seeds'])} seed(s)")
    for line in prov["production_changes"]:
        print(f"  {line}")
    print(f"train it:  python -m trainable.train --config {args.out}")
    if args.verify:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
        try:
            inside, line = verify(args.experiment, exported, args.verify, args.address)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(line)
        return 0 if inside else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
