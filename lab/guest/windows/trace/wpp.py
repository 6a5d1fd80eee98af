"""WPP software tracing of the driver under test: record with logman, format with
tracefmt (TMF files or TMFs made from the PDB with tracepdb), map lines to Events.

Commands (checked against learn.microsoft.com/windows-hardware/drivers/devtest/):
* "Tracefmt Commands": ``tracefmt [EtlFile] [-tmf TMFFile | -p TMFPath] [Options]``,
  options ``-o OutputFile`` and ``-nosummary`` (no .sum file); "Example 2: Basic
  Command": ``tracefmt mytrace.etl -p c:\\tracing -o mytrace.txt``.
* "Tracepdb Commands": ``tracepdb -f PDBFiles -p TMFDirectory`` writes one TMF per
  message GUID into the directory (the TMF file name cannot be chosen).
* The message prefix is set with the ``TRACE_FORMAT_PREFIX`` environment variable
  ("Trace Message Prefix"); the lab pins it so that the line format below holds:
  ``%4!s!`` system time, ``%8!04X!.%3!04X!`` process.thread, ``%1!s!`` component.

tracefmt and tracepdb are WDK tools: they are not in Windows, the user copies them into
the guest (the image builder's ``--driver`` folder is a good place) and names them.

Mapping lines to events is configurable: each ``WppPattern`` is a regular expression
over the message part and the Kind/phase it means. The defaults recognise messages
naming the PnP callbacks (``PnpQueryStop``, ``PnpCancelStop``, ``PnpStop``) with an
optional ``enter``/``exit`` and an optional duration (``took 12 ms``, ``duration=3.5us``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from lab.errors import ConfigError
from lab.events import DeviceId, Event, Kind, Source
from lab.guest.windows.trace.common import GuestScript, ParsedTrace, flagged, validate_guest_path

TRACE_FORMAT_PREFIX = "%4!s! %8!04X!.%3!04X! [%1!s!]"

DEFAULT_LINE_RE = (
    r"^(?P<ts>\d{2}/\d{2}/\d{4}-\d{2}:\d{2}:\d{2}\.\d{1,7})\s+"
    r"(?P<pid>[0-9A-Fa-f]+)\.(?P<tid>[0-9A-Fa-f]+)\s+\[(?P<component>[^\]]*)\]\s?(?P<message>.*)$"
)

_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000}
# optional captures as lookaheads, so that their order in the message does not matter
_DURATION = (r"(?=(?:.*?\b(?:took|duration|elapsed)\s*[=:]?\s*(?P<duration>\d+(?:\.\d+)?)\s*"
             r"(?P<unit>ns|us|µs|ms|s)\b)?)")
_STATUS = r"(?=(?:.*?\bstatus\s*[=:]\s*(?P<status>0x[0-9A-Fa-f]+|\w+))?)"
# "resources: 0xfe800000+0x4000, 0xfe804000-0xfe8040ff": the ranges a START was given
# (lab.rules.windows_pnp.parse_ranges reads both forms)
_RANGE = r"0x[0-9A-Fa-f]+\s*[+-]\s*0x[0-9A-Fa-f]+"
_RESOURCES = (rf"(?=(?:.*?\bres(?:ources?)?\s*[=:]\s*(?P<resources>{_RANGE}"
              rf"(?:\s*[,;]?\s*{_RANGE})*))?)")


@dataclass(frozen=True)
class WppPattern:
    """``regex`` over the message; a match means ``kind`` at ``phase``.

    Named groups used when present: ``duration`` + ``unit`` (ns/us/ms/s), ``status``,
    ``instance`` (a device instance id in the message).
    """

    regex: str
    kind: Kind
    phase: str = "point"
    name: str = ""
    layer: str = ""      # "portcls" marks a PortCls callback (IAdapterPnpManagement::Pnp*)

    def compiled(self) -> re.Pattern[str]:
        try:
            return re.compile(self.regex)
        except re.error as exc:
            raise ConfigError(f"WPP pattern {self.regex!r} is not a valid regular expression: {exc}") from None

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> WppPattern:
        try:
            kind = Kind(d["kind"])
        except (KeyError, ValueError):
            raise ConfigError(f"WPP pattern needs a known kind, got {d.get('kind')!r}") from None
        phase = str(d.get("phase", "point"))
        if phase not in ("begin", "end", "point"):
            raise ConfigError(f"WPP pattern phase must be begin, end or point, got {phase!r}")
        if not isinstance(d.get("regex"), str):
            raise ConfigError("WPP pattern needs a 'regex' string")
        p = cls(d["regex"], kind, phase, str(d.get("name", kind.value)), str(d.get("layer", "")))
        p.compiled()
        return p


def _callback_patterns(word: str, kind: Kind, layer: str = "", name: str = "") -> list[WppPattern]:
    # a START's message may carry the resources it was given; other kinds ignore the group
    extra = _RESOURCES if kind == Kind.START else ""
    name = name or word
    return [
        WppPattern(rf"\b{word}\b.*?\b(?:enter|entry|begin)\b", kind, "begin", name, layer),
        WppPattern(rf"\b{word}\b.*?\b(?:exit|leave|return|end)\b{_STATUS}{_DURATION}{extra}", kind, "end",
                   name, layer),
        WppPattern(rf"\b{word}\b{_STATUS}{_DURATION}{extra}", kind, "point", name, layer),
    ]


#: the IRP minor functions by their WDK names (wdm.h), as a driver's IRP_MJ_PNP dispatch
#: routine traces them (sysvad's PnpHandler, audio/sysvad/adapter.cpp, switches on
#: IRP_MN_REMOVE_DEVICE / IRP_MN_SURPRISE_REMOVAL / IRP_MN_STOP_DEVICE before
#: PcDispatchIrp). ``\b`` keeps IRP_MN_STOP_DEVICE from matching inside
#: IRP_MN_QUERY_STOP_DEVICE or IRP_MN_CANCEL_STOP_DEVICE.
_IRP_NAMES: tuple[tuple[str, Kind], ...] = (
    ("IRP_MN_QUERY_STOP_DEVICE", Kind.QUERY_STOP), ("IRP_MN_CANCEL_STOP_DEVICE", Kind.CANCEL_STOP),
    ("IRP_MN_STOP_DEVICE", Kind.STOP), ("IRP_MN_START_DEVICE", Kind.START),
    ("IRP_MN_QUERY_REMOVE_DEVICE", Kind.QUERY_REMOVE),
    ("IRP_MN_CANCEL_REMOVE_DEVICE", Kind.CANCEL_REMOVE),
    ("IRP_MN_SURPRISE_REMOVAL", Kind.SURPRISE_REMOVAL), ("IRP_MN_REMOVE_DEVICE", Kind.REMOVE),
)

DEFAULT_PATTERNS: tuple[WppPattern, ...] = tuple(
    # PortCls IAdapterPnpManagement callbacks
    # (learn.microsoft.com/windows-hardware/drivers/ddi/portcls/nn-portcls-iadapterpnpmanagement)
    _callback_patterns("PnpQueryStop", Kind.QUERY_STOP, "portcls")
    + _callback_patterns("PnpCancelStop", Kind.CANCEL_STOP, "portcls")
    + _callback_patterns("PnpStop", Kind.STOP, "portcls")
    # IRP-level handlers a driver may trace under these names
    + _callback_patterns("PnpQueryRemove", Kind.QUERY_REMOVE)
    + _callback_patterns("PnpCancelRemove", Kind.CANCEL_REMOVE)
    + _callback_patterns("PnpSurpriseRemoval", Kind.SURPRISE_REMOVAL)
    + _callback_patterns("PnpRemove", Kind.REMOVE)
    + _callback_patterns("PnpStart", Kind.START)
    # a PortCls adapter's StartDevice routine (PcAddAdapterDevice's StartDevice argument,
    # called with the resource list while PortCls handles IRP_MN_START_DEVICE; sysvad's
    # adapter.cpp StartDevice): a start with resources
    + _callback_patterns("StartDevice", Kind.START)
    + [p for word, kind in _IRP_NAMES for p in _callback_patterns(word, kind)]
)


def parse_wpp_timestamp(text: str, utc_offset: timedelta = timedelta(0)) -> int:
    """``MM/DD/YYYY-hh:mm:ss.fffffff`` (tracefmt's %4!s!, guest local time) -> Unix ns."""
    m = re.match(r"^(\d{2})/(\d{2})/(\d{4})-(\d{2}):(\d{2}):(\d{2})\.(\d{1,7})$", text.strip())
    if not m:
        raise ValueError(f"not a tracefmt time stamp: {text!r}")
    mo, d, y, hh, mm, ss, frac = m.groups()
    base = datetime(int(y), int(mo), int(d), int(hh), int(mm), int(ss), tzinfo=timezone(utc_offset))
    return int(base.timestamp()) * 1_000_000_000 + int(frac.ljust(9, "0"))


def parse_lines(text: str, *, received_ns: int, patterns: Sequence[WppPattern] = DEFAULT_PATTERNS,
                line_re: str = DEFAULT_LINE_RE, utc_offset: timedelta = timedelta(0),
                keep_unmatched: bool = False, device: DeviceId | None = None) -> ParsedTrace:
    """tracefmt output -> Events.

    A line that does not have the pinned prefix is a problem entry (with its number);
    a prefixed line that no pattern matches is skipped unless ``keep_unmatched``
    (then a flagged KERNEL_LOG event). ``end`` events without an explicit duration get
    one from the latest open ``begin`` of the same kind on the same thread; a
    ``begin`` is emitted as ``Kind.CALL_ENTER`` with ``data['for_kind']``. Default
    patterns mark PortCls callbacks with ``layer: "portcls"`` and ``callback`` (the
    keys lab.rules.windows_pnp reads) and keep ``status`` when the message has one, and
    ``resources`` (a list of ranges) when a START message names them.

    ``device``: the device whose driver writes this trace (the scenario's
    ``guest.trace.device``). A WPP message carries no device of its own, so every event
    without an ``instance`` in its message is attributed to it; without it the events
    have no device and the per-device rules cannot use them.
    """
    try:
        lre = re.compile(line_re)
    except re.error as exc:
        raise ConfigError(f"WPP line regex is not valid: {exc}") from None
    compiled = [(p, p.compiled()) for p in patterns]
    out = ParsedTrace()
    open_begins: dict[tuple[Kind, str], Event] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip():
            continue
        m = lre.match(line)
        if not m:
            out.problems.append(f"wpp line {lineno}: unrecognised format: {line[:120]!r}")
            continue
        flags: list[str] = []
        try:
            t_guest: int | None = parse_wpp_timestamp(m["ts"], utc_offset)
        except (ValueError, IndexError):
            t_guest = None
            flags.append("bad-timestamp")
            out.problems.append(f"wpp line {lineno}: bad time stamp")
        message = m["message"]
        thread = f"{m['pid']}.{m['tid']}" if "pid" in m.groupdict() else ""
        base = {"line": lineno, "message": message, "component": m.groupdict().get("component"),
                "thread": thread}
        for pat, rx in compiled:
            pm = rx.search(message)
            if not pm:
                continue
            groups = pm.groupdict()
            data: dict[str, Any] = {**base, "pattern": pat.name or pat.kind.value, "phase": pat.phase}
            if pat.layer:
                data["layer"] = pat.layer
                data["callback"] = pat.name
            if groups.get("status"):
                data["status"] = groups["status"]
            if groups.get("resources"):
                data["resources"] = [r.strip() for r in re.findall(_RANGE, groups["resources"])]
            duration = None
            if groups.get("duration"):
                duration = int(float(groups["duration"]) * _UNIT_NS[groups.get("unit") or "ns"])
                data["duration_source"] = "message"
            dev = DeviceId(instance=groups["instance"]) if groups.get("instance") else device
            key = (pat.kind, thread)
            if pat.phase == "begin":
                # the operation's one event of its kind is its end (or point); the begin
                # is a CALL_ENTER so that a handler that never returns is still visible
                data["for_kind"] = pat.kind.value
                ev = Event(t_host_ns=received_ns, source=Source.GUEST_WPP, kind=Kind.CALL_ENTER, device=dev,
                           data=flagged(data, *flags) if flags else data, t_guest_ns=t_guest)
                open_begins[key] = ev
            else:
                begin = open_begins.pop(key, None) if pat.phase == "end" else None
                if duration is None and begin is not None and begin.t_guest_ns is not None \
                        and t_guest is not None and t_guest >= begin.t_guest_ns:
                    duration = t_guest - begin.t_guest_ns
                    data["duration_source"] = "paired"
                if begin is not None:
                    data["begin_line"] = begin.data["line"]
                ev = Event(t_host_ns=received_ns, source=Source.GUEST_WPP, kind=pat.kind, device=dev,
                           duration_ns=duration, data=flagged(data, *flags) if flags else data,
                           t_guest_ns=t_guest)
            out.events.append(ev)
            break
        else:
            if keep_unmatched:
                out.events.append(Event(t_host_ns=received_ns, source=Source.GUEST_WPP, kind=Kind.KERNEL_LOG,
                                        data=flagged(base, "unmatched", *flags), t_guest_ns=t_guest))
    return out


# --------------------------------------------------------------- guest commands

_TRACEPDB = r"""
New-Item -ItemType Directory -Force -Path $p.TmfDir | Out-Null
$out = & { $ErrorActionPreference = 'Continue'; & $p.Tracepdb -f $p.Pdb -p $p.TmfDir 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("tracepdb failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
"""

_TRACEFMT_DIR = r"""
$env:TRACE_FORMAT_PREFIX = $p.Prefix
$out = & { $ErrorActionPreference = 'Continue'; & $p.Tracefmt $p.Etl -p $p.TmfDir -o $p.Out -nosummary 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("tracefmt failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
"""

_TRACEFMT_FILE = r"""
$env:TRACE_FORMAT_PREFIX = $p.Prefix
$out = & { $ErrorActionPreference = 'Continue'; & $p.Tracefmt $p.Etl -tmf $p.Tmf -o $p.Out -nosummary 2>&1 }
if ($LASTEXITCODE -ne 0) { throw ("tracefmt failed ({0}): {1}" -f $LASTEXITCODE, ($out -join ' ')) }
"""

_READ_TEXT = r"""
if (-not (Test-Path -LiteralPath $p.Path)) { [pscustomobject]@{ Missing = $true; Data = '' }; return }
$bytes = [IO.File]::ReadAllBytes($p.Path)
[pscustomobject]@{ Missing = $false; Data = [Convert]::ToBase64String($bytes) }
"""


@dataclass(frozen=True)
class WppFormatting:
    """Where the guest's formatting inputs are: exactly one of tmf_file, tmf_dir, pdb."""

    tracefmt: str
    tmf_file: str | None = None
    tmf_dir: str | None = None
    pdb: str | None = None
    tracepdb: str | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.tmf_file, self.tmf_dir, self.pdb) if x]
        if len(given) != 1:
            raise ConfigError("WPP formatting needs exactly one of: a TMF file, a TMF directory, a PDB")
        validate_guest_path(self.tracefmt)
        for x in given:
            validate_guest_path(x)
        if self.pdb:
            if not self.tracepdb:
                raise ConfigError("formatting WPP from a PDB needs the path of tracepdb.exe in the guest")
            validate_guest_path(self.tracepdb)


