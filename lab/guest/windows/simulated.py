"""A SIMULATED Windows guest for tests: real QEMU for the hardware, scripted Windows answers.

Windows cannot run on the machine this project is tested on (no licence, no working
KVM), yet the Windows pipeline — the runner's Windows paths, ``WindowsTracer``, the
timeline's Windows alignment, the Windows PnP rules and the reports — should be run end
to end. ``SimulatedWindowsGuest`` does that, and says so everywhere it is recorded
(``describe``, ``describe_image``: the run's ``run.json``, summary and report):

* **Real**: QEMU and everything the host does to it. The built-in Linux image boots
  (``LinuxGuest`` supplies the accelerator, kernel command line and ready marker), so
  ``device_add``/``device_del``, ACPI hot-plug and eject, QMP events, ``query-pci`` and
  QEMU's trace are those of a real VM. The Linux kernel plays the guest side of the
  *hardware* (it enumerates the device and assigns its BARs); no Linux tool is used.
* **Scripted**: every answer of the "Windows" guest. The agent is a ``ScriptedAgent``
  that answers the lab's exact pinned PowerShell scripts (``tracer_commands.golden``,
  ``wdtf_commands.golden``, ``lab.guest.windows.pnp_wait``) with outputs in the formats
  Microsoft documents and the parsers read: the structured JSON of Get-WinEvent and
  Get-PnpDevice, tracefmt's text with the pinned ``TRACE_FORMAT_PREFIX``, the clock
  exchange line, WDTF's result record. A script it does not know is an ``AgentError``,
  so a changed script cannot pass unnoticed.

What the scripted side says is a ``WindowsCase`` (the "guest script"): the driver's WPP
messages during the WDTF action, in the default PortCls message patterns
(``lab.guest.windows.trace.wpp``), and WDTF's outcome. Its answers are tied to the real VM
where they can be: "started" only once QEMU lists the device with its BARs mapped, the
instance id from the device's real ids and slot, the driver's START resources from its
real BARs (``{resources}``), "gone" only once QEMU no longer lists it. Time follows the
host: the guest's clock is the host's less ``GUEST_BEHIND_NS`` (local time
``UTC_OFFSET_MINUTES`` ahead of UTC, stamps truncated to Windows' 15.625 ms tick), every
message is stamped when its handler "runs", and the action takes as long as its messages
span, so events land where they happen only if the clock exchange and the timeline's
alignment do their work.

Only tests use this module; nothing in the lab branches on it (the runner takes a
prepared ``guest=``, and this class is an ordinary Windows ``GuestOs`` whose ``os`` is
``"windows"``).
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.accel import Accel
from lab.agent.base import Agent
from lab.deadline import seconds
from lab.errors import AgentError
from lab.guest.base import BootFiles, GuestArgs, MachineView, ShutdownStep
from lab.guest.linux import LinuxGuest
from lab.guest.windows.boot import WindowsOs
from lab.image import GuestImage
from lab.operations import walk_pci
from lab.pci_state import FunctionState, PciSnapshot
from lab.guest.windows.trace import wpp
from lab.guest.windows.trace.common import FILETIME_UNIX_OFFSET
from lab.guest.windows.trace.etw import KERNEL_PNP_GUID, KERNEL_PNP_NAME
from lab.guest.windows.trace.tracer import WindowsTraceConfig
from lab.guest.windows.scripted_agent import ScriptedAgent, structured_stdout

#: the simulated guest's UTC clock runs this far behind the host's: the clock exchange
#: must find it, or the driver's messages land outside the operation that caused them
GUEST_BEHIND_NS = 2_750_000_000
#: the guest's local time zone (tracefmt stamps are local time; setupapi too)
UTC_OFFSET_MINUTES = 60
#: Windows' default system-time resolution (64 Hz): UtcNow and process start times lag
TICK_NS = 15_625_000
#: WDTF's own work (COM objects, the device depot query) before its method sends the first
#: IRP: the driver's first message comes this long after the action script began. It
#: also keeps the test's margin over the clock exchange's error (its bound, <= 20 ms)
WDTF_LEAD_MS = 50.0
#: the PCI revision in instance ids (query-pci does not report it; QEMU's AC97 has 0x01)
REVISION = 0x01
#: setupapi.dev.log's size in the simulated guest (it does not grow: nothing is installed)
SETUPAPI_LENGTH = 4096
MEDIA_CLASS_GUID = "{4d36e96c-e325-11ce-bfc1-08002be10318}"
SIMULATION_NOTE = ("SIMULATED Windows guest side: every guest answer is scripted "
                   "(lab/guest/windows/simulated.py); QEMU, QMP, the runner, timeline, rules and "
                   "reports are real. Not a Windows run.")


@dataclass(frozen=True)
class DriverLine:
    """One message the simulated driver writes to its WPP trace, ``at_ms`` after WDTF's
    method began (``WDTF_LEAD_MS`` into the action script). ``{resources}``: the device's
    BARs as QEMU maps them now; ``{moved}``: the same ranges 0x1000 higher (a claim of the
    script only)."""

    at_ms: float
    message: str
    thread: str = "0004.0068"


@dataclass(frozen=True)
class WindowsCase:
    """The scripted Windows side of one scenario: what WDTF reports for ``action`` and
    what the driver traces meanwhile (``driver``); ``start_problem``: the problem code a
    failed restart leaves (Kernel-PnP 411 and WDTF's state after)."""

    name: str
    action: str
    driver: tuple[DriverLine, ...]
    success: bool | None = True
    status_after: str = "OK"
    problem_after: int | None = None
    present_after: bool = True
    start_problem: int | None = None

    @property
    def duration_ms(self) -> float:
        return WDTF_LEAD_MS + max((ln.at_ms for ln in self.driver), default=0.0) + 5.0


def _ranges(f: FunctionState) -> str:
    return ", ".join(f"{b.address:#x}+{b.size:#x}" for b in f.bars if b.address is not None)


def _moved(f: FunctionState) -> str:
    return ", ".join(f"{b.address + 0x1000:#x}+{b.size:#x}" for b in f.bars if b.address is not None)


def instance_id(f: FunctionState, subsystem: int, revision: int) -> str:
    """A PCI device instance id as Windows forms it: ``PCI\\VEN_v&DEV_d&SUBSYS_ss&REV_r``
    then ``\\<parent unique id>&<UI number>`` (the device/function number as two hex
    digits). The parent's id part is fixed: only its shape matters to the lab."""
    ui = (int(f.bdf[-4:-2], 16) << 3) | int(f.bdf[-1])
    return (f"PCI\\VEN_{f.vendor:04X}&DEV_{f.device:04X}&SUBSYS_{subsystem:08X}&REV_{revision:02X}"
            f"\\3&267A616A&0&{ui:02X}")


class SimulatedWindowsAgent(ScriptedAgent):
    """The scripted guest: answers the pinned scripts, reading the real VM through QMP.

    State (the trace sessions, the driver's messages, Kernel-PnP records, instance ids
    seen) is kept as the guest would keep it, under a lock: plug and unplug waits run on
    the runner's watcher threads.
    """

    def __init__(self, m: MachineView, case: WindowsCase, device: str, *,
                 component: str = "simdrv", log: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.m = m
        self.case = case
        self.device = device
        self.component = component
        self._log = log or (lambda s: None)
        self._lock = threading.Lock()
        self.sessions: set[str] = set()
        self.wpp_lines: list[str] = []
        self.wpp_formatted: str | None = None
        self.etw: list[dict[str, Any]] = []
        self.uploads: list[tuple[str, str]] = []
        self.seen: dict[str, str] = {}           # instance id -> friendly name
        self.actions: list[str] = []
        self._record = 0
        (self.on("New-Item -ItemType Directory -Force -Path $p.Dir", "")
             .on("$null = & { $ErrorActionPreference = 'Continue'; & logman.exe stop", "")
             .on("logman.exe create trace", self._create)
             .on("logman.exe update trace", self._update)
             .on("throw (\"logman stop failed", self._stop)
             .on("GuestUtcFileTime = $now.ToFileTimeUtc()", self._size)
             .on("rebalab-clock", self._clock)
             .on("Get-WinEvent -Path $p.Etl -Oldest", self._decode)
             .on("-tmf $p.Tmf -o $p.Out -nosummary", self._tracefmt)
             .on("[IO.File]::ReadAllBytes($p.Path)", self._read_text)
             .on("'DEVPKEY_Device_ProblemCode', 'DEVPKEY_Device_ProblemStatus'", self._pnp_state)
             .on("[IO.FileShare]::ReadWrite", self._setupapi_tail)
             .on("$funcPatterns = @($p.FunctionIds", self._wait_started)
             .on("if ($devs.Count -eq 0) { 'gone'; exit 0 }", self._wait_gone)
             .on("$r.RebootRequired = $false", self._wdtf_prepare)
             .on("$pnp = $target.GetInterface('PNP')", self._wdtf_action))

    # ---- the guest's clock ---------------------------------------------------------
    @staticmethod
    def guest_ns(host_ns: int | None = None) -> int:
        return (time.time_ns() if host_ns is None else host_ns) - GUEST_BEHIND_NS

    @staticmethod
    def filetime(guest_ns: int, *, tick: bool = True) -> int:
        g = guest_ns - guest_ns % TICK_NS if tick else guest_ns
        return g // 100 + FILETIME_UNIX_OFFSET

    @staticmethod
    def tracefmt_stamp(guest_ns: int) -> str:
        """tracefmt's ``%4!s!``: local time, ``MM/DD/YYYY-hh:mm:ss.fffffff``."""
        local = guest_ns + UTC_OFFSET_MINUTES * 60 * 1_000_000_000
        t = time.gmtime(local // 1_000_000_000)
        return (f"{t.tm_mon:02d}/{t.tm_mday:02d}/{t.tm_year:04d}-{t.tm_hour:02d}:{t.tm_min:02d}:"
                f"{t.tm_sec:02d}.{(local % 1_000_000_000) // 100:07d}")

    # ---- the real VM ----------------------------------------------------------------
    def _function(self) -> tuple[FunctionState, dict[str, Any]] | None:
        """The device under test as QEMU lists it now (None: not in QEMU)."""
        qmp = self.m.qmp
        if qmp is None:
            return None
        raw = list(qmp.execute("query-pci"))
        snap = PciSnapshot.from_query_pci(raw, time.time_ns())
        f = snap.find(self.device)
        if f is None:
            return None
        rec: dict[str, Any] = next((d for bus in raw for d in walk_pci(bus.get("devices", []))
                    if d.get("qdev_id") == self.device), {})
        return f, rec

    def _identity(self, f: FunctionState, rec: dict[str, Any]) -> str:
        # SUBSYS_ssssvvvv: subsystem id, then subsystem vendor id. QMP's query-pci does
        # not report the revision; 0x01 is what QEMU's ac97.c sets (the device used here)
        ident = rec.get("id") or {}
        sub = (int(ident.get("subsystem", 0)) << 16) | int(ident.get("subsystem-vendor", 0))
        return instance_id(f, sub, REVISION)

    # ---- trace sessions ----------------------------------------------------------------
    def _create(self, script: str, params: dict[str, str]) -> Any:
        with self._lock:
            if params["Session"] in self.sessions:       # the stale-session stop did not run
                return (1, "", "Data Collector Set already exists.")
            self.sessions.add(params["Session"])
            if params["Session"] != "rebalab-pnp":
                self.wpp_lines.clear()
            else:
                self.etw.clear()
        return "The command completed successfully.\r\n"

    def _update(self, script: str, params: dict[str, str]) -> Any:
        if params["Session"] not in self.sessions:
            return (1, "", "Data Collector Set was not found.")
        return "The command completed successfully.\r\n"

    def _stop(self, script: str, params: dict[str, str]) -> Any:
        with self._lock:
            if params["Session"] not in self.sessions:
                return (1, "", "Data Collector Set was not found.")
            self.sessions.discard(params["Session"])
        return "The command completed successfully.\r\n"

    def put(self, local: Path, remote: str) -> None:
        """The tracer copies the driver's TMF into the guest: kept as a record."""
        if not Path(local).is_file():
            raise AgentError(f"the scripted guest was sent {local}, which is no file")
        self.uploads.append((str(local), remote))

    def _size(self, script: str, params: dict[str, str]) -> str:
        return structured_stdout([{"Length": SETUPAPI_LENGTH, "GuestUtcFileTime": self.filetime(self.guest_ns()),
                                   "UtcOffsetMinutes": UTC_OFFSET_MINUTES}])

    def _clock(self, script: str, params: dict[str, str]) -> str:
        started = self.guest_ns()
        time.sleep(0.002)                     # PowerShell's own start-up, in miniature
        read = self.guest_ns()
        return f"rebalab-clock {self.filetime(started)} {self.filetime(read)}\r\n"

    def _decode(self, script: str, params: dict[str, str]) -> Any:
        if "rebalab-pnp" in self.sessions:                # the .etl is open until logman stop
            return (1, "", "The process cannot access the file because it is being used")
        return structured_stdout(list(self.etw))

    def _tracefmt(self, script: str, params: dict[str, str]) -> Any:
        if params.get("Prefix") != wpp.TRACE_FORMAT_PREFIX:
            return (1, "", "the simulation writes lines in the pinned TRACE_FORMAT_PREFIX only")
        with self._lock:
            self.wpp_formatted = "".join(line + "\r\n" for line in self.wpp_lines)
        return ""

    def _read_text(self, script: str, params: dict[str, str]) -> str:
        text = self.wpp_formatted
        if text is None:
            return structured_stdout([{"Missing": True, "Data": ""}])
        return structured_stdout([{"Missing": False,
                                   "Data": base64.b64encode(text.encode("ascii")).decode("ascii")}])

    def _pnp_state(self, script: str, params: dict[str, str]) -> str:
        """Get-PnpDevice (without -PresentOnly) of the MEDIA class: the device while QEMU
        has it, a phantom (not present, code 45 CM_PROB_PHANTOM) once it left."""
        found = self._function()
        here = self._identity(*found) if found else None
        out = []
        for inst, name in sorted(self.seen.items()):
            present = inst == here
            problem = self.case.problem_after if present and self.case.status_after != "OK" else None
            out.append({"InstanceId": inst, "FriendlyName": name, "Class": "MEDIA",
                        "Status": ("Error" if problem else "OK") if present else "Unknown",
                        "Present": present,
                        "ConfigManagerErrorCode": (problem or 0) if present else 45,
                        "ProblemCode": problem if present else None,
                        "ProblemStatus": "0xC000009A" if problem else None, "PropertyError": None})
        return structured_stdout(out)

    def _setupapi_tail(self, script: str, params: dict[str, str]) -> str:
        # nothing installed during the run: the log did not grow past what _size reported
        off = SETUPAPI_LENGTH
        return structured_stdout([{"Offset": off, "Length": off, "Rotated": False, "Missing": False,
                                   "Truncated": False, "Data": ""}])

    # ---- what the driver and Kernel-PnP record ------------------------------------------
    def _wpp(self, guest_ns: int, message: str, thread: str = "0004.0068") -> None:
        self.wpp_lines.append(f"{self.tracefmt_stamp(guest_ns)} {thread} [{self.component}]{message}")

    def _kernel_pnp(self, guest_ns: int, event_id: int, inst: str, problem: int = 0,
                    status: str = "0x0") -> None:
        self._record += 1
        ft = self.filetime(guest_ns, tick=False)
        data = {"DeviceInstanceId": inst, "DriverName": "oem42.inf", "ClassGuid": MEDIA_CLASS_GUID,
                "ServiceName": self.component, "LowerFilters": "", "UpperFilters": "",
                "Problem": str(problem), "Status": status}
        iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(guest_ns // 1_000_000_000)) \
            + f".{(guest_ns % 1_000_000_000) // 100:07d}Z"
        self.etw.append({"Id": event_id, "Version": 0, "Level": 4 if event_id == 410 else 2,
                         "Task": 0, "Opcode": 0, "Keywords": "0x4000000000000000",
                         "ProviderName": KERNEL_PNP_NAME,
                         "ProviderId": KERNEL_PNP_GUID.strip("{}").lower(), "RecordId": self._record,
                         "TimeCreatedFileTime": ft, "TimeCreatedUtc": iso, "ActivityId": "",
                         "RelatedActivityId": "", "ProcessId": 4, "ThreadId": 1234,
                         "Properties": list(data.values()), "Data": data, "Message": None})

    # ---- plug / unplug waits (lab.guest.windows.pnp_wait) ---------------------------------------
    def _wait_started(self, script: str, params: dict[str, str]) -> Any:
        """'started <instance>' once QEMU lists the device with every BAR mapped (the
        guest side of the hardware enumerated it); the driver's start is traced then."""
        end = time.monotonic() + seconds("driver_bound")
        while True:
            found = self._function()
            if found is not None and found[0].bars and all(b.address is not None for b in found[0].bars):
                f, rec = found
                inst = self._identity(f, rec)
                with self._lock:
                    self.seen[inst] = "Simulated PortCls audio device"
                    now = self.guest_ns()
                    self._wpp(now, f"StartDevice resources: {_ranges(f)}")
                    self._kernel_pnp(now, 410, inst)
                return f"started {inst}\r\n"
            if time.monotonic() > end:
                return (3, "not started: no device\r\n", "")
            time.sleep(0.05)

    def _wait_gone(self, script: str, params: dict[str, str]) -> Any:
        """'gone' once QEMU no longer lists the device; a driver still loaded on it saw
        the orderly removal (query-remove, remove)."""
        end = time.monotonic() + seconds("device_deleted")
        while self._function() is not None:
            if time.monotonic() > end:
                return (3, "still present: " + " ".join(self.seen) + "\r\n", "")
            time.sleep(0.05)
        with self._lock:
            if self.case.present_after:
                now = self.guest_ns()
                self._wpp(now, "IRP_MN_QUERY_REMOVE_DEVICE status=0x0")
                self._wpp(now + 1_000_000, "IRP_MN_REMOVE_DEVICE status=0x0")
        return "gone\r\n"

    # ---- WDTF (lab.guest.windows.wdtf) ----------------------------------------------------------
    def _wdtf_prepare(self, script: str, params: dict[str, str]) -> str:
        found = self._function()
        if found is None:
            return structured_stdout([{"Wdtf": "ok", "Matches": 0, "Candidates": []}])
        inst = self._identity(*found)
        return structured_stdout([{"Wdtf": "ok", "Matches": 1, "InstanceId": inst, "Edt": "ok",
                                   "WasEnabled": True, "RebootRequired": False, "Enabled": True}])

    def _wdtf_action(self, script: str, params: dict[str, str]) -> Any:
        """WDTF's answer for the case's action; the driver's messages are written as
        their handlers "run" (real time passes), stamped on the guest's clock."""
        case = self.case
        method = params.get("Method", "")
        from lab.guest.windows.wdtf import method_for
        if method != method_for(case.action):
            # the scenario asked for something the guest script does not describe
            return (1, "", f"the guest script {case.name!r} answers {method_for(case.action)}, "
                           f"not {method}")
        found = self._function()
        if found is None or self._identity(*found) != params.get("InstanceId"):
            return structured_stdout([{"Wdtf": "ok", "Matches": 0}])
        f, rec = found
        inst = self._identity(f, rec)
        self.actions.append(case.action)
        t0_host = time.time_ns()
        started_ft = self.filetime(self.guest_ns(t0_host))
        for line in sorted(case.driver, key=lambda ln: ln.at_ms):
            due = t0_host + int((WDTF_LEAD_MS + line.at_ms) * 1e6)
            delay = (due - time.time_ns()) / 1e9
            if delay > 0:
                time.sleep(delay)
            msg = line.message.format(resources=_ranges(f), moved=_moved(f))
            with self._lock:
                self._wpp(self.guest_ns(due), msg, line.thread)
        with self._lock:
            if case.start_problem is not None:
                self._kernel_pnp(self.guest_ns(), 411, inst, problem=case.start_problem,
                                 status="0xC000009A")
        rest = (t0_host + int(case.duration_ms * 1e6) - time.time_ns()) / 1e9
        if rest > 0:
            time.sleep(rest)
        elapsed = (time.time_ns() - t0_host) / 1e6
        return structured_stdout([{
            "Wdtf": "ok", "Matches": 1, "InstanceId": inst, "Edt": "ok", "Method": method,
            "Success": case.success, "Error": None, "HResult": None,
            "StartedUtcFileTime": started_ft, "ElapsedMs": round(elapsed, 3),
            "PresentAfter": case.present_after,
            "StatusAfter": case.status_after if case.present_after else None,
            "ProblemCodeAfter": case.problem_after if case.present_after else None}])


@dataclass
class SimulatedWindowsGuest(WindowsOs):
    """A Windows ``GuestOs`` whose hardware side is the built-in Linux image under real QEMU and
    whose Windows side is ``SimulatedWindowsAgent`` playing ``case`` (module docstring).

    It shares ``WindowsOs`` with ``WindowsGuest`` (waits, trace, triggers, rules), so the
    runner, observation and rules do what they do for Windows; only the boot differs.
    Unlike ``WindowsGuest`` it runs under TCG: nothing Windows runs.
    """

    case: WindowsCase
    device: str
    trace_config: WindowsTraceConfig | None = None
    image: GuestImage | None = None
    agents: list[SimulatedWindowsAgent] = field(default_factory=list)

    agent_kind = "winrm"      # type: ignore[assignment]
    guest_port = 22

    def __post_init__(self) -> None:
        self.hardware = LinuxGuest(self.image or GuestImage.load())

    def choose_accel(self, binary: str, want: str | None) -> Accel:
        return self.hardware.choose_accel(binary, want)

    def qemu_args(self, m: MachineView, files: BootFiles) -> GuestArgs:
        return self.hardware.qemu_args(m, files)

    def wait_boot(self, m: MachineView) -> None:
        self.hardware.wait_boot(m)

    def make_agent(self, m: MachineView) -> Agent:
        agent = SimulatedWindowsAgent(m, self.case, self.device, log=m.log)
        self.agents.append(agent)
        m.log(SIMULATION_NOTE)
        return agent

    def wait_agent(self, m: MachineView, agent: Agent) -> None:
        agent.wait_ready(1.0)

    def shutdown_steps(self, m: MachineView, agent: Agent | None) -> list[ShutdownStep]:
        if m.qmp is None:
            return []
        q = m.qmp
        return [("qmp-quit", lambda: q.execute("quit", timeout=2))]

    def describe(self) -> dict[str, Any]:
        return {"os": self.os, "agent": "scripted", "simulated": True, "case": self.case.name,
                "note": SIMULATION_NOTE}

    def describe_image(self) -> dict[str, Any]:
        return {"simulated": True, "note": SIMULATION_NOTE,
                "windows": {"edition": "SIMULATED (scripted guest side, not Windows)"},
                "hardware_side": self.hardware.describe_image()}

__all__ = ["DriverLine", "GUEST_BEHIND_NS", "SIMULATION_NOTE", "SimulatedWindowsAgent",
           "SimulatedWindowsGuest", "WindowsCase", "instance_id"]
