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
from typing import Any

from lab import operations as ops
from lab.errors import LabError
from lab.events import DeviceId, Event, Kind, Source
from lab.guest.base import Unsupported
from lab.machine import Machine
from lab.pci_state import Change, PciSnapshot, diff
from lab.tracers.qemu_trace import QemuTraceTail
from vdevice.catalog import Role, get_model
from vdevice.sizes import fmt_size
from vdevice.topology import Device, Placement
from vdevice.windows import size_to_force_rebalance

TRIGGERS = ("pressure", "rescan", "cpu-hotplug", "reconfigure", "resize", "wdtf")
RUNTIME_TRACE = ("pci_cfg_write",)




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


def _driver(m: Machine, dev_id: str) -> str | None:
    """The driver the guest has bound to the device now, where the guest can say
    (``GuestOs.driver_of``; a Windows guest's state is reported by its trigger halves)."""
    return m.guest.driver_of(m, dev_id)


def begin(m: Machine, trigger: str, dev_id: str) -> tuple[RebalanceReport, Evidence]:
    """Start a trigger's report and its host evidence (query-pci before, QEMU's trace)."""
    m.require_running()
    if trigger != "cpu-hotplug" and dev_id not in m.present:
        raise LabError(f"{dev_id} is not plugged in; plug it before the {trigger} rebalance")
    rep = RebalanceReport(trigger, dev_id, time.time_ns())
    ev = Evidence(m)
    rep.driver_before = _driver(m, dev_id) if dev_id in m.present else None
    return rep, ev


def end(m: Machine, rep: RebalanceReport, ev: Evidence) -> RebalanceReport:
    """Close the evidence (query-pci after, the diff) and record the trigger's span."""
    ev.finish(rep)
    # one span per operation: the rules name violations by the phase they fall in
    m.run.record(Event(rep.started_ns, Source.HOST_LAB, Kind.OPERATION, DeviceId(qom=rep.device),
                       duration_ns=rep.ended_ns - rep.started_ns,
                       data={"name": f"rebalance:{rep.trigger}", "summary": rep.summary()}))
    m.run.log(rep.summary())
    return rep


# ---- triggers ------------------------------------------------------------------------

def rescan(m: Machine, dev_id: str, *, remove: str = "port") -> RebalanceReport:
    """Make the guest assign the device's resources afresh by removing its root port (or
    the device) and rescanning the bus, then wait for the driver to come back; the guest
    half is ``GuestOs.triggers().rescan`` (Linux: sysfs remove + rescan)."""
    if remove not in ("port", "device", "none"):
        raise LabError(f"rescan: remove must be port, device or none, not {remove!r}")
    rep, ev = begin(m, "rescan", dev_id)
    m.guest.triggers().rescan(m, rep, dev_id, remove)
    rep.driver_after = _driver(m, dev_id)
    return end(m, rep, ev)


def pressure(m: Machine, dev_id: str, *, size: int | None = None, placement: str = "sibling",
             model: str = "pci-testdev", pressure_id: str | None = None,
             port: str | None = None) -> RebalanceReport:
    """Hot-plug a device whose BAR does not fit its port's window, next to ``dev_id``.

    The host's query-pci diff is the ground truth (did a bridge window grow, did the
    device's BARs move); ``GuestOs.triggers().pressure_seen`` adds what the guest made of the
    newcomer (whether its BAR got an address; its PnP state).
    """
    if get_model(model).role != Role.PRESSURE:
        raise LabError(f"{model} is not a pressure device (use pci-testdev or ivshmem-plain)")
    rep, ev = begin(m, "pressure", dev_id)
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
    rep.details.update({"pressure_device": pressure_id, "pressure_port": port,
                        "pressure_size": size, "hotplug_mode": m.topology.hotplug_mode.value})
    m.guest.triggers().pressure_seen(m, rep, dev_id, pressure_id, model, t0)
    rep.driver_after = _driver(m, dev_id)
    if rep.driver_before:
        rep.notes.append(f"{dev_id}'s driver {'is still bound' if rep.driver_after else 'is NOT bound'}"
                         f" ({rep.driver_after or rep.driver_before})")
    return end(m, rep, ev)


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
    rep, ev = begin(m, "reconfigure", dev_id)
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
    # the plug's own wait saw the driver come up ("bound"); where the guest can name
    # the driver now, that it is the expected one
    expected = m.guest.driver_names(new.catalog())
    rep.rebound = (rep.driver_after in expected if rep.driver_after and expected
                   else "bound" in p.durations_ms)
    return end(m, rep, ev)


