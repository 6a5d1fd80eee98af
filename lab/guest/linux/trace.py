"""The Linux guest's half of an observation: kprobes streamed over ttyS2, and clock
samples from sync tokens the guest echoes from ttyS1 into its kernel log."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lab import clock
from lab.errors import DeadlineExceeded, LabError
from lab.events import Event
from lab.guest.base import GuestTrace
from lab.image import GuestImage

if TYPE_CHECKING:
    from lab.guest.linux.kprobes import LinuxTracer
    from lab.machine import Machine

_TOKENS = itertools.count(1)


class ClockSync:
    """Two-way samples over ttyS1: token out at h_send, kmsg line back at h_recv."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.sent: dict[str, int] = {}
        self.prefix = f"{m.ssh_port or 0:x}"
        self.last_echoed: str | None = None     # the newest token the guest echoed

    def burst(self, n: int = 24, *, timeout: float = 3.0) -> int:
        """Send ``n`` tokens one at a time; return how many came back."""
        if self.m.sync is None or self.m.console is None:
            return 0
        got = 0
        for _ in range(n):
            token = f"{self.prefix}.{next(_TOKENS)}"
            cursor = self.m.console.cursor()
            try:
                # QEMU may be gone (a panic with panic=-1): the samples so far still count
                self.sent[token] = self.m.sync.send(token)
                self.m.console.wait_for(f"rebalab-sync {token}", timeout=timeout, after=cursor,
                                        what=f"clock-sync token {token}")
                got += 1
                self.last_echoed = token
            except (DeadlineExceeded, LabError):
                break
        return got

    def mark(self) -> None:
        """One token, not waited for: its echo in the console is a two-way sample all
        the same (a late echo only widens it)."""
        if self.m.sync is None:
            return
        token = f"{self.prefix}.{next(_TOKENS)}"
        try:
            self.sent[token] = self.m.sync.send(token)
        except (LabError, OSError):
            pass                 # QEMU gone: the step that follows will say so

    def samples(self, lines: Sequence[tuple[int, str]]) -> list[clock.SyncSample]:
        return clock.samples_from_console(list(lines), self.sent)


class LinuxTrace(GuestTrace):
    """Sync bursts at both ends (and before a snapshot); kprobes when asked for."""

    group = "kprobe"

    def __init__(self, m: Machine, image: GuestImage, *, kprobes: bool = True) -> None:
        self.m = m
        self.image = image
        self.kprobes = kprobes
        self.sync = ClockSync(m)
        self.tracer: LinuxTracer | None = None

    def start(self) -> None:
        self.sync.burst()
        if self.kprobes:
            from lab.guest.linux.kprobes import LinuxTracer
            self.tracer = LinuxTracer(self.m, self.image).start()

    def stop(self, alive: bool) -> list[Event]:
        tracer = self.tracer
        if alive and tracer is not None and getattr(self.m, "disposable", False) \
                and tracer.drains_by_sync:
            # the closing burst first: its last token, mirrored to the trace port, is the
            # drain marker (LinuxTracer.stop), so the VM about to be thrown away is asked
            # nothing over SSH
            self.sync.last_echoed = None
            self.sync.burst()
            return tracer.stop(synced=self.sync.last_echoed)
        events = tracer.stop() if tracer else []
        if alive:
            self.sync.burst()
        return events

    def received(self) -> list[Event]:
        return self.tracer.snapshot() if self.tracer else []

    def snapshot(self, alive: bool) -> list[Event]:
        if alive:
            self.sync.burst(4)
            time.sleep(0.05)   # let in-flight trace lines arrive
        return self.received()

    def samples(self, lines: Sequence[tuple[int, str]]) -> list[clock.SyncSample]:
        return self.sync.samples(lines)

    def mark(self) -> None:
        self.sync.mark()

    def meta(self) -> dict[str, Any]:
        return {"kprobes": [s.func for s in self.tracer.active] if self.tracer else [],
                "kprobes_missing": list(self.tracer.missing) if self.tracer else []}
