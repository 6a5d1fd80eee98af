"""Rebalance triggers, and the host's verdict on what each one really moved.

Each trigger is a named operation usable from code, the CLI and scenarios. Around it
the lab takes ``query-pci`` snapshots and reads QEMU's own trace (BAR mappings and
command-register decode bits), so the verdict — did the audio device's resources
move, how long was its decode off, did the guest driver rebind — comes from the
virtual hardware, not from what the guest claims.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from collections.abc import Sequence
from typing import Any

from lab import operations as ops
from lab.deadline import poll, seconds
from lab.errors import LabError
from lab.events import DeviceId, Event, Kind, Source
from lab.machine import Machine
from lab.pci_state import Change, PciSnapshot, diff
from lab.tracers.qemu_trace import QemuTraceTail
from vdevice.catalog import Role, get_model
from vdevice.sizes import fmt_size
from vdevice.topology import Device, Placement
from vdevice.windows import size_to_force_rebalance

TRIGGERS = ("pressure", "rescan", "cpu-hotplug", "reconfigure", "resize", "wdtf")
RUNTIME_TRACE = ("pci_cfg_write",)


class Unsupported(LabError):
    """The trigger cannot work with this QEMU/device; said plainly, detected not assumed."""


@dataclass
class RebalanceReport:
    trigger: str
    device: str
    started_ns: int
    ended_ns: int = 0
    durations_ms: dict[str, float] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    trace: list[Event] = field(default_factory=list)
    audio_moved: bool = False
    outage_ms: float | None = None        # decode off -> on of the audio device (hardware view)
    unmapped_ms: float | None = None      # BAR unmapped -> mapped again
    driver_before: str | None = None
    driver_after: str | None = None
    rebound: bool | None = None
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        moved = "moved" if self.audio_moved else "did not move"
        parts = [f"{self.trigger}: {self.device}'s resources {moved}"]
        if self.outage_ms is not None:
            parts.append(f"decode off for {self.outage_ms:.1f} ms")
        if self.rebound is not None:
            parts.append("driver rebound" if self.rebound else "driver NOT rebound")
        if not self.audio_moved and self.changes:
            parts.append(f"{len(self.changes)} other change(s)")
        return "; ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {"trigger": self.trigger, "device": self.device, "started_ns": self.started_ns,
                "ended_ns": self.ended_ns, "durations_ms": self.durations_ms,
                "changes": [c.to_json() for c in self.changes],
                "trace": [e.to_json() for e in self.trace], "audio_moved": self.audio_moved,
                "outage_ms": self.outage_ms, "unmapped_ms": self.unmapped_ms,
                "driver_before": self.driver_before, "driver_after": self.driver_after,
                "rebound": self.rebound, "notes": self.notes, "details": self.details,
                "summary": self.summary()}


# ---- evidence ------------------------------------------------------------------------

def snapshot(m: Machine) -> PciSnapshot:
    return PciSnapshot.from_query_pci(ops.query_pci(m), time.time_ns())


class Evidence:
    """Snapshots and trace tail around one operation."""

    def __init__(self, m: Machine) -> None:
        self.m = m
        enable_runtime_trace(m)
        self.tail = QemuTraceTail(m.artifacts / "qemu-trace.log")
        self.tail.read_new()            # skip what happened before
        self.before = snapshot(m)

    def finish(self, report: RebalanceReport) -> None:
        after = snapshot(self.m)
        report.changes = diff(self.before, after)
        # QEMU flushes its log per line; a short settle lets the last lines land
        time.sleep(0.05)
        report.trace = self.tail.read_new()
        for ev in report.trace:
            self.m.run.record(ev)
        fa, fb = self.before.find(report.device), after.find(report.device)
        report.audio_moved = any(c.device == report.device and c.what.startswith("BAR")
                                 and c.old_address != c.new_address for c in report.changes)
        report.details["bdf_before"] = fa.bdf if fa else None
        report.details["bdf_after"] = fb.bdf if fb else None
        names = {get_model(self.m.topology.device(report.device).model).driver} \
            if report.device in self.m.topology.device_ids() else set()
        bdfs = {b for b in (report.details["bdf_before"], report.details["bdf_after"]) if b}
        mine = [e for e in report.trace if e.device and e.device.bdf in bdfs
                and (not names or e.data.get("qemu_name") in names)]
        report.outage_ms = _outage_ms(mine, Kind.DECODE_OFF, Kind.DECODE_ON)
        report.unmapped_ms = _outage_ms(mine, Kind.BAR_UNMAPPED, Kind.BAR_MAPPED)
        report.details["decode_toggles"] = sum(1 for e in mine if e.kind == Kind.DECODE_OFF)
        report.ended_ns = time.time_ns()
        for c in report.changes:
            self.m.run.record(Event(report.ended_ns, Source.HOST_LAB, Kind.RESOURCE_MOVED,
                                    DeviceId(qom=c.device if not c.device.startswith("0000:")
                                             else None, bdf=c.bdf),
                                    data={"trigger": report.trigger, **c.to_json()}))
        self.m.run.write_json(f"pci/{report.trigger}-{report.started_ns}.json",
                              {"before": self.before.to_json(), "after": after.to_json()})


def _outage_ms(events: list[Event], off: Kind, on: Kind) -> float | None:
    """From the first ``off`` to the last ``on`` after it: the whole window in which the
    device was not (fully) reachable, including the brief toggles of BAR sizing.
    None when nothing went off; the span to the last event when it never came back."""
    t0 = next((e.t_host_ns for e in events if e.kind == off), None)
    if t0 is None:
        return None
    ons = [e.t_host_ns for e in events if e.kind == on and e.t_host_ns >= t0]
    return (ons[-1] - t0) / 1e6 if ons else None


def enable_runtime_trace(m: Machine) -> None:
    """Make sure the trace events the verdict needs are on (a machine may have been
    started with fewer); QMP switches them at run time without a restart."""
    assert m.qmp is not None
    if getattr(m, "_runtime_trace_on", False):
        return
    for name in RUNTIME_TRACE:
        state = m.qmp.execute("trace-event-get-state", {"name": name})
        if not any(s.get("state") == "enabled" for s in state):
            m.qmp.execute("trace-event-set-state", {"name": name, "enable": True})
    m._runtime_trace_on = True  # type: ignore[attr-defined]


def _windows(m: Machine) -> bool:
    return getattr(getattr(m, "guest", None), "os", "linux") == "windows"


def _driver(m: Machine, dev_id: str) -> str | None:
    """The Linux driver bound to the device (sysfs). A Windows guest's device state comes
    from Get-PnpDevice in the trigger itself (``_windows_state``), never from sysfs."""
    if _windows(m):
        return None
    bdf = ops.device_bdf_from_qemu(m, dev_id)
    return ops.guest_driver(m, bdf) if bdf else None


def _windows_state(m: Machine, hardware_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Present devnodes matching ``hardware_ids`` (Get-PnpDevice: instance id, status,
    problem code, driver INF), as JSON for the report."""
    from lab.tracers.windows.common import run_structured
    from lab.windows import driver_check

    assert m.agent is not None
    found = driver_check.parse_state(run_structured(m.agent, driver_check.state_script(hardware_ids)))
    return [{"instance_id": d.instance_id, "status": d.status, "problem_code": d.problem_code,
             "problem": d.problem, "driver_inf": d.driver_inf} for d in found]


