"""One way for the parser tests to run a log parser: every line accounted for, every
event well formed (by the caller's own check), the tally's event count right."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lab.events import Event
from lab.logs.base import LogInput, LogParser, Tally


def parse_checked(parser: LogParser, path: Path, well_formed: Callable[[Event, str], None],
                  fmt: str | None = None) -> tuple[list[Event], Tally]:
    inp = LogInput(path)
    tally = Tally(str(path), fmt or parser.name)
    events = list(parser.parse(inp, tally))
    assert tally.balanced, tally.to_json()
    assert tally.events == len(events)
    for ev in events:
        well_formed(ev, inp.display)
    return events, tally


def write_input(tmp: Path, text: str, name: str, encoding: str = "utf-8",
                bom: bytes = b"") -> Path:
    p = tmp / name
    p.write_bytes(bom + text.encode(encoding))
    return p
