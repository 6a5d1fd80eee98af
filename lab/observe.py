"""Observe a stretch of a run and turn it into one aligned timeline.

``Observation`` starts the guest's trace (``GuestOs.trace``: kprobes and clock-sync
tokens on Linux, an ETW session on Windows), and at the end gathers every source — the
lab's own events and QMP events (events.jsonl), QEMU's trace log, the kernel log and
uevents from the console, the guest's trace — aligns guest clocks to the host with the
guest's clock evidence, and writes ``timeline.jsonl``. It only reads
what the run directory and the live channels hold, so the same assembly works on a
run that failed half-way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lab import audio_analysis as aa
from lab import clock
from lab.audio_capture import CaptureWatch
from lab.errors import LabError
from lab.events import DeviceId, Event, Kind, Source
from lab.guest.base import GuestTrace
from lab import operations as ops
from lab.machine import Machine
from lab.timeline import RECV_KEY, DeviceBinding, Timeline
from lab.tracers.kernel_log import events_from_console
from lab.tracers.qemu_trace import QemuTraceParser

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


def kprobe_samples(events: list[Event]) -> list[clock.SyncSample]:
    """One-way clock samples from kprobe events: guest stamp, host receipt (the event's
    host time until the timeline aligns it and keeps the receipt in its data)."""
    out: list[clock.SyncSample] = []
    for e in events:
        recv = e.data.get(RECV_KEY, e.t_host_ns)
        if e.source == Source.GUEST_KPROBE and e.t_guest_ns is not None \
                and isinstance(recv, int):
            out.append(clock.SyncSample.one_way(e.t_guest_ns, recv))
    return out


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
    both) and qom <-> the guest's own names the plug wait reported (a PnP instance id,
    and the instance id of the function devnode, an HDA codec's, where the driver binds)."""
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