def _begin(m: Machine, trigger: str, dev_id: str) -> tuple[RebalanceReport, Evidence]:
    m.require_running()
    if trigger != "cpu-hotplug" and dev_id not in m.present:
        raise LabError(f"{dev_id} is not plugged in; plug it before the {trigger} rebalance")
    rep = RebalanceReport(trigger, dev_id, time.time_ns())
    ev = Evidence(m)
    rep.driver_before = _driver(m, dev_id) if dev_id in m.present else None
    return rep, ev


def _end(m: Machine, rep: RebalanceReport, ev: Evidence) -> RebalanceReport:
    ev.finish(rep)
    # one span per operation: the rules name violations by the phase they fall in
    m.run.record(Event(rep.started_ns, Source.HOST_LAB, Kind.OPERATION, DeviceId(qom=rep.device),
                       duration_ns=rep.ended_ns - rep.started_ns,
                       data={"name": f"rebalance:{rep.trigger}", "summary": rep.summary()}))
    m.run.log(rep.summary())
    return rep


# ---- triggers ------------------------------------------------------------------------

def rescan(m: Machine, dev_id: str, *, remove: str = "port") -> RebalanceReport:
    """Guest-side rebalance on Linux: remove the device's root port, rescan the bus.

    Linux never moves a running device's BARs for a sibling (PLATFORM.md); removing the
    port subtree and rescanning makes it assign windows and BARs afresh, with driver
    unbind and rebind, which is the closest Linux analogue of a Windows rebalance.
    """
    if remove not in ("port", "device", "none"):
        raise LabError(f"rescan: remove must be port, device or none, not {remove!r}")
    rep, ev = _begin(m, "rescan", dev_id)
    assert m.agent is not None
    dev = m.topology.device(dev_id)
    root = m.topology.root_port_of(dev.port)
    target = root if remove == "port" else dev_id
    port_bdf = ops.device_bdf_from_qemu(m, target)
    if port_bdf is None:
        raise LabError(f"{target} not found in query-pci")
    model = dev.catalog()
    sh = m.agent.shell
    t0 = time.monotonic()
    if remove != "none":
        # idempotent by construction: a removed device has no `remove` file, so sending
        # this again after a connection lost mid-command (dropbear 2022.83 drops sessions;
        # the command may have run) finds it gone and succeeds, instead of failing the
        # iteration with "nonexistent directory"
        node = sh.quote(f"/sys/bus/pci/devices/{port_bdf}/remove")
        m.agent.run(f"if [ -e {node} ]; then echo 1 > {node}; fi", idempotent=True).check()
    rep.durations_ms["remove"] = (time.monotonic() - t0) * 1e3
    m.agent.run("echo 1 > /sys/bus/pci/rescan", idempotent=True).check()   # twice is harmless
    rep.durations_ms["rescan"] = (time.monotonic() - t0) * 1e3
    if model.linux_driver:
        bdf = poll(f"{dev_id} to reappear in query-pci after rescan", seconds("driver_bound"),
                   lambda: ops.device_bdf_from_qemu(m, dev_id))
        ok = m.agent.run(ops._waiter_bound(m, bdf, model.linux_driver, seconds("driver_bound")),
                         idempotent=True,
                         timeout=seconds("driver_bound") + 5)
        rep.rebound = ok.ok
        rep.durations_ms["rebound"] = (time.monotonic() - t0) * 1e3
    rep.driver_after = _driver(m, dev_id)
    rep.details["removed"] = {"what": remove, "id": target, "bdf": port_bdf}
    return _end(m, rep, ev)


