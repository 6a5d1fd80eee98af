"""What a person watching the run sees: progress while it runs, a table at the end.

On a terminal: a rich progress bar with the current iteration, its parameters, the
running step and pass/fail/error counts. Not on a terminal (CI logs): one plain
line per iteration start and end, no cursor tricks, no colour, ASCII tables, because
a CI log is read after the fact and often grepped.

The executor owns a ``RunConsole`` and tells it what happens::

    with RunConsole("sweep-rebalance-delay", total=len(sweep)) as ui:
        for it in sweep:
            ui.start(it.index, it.parameters)
            ui.step("plug snd0 (AC97 @ rp1)")         # optional, per step
            ui.finish(result)
    print_summary(summary)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from types import TracebackType
from typing import IO, Any

from rich import box
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID,
                           TextColumn, TimeElapsedColumn)
from rich.table import Table
from rich.text import Text

from lab.report.summary import Summary, fmt_params, fmt_rate, fmt_value, iteration_duration_s
from lab.results import IterationResult, Status, result_label

#: Width for non-terminal output: CI logs don't wrap, and 80 columns would break tables.
PLAIN_WIDTH = 160


def _console(file: IO[str]) -> Console:
    con = Console(file=file, highlight=False)
    if not con.is_terminal:
        con.width = PLAIN_WIDTH
    return con


STATUS_STYLE = {Status.PASSED: "green", Status.FAILED: "bold red", Status.ERROR: "yellow",
                Status.INTERRUPTED: "magenta", Status.SKIPPED: "dim"}


class RunConsole:
    """Progress over iterations; a context object the executor updates.

    ``plain`` forces the line mode (default: when the console is not a terminal).
    Counts per status are kept in ``counts`` for the caller too.
    """

    def __init__(self, scenario: str, total: int, *, console: Console | None = None,
                 plain: bool | None = None, file: IO[str] | None = None) -> None:
        self.scenario = scenario
        self.total = total
        self.console = console or _console(file or sys.stderr)
        self.plain = (not self.console.is_terminal) if plain is None else plain
        self.counts: dict[Status, int] = {s: 0 for s in Status}
        self.current: int | None = None
        self.parameters: Mapping[str, Any] = {}
        self.done = 0
        self._started = 0.0
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    # ---- context -----------------------------------------------------------------------
    def __enter__(self) -> RunConsole:
        self._started = time.monotonic()
        if self.plain:
            self._line(f"{self.scenario}: {self.total} iteration(s)")
        else:
            self._progress = Progress(
                SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
                MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
                TimeElapsedColumn(), TextColumn("{task.fields[step]}", style="dim"),
                console=self.console, transient=False)
            self._progress.start()
            self._task = self._progress.add_task(self.scenario, total=self.total,
                                                  counts=self._counts_text(), step="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
        if self.plain:
            elapsed = time.monotonic() - self._started
            tail = " (interrupted)" if exc_type is KeyboardInterrupt else ""
            self._line(f"{self.scenario}: {self.done}/{self.total} done in {elapsed:.1f}s, "
                       f"{self._counts_text()}{tail}")

    # ---- updates -----------------------------------------------------------------------
    def start(self, index: int, parameters: Mapping[str, Any], attempt: int | None = None) -> None:
        """An iteration begins (``attempt``: which try of a replay with several)."""
        self.current = index
        self.parameters = dict(parameters)
        label = result_label(index, attempt) + (f" {fmt_params(parameters)}" if parameters else "")
        if self.plain:
            self._line(f"[{self.done + 1:>{len(str(self.total))}}/{self.total}] {label} ...")
        elif self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self.scenario} {label}", step="")

    def step(self, text: str) -> None:
        """The step now running (terminal only; too chatty for CI logs)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, step=text)

    def finish(self, result: IterationResult) -> None:
        """An iteration ended (any status, including skipped)."""
        self.counts[result.status] += 1
        self.done += 1
        sigs = sorted({str(v.signature) for v in result.violations})
        dur = iteration_duration_s(result)
        detail = " ".join(x for x in (
            f"{dur:.1f}s" if dur is not None else "",
            ", ".join(sigs),
            (result.error or "").splitlines()[0] if result.error else "",
            result.stopped_at or "" if result.status == Status.SKIPPED else "") if x)
        if self.plain:
            self._line(f"    {result.label} {result.status.value}" +
                       (f"  {detail}" if detail else ""))
        else:
            if result.status != Status.PASSED and result.status != Status.SKIPPED:
                style = STATUS_STYLE[result.status]
                self.console.print(Text.assemble(
                    (f"{result.label} {result.status.value}", style),
                    f" {fmt_params(result.parameters)} {detail}"))
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, advance=1, counts=self._counts_text())

    def note(self, text: str) -> None:
        """A line for the person watching (e.g. 'until: fail reached, stopping')."""
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            self._line(text)

    # ---- internals ---------------------------------------------------------------------
    def _counts_text(self) -> str:
        c = self.counts
        parts = [f"{c[Status.PASSED]} passed", f"{c[Status.FAILED]} failed"]
        if c[Status.ERROR]:
            parts.append(f"{c[Status.ERROR]} error")
        if c[Status.SKIPPED]:
            parts.append(f"{c[Status.SKIPPED]} skipped")
        return ", ".join(parts)

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


