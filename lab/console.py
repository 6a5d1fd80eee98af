"""The guest's serial console, captured with host receive timestamps.

The console is a QEMU socket chardev in the private run dir. A reader thread stamps
each line with ``time.time_ns()`` the moment it arrives: kernel log lines carry the
guest's own printk time, so the pair is clock-alignment evidence (PLATFORM.md,
"Clocks"). The second serial port (ttyS1) is write-only from here: tokens written to
it are echoed by the guest into /dev/kmsg and come back on the console.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.errors import DeadlineExceeded, QemuError
from lab.rundir import iso

_PRINTK_RE = re.compile(r"^\[\s*(\d+)\.(\d{6})\] (.*)$")


@dataclass(frozen=True)
class ConsoleLine:
    t_host_ns: int
    text: str
    index: int

    @property
    def printk(self) -> tuple[int, str] | None:
        """(guest ns, message) when the line is a kernel log line with a timestamp."""
        m = _PRINTK_RE.match(self.text)
        if not m:
            return None
        return int(m[1]) * 1_000_000_000 + int(m[2]) * 1000, m[3]


def connect_unix(path: Path, timeout: float) -> socket.socket:
    end = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < end:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
            return s
        except OSError as exc:
            s.close()
            last = exc
            time.sleep(0.02)
    raise DeadlineExceeded(f"QEMU socket {path.name}", timeout, repr(last))


class Console:
    def __init__(self, sock_path: Path, log_path: Path) -> None:
        self.sock_path = sock_path
        self._log = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._lines: list[ConsoleLine] = []
        self._base = 0          # the absolute index of _lines[0] (older lines forgotten)
        self._eof = False
        self.listeners: list[Callable[[ConsoleLine], None]] = []
        self.write_failures = 0

    def connect(self, timeout: float) -> None:
        self._sock = connect_unix(self.sock_path, timeout)
        self._thread = threading.Thread(target=self._read, name="console", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._sock is not None
        buf = b""
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                chunk = b""
            now = time.time_ns()
            if not chunk:
                break
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for raw in complete:
                self._add(now, raw)
        if buf:
            self._add(time.time_ns(), buf)
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _add(self, t: int, raw: bytes) -> None:
        text = raw.decode("utf-8", "replace").rstrip("\r")
        with self._cond:
            line = ConsoleLine(t, text, self._base + len(self._lines))
            self._lines.append(line)
            self._cond.notify_all()
        if not self._log.closed:
            try:
                self._log.write(f"{iso(t)} {text}\n")
            except OSError:
                # a full disk: the reader goes on (waits read the lines from memory);
                # without this the console thread died and the boot waited its deadline
                self.write_failures += 1
        for cb in list(self.listeners):
            try:
                cb(line)
            except Exception:
                pass

    def cursor(self) -> int:
        with self._cond:
            return self._base + len(self._lines)

    def lines(self, after: int = 0) -> list[ConsoleLine]:
        """Lines from absolute index ``after`` on (those forgotten are in console.log)."""
        with self._cond:
            return list(self._lines[max(0, after - self._base):])

    def forget_before(self, cursor: int) -> int:
        """Drop the lines before ``cursor`` from memory (they stay in console.log): a VM
        that runs hundreds of iterations must not hold every line it ever printed.
        Cursors keep their meaning. Returns how many were dropped."""
        with self._cond:
            n = max(0, min(cursor - self._base, len(self._lines)))
            del self._lines[:n]
            self._base += n
            return n

    def wait_for(self, needle: str | re.Pattern[str], *, timeout: float, after: int = 0,
                 what: str | None = None,
                 alive: Callable[[], bool] | None = None) -> ConsoleLine:
        """The first line after ``after`` containing/matching ``needle``.

        ``alive`` lets the caller end the wait early when QEMU has exited, instead of
        burning the whole deadline on a dead VM.
        """
        end = time.monotonic() + timeout
        idx = after
        with self._cond:
            while True:
                idx = max(idx, self._base)
                while idx < self._base + len(self._lines):
                    line = self._lines[idx - self._base]
                    idx += 1
                    if (needle.search(line.text) if isinstance(needle, re.Pattern)
                            else needle in line.text):
                        return line
                last = self._lines[-1].text if self._lines else "nothing on the console"
                if self._eof or (alive is not None and not alive()):
                    raise QemuError(f"the console closed while waiting for {what or needle!r}; "
                                    f"QEMU exited (last console line: {last!r})")
                left = end - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(what or f"console line {needle!r}", timeout, last)
                self._cond.wait(min(left, 0.25))

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread is not None:
            self._thread.join(2)
        if not self._log.closed:
            self._log.close()


class SyncPort:
    """The host end of the guest's ttyS1 clock-sync channel."""

    def __init__(self, sock_path: Path) -> None:
        self.sock_path = sock_path
        self._sock: socket.socket | None = None

    def connect(self, timeout: float) -> None:
        self._sock = connect_unix(self.sock_path, timeout)

    def send(self, token: str) -> int:
        """Write one token line; return the host time just before the write."""
        if self._sock is None:
            raise QemuError("sync port not connected")
        t = time.time_ns()
        try:
            self._sock.sendall(token.encode() + b"\n")
        except OSError as exc:      # QEMU gone (a guest panic, a kill): its socket closed
            raise QemuError(f"the sync port is closed ({exc.strerror or exc}): QEMU has "
                            "exited or is exiting") from None
        return t

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
