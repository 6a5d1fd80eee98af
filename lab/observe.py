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

from lab import audio_analysis as aa
from lab import clock
from lab.audio_capture import CaptureWatch
from lab.errors import DeadlineExceeded, LabError
from lab.events import DeviceId, Event, Kind, Source
from lab import operations as ops
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
            try:
                # QEMU may be gone (a panic with panic=-1): the samples so far still count
                self.sent[token] = self.m.sync.send(token)
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


def _trace_offset(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _trace_events(path: Path, since_ns: int, offset: int = 0) -> list[Event]:
    """QEMU's trace lines at or after ``since_ns``, read from ``offset`` (the file's size
    when the observation began): the log grows for the VM's whole life, and reading it
    from the start made every iteration slower than the one before."""
    parser = QemuTraceParser()
    out: list[Event] = []
    try:
        with open(path, "rb") as f:
            if offset > 0:
                f.seek(offset - 1)
                if f.read(1) != b"\n":
                    f.readline()          # the rest of a line being written at the start
            for raw in f:
                line = raw.decode("utf-8", "replace")
                for ev in parser.parse_line(line):
                    if ev.t_host_ns >= since_ns and _interesting(ev):
                        out.append(ev)
    except OSError:
        pass
    return out


def device_bindings(events: list[Event]) -> list[DeviceBinding]:
    """The names the lab learnt for its devices: qom <-> BDF (plug/unplug events carry
    both) and, on Windows, qom <-> the PnP instance id the plug wait reported, and the
    instance id of the function devnode (an HDA codec's) where the driver binds."""
    seen: dict[tuple[str, str | None, str | None], int] = {}
    for ev in events:
        d = ev.device
        if ev.source != Source.HOST_LAB or d is None or not d.qom:
            continue
        if d.bdf or d.instance:
            seen.setdefault((d.qom, d.bdf, d.instance), ev.t_host_ns)
        func = ev.data.get("function_instance")
        if isinstance(func, str) and func:
            seen.setdefault((d.qom, None, func), ev.t_host_ns)
    return [DeviceBinding(DeviceId(qom=q, bdf=b, instance=i)) for (q, b, i) in seen]


#: a stream whose capture stood still for less than this at the end of its window is
#: taken as still playing (see Observation.audio_analysis)
END_STILL_NS = 300_000_000

WINDOWS_SOURCES = (Source.GUEST_ETW, Source.GUEST_WPP, Source.GUEST_SETUPAPI, Source.GUEST_PNP)


def windows_alignment(start: tuple[int, int] | None, host_after_ns: int) -> clock.Alignment | None:
    """Guest UTC -> host time from the one exchange the tracer's start makes.

    The guest read its clock somewhere between the host's send and its return, so the
    midpoint is the estimate and half the round trip the guaranteed bound: coarse (a
    WinRM round trip is tens to hundreds of ms), and said so in the timeline header.
    """
    if start is None:
        return None
    guest_ns, host_before_ns = start
    mid = (host_before_ns + host_after_ns) // 2
    return clock.Alignment.fixed(mid - guest_ns, bound_ns=max(0, host_after_ns - host_before_ns) // 2,
                                 method="windows-start-exchange")


class Observation:
    """One stretch of a run. The guest's side depends on its OS: a Linux guest streams
    kprobes over ttyS2 and answers clock-sync tokens on ttyS1; a Windows guest runs an
    ETW session (``WindowsTracer``) whose events are fetched over the agent at the end,
    stamped with the guest's own clock (Windows keeps it in step with the host's)."""

    def __init__(self, m: Machine, *, kprobes: bool = True, name: str = "timeline") -> None:
        self.m = m
        self.name = name
        self.kprobes = kprobes
        self.linux = getattr(getattr(m, "guest", None), "os", "linux") == "linux"
        self.tracer: LinuxTracer | None = None
        self.windows: Any = None            # lab.tracers.windows.WindowsTracer
        self.sync = ClockSync(m)
        self.start_ns = 0
        self._console_cursor = 0
        self._trace_offset = 0
        self.timeline: Timeline | None = None
        self._windows_alignment: clock.Alignment | None = None
        # the guest's playback as QEMU captures it (only when the machine captures audio)
        self.audio_watch: CaptureWatch | None = None
        self.audio_device: DeviceId | None = None    # set by the first `play` step
        self.audio_end_ns: int | None = None         # the lab stopped the players here
        self.audio: aa.AudioAnalysis | None = None   # this observation's window, at finish
        self._qom_bdfs: set[tuple[str, str]] = set()

    def _pci_names(self) -> None:
        """qom <-> BDF of every device QEMU has (cold ones included: no plug event names
        them), so the guest's events about them carry the lab's names."""
        if getattr(self.m, "qmp", None) is None:
            return
        if self.m.process is not None and not self.m.process.responsive():
            return                   # dead or frozen: the names known so far must do
        try:
            self._qom_bdfs.update((q, b) for q, b in ops.qom_bdfs(self.m).items())
        except LabError as exc:
            self.m.run.log(f"query-pci for device names failed: {exc}")

    def start(self) -> Observation:
        self.start_ns = time.time_ns()
        self._trace_offset = _trace_offset(self.m.artifacts / "qemu-trace.log")
        self._pci_names()
        audio_path = getattr(self.m, "audio_path", None)
        if audio_path is not None:
            self.audio_watch = CaptureWatch(audio_path).start()
        assert self.m.console is not None
        self._console_cursor = max(0, self.m.console.cursor() - 0)
        if not self.linux:
            from lab.tracers.windows.tracer import WindowsTracer
            if self.m.agent is None:
                raise LabError("the guest agent is not connected")
            # the driver's own trace as the scenario configures it (guest.trace)
            self.windows = WindowsTracer(getattr(getattr(self.m, "guest", None), "trace_config", None),
                                         out_dir=self.m.artifacts / "windows-trace",
                                         log=self.m.run.log)
            self.windows.start(self.m.agent)
            # the dedicated exchange (best of several rounds); the coarse single exchange
            # only when it failed
            self._windows_alignment = self.windows.alignment or windows_alignment(
                self.windows.clock_start, time.time_ns())
            return self
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
        alive = self.m.process is not None and self.m.process.responsive()
        if self.windows is not None:
            guest_events = self._windows_events(alive)
        elif alive:
            self.sync.burst()
        tl = self._build(guest_events, alive)
        tl.write(path or self.m.artifacts / f"{self.name}.jsonl")
        self.timeline = tl
        return tl

    def audio_analysis(self, pauses: tuple[clock.Pause, ...] | None = None, *,
                       final: bool = False) -> aa.AudioAnalysis | None:
        """The capture window of this observation analysed: from its start to now, or to
        the moment the lab stopped the players (so the lab's own stop is no outage).
        None when nothing was played in it."""
        path = getattr(self.m, "audio_path", None)
        if self.audio_watch is None or self.audio_device is None or path is None:
            return None
        pts = self.audio_watch.stop() if final else self.audio_watch.checkpoints()
        end_ns: int | None = pts[-1][0]
        if self.audio_end_ns is not None:
            pts = [p for p in pts if p[0] <= self.audio_end_ns] or pts[:1]
            end_ns = self.audio_end_ns
        # QEMU's file grows in bursts (a 4 KiB stdio buffer, its main loop busy with QMP
        # and the network): a stream still playing can show a still file for ~100 ms at
        # the window's end. Only a longer stillness there is a stream that did not come back.
        still_since = next(t for t, f in pts if f == pts[-1][1])
        if end_ns is not None and end_ns - still_since < END_STILL_NS:
            end_ns = None
        if pauses is None:
            pauses = clock.pauses_from_events(
                [e for e in self.m.run.events if e.t_host_ns >= self.start_ns])
        start_ns, start_frame = pts[0]
        return aa.analyze_window(path, start_frame=start_frame,
                                 end_frame=pts[-1][1], progress=pts, pauses=pauses,
                                 start_host_ns=start_ns, end_host_ns=end_ns)

    def _audio_events(self, pauses: tuple[clock.Pause, ...], *, final: bool) -> list[Event]:
        try:
            analysis = self.audio_analysis(pauses, final=final)
        except (OSError, LabError) as exc:
            self.m.run.log(f"audio analysis failed: {exc}")
            return []
        if analysis is None:
            return []
        if final:
            self.audio = analysis
        return analysis.events(device=self.audio_device)

    def _windows_events(self, alive: bool) -> list[Event]:
        """Stop the ETW session and fetch what it recorded (nothing from a dead guest:
        the session's file is inside the guest, the run log says so)."""
        if not alive or self.m.agent is None:
            self.m.run.log("the Windows guest is gone: its ETW trace could not be fetched")
            return []
        try:
            events = list(self.windows.stop(self.m.agent))
        except LabError as exc:
            self.m.run.log(f"fetching the Windows trace failed: {exc}")
            return []
        for problem in getattr(self.windows, "problems", []):
            self.m.run.log(f"windows trace: {problem}")
        return events

    def snapshot(self) -> Timeline:
        """The timeline so far, tracing goes on (for asserts in the middle of a run).

        A Windows guest's ETW events arrive when the session stops, so mid-run they
        are not in the snapshot (host events and QEMU's trace are)."""
        alive = self.m.process is not None and self.m.process.responsive()
        if alive and self.linux:
            self.sync.burst(4)
            time.sleep(0.05)   # let in-flight trace lines arrive
        return self._build(self.tracer.snapshot() if self.tracer else [], alive)

    def _build(self, guest_events: list[Event], alive: bool) -> Timeline:
        lines = [(ln.t_host_ns, ln.text) for ln in
                 (self.m.console.lines(self._console_cursor) if self.m.console else [])]
        # clock evidence from this observation's stretch of the console only: one-way
        # samples from the whole boot made the drift fit span minutes, and its error
        # (hundreds of ppm under TCG) grew the bound to tens of ms by the 50th iteration
        samples = self.sync.samples(lines)
        # QEMU's trace comes from its log file alone: a rebalance also records the trace
        # lines it read into the run's events, and taking both would double every line
        host = [e for e in self.m.run.events
                if e.t_host_ns >= self.start_ns and e.source != Source.HOST_TRACE]
        # a QMP stop/cont stops the guest clock under TCG: the fit is piecewise between pauses
        alignment = clock.estimate(samples, pauses=clock.pauses_from_events(host))
        trace = _trace_events(self.m.artifacts / "qemu-trace.log", self.start_ns,
                              self._trace_offset)
        console_events = events_from_console(lines)
        audio_events = self._audio_events(clock.pauses_from_events(host), final=True)
        meta: dict[str, Any] = {"accelerator": self.m.accel.name if self.m.accel else None,
                                "samples": {"two_way": sum(1 for s in samples if s.kind == "two-way"),
                                            "one_way": sum(1 for s in samples if s.kind != "two-way")},
                                "kprobes": [s.func for s in self.tracer.active] if self.tracer else [],
                                "kprobes_missing": list(self.tracer.missing) if self.tracer else [],
                                "guest_alive_at_end": alive}
        if alive:
            self._pci_names()     # a rescan may have given a device another address
        bindings = device_bindings(host)
        named = {(b.device.qom, b.device.bdf) for b in bindings}
        bindings += [DeviceBinding(DeviceId(qom=q, bdf=b)) for q, b in sorted(self._qom_bdfs)
                     if (q, b) not in named]
        per_source = None
        if not self.linux and self._windows_alignment is not None:
            per_source = {src: self._windows_alignment for src in WINDOWS_SOURCES}
        return Timeline.build({"host": host, "trace": trace, "console": console_events,
                               "audio": audio_events,
                               "kprobe" if self.linux else "windows": guest_events},
                              alignment=alignment, source_alignment=per_source,
                              devices=bindings, meta=meta)

    def __enter__(self) -> Observation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.finish()
