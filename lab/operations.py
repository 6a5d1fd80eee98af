"""Device operations: hot-plug and unplug, each waited for on both sides and timed.

Waits are driven by evidence, never fixed sleeps: QMP's DEVICE_DELETED where the
model emits it, QOM otherwise (ich9-intel-hda in QEMU 7.2 emits none); in the guest,
the guest OS's own wait (``GuestOs.bound_wait``/``gone_wait``), begun *before* the host
acts where the guest can watch in the background, so the guest-side detection costs one
round trip in total instead of one per poll. What the wait saw names the device as the
guest does, and the lab's BOUND event carries it to the timeline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lab.deadline import poll, seconds
from lab.errors import LabError, QemuError
from lab.events import DeviceId, Event, Kind, Source
from lab.machine import AUDIODEV_ID, Machine
from vdevice import topology as topo_mod
from vdevice.topology import Device, HotplugMode, Placement

_POLL_US = 2000  # guest waiter granularity


@dataclass
class OperationResult:
    name: str
    device: str
    model: str
    started_ns: int
    ok: bool = True
    durations_ms: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ---- PCI addresses -------------------------------------------------------------------

def walk_pci(devices: list[dict[str, Any]]) -> Any:
    """Every device of a query-pci bus, behind bridges too."""
    for d in devices:
        yield d
        br = d.get("pci_bridge")
        if br:
            yield from walk_pci(br.get("devices", []))


def query_pci(m: Machine) -> list[dict[str, Any]]:
    assert m.qmp is not None
    return list(m.qmp.execute("query-pci"))


def port_secondary_bus(m: Machine, port_id: str) -> int:
    """The bus number the guest (or firmware) gave the port's secondary side."""
    for bus in query_pci(m):
        for d in walk_pci(bus.get("devices", [])):
            if d.get("qdev_id") == port_id and d.get("pci_bridge"):
                sec = int(d["pci_bridge"]["bus"]["secondary"])
                if sec == 0:
                    raise LabError(f"port {port_id!r} has no bus number yet (guest not booted?)")
                return sec
    raise LabError(f"port {port_id!r} not found in query-pci")


def guest_bdf(m: Machine, port_id: str) -> str:
    """A PCIe port has one slot: the device below it is function 0 of device 0."""
    return f"0000:{port_secondary_bus(m, port_id):02x}:00.0"


def qom_bdfs(m: Machine) -> dict[str, str]:
    """Every PCI device QEMU knows by a QOM id, with the address the guest gave it."""
    out: dict[str, str] = {}
    for bus in query_pci(m):
        for d in walk_pci(bus.get("devices", [])):
            if d.get("qdev_id"):
                out[str(d["qdev_id"])] = \
                    f"0000:{int(d['bus']):02x}:{int(d['slot']):02x}.{int(d['function'])}"
    return out


def device_bdf_from_qemu(m: Machine, qom_id: str) -> str | None:
    for bus in query_pci(m):
        for d in walk_pci(bus.get("devices", [])):
            if d.get("qdev_id") == qom_id:
                return f"0000:{int(d['bus']):02x}:{int(d['slot']):02x}.{int(d['function'])}"
    return None


def qom_has(m: Machine, qom_id: str) -> bool:
    assert m.qmp is not None
    items = m.qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return any(i.get("name") == qom_id for i in items)


def _record(m: Machine, kind: Kind, dev: Device, bdf: str | None, *,
            instance: str | None = None, **data: Any) -> int:
    t = time.time_ns()
    m.run.record(Event(t, Source.HOST_LAB, kind, DeviceId(qom=dev.id, bdf=bdf,
                                                          instance=instance), data=data))
    return t


def _span(m: Machine, name: str, dev: Device, bdf: str | None, start_ns: int) -> None:
    """The operation as a phase (start + duration) for the rules' phase names."""
    m.run.record(Event(start_ns, Source.HOST_LAB, Kind.OPERATION, DeviceId(qom=dev.id, bdf=bdf),
                       duration_ns=time.time_ns() - start_ns, data={"name": name}))


# ---- operations ----------------------------------------------------------------------