def cpu_hotplug(m: Machine, dev_id: str | None = None) -> RebalanceReport:
    """Hot-plug one vCPU. Windows Server rebalances on it (a dynamically partitionable
    server; the loader refuses Windows 10/11); the guest half (``triggers().cpu_added``)
    waits for the guest to take the CPU where it can tell."""
    assert m.qmp is not None and m.agent is not None
    qmp = m.qmp
    rep, ev = begin(m, "cpu-hotplug", dev_id or "guest")
    slots = qmp.execute("query-hotpluggable-cpus")
    free = [s for s in slots if "qom-path" not in s]
    if not free:
        raise Unsupported(f"no free vCPU slot: the topology has cpus={m.topology.cpus}, "
                          f"max_cpus={m.topology.max_cpus}; raise max_cpus")
    slot = sorted(free, key=lambda s: tuple(sorted(s["props"].items())))[0]
    cpu_id = f"cpu{len(slots) - len(free)}"

    def add() -> None:
        t0 = time.monotonic()
        qmp.execute("device_add", {"driver": slot["type"], "id": cpu_id, **slot["props"]})
        rep.durations_ms["device_add"] = (time.monotonic() - t0) * 1e3

    rep.details.update({"cpu": cpu_id, "props": slot["props"]})
    m.guest.triggers().cpu_added(m, rep, add)
    rep = end(m, rep, ev)
    rep.notes.append(f"{len(rep.changes)} PCI resource change(s) seen" if rep.changes
                     else "no PCI resource moved")
    return rep


def resize(m: Machine, dev_id: str) -> RebalanceReport:
    """Resizable BAR: detected from the device's PCIe extended capabilities as the guest
    reads its config space (``triggers().capabilities``)."""
    assert m.agent is not None
    bdf = ops.device_bdf_from_qemu(m, dev_id)
    if bdf is None:
        raise LabError(f"{dev_id} is not present")
    caps = m.guest.triggers().capabilities(m, bdf)
    if 0x15 not in caps:
        model = m.topology.device(dev_id).model
        raise Unsupported(
            f"resize is not possible: {model} in QEMU {m.inventory.version_str} has no Resizable "
            f"BAR capability (PCIe extended capability 0x15); checked the guest's config space of "
            f"{bdf} (extended capabilities found: "
            f"{', '.join(f'{c:#x}' for c in caps) or 'none, conventional PCI function'})")
    raise Unsupported("this device has a Resizable BAR capability, but resizing through it "
                      "is not implemented yet")


def wdtf(m: Machine, dev_id: str, *, action: str, target: str = "pci",
         instance: str | None = None) -> RebalanceReport:
    """WDTF's Enhanced Device Testing puts ``dev_id`` through ``action`` (restart,
    rebalance, cancel-stop, fail-restart), as the HLK Device Fundamentals PnP tests do;
    the guest half is ``GuestOs.triggers().wdtf`` (only a Windows guest has WDTF)."""
    return m.guest.triggers().wdtf(m, dev_id, action=action, target=target, instance=instance)


def run_trigger(m: Machine, trigger: str, dev_id: str, **kw: Any) -> RebalanceReport:
    fn = {"pressure": pressure, "rescan": rescan, "cpu-hotplug": cpu_hotplug,
          "reconfigure": reconfigure, "resize": resize, "wdtf": wdtf}.get(trigger)
    if fn is None:
        raise LabError(f"unknown trigger {trigger!r}; triggers: {', '.join(TRIGGERS)}")
    return fn(m, dev_id, **kw)  # type: ignore[operator]
