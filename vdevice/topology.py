"""The machine as data: q35, root ports, switches, devices; rendered for QEMU.

A topology is validated as a whole before any VM starts (ids, chassis/slot pairs,
reservations, BAR sizes, what the installed QEMU offers), and renders two things:
the QEMU command-line arguments for what exists at boot, and the ``device_add``
payloads for what the lab hot-plugs later. Hot-plug mode is an explicit field
because it changes everything the guest does (acpiphp vs pciehp, PLATFORM.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from vdevice.catalog import DeviceModel, Role, check_user_props, get_model, unavailable_reason
from vdevice.errors import SpecError
from vdevice.inventory import QemuInventory
from vdevice.sizes import bar_size, fmt_size, parse_size

ROOT_BUS = "pcie.0"
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
RESERVE_KEYS = ("bus-reserve", "io-reserve", "mem-reserve", "pref32-reserve", "pref64-reserve")


class HotplugMode(str, Enum):
    ACPI = "acpi"      # QEMU's default on q35 >= 6.1; guest uses acpiphp
    NATIVE = "native"  # PCIe native hot-plug; guest uses pciehp


class Placement(str, Enum):
    COLD = "cold"      # on the command line, present at boot
    HOT = "hot"        # hot-plugged by the lab


@dataclass(frozen=True)
class Port:
    """A hot-plug capable slot: a pcie-root-port, or a switch's downstream port."""

    id: str
    chassis: int
    slot: int
    reserve: Mapping[str, int] = field(default_factory=dict)   # e.g. {"mem-reserve": 2<<20}
    switch: str | None = None        # set for xio3130-downstream ports

    @property
    def driver(self) -> str:
        return "xio3130-downstream" if self.switch else "pcie-root-port"


@dataclass(frozen=True)
class Switch:
    """A PCIe switch (x3130-upstream in a root port, with downstream ports)."""

    id: str
    port: str                          # the root port its upstream port sits in
    downstream: tuple[Port, ...] = ()


@dataclass(frozen=True)
class Device:
    id: str
    model: str
    port: str
    placement: Placement = Placement.HOT
    props: Mapping[str, str] = field(default_factory=dict)
    codec: str | None = None           # HDA controllers placed cold: the codec model
    size: int | None = None            # pressure devices: the BAR size they ask for

    def catalog(self) -> DeviceModel:
        return get_model(self.model)


@dataclass(frozen=True)
class Topology:
    machine: str = "q35"
    hotplug_mode: HotplugMode = HotplugMode.ACPI
    ports: tuple[Port, ...] = ()
    switches: tuple[Switch, ...] = ()
    devices: tuple[Device, ...] = ()
    memory_mb: int = 512
    cpus: int = 1
    max_cpus: int = 1
    kernel_args: tuple[str, ...] = ()  # extra guest kernel args, e.g. pci=realloc

    # ---- lookups -------------------------------------------------------------------
    def all_ports(self) -> Iterator[Port]:
        yield from self.ports
        for sw in self.switches:
            yield from sw.downstream

    def port(self, port_id: str) -> Port:
        for p in self.all_ports():
            if p.id == port_id:
                return p
        raise SpecError(f"unknown port {port_id!r}; ports: {', '.join(self.port_ids()) or 'none'}",
                        field="port")

    def port_ids(self) -> list[str]:
        return [p.id for p in self.all_ports()]

    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def device(self, device_id: str) -> Device:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise SpecError(f"unknown device {device_id!r}; devices: "
                        f"{', '.join(self.device_ids()) or 'none'}", field="device")

    def with_device(self, dev: Device) -> Topology:
        """A copy with ``dev`` added or replacing the device of the same id."""
        others = tuple(d for d in self.devices if d.id != dev.id)
        return replace(self, devices=others + (dev,))

    def without_device(self, device_id: str) -> Topology:
        return replace(self, devices=tuple(d for d in self.devices if d.id != device_id))

    def root_port_of(self, port_id: str) -> str:
        """The root port above ``port_id`` (itself for a root port)."""
        for sw in self.switches:
            if any(p.id == port_id for p in sw.downstream):
                return sw.port
        return port_id

    def to_json(self) -> dict[str, Any]:
        def port_json(p: Port) -> dict[str, Any]:
            d: dict[str, Any] = {"id": p.id, "chassis": p.chassis, "slot": p.slot}
            if p.reserve:
                d["reserve"] = {k: fmt_size(v) if k != "bus-reserve" else v
                                for k, v in p.reserve.items()}
            return d
        return {
            "machine": self.machine, "hotplug_mode": self.hotplug_mode.value,
            "memory_mb": self.memory_mb, "cpus": self.cpus, "max_cpus": self.max_cpus,
            "ports": [port_json(p) for p in self.ports],
            "switches": [{"id": s.id, "port": s.port,
                          "downstream": [port_json(p) for p in s.downstream]}
                         for s in self.switches],
            "devices": [{"id": d.id, "model": d.model, "port": d.port,
                         "placement": d.placement.value, "props": dict(d.props),
                         **({"codec": d.codec} if d.codec else {}),
                         **({"size": fmt_size(d.size)} if d.size else {})} for d in self.devices],
            "kernel_args": list(self.kernel_args),
        }


