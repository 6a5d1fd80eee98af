"""Linux guest tracer: kprobes on driver and PCI-core callbacks, streamed live.

Which functions exist is discovered in the guest (``available_filter_functions``),
never assumed: ``snd_intel8x0`` in 6.1 has no ``remove`` of its own (devres frees
it), so its removal is seen through ``pci_device_remove``, which every PCI driver
goes through. Entry probes fetch the device name (``dev_name()``, i.e. the BDF) at a
byte offset read from the kernel's BTF, so probe/remove events carry the device.

Events stream over a dedicated serial port (ttyS2: ``cat trace_pipe > /dev/ttyS2``)
into memory and into ``guest-trace.txt`` line by line, each stamped with its host
receive time, so a guest that dies mid-run still leaves everything received until
then. Not over SSH: with kprobes on pci_device_probe firing while dropbear relayed
trace_pipe, the guest's SSH server stopped accepting channels (seen under TCG, 6.1),
and a trace channel must not depend on the network the lab also needs for commands.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lab.agent.ssh import SshAgent
from lab.console import ConsoleLine
from lab.errors import AgentError, LabError
from lab.events import DeviceId, Event, Kind, Source
from lab.image import GuestImage
from lab.machine import Machine
from lab.guest.linux.btf import BtfError, DeviceNameOffsets

TRACEFS = "/sys/kernel/tracing"
TRACE_TTY = "/dev/ttyS2"
# the relay (cat trace_pipe > ttyS2) runs once per boot; its pid is kept here so a later
# observation finds it (pgrep -f would match the very shell that asks)
RELAY_PID = "/tmp/rebalab-trace-relay.pid"
_DRAIN_TOKENS = itertools.count(1)
# Machine.guest_cache key: the probes armed now (start() sets it, a disarming stop() drops it)
ARMED_KEY = "kprobe-armed"
# a clock-sync token the image's responder also wrote to trace_marker
_SYNC_MARK_RE = re.compile(r"tracing_mark_write: rebalab-sync (\S+)\s*$")
GROUP = "rebalab"
# modules whose callbacks we want to probe: loaded up front so their symbols exist
AUDIO_MODULES = ("snd_hda_intel", "snd_intel8x0", "snd_ens1370")


@dataclass(frozen=True)
class ProbeSpec:
    func: str
    arg: str | None          # "device" (struct device *), "pci_dev" (struct pci_dev *), None
    enter: Kind
    exit: Kind
    role: str                # "pci-core", "driver", "hotplug"
    # a module the scenario loads itself (the test driver): probed as MOD:func, which the
    # kernel accepts before the module is loaded and re-arms on every (re)load
    module: str | None = None

    @property
    def target(self) -> str:
        return f"{self.module}:{self.func}" if self.module else self.func


PCI_CORE = (
    ProbeSpec("pci_device_probe", "device", Kind.PROBE_ENTER, Kind.PROBE_EXIT, "pci-core"),
    ProbeSpec("pci_device_remove", "device", Kind.REMOVE_ENTER, Kind.REMOVE_EXIT, "pci-core"),
)
DRIVER_FUNCS = (
    ProbeSpec("azx_probe", "pci_dev", Kind.CALL_ENTER, Kind.CALL_EXIT, "driver"),
    ProbeSpec("azx_remove", "pci_dev", Kind.CALL_ENTER, Kind.CALL_EXIT, "driver"),
    ProbeSpec("azx_probe_continue", None, Kind.CALL_ENTER, Kind.CALL_EXIT, "driver"),
    ProbeSpec("snd_intel8x0_probe", "pci_dev", Kind.CALL_ENTER, Kind.CALL_EXIT, "driver"),
    ProbeSpec("snd_audiopci_probe", "pci_dev", Kind.CALL_ENTER, Kind.CALL_EXIT, "driver"),
    ProbeSpec("rebalab_testdrv_probe", "pci_dev", Kind.CALL_ENTER, Kind.CALL_EXIT, "driver",
              module="rebalab_testdrv"),
    ProbeSpec("rebalab_testdrv_remove", "pci_dev", Kind.CALL_ENTER, Kind.CALL_EXIT, "driver",
              module="rebalab_testdrv"),
)
HOTPLUG_FUNCS = (
    ProbeSpec("acpiphp_enable_slot", None, Kind.CALL_ENTER, Kind.CALL_EXIT, "hotplug"),
    ProbeSpec("acpiphp_disable_slot", None, Kind.CALL_ENTER, Kind.CALL_EXIT, "hotplug"),
    ProbeSpec("pciehp_handle_presence_or_link_change", None, Kind.CALL_ENTER, Kind.CALL_EXIT,
              "hotplug"),
    ProbeSpec("pciehp_disable_slot", None, Kind.CALL_ENTER, Kind.CALL_EXIT, "hotplug"),
    ProbeSpec("pci_rescan_bus", None, Kind.CALL_ENTER, Kind.CALL_EXIT, "hotplug"),
    ProbeSpec("pci_stop_and_remove_bus_device_locked", None, Kind.CALL_ENTER, Kind.CALL_EXIT,
              "hotplug"),
)
ALL_SPECS = PCI_CORE + DRIVER_FUNCS + HOTPLUG_FUNCS

_LINE_RE = re.compile(
    r"^\s*(?P<task>.+?)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?:(?P<flags>\S{4,5})\s+)?"
    r"(?P<ts>\d+\.\d+):\s+(?P<event>[\w.]+):\s+\((?P<loc>[^)]*)\)\s*(?P<args>.*)$")
_ARG_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def probe_name(spec: ProbeSpec, exit_: bool) -> str:
    return f"{spec.func[:56]}_{'ret' if exit_ else 'ent'}"


def kprobe_definitions(specs: Sequence[ProbeSpec], offsets: DeviceNameOffsets | None) -> list[str]:
    """The lines written to kprobe_events (Documentation/trace/kprobetrace.rst)."""
    lines = []
    for s in specs:
        fetch = ""
        if offsets is not None and s.arg == "device":
            fetch = f" name=+0(+{offsets.device_name}(%di)):string"
        elif offsets is not None and s.arg == "pci_dev":
            fetch = f" name=+0(+{offsets.pci_dev_name}(%di)):string"
        lines.append(f"p:{GROUP}/{probe_name(s, False)} {s.target}{fetch}")
        lines.append(f"r:{GROUP}/{probe_name(s, True)} {s.target} ret=$retval:s32")
    return lines


class TraceParser:
    """trace_pipe lines -> Events; pairs entry and return per (pid, function)."""

    def __init__(self, specs: Sequence[ProbeSpec]) -> None:
        self.by_event = {}
        for s in specs:
            self.by_event[probe_name(s, False)] = (s, False)
            self.by_event[probe_name(s, True)] = (s, True)
        self._open: dict[tuple[int, str], list[Event]] = {}
        self.unparsed = 0

    def parse(self, line: str, t_recv_ns: int) -> Event | None:
        m = _LINE_RE.match(line)
        if not m:
            if line.strip() and not line.startswith("#"):
                self.unparsed += 1
            return None
        hit = self.by_event.get(m["event"])
        if hit is None:
            return None
        spec, is_exit = hit
        secs, frac = m["ts"].split(".")
        g_ns = int(secs) * 1_000_000_000 + int(frac.ljust(9, "0")[:9])
        args = {k: v.strip('"') for k, v in _ARG_RE.findall(m["args"])}
        pid = int(m["pid"])
        data: dict[str, object] = {"func": spec.func, "role": spec.role, "pid": pid,
                                   "cpu": int(m["cpu"]), "task": m["task"].strip()}
        key = (pid, spec.func)
        if not is_exit:
            name = args.get("name")
            dev = DeviceId(bdf=name) if name and _BDF_RE.match(name) else None
            if name:
                data["device_name"] = name
            ev = Event(t_recv_ns, Source.GUEST_KPROBE, spec.enter, dev, data=data, t_guest_ns=g_ns)
            self._open.setdefault(key, []).append(ev)
            return ev
        ret = args.get("ret")
        data["ret"] = int(ret, 0) if ret and re.fullmatch(r"-?(0x)?[0-9a-fA-F]+", ret) else ret
        stack = self._open.get(key)
        start = stack.pop() if stack else None
        dur = (g_ns - start.t_guest_ns) if start and start.t_guest_ns is not None else None
        if start is None:
            data["unpaired"] = True
        return Event(t_recv_ns, Source.GUEST_KPROBE, spec.exit, start.device if start else None,
                     duration_ns=dur, data=data, t_guest_ns=g_ns)


class LinuxTracer:
    """Start kprobes in the guest, stream them, stop and clean up."""

    def __init__(self, m: Machine, image: GuestImage, *, specs: Sequence[ProbeSpec] = ALL_SPECS,
                 preload: Sequence[str] = AUDIO_MODULES) -> None:
        self.m = m
        self.image = image          # its vmlinux (BTF offsets) and the modules it ships
        self.wanted = tuple(specs)
        self.preload = tuple(preload)
        self.active: tuple[ProbeSpec, ...] = ()
        self.missing: tuple[str, ...] = ()
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.parser: TraceParser | None = None
        self._drain_token: str | None = None
        self._drained = threading.Event()
        # clock-sync tokens seen on the trace port (the image mirrors them to trace_marker)
        self._synced: set[str] = set()
        self._sync_seen = threading.Condition()

    def _offsets(self) -> DeviceNameOffsets | None:
        import os
        if os.environ.get("REBALAB_NO_FETCH"):
            return None
        try:
            return DeviceNameOffsets.from_vmlinux(self.image.file("vmlinux"))
        except (OSError, BtfError) as exc:
            self.m.run.log(f"kprobe device names unavailable: {exc}")
            return None

    def _shipped_modules(self) -> set[str]:
        """Module names the built image ships (manifest ``modules.included``)."""
        try:
            included = (self.image.manifest.get("modules") or {}).get("included") or []
        except (LabError, AttributeError):
            return set()
        return {str(n).replace("-", "_") for n in included}

    def start(self) -> LinuxTracer:
        agent = self.m.agent
        if agent is None:
            raise LabError("the guest agent is not connected")
        if self._armed_by_restore():
            return self
        sh = agent.shell
        # every SSH command costs ~0.2 s under TCG, and this runs per iteration: the
        # preload and the module list go in one, the set-up and the relay in another
        load = " ; ".join(f"modprobe {sh.quote(mod)}" for mod in self.preload)
        r = agent.run((f"{{ {load} ; }} || {{ echo 'modprobe failed' >&2; exit 3; }}; "
                       if load else "") + "cut -d' ' -f1 /proc/modules | sort")
        r.check()
        # ask only for the names we want: the whole list is ~50,000 lines to ship over SSH
        wanted = " ".join(f"-e {sh.quote(s.func)}" for s in self.wanted)
        # the kernel builds that list on every read (~1 s under TCG): ask once per boot
        # and set of loaded modules, which is all that changes it
        modules = r.stdout
        cache = getattr(self.m, "guest_cache", {})
        key = ("kprobe-functions", modules)
        if key not in cache:
            cache[key] = frozenset(agent.run(
                f"cut -d' ' -f1 {TRACEFS}/available_filter_functions | "
                f"grep -x -F {wanted}").stdout.split())
        have = set(cache[key])
        # a module's functions are in the list only while it is loaded; the image knows
        # which modules it ships, so probe those that exist there whether loaded or not
        shipped = self._shipped_modules()
        self.active = tuple(s for s in self.wanted if s.func in have
                            or (s.module is not None and s.module in shipped))
        self.missing = tuple(s.func for s in self.wanted if s not in self.active)
        if not self.active:
            raise LabError("none of the traced functions exist in the guest kernel")
        defs = kprobe_definitions(self.active, self._offsets())
        # the probes stay defined between observations of one boot (stop() disables
        # them): defining ~30 kprobes costs about a second under TCG
        same = cache.get("kprobe-defs") == defs
        define = [] if same else [
            "echo > kprobe_events",   # the lab is the only kprobe user in its guest
            *(f"echo {sh.quote(d)} >> kprobe_events || echo failed: {sh.quote(d)} >&2" for d in defs)]
        script = "\n".join([
            f"cd {TRACEFS} || exit 1",
            "echo 0 > tracing_on",
            f"echo 0 > events/{GROUP}/enable 2>/dev/null",
            *define,
            # printk stamps with local_clock(), which is what the "global" trace clock reads;
            # "local" is raw sched_clock() and drifts from printk by ms under TCG
            "echo global > trace_clock",
            "echo > trace",
            f"echo 1 > events/{GROUP}/enable",
            "echo 1 > tracing_on",
            # the relay to the trace port, unless this boot's is still running
            f"if ! {{ [ -f {RELAY_PID} ] && kill -0 \"$(cat {RELAY_PID})\" 2>/dev/null; }}; then",
            f"  stty -F {TRACE_TTY} raw -echo -opost 115200 || exit 4",
            f"  (setsid sh -c 'echo $$ > {RELAY_PID}; exec cat {TRACEFS}/trace_pipe > {TRACE_TTY}'"
            " </dev/null >/dev/null 2>&1 &)",
            "fi",
            "echo started",
        ])
        r = agent.run(script, idempotent=True) if isinstance(agent, SshAgent) else agent.run(script)
        if not r.ok or "failed:" in r.stderr or "started" not in r.stdout:
            cache.pop("kprobe-defs", None)
            err = agent.run(f"cat {TRACEFS}/error_log").stdout.strip()[-400:]
            raise AgentError(f"could not set up kprobes: {r.stderr.strip()[-300:]} {err}")
        cache["kprobe-defs"] = defs
        # armed until stop() disarms them: a restore point saved meanwhile holds them armed
        cache[ARMED_KEY] = self._armed_record()
        self._listen()
        self.m.run.log(f"kprobes on {', '.join(s.func for s in self.active)}"
                       + (f"; not in this kernel: {', '.join(self.missing)}" if self.missing else ""))
        return self

    def _armed_record(self) -> dict[str, tuple[str, ...]]:
        return {"wanted": tuple(s.func for s in self.wanted), "preload": self.preload,
                "active": tuple(s.func for s in self.active), "missing": self.missing}

    def _armed_by_restore(self) -> bool:
        """A VM restored from a point saved while these probes were armed has them armed
        and its relay running (the guest's memory is the point's): nothing to do in the
        guest. Re-arming would cost ~0.7 s a restored iteration under TCG, whose translation
        cache starts cold in the new QEMU."""
        if getattr(self.m, "restore", None) is None:
            return False
        armed = getattr(self.m, "guest_cache", {}).get(ARMED_KEY)
        if not isinstance(armed, dict) or armed.get("wanted") != tuple(s.func for s in self.wanted) \
                or armed.get("preload") != self.preload:
            return False
        active = set(armed.get("active") or ())
        self.active = tuple(s for s in self.wanted if s.func in active)
        self.missing = tuple(armed.get("missing") or ())
        if not self.active:
            return False
        self._listen()
        self.m.run.log(f"kprobes armed since the restore point on {len(self.active)} functions")
        return True

    def _listen(self) -> None:
        self.parser = TraceParser(self.active)
        port = self.m.trace_port
        if port is None:
            raise LabError("the machine has no trace serial port")
        port.listeners.append(self._on_line)

    @property
    def drains_by_sync(self) -> bool:
        """Whether the image mirrors clock-sync tokens into the trace buffer
        (images/linux/rootfs/init), so a token seen on the trace port is a drain marker."""
        serial = self.image.manifest.get("serial") if isinstance(self.image.manifest, dict) else None
        return bool(isinstance(serial, dict) and serial.get("sync_trace_marker"))

    def _on_line(self, line: ConsoleLine) -> None:
        token = self._drain_token
        if token is not None and line.text.rstrip().endswith(token):
            self._drained.set()
            return
        mark = _SYNC_MARK_RE.search(line.text)
        if mark is not None:
            with self._sync_seen:
                self._synced.add(mark[1])
                self._sync_seen.notify_all()
            return
        if self._stop.is_set() or self.parser is None:
            return
        ev = self.parser.parse(line.text, line.t_host_ns)
        if ev is not None:
            with self._lock:
                self.events.append(ev)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def wait_for(self, pred: "Callable[[Event], bool]", timeout: float, what: str) -> Event:
        from lab.errors import DeadlineExceeded
        end = time.monotonic() + timeout
        seen = 0
        while True:
            evs = self.snapshot()
            for ev in evs[seen:]:
                if pred(ev):
                    return ev
            seen = len(evs)
            if time.monotonic() > end:
                raise DeadlineExceeded(what, timeout, evs[-1].kind.value if evs else None)
            time.sleep(0.005)

    def stop(self, *, drain_s: float = 2.0, synced: str | None = None) -> list[Event]:
        """Stop tracing once everything recorded has arrived.

        The probes are disabled and a marker is written to trace_marker; trace_pipe
        hands out events in timestamp order, so when the marker comes through the
        relay every event before it has too. No fixed sleep: under load a sleep is
        either too short (events lost) or wasted. The relay stays for the next
        observation of this boot.

        ``synced``: a clock-sync token the guest has echoed, on a machine whose state is
        thrown away next (``Machine.disposable``). The image also writes each token to
        trace_marker, so the token on the trace port is the drain marker, and the probes
        need no disarming: no SSH command at all (~0.4 s an iteration under TCG).
        """
        agent = self.m.agent
        if synced is not None and getattr(self.m, "disposable", False) and self.drains_by_sync:
            if self._wait_synced(synced, drain_s):
                return self._detach()
            self.m.run.log(f"kprobe trace: sync token {synced} did not come through the "
                           f"trace port within {drain_s:g} s; draining over the agent")
        # a frozen QEMU (SIGSTOP) answers nothing: each SSH channel open would wait out
        # its own deadline (26 s seen) before the lab could say why
        alive = self.m.process is not None and self.m.process.responsive()
        getattr(self.m, "guest_cache", {}).pop(ARMED_KEY, None)
        if alive and agent is not None:
            token = f"rebalab-drain-{next(_DRAIN_TOKENS)}"
            self._drained.clear()
            self._drain_token = token
            try:
                agent.run(f"cd {TRACEFS} && echo 0 > events/{GROUP}/enable && "
                          f"echo {token} > trace_marker", timeout=5)
                if not self._drained.wait(drain_s):
                    self.m.run.log(f"kprobe trace: the drain marker did not arrive within "
                                   f"{drain_s:g} s; events just before the end may be missing")
            except LabError as exc:
                self.m.run.log(f"kprobe trace: could not stop cleanly: {exc}")
        return self._detach()

    def _wait_synced(self, token: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._sync_seen:
            while token not in self._synced:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._sync_seen.wait(left)
        return True

    def _detach(self) -> list[Event]:
        self._stop.set()
        if self.m.trace_port is not None and self._on_line in self.m.trace_port.listeners:
            self.m.trace_port.listeners.remove(self._on_line)
        return self.snapshot()


from collections.abc import Callable  # noqa: E402  (used in a string annotation above)