def format_scripts(fmt: WppFormatting, etl: str, out_txt: str, tmf_workdir: str) -> list[GuestScript]:
    """tracepdb (when given a PDB), then tracefmt, writing ``out_txt`` in the guest."""
    validate_guest_path(etl)
    validate_guest_path(out_txt)
    scripts: list[GuestScript] = []
    tmf_dir = fmt.tmf_dir
    if fmt.pdb:
        tmf_dir = validate_guest_path(tmf_workdir)
        scripts.append(GuestScript("wpp: tracepdb (TMF from PDB)", _TRACEPDB,
                                   {"Tracepdb": fmt.tracepdb or "", "Pdb": fmt.pdb, "TmfDir": tmf_dir},
                                   timeout=120.0))
    if fmt.tmf_file:
        scripts.append(GuestScript("wpp: tracefmt -tmf", _TRACEFMT_FILE,
                                   {"Prefix": TRACE_FORMAT_PREFIX, "Tracefmt": fmt.tracefmt, "Etl": etl,
                                    "Tmf": fmt.tmf_file, "Out": out_txt}, timeout=300.0))
    else:
        scripts.append(GuestScript("wpp: tracefmt -p", _TRACEFMT_DIR,
                                   {"Prefix": TRACE_FORMAT_PREFIX, "Tracefmt": fmt.tracefmt, "Etl": etl,
                                    "TmfDir": tmf_dir or "", "Out": out_txt}, timeout=300.0))
    return scripts


def read_text_script(path: str, label: str = "wpp: read formatted text") -> GuestScript:
    return GuestScript(label, _READ_TEXT, {"Path": validate_guest_path(path)},
                       structured=True, depth=2, timeout=120.0)
