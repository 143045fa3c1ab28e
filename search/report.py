"""`python -m search.report`: an experiment's answer (finished or running) written as
`report.md`, PNG plots and `report.json`.

    python -m search.report --experiment ~/trick-search/quickstart [--out DIR]
"""

from __future__ import annotations

import argparse
import sys

from search.answer.build import build_answer
from search.answer.report import publish_report
from search.experiment.folder import open_experiment, restore_study
from trainable.config import ConfigError

__all__ = ["main", "report_experiment"]


def report_experiment(path: str, out: str | None = None) -> tuple[str, list[str]]:
    """Build the answer of the experiment at `path` and write its report into `out`
    (default `<experiment>/report`, uploaded when that is object storage). Returns the
    answer's message and the paths written."""
    exp = open_experiment(path)
    restore_study(exp)  # on object storage: the study's copy, for the importance
    answer = build_answer(exp)
    return answer.get("message") or "", publish_report(exp, answer, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m search.report",
        description="Write an experiment's answer (finished or running) as report.md, PNG plots and report.json.")
    ap.add_argument("--experiment", required=True, help="the experiment folder (local or s3://...)")
    ap.add_argument("--out", default=None, help="where to write the report (default: <experiment>/report)")
    args = ap.parse_args(argv)
    try:
        message, paths = report_experiment(args.experiment, args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unreachable storage
        print(f"error: --experiment {args.experiment}: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2
    print(message)
    for p in paths:
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