# ---- validation ------------------------------------------------------------------------

def validate(topo: Topology, inventory: QemuInventory | None = None) -> None:
    """Raise SpecError (with the field path) on the first problem found.

    Checks what QEMU would refuse, and what it would accept but never works
    (e.g. a device on pcie.0 can't be hot-plugged), before a VM is started.
    """
    if topo.machine != "q35":
        raise SpecError(f"machine {topo.machine!r} is not supported: PCIe hot-plug and "
                        "rebalance need q35", field="machine")
    if inventory is not None and inventory.machines and topo.machine not in inventory.machines:
        raise SpecError(f"the installed QEMU has no machine {topo.machine!r}", field="machine")
    if not 64 <= topo.memory_mb <= 1 << 20:
        raise SpecError(f"memory_mb {topo.memory_mb} is out of range (64..1048576)",
                        field="memory_mb")
    if not 1 <= topo.cpus <= topo.max_cpus <= 288:
        raise SpecError(f"need 1 <= cpus ({topo.cpus}) <= max_cpus ({topo.max_cpus}) <= 288",
                        field="cpus")
    seen: dict[str, str] = {}

    def claim(ident: str, what: str, fld: str) -> None:
        if not _ID_RE.match(ident):
            raise SpecError(f"{what} id {ident!r} is not a valid QEMU id (a letter, then letters, "
                            "digits, '-', '_' or '.')", field=fld)
        if ident in seen or ident == ROOT_BUS:
            raise SpecError(f"id {ident!r} is used twice ({seen.get(ident, 'the root bus')} and "
                            f"{what})", field=fld)
        seen[ident] = what

    chassis_slot: dict[tuple[int, int], str] = {}

    def check_port(p: Port, fld: str) -> None:
        claim(p.id, "port", f"{fld}.id")
        if not 0 <= p.chassis <= 255:
            raise SpecError(f"chassis {p.chassis} out of range 0..255", field=f"{fld}.chassis")
        if not 0 <= p.slot <= 8191:
            raise SpecError(f"slot {p.slot} out of range 0..8191", field=f"{fld}.slot")
        key = (p.chassis, p.slot)
        if key in chassis_slot:
            raise SpecError(f"(chassis {p.chassis}, slot {p.slot}) is already used by port "
                            f"{chassis_slot[key]!r}; QEMU requires unique pairs",
                            field=f"{fld}.slot")
        chassis_slot[key] = p.id
        for k in p.reserve:
            if k not in RESERVE_KEYS:
                raise SpecError(f"unknown reservation {k!r}; use one of {', '.join(RESERVE_KEYS)}",
                                field=f"{fld}.reserve.{k}")
        if "pref32-reserve" in p.reserve and "pref64-reserve" in p.reserve:
            raise SpecError("pref32-reserve and pref64-reserve cannot both be set on one port "
                            "(QEMU: 'PREF32 and PREF64 conflict')", field=f"{fld}.reserve")
        if p.switch and p.reserve:
            raise SpecError("resource reservations exist only on pcie-root-port, not on switch "
                            "downstream ports", field=f"{fld}.reserve")
        io = p.reserve.get("io-reserve")
        if io is not None and io not in (0,) and (io % 4096):
            raise SpecError(f"io-reserve {io} must be 0 or a multiple of 4K (bridge I/O windows "
                            "are 4K-granular)", field=f"{fld}.reserve.io-reserve")
        for k in ("mem-reserve", "pref32-reserve", "pref64-reserve"):
            v = p.reserve.get(k)
            if v and v % (1 << 20):
                raise SpecError(f"{k} {fmt_size(v)} must be a multiple of 1M (bridge memory "
                                "windows are 1M-granular)", field=f"{fld}.reserve.{k}")
        if inventory is not None:
            _check_props(inventory, p.driver, p.reserve.keys(), f"{fld}.reserve")

    for i, p in enumerate(topo.ports):
        check_port(p, f"ports[{i}]")
    root_ids = {p.id for p in topo.ports}
    used_ports: dict[str, str] = {}
    for i, sw in enumerate(topo.switches):
        claim(sw.id, "switch", f"switches[{i}].id")
        if sw.port not in root_ids:
            raise SpecError(f"switch {sw.id!r} sits in unknown root port {sw.port!r}",
                            field=f"switches[{i}].port")
        used_ports[sw.port] = sw.id
        if not sw.downstream:
            raise SpecError(f"switch {sw.id!r} has no downstream ports",
                            field=f"switches[{i}].downstream")
        for j, p in enumerate(sw.downstream):
            check_port(p, f"switches[{i}].downstream[{j}]")
    all_ports = {p.id for p in topo.all_ports()}
    for i, d in enumerate(topo.devices):
        fld = f"devices[{i}]"
        claim(d.id, "device", f"{fld}.id")
        model = get_model(d.model, field=f"{fld}.model")
        if inventory is not None:
            why = unavailable_reason(model, inventory)
            if why:
                raise SpecError(why, field=f"{fld}.model")
        if model.role == Role.CODEC:
            raise SpecError(f"{d.model} is an HDA codec; give it as `codec:` of an HDA controller",
                            field=f"{fld}.model")
        if d.port == ROOT_BUS:
            raise SpecError("devices on pcie.0 cannot be hot-plugged or rebalanced; put the device "
                            "in a pcie-root-port", field=f"{fld}.port")
        if d.port not in all_ports:
            raise SpecError(f"unknown port {d.port!r}; ports: {', '.join(sorted(all_ports))}",
                            field=f"{fld}.port")
        if d.port in used_ports:
            raise SpecError(f"port {d.port!r} is already taken by {used_ports[d.port]!r}; a PCIe "
                            "port has exactly one slot", field=f"{fld}.port")
        used_ports[d.port] = d.id
        if d.placement == Placement.HOT and not model.hotpluggable:
            raise SpecError(f"{d.model} cannot be hot-plugged", field=f"{fld}.placement")
        if d.codec is not None:
            if d.codec not in model.codecs:
                raise SpecError(f"{d.model} takes no codec {d.codec!r}"
                                + (f"; codecs: {', '.join(model.codecs)}" if model.codecs else ""),
                                field=f"{fld}.codec")
            if d.placement == Placement.HOT:
                raise SpecError("HDA codecs cannot be hot-plugged (QEMU: \"Bus 'X.0' does not "
                                "support hotplugging\"); place the controller cold to have a codec",
                                field=f"{fld}.codec")
        if model.role == Role.PRESSURE:
            if d.size is None:
                raise SpecError(f"pressure device {d.id!r} needs a size", field=f"{fld}.size")
            bar_size(d.size, field=f"{fld}.size")
        elif d.size is not None:
            raise SpecError(f"size is only meaningful for pressure devices, not {d.model}",
                            field=f"{fld}.size")
        check_user_props(model.driver, d.props.keys(), field=f"{fld}.props")
        if inventory is not None:
            _check_props(inventory, model.driver, d.props.keys(), f"{fld}.props")


