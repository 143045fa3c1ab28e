"""`python -m search.export --experiment DIR`: the best trial's complete TrainConfig, with
provenance, for `python -m trainable.train --config best.yaml`."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from search.experiment import SEARCH_INFO, Experiment, finished, read_results, recorded_space, summarise
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


def export_trial(experiment: str, rank: int = 1, num_workers: int | None = None) -> Exported:
    """The `rank`-th best trial (1 = best) among those that ran all their epochs."""
    exp = Experiment.at(experiment)
    try:
        if not exp.store.exists():
            raise ConfigError(f"--experiment {experiment}: no such folder")
        if not exp.exists():
            raise ConfigError(f"--experiment {experiment}: not an experiment of this tool (no {SEARCH_INFO})")
    except OSError as err:  # an unreachable bucket, missing credentials
        raise ConfigError(f"--experiment {experiment}: cannot read it ({str(err).splitlines()[0]})") from None
    if rank < 1:
        raise ConfigError(f"--rank {rank}: must be >= 1")
    space, info = recorded_space(exp)
    rows = finished(summarise(read_results(exp.path), space))
    if not rows:
        raise ConfigError(f"--experiment {experiment}: no trial has finished all its epochs yet")
    if rank > len(rows):
        raise ConfigError(f"--rank {rank}: only {len(rows)} finished trials")
    row = rows[rank - 1]
    cfg = space.config_for(row.values)
    if num_workers is not None:
        if num_workers < 1:
            raise ConfigError(f"--num-workers {num_workers}: must be >= 1")
        cfg = cfg.with_num_workers(num_workers)
    provenance = {
        "experiment": exp.path,
        "trial_id": row.trial_id,
        "rank": rank,
        f"best_{space.experiment.metric}": row.best,
        "epochs_run": row.epochs,
        "searched": row.values,
        "space_file": info["space_file"],
        "space_sha256": info["sha256"],
        "overrides": info["overrides"],
        "versions": _versions(),
        "git_commit": _git_commit(),
    }
    return Exported(cfg, provenance)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m search.export", description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="experiment folder (<storage>/<name>)")
    p.add_argument("--out", default="best.yaml", help="file to write (default best.yaml; never overwritten)")
    p.add_argument("--num-workers", type=int, help="re-derive the accumulation for this many workers")
    p.add_argument("--rank", type=int, default=1, help="export the K-th best trial (default 1)")
    args = p.parse_args(argv)
    try:
        # what needs no experiment first: these errors come before Tune's results are read
        if Path(args.out).exists():
            raise ConfigError(f"{args.out}: already exists; choose another path (nothing was overwritten)")
        above = next((d for d in Path(args.out).absolute().parents if d.exists()), None)
        if above is not None and not above.is_dir():
            raise ConfigError(f"--out {args.out}: {above} is a file, not a folder")
        for flag, value in (("--rank", args.rank), ("--num-workers", args.num_workers)):
            if value is not None and value < 1:
                raise ConfigError(f"{flag} {value}: must be >= 1")
        exported = export_trial(args.experiment, args.rank, args.num_workers)
        write_atomic(args.out, exported.to_yaml())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prov = exported.provenance
    metric = next(k for k in prov if k.startswith("best_"))
    print(f"wrote {args.out}: trial {prov['trial_id']} ({metric} {prov[metric]:.4f}, {prov['epochs_run']} epochs)")
    print(f"train it:  python -m trainable.train --config {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
