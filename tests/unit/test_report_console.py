"""Console progress and the final summary table, on a terminal and in CI (plain)."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from lab.report.console import RunConsole, print_summary, summary_tables
from lab.report.sample import sample_run
from lab.report.summary import build_summary
from lab.results import IterationResult, Status


def _run(ui: RunConsole, results: list[IterationResult]) -> None:
    with ui:
        for r in results:
            ui.start(r.index, r.parameters)
            ui.step("plug snd0")
            ui.finish(r)
        ui.note("until: fail reached, stopping")


def test_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    info, results = sample_run(tmp_path)
    buf = io.StringIO()
    ui = RunConsole("sweep-rebalance-delay", len(results), file=buf)
    assert ui.plain                                   # StringIO is not a terminal
    _run(ui, results)
    out = buf.getvalue()
    assert "\x1b[" not in out                         # no colour or cursor codes in CI logs
    lines = out.splitlines()
    assert lines[0] == "sweep-rebalance-delay: 10 iteration(s)"
    assert "[ 3/10] #2 delay_ms=200 model=AC97 ..." in lines
    assert any(line.startswith("    #2 failed") and "linux.callback-after-remove@snd0/rebalance"
               in line for line in lines)
    assert any(line.startswith("    #9 error") and "guest agent: timed out" in line
               for line in lines)
    assert "until: fail reached, stopping" in lines
    assert lines[-1].startswith("sweep-rebalance-delay: 10/10 done in ")
    assert lines[-1].endswith("6 passed, 3 failed, 1 error")
    assert ui.counts[Status.FAILED] == 3 and ui.done == 10


def test_terminal_progress_runs(tmp_path: Path) -> None:
    info, results = sample_run(tmp_path)
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=True, width=140)
    ui = RunConsole("sweep-rebalance-delay", len(results), console=con)
    assert not ui.plain
    _run(ui, results)
    out = buf.getvalue()
    assert "#2 failed" in out and "10/10" in out


def test_summary_table_plain(tmp_path: Path) -> None:
    info, results = sample_run(tmp_path)
    summary = build_summary(info, results)
    buf = io.StringIO()
    print_summary(summary, file=buf)
    out = buf.getvalue()
    assert out.splitlines()[0] == ("sweep-rebalance-delay: FAILED  (6 passed, 3 failed, 1 error, "
                                   "0 skipped of 10; exit 1)")
    assert "by delay_ms" in out and "signatures" in out
    assert "100.0 %" in out                            # delay 200: 2 of 2 failed
    assert "3 of 10 (30.0 %)" in out
    assert "linux.callback-after-remove@snd0/rebalance x2" in out
    assert "\x1b[" not in out and "━" not in out       # ASCII tables for CI logs
    tables = summary_tables(summary)
    assert [t.title for t in tables] == ["by delay_ms", "by model", "signatures"]
    # the sample has one lab error (#9): its tables say so instead of counting it a pass
    by_delay = tables[0]
    assert [c.header for c in by_delay.columns] == ["delay_ms", "ran", "failed", "lab error",
                                                    "rate", "signatures"]
    errors = list(by_delay.columns[3].cells)
    assert sorted(errors) == ["0"] * (len(errors) - 1) + ["1"]


def test_no_lab_error_column_without_errors(tmp_path: Path) -> None:
    from dataclasses import replace
    info, results = sample_run(tmp_path)
    clean = [replace(r, status=Status.PASSED, error=None) if r.status == Status.ERROR else r
             for r in results]
    tables = summary_tables(build_summary(info, clean))
    assert "lab error" not in [c.header for c in tables[0].columns]


def test_summary_mentions_stop_and_lab_error(tmp_path: Path) -> None:
    from dataclasses import replace
    info, results = sample_run(tmp_path)
    info = replace(info, stopped_at="until: fail reached at iteration 2",
                   error="QEMU exited with status 1")
    buf = io.StringIO()
    print_summary(build_summary(info, results), file=buf)
    out = buf.getvalue()
    assert "stopped: until: fail reached at iteration 2" in out
    assert "lab error: QEMU exited with status 1" in out