class Observation:
    """One stretch of a run. The guest's side is its OS's (``GuestOs.trace``): its
    events, and its clock evidence (samples in the console, or a fixed alignment per
    source from an exchange of its own)."""

    def __init__(self, m: Machine, *, kprobes: bool = True, name: str = "timeline") -> None:
        self.m = m
        self.name = name
        self.kprobes = kprobes
        self.guest: GuestTrace = m.guest.trace(m, kprobes=kprobes)
        self.start_ns = 0
        self._console_cursor = 0
        self._trace_offset = 0
        self.timeline: Timeline | None = None
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
        self.guest.start()
        return self

    def finish(self, path: Path | None = None) -> Timeline:
        """Stop tracing, take closing clock samples, build and write the timeline.

        Safe on a dead guest: what was received is used, and alignment falls back to
        whatever samples exist (the header says how good it is).
        """
        alive = self.m.process is not None and self.m.process.responsive()
        guest_events = self.guest.stop(alive)
        tl = self._build(guest_events, alive)
        tl.write(path or self.m.artifacts / f"{self.name}.jsonl")
        self.timeline = tl
        return tl

    def audio_analysis(self, pauses: tuple[clock.Pause, ...] | None = None, *,
                       final: bool = False,
                       trace: list[Event] | None = None) -> aa.AudioAnalysis | None:
        """The capture window of this observation analysed: from its start to now, or to
        the moment the lab stopped the players (so the lab's own stop is no outage).
        None when nothing was played in it. ``trace``: QEMU's trace events of this
        observation when the caller read them already (the timeline's build)."""
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
        analysis = aa.analyze_window(path, start_frame=start_frame,
                                     end_frame=pts[-1][1], progress=pts, pauses=pauses,
                                     start_host_ns=start_ns, end_host_ns=end_ns)
        if analysis.summary.dropped_frames or analysis.outages:
            # a drop QEMU's HDA codec made itself, or a stall of QEMU itself (its host
            # fell behind), is not the guest's; QEMU's trace of this observation, unless
            # the caller read it already
            if trace is None:
                trace = _trace_events(self.m.artifacts / "qemu-trace.log", self.start_ns,
                                      self._trace_offset)
            analysis = analysis.excuse_emulator_drops(
                [e.t_host_ns for e in trace if e.kind == Kind.AUDIO_OVERRUN],
                [(e.t_host_ns, e.duration_ns or 0) for e in trace
                 if e.kind == Kind.AUDIO_TIMER_LATE])
            s = analysis.summary
            if final and s.emulator_drops:
                self.m.run.log(f"audio: QEMU's HDA codec dropped {s.emulator_drops} buffer(s) "
                               f"of {aa.HDA_CODEC_BUFFER_BYTES} bytes itself "
                               "(hda_audio_overrun: the host did not keep up); not counted "
                               "as discontinuities")
            if final and s.host_stalls:
                self.m.run.log(f"audio: {s.host_stalls} stall(s) of the capture with the "
                               "counter running on were QEMU's own audio timer running late "
                               "(audio_timer_delayed); not counted as outages")
        return analysis

    def _audio_events(self, pauses: tuple[clock.Pause, ...], *, final: bool,
                      trace: list[Event] | None = None) -> list[Event]:
        try:
            analysis = self.audio_analysis(pauses, final=final, trace=trace)
        except (OSError, LabError) as exc:
            self.m.run.log(f"audio analysis failed: {exc}")
            return []
        if analysis is None:
            return []
        if final:
            self.audio = analysis
        return analysis.events(device=self.audio_device)

    def snapshot(self) -> Timeline:
        """The timeline so far, tracing goes on (for asserts in the middle of a run).

        A guest whose events arrive only when its trace stops (Windows' ETW session)
        has none in the snapshot; host events and QEMU's trace are there."""
        alive = self.m.process is not None and self.m.process.responsive()
        return self._build(self.guest.snapshot(alive), alive)

    def _build(self, guest_events: list[Event], alive: bool) -> Timeline:
        lines = [(ln.t_host_ns, ln.text) for ln in
                 (self.m.console.lines(self._console_cursor) if self.m.console else [])]
        # clock evidence from this observation's stretch of the console only: one-way
        # samples from the whole boot made the drift fit span minutes, and its error
        # (hundreds of ppm under TCG) grew the bound to tens of ms by the 50th iteration
        samples = self.guest.samples(lines)
        # QEMU's trace comes from its log file alone: a rebalance also records the trace
        # lines it read into the run's events, and taking both would double every line
        host = [e for e in self.m.run.events
                if e.t_host_ns >= self.start_ns and e.source != Source.HOST_TRACE]
        # a QMP stop/cont stops the guest clock under TCG: the fit is piecewise between pauses
        pauses = clock.pauses_from_events(host)
        if getattr(self.m, "record", None) is not None:
            # under --record the guest clock counts instructions: monotone, not linear,
            # and only as good as its anchors are dense. The kprobe stream is stamped by
            # the same clock as the console (trace_clock "global" is printk's), and each
            # line's receipt is a ceiling: during a 4 s slow remove() the console is
            # silent, but the probes are not
            samples = samples + kprobe_samples(guest_events)
            alignment = clock.estimate_monotone(samples, pauses=pauses)
        else:
            alignment = clock.estimate(samples, pauses=pauses)
        trace = _trace_events(self.m.artifacts / "qemu-trace.log", self.start_ns,
                              self._trace_offset)
        console_events = events_from_console(lines)
        audio_events = self._audio_events(pauses, final=True, trace=trace)
        meta: dict[str, Any] = {"accelerator": self.m.accel.name if self.m.accel else None,
                                "samples": {"two_way": sum(1 for s in samples if s.kind == "two-way"),
                                            "one_way": sum(1 for s in samples if s.kind != "two-way")},
                                **self.guest.meta(),
                                "guest_alive_at_end": alive}
        if alive:
            self._pci_names()     # a rescan may have given a device another address
        bindings = device_bindings(host)
        named = {(b.device.qom, b.device.bdf) for b in bindings}
        bindings += [DeviceBinding(DeviceId(qom=q, bdf=b)) for q, b in sorted(self._qom_bdfs)
                     if (q, b) not in named]
        return Timeline.build({"host": host, "trace": trace, "console": console_events,
                               "audio": audio_events, self.guest.group: guest_events},
                              alignment=alignment, source_alignment=self.guest.source_alignment(),
                              devices=bindings, meta=meta)

    def __enter__(self) -> Observation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.finish()