def pressure(m: Machine, dev_id: str, *, size: int | None = None, placement: str = "sibling",
             model: str = "pci-testdev", pressure_id: str | None = None,
             port: str | None = None) -> RebalanceReport:
    """Hot-plug a device whose BAR does not fit its port's window, next to ``dev_id``.

    In native mode Linux retries ("No. 2 try to assign unassigned res"), releasing and
    re-assigning the port window; in ACPI mode the BAR stays unassigned. The report
    says which happened, from QEMU's view of the pressure device's BAR.
    """
    if get_model(model).role != Role.PRESSURE:
        raise LabError(f"{model} is not a pressure device (use pci-testdev or ivshmem-plain)")
    rep, ev = _begin(m, "pressure", dev_id)
    # the scenario model's default id (RebalancePressure.pressure_id), one name everywhere
    pressure_id = pressure_id or f"{dev_id}-pressure"
    port = port or _pressure_port(m, dev_id, placement)
    win = ev.before.find(port)
    if size is None:
        if win is None or win.windows is None:
            raise LabError(f"port {port} has no bridge windows in query-pci")
        size = size_to_force_rebalance(win.windows.prefetchable)
        rep.notes.append(f"auto size {fmt_size(size)}: larger than {port}'s prefetchable window "
                         f"{win.windows.prefetchable}")
    pdev = Device(pressure_id, model, port, Placement.HOT, size=size)
    t0 = time.monotonic()
    ops.plug(m, pdev, wait_bound=False)
    rep.durations_ms["device_add"] = (time.monotonic() - t0) * 1e3
    assert m.agent is not None
    bdf = ops.device_bdf_from_qemu(m, pressure_id)
    rep.details.update({"pressure_device": pressure_id, "pressure_port": port,
                        "pressure_size": size, "hotplug_mode": m.topology.hotplug_mode.value})
    if _windows(m):
        return _pressure_windows(m, rep, ev, dev_id, pressure_id, model, t0)
    agent = m.agent
    # the guest enumerates the newcomer and, in native mode, retries the assignment;
    # wait until its sysfs node exists, then until the BAR is settled (assigned or not)
    poll(f"{pressure_id} to appear in the guest", seconds("driver_bound"),
         lambda: True if agent.run_argv(["test", "-e", f"/sys/bus/pci/devices/{bdf}"]).ok
         else None)
    rep.durations_ms["guest_sees"] = (time.monotonic() - t0) * 1e3
    bar_index = 2 if model in ("pci-testdev", "ivshmem-plain") else 0
    assigned = _guest_bar_assigned(m, bdf, bar_index)
    rep.details["pressure_bar_assigned"] = assigned
    rep.notes.append(f"pressure BAR{bar_index} ({fmt_size(size)}) "
                     + ("was assigned: the guest made room" if assigned else
                        "stayed unassigned: the guest did not rebalance for it"))
    rep.driver_after = _driver(m, dev_id)
    if rep.driver_before:
        rep.notes.append(f"{dev_id}'s driver {'is still bound' if rep.driver_after else 'is NOT bound'}"
                         f" ({rep.driver_after or rep.driver_before})")
    return _end(m, rep, ev)


