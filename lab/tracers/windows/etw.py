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
actually defines. IDs 400/410/411/420/430 and their field ``DeviceInstanceId`` match
published dumps of the manifest; 803-806 and 850-853 are from the lab's brief and are
marked ``verified: False`` until a guest's manifest confirms them.

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
from lab.tracers.windows.common import (
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

@dataclass(frozen=True)
class EventRule:
    """How one Kernel-PnP event ID becomes an Event."""

    kind: Kind
    name: str
    phase: str = "point"        # "begin" | "end" | "point"
    verified: bool = False      # True when confirmed against a published manifest dump

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "name": self.name, "phase": self.phase, "verified": self.verified}


DEFAULT_EVENT_TABLE: dict[int, EventRule] = {
    400: EventRule(Kind.KERNEL_LOG, "DeviceConfigured", "point", True),
    410: EventRule(Kind.START, "DeviceStarted", "point", True),
    411: EventRule(Kind.PROBLEM, "DeviceProblemStarting", "point", True),
    420: EventRule(Kind.REMOVE, "DeviceDeleted", "point", True),
    430: EventRule(Kind.KERNEL_LOG, "DeviceRequiresFurtherInstallation", "point", True),
    803: EventRule(Kind.START, "ProcessDeviceStart", "begin"),
    804: EventRule(Kind.START, "ProcessDeviceStart", "end"),
    805: EventRule(Kind.START, "ProcessDeviceRestart", "begin"),
    806: EventRule(Kind.START, "ProcessDeviceRestart", "end"),
    850: EventRule(Kind.RESOURCES_ASSIGNED, "AssignResources", "begin"),
    851: EventRule(Kind.RESOURCES_ASSIGNED, "AssignResources", "end"),
    852: EventRule(Kind.REBALANCE_START, "Rebalance", "begin"),
    853: EventRule(Kind.REBALANCE_END, "Rebalance", "end"),
}

_PHASES = ("begin", "end", "point")
_INSTANCE_FIELDS = ("DeviceInstanceId", "DeviceInstanceID", "InstanceId", "DeviceId", "DeviceID",
                    "TargetDeviceInstanceId", "DeviceInstance")


