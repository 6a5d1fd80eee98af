"""A Windows guest's half of an observation: an ETW session (``WindowsTracer``: Kernel-PnP,
the driver's WPP/TraceLogging as ``guest.trace`` configures it, setupapi.dev.log, PnP
state) whose events are fetched over the agent when it stops, stamped with the guest's
own clock and aligned by the tracer's clock exchange."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from lab import clock
from lab.errors import LabError
from lab.events import Event, Source
from lab.guest.base import GuestTrace

if TYPE_CHECKING:
    from lab.guest.windows.trace.tracer import WindowsTraceConfig, WindowsTracer
    from lab.machine import Machine

#: the sources whose events carry the guest's clock (aligned by the exchange)
SOURCES = (Source.GUEST_ETW, Source.GUEST_WPP, Source.GUEST_SETUPAPI, Source.GUEST_PNP)


def start_alignment(start: tuple[int, int] | None, host_after_ns: int) -> clock.Alignment | None:
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


class WindowsTrace(GuestTrace):
    group = "windows"

    def __init__(self, m: Machine, config: WindowsTraceConfig | None) -> None:
        self.m = m
        self.config = config
        self.tracer: WindowsTracer | None = None
        self.alignment: clock.Alignment | None = None

    def start(self) -> None:
        from lab.guest.windows.trace.tracer import WindowsTracer
        if self.m.agent is None:
            raise LabError("the guest agent is not connected")
        self.tracer = WindowsTracer(self.config, out_dir=self.m.artifacts / "windows-trace",
                                    log=self.m.run.log)
        self.tracer.start(self.m.agent)
        # the dedicated exchange (best of several rounds); the coarse single exchange
        # only when it failed
        self.alignment = self.tracer.alignment or start_alignment(self.tracer.clock_start,
                                                                  time.time_ns())

    def stop(self, alive: bool) -> list[Event]:
        """Stop the ETW session and fetch what it recorded (nothing from a dead guest:
        the session's file is inside the guest, the run log says so)."""
        if self.tracer is None:
            return []
        if not alive or self.m.agent is None:
            self.m.run.log("the Windows guest is gone: its ETW trace could not be fetched")
            return []
        try:
            events = list(self.tracer.stop(self.m.agent))
        except LabError as exc:
            self.m.run.log(f"fetching the Windows trace failed: {exc}")
            return []
        for problem in self.tracer.problems:
            self.m.run.log(f"windows trace: {problem}")
        return events

    def source_alignment(self) -> dict[Source, clock.Alignment] | None:
        if self.alignment is None:
            return None
        return {src: self.alignment for src in SOURCES}

    def meta(self) -> dict[str, Any]:
        return {}