def plug(m: Machine, dev: Device, *, wait_bound: bool = True,
         timeout: float | None = None,
         on_requested: Callable[[], None] | None = None) -> OperationResult:
    """Hot-plug ``dev`` and wait until the guest's driver for it is up."""
    m.require_running()
    assert m.qmp is not None and m.agent is not None
    model = dev.catalog()
    timeout = timeout if timeout is not None else seconds("driver_bound")
    if dev.id in m.present:
        raise LabError(f"{dev.id} is already plugged; unplug it first")
    # validate against what is really in the machine now, plus the newcomer
    current = replace(m.topology, devices=tuple(d for d in m.topology.devices
                                                if d.id in m.present) + (dev,))
    topo_mod.validate(current, m.inventory)
    res = OperationResult("plug", dev.id, model.driver, time.time_ns())
    bdf = guest_bdf(m, dev.port)
    res.details["bdf"] = bdf
    wait = m.guest.bound_wait(m, dev, bdf, timeout) if wait_bound else None
    try:
        if wait is not None:
            wait.begin()
        if topo_mod.needs_memdev(dev):
            m.qmp.execute("object-add", topo_mod.memdev_object(dev))
        payload = topo_mod.device_add_payload(dev, audiodev=AUDIODEV_ID)
        t0 = time.monotonic()
        t0_ns = _record(m, Kind.HOTPLUG_REQUEST, dev, bdf, payload=payload)
        res.started_ns = t0_ns
        m.qmp.execute("device_add", payload)
        res.durations_ms["device_add"] = (time.monotonic() - t0) * 1e3
        m.present.add(dev.id)
        m.topology = m.topology.with_device(replace(dev, placement=Placement.HOT))
        if on_requested is not None:
            on_requested()
        if wait is not None:
            seen = wait.end()
            res.durations_ms["bound"] = (time.monotonic() - t0) * 1e3
            res.details["bound_evidence"] = seen.evidence
            if seen.instance is not None:
                res.details["instance_id"] = seen.instance
            # the guest's names for the device (a PnP instance id, an HDA function
            # devnode's) ride on the bound event: the timeline binds them to the lab's name
            # and the rules judge the guest's events keyed by them
            _record(m, Kind.BOUND, dev, bdf, instance=seen.instance, **dict(seen.data),
                    evidence=seen.evidence, after_ms=res.durations_ms["bound"])
        _span(m, "plug", dev, bdf, res.started_ns)
        m.run.log(f"plug {dev.id} ({model.driver}) into {dev.port} at {bdf}: "
                  + ", ".join(f"{k} {v:.1f} ms" for k, v in res.durations_ms.items()))
        return res
    except BaseException as exc:
        res.ok = False
        res.error = str(exc)
        raise
    finally:
        if wait is not None:
            wait.close()


def unplug(m: Machine, dev_id: str, *, timeout: float | None = None,
           on_requested: Callable[[], None] | None = None) -> OperationResult:
    """Unplug and wait until the device is gone from QEMU and from the guest."""
    m.require_running()
    assert m.qmp is not None and m.agent is not None
    if dev_id not in m.present:
        raise LabError(f"{dev_id} is not plugged in (present: {', '.join(sorted(m.present)) or 'none'})")
    dev = m.topology.device(dev_id)
    model = dev.catalog()
    native = m.topology.hotplug_mode == HotplugMode.NATIVE
    timeout = timeout if timeout is not None else seconds(
        "native_unplug" if native else "device_deleted")
    res = OperationResult("unplug", dev.id, model.driver, time.time_ns())
    bdf = device_bdf_from_qemu(m, dev.id)
    res.details["bdf"] = bdf
    wait = m.guest.gone_wait(m, dev, bdf, timeout)
    try:
        if wait is not None:
            wait.begin()
        cursor = m.qmp.cursor()
        t0 = time.monotonic()
        res.started_ns = _record(m, Kind.UNPLUG_REQUEST, dev, bdf)
        _device_del(m, dev.id, timeout)
        if on_requested is not None:
            on_requested()
        if model.emits_device_deleted:
            m.qmp.wait_event("DEVICE_DELETED", after=cursor, timeout=timeout,
                             match=lambda ev: (ev.get("data") or {}).get("device") == dev.id,
                             what=f"DEVICE_DELETED for {dev.id}")
            res.details["qemu_evidence"] = "DEVICE_DELETED"
        else:
            poll(f"{dev.id} to leave QOM /machine/peripheral", timeout,
                 lambda: True if not qom_has(m, dev.id) else None)
            res.details["qemu_evidence"] = "qom-list"
            _record(m, Kind.DEVICE_DELETED, dev, bdf, evidence="qom-list")
        res.durations_ms["qemu_gone"] = (time.monotonic() - t0) * 1e3
        if wait is not None:
            seen = wait.end()
            res.durations_ms["guest_gone"] = (time.monotonic() - t0) * 1e3
            _record(m, Kind.UNBOUND, dev, bdf, after_ms=res.durations_ms["guest_gone"],
                    **dict(seen.data))
        if topo_mod.needs_memdev(dev):
            m.qmp.execute("object-del", {"id": topo_mod.memdev_id(dev)})
        m.present.discard(dev.id)
        _span(m, "unplug", dev, bdf, res.started_ns)
        m.run.log(f"unplug {dev.id}: " + ", ".join(f"{k} {v:.1f} ms"
                                                  for k, v in res.durations_ms.items()))
        return res
    except BaseException as exc:
        res.ok = False
        res.error = str(exc)
        raise
    finally:
        if wait is not None:
            wait.close()


def _device_del(m: Machine, dev_id: str, timeout: float) -> None:
    """device_del, retried while QEMU says the slot is busy.

    In native mode pciehp blinks the slot's power indicator for a while after a
    hot-plug (and during an unplug); QEMU refuses device_del meanwhile with "guest is
    busy (power indicator blinking)". That state ends by itself, so it is waited out
    under the operation's deadline instead of failing the unplug.
    """
    assert m.qmp is not None
    end = time.monotonic() + timeout
    delay = 0.02
    while True:
        try:
            m.qmp.execute("device_del", {"id": dev_id})
            return
        except QemuError as exc:
            if "busy" not in str(exc) or time.monotonic() + delay > end:
                raise
            m.run.log(f"device_del {dev_id}: slot busy, retrying in {delay * 1e3:.0f} ms")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


__all__ = ["OperationResult", "plug", "unplug", "guest_bdf", "query_pci",
           "QemuError"]
