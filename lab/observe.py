"""Observe a stretch of a run and turn it into one aligned timeline.

``Observation`` starts the guest tracer and clock sampling, and at the end gathers
every source — the lab's own events and QMP events (events.jsonl), QEMU's trace log,
the kernel log and uevents from the console, the kprobe stream — aligns guest clocks
to the host with the ttyS1 sync samples, and writes ``timeline.jsonl``. It only reads
what the run directory and the live channels hold, so the same assembly works on a
run that failed half-way.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Any

from lab import clock
from lab.errors import DeadlineExceeded, LabError
from lab.events import DeviceId, Event, Kind, Source
from lab.machine import Machine
from lab.timeline import DeviceBinding, Timeline
from lab.tracers.kernel_log import events_from_console
from lab.tracers.linux import LinuxTracer
from lab.tracers.qemu_trace import QemuTraceParser

_TOKENS = itertools.count(1)


class ClockSync:
    """Two-way samples over ttyS1: token out at h_send, kmsg line back at h_recv."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        self.sent: dict[str, int] = {}
        self.prefix = f"{m.ssh_port or 0:x}"

    def burst(self, n: int = 24, *, timeout: float = 3.0) -> int:
        """Send ``n`` tokens one at a time; return how many came back."""
        if self.m.sync is None or self.m.console is None:
            return 0
        got = 0
        for _ in range(n):
            token = f"{self.prefix}.{next(_TOKENS)}"
            cursor = self.m.console.cursor()
            self.sent[token] = self.m.sync.send(token)
            try:
                self.m.console.wait_for(f"rebalab-sync {token}", timeout=timeout, after=cursor,
                                        what=f"clock-sync token {token}")
                got += 1
            except (DeadlineExceeded, LabError):
                break
        return got

    def samples(self, lines: list[tuple[int, str]]) -> list[clock.SyncSample]:
        return clock.samples_from_console(lines, self.sent)


def _read_events(path: Path, since_ns: int) -> list[Event]:
    out: list[Event] = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            ev = Event.from_json(json.loads(line))
        except (ValueError, KeyError):
            continue
        if ev.t_host_ns >= since_ns:
            out.append(ev)
    return out


def _interesting(ev: Event) -> bool:
    """Config writes that matter on a timeline: BAR addresses and the command register.
    (Sizing writes of all-ones are kept too: they show the guest probing BAR sizes.)"""
    if ev.kind != Kind.CONFIG_WRITE:
        return True
    return ev.data.get("offset") in (0x04, 0x10, 0x14, 0x18, 0x1C, 0x20, 0x24)


def _trace_events(path: Path, since_ns: int) -> list[Event]:
    parser = QemuTraceParser()
    out: list[Event] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                for ev in parser.parse_line(line):
                    if ev.t_host_ns >= since_ns and _interesting(ev):
                        out.append(ev)
    except OSError:
        pass
    return out


def device_bindings(events: list[Event]) -> list[DeviceBinding]:
    """qom <-> BDF pairs the lab learnt (plug/unplug events carry both)."""
    seen: dict[tuple[str, str], int] = {}
    for ev in events:
        if ev.source == Source.HOST_LAB and ev.device and ev.device.qom and ev.device.bdf:
            seen.setdefault((ev.device.qom, ev.device.bdf), ev.t_host_ns)
    return [DeviceBinding(DeviceId(qom=q, bdf=b)) for (q, b) in seen]


class Observation:
    def __init__(self, m: Machine, *, kprobes: bool = True, name: str = "timeline") -> None:
        self.m = m
        self.name = name
        self.kprobes = kprobes
        self.tracer: LinuxTracer | None = None
        self.sync = ClockSync(m)
        self.start_ns = 0
        self._console_cursor = 0
        self.timeline: Timeline | None = None

    def start(self) -> Observation:
        self.start_ns = time.time_ns()
        assert self.m.console is not None
        self._console_cursor = max(0, self.m.console.cursor() - 0)
        self.sync.burst()
        if self.kprobes:
            self.tracer = LinuxTracer(self.m).start()
        return self

    def finish(self, path: Path | None = None) -> Timeline:
        """Stop tracing, take closing clock samples, build and write the timeline.

        Safe on a dead guest: what was received is used, and alignment falls back to
        whatever samples exist (the header says how good it is).
        """
        guest_events = self.tracer.stop() if self.tracer else []
        alive = self.m.process is not None and self.m.process.alive()
        if alive:
            self.sync.burst()
        tl = self._build(guest_events, alive)
        tl.write(path or self.m.artifacts / f"{self.name}.jsonl")
        self.timeline = tl
        return tl

    def snapshot(self) -> Timeline:
        """The timeline so far, tracing goes on (for asserts in the middle of a run)."""
        alive = self.m.process is not None and self.m.process.alive()
        if alive:
            self.sync.burst(4)
            time.sleep(0.05)   # let in-flight trace lines arrive
        return self._build(self.tracer.snapshot() if self.tracer else [], alive)

    def _build(self, guest_events: list[Event], alive: bool) -> Timeline:
        lines = [(ln.t_host_ns, ln.text) for ln in
                 (self.m.console.lines() if self.m.console else [])]
        samples = self.sync.samples(lines)
        # QEMU's trace comes from its log file alone: a rebalance also records the trace
        # lines it read into the run's events, and taking both would double every line
        host = [e for e in self.m.run.events
                if e.t_host_ns >= self.start_ns and e.source != Source.HOST_TRACE]
        # a QMP stop/cont stops the guest clock under TCG: the fit is piecewise between pauses
        alignment = clock.estimate(samples, pauses=clock.pauses_from_events(host))
        trace = _trace_events(self.m.artifacts / "qemu-trace.log", self.start_ns)
        console_events = events_from_console(lines[self._console_cursor:])
        meta: dict[str, Any] = {"accelerator": self.m.accel.name if self.m.accel else None,
                                "samples": {"two_way": sum(1 for s in samples if s.kind == "two-way"),
                                            "one_way": sum(1 for s in samples if s.kind != "two-way")},
                                "kprobes": [s.func for s in self.tracer.active] if self.tracer else [],
                                "kprobes_missing": list(self.tracer.missing) if self.tracer else [],
                                "guest_alive_at_end": alive}
        return Timeline.build({"host": host, "trace": trace, "console": console_events,
                               "kprobe": guest_events}, alignment=alignment,
                              devices=device_bindings(host), meta=meta)

    def __enter__(self) -> Observation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.finish()
