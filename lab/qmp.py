"""A synchronous, deadline-bound QMP session on top of ``qemu.qmp.QMPClient``.

qemu.qmp is asyncio-only and has no timeouts; the lab is mostly synchronous (paramiko,
subprocess). So the session owns one event loop in a daemon thread, and every call
crosses into it with a deadline that the error names. All traffic (commands, replies,
errors, asynchronous events) is written to ``qmp.jsonl`` as it happens, and events
are kept in an ordered history so a caller can take a cursor *before* acting and
wait for an event *after* it: no event is lost between a ``device_del`` and the wait
for its ``DEVICE_DELETED``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TextIO

from qemu.qmp import EventListener, ExecuteError, QMPClient
from qemu.qmp.error import QMPError

from lab.deadline import seconds
from lab.errors import DeadlineExceeded, QemuError

EventMatch = Callable[[Mapping[str, Any]], bool]


def event_time_ns(ev: Mapping[str, Any]) -> int:
    """QEMU stamps each event with host wall-clock time at emission; use it."""
    ts = ev.get("timestamp") or {}
    try:
        return int(ts["seconds"]) * 1_000_000_000 + int(ts["microseconds"]) * 1000
    except (KeyError, TypeError, ValueError):
        return time.time_ns()


#: commands that only read state: polled in waits, logged when their reply changes
QUIET_PREFIXES = ("query-", "qom-list", "qom-get")
#: distinct replies per polled query remembered for ``same_as_line`` references
MAX_DISTINCT_REPLIES = 256


class QmpSession:
    def __init__(self, socket_path: Path, log_path: Path, *, name: str = "rebalab") -> None:
        self.socket_path = socket_path
        self._log: TextIO = open(log_path, "a", buffering=1, encoding="utf-8")
        self._log_lock = threading.Lock()
        # line numbers count the file's lines (a restored VM appends to its VM's log)
        self._lines = _count_lines(log_path)
        self._client = QMPClient(name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp-loop",
                                        daemon=True)
        self._thread.start()
        self._cond = threading.Condition()
        self._events: list[dict[str, Any]] = []
        self._base = 0          # the absolute index of _events[0] (older ones forgotten)
        self._pump: asyncio.Future[None] | None = None
        self._closed = False
        self.on_event: list[Callable[[dict[str, Any]], None]] = []
        # polled queries: the last reply logged per (command, arguments), and how many
        # identical replies were not logged since (qmp.jsonl logs what changed)
        self._last_reply: dict[str, str] = {}
        self._unchanged: dict[str, int] = {}
        # ... and every distinct reply already logged, by line: a reply that comes back
        # (query-pci: no device, device in, no device, ...) is logged as a reference to
        # the line that holds it, so a 500-iteration run logs each PCI state once
        self._logged_at: dict[str, dict[str, int]] = {}

    # ---- plumbing ------------------------------------------------------------------
    def _call(self, what: str, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise DeadlineExceeded(what, timeout) from None

    def _write(self, record: dict[str, Any]) -> int | None:
        """Append one record; its line number in qmp.jsonl (1-based), None if not written."""
        record.setdefault("t_host_ns", time.time_ns())
        with self._log_lock:
            if self._log.closed:
                return None
            try:
                self._log.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            except OSError:
                return None          # a full disk: the session goes on (the run says so)
            self._lines += 1
            return self._lines

    async def _pump_events(self) -> None:
        listener = EventListener()
        with self._client.listen(listener):
            async for ev in listener:
                rec = dict(ev)
                rec["t_host_ns"] = event_time_ns(rec)
                self._write({"dir": "event", "event": rec})
                with self._cond:
                    self._events.append(rec)
                    self._cond.notify_all()
                for cb in list(self.on_event):
                    try:
                        cb(rec)
                    except Exception:  # a broken observer must not stop the pump
                        pass

    # ---- public API ----------------------------------------------------------------
    def connect(self, timeout: float | None = None) -> dict[str, Any]:
        timeout = timeout if timeout is not None else seconds("qmp_connect")

        async def _connect() -> None:
            await self._client.connect(str(self.socket_path))
            self._pump = asyncio.ensure_future(self._pump_events())

        try:
            self._call(f"QMP connect to {self.socket_path}", _connect(), timeout)
        except (QMPError, OSError) as exc:
            raise QemuError(f"could not connect to QMP at {self.socket_path}: {exc}") from exc
        greeting = self._client.greeting
        info = dict(getattr(greeting, "_raw", {}) or {})
        self._write({"dir": "greeting", "greeting": info})
        return info

    def execute(self, cmd: str, args: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run a QMP command; raise QemuError with QEMU's own message on failure."""
        timeout = timeout if timeout is not None else seconds("qmp_command")
        t0 = time.time_ns()
        query = cmd.startswith(QUIET_PREFIXES)
        key = cmd + json.dumps(dict(args or {}), sort_keys=True, default=str) if query else ""
        if not query:
            self._write({"dir": "out", "t_host_ns": t0, "execute": cmd, "arguments": args or {}})
        try:
            result = self._call(f"QMP {cmd}", self._client.execute(cmd, dict(args or {})),
                                timeout)
        except ExecuteError as exc:
            self._unquiet(key, cmd, args, t0)
            self._write({"dir": "error", "execute": cmd, "class": exc.error_class,
                         "desc": str(exc), "elapsed_ns": time.time_ns() - t0})
            raise QemuError(f"QEMU refused {cmd} {json.dumps(dict(args or {}))}: "
                            f"{exc} ({exc.error_class})") from None
        except DeadlineExceeded:
            self._unquiet(key, cmd, args, t0)
            self._write({"dir": "timeout", "execute": cmd, "elapsed_ns": time.time_ns() - t0})
            raise
        except (QMPError, OSError, EOFError) as exc:
            self._unquiet(key, cmd, args, t0)
            self._write({"dir": "error", "execute": cmd, "desc": repr(exc)})
            raise QemuError(f"QMP {cmd} failed: the connection to QEMU broke ({exc!r}); "
                            "QEMU has probably exited, see console.log and qemu.stderr") from exc
        if query:
            digest = json.dumps(result, sort_keys=True, default=str)
            if self._last_reply.get(key) == digest:
                self._unchanged[key] = self._unchanged.get(key, 0) + 1
                return result
            self._last_reply[key] = digest
            self._unquiet(key, cmd, args, t0)
            seen = self._logged_at.setdefault(key, {})
            h = hashlib.sha256(digest.encode()).hexdigest()
            if h in seen:
                self._write({"dir": "in", "execute": cmd, "same_as_line": seen[h],
                             "elapsed_ns": time.time_ns() - t0})
                return result
            line = self._write({"dir": "in", "execute": cmd, "return": result,
                                "elapsed_ns": time.time_ns() - t0})
            if line is not None and len(seen) < MAX_DISTINCT_REPLIES:
                seen[h] = line
            return result
        self._write({"dir": "in", "execute": cmd, "return": result,
                     "elapsed_ns": time.time_ns() - t0})
        return result

    def _unquiet(self, key: str, cmd: str, args: Mapping[str, Any] | None, t0: int) -> None:
        """Log a polled query whose reply changed (or failed): the command, and how many
        identical replies before it were not logged."""
        if not key:
            return
        rec: dict[str, Any] = {"dir": "out", "t_host_ns": t0, "execute": cmd,
                               "arguments": args or {}}
        skipped = self._unchanged.pop(key, 0)
        if skipped:
            rec["unchanged_replies_not_logged"] = skipped
        self._write(rec)

    def cursor(self) -> int:
        """A position in the event history; ``wait_event(after=...)`` looks past it."""
        with self._cond:
            return self._base + len(self._events)

    def events(self, after: int = 0) -> list[dict[str, Any]]:
        """Events from absolute index ``after`` on (those forgotten are in qmp.jsonl)."""
        with self._cond:
            return list(self._events[max(0, after - self._base):])

    def cursor_at(self, t_ns: int) -> int:
        """The cursor of the first event at or after host time ``t_ns``."""
        with self._cond:
            for i, ev in enumerate(self._events):
                if ev.get("t_host_ns", 0) >= t_ns:
                    return self._base + i
            return self._base + len(self._events)

    def forget_before(self, cursor: int) -> int:
        """Drop events before ``cursor`` from memory (qmp.jsonl keeps them), so a long
        run's memory stays flat. Cursors keep their meaning."""
        with self._cond:
            n = max(0, min(cursor - self._base, len(self._events)))
            del self._events[:n]
            self._base += n
            return n

    def wait_event(self, name: str, *, after: int, timeout: float,
                   match: EventMatch | None = None, what: str | None = None) -> dict[str, Any]:
        """The first event ``name`` after cursor ``after`` for which ``match`` holds."""
        end = time.monotonic() + timeout
        idx = after
        with self._cond:
            while True:
                idx = max(idx, self._base)
                while idx < self._base + len(self._events):
                    ev = self._events[idx - self._base]
                    idx += 1
                    if ev.get("event") == name and (match is None or match(ev)):
                        return ev
                left = end - time.monotonic()
                if left <= 0:
                    last = self._events[-1].get("event") if self._events else None
                    raise DeadlineExceeded(what or f"QMP event {name}", timeout,
                                           f"event {last}" if last else "no events")
                self._cond.wait(left)

    def close(self, timeout: float = 3.0) -> None:
        """Disconnect and stop the loop. Safe after QEMU died (EOFError is expected)."""
        if self._closed:
            return
        self._closed = True

        async def _disconnect() -> None:
            if self._pump is not None:
                self._pump.cancel()
            try:
                await self._client.disconnect()
            except (QMPError, OSError, EOFError):
                pass

        try:
            self._call("QMP disconnect", _disconnect(), timeout)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()
        with self._log_lock:
            self._log.close()


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except OSError:
        return 0
