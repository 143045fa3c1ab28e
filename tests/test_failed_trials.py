"""Failed search trials are listed in the answer ("2 of 5 search trials failed: ..."), in the
report's text and in the console's answer block."""

from __future__ import annotations

from types import SimpleNamespace

from search.answer.build import failed_trials
from search.answer.report import render_markdown
from search.experiment.trials import TrialRow
from search.phases.console import answer_block
from tests.test_report import answer
from trainable.status import FAILED

OOM = ("CUDA out of memory at batch.global_batch 1024 with batch.micro_batch 256 (x 4 workers): the same config "
       "runs out of memory on every attempt, so it is not retried; set batch.micro_batch: auto")


def rows() -> list[TrialRow]:
    done = [TrialRow(f"t{i}", {}, 0.9, 4, "done", final=0.9) for i in range(3)]
    return [*done, TrialRow("t3", {}, None, 1, "error", error="worker lost (node died)"),
            TrialRow("t4", {}, None, 0, FAILED, error=OOM)]


def test_the_answer_lists_the_failed_search_trials_with_their_reasons():
    assert failed_trials(rows()[:3]) is None
    failed = failed_trials(rows())
    assert failed is not None and failed["count"] == 2 and failed["of"] == 5
    assert [t["trial_id"] for t in failed["trials"]] == ["t3", "t4"]
    assert failed["line"] == (f"2 of 5 search trials failed: t3 (error): worker lost (node died); t4 (failed): {OOM}. "
                              "The answer rests on the others; --resume retries those with status error.")
    only_failed = failed_trials([*rows()[:3], rows()[4]])
    assert only_failed is not None and "--resume" not in only_failed["line"]  # nothing a retry changes


def test_the_report_and_the_console_show_them():
    a = answer()
    a["failed"] = failed_trials(rows())
    assert f"**Failed trials:** {a['failed']['line']}" in render_markdown(a)
    block = answer_block(a, SimpleNamespace(path="/x"))
    assert f"failed:     {a['failed']['line']}" in block.splitlines()
    a.update(winner=None, message=None)  # no answer yet: still said
    assert f"**Failed trials:** {a['failed']['line']}" in render_markdown(a)
    a["failed"] = None
    assert "Failed trials" not in render_markdown(a) and "failed:" not in answer_block(answer(), SimpleNamespace(path="/x"))