def _pressure_windows(m: Machine, rep: RebalanceReport, ev: Evidence, dev_id: str,
                      pressure_id: str, model: str, t0: float) -> RebalanceReport:
    """The guest half of ``pressure`` on Windows: no sysfs, only the host's query-pci diff
    (``Evidence``) and the PnP state of both devices from Get-PnpDevice.

    Windows hands resources to a device it starts (the arbiter assigns them on the way
    to IRP_MN_START_DEVICE); pci-testdev/ivshmem have no in-box driver, so the newcomer
    is expected to sit with a problem code and take nothing, in which case nothing
    rebalances (unverified on a real guest: the report shows what happened).
    """
    pressure_hwids = tuple(h for h in (get_model(model).windows_hwid,) if h)
    audio = m.topology.device(dev_id).catalog()
    audio_hwids = tuple(h for h in (audio.windows_hwid,) if h)

    if not pressure_hwids:
        raise LabError(f"{model} has no Windows hardware id in the catalog: the guest's view of "
                       "it cannot be checked")

    def seen() -> list[dict[str, Any]] | None:
        found = _windows_state(m, pressure_hwids)
        return found or None

    # each probe is a PowerShell launch in the guest: at most one a second
    state = poll(f"{pressure_id} ({', '.join(pressure_hwids)}) to appear in the guest's "
                 "Get-PnpDevice", seconds("driver_bound"), seen, ceiling=1.0)
    rep.durations_ms["guest_sees"] = (time.monotonic() - t0) * 1e3
    after = _windows_state(m, audio_hwids) if audio_hwids else []
    rep.details.update({"pressure_guest_state": state, "device_guest_state": after})
    for d in state:
        what = (f"problem code {d['problem_code']} ({d['problem']})" if d["problem_code"]
                else f"status {d['status']}")
        rep.notes.append(f"pressure device {d['instance_id']}: {what} in the guest"
                         + ("; a device Windows does not start takes no resources, so "
                            "nothing had to move" if d["problem_code"] else ""))
    for d in after:
        rep.notes.append(f"{dev_id} ({d['instance_id']}): status {d['status']}"
                         + (f", problem code {d['problem_code']} ({d['problem']})"
                            if d["problem_code"] else ""))
    return _end(m, rep, ev)


