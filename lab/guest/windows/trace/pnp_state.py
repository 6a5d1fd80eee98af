"""Device state from Get-PnpDevice / Get-PnpDeviceProperty, and the CM_PROB table.

Why both cmdlets: ``Get-PnpDevice`` gives presence, status and class;
the problem code and the NTSTATUS behind it come from the device properties
``DEVPKEY_Device_ProblemCode`` and ``DEVPKEY_Device_ProblemStatus`` ("See the
DEVPKEY_Device_ProblemStatus property on the device for the error code returned for
the start IRP", learn.microsoft.com/windows-hardware/drivers/install/cm-prob-failed-start).

Devices are selected by exact instance id with ``-contains`` in PowerShell (case
insensitive, no wildcards), not with ``Get-PnpDevice -InstanceId``, whose argument is a
wildcard pattern: an instance id containing ``[`` would otherwise match other devices.
Properties are read by piping the device object, for the same reason.

The problem-code table is cfg.h as published in the Windows SDK; Device Manager's
documented list ("Device Manager Error Messages",
learn.microsoft.com/windows-hardware/drivers/install/device-manager-error-messages)
covers the codes marked ``device_manager=True``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lab.agent.powershell import PsOutputError, parse_ps_json
from lab.events import DeviceId, Event, Kind, Source
from lab.guest.windows.trace.common import GuestScript, ParsedTrace, TraceParseError, flagged

# code -> (name, listed in Device Manager's documented error table)
CM_PROB: dict[int, tuple[str, bool]] = {
    0x01: ("CM_PROB_NOT_CONFIGURED", True),
    0x02: ("CM_PROB_DEVLOADER_FAILED", False),
    0x03: ("CM_PROB_OUT_OF_MEMORY", True),
    0x04: ("CM_PROB_ENTRY_IS_WRONG_TYPE", False),
    0x05: ("CM_PROB_LACKED_ARBITRATOR", False),
    0x06: ("CM_PROB_BOOT_CONFIG_CONFLICT", False),
    0x07: ("CM_PROB_FAILED_FILTER", False),
    0x08: ("CM_PROB_DEVLOADER_NOT_FOUND", False),
    0x09: ("CM_PROB_INVALID_DATA", True),
    0x0A: ("CM_PROB_FAILED_START", True),
    0x0B: ("CM_PROB_LIAR", False),
    0x0C: ("CM_PROB_NORMAL_CONFLICT", True),
    0x0D: ("CM_PROB_NOT_VERIFIED", False),
    0x0E: ("CM_PROB_NEED_RESTART", True),
    0x0F: ("CM_PROB_REENUMERATION", False),
    0x10: ("CM_PROB_PARTIAL_LOG_CONF", True),
    0x11: ("CM_PROB_UNKNOWN_RESOURCE", False),
    0x12: ("CM_PROB_REINSTALL", True),
    0x13: ("CM_PROB_REGISTRY", True),
    0x14: ("CM_PROB_VXDLDR", False),
    0x15: ("CM_PROB_WILL_BE_REMOVED", True),
    0x16: ("CM_PROB_DISABLED", True),
    0x17: ("CM_PROB_DEVLOADER_NOT_READY", False),
    0x18: ("CM_PROB_DEVICE_NOT_THERE", True),
    0x19: ("CM_PROB_MOVED", False),
    0x1A: ("CM_PROB_TOO_EARLY", False),
    0x1B: ("CM_PROB_NO_VALID_LOG_CONF", False),
    0x1C: ("CM_PROB_FAILED_INSTALL", True),
    0x1D: ("CM_PROB_HARDWARE_DISABLED", True),
    0x1E: ("CM_PROB_CANT_SHARE_IRQ", False),
    0x1F: ("CM_PROB_FAILED_ADD", True),
    0x20: ("CM_PROB_DISABLED_SERVICE", True),
    0x21: ("CM_PROB_TRANSLATION_FAILED", True),
    0x22: ("CM_PROB_NO_SOFTCONFIG", True),
    0x23: ("CM_PROB_BIOS_TABLE", True),
    0x24: ("CM_PROB_IRQ_TRANSLATION_FAILED", True),
    0x25: ("CM_PROB_FAILED_DRIVER_ENTRY", True),
    0x26: ("CM_PROB_DRIVER_FAILED_PRIOR_UNLOAD", True),
    0x27: ("CM_PROB_DRIVER_FAILED_LOAD", True),
    0x28: ("CM_PROB_DRIVER_SERVICE_KEY_INVALID", True),
    0x29: ("CM_PROB_LEGACY_SERVICE_NO_DEVICES", True),
    0x2A: ("CM_PROB_DUPLICATE_DEVICE", True),
    0x2B: ("CM_PROB_FAILED_POST_START", True),
    0x2C: ("CM_PROB_HALTED", True),
    0x2D: ("CM_PROB_PHANTOM", True),
    0x2E: ("CM_PROB_SYSTEM_SHUTDOWN", True),
    0x2F: ("CM_PROB_HELD_FOR_EJECT", True),
    0x30: ("CM_PROB_DRIVER_BLOCKED", True),
    0x31: ("CM_PROB_REGISTRY_TOO_LARGE", True),
    0x32: ("CM_PROB_SETPROPERTIES_FAILED", True),
    0x33: ("CM_PROB_WAITING_ON_DEPENDENCY", True),
    0x34: ("CM_PROB_UNSIGNED_DRIVER", True),
    0x35: ("CM_PROB_USED_BY_DEBUGGER", True),
    0x36: ("CM_PROB_DEVICE_RESET", True),
    0x37: ("CM_PROB_CONSOLE_LOCKED", True),
    0x38: ("CM_PROB_NEED_CLASS_CONFIG", True),
    0x39: ("CM_PROB_GUEST_ASSIGNMENT_FAILED", True),
}


def problem_name(code: int | None) -> str | None:
    """``CM_PROB_*`` name of ``code``; ``None`` for 0/None; ``CM_PROB_UNKNOWN_<n>`` otherwise."""
    if not code:
        return None
    entry = CM_PROB.get(int(code))
    return entry[0] if entry else f"CM_PROB_UNKNOWN_{int(code)}"


_QUERY = r"""
$want = @($p.InstanceIds)
$classes = @($p.Classes)
$devices = @(Get-PnpDevice | Where-Object {
    (($want.Count -eq 0) -or ($want -contains $_.InstanceId)) -and
    (($classes.Count -eq 0) -or ($classes -contains $_.Class))
})
foreach ($d in $devices) {
    $props = @{}
    try {
        foreach ($q in @($d | Get-PnpDeviceProperty -KeyName 'DEVPKEY_Device_ProblemCode', 'DEVPKEY_Device_ProblemStatus' -ErrorAction Stop)) {
            $props[[string]$q.KeyName] = $q.Data
        }
    } catch { $props['__error'] = [string]$_.Exception.Message }
    $status = $props['DEVPKEY_Device_ProblemStatus']
    [pscustomobject]@{
        InstanceId = [string]$d.InstanceId
        FriendlyName = [string]$d.FriendlyName
        Class = [string]$d.Class
        Status = [string]$d.Status
        Present = [bool]$d.Present
        ConfigManagerErrorCode = if ($null -ne $d.ConfigManagerErrorCode) { [int]$d.ConfigManagerErrorCode } else { $null }
        ProblemCode = if ($null -ne $props['DEVPKEY_Device_ProblemCode']) { [int64]$props['DEVPKEY_Device_ProblemCode'] } else { $null }
        ProblemStatus = if ($null -ne $status) { $s = [int64]$status; if ($s -lt 0) { $s += 4294967296 }; '0x{0:X8}' -f $s } else { $null }
        PropertyError = $props['__error']
    }
}
"""


def query_script(instance_ids: Sequence[str] = (), classes: Sequence[str] = ()) -> GuestScript:
    """Devices with these exact instance ids and/or classes (all devices if both empty)."""
    return GuestScript("pnp: device state", _QUERY,
                       {"InstanceIds": [str(i) for i in instance_ids], "Classes": [str(c) for c in classes]},
                       structured=True, depth=3, timeout=120.0)


@dataclass(frozen=True)
class PnpDeviceState:
    instance_id: str
    friendly_name: str
    device_class: str
    status: str
    present: bool
    problem_code: int | None
    problem_status: str | None
    problem: str | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _int_or_none(v: Any) -> int | None:
    if v is None or isinstance(v, bool):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        try:
            return int(str(v), 0)
        except ValueError:
            return None


def parse_records(records: Sequence[Any]) -> tuple[list[PnpDeviceState], list[str]]:
    """Records of the query script -> states, plus problems found in the input."""
    states: list[PnpDeviceState] = []
    problems: list[str] = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping) or not isinstance(rec.get("InstanceId"), str) or not rec["InstanceId"]:
            problems.append(f"pnp record {i}: no InstanceId ({str(rec)[:80]!r})")
            continue
        code = _int_or_none(rec.get("ProblemCode"))
        if code is None:
            code = _int_or_none(rec.get("ConfigManagerErrorCode"))
        if rec.get("PropertyError"):
            problems.append(f"pnp {rec['InstanceId']}: properties unreadable: {rec['PropertyError']}")
        states.append(PnpDeviceState(
            instance_id=rec["InstanceId"], friendly_name=str(rec.get("FriendlyName") or ""),
            device_class=str(rec.get("Class") or ""), status=str(rec.get("Status") or ""),
            present=bool(rec.get("Present")), problem_code=code,
            problem_status=rec.get("ProblemStatus") if isinstance(rec.get("ProblemStatus"), str) else None,
            problem=problem_name(code)))
    return states, problems


def parse_pnp_json(text: str | bytes) -> tuple[list[PnpDeviceState], list[str]]:
    try:
        records = parse_ps_json(text, convert_dates=False)
    except PsOutputError as exc:
        raise TraceParseError(f"Get-PnpDevice output is not valid JSON: {exc}") from None
    return parse_records(records)


def to_events(states: Sequence[PnpDeviceState], *, received_ns: int,
              t_guest_ns: int | None = None) -> ParsedTrace:
    """A snapshot as Events: PROBLEM for a problem code, BOUND for a started present
    device, UNBOUND for one that is not present (phantom)."""
    out = ParsedTrace()
    for s in states:
        data: dict[str, Any] = {"snapshot": s.to_json()}
        dev = DeviceId(instance=s.instance_id)
        if s.problem_code:
            kind = Kind.PROBLEM
            data.update(problem_code=s.problem_code, problem=s.problem, problem_status=s.problem_status)
        elif not s.present:
            kind = Kind.UNBOUND
        elif s.status.upper() == "OK":
            kind = Kind.BOUND
        else:
            kind = Kind.PROBLEM
            data = flagged(data, "status-without-problem-code")
        out.events.append(Event(t_host_ns=received_ns, source=Source.GUEST_PNP, kind=kind, device=dev,
                                data=data, t_guest_ns=t_guest_ns))
    return out