@dataclass(frozen=True)
class EventMap:
    """Event ID -> rule, for one provider; loadable from JSON so it can be corrected
    without a code change when a Windows build renumbers events."""

    rules: Mapping[int, EventRule] = field(default_factory=lambda: dict(DEFAULT_EVENT_TABLE))
    provider: str = KERNEL_PNP_NAME

    def get(self, event_id: int) -> EventRule | None:
        return self.rules.get(event_id)

    def to_json(self) -> dict[str, Any]:
        return {"provider": self.provider,
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
            rules[eid] = EventRule(kind, str(spec.get("name", f"Event{eid}")), phase,
                                   bool(spec.get("verified", False)))
        return cls(rules=rules, provider=str(data.get("provider", KERNEL_PNP_NAME)))

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

def _instance_of(record: Mapping[str, Any]) -> str | None:
    data = record.get("Data")
    if isinstance(data, Mapping):
        for name in _INSTANCE_FIELDS:
            v = data.get(name)
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


def parse_records(records: list[Any], *, received_ns: int, event_map: EventMap | None = None,
                  source: Source = Source.GUEST_ETW) -> ParsedTrace:
    """Decoded Get-WinEvent records -> Events.

    * Mapped IDs become their table kind with ``data['event_id']``, ``data['name']``,
      ``data['phase']`` and the whole raw record under ``data['raw']``.
    * Unknown IDs are kept as ``Kind.KERNEL_LOG`` flagged ``unmapped-event-id``.
    * A bad or missing timestamp keeps the event with ``t_guest_ns=None`` and the
      flag ``bad-timestamp``; a record that is not an object becomes a flagged
      ``malformed-record`` event holding the raw value.
    * ``end`` events get ``duration_ns`` from the latest unmatched ``begin`` of the
      same name for the same device (or ActivityId) when both have times. A ``begin``
      is emitted as ``Kind.CALL_ENTER`` with ``data['for_kind']`` (except the
      rebalance pair, whose kinds are begin/end already), so each operation yields
      one event of its kind; a begin without an end (a hang) stays visible.
    * ``Status`` and ``Problem`` fields become ``data['status']`` / ``data['code']``
      (the names lab.rules.windows_pnp reads).
    """
    emap = event_map or EventMap()
    out = ParsedTrace()
    open_begins: dict[tuple[str, str], Event] = {}
    for index, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            out.problems.append(f"record {index}: not an object ({type(rec).__name__})")
            out.events.append(Event(t_host_ns=received_ns, source=source, kind=Kind.KERNEL_LOG,
                                    data=flagged({"raw": rec, "index": index}, "malformed-record")))
            continue
        flags: list[str] = []
        raw_id = rec.get("Id")
        event_id: int | None
        try:
            event_id = int(raw_id) if raw_id is not None and not isinstance(raw_id, bool) else None
        except (TypeError, ValueError):
            event_id = None
        if event_id is None:
            flags.append("missing-event-id")
            out.problems.append(f"record {index}: no usable event Id ({raw_id!r})")
        t_guest = _time_ns(rec)
        if t_guest is None:
            flags.append("bad-timestamp")
            out.problems.append(f"record {index} (Id {raw_id!r}): bad or missing TimeCreated")
        rule = emap.get(event_id) if event_id is not None else None
        if rule is None and event_id is not None:
            flags.append("unmapped-event-id")
        instance = _instance_of(rec)
        data: dict[str, Any] = {
            "event_id": event_id,
            "provider": rec.get("ProviderName"),
            "index": index,
            "raw": dict(rec),
        }
        if rule is not None:
            data.update(name=rule.name, phase=rule.phase, verified=rule.verified)
        fields = rec.get("Data") if isinstance(rec.get("Data"), Mapping) else {}
        if fields.get("Status") not in (None, ""):
            data["status"] = fields["Status"]          # NTSTATUS, as the rules read it
        if fields.get("Problem") not in (None, ""):
            try:
                data["code"] = int(str(fields["Problem"]), 0)   # CM_PROB_* of 410/411
            except ValueError:
                data["code"] = fields["Problem"]
        if flags:
            data = flagged(data, *flags)
        kind = rule.kind if rule is not None else Kind.KERNEL_LOG
        if rule is not None and rule.phase == "begin" and kind not in (Kind.REBALANCE_START, Kind.REBALANCE_END):
            # one event of the IRP kind per operation (its end, with the duration);
            # the begin is a CALL_ENTER naming the kind it opens
            data["for_kind"] = kind.value
            kind = Kind.CALL_ENTER
        event = Event(t_host_ns=received_ns, source=source, kind=kind,
                      device=DeviceId(instance=instance) if instance else None,
                      data=data, t_guest_ns=t_guest)
        if rule is not None and rule.phase in ("begin", "end"):
            key = (rule.name, instance or str(rec.get("ActivityId") or ""))
            if rule.phase == "begin":
                open_begins[key] = event
            else:
                begin = open_begins.pop(key, None)
                if begin is not None and begin.t_guest_ns is not None and t_guest is not None \
                        and t_guest >= begin.t_guest_ns:
                    event = Event(t_host_ns=event.t_host_ns, source=source, kind=kind,
                                  device=event.device, duration_ns=t_guest - begin.t_guest_ns,
                                  data={**data, "begin_index": begin.data.get("index")},
                                  t_guest_ns=t_guest)
        out.events.append(event)
    for (name, who), ev in open_begins.items():
        out.problems.append(f"{name} begin (record {ev.data.get('index')}, {who or 'no device'}) "
                            "has no matching end")
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
