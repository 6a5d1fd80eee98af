"""Kernel-PnP ETW: the logman commands that record it, the Get-WinEvent script that
decodes it, and the parser that turns the decoded records into Events.

What was checked against Microsoft documentation
------------------------------------------------
* ``logman create trace <name> -o <path> -p <provider [flags [level]]> -ow -ets``,
  ``logman update trace <name> -p ... -ets`` and ``logman stop <name> -ets``:
  learn.microsoft.com/windows-server/administration/windows-commands/logman-create-trace
  (``-ets``: "Send commands to Event Trace Sessions directly without saving or
  scheduling"; ``-p <provider [flags [level]]>``; ``-ow`` overwrite) and logman-update,
  logman-stop on the same site.
* ``Get-WinEvent -Path <file.etl> -Oldest``: the FileSet parameter set; ``-Oldest`` is
  required to read .etl files (events are read oldest first; the cmdlet refuses
  newest-first for trace files).
* The provider: Microsoft-Windows-Kernel-PnP, {9C205A39-1250-487D-ABD7-E831C6290539}
  (the GUID Windows prints in ``logman query providers`` and in every Kernel-PnP event's
  System/Provider element). Keywords 0xFFFFFFFFFFFFFFFF (all), level 5 (verbose).

What is *not* documented by Microsoft
-------------------------------------
Kernel-PnP event IDs and their payload layouts are defined by the provider's manifest,
not by public documentation. The table below is therefore *data*: ``EventMap.load``
reads an override (JSON), and ``MANIFEST_CHECK`` (``wevtutil gp
Microsoft-Windows-Kernel-PnP /ge /gm:true``) prints the manifest of the guest at hand;
``manifest_event_ids`` reads its output so a run can record which table IDs the guest
actually defines.

Where the table comes from (``verified=True`` means: the ID *and* the field names used
here are in a published dump of the manifest):

* Manifest dumps (TDH, the PerfView method) of Windows 7 7600, Windows 10 10240, 17134
  and 18990: github.com/repnz/etw-providers-docs, ``Manifests-Win*/Microsoft-Windows-
  Kernel-PnP.xml``. They give every event's template (field names, in payload order),
  e.g. 219 ``DriverLoad`` = DeviceStartStopArgs (DriverNameLength, DriverName, Status,
  FailureNameLength, FailureName, Version); 410/411/412 = DeviceInstanceId, DriverName,
  ClassGuid, ServiceName, LowerFilters, UpperFilters, Problem, Status; 803-806 = Phase,
  Device; 830-832 and 850/851 = Device; 852 = DeviceInstance; 853 = DeviceInstance,
  Status. 400-442 and 700-853 exist from Windows 10 on (not in the Windows 7 dump);
  442 appears from 17134.
* The message strings say which field is what (the dumps carry no messages):
  microsoft-windows-kernel-pnp-events.dll message tables, 6.2.9200 to 10.0.22000
  (github.com/libyal/winevt-kb, docs/sources/message-files/MessageFile-microsoft-windows-
  kernel-pnp-events.dll.md), e.g. 219 "The driver %5 failed to load for the device %2"
  (so DriverName holds the *device* and FailureName the driver), 850 "Begin assigning
  resources to device tree below %1", 852 "Begin rebalancing resources for device %2",
  803 "Begin processing phase %1 of starting device %2". The same message table of
  10.0.22000 (Windows 11) adds 1000 "Device %1 could not be query removed as the
  removal was vetoed", 1010/1011 "Device %1 has been surprise removed ..." and 1020/1021
  (rebalance succeeded/failed); no manifest dump of that build was found, so those rows
  stay ``verified=False`` (their device is found by its shape, see ``looks_like_instance_id``).

Never parsed: the event message. It is localised text; it is only fetched when asked
(``include_message``) and stored as an opaque extra.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.agent.powershell import PsOutputError, parse_ps_json
from lab.errors import ConfigError
from lab.events import DeviceId, Event, Kind, Source
from lab.guest.windows.trace.common import (
    GuestScript,
    ParsedTrace,
    TraceParseError,
    filetime_to_unix_ns,
    flagged,
    iso_to_unix_ns,
    looks_like_instance_id,
    validate_guest_path,
    validate_guid,
    validate_session,
)

KERNEL_PNP_NAME = "Microsoft-Windows-Kernel-PnP"
KERNEL_PNP_GUID = "{9C205A39-1250-487D-ABD7-E831C6290539}"
ALL_KEYWORDS = "0xFFFFFFFFFFFFFFFF"
LEVEL_VERBOSE = 5

_HEX_RE = re.compile(r"^0x[0-9A-Fa-f]{1,16}$")


@dataclass(frozen=True)
class EtwProvider:
    """One provider to enable: GUID, keyword mask (hex) and level (0-255)."""

    guid: str
    keywords: str = ALL_KEYWORDS
    level: int = LEVEL_VERBOSE
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "guid", validate_guid(self.guid))
        if not _HEX_RE.match(self.keywords):
            raise ConfigError(f"provider {self.guid}: keywords must be hex like 0xFF, got {self.keywords!r}")
        if not 0 <= int(self.level) <= 255:
            raise ConfigError(f"provider {self.guid}: level must be 0..255, got {self.level}")

    @property
    def level_hex(self) -> str:
        return f"0x{int(self.level):X}"


KERNEL_PNP = EtwProvider(KERNEL_PNP_GUID, ALL_KEYWORDS, LEVEL_VERBOSE, KERNEL_PNP_NAME)


@dataclass(frozen=True)
class EtwSession:
    """A real-time-to-file ETW session: name, .etl path and providers (first one creates)."""

    name: str
    etl: str
    providers: tuple[EtwProvider, ...]

    def __post_init__(self) -> None:
        validate_session(self.name)
        validate_guest_path(self.etl)
        if not self.providers:
            raise ConfigError(f"trace session {self.name} has no provider")


# --------------------------------------------------------------- pinned commands
# Native programs run inside "& { $ErrorActionPreference = 'Continue'; ... 2>&1 }": under
# 'Stop', Windows PowerShell 5.1 turns the first stderr line of a redirected native
# command into a terminating NativeCommandError before $LASTEXITCODE can be read.

_LOGMAN_CREATE = r"""
$out = & { $ErrorActionPreference = 'Continue'; & logman.exe create trace $p.Session -o $p.Etl -p $p.Provider $p.Keywords $p.Level -ow -ets 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("logman create trace failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
"""

_LOGMAN_UPDATE = r"""
$out = & { $ErrorActionPreference = 'Continue'; & logman.exe update trace $p.Session -p $p.Provider $p.Keywords $p.Level -ets 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("logman update trace failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
"""

_LOGMAN_STOP = r"""
$out = & { $ErrorActionPreference = 'Continue'; & logman.exe stop $p.Session -ets 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("logman stop failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
"""

_LOGMAN_STOP_STALE = r"""
# a session left over from an aborted run would make 'create' fail; absence is fine
$null = & { $ErrorActionPreference = 'Continue'; & logman.exe stop $p.Session -ets 2>&1 }
"""

_PREPARE_DIR = r"""
New-Item -ItemType Directory -Force -Path $p.Dir | Out-Null
"""

# Get-WinEvent reads .etl files oldest-first only (-Oldest is required for them).
# Properties are raw payload values; Data keeps the manifest's field names (from the
# event XML), which are not localised. TimeCreated goes out as FILETIME ticks (exact,
# 100 ns) and as ISO-8601 UTC with 7 fractional digits.
_DECODE = r"""
try { $events = @(Get-WinEvent -Path $p.Etl -Oldest -ErrorAction Stop) }
catch {
    if ($_.FullyQualifiedErrorId -like 'NoMatchingEventsFound*') { $events = @() } else { throw }
}
foreach ($e in $events) {
    $data = [ordered]@{}
    try {
        $x = [xml]$e.ToXml()
        foreach ($d in @($x.Event.EventData.Data)) {
            if ($null -ne $d -and $d.Name) { $data[[string]$d.Name] = [string]$d.InnerText }
        }
    } catch { $data['__xml_error'] = [string]$_.Exception.Message }
    $props = @(foreach ($q in $e.Properties) {
        $v = $q.Value
        if ($null -eq $v) { $null }
        elseif ($v -is [byte[]]) { [BitConverter]::ToString($v) }
        else { [string]$v }
    })
    $t = $e.TimeCreated
    [pscustomobject]@{
        Id = $e.Id
        Version = $e.Version
        Level = $e.Level
        Task = $e.Task
        Opcode = $e.Opcode
        Keywords = if ($null -ne $e.Keywords) { '0x{0:X16}' -f $e.Keywords } else { $null }
        ProviderName = $e.ProviderName
        ProviderId = [string]$e.ProviderId
        RecordId = $e.RecordId
        TimeCreatedFileTime = if ($null -ne $t) { $t.ToFileTimeUtc() } else { $null }
        TimeCreatedUtc = if ($null -ne $t) { $t.ToUniversalTime().ToString('o') } else { $null }
        ActivityId = [string]$e.ActivityId
        RelatedActivityId = [string]$e.RelatedActivityId
        ProcessId = $e.ProcessId
        ThreadId = $e.ThreadId
        Properties = $props
        Data = $data
        Message = if ($p.IncludeMessage) { try { $e.FormatDescription() } catch { $null } } else { $null }
    }
}
"""

MANIFEST_CHECK = r"""
$out = & { $ErrorActionPreference = 'Continue'; & wevtutil.exe gp $p.Provider /ge /gm:true 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("wevtutil gp failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
$out -join "`n"
"""


def prepare_dir_script(path: str) -> GuestScript:
    return GuestScript("prepare trace directory", _PREPARE_DIR, {"Dir": validate_guest_path(path)})


def start_scripts(session: EtwSession) -> list[GuestScript]:
    """Stop a stale session of that name, create+start with the first provider, add the rest."""
    first, *rest = session.providers
    out = [
        GuestScript(f"etw: stop stale session {session.name}", _LOGMAN_STOP_STALE,
                    {"Session": session.name}),
        GuestScript(f"etw: create session {session.name} with {first.name or first.guid}", _LOGMAN_CREATE,
                    {"Session": session.name, "Etl": session.etl, "Provider": first.guid,
                     "Keywords": first.keywords, "Level": first.level_hex}),
    ]
    for prov in rest:
        out.append(GuestScript(f"etw: add provider {prov.name or prov.guid} to {session.name}", _LOGMAN_UPDATE,
                               {"Session": session.name, "Provider": prov.guid,
                                "Keywords": prov.keywords, "Level": prov.level_hex}))
    return out


def stop_script(session: EtwSession) -> GuestScript:
    return GuestScript(f"etw: stop session {session.name}", _LOGMAN_STOP, {"Session": session.name})


def decode_script(etl: str, include_message: bool = False, timeout: float | None = 120.0) -> GuestScript:
    return GuestScript(f"etw: decode {etl}", _DECODE,
                       {"Etl": validate_guest_path(etl), "IncludeMessage": bool(include_message)},
                       structured=True, depth=4, timeout=timeout)


def manifest_check_script(provider: str = KERNEL_PNP_NAME) -> GuestScript:
    """``wevtutil gp Microsoft-Windows-Kernel-PnP /ge /gm:true``: the guest's own event table."""
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9\-]{0,127}$", provider):
        raise ConfigError(f"not a provider name: {provider!r}")
    return GuestScript(f"etw: manifest of {provider}", MANIFEST_CHECK, {"Provider": provider})


def manifest_event_ids(wevtutil_output: str) -> set[int]:
    """Event IDs listed by ``wevtutil gp ... /ge``: the ``value:`` line of each ``event:`` block."""
    ids: set[int] = set()
    in_event = False
    for raw in wevtutil_output.splitlines():
        line = raw.strip()
        if line == "event:":
            in_event = True
            continue
        if in_event and line.startswith("value:"):
            try:
                ids.add(int(line.split(":", 1)[1].strip(), 0))
            except ValueError:
                pass
            in_event = False
    return ids


# --------------------------------------------------------------- the event table

#: manifest dumps the ``verified`` rows were checked against (see the module docstring)
MANIFEST_SOURCE = ("github.com/repnz/etw-providers-docs Manifests-Win7-7600, -Win10-10240, "
                   "-Win10-17134, -Win10-18990 /Microsoft-Windows-Kernel-PnP.xml")


@dataclass(frozen=True)
class EventRule:
    """How one Kernel-PnP event ID becomes an Event.

    ``root``: the event names the root of a device *subtree* (rebalance, resource
    assignment), not a device the rules should track: its instance goes to
    ``data[root]`` and the Event has no ``device``. ``ok``: a fixed outcome (a veto *is*
    a failed query-remove; the event carries no NTSTATUS saying so) set as
    ``data['ok']``. ``fields``: payload field -> data key, copied when present.
    """

    kind: Kind
    name: str
    phase: str = "point"        # "begin" | "end" | "point"
    verified: bool = False      # True when confirmed against a published manifest dump
    root: str | None = None
    ok: bool | None = None
    fields: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind.value, "name": self.name, "phase": self.phase,
                               "verified": self.verified}
        if self.root is not None:
            out["root"] = self.root
        if self.ok is not None:
            out["ok"] = self.ok
        if self.fields:
            out["fields"] = dict(self.fields)
        return out


_R = EventRule
DEFAULT_EVENT_TABLE: dict[int, EventRule] = {
    # System channel. 219 "The driver %5 failed to load for the device %2": DriverName
    # (%2) is the device instance, FailureName (%5) the driver, Status an NTSTATUS
    # (UInt32). No problem code in the payload, so the event carries none.
    219: _R(Kind.PROBLEM, "DriverLoadFailed", verified=True, fields=(("FailureName", "driver"),)),
    # 223/224 "Begin/End attempting to eject device %2[. Status: %3]" (DriverName = device)
    223: _R(Kind.KERNEL_LOG, "DeviceEject", "begin", True),
    224: _R(Kind.KERNEL_LOG, "DeviceEject", "end", True),
    # 225 "The application %3 with process id %1 stopped the removal or ejection for the
    # device %5": a vetoed query-remove (DeviceEjectArgs: ProcessId, ProcessName, DeviceInstance)
    225: _R(Kind.QUERY_REMOVE, "RemovalVetoed", verified=True, ok=False,
            fields=(("ProcessName", "process"), ("ProcessId", "process_id"))),
    # Configuration channel (Windows 10+)
    400: _R(Kind.KERNEL_LOG, "DeviceConfigured", verified=True),
    410: _R(Kind.START, "DeviceStarted", verified=True),
    411: _R(Kind.PROBLEM, "DeviceProblemStarting", verified=True),
    420: _R(Kind.REMOVE, "DeviceDeleted", verified=True),
    # 421 "Device %1 could not be deleted" (Problem, Status): an uninstall that failed,
    # not an IRP the driver failed; kept as a log line (its code/status are copied)
    421: _R(Kind.KERNEL_LOG, "DeviceDeleteFailed", verified=True),
    430: _R(Kind.KERNEL_LOG, "DeviceRequiresFurtherInstallation", verified=True),
    # 440-442: settings migrated (or not) from a previous OS installation
    440: _R(Kind.KERNEL_LOG, "DeviceMigrated", verified=True),
    441: _R(Kind.KERNEL_LOG, "DeviceMigrationFailed", verified=True),
    442: _R(Kind.KERNEL_LOG, "DeviceNotMigrated", verified=True),
    # user-mode CM_Query_And_Remove_SubTree (CfgMgr_QueryRemoveStart: QueryRemoveType,
    # Device; ...Stop: Device, no status: the outcome is not in the event)
    704: _R(Kind.KERNEL_LOG, "CfgMgrQueryRemove", "begin", True),
    705: _R(Kind.KERNEL_LOG, "CfgMgrQueryRemove", "end", True),
    # 803-806 "Begin/End processing phase %1 of (re)starting device %2": one pair per
    # phase, no status. The end of a phase is not a successful IRP_MN_START_DEVICE, so
    # these are spans, not START (a START without status counts as success in the rules,
    # and would stand in for the PortCls restart callbacks).
    803: _R(Kind.KERNEL_LOG, "ProcessDeviceStart", "begin", True),
    804: _R(Kind.KERNEL_LOG, "ProcessDeviceStart", "end", True),
    805: _R(Kind.KERNEL_LOG, "ProcessDeviceRestart", "begin", True),
    806: _R(Kind.KERNEL_LOG, "ProcessDeviceRestart", "end", True),
    # 830-832 "Removal of %1 has been queued" / "Begin/End removal of %1": the removal
    # action; whether it removed anything (or was vetoed) is not in the event
    830: _R(Kind.KERNEL_LOG, "DeviceRemovalQueued", verified=True),
    831: _R(Kind.KERNEL_LOG, "DeviceRemoval", "begin", True),
    832: _R(Kind.KERNEL_LOG, "DeviceRemoval", "end", True),
    # 840/841 "Begin/End resetting device %2 [with status %3, veto type %4, veto name %6]"
    840: _R(Kind.KERNEL_LOG, "DeviceReset", "begin", True),
    841: _R(Kind.KERNEL_LOG, "DeviceReset", "end", True,
            fields=(("VetoType", "veto_type"), ("VetoName", "veto"))),
    # 850/851 "Begin/End assigning resources to device tree below %1" and 852/853
    # "Begin/End rebalancing resources for device %2": the instance is a subtree root
    850: _R(Kind.RESOURCES_ASSIGNED, "AssignResources", "begin", True, root="assign_root"),
    851: _R(Kind.RESOURCES_ASSIGNED, "AssignResources", "end", True, root="assign_root"),
    852: _R(Kind.REBALANCE_START, "Rebalance", "begin", True, root="rebalance_root"),
    853: _R(Kind.REBALANCE_END, "Rebalance", "end", True, root="rebalance_root"),
    # Windows 11 (Device Management channel; message table 10.0.22000, no manifest dump)
    1000: _R(Kind.QUERY_REMOVE, "QueryRemoveVetoed", ok=False),
    1010: _R(Kind.SURPRISE_REMOVAL, "SurpriseRemovedMissing"),
    1011: _R(Kind.SURPRISE_REMOVAL, "SurpriseRemovedFailing"),
    1020: _R(Kind.KERNEL_LOG, "RebalanceSucceeded"),
    1021: _R(Kind.KERNEL_LOG, "RebalanceFailed"),
}
del _R

#: payload field names in payload order, per event ID, from the manifest dumps (several
#: when builds differ). Used only to name the positional ``Properties`` of a record that
#: has no field names (``Get-WinEvent | ConvertTo-Json``), and only on an exact count.
TEMPLATES: dict[int, tuple[tuple[str, ...], ...]] = {}
_DEVICE_START_STOP = ("DriverNameLength", "DriverName", "Status", "FailureNameLength", "FailureName",
                      "Version")
_T400_10240 = ("DeviceInstanceId", "DriverName", "ClassGuid", "DriverDate", "DriverVersion",
               "DriverProvider", "DriverInbox", "DriverSection", "DriverRank", "MatchingDeviceId",
               "OutrankedDrivers", "DeviceUpdated", "Status")
_T410 = ("DeviceInstanceId", "DriverName", "ClassGuid", "ServiceName", "LowerFilters", "UpperFilters",
         "Problem", "Status")
_T420 = ("DeviceInstanceId", "ClassGuid", "Problem", "Status")
_T440 = ("DeviceInstanceId", "LastDeviceInstanceId", "ClassGuid", "LocationPath", "MigrationRank",
         "Present", "Status")
for _ids, _tpls in (
        ((219, 224), (_DEVICE_START_STOP,)),
        ((223,), (("DriverNameLength", "DriverName"),)),
        ((225,), (("ProcessId", "ProcessNameLength", "ProcessName", "DeviceInstanceLength",
                   "DeviceInstance"),)),
        ((400, 401, 402, 403), (_T400_10240, _T400_10240 + ("ParentDeviceInstanceId",))),
        ((410, 411, 412), (_T410,)),
        ((420, 421), (_T420,)),
        ((430,), (("DeviceInstanceId",),)),
        ((440, 441, 442), (_T440,)),
        ((704,), (("QueryRemoveType", "Device"),)),
        ((705, 830, 831, 832, 850, 851), (("Device",),)),
        ((803, 804, 805, 806), (("Phase", "Device"),)),
        ((840, 852), (("DeviceInstanceLength", "DeviceInstance"),)),
        ((841,), (("DeviceInstanceLength", "DeviceInstance", "Status", "VetoType", "VetoNameLength",
                   "VetoName"),)),
        ((853,), (("DeviceInstanceLength", "DeviceInstance", "Status"),))):
    for _id in _ids:
        TEMPLATES[_id] = _tpls

_PHASES = ("begin", "end", "point")
#: field names that hold the device instance id, in order of preference; ``Device`` is
#: the field of 704/705, 803-806, 830-832 and 850/851 (manifest dumps above)
_INSTANCE_FIELDS = ("DeviceInstanceId", "DeviceInstanceID", "InstanceId", "DeviceId", "DeviceID",
                    "TargetDeviceInstanceId", "DeviceInstance", "Device")


def _norm_guid(value: object) -> str:
    return str(value or "").strip().strip("{}").lower()


@dataclass(frozen=True)
class EventMap:
    """Event ID -> rule, for one provider; loadable from JSON so it can be corrected
    without a code change when a Windows build renumbers events.

    Only records of this provider (by name or by GUID; a record naming no provider at
    all is assumed to be one) are looked up: another provider's event ID means
    something else entirely.
    """

    rules: Mapping[int, EventRule] = field(default_factory=lambda: dict(DEFAULT_EVENT_TABLE))
    provider: str = KERNEL_PNP_NAME
    provider_guid: str = KERNEL_PNP_GUID

    def get(self, event_id: int) -> EventRule | None:
        return self.rules.get(event_id)

    def is_provider(self, name: object, guid: object) -> bool:
        """True when the record is this provider's (either identity matches) or names none."""
        name_s = str(name or "").strip()
        guid_s = _norm_guid(guid)
        if not name_s and not guid_s:
            return True
        return (bool(name_s) and name_s.lower() == self.provider.lower()) or \
            (bool(guid_s) and guid_s == _norm_guid(self.provider_guid))

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider, "provider_guid": self.provider_guid,
                "events": {str(k): v.to_json() for k, v in sorted(self.rules.items())}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, base: EventMap | None = None) -> EventMap:
        """``{"events": {"410": {"kind": "start", "name": ..., "phase": ...}}}``; entries
        replace those of ``base`` (the default table) and ``null`` removes one."""
        rules: dict[int, EventRule] = dict((base or cls()).rules)
        events = data.get("events")
        if not isinstance(events, Mapping):
            raise ConfigError('event map must have an "events" object')
        for key, spec in events.items():
            try:
                eid = int(key)
            except (TypeError, ValueError):
                raise ConfigError(f"event map: {key!r} is not an event ID") from None
            if spec is None:
                rules.pop(eid, None)
                continue
            if not isinstance(spec, Mapping):
                raise ConfigError(f"event map: entry {eid} must be an object")
            try:
                kind = Kind(spec["kind"])
            except (KeyError, ValueError):
                raise ConfigError(f"event map: entry {eid} has an unknown kind {spec.get('kind')!r}; "
                                  f"one of {[k.value for k in Kind]}") from None
            phase = spec.get("phase", "point")
            if phase not in _PHASES:
                raise ConfigError(f"event map: entry {eid} phase must be one of {_PHASES}")
            root = spec.get("root")
            ok = spec.get("ok")
            fields = spec.get("fields") or {}
            if root is not None and not isinstance(root, str) or ok is not None and not isinstance(ok, bool) \
                    or not isinstance(fields, Mapping):
                raise ConfigError(f"event map: entry {eid}: root must be a string, ok a boolean, "
                                  "fields an object")
            rules[eid] = EventRule(kind, str(spec.get("name", f"Event{eid}")), phase,
                                   bool(spec.get("verified", False)), root, ok,
                                   tuple((str(k), str(v)) for k, v in fields.items()))
        return cls(rules=rules, provider=str(data.get("provider", KERNEL_PNP_NAME)),
                   provider_guid=str(data.get("provider_guid", KERNEL_PNP_GUID)))

    @classmethod
    def load(cls, path: str | Path | None) -> EventMap:
        if path is None:
            return cls()
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"cannot read event map {p}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(f"event map {p} is not valid JSON: {exc}") from None
        return cls.from_json(data)

    def unconfirmed(self, manifest_ids: Iterable[int]) -> list[int]:
        """Table IDs the guest's manifest does not define (the table needs fixing)."""
        have = set(manifest_ids)
        return sorted(eid for eid in self.rules if eid not in have)


# --------------------------------------------------------------- parsing

def _named_fields(record: Mapping[str, Any], event_id: int | None) -> dict[str, Any]:
    """The record's payload by field name: ``Data`` when it has names, else the positional
    ``Properties`` named by the manifest template of the same length (``TEMPLATES``)."""
    data = record.get("Data")
    if isinstance(data, Mapping) and data:
        return dict(data)
    props = record.get("Properties")
    if event_id is not None and isinstance(props, list):
        for tpl in TEMPLATES.get(event_id, ()):
            if len(tpl) == len(props):
                return dict(zip(tpl, props))
    return {}


def _instance_of(record: Mapping[str, Any], fields: Mapping[str, Any]) -> str | None:
    """The device instance id: a known field name first, then any value of that shape
    (219 keeps it in ``DriverName``; positional ``Properties`` have no names at all)."""
    for name in _INSTANCE_FIELDS:
        v = fields.get(name)
        if looks_like_instance_id(v):
            return str(v)
    for v in fields.values():
        if looks_like_instance_id(v):
            return str(v)
    props = record.get("Properties")
    if isinstance(props, list):
        for v in props:
            if looks_like_instance_id(v):
                return str(v)
    return None


def _time_ns(record: Mapping[str, Any]) -> int | None:
    ft = record.get("TimeCreatedFileTime")
    if isinstance(ft, int) and not isinstance(ft, bool) and ft > 0:
        return filetime_to_unix_ns(ft)
    if isinstance(ft, str) and ft.strip().isdigit():
        return filetime_to_unix_ns(int(ft.strip()))
    iso = record.get("TimeCreatedUtc")
    if isinstance(iso, str):
        try:
            return iso_to_unix_ns(iso)
        except ValueError:
            return None
    return None


def norm_status(value: Any) -> Any:
    """NTSTATUS as the manifest's HexInt32 renders it (``0xC0000365``). A UInt32 field
    (219's Status, ``Get-WinEvent`` Properties) arrives as a decimal number or string;
    hex strings and names are kept as they are."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return f"0x{value & 0xFFFFFFFF:X}"
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) <= 10:
        return f"0x{int(value.strip()) & 0xFFFFFFFF:X}"
    return value


class RecordMapper:
    """Decoded event records -> Events, one at a time (the one mapping of Kernel-PnP
    records, for the live tracer's decode output and for logs read from files).

    * Records of another provider (``EventMap.is_provider``) become ``Kind.KERNEL_LOG``
      flagged ``other-provider``; their ID is never looked up in the table.
    * Mapped IDs become their table kind with ``data['event_id']``, ``data['name']``,
      ``data['phase']`` and the whole raw record under ``data['raw']``.
    * Unknown IDs are kept as ``Kind.KERNEL_LOG`` flagged ``unmapped-event-id``.
    * A bad or missing timestamp keeps the event with ``t_guest_ns=None`` and the
      flag ``bad-timestamp``; a record that is not an object becomes a flagged
      ``malformed-record`` event holding the raw value.
    * ``end`` events get ``duration_ns`` from the latest unmatched ``begin`` of the
      same name for the same device (or subtree root, or ActivityId) when both have
      times. A ``begin`` is emitted as ``Kind.CALL_ENTER`` with ``data['for_kind']``
      (except the rebalance pair, whose kinds are begin/end already), so each operation
      yields one event of its kind; a begin without an end (a hang) stays visible.
    * ``Status`` and ``Problem`` fields become ``data['status']`` / ``data['code']``
      (the names lab.rules.windows_pnp reads); a rule's ``root``, ``ok`` and ``fields``
      apply as ``EventRule`` says.
    """

    def __init__(self, event_map: EventMap | None = None, source: Source = Source.GUEST_ETW) -> None:
        self.emap = event_map or EventMap()
        self.source = source
        self.problems: list[str] = []
        self._open: dict[tuple[str, str], Event] = {}

    def map(self, index: int, rec: Any, *, received_ns: int,
            extra: Mapping[str, Any] | None = None) -> Event:
        """One record -> one Event. ``received_ns`` is the host time to stamp (the live
        tracer's receive time); ``extra`` is merged into ``data`` (e.g. ``at``)."""
        source = self.source
        if not isinstance(rec, Mapping):
            self.problems.append(f"record {index}: not an object ({type(rec).__name__})")
            return Event(t_host_ns=received_ns, source=source, kind=Kind.KERNEL_LOG,
                         data=flagged({"raw": rec, "index": index, **(extra or {})}, "malformed-record"))
        flags: list[str] = []
        raw_id = rec.get("Id")
        event_id: int | None
        try:
            event_id = int(raw_id) if raw_id is not None and not isinstance(raw_id, bool) else None
        except (TypeError, ValueError, OverflowError):
            event_id = None
        if event_id is None:
            flags.append("missing-event-id")
            self.problems.append(f"record {index}: no usable event Id")
        t_guest = _time_ns(rec)
        if t_guest is None:
            flags.append("bad-timestamp")
            self.problems.append(f"record {index} (Id {event_id}): bad or missing TimeCreated")
        ours = self.emap.is_provider(rec.get("ProviderName"), rec.get("ProviderId"))
        rule = self.emap.get(event_id) if event_id is not None and ours else None
        if not ours:
            flags.append("other-provider")
        elif rule is None and event_id is not None:
            flags.append("unmapped-event-id")
        fields = _named_fields(rec, event_id)
        instance = _instance_of(rec, fields) if ours else None
        data: dict[str, Any] = {
            "event_id": event_id,
            "provider": rec.get("ProviderName"),
            "index": index,
            "raw": dict(rec),
        }
        if rule is not None:
            data.update(name=rule.name, phase=rule.phase, verified=rule.verified)
            if rule.ok is not None:
                data["ok"] = rule.ok
            for fname, dkey in rule.fields:
                if fields.get(fname) not in (None, ""):
                    data[dkey] = fields[fname]
        if ours:
            if fields.get("Status") not in (None, ""):
                data["status"] = norm_status(fields["Status"])   # NTSTATUS, as the rules read it
            if fields.get("Problem") not in (None, ""):
                try:
                    data["code"] = int(str(fields["Problem"]), 0)   # CM_PROB_* of 410/411
                except ValueError:
                    data["code"] = fields["Problem"]
        device: DeviceId | None = DeviceId(instance=instance) if instance else None
        if rule is not None and rule.root is not None:
            if instance:
                data[rule.root] = instance
            device = None
        if extra:
            data.update(extra)
        if flags:
            data = flagged(data, *flags)
        kind = rule.kind if rule is not None else Kind.KERNEL_LOG
        if rule is not None and rule.phase == "begin" and kind not in (Kind.REBALANCE_START, Kind.REBALANCE_END):
            # one event of the IRP kind per operation (its end, with the duration);
            # the begin is a CALL_ENTER naming the kind it opens
            data["for_kind"] = kind.value
            kind = Kind.CALL_ENTER
        event = Event(t_host_ns=received_ns, source=source, kind=kind, device=device,
                      data=data, t_guest_ns=t_guest)
        if rule is not None and rule.phase in ("begin", "end"):
            key = (rule.name, instance or str(rec.get("ActivityId") or ""))  # root or device
            if rule.phase == "begin":
                self._open[key] = event
            else:
                begin = self._open.pop(key, None)
                if begin is not None and begin.t_guest_ns is not None and t_guest is not None \
                        and t_guest >= begin.t_guest_ns:
                    event = Event(t_host_ns=event.t_host_ns, source=source, kind=kind,
                                  device=event.device, duration_ns=t_guest - begin.t_guest_ns,
                                  data={**data, "begin_index": begin.data.get("index")},
                                  t_guest_ns=t_guest)
        return event

    def unmatched(self) -> list[Event]:
        """The ``begin`` events still waiting for their ``end`` (taken out)."""
        out = list(self._open.values())
        self._open.clear()
        return out

    def finish(self) -> list[str]:
        """Problems so far, plus one per ``begin`` that never got its ``end``."""
        for ev in self.unmatched():
            who = ev.device.instance if ev.device is not None else None
            self.problems.append(f"{ev.data.get('name')} begin (record {ev.data.get('index')}, "
                                 f"{who or 'no device'}) has no matching end")
        return self.problems


def parse_records(records: list[Any], *, received_ns: int, event_map: EventMap | None = None,
                  source: Source = Source.GUEST_ETW) -> ParsedTrace:
    """Decoded Get-WinEvent records -> Events (see ``RecordMapper`` for the mapping)."""
    mapper = RecordMapper(event_map, source)
    out = ParsedTrace()
    for index, rec in enumerate(records):
        out.events.append(mapper.map(index, rec, received_ns=received_ns))
    out.problems.extend(mapper.finish())
    return out


def parse_etw_json(text: str | bytes, *, received_ns: int, event_map: EventMap | None = None) -> ParsedTrace:
    """Raw ``ConvertTo-Json`` text of the decode script -> Events (see ``parse_records``).

    JSON that cannot be parsed at all raises ``TraceParseError`` naming the position;
    the caller keeps the raw file in the run directory either way.
    """
    try:
        records = parse_ps_json(text, convert_dates=False)
    except PsOutputError as exc:
        raise TraceParseError(f"Kernel-PnP ETW output is not valid JSON: {exc}") from None
    return parse_records(records, received_ns=received_ns, event_map=event_map)
