"""One event schema for everything the lab observes, host or guest.

Every tracer turns its raw records into ``Event`` values; the timeline merges and
orders them; rules and reports read only these. ``data`` keeps the raw record so a
run can be re-checked from its directory without the tool that produced it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Source(str, Enum):
    HOST_QMP = "host.qmp"
    HOST_TRACE = "host.qemu-trace"
    HOST_LAB = "host.lab"
    HOST_AUDIO = "host.audio"
    GUEST_KERNEL = "guest.kernel"
    GUEST_KPROBE = "guest.kprobe"
    GUEST_UEVENT = "guest.uevent"
    GUEST_ETW = "guest.etw"
    GUEST_WPP = "guest.wpp"
    GUEST_SETUPAPI = "guest.setupapi"
    GUEST_PNP = "guest.pnp"

    @property
    def is_guest(self) -> bool:
        return self.value.startswith("guest.")


class Kind(str, Enum):
    """Normalized event kinds. Tracers map their raw records onto these."""

    # host: lab operations and QMP
    HOTPLUG_REQUEST = "hotplug-request"
    UNPLUG_REQUEST = "unplug-request"
    DEVICE_DELETED = "device-deleted"
    QMP_EVENT = "qmp-event"
    OPERATION = "operation"          # a lab operation span (data: name, phase)
    BOUND = "bound"                  # the lab saw the driver bound in the guest
    UNBOUND = "unbound"              # the lab saw the function gone/unbound in the guest
    PCI_SNAPSHOT = "pci-snapshot"
    RESOURCE_MOVED = "resource-moved"
    GUEST_PANICKED = "guest-panicked"
    PAUSE = "pause"
    RESUME = "resume"
    # host: QEMU trace (the hardware's view)
    BAR_MAPPED = "bar-mapped"
    BAR_UNMAPPED = "bar-unmapped"
    DECODE_ON = "decode-on"
    DECODE_OFF = "decode-off"
    CONFIG_WRITE = "config-write"
    # guest: Linux driver model
    PROBE_ENTER = "probe-enter"
    PROBE_EXIT = "probe-exit"
    REMOVE_ENTER = "remove-enter"
    REMOVE_EXIT = "remove-exit"
    CALL_ENTER = "call-enter"        # any other traced function
    CALL_EXIT = "call-exit"
    KERNEL_LOG = "kernel-log"
    KERNEL_OOPS = "kernel-oops"
    UEVENT = "uevent"
    DRIVER_IO = "driver-io"
    # guest: Windows PnP (IRP minor functions and PortCls callbacks)
    QUERY_STOP = "query-stop"
    STOP = "stop"
    CANCEL_STOP = "cancel-stop"
    START = "start"
    SURPRISE_REMOVAL = "surprise-removal"
    REMOVE = "remove"
    QUERY_REMOVE = "query-remove"
    CANCEL_REMOVE = "cancel-remove"
    PROBLEM = "problem"
    RESOURCES_ASSIGNED = "resources-assigned"
    REBALANCE_START = "rebalance-start"
    REBALANCE_END = "rebalance-end"
    SETUPAPI_SECTION = "setupapi-section"
    DEVICE_STATE = "device-state"            # a device's state as a tool printed it (pnputil, Get-PnpDevice)
    # PCI resources as the guest kernel (Linux) reports them
    RESOURCE_UNASSIGNED = "resource-unassigned"  # a BAR or bridge window could not be assigned
    RESOURCE_RELEASED = "resource-released"
    SLOT_EVENT = "slot-event"                # PCIe hot-plug slot: card present, link up/down, button
    # audio (host.audio: the guest's playback as QEMU captured it)
    AUDIO_START = "audio-start"              # first good sample of the capture window
    AUDIO_STOP = "audio-stop"                # last good sample before the stream stopped
    AUDIO_RESUMED = "audio-resumed"          # first good sample after it; duration = outage
    AUDIO_GAP = "audio-gap"
    AUDIO_DISCONTINUITY = "audio-discontinuity"
    # host.trace: QEMU's HDA codec dropped its stream buffer (the host was too slow)
    AUDIO_OVERRUN = "audio-overrun"
    # host.trace: QEMU's audio timer ran late by duration_ns (QEMU itself did not run)
    AUDIO_TIMER_LATE = "audio-timer-late"


@dataclass(frozen=True)
class DeviceId:
    """One device as each side names it; any field may be unknown.

    ``qom`` is QEMU's id (``-device ...,id=``), ``bdf`` the guest's PCI address
    (``0000:01:00.0``), ``instance`` the Windows device instance id.
    """

    qom: str | None = None
    bdf: str | None = None
    instance: str | None = None

    def label(self) -> str:
        return self.qom or self.bdf or self.instance or "?"

    def matches(self, other: DeviceId) -> bool:
        """True when any identity both sides know agrees."""
        pairs = ((self.qom, other.qom), (self.bdf, other.bdf), (self.instance, other.instance))
        return any(a is not None and a == b for a, b in pairs)


@dataclass(frozen=True)
class Event:
    """A normalized event.

    ``t_host_ns`` is host wall-clock time (``time.time_ns()`` domain). Guest events
    carry their own clock in ``t_guest_ns`` and get ``t_host_ns`` from the timeline's
    clock alignment; before alignment, ``t_host_ns`` is the host receive time.
    """

    t_host_ns: int
    source: Source
    kind: Kind
    device: DeviceId | None = None
    duration_ns: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    t_guest_ns: int | None = None
    seq: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["source"] = self.source.value
        d["kind"] = self.kind.value
        if self.device is None:
            d["device"] = None
        else:
            d["device"] = {k: v for k, v in d["device"].items() if v is not None}
        return d

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, default=str)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Event:
        dev = d.get("device")
        return cls(
            t_host_ns=int(d["t_host_ns"]),
            source=Source(d["source"]),
            kind=Kind(d["kind"]),
            device=DeviceId(**dev) if dev else None,
            duration_ns=d.get("duration_ns"),
            data=dict(d.get("data") or {}),
            t_guest_ns=d.get("t_guest_ns"),
            seq=int(d.get("seq", 0)),
        )
