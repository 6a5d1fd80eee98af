"""WindowsTracer: everything the lab records inside a Windows guest during a run.

start(agent): prepare the work directory, start the Kernel-PnP ETW session (plus any
TraceLogging providers), start the WPP session when WPP providers are configured, and
record the size of setupapi.dev.log, then exchange clocks with the guest
(``clock_exchange``: repeated until the bound is small; its alignment and bound are
``alignment`` and go to the run log and ``clock-exchange.json``).

stop(agent) -> list[Event]: stop the sessions, decode the ETL with Get-WinEvent, format
WPP with tracefmt, snapshot device state with Get-PnpDevice, read the setupapi tail and
parse all of it. Raw material is written to the run directory first (so a parse bug
never loses evidence); parse problems are kept in ``self.problems`` and in
``windows-trace-problems.txt``.

Every command is a ``GuestScript`` (a fixed template plus literal parameters);
``planned_scripts()`` lists them without an agent, which is what the golden file
tests/unit/data/windows/tracer_commands.golden pins.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from lab import clock
from lab.agent.base import Agent
from lab.errors import AgentError, ConfigError, LabError
from lab.events import DeviceId, Event
from lab.guest.windows.trace import clock_exchange, etw, pnp_state, setupapi, wpp
from lab.guest.windows.trace.common import (
    GuestScript,
    ParsedTrace,
    TraceParseError,
    filetime_to_unix_ns,
    run_script,
    run_structured,
    validate_guest_path,
    validate_guid,
    validate_session,
)


@dataclass(frozen=True)
class WindowsTraceConfig:
    """What to trace; all paths are guest paths (validated, quoted as literals)."""

    workdir: str = r"C:\rebalab\trace"
    session: str = "rebalab-pnp"
    wpp_session: str = "rebalab-wpp"
    tracelogging_providers: tuple[str, ...] = ()
    wpp_providers: tuple[str, ...] = ()
    wpp_flags: str = "0xFFFFFFFF"
    wpp_level: int = 0xFF
    wpp_format: wpp.WppFormatting | None = None
    wpp_patterns: tuple[wpp.WppPattern, ...] = wpp.DEFAULT_PATTERNS
    setupapi_log: str = setupapi.DEFAULT_LOG
    instance_ids: tuple[str, ...] = ()
    device_classes: tuple[str, ...] = ("MEDIA",)
    include_messages: bool = False
    event_map: etw.EventMap = field(default_factory=etw.EventMap)
    #: the driver's providers with their own flags and level (scenario ``guest.trace``,
    #: ``--trace-provider``); the plain GUID lists above share ``wpp_flags``/``wpp_level``
    driver_wpp: tuple[etw.EtwProvider, ...] = ()
    driver_tracelogging: tuple[etw.EtwProvider, ...] = ()
    #: the device whose driver writes the WPP trace: its messages are attributed to it
    device: DeviceId | None = None
    #: host file -> guest path, copied into the guest when tracing starts (TMF, PDB)
    uploads: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        validate_guest_path(self.workdir)
        validate_session(self.session)
        validate_session(self.wpp_session)
        if self.session == self.wpp_session:
            raise ConfigError("the Kernel-PnP and WPP sessions need different names")
        for g in self.tracelogging_providers + self.wpp_providers:
            validate_guid(g)
        guids = [validate_guid(g) for g in self.tracelogging_providers + self.wpp_providers] \
            + [p.guid for p in self.driver_wpp + self.driver_tracelogging]
        dup = next((g for g in guids if guids.count(g) > 1), None)
        if dup is not None:
            raise ConfigError(f"provider {dup} is configured twice")
        if (self.wpp_providers or self.driver_wpp) and self.wpp_format is None:
            raise ConfigError("WPP providers are configured but no TMF file, TMF directory or PDB "
                              "to format them with (wpp_format)")
        for _local, guest in self.uploads:
            validate_guest_path(guest)

    @property
    def etl(self) -> str:
        return self.workdir + "\\kernel-pnp.etl"

    @property
    def wpp_etl(self) -> str:
        return self.workdir + "\\wpp.etl"

    @property
    def wpp_txt(self) -> str:
        return self.workdir + "\\wpp.txt"

    @property
    def tmf_dir(self) -> str:
        return self.workdir + "\\tmf"

    def pnp_session(self) -> etw.EtwSession:
        extra = tuple(etw.EtwProvider(g) for g in self.tracelogging_providers) + self.driver_tracelogging
        return etw.EtwSession(self.session, self.etl, (etw.KERNEL_PNP,) + extra)

    def wpp_etw_session(self) -> etw.EtwSession | None:
        if not self.wpp_providers and not self.driver_wpp:
            return None
        provs = tuple(etw.EtwProvider(g, self.wpp_flags, self.wpp_level) for g in self.wpp_providers)
        return etw.EtwSession(self.wpp_session, self.wpp_etl, provs + self.driver_wpp)


@dataclass
class _RunStart:
    setupapi_offset: int
    guest_start_ns: int
    utc_offset_minutes: int
    host_start_ns: int


class WindowsTracer:
    """Guest-side tracing for one run (or iteration) of a Windows guest."""

    def __init__(self, config: WindowsTraceConfig | None = None, out_dir: Path | None = None, *,
                 log: Callable[[str], None] | None = None,
                 now: Callable[[], int] = time.time_ns,
                 clock_target_ns: int = clock_exchange.DEFAULT_TARGET_BOUND_NS,
                 clock_rounds: int = clock_exchange.DEFAULT_MAX_ROUNDS) -> None:
        self.config = config or WindowsTraceConfig()
        self.out_dir = out_dir
        self.problems: list[str] = []
        self._start: _RunStart | None = None
        self._log = log
        self._now = now
        self._clock_target_ns = clock_target_ns
        self._clock_rounds = clock_rounds
        self.clock: clock_exchange.ExchangeResult | None = None

    # -- the pinned scripts ------------------------------------------------------

    def start_scripts(self) -> list[GuestScript]:
        c = self.config
        scripts = [etw.prepare_dir_script(c.workdir)]
        scripts += etw.start_scripts(c.pnp_session())
        wsess = c.wpp_etw_session()
        if wsess is not None:
            scripts += etw.start_scripts(wsess)
        scripts.append(setupapi.size_script(c.setupapi_log))
        return scripts

    def stop_scripts(self, setupapi_offset: int = 0) -> list[GuestScript]:
        c = self.config
        scripts = [etw.stop_script(c.pnp_session())]
        wsess = c.wpp_etw_session()
        if wsess is not None:
            scripts.append(etw.stop_script(wsess))
        scripts.append(etw.decode_script(c.etl, c.include_messages))
        if wsess is not None and c.wpp_format is not None:
            scripts += wpp.format_scripts(c.wpp_format, c.wpp_etl, c.wpp_txt, c.tmf_dir)
            scripts.append(wpp.read_text_script(c.wpp_txt))
        scripts.append(pnp_state.query_script(c.instance_ids, c.device_classes))
        scripts.append(setupapi.tail_script(setupapi_offset, c.setupapi_log))
        return scripts

    def planned_scripts(self) -> list[GuestScript]:
        """Start, stop and the manifest check, in order; for review and the golden file."""
        return self.start_scripts() + self.stop_scripts(0) + [etw.manifest_check_script()]

    # -- running -----------------------------------------------------------------

    def _save(self, name: str, content: str | bytes) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    def start(self, agent: Agent) -> None:
        """Start the sessions; remember where setupapi.dev.log ended and the guest time."""
        host_start = time.time_ns()
        size_info: list[Any] = []
        for i, gs in enumerate(self.start_scripts()):
            if gs.structured:
                size_info = run_structured(agent, gs)
            else:
                run_script(agent, gs).check()
            if i == 0:
                # the work directory exists now: the driver's TMF/PDB go into it
                for local, guest in self.config.uploads:
                    agent.put(Path(local), guest)
        rec = size_info[0] if size_info and isinstance(size_info[0], dict) else {}
        try:
            self._start = _RunStart(
                setupapi_offset=int(rec.get("Length", 0)),
                guest_start_ns=filetime_to_unix_ns(int(rec["GuestUtcFileTime"])),
                utc_offset_minutes=int(rec.get("UtcOffsetMinutes", 0)),
                host_start_ns=host_start)
        except (KeyError, TypeError, ValueError):
            raise AgentError(f"the guest did not report the setupapi.dev.log size and clock: {rec!r}") from None
        self._save("windows-trace-start.json", json.dumps(rec, indent=2, sort_keys=True, default=str))
        # last, so that nothing runs between the best round and the caller's next stamp
        try:
            self.clock = clock_exchange.exchange(agent, target_bound_ns=self._clock_target_ns,
                                                 max_rounds=self._clock_rounds, now=self._now,
                                                 log=self._log)
            self._save("clock-exchange.json", clock_exchange.dumps(self.clock))
        except LabError as exc:
            self.clock = None
            self.problems.append(f"clock exchange failed, guest events keep their receive times: {exc}")
            if self._log is not None:
                self._log(f"windows clock exchange failed: {exc}")

    @property
    def alignment(self) -> clock.Alignment | None:
        """Guest UTC -> host time from the clock exchange (None when it failed)."""
        return self.clock.alignment() if self.clock is not None else None

    @property
    def clock_start(self) -> tuple[int, int] | None:
        """(guest ns, host ns) such that the guest read its clock no earlier than that
        host time: the best exchange round's read and its send (less the guest stamp's
        resolution). A caller that takes the midpoint up to its own later stamp gets a
        valid, looser bound; ``alignment`` is the exchange's own, tighter one."""
        if self._start is None or self.clock is None:
            return None
        best = self.clock.best
        return best.g_read_ns, best.h_send_ns - best.g_resolution_ns

    def stop(self, agent: Agent) -> list[Event]:
        """Stop, fetch, save raw, parse; returns all events (problems in ``self.problems``)."""
        if self._start is None:
            raise AgentError("WindowsTracer.stop() called before start()")
        st = self._start
        offset = timedelta(minutes=st.utc_offset_minutes)
        received = time.time_ns()
        parsed = ParsedTrace()
        c = self.config
        for gs in self.stop_scripts(st.setupapi_offset):
            label = gs.label
            if label.startswith("etw: stop") or label.startswith("wpp: trace"):
                run_script(agent, gs).check()
            elif label.startswith("etw: decode"):
                res = run_script(agent, gs).check()
                self._save("kernel-pnp.stdout.txt", res.stdout)
                try:
                    from lab.agent.powershell import decode_structured
                    records = decode_structured(res.stdout, convert_dates=False)
                    self._save("kernel-pnp.json", json.dumps(records, indent=1, default=str))
                    parsed.extend(etw.parse_records(records, received_ns=received, event_map=c.event_map))
                except (TraceParseError, AgentError) as exc:
                    parsed.problems.append(f"Kernel-PnP ETW: {exc}")
            elif label.startswith("wpp: read"):
                recs = run_structured(agent, gs)
                raw = base64.b64decode(str(recs[0].get("Data") or "")) if recs else b""
                self._save("wpp.txt", raw)
                text = raw.decode("utf-8-sig", "replace") if not raw.startswith(b"\xff\xfe") \
                    else raw.decode("utf-16", "replace")
                parsed.extend(wpp.parse_lines(text, received_ns=received, patterns=c.wpp_patterns,
                                              utc_offset=offset, device=c.device))
            elif label.startswith("pnp:"):
                recs = run_structured(agent, gs)
                self._save("pnp-state.json", json.dumps(recs, indent=1, default=str))
                states, probs = pnp_state.parse_records(recs)
                parsed.problems.extend(probs)
                parsed.extend(pnp_state.to_events(states, received_ns=received))
            elif label.startswith("setupapi: tail"):
                recs = run_structured(agent, gs)
                tail = setupapi.decode_tail(recs)
                self._save("setupapi.dev.log.tail", tail.text)
                if tail.missing:
                    parsed.problems.append(f"{c.setupapi_log} does not exist in the guest")
                if tail.rotated:
                    parsed.problems.append(f"{c.setupapi_log} shrank during the run (rotated); read from 0")
                if tail.truncated:
                    parsed.problems.append(f"{c.setupapi_log} tail was larger than the read limit")
                # everything past the recorded offset was written during the run; the time
                # filter (1 s slack for millisecond stamps) matters when the log rotated
                log = setupapi.parse(tail.text, utc_offset=offset,
                                     since_ns=st.guest_start_ns - 1_000_000_000)
                # a section that leaves the device with a problem code also yields a
                # PROBLEM event, which the windows-pnp rules read
                parsed.extend(setupapi.to_events(log, received_ns=received, with_problems=True))
            else:  # pragma: no cover - every planned label is handled above
                raise AssertionError(f"unhandled tracer step {label}")
        self.problems.extend(parsed.problems)
        if parsed.problems:
            self._save("windows-trace-problems.txt", "\n".join(parsed.problems) + "\n")
        self._save("windows-events.jsonl", "".join(e.dumps() + "\n" for e in parsed.events))
        self._start = None
        return parsed.events

    def record_event_manifest(self, agent: Agent) -> list[int]:
        """Save the guest's Kernel-PnP manifest and return table IDs it does not define."""
        res = run_script(agent, etw.manifest_check_script()).check()
        self._save("kernel-pnp-manifest.txt", res.stdout)
        missing = self.config.event_map.unconfirmed(etw.manifest_event_ids(res.stdout))
        if missing:
            self.problems.append(f"event table IDs not in this guest's Kernel-PnP manifest: {missing}")
        return missing


def render_planned(tracer: WindowsTracer) -> str:
    from lab.guest.windows.trace.common import render_scripts

    return render_scripts(tracer.planned_scripts())


__all__: Sequence[str] = ("WindowsTraceConfig", "WindowsTracer", "render_planned")