def _check_props(inventory: QemuInventory, driver: str, names: Any, fld: str) -> None:
    known = inventory.props(driver)
    if known is None:
        return
    for n in names:
        if n not in known:
            raise SpecError(f"{driver} in QEMU {inventory.version_str} has no property {n!r}",
                            field=f"{fld}.{n}")


# ---- rendering -------------------------------------------------------------------------

def qemu_opt(value: object) -> str:
    """A value for QEMU's key=value option syntax, where ',' must be doubled."""
    s = "on" if value is True else "off" if value is False else str(value)
    return s.replace(",", ",,")


def qemu_opts(props: Mapping[str, object], head: str | None = None) -> str:
    """``head,key=value,...`` for any QEMU option string (-device, -chardev, -drive,
    -audiodev, -netdev ...), every value through ``qemu_opt``: the one encoder, so a
    path with a comma (``$TMPDIR``, an ISO named ``win,snapshot=on``) stays one value
    and can never add an option. Keys are the lab's own, never user input."""
    for k in props:
        if not k or "," in k or "=" in k:
            raise ValueError(f"not a QEMU option key: {k!r}")
    return ",".join(([head] if head else []) + [f"{k}={qemu_opt(v)}" for k, v in props.items()])


def device_arg(driver: str, props: Mapping[str, object]) -> str:
    return qemu_opts(props, driver)


