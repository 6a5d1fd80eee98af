"""The run directory: every artifact of one run, readable without the tool.

``path`` (under ``runs/``) keeps artifacts forever. Sockets do not live here: each
machine makes its own private 0700 directory under the system temp dir (short enough
for AF_UNIX's 108-byte limit) and deletes it when it stops (see ``lab.machine``).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

from lab.atomic import atomic_write
from lab.events import Event
from lab.privacy import STARTUP_NOTES


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "run"


def iso(t_ns: int) -> str:
    return dt.datetime.fromtimestamp(t_ns / 1e9, tz=dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def events_since(events: list[Event], t_ns: int) -> tuple[list[Event], int]:
    """The events at or after ``t_ns``, and how many were older."""
    keep = [e for e in events if e.t_host_ns >= t_ns]
    return keep, len(events) - len(keep)


class RunDir:
    def __init__(self, root: Path, name: str, *, path: Path | None = None) -> None:
        if path is None:
            stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path(root) / f"{stamp}-{_slug(name)}"
            n = 1
            while path.exists():
                n += 1
                path = Path(root) / f"{stamp}-{_slug(name)}-{n}"
        self.path = path
        self.path.mkdir(parents=True, exist_ok=True)
        # guest output, QMP traffic and logs: the run's owner only, whatever the umask
        self.path.chmod(0o700)
        self._lock = threading.Lock()
        self._log = open(self.path / "lab.log", "a", buffering=1, encoding="utf-8")
        self._events = open(self.path / "events.jsonl", "a", buffering=1, encoding="utf-8")
        self._seq = 0
        self.events: list[Event] = []   # the same events, in memory, for live waits
        self.write_failures = 0         # log lines a full or broken disk refused
        for note in STARTUP_NOTES:
            self.log(note)

    # ---- logs -----------------------------------------------------------------------
    def log(self, message: str) -> None:
        """One readable line per event, timestamped, in lab.log (redacted: a message may
        quote a command or an error that carries a credential)."""
        from lab.agent.winrm import REDACTOR

        line = f"{iso(time.time_ns())} {REDACTOR.redact(message)}"
        with self._lock:
            if not self._log.closed:
                try:
                    self._log.write(line + "\n")
                except OSError:
                    # a full disk must not stop what is being logged (the shutdown ladder
                    # logs every rung): count it, and keep the lines in memory
                    self.write_failures += 1

    def record(self, event: Event, *, keep: bool = True) -> Event:
        """Append a host-observed event to events.jsonl (raw, before alignment);
        ``keep`` it in memory for live waits too (a --jobs worker keeps its own)."""
        with self._lock:
            self._seq += 1
            if keep:
                self.events.append(event)
            if not self._events.closed:
                try:
                    self._events.write(event.dumps() + "\n")
                except OSError:
                    self.write_failures += 1
        return event

    def forget_events_before(self, t_ns: int) -> int:
        """Drop host events older than ``t_ns`` from memory (events.jsonl keeps them):
        live waits look only at the current iteration's. Returns how many were dropped."""
        with self._lock:
            self.events, n = events_since(self.events, t_ns)
            return n

    def write_json(self, rel: str, data: Any) -> Path:
        return atomic_write(self.path / rel,
                            json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def write_text(self, rel: str, text: str) -> Path:
        return atomic_write(self.path / rel, text)

    def close(self) -> None:
        """Close the logs. Idempotent."""
        with self._lock:
            for f in (self._log, self._events):
                if not f.closed:
                    f.close()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
