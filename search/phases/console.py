"""The search's console, for people: a header (`header`), then per phase (search,
confirmation, ablation) a live progress display with an ETA (`PhaseProgress`: a bar redrawn
in place on a terminal, a plain line every minute otherwise), one line per trial that ended
(`TrialLines`), the phase's summary when it ends, and the answer (`answer_block`). Ray's own
tables, worker lines and library INFO lines stay out of it (`configure_console`; the CLI's
`--verbose` brings them back); they remain in each run's log and in TensorBoard.

One line per trial that ended:

    trial c50932a5  mix.mode=mixup mixup_alpha=0.263 label_smoothing=0.1 global_batch=64  val_acc 0.8583  epochs 5/5  done
    trial 6b75a67e  mix.mode=none label_smoothing=0 global_batch=128  val_acc 0.4410  epochs 2/5  stopped early by ASHA
    trial 77d1c2a0  mix.mode=cutmix cutmix_alpha=0.61 ...  val_acc -  epochs 1/5  diverged: non-finite loss at epoch 2, ...
    trial 40b1e_00000  candidate 1 seed 1000: mix.mode=mixup mixup_alpha=0.126  val_acc 0.9194  epochs 5/5  done
    trial 40b1e_00003  candidate 1 seed 1001  val_acc 0.9211  epochs 5/5  done

The score is the metric at the trial's last reported epoch (what ASHA compared and Optuna
was told), not its best epoch; a trial that trained several seeds one after another
(`run.repeats`) scores the mean over its seeds of each seed's last epoch.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from ray.tune import Callback

from search.experiment.phases import ABLATE, CONFIRM
from search.experiment.sampling import sampled_values
from spaces import Space
from trainable.cluster import QUIET_WORKER_LINES, SKIP_LINES_ENV, error_line
from trainable.status import DIVERGED, FAILED, RUN_ERROR, RUN_STATUS

if TYPE_CHECKING:
    from search.experiment.folder import Experiment

__all__ = ["LIVE", "PhaseProgress", "TrialLines", "answer_block", "configure_console", "header", "ray_verbosity",
           "short_names", "trial_line"]

_GENERIC = {"mode", "name", "kind", "enabled"}  # last parts that say nothing alone


def short_names(paths: list[str]) -> dict[str, str]:
    """A short name per key path: its last part when that is unique among `paths` and says
    something alone, else its last two parts (`mix.mode`), else the whole path."""
    last = [p.rpartition(".")[2] for p in paths]
    out = {}
    for path, leaf in zip(paths, last):
        two = ".".join(path.split(".")[-2:])
        if leaf not in _GENERIC and last.count(leaf) == 1:
            out[path] = leaf
        elif sum(".".join(p.split(".")[-2:]) == two for p in paths) == 1:
            out[path] = two
        else:
            out[path] = path
    return out


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def trial_line(
    trial_id: str, values: str, metric: str, score: float | None, epochs: int, target: int, why: str
) -> str:
    """`trial <id>  <values>  <metric> <score>  epochs <run>/<target>  <why it ended>`."""
    shown = "-" if score is None else f"{score:.4f}"
    parts = [f"trial {trial_id}", values, f"{metric} {shown}", f"epochs {epochs}/{target}", why]
    return "  ".join(p for p in parts if p)


class TrialLines(Callback):
    """A Tune callback printing one line to `stream` (stdout) for every trial that ended:
    done, stopped early by the scheduler, diverged, or failed (with its one-line reason).
    Works for the search's trials (Optuna's values in the config) and for the confirmation
    and ablation trials (an `entry` with a label in the config)."""

    def __init__(self, space: Space, stream: TextIO | None = None) -> None:
        self.space = space
        self.stream = stream
        self.metric = space.experiment.metric
        self.names = short_names(space.searched_paths)
        self._runs: dict[str, dict[Any, tuple[int, float]]] = {}  # trial -> repeat -> (epoch, metric)
        self._last: dict[str, dict[str, Any]] = {}
        self._printed: set[str] = set()

    # Tune's hooks -------------------------------------------------------------------------------------
    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any) -> None:
        tid = str(trial.trial_id)
        self._last[tid] = dict(result)
        if result.get(RUN_STATUS) is not None or "epoch" not in result or result.get(self.metric) is None:
            return  # the final result of a diverged or failed run carries no score
        runs = self._runs.setdefault(tid, {})
        runs[result.get("repeat", result.get("seed", 0))] = (int(result["epoch"]), float(result[self.metric]))

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._print(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._print(trial, error=_trial_error(trial))

    # The line -----------------------------------------------------------------------------------------
    def _print(self, trial: Any, error: str | None) -> None:
        tid = str(trial.trial_id)
        if tid in self._printed:
            return
        self._printed.add(tid)
        LIVE.write(self.stream or sys.stdout, self.line(trial, error))

    def line(self, trial: Any, error: str | None = None) -> str:
        """The line of `trial` as it ended (`error`: Tune's reason when it failed)."""
        values, label, score, epochs, target, why = self.outcome(trial, error)
        seed = (getattr(trial, "config", None) or {}).get("seed")
        if seed is not None and self.space.confirm_seeds and seed != self.space.confirm_seeds[0]:
            values = {}  # a config's later seed-runs: its values are on its first seed's line
        return trial_line(str(trial.trial_id), self._shown(values, label), self.metric, score, epochs, target, why)

    def outcome(
        self, trial: Any, error: str | None = None
    ) -> tuple[dict[str, Any], str | None, float | None, int, int, str]:
        """(values, label, score, epochs with a score, target epochs, why it ended) of `trial`."""
        tid = str(trial.trial_id)
        last = self._last.get(tid) or dict(getattr(trial, "last_result", None) or {})
        config = dict(getattr(trial, "config", None) or {})
        values, label = self._values(config)
        runs = self._runs.get(tid, {})
        if not runs and last.get(RUN_STATUS) is None and last.get("epoch") and last.get(self.metric) is not None:
            runs = {0: (int(last["epoch"]), float(last[self.metric]))}  # its results came before this driver
        epochs = max((e for e, _ in runs.values()), default=0)  # epochs with a score
        target = int(values.get("run.epochs", self.space.train.run.epochs))
        score = sum(m for _, m in runs.values()) / len(runs) if runs else None
        why = self._why(last, error, epochs, target, len(runs))
        if why.startswith((DIVERGED, FAILED)):
            score = None
        return values, label, score, epochs, target, why

    def _values(self, config: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
        entry = config.get("entry")
        if isinstance(entry, Mapping):  # a confirmation or ablation trial (one of its seeds, or all)
            label = str(entry.get("label") or "")
            return dict(entry.get("values") or {}), f"{label} seed {config['seed']}" if "seed" in config else label

        return sampled_values(config), None

    def _shown(self, values: dict[str, Any], label: str | None) -> str:
        if label is not None:  # its label, and what differs from the baseline
            base = self.space.base_values
            changed = {k: v for k, v in values.items() if k in base and base[k] != v}
            body = " ".join(f"{self.names.get(k, k)}={_value(v)}" for k, v in changed.items())
            return f"{label}: {body}" if body else label
        order = [p for p in self.space.searched_paths if p in values]
        return " ".join(f"{self.names.get(p, p)}={_value(values[p])}" for p in order)

    def _why(self, last: Mapping[str, Any], error: str | None, epochs: int, target: int, seeds: int) -> str:
        status = last.get(RUN_STATUS)
        if error is not None:
            return f"failed: {_one_line(error)}"
        if status == FAILED:
            return f"failed: {_one_line(last.get(RUN_ERROR) or 'error')}"
        if status == DIVERGED:
            reason = _one_line(last.get(RUN_ERROR) or "")
            return f"diverged: {reason.removeprefix('diverged:').strip()}" if reason else DIVERGED
        if epochs >= target:
            return f"done (mean of {seeds} seeds)" if seeds > 1 else "done"
        if self.space.experiment.scheduler.kind == "asha":
            return "stopped early by ASHA"
        return "stopped early"


def _trial_error(trial: Any) -> str:
    """The one-line reason of a trial Tune gave up on: from its error files on this machine
    (Tune writes them there first, then copies them to the experiment), else from storage."""

    def local_pickled() -> BaseException | None:
        path = getattr(trial, "pickled_error_file", None)
        if not path or not os.path.isfile(path):
            return None
        from ray import cloudpickle

        with open(path, "rb") as f:
            return cloudpickle.load(f)

    def local_text() -> BaseException | None:
        path = getattr(trial, "error_file", None)
        if not path or not os.path.isfile(path):
            return None
        with open(path) as f:
            return RuntimeError(f.read())

    for read in (local_pickled, getattr(trial, "get_pickled_error", None), local_text,
                 getattr(trial, "get_error", None)):
        try:
            err = read() if read is not None else None
        except Exception:  # noqa: BLE001, S112 - an unreadable error file: try the next form
            continue
        if err is not None:
            line = error_line(err)
            return line.removeprefix("RuntimeError: ") if read is local_text else line
    path = getattr(trial, "error_file", None)
    return f"see {path}" if path else "error"



# The live status line ----------------------------------------------------------------------------------------
_CLEAR = "\r\x1b[K"  # back to the line's start, erase it


class _LiveLine:
    """The one status line a terminal shows under the console's lines, redrawn in place:
    every line printed through `write` goes above it."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self.text = ""

    def show(self, stream: TextIO, text: str) -> None:
        if self.stream is not None and self.stream is not stream:
            self.clear()
        stream.write(_CLEAR + text)
        stream.flush()
        self.stream, self.text = stream, text

    def clear(self) -> None:
        if self.stream is not None and self.text:
            self.stream.write(_CLEAR)
            self.stream.flush()
        self.stream, self.text = None, ""

    def write(self, stream: TextIO, line: str) -> None:
        """Print `line` on `stream`, above the status line when one shows there."""
        held = self.text if self.stream is stream else ""
        if held:
            self.clear()
        print(line, file=stream, flush=True)
        if held:
            self.show(stream, held)


LIVE = _LiveLine()


class _ConsoleHandler(logging.Handler):
    """Log records as plain lines on the current stdout, above the status line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            LIVE.write(sys.stdout, self.format(record))
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


NEW_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
SHUTDOWN_LINES = (r"Exception ignored in: <function WeakSet\.__init__\.<locals>\._remove"
                  r"|raise_sys_exit_with_custom_error_message|^Traceback \(most recent call last\):$")
"""What a trial's driver prints when Tune ends it and its interpreter shuts down (an ignored
exception in a weak-reference callback, with its traceback): no failure, so off the console
unless `--verbose`; a real failure still shows its error line and its own trial line."""
WORKER_LINES = r"^(?!.*(?i:error|exception|traceback|killed|out of memory))"
"""Worker output the console leaves out unless `--verbose`: every line that does not look like
a failure (epoch lines, Ray Train's start-up lines). They stay in each run's log and in Ray's
session logs; a failed trial also says why on its own line."""


QUIET_LOGGERS = ("ray.tune", "ray.train", "ray.air", "ray._private.worker", "ray._private.authentication", "optuna")
"""Libraries whose INFO lines (Tune's 'wrote the experiment state', Ray's start-up, Optuna's
'a new study created') the console leaves out unless `--verbose`; they log on their own handlers."""


def configure_console(verbose: bool) -> None:
    """The CLI's console: log records of this project at INFO, of other libraries at WARNING
    (no stray INFO lines such as matplotlib's font cache), on stdout above the progress line.
    Without `verbose`: Tune's legacy console engine at verbosity 0 (the new engine prints its
    experiment table at any verbosity; `ray_verbosity`), worker output that is not a failure
    off the console (`WORKER_LINES`; a user's own `RAY_DEDUP_LOGS_SKIP_REGEX` wins) and
    `QUIET_LOGGERS` at WARNING. Call before connecting to Ray."""
    handler = _ConsoleHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in ("search", "spaces", "trainable"):
        logging.getLogger(name).setLevel(logging.INFO)
    if not verbose:
        os.environ[NEW_OUTPUT_ENV] = "0"
        os.environ.setdefault(SKIP_LINES_ENV, f"{QUIET_WORKER_LINES}|{SHUTDOWN_LINES}|{WORKER_LINES}")
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def ray_verbosity(callbacks: Sequence[Any] | None) -> int | None:
    """Tune's `RunConfig(verbose=...)`: silent (0) when a `PhaseProgress` shows the progress,
    else Tune's default (its trial table, each trial's config and results)."""
    return 0 if any(isinstance(c, PhaseProgress) for c in callbacks or ()) else None


# The header and the answer -----------------------------------------------------------------------------------
def header(space: Space, exp: Experiment) -> str:
    """What runs, where its results go, and the dashboards' commands."""
    e = space.experiment
    how = f"{e.num_samples} trials of {space.train.run.epochs} epochs, {e.scheduler.kind.upper()}"
    if space.confirmed and e.confirm is not None:
        how += f"; confirmation: top {e.confirm.top_k} and the baseline on {e.confirm.seeds} seeds"
    return "\n".join([
        f"experiment: {exp.name}  ({how})",
        f"space:      {space.source}",
        f"results:    {exp.path}",
        f"watch:      tensorboard --logdir {exp.path}",
        f"study:      optuna-dashboard sqlite:///{exp.study_db}",
    ])


def answer_block(answer: dict[str, Any] | None, exp: Experiment) -> str:
    """The answer as the console shows it at the end of a search."""
    if answer is None:
        return "no answer"
    message = answer["message"]
    lines = ["answer: " + message]
    if answer.get("state") not in (None, "finished"):
        lines.append(f"  not final: the experiment is {answer['state']}, so this answer may still change")
    reason = answer.get("verdict_reason")
    if answer.get("verdict") == "unconfirmed" and reason and reason not in message:
        lines.append(f"  unconfirmed: {reason}")
    if answer.get("weak") and "weak" not in message.lower():
        lines.append("  weak: fewer than 3 seeds, the intervals are wide")
    for c in answer.get("confirm") or []:
        if c.get("mean") is None:
            continue
        ci = f" [{c['ci95'][0]:.4f}, {c['ci95'][1]:.4f}]" if c.get("ci95") else ""
        gain = c.get("vs_baseline")  # paired, the verdict's computation
        vs = f"  vs baseline {gain['delta']:+.4f} [{gain['ci95'][0]:+.4f}, {gain['ci95'][1]:+.4f}]" if gain else ""
        seeds = c.get("unstable_seeds") or []
        unstable = f"  unstable (seed {', '.join(map(str, seeds))}), never the answer" if seeds else ""
        lines.append(f"  {c['label']:<12} {c['mean']:.4f}{ci}{vs}{unstable}  "
                     f"{', '.join(c['changed']) or '(no trick changed)'}")
    if answer.get("ablation_note"):
        lines.append(f"  ablation: {answer['ablation_note']}")
    for a in answer.get("ablation") or []:
        lines.append(f"  trick {a['trick']}: {a['delta']:+.4f} [{a['ci95'][0]:+.4f}, {a['ci95'][1]:+.4f}]")
    lines += [f"  note: {n}" for n in answer.get("notes") or []]
    if (answer.get("failed") or {}).get("line"):
        lines.append(f"failed:     {answer['failed']['line']}")
    lines.append(f"report:     {exp.path}/report/report.md")
    lines.append(f"export it:  python -m search.export --experiment {exp.path} --out best.yaml")
    return "\n".join(lines)


# Progress of a phase -----------------------------------------------------------------------------------------
PHASE_NAMES = {CONFIRM: "confirmation", ABLATE: "ablation"}
"""A phase's name on the console, by its Tune run's folder (the search's is the experiment's)."""
_ENDED = ("TERMINATED", "ERROR")


def clock_time(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` from an hour."""
    s = int(round(max(seconds, 0.0)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def eta_seconds(
    durations: Sequence[float], running: Sequence[float], to_go: int, slots: int
) -> float | None:
    """Seconds left: the trials to go and the rest of the running ones (`running`: their
    elapsed seconds), each as long as the mean of the trials measured so far (`durations`),
    spread over `slots` trials at a time; None before any trial ended."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    work = to_go * mean + sum(max(mean - r, 0.0) for r in running)
    return work / max(slots, 1)


class PhaseProgress(TrialLines):
    """A Tune callback showing each phase's progress: its name, trials done / running / to
    go, elapsed time and an ETA from the trial times measured so far; on a terminal a bar
    redrawn in place (at most once a second), otherwise a plain line every `interval`
    seconds. When the phase ends, one summary line. The same instance serves every Tune run
    of a search (the search, the confirmation, the ablation): Tune calls `setup` at each
    run's start. It prints no trial lines itself (`TrialLines` does)."""

    def __init__(
        self, space: Space, stream: TextIO | None = None, tty: bool | None = None, interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(space, stream)
        self.tty = tty
        self.interval = interval
        self.clock = clock
        self._begin(None)

    def _begin(self, total: int | None) -> None:
        self.total = total
        self.phase: str | None = None
        self.t0 = self.clock()
        self.started: dict[str, float] = {}
        self.durations: dict[str, float] = {}
        self.slots = 0
        self._shown_at: float | None = None
        self._first_eta = False

    # Tune's hooks -----------------------------------------------------------------------------------------
    def setup(self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None,
              **info: Any) -> None:
        self._begin(total_num_samples)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.started.setdefault(str(trial.trial_id), self.clock())
        self._show(trials)

    def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
        self._show(trials)

    def _print(self, trial: Any, error: str | None) -> None:  # a trial ended: measure it
        tid = str(trial.trial_id)
        if tid in self.started and tid not in self.durations:
            self.durations[tid] = self.clock() - self.started[tid]
            self._first_eta = self._first_eta or len(self.durations) == 1  # the phase's first ETA: shown now

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        if self.phase is None:  # nothing ran in this Tune run
            self.phase = self._phase_of(trials)
        if self._is_tty():
            LIVE.clear()
        self._out(self.summary(trials))

    # What it shows ----------------------------------------------------------------------------------------
    def counts(self, trials: Sequence[Any]) -> tuple[int, int, int]:
        """(done, running, to go) of the phase."""
        done = sum(str(t.status) in _ENDED for t in trials)
        running = sum(str(t.status) == "RUNNING" for t in trials)
        total = max(self.total or 0, len(trials))
        return done, running, max(total - done - running, 0)

    def status(self, trials: Sequence[Any]) -> str:
        """`<phase>: <done>/<total> done, <running> running, <to go> to go, <elapsed> elapsed, ETA <left>`;
        on a terminal `<phase> [<bar>] <done>/<total> done, ETA <left>, <elapsed> elapsed, <running>
        running, <to go> to go` (cut at the terminal's width: the most needed first)."""
        now = self.clock()
        done, running, to_go = self.counts(trials)
        self.slots = max(self.slots, running)
        ages = [now - self.started[str(t.trial_id)] for t in trials
                if str(t.status) == "RUNNING" and str(t.trial_id) in self.started]
        eta = eta_seconds(list(self.durations.values()), ages, to_go, self.slots)
        left = "after the first trial" if eta is None else clock_time(eta)
        total = done + running + to_go
        counts = f"{done}/{total} done, {running} running, {to_go} to go, {clock_time(now - self.t0)} elapsed, ETA {left}"
        if self._is_tty():
            width = 12
            filled = round(width * done / total) if total else 0
            return (f"{self.phase} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} done, ETA {left}, "
                    f"{clock_time(now - self.t0)} elapsed, {running} running, {to_go} to go")
        return f"{self.phase}: {counts}"

    def summary(self, trials: Sequence[Any]) -> str:
        """The phase's line when it ends: how long it took and how its trials ended."""
        elapsed = clock_time(self.clock() - self.t0)
        done = [t for t in trials if str(t.status) in _ENDED]
        ended = [self.outcome(t) for t in done]
        whys = [o[5] for o in ended]
        failed = sum(w.startswith((FAILED, DIVERGED)) for w in whys)
        complete = sum(w.startswith("done") for w in whys)
        stopped = sum(w.startswith("stopped early") for w in whys)
        unit = "trials" if self.phase == "search" else "runs"
        parts = [f"{len(trials)} {unit}", f"{complete} ran all their epochs"]
        if stopped:
            parts.append(f"{stopped} stopped early" + (" by ASHA" if self.space.experiment.scheduler.kind == "asha" else ""))
        if failed:
            parts.append(f"{failed} failed or diverged")
        if len(ended) < len(trials):
            parts.append(f"{len(trials) - len(ended)} did not end (--resume continues them)")
        line = f"{self.phase} ended after {elapsed}: " + ", ".join(parts)
        scored = [(o[2], t) for o, t in zip(ended, done) if o[2] is not None and o[5].startswith("done")]
        if self.phase == "search" and scored:
            sign = -1.0 if self.space.experiment.mode == "max" else 1.0
            score, best = min(scored, key=lambda st: sign * st[0])
            line += f"; best {self.metric} {score:.4f} (trial {best.trial_id})"
        return line

    # Printing ---------------------------------------------------------------------------------------------
    def _phase_of(self, trials: Sequence[Any]) -> str:
        for t in trials:
            name = getattr(t, "experiment_dir_name", None)
            if name is not None:
                return PHASE_NAMES.get(str(name), "search")
        return "search"

    def _is_tty(self) -> bool:
        if self.tty is None:
            stream = self.stream or sys.stdout
            self.tty = bool(getattr(stream, "isatty", lambda: False)())
        return self.tty

    def _out(self, line: str) -> None:
        LIVE.write(self.stream or sys.stdout, line)

    def _show(self, trials: Sequence[Any]) -> None:
        if not trials:
            return
        now = self.clock()
        if self.phase is None:
            self.phase = self._phase_of(trials)
            self._out(f"{self.phase}: {max(self.total or 0, len(trials))} "
                      f"{'trials' if self.phase == 'search' else 'runs'}")
            self._shown_at = now if not self._is_tty() else None
        if self._is_tty():
            if self._shown_at is None or now - self._shown_at >= 1.0:
                width = shutil.get_terminal_size().columns - 1  # a wrapped line could not be redrawn in place
                LIVE.show(self.stream or sys.stdout, self.status(trials)[:width])
                self._shown_at = now
        elif self._shown_at is None or now - self._shown_at >= self.interval or self._first_eta:
            self._out(self.status(trials))
            self._shown_at, self._first_eta = now, False