def port_props(p: Port, bus: str) -> dict[str, object]:
    props: dict[str, object] = {"id": p.id, "bus": bus, "chassis": p.chassis, "slot": p.slot}
    for k, v in p.reserve.items():
        props[k] = v
    return props


def device_props(d: Device, *, audiodev: str | None = None) -> dict[str, object]:
    """Properties of ``d`` for -device or device_add (without the driver)."""
    model = d.catalog()
    props: dict[str, object] = {"id": d.id, "bus": d.port}
    if model.driver == "pci-testdev" and d.size:
        props["membar"] = d.size
    if model.driver == "ivshmem-plain":
        props["memdev"] = memdev_id(d)
    if model.audio_backend and audiodev:
        props["audiodev"] = audiodev
    props.update(d.props)
    return props


def memdev_id(d: Device) -> str:
    return f"{d.id}-mem"


def memdev_object(d: Device) -> dict[str, object]:
    """The memory backend an ivshmem-plain pressure device needs (object-add payload)."""
    return {"qom-type": "memory-backend-ram", "id": memdev_id(d), "size": d.size}


def machine_args(topo: Topology, *, audiodev: str | None = None) -> list[str]:
    """QEMU arguments for the machine, the ports and the cold devices.

    ``audiodev`` is the id of an -audiodev the caller defines (its path is a run-time
    artifact, so the caller owns it); codecs and AC97/ES1370 are wired to it.
    """
    args = ["-machine", f"{topo.machine}", "-m", str(topo.memory_mb)]
    if topo.max_cpus > topo.cpus:
        args += ["-smp", f"{topo.cpus},maxcpus={topo.max_cpus}"]
    else:
        args += ["-smp", str(topo.cpus)]
    if topo.hotplug_mode == HotplugMode.NATIVE:
        args += ["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"]
    for p in topo.ports:
        args += ["-device", device_arg("pcie-root-port", port_props(p, ROOT_BUS))]
    for sw in topo.switches:
        args += ["-device", device_arg("x3130-upstream", {"id": sw.id, "bus": sw.port})]
        for p in sw.downstream:
            args += ["-device", device_arg("xio3130-downstream", port_props(p, sw.id))]
    for d in topo.devices:
        if d.placement != Placement.COLD:
            continue
        model = d.catalog()
        if model.driver == "ivshmem-plain":
            mo = memdev_object(d)
            args += ["-object", device_arg(str(mo["qom-type"]), {k: v for k, v in mo.items()
                                                                 if k != "qom-type"})]
        args += ["-device", device_arg(model.driver, device_props(d, audiodev=audiodev))]
        if d.codec:
            codec = get_model(d.codec)
            cprops: dict[str, object] = {"id": f"{d.id}-codec", "bus": f"{d.id}.0"}
            cprops.update(codec.defaults)
            if audiodev:
                cprops["audiodev"] = audiodev
            args += ["-device", device_arg(codec.driver, cprops)]
    return args


def device_add_payload(d: Device, *, audiodev: str | None = None) -> dict[str, Any]:
    """Arguments of QMP ``device_add`` for ``d`` (values typed as QMP expects)."""
    payload: dict[str, Any] = {"driver": d.catalog().driver}
    for k, v in device_props(d, audiodev=audiodev).items():
        payload[k] = v if isinstance(v, (bool, int)) else str(v)
    return payload


def needs_memdev(d: Device) -> bool:
    return d.catalog().driver == "ivshmem-plain"


def parse_reserve(raw: Mapping[str, object], fld: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for k, v in raw.items():
        if k == "bus-reserve":
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SpecError("bus-reserve is a number of buses", field=f"{fld}.{k}")
            out[k] = v
        else:
            out[k] = parse_size(v, field=f"{fld}.{k}")
    return out