def _guest_bar_assigned(m: Machine, bdf: str | None, bar: int) -> bool:
    """Did the guest give the BAR an address? Read from sysfs ``resource``.

    QEMU maps a BAR only while the device's decode is on, and a pressure device has no
    driver to turn it on, so the host cannot see this one; the host evidence for
    pressure is the bridge window change, which the diff reports.
    """
    assert m.agent is not None
    if bdf is None:
        return False
    r = m.agent.run_argv(["cat", f"/sys/bus/pci/devices/{bdf}/resource"])
    lines = r.stdout.splitlines() if r.ok else []
    if len(lines) <= bar:
        return False
    start, end, _flags = (int(x, 16) for x in lines[bar].split()[:3])
    return start != 0 and end > start


def _pressure_port(m: Machine, dev_id: str, placement: str) -> str:
    topo = m.topology
    dev = topo.device(dev_id)
    taken = {d.port for d in topo.devices if d.id in m.present} | \
        {sw.port for sw in topo.switches}
    if placement == "sibling":
        for sw in topo.switches:
            if any(p.id == dev.port for p in sw.downstream):
                for p in sw.downstream:
                    if p.id not in taken:
                        return p.id
        placement = "root"   # not behind a switch: the sibling is another root port
    if placement in ("root", "same-root"):
        for p in topo.ports:
            if p.id not in taken:
                return p.id
    raise LabError(f"no free port for a pressure device ({placement}) next to {dev_id}")


def reconfigure(m: Machine, dev_id: str, *, model: str | None = None,
                props: dict[str, str] | None = None) -> RebalanceReport:
    """Replace the device at its port by another model or property set, both halves timed."""
    rep, ev = _begin(m, "reconfigure", dev_id)
    old = m.topology.device(dev_id)
    new = replace(old, model=model or old.model, props=dict(props or {}), codec=None,
                  placement=Placement.HOT)
    new.catalog()
    t0 = time.monotonic()
    u = ops.unplug(m, dev_id)
    rep.durations_ms["unplug"] = (time.monotonic() - t0) * 1e3
    t1 = time.monotonic()
    p = ops.plug(m, new)
    rep.durations_ms["plug"] = (time.monotonic() - t1) * 1e3
    rep.durations_ms["total"] = (time.monotonic() - t0) * 1e3
    rep.details.update({"from": {"model": old.model, "props": dict(old.props)},
                        "to": {"model": new.model, "props": dict(new.props)},
                        "unplug": u.to_json(), "plug": p.to_json()})
    rep.driver_after = _driver(m, dev_id)
    rep.rebound = rep.driver_after == new.catalog().linux_driver
    return _end(m, rep, ev)


