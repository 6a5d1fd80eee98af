"""The lab's own artifacts as inputs: ``qmp.jsonl``, ``console.log``, ``timeline.jsonl``.

A run directory handed over by someone else (a CI artifact, a bug report) is read with
the same readers as any log, so ``rebalab inspect`` can judge a single file of it too:
QMP traffic (the hardware side of a hot-plug), the guest's serial console (the kernel
log with the host's receive time in front), or a merged timeline.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime, timezone

from lab.events import Event
from lab.logs.base import LogInput, Tally
from lab.logs.qmp import event_from_command, event_from_qmp

_QMP_DIRS = frozenset({"greeting", "out", "in", "error", "timeout", "event"})


def _json_line(text: str) -> object:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _json_lines(inp: LogInput, tally: Tally) -> Iterator[tuple[int, str, object]]:
    """The lab's JSON-lines files (host clock): blank lines skipped, each other line with
    its parsed value (None when it is not JSON; the caller counts it)."""
    tally.clock = "utc"
    for n, text in inp.lines(tally):
        if not text.strip():
            tally.skip()
            continue
        yield n, text, _json_line(text)


class QmpLogParser:
    """``qmp.jsonl`` as ``lab.qmp.QmpSession`` writes it: every command, reply, error
    and asynchronous event, one JSON object a line, each with the host's ``t_host_ns``."""

    name = "qmp-log"
    description = "the lab's qmp.jsonl (QMP commands, replies and events)"

    def sniff(self, inp: LogInput) -> int:
        for line in inp.head.splitlines()[:5]:
            obj = _json_line(line)
            if isinstance(obj, dict) and obj.get("dir") in _QMP_DIRS and "t_host_ns" in obj:
                return 90
        return 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        for n, text, obj in _json_lines(inp, tally):
            t = obj.get("t_host_ns") if isinstance(obj, dict) else None
            if not isinstance(obj, dict) or obj.get("dir") not in _QMP_DIRS \
                    or not isinstance(t, int) or isinstance(t, bool):
                tally.unknown(n, text)
                continue
            ev: Event | None = None
            if obj["dir"] == "event" and isinstance(obj.get("event"), dict):
                rec = obj["event"]
                rt = rec.get("t_host_ns")
                ev = event_from_qmp(rec, rt if isinstance(rt, int) and not isinstance(rt, bool) else t)
            elif obj["dir"] == "out":
                ev = event_from_command(obj, t)
            if ev is None:
                tally.skip()          # replies, greetings: the commands' outcome, no event
                continue
            tally.used_line()
            tally.events += 1
            yield _at(ev, inp, n)


class TimelineParser:
    """A ``timeline.jsonl`` (header line, then events): re-judged as it stands."""

    name = "timeline"
    description = "the lab's timeline.jsonl (one run's or iteration's merged events)"

    def sniff(self, inp: LogInput) -> int:
        first = inp.head.split("\n", 1)[0]
        obj = _json_line(first)
        return 95 if isinstance(obj, dict) and obj.get("type") == "header" else 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        for n, text, obj in _json_lines(inp, tally):
            if isinstance(obj, dict) and obj.get("type") == "header":
                tally.skip()
                continue
            try:
                ev = Event.from_json(obj)  # type: ignore[arg-type]
            except (AttributeError, KeyError, TypeError, ValueError):
                tally.unknown(n, text)
                continue
            tally.used_line()
            tally.events += 1
            yield ev


_CONSOLE_RE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z (.*)$")


def _console_ns(stamp: str, ms: str) -> int | None:
    try:
        t = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return int(t.timestamp()) * 1_000_000_000 + int(ms) * 1_000_000


class LabConsoleParser:
    """A VM's ``console.log`` as ``lab.console.Console`` writes it: the host's receive
    time (UTC, ms), then the guest's serial line. Lines go through
    ``lab.tracers.kernel_log.events_from_console``, the live console's own reader, so
    the events are those the run had; their time is the host's receive time."""

    name = "lab-console"
    description = "the lab's console.log (host receive time + the guest's serial console)"

    def sniff(self, inp: LogInput) -> int:
        lines = [ln for ln in inp.head.splitlines()[:20] if ln.strip()]
        hits = sum(1 for ln in lines if _CONSOLE_RE.match(ln) and "[" in ln[:40])
        return 95 if lines and hits >= max(1, len(lines) // 2) else 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        from lab.tracers.kernel_log import ConsoleStats, events_from_console

        tally.clock = "utc"
        for n, text in inp.lines(tally):
            if not text.strip():
                tally.skip()
                continue
            m = _CONSOLE_RE.match(text)
            t = _console_ns(m[1], m[2]) if m else None
            if m is None or t is None:
                tally.unknown(n, text)
                continue
            st = ConsoleStats()
            evs = events_from_console([(t, m[3])], st)
            if evs:
                tally.used_line()
                for ev in evs:
                    tally.events += 1
                    # the receive time orders a console: it is the host's clock, like QMP's
                    ev.data["at"] = f"{inp.display}:{n}"
                    yield ev
            elif st.blank or st.sync:
                tally.skip()       # an empty serial line, or the lab's clock-sync token
            else:
                tally.unknown(n, text)   # userspace on the console: not a kernel message


def _at(ev: Event, inp: LogInput, n: int) -> Event:
    ev.data["at"] = f"{inp.display}:{n}"
    return ev


PARSERS = (QmpLogParser(), TimelineParser(), LabConsoleParser())
