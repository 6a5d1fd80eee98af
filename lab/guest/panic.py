"""Turn QEMU's GUEST_PANICKED event from a Windows guest into a bug check description.

How the information gets there: with the Hyper-V crash enlightenment (``-cpu
...,hv-crash``) Windows writes its bug check code and four parameters into the
synthetic crash MSRs HV_X64_MSR_CRASH_P0..P4 and notifies the hypervisor; QEMU then
emits ``GUEST_PANICKED`` with ``info: {"type": "hyper-v", "arg1": ..., "arg5": ...}``
(QAPI GuestPanicInformationHyperV: "arg1: for Windows, STOP code for the guest crash;
arg2..arg5: first..fourth argument of the STOP"). No guest driver is needed.

A pvpanic device (``-device pvpanic-pci``) carries no parameters, and Windows has no
in-box pvpanic driver that we could find in Microsoft documentation (virtio-win ships
one). So the lab relies on hv-crash for Windows and treats a GUEST_PANICKED without
Hyper-V info as "panicked, code unknown".

Bug check names: the "Bug Check Code Reference"
(learn.microsoft.com/windows-hardware/drivers/debugger/bug-check-code-reference2);
the table holds the ones a PnP/audio driver run plausibly hits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lab.events import Event, Kind, Source

BUGCHECK_NAMES: dict[int, str] = {
    0x0000000A: "IRQL_NOT_LESS_OR_EQUAL",
    0x0000001E: "KMODE_EXCEPTION_NOT_HANDLED",
    0x00000024: "NTFS_FILE_SYSTEM",
    0x0000003B: "SYSTEM_SERVICE_EXCEPTION",
    0x00000044: "MULTIPLE_IRP_COMPLETE_REQUESTS",
    0x00000050: "PAGE_FAULT_IN_NONPAGED_AREA",
    0x0000007B: "INACCESSIBLE_BOOT_DEVICE",
    0x0000007E: "SYSTEM_THREAD_EXCEPTION_NOT_HANDLED",
    0x0000007F: "UNEXPECTED_KERNEL_MODE_TRAP",
    0x0000009F: "DRIVER_POWER_STATE_FAILURE",
    0x000000A0: "INTERNAL_POWER_ERROR",
    0x000000C2: "BAD_POOL_CALLER",
    0x000000C4: "DRIVER_VERIFIER_DETECTED_VIOLATION",
    0x000000C5: "DRIVER_CORRUPTED_EXPOOL",
    0x000000C9: "DRIVER_VERIFIER_IOMANAGER_VIOLATION",
    0x000000CA: "PNP_DETECTED_FATAL_ERROR",
    0x000000CE: "DRIVER_UNLOADED_WITHOUT_CANCELLING_PENDING_OPERATIONS",
    0x000000D1: "DRIVER_IRQL_NOT_LESS_OR_EQUAL",
    0x000000D5: "DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL",
    0x000000E2: "MANUALLY_INITIATED_CRASH",
    0x000000EF: "CRITICAL_PROCESS_DIED",
    0x000000FC: "ATTEMPTED_EXECUTE_OF_NOEXECUTE_MEMORY",
    0x00000101: "CLOCK_WATCHDOG_TIMEOUT",
    0x00000116: "VIDEO_TDR_FAILURE",
    0x00000133: "DPC_WATCHDOG_VIOLATION",
    0x00000139: "KERNEL_SECURITY_CHECK_FAILURE",
    0x0000013A: "KERNEL_MODE_HEAP_CORRUPTION",
    0x000001C4: "DRIVER_VERIFIER_DETECTED_VIOLATION_LIVEDUMP",
    0xDEADDEAD: "MANUALLY_INITIATED_CRASH1",
}


@dataclass(frozen=True)
class Bugcheck:
    """What a GUEST_PANICKED event tells about a Windows crash."""

    code: int | None
    name: str | None
    parameters: tuple[int, ...]
    action: str | None
    info_type: str | None

    @property
    def description(self) -> str:
        if self.code is None:
            how = f" ({self.info_type} info)" if self.info_type else " (no crash parameters)"
            return "guest panicked, bug check code unknown" + how
        params = ", ".join(f"0x{p:016X}" for p in self.parameters)
        name = self.name or "unknown bug check"
        return f"bug check 0x{self.code:08X} {name} ({params})"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "code_hex": None if self.code is None else f"0x{self.code:08X}",
                "name": self.name, "parameters": [f"0x{p:016X}" for p in self.parameters],
                "action": self.action, "info_type": self.info_type, "description": self.description}


def _u64(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v & 0xFFFFFFFFFFFFFFFF
    if isinstance(v, str):
        try:
            return int(v, 0) & 0xFFFFFFFFFFFFFFFF
        except ValueError:
            return None
    return None


def describe_guest_panicked(data: Mapping[str, Any]) -> Bugcheck:
    """``data`` of a GUEST_PANICKED QMP event (``{"action": ..., "info": {...}}``).

    Pure; accepts the event's ``data`` member or the whole event (with ``data`` inside).
    """
    if "event" in data and isinstance(data.get("data"), Mapping):
        data = data["data"]
    action = data.get("action") if isinstance(data.get("action"), str) else None
    info = data.get("info") if isinstance(data.get("info"), Mapping) else None
    if not info:
        return Bugcheck(None, None, (), action, None)
    info_type = str(info.get("type")) if info.get("type") is not None else None
    if info_type != "hyper-v":
        return Bugcheck(None, None, (), action, info_type)
    code = _u64(info.get("arg1"))
    params = tuple(p if p is not None else 0 for p in (_u64(info.get(f"arg{i}")) for i in range(2, 6)))
    if code is None:
        return Bugcheck(None, None, params, action, info_type)
    # the stop code is 32 bits; the MSR is 64 and may carry a sign-extended value
    code32 = code & 0xFFFFFFFF
    return Bugcheck(code32, BUGCHECK_NAMES.get(code32), params, action, info_type)


def panic_event(qmp_event: Mapping[str, Any], t_host_ns: int) -> Event:
    """The lab's GUEST_PANICKED Event with the bug check in ``data['bugcheck']``."""
    data = qmp_event.get("data") if isinstance(qmp_event.get("data"), Mapping) else {}
    bc = describe_guest_panicked(data or {})
    return Event(t_host_ns=t_host_ns, source=Source.HOST_QMP, kind=Kind.GUEST_PANICKED,
                 data={"qmp": dict(qmp_event), "bugcheck": bc.to_json()})