def cpu_hotplug(m: Machine, dev_id: str | None = None) -> RebalanceReport:
    """Hot-plug one vCPU (Windows is known to rebalance on it; Linux onlines the CPU)."""
    assert m.qmp is not None and m.agent is not None
    rep, ev = _begin(m, "cpu-hotplug", dev_id or "guest")
    slots = m.qmp.execute("query-hotpluggable-cpus")
    free = [s for s in slots if "qom-path" not in s]
    if not free:
        raise Unsupported(f"no free vCPU slot: the topology has cpus={m.topology.cpus}, "
                          f"max_cpus={m.topology.max_cpus}; raise max_cpus")
    slot = sorted(free, key=lambda s: tuple(sorted(s["props"].items())))[0]
    cpu_id = f"cpu{len(slots) - len(free)}"
    if _windows(m):
        # the scenario loader refused this on Windows 10/11 (lab.scenario.loader,
        # CPU_HOTPLUG_CLIENT): here a Windows Server guest; the host's diff is the evidence
        t0 = time.monotonic()
        m.qmp.execute("device_add", {"driver": slot["type"], "id": cpu_id, **slot["props"]})
        rep.durations_ms["device_add"] = (time.monotonic() - t0) * 1e3
        rep.details.update({"cpu": cpu_id, "props": slot["props"]})
        rep = _end(m, rep, ev)
        rep.notes.append("Windows Server: a processor hot-add makes a dynamically partitionable "
                         "server rebalance; " + (f"{len(rep.changes)} PCI resource change(s) seen"
                                                 if rep.changes else "no PCI resource moved"))
        return rep
    n_before = _guest_cpus(m)
    t0 = time.monotonic()
    m.qmp.execute("device_add", {"driver": slot["type"], "id": cpu_id, **slot["props"]})
    rep.durations_ms["device_add"] = (time.monotonic() - t0) * 1e3
    n = poll("the guest to see the new CPU", seconds("driver_bound"),
             lambda: (lambda c: c if c > n_before else None)(_guest_cpus(m)))
    # Linux does not online hot-added CPUs by itself without a udev rule: do it like udev
    m.agent.run(f"for c in /sys/devices/system/cpu/cpu[0-9]*/online; do "
                f"[ \"$(cat $c)\" = 1 ] || echo 1 > $c; done").check()
    online = m.agent.run("cat /sys/devices/system/cpu/online").stdout.strip()
    rep.durations_ms["online"] = (time.monotonic() - t0) * 1e3
    rep.details.update({"cpu": cpu_id, "props": slot["props"], "guest_cpus": n,
                        "guest_online": online})
    rep.notes.append(f"guest sees {n} CPUs (online: {online})")
    rep = _end(m, rep, ev)
    if not rep.changes:
        rep.notes.append("no PCI resource moved (Linux does not rebalance on CPU hot-plug)")
    return rep


def _guest_cpus(m: Machine) -> int:
    assert m.agent is not None
    r = m.agent.run("ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l")
    return int(r.stdout.strip() or 0)


def resize(m: Machine, dev_id: str) -> RebalanceReport:
    """Resizable BAR: detected from the device's PCIe extended capabilities in the guest."""
    assert m.agent is not None
    bdf = ops.device_bdf_from_qemu(m, dev_id)
    if bdf is None:
        raise LabError(f"{dev_id} is not present")
    caps = _ext_caps(m, bdf)
    if 0x15 not in caps:
        model = m.topology.device(dev_id).model
        raise Unsupported(
            f"resize is not possible: {model} in QEMU {m.inventory.version_str} has no Resizable "
            f"BAR capability (PCIe extended capability 0x15); checked the guest's config space of "
            f"{bdf} (extended capabilities found: "
            f"{', '.join(f'{c:#x}' for c in caps) or 'none, conventional PCI function'})")
    raise Unsupported("this device has a Resizable BAR capability, but resizing through it "
                      "is not implemented yet")