def fmt_measurement(stats: Mapping[str, float] | None) -> str:
    if not stats:
        return "-"
    med, mx = stats["median"], stats["max"]
    return f"{med:g}" if med == mx else f"{med:g} ({mx:g})"


def summary_tables(summary: Summary, *, ascii_only: bool = False) -> list[Table]:
    """The end-of-run tables: per parameter value, and signatures with rates."""
    bx = box.ASCII if ascii_only else box.SIMPLE_HEAVY
    tables: list[Table] = []
    for name, groups in summary.by_parameter.items():
        # a lab error is not a pass: when there are any, say how many next to "ran"
        errors = any(g.errors for g in groups)
        measured = sorted({m for g in groups for m in g.measurements})
        t = Table(title=f"by {name}" + ("  (measured: median, max in parentheses)"
                                        if measured else ""), box=bx, title_justify="left")
        t.add_column(name)
        t.add_column("ran", justify="right")
        t.add_column("failed", justify="right")
        if errors:
            t.add_column("lab error", justify="right")
        t.add_column("rate", justify="right")
        # what the iterations measured (e.g. the audio outage): median, and max if it differs
        for m in measured:
            t.add_column(m, justify="right", no_wrap=True, min_width=len(m))
        t.add_column("signatures")
        for g in groups:
            sig = ", ".join(f"{s} x{n}" for s, n in g.signatures.items())
            cells = [fmt_value(g.values[name]), str(g.ran), str(g.failed)]
            if errors:
                cells.append(str(g.errors))
            cells.append(f"{100 * g.failure_rate:.1f} %")
            cells += [fmt_measurement(g.measurements.get(m)) for m in measured]
            t.add_row(*cells, sig or "-", style="red" if g.failed else None)
        tables.append(t)
    if summary.signatures:
        t = Table(title="signatures", box=bx, title_justify="left")
        t.add_column("signature")
        t.add_column("reproduced", justify="right")
        t.add_column("iterations")
        t.add_column("example")
        for s in summary.signatures:
            its = ", ".join(f"#{i}" for i in s.iterations[:8]) + \
                (" ..." if len(s.iterations) > 8 else "")
            ex = s.example if len(s.example) <= 72 else s.example[:69] + "..."
            t.add_row(s.signature, fmt_rate(s.count, s.ran), its, ex)
        tables.append(t)
    return tables


def print_summary(summary: Summary, *, console: Console | None = None,
                  file: IO[str] | None = None) -> None:
    """The final summary: status line, tables, and the exit code it maps to."""
    con = console or _console(file or sys.stdout)
    ascii_only = not con.is_terminal
    c = summary.counts
    status = summary.status
    con.print(Text.assemble(
        (f"{summary.run.scenario}: {status.value.upper()}", STATUS_STYLE[status]),
        f"  ({c.get('passed', 0)} passed, {c.get('failed', 0)} failed, "
        f"{c.get('error', 0)} error, {c.get('skipped', 0)} skipped of {c.get('total', 0)}; "
        f"exit {summary.exit_code})"), soft_wrap=True)
    if summary.run.stopped_at:
        con.print(f"stopped: {summary.run.stopped_at}", markup=False)
    if summary.run.error:
        con.print(f"lab error: {summary.run.error}", markup=False)
    for t in summary_tables(summary, ascii_only=ascii_only):
        con.print(t)