def _ext_caps(m: Machine, bdf: str) -> list[int]:
    assert m.agent is not None
    r = m.agent.run_argv(["od", "-An", "-v", "-tx4", "-j256", "-N3840",
                          f"/sys/bus/pci/devices/{bdf}/config"])
    words = [int(w, 16) for w in r.stdout.split()] if r.ok else []
    caps: list[int] = []
    off = 0x100
    while words and 0x100 <= off < 0x1000 and len(caps) < 64:
        hdr = words[(off - 0x100) // 4]
        if hdr in (0, 0xFFFFFFFF):
            break
        caps.append(hdr & 0xFFFF)
        off = (hdr >> 20) & 0xFFC
    return caps


def wdtf(m: Machine, dev_id: str, *, action: str, target: str = "pci",
         instance: str | None = None) -> RebalanceReport:
    """Windows: WDTF's Enhanced Device Testing puts ``dev_id`` through ``action``
    (``lab.windows.wdtf``: restart, rebalance, cancel-stop, fail-restart).

    The EDT filter is attached first (its ``Enable`` restarts the device, so it runs
    before the evidence starts); then the action runs inside ``query-pci`` snapshots and
    QEMU's trace. For ``rebalance`` the host's diff is the proof: WDTF's success flag
    says the request went through, a BAR of ``dev_id`` that moved says Windows really
    gave the device new resources, and the report says plainly when none moved (the
    stop is not guaranteed: another driver may veto the query-stop).
    """
    from lab.windows import wdtf as W

    if not _windows(m):
        raise Unsupported("the wdtf trigger drives WDTF in a Windows guest; on Linux use rescan")
    method = W.method_for(action)
    dev = m.topology.device(dev_id)
    model = dev.catalog()
    if target == "function":
        hwids = model.function_hwids
        if not hwids:
            raise LabError(f"{dev_id} ({model.driver}) has no function devnode: only an HD Audio "
                           "controller has one (use target: pci)")
    elif target == "pci":
        hwids = tuple(h for h in (model.windows_hwid,) if h)
        if not hwids:
            raise LabError(f"{model.driver} has no Windows hardware id in the catalog")
    else:
        raise LabError(f"wdtf target must be pci or function, not {target!r}")
    if dev_id not in m.present:
        raise LabError(f"{dev_id} is not plugged in; plug it before the wdtf {action}")
    assert m.agent is not None
    prepared = W.prepare(m.agent, W.WdtfTarget(hardware_ids=hwids, instance_id=instance))
    rep, ev = _begin(m, f"wdtf-{action}", dev_id)
    outcome = W.run_action(m.agent, action, prepared.instance_id)
    rep.durations_ms[method] = outcome.elapsed_ms if outcome.elapsed_ms is not None else \
        (time.time_ns() - rep.started_ns) / 1e6
    rep.details.update({"wdtf": outcome.to_json(), "target": target,
                        "edt_enabled_by_lab": prepared.enabled_now})
    if prepared.enabled_now:
        rep.notes.append(f"EDT filter attached to {prepared.instance_id} (Enable restarted the "
                         "device before the evidence began)")
    rep.notes.append(outcome.summary())
    rep.notes.append(f"expected: {W.EXPECTED[action]}")
    rep = _end(m, rep, ev)
    moved = [c for c in rep.changes if c.device == dev_id and c.what.startswith("BAR")
             and c.old_address != c.new_address]
    rep.details["bar_moves"] = [c.to_json() for c in moved]
    if action == "rebalance":
        rep.notes.append(
            "the host saw " + ", ".join(f"{c.what} {c.old} -> {c.new}" for c in moved)
            if moved else
            f"the host saw no BAR of {dev_id} move: Windows kept its resources (a veto of the "
            "query-stop, or the same range assigned again); this was no rebalance onto new "
            "resources")
    elif moved:
        rep.notes.append(f"{dev_id}'s BARs moved although {action} keeps the resources")
    return rep


def run_trigger(m: Machine, trigger: str, dev_id: str, **kw: Any) -> RebalanceReport:
    fn = {"pressure": pressure, "rescan": rescan, "cpu-hotplug": cpu_hotplug,
          "reconfigure": reconfigure, "resize": resize, "wdtf": wdtf}.get(trigger)
    if fn is None:
        raise LabError(f"unknown trigger {trigger!r}; triggers: {', '.join(TRIGGERS)}")
    return fn(m, dev_id, **kw)  # type: ignore[operator]
