"""Windows event logs in the forms people export them, as Events (Kernel-PnP first).

Every form is turned into the record dicts ``lab.guest.windows.trace.etw.RecordMapper``
takes (the keys of the live tracer's decode script: Id, ProviderName, ProviderId,
Version, Level, Task, Opcode, Keywords, RecordId, TimeCreatedFileTime/TimeCreatedUtc,
ActivityId, ProcessId, ThreadId, Properties (positional), Data (field name -> string)),
so an event record is mapped to an Event in one place only, for files and live runs alike.

Forms (``--format`` names):

``event-xml``
    The event schema (learn.microsoft.com/windows/win32/wes/eventschema-elements):
    ``<Event xmlns="http://schemas.microsoft.com/win/2004/08/events/event">`` with
    ``System`` (Provider@Name/@Guid, EventID, Version, Level, Task, Opcode, Keywords,
    TimeCreated@SystemTime, EventRecordID, Correlation@ActivityId, Execution@ProcessID/
    @ThreadID, Channel, Computer, Security@UserID) and ``EventData/Data[@Name]`` or
    ``UserData``; ``wevtutil qe /f:RenderedXml`` adds ``RenderingInfo`` (kept as the
    message only). Found as ``wevtutil qe LOG /f:xml`` (events one after another, no root
    element), ``Get-WinEvent | ForEach-Object { $_.ToXml() }``, Event Viewer's "Save
    Filtered Log File As ... XML" (an ``<Events>`` root) and the XML view pasted into an
    issue.
``event-text``
    Event Viewer's "Copy details as text": ``Log Name:``, ``Source:``, ``Date:``,
    ``Event ID:``, ... ``Description:`` (localised message), ``Event Xml:`` and the event
    XML; several pasted one after another, the XML sometimes HTML-escaped by a forum
    (``&lt;Event ...&gt;``), sometimes missing. Fields come from the XML; with no
    usable XML from the header (Event ID, Source, Date in the exporting machine's local
    time and locale: en-US ``M/D/YYYY h:mm:ss AM``, ISO, de-DE ``D.M.YYYY HH:MM:SS``;
    anything else keeps the event, flagged ``bad-timestamp``). The description is
    localised prose: kept in ``data['description']``, never read for fields. Header
    labels are read in English and German (the languages of the samples we have);
    ``wevtutil qe /f:text``'s ``Event[N]:`` blocks use the same labels.
``event-json``
    ``Get-WinEvent ... | ConvertTo-Json``: EventLogRecord properties (Id, Version,
    Qualifiers, Level, Task, Opcode, Keywords, RecordId, ProviderName, ProviderId,
    LogName, ProcessId, ThreadId, MachineName, UserId, TimeCreated, ActivityId, ...,
    Properties, Message; see tests/unit/data/logs/winevent/PROVENANCE.md for the sample).
    Windows PowerShell 5.1 writes TimeCreated as ``"\\/Date(<ms since 1970 UTC>)\\/"``,
    PowerShell 7 as ISO 8601 with the writer's offset; ``Properties`` is
    ``[{"Value": ...}]`` from ``-Depth 3`` on and the bare type name
    ``"System.Diagnostics.Eventing.Reader.EventProperty"`` at the default depth 2
    (flagged ``properties-not-serialised``: nothing of the payload survived). There are
    no field names: the payload is named by the manifest template of the same length
    (``etw.TEMPLATES``), and the device found by the shape of its instance id. Also the
    lab's own decode-script JSON (already in record form).
``evtx``
    Binary ``.evtx`` (``ElfFile\\0`` signature, [MS-EVEN6]) through the ``evtx`` package
    (``PyEvtxParser(...).records()`` gives each record's XML in ``record["data"]``), then
    the same XML-to-record code.

Accounting: XML and text forms count lines (a line of an understood event is used;
recognised banners between events are skipped: blank lines, ``<?xml ...?>``,
``<Events>``/``</Events>``, Markdown fences, ``Event[N]:``, a PowerShell prompt), the
JSON form counts lines the same way, ``.evtx`` counts records. Times are UTC from the
event (clock ``utc``); header-only events carry the exporting machine's local time
(flag ``local-time``, clock ``local``).

Hostile input: XML is parsed with defusedxml with DTDs forbidden, one ``<Event>`` at a
time (each at most ``MAX_EVENT_CHARS``), so an entity bomb or an external entity fails
that event (counted not understood) and a 100 MB export is read in bounded memory. The
event boundaries are found by a line scan rather than one ``iterparse`` over the file:
the inputs have no single root (streams, pastes with prose between events), and a
broken event must not end the file.
"""

from __future__ import annotations

import html
import json
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as DET  # type: ignore[import-untyped]  # no stubs shipped
from defusedxml import DefusedXmlException  # type: ignore[import-untyped]

from lab.events import Event, Source
from lab.logs.base import LogFormatError, LogInput, Tally
from lab.guest.windows.trace.common import FILETIME_UNIX_OFFSET, flagged
from lab.guest.windows.trace.etw import EventMap, RecordMapper

#: an event's XML larger than this is abandoned (counted not understood)
MAX_EVENT_CHARS = 1 << 20
#: ... and so is one spread over more lines than this
MAX_EVENT_LINES = 20_000
#: a JSON record larger than this is abandoned
MAX_RECORD_CHARS = 4 << 20
#: description text kept per event
MAX_DESCRIPTION_CHARS = 4000
#: .evtx signature ([MS-EVEN6] 2.2 File Header: "ElfFile\0")
EVTX_MAGIC = b"ElfFile\x00"
_PS_TRUNCATED = "System.Diagnostics.Eventing.Reader.EventProperty"


def _local(tag: Any) -> str:
    return str(tag).rpartition("}")[2]


# --------------------------------------------------------------- times

_ISO = re.compile(r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:[.,](\d{1,9}))?"
                  r" ?(Z|UTC|[+-]\d{2}:?\d{2})?(?: UTC)?")
_US = re.compile(r"(\d{1,2})/(\d{1,2})/(\d{4}) (\d{1,2}):(\d{2})(?::(\d{2}))? ?([AaPp])\.?[Mm]\.?")
_DE = re.compile(r"(\d{1,2})\.(\d{1,2})\.(\d{4}),? (\d{1,2}):(\d{2})(?::(\d{2}))?")
_PS_DATE = re.compile(r"/Date\((-?\d{1,16})(?:[+-]\d{4})?\)/")


@dataclass(frozen=True)
class _When:
    ns: int
    local: bool = False       # a wall-clock time of unknown zone, taken as UTC


def _wall_ns(y: int, mo: int, d: int, h: int, mi: int, s: int, frac: str = "") -> int:
    base = datetime(y, mo, d, h, mi, s, tzinfo=timezone.utc)
    return int(base.timestamp()) * 1_000_000_000 + int((frac or "0").ljust(9, "0")[:9])


def parse_iso(text: str) -> _When | None:
    """ISO 8601 with up to 9 fractional digits (SystemTime has 7, Event Viewer's XML view
    9, the ``evtx`` package 6 or 7), ``Z``/``UTC``/an offset, or none (local time)."""
    m = _ISO.fullmatch(text.strip())
    if not m:
        return None
    try:
        ns = _wall_ns(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), m[7] or "")
    except ValueError:
        return None
    zone = m[8]
    if zone is None:
        return _When(ns, local=True)
    if zone in ("Z", "UTC"):
        return _When(ns)
    sign = -1 if zone[0] == "+" else 1
    hh, mm = int(zone[1:3]), int(zone[-2:])
    return _When(ns + sign * (hh * 3600 + mm * 60) * 1_000_000_000)


def parse_header_date(text: str) -> _When | None:
    """Event Viewer's ``Date:`` in the exporting machine's zone and locale: en-US, ISO,
    de-DE. Day/month order is only guessed where the separator says it (``/`` with
    AM/PM is en-US, ``.`` is day first); anything else is not a time we can trust."""
    t = text.strip()
    when = parse_iso(t)
    if when is not None:
        return when
    try:
        m = _US.fullmatch(t)
        if m:
            hour = int(m[4]) % 12 + (12 if m[7] in "Pp" else 0)
            if not 1 <= int(m[4]) <= 12:
                return None
            return _When(_wall_ns(int(m[3]), int(m[1]), int(m[2]), hour, int(m[5]), int(m[6] or 0)),
                         local=True)
        m = _DE.fullmatch(t)
        if m:
            return _When(_wall_ns(int(m[3]), int(m[2]), int(m[1]), int(m[4]), int(m[5]), int(m[6] or 0)),
                         local=True)
    except ValueError:
        return None
    return None


def _set_time(rec: dict[str, Any], when: _When | None) -> None:
    if when is None:
        return
    rec["TimeCreatedFileTime"] = when.ns // 100 + FILETIME_UNIX_OFFSET
    sec, rest = divmod(when.ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(sec, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    rec["TimeCreatedUtc"] = f"{stamp}.{rest // 100:07d}Z"


# --------------------------------------------------------------- XML -> record

class _BadEvent(Exception):
    """An event's XML that cannot be read (the message names no content)."""


def _int_or(value: str | None) -> int | str | None:
    if value is None:
        return None
    v = value.strip()
    if v.isdigit() and len(v) <= 20:
        return int(v)
    return v


def _text(el: Element) -> str:
    return (el.text or "").strip()


def _system(sys_el: Element, rec: dict[str, Any]) -> _When | None:
    when: _When | None = None
    for el in sys_el:
        name = _local(el.tag)
        a = el.attrib
        if name == "Provider":
            rec["ProviderName"] = a.get("Name")
            rec["ProviderId"] = a.get("Guid")
            if a.get("EventSourceName"):
                rec["EventSourceName"] = a["EventSourceName"]
        elif name == "EventID":
            rec["Id"] = _int_or(_text(el))
            if a.get("Qualifiers") is not None:
                rec["Qualifiers"] = _int_or(a["Qualifiers"])
        elif name in ("Version", "Level", "Task", "Opcode"):
            rec[name] = _int_or(_text(el))
        elif name == "Keywords":
            rec["Keywords"] = _text(el)
        elif name == "TimeCreated":
            raw = a.get("SystemTime", "")
            when = parse_iso(raw)
            if when is None or when.local:
                when = None
                rec["TimeCreatedRaw"] = raw[:64]
        elif name == "EventRecordID":
            rec["RecordId"] = _int_or(_text(el))
        elif name == "Correlation":
            rec["ActivityId"] = a.get("ActivityID", a.get("ActivityId", ""))
            rec["RelatedActivityId"] = a.get("RelatedActivityID", a.get("RelatedActivityId", ""))
        elif name == "Execution":
            rec["ProcessId"] = _int_or(a.get("ProcessID"))
            rec["ThreadId"] = _int_or(a.get("ThreadID"))
        elif name == "Channel":
            rec["LogName"] = _text(el)
        elif name == "Computer":
            rec["MachineName"] = _text(el)
        elif name == "Security":
            rec["UserId"] = a.get("UserID")
    return when


def xml_record(root: Element) -> tuple[dict[str, Any], _When | None]:
    """One ``<Event>`` element -> a record (and its time, None when unusable)."""
    if _local(root.tag) != "Event":
        raise _BadEvent("not an Event element")
    rec: dict[str, Any] = {"Properties": [], "Data": {}}
    props: list[Any] = rec["Properties"]
    data: dict[str, Any] = rec["Data"]
    when: _When | None = None
    seen_system = False
    for part in root:
        name = _local(part.tag)
        if name == "System":
            seen_system = True
            when = _system(part, rec)
        elif name == "EventData":
            for el in part:
                kind = _local(el.tag)
                if kind == "Data":
                    value = _text(el)
                    props.append(value)
                    if el.attrib.get("Name"):
                        data[el.attrib["Name"]] = value
                elif kind == "Binary":
                    rec["Binary"] = _text(el)[:4096]
        elif name == "UserData":
            # one element whose children are the fields (e.g. UserPnp's AddServiceID)
            for holder in part:
                rec["UserDataName"] = _local(holder.tag)
                for el in holder:
                    value = _text(el)
                    props.append(value)
                    data[_local(el.tag)] = value
                break
        elif name == "RenderingInfo":
            for el in part:
                if _local(el.tag) == "Message":
                    rec["Message"] = _text(el)[:MAX_DESCRIPTION_CHARS]
    if not seen_system or "Id" not in rec:
        raise _BadEvent("no System/EventID")
    if not data:
        rec.pop("Data")
    return rec, when


#: an ``&`` that starts no character or entity reference (linear: bounded lookahead)
_BARE_AMP = re.compile(r"&(?!(?:[A-Za-z][A-Za-z0-9]{0,31}|#[0-9]{1,8}|#x[0-9A-Fa-f]{1,8});)")


def _fromstring(text: str) -> Element:
    try:
        root: Element = DET.fromstring(text, forbid_dtd=True)
    except (ParseError, DefusedXmlException, ValueError, RecursionError) as exc:
        raise _BadEvent(type(exc).__name__) from None
    return root


def parse_event_xml(text: str) -> tuple[dict[str, Any], _When | None, bool]:
    """Parse one event's XML safely (defusedxml, DTDs forbidden) into a record.

    Event Viewer's XML *view* (what people copy from the Details tab) shows ``&``
    unescaped, so ``PCI\\VEN_8086&DEV_...`` makes the paste ill-formed; when the
    strict parse fails, bare ``&`` are escaped and the parse is tried once more (the
    third value says so, and the event is flagged ``xml-repaired``)."""
    try:
        root = _fromstring(text)
        repaired = False
    except _BadEvent:
        fixed = _BARE_AMP.sub("&amp;", text) if "&" in text else text
        if fixed == text:
            raise
        root = _fromstring(fixed)
        repaired = True
    rec, when = xml_record(root)
    return rec, when, repaired


# --------------------------------------------------------------- records -> Events

class _Sink:
    """Records from a file -> Events: the record's own time for host and guest, the
    previous event's time (flagged ``untimed``) when it has none, one tally entry each."""

    def __init__(self, inp: LogInput, tally: Tally, event_map: EventMap | None = None) -> None:
        self.inp = inp
        self.tally = tally
        self.mapper = RecordMapper(event_map, Source.GUEST_ETW)
        self.last_t = 0
        self.local = False
        self._where: dict[int, str] = {}

    def emit(self, rec: Mapping[str, Any], where: str, *, when: _When | None = None,
             extra: Mapping[str, Any] | None = None, flags: tuple[str, ...] = ()) -> Event:
        index = len(self._where)
        self._where[index] = where
        record = dict(rec)
        _set_time(record, when)
        ev = self.mapper.map(index, record, received_ns=0,
                             extra={"at": f"{self.inp.display}:{where.partition(' ')[2]}"
                                    if where.startswith("line ") else f"{self.inp.display}:{where}",
                                    **(extra or {})})
        add = list(flags)
        t = ev.t_guest_ns
        if t is None:
            t = self.last_t
            add.append("untimed")
            self.tally.problem(f"{where}: event has no usable time")
        else:
            self.last_t = t
        if when is not None and when.local:
            add.append("local-time")
            self.local = True
        if "missing-event-id" in ev.data.get("flags", ()):
            self.tally.problem(f"{where}: event has no usable event ID")
        data = flagged(ev.data, *add) if add else ev.data
        self.tally.events += 1
        self.tally.clock = "local" if self.local else "utc"
        return replace(ev, t_host_ns=t, t_guest_ns=t, data=data)

    def finish(self) -> None:
        for ev in self.mapper.unmatched():
            where = self._where.get(int(ev.data.get("index", -1)), "?")
            self.tally.problem(f"{where}: {ev.data.get('name')} begin has no matching end")


# --------------------------------------------------------------- line helpers

def _dequote(line: str) -> str:
    """Indentation and e-mail/Markdown quoting (``> ``) removed."""
    s = line.strip()
    if s[:1] != ">":
        return s
    while s.startswith(">") and (len(s) == 1 or s[1] in " \t>"):
        s = s[1:].lstrip()
    return s


_BANNER_PREFIXES = ("```", "~~~", "<?xml", "<Events>", "</Events>", "<Events ")
_EVENT_N = re.compile(r"Event\[\d{1,12}\]:")
_PROMPT = re.compile(r"PS [^>\n]{0,400}>")


def _is_banner(s: str) -> bool:
    if not s:
        return True
    if s.startswith(_BANNER_PREFIXES) or _EVENT_N.fullmatch(s):
        return True
    return bool(_PROMPT.match(s)) or s.startswith("WARNING: Resulting JSON is truncated")


def _find_event_start(s: str, start: int = 0) -> tuple[int, bool]:
    """Position of the next ``<Event`` start tag (or HTML-escaped ``&lt;Event``) in
    ``s`` from ``start``, and whether it is escaped; (-1, False) if none."""
    i = s.find("<Event", start)
    while i >= 0:
        nxt = s[i + 6:i + 7]
        if nxt in ("", " ", "\t", ">"):
            return i, False
        i = s.find("<Event", i + 1)
    j = s.find("&lt;Event", start)
    while j >= 0:
        nxt = s[j + 9:j + 10]
        if nxt in ("", " ", "\t", "&"):
            return j, True
        j = s.find("&lt;Event", j + 1)
    return -1, False


# --------------------------------------------------------------- XML and text forms

#: header labels of "Copy details as text" (lower case) -> field; English and German
#: (Event Viewer's own strings; the German ones as in the openzfsonwindows sample)
HEADER_LABELS: dict[str, str] = {
    "log name": "log", "source": "source", "date": "date", "event id": "id",
    "task category": "task", "task": "task", "level": "level", "opcode": "opcode",
    "keywords": "keywords", "keyword": "keywords", "user": "user", "user name": "user_name",
    "computer": "computer", "description": "description", "event xml": "xml",
    "protokollname": "log", "quelle": "source", "datum": "date", "ereignis-id": "id",
    "aufgabenkategorie": "task", "ebene": "level", "schlüsselwörter": "keywords",
    "benutzer": "user", "beschreibung": "description", "ereignis-xml": "xml",
}


def _header_label(s: str) -> tuple[str, str] | None:
    label, sep, value = s.partition(":")
    if not sep or len(label) > 40:
        return None
    key = HEADER_LABELS.get(label.strip().lower())
    return (key, value.strip()) if key else None


@dataclass
class _Block:
    """One "Copy details as text" header block (fields, description) being read."""

    start: int
    fields: dict[str, str] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)
    description: list[str] = field(default_factory=list)
    desc_chars: int = 0
    in_description: bool = False


@dataclass
class _OpenXml:
    start: int
    escaped: bool
    parts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    chars: int = 0


class _XmlTextReader:
    """The line scan shared by ``event-xml`` and ``event-text`` (see the module doc)."""

    def __init__(self, inp: LogInput, tally: Tally) -> None:
        self.inp = inp
        self.tally = tally
        self.sink = _Sink(inp, tally)
        self.block: _Block | None = None
        self.xml: _OpenXml | None = None
        self.out: list[Event] = []          # events of the current line, handed out by parse
        # outcome of the current line: True used, False not understood, None undecided
        self.line_ok = False
        self.line_bad = False

    # ---- accounting
    def _resolve(self, lines: list[int], ok: bool, text: str = "") -> None:
        if ok:
            self.tally.used_line(len(lines))
            return
        for n in lines:
            self.tally.unknown(n, text)

    # ---- one event or block finished
    def _emit_xml(self, xml: _OpenXml) -> None:
        text = "\n".join(xml.parts)
        block = self.block
        self.block = None
        try:
            rec, when, repaired = parse_event_xml(text)
        except _BadEvent:
            self.tally.problem(f"line {xml.start}: event XML is not well-formed or not an event")
            self._resolve(xml.lines, False, "<event XML not understood>")
            self.line_bad = True
            if block is not None:
                self._emit_header(block)
            return
        extra: dict[str, Any] = {}
        start = xml.start
        if block is not None:
            start = block.start
            extra.update(self._block_extra(block))
            self._resolve(block.lines, True)
        self.out.append(self.sink.emit(rec, f"line {start}", when=when, extra=extra,
                                       flags=("xml-repaired",) if repaired else ()))
        self._resolve(xml.lines, True)
        self.line_ok = True

    def _block_extra(self, block: _Block) -> dict[str, Any]:
        out: dict[str, Any] = {"header": dict(block.fields)}
        if block.description:
            out["description"] = "\n".join(block.description).strip()[:MAX_DESCRIPTION_CHARS]
        return out

    def _emit_header(self, block: _Block) -> None:
        """A block with no usable XML: the record from its header lines."""
        f = block.fields
        eid = f.get("id", "").strip()
        rec: dict[str, Any] = {"Id": int(eid) if eid.isdigit() and len(eid) <= 10 else None,
                               "ProviderName": f.get("source") or None, "LogName": f.get("log"),
                               "MachineName": f.get("computer"), "LevelDisplayName": f.get("level"),
                               "Properties": []}
        when = parse_header_date(f.get("date", ""))
        self._resolve(block.lines, True)
        self.out.append(self.sink.emit(rec, f"line {block.start}", when=when,
                                       extra=self._block_extra(block), flags=("header-only",)))

    def _close_block(self) -> None:
        if self.block is not None:
            block, self.block = self.block, None
            self._emit_header(block)

    # ---- the scan
    def parse(self) -> Iterator[Event]:
        out = self.out
        for lineno, raw in self.inp.lines(self.tally):
            self.line_ok = self.line_bad = False
            self._line(lineno, raw)
            if out:
                yield from out
                out.clear()
        self._eof()
        yield from out
        out.clear()
        self.sink.finish()

    def _eof(self) -> None:
        if self.xml is not None:
            xml, self.xml = self.xml, None
            self.tally.problem(f"line {xml.start}: event XML not closed at the end of the file "
                               "(truncated)")
            self._resolve(xml.lines, False, "<truncated event XML>")
            if self.block is not None:
                self._close_block()
        else:
            self._close_block()

    def _line(self, lineno: int, raw: str) -> None:
        xml0 = self.xml
        if xml0 is not None and not xml0.escaped:
            # fast path: a line inside an event that neither ends it nor starts another
            t = raw.strip()
            if t[:1] in ("<", "") and "</Event>" not in t and "<Event" not in t \
                    and xml0.chars + len(t) <= MAX_EVENT_CHARS and len(xml0.lines) < MAX_EVENT_LINES:
                xml0.parts.append(t)
                xml0.chars += len(t)
                xml0.lines.append(lineno)
                return
        text = _dequote(raw)
        pos = 0
        if self.xml is not None:
            hl = _header_label(text)
            if hl is not None and hl[0] == "log":
                # the next pasted event begins: the open one was cut short
                self._cut_short(self.xml)
                self._close_block()
                self._text_line(lineno, text)
                return
        if self.xml is None:
            pos, escaped = _find_event_start(text)
            if pos < 0:
                self._text_line(lineno, text)
                return
            self.xml = _OpenXml(lineno, escaped)
        unescaped = False        # text[pos:] already HTML-unescaped on this line
        # inside an event (possibly several on this line)
        while self.xml is not None:
            xml = self.xml
            if xml.escaped and not unescaped:
                text = text[:pos] + html.unescape(text[pos:])
                unescaped = True
            seg = text[pos:]
            first = xml.start == lineno and not xml.parts
            end = seg.find("</Event>")
            nxt, nesc = _find_event_start(seg, 1 if first else 0)
            if nxt >= 0 and (end < 0 or nxt < end):
                # events do not nest: a new start means the open one was cut short
                self._cut_short(xml)
                self._close_block()
                self.xml = _OpenXml(lineno, nesc or unescaped)
                pos += nxt
                continue
            if end < 0:
                xml.parts.append(seg)
                xml.chars += len(seg)
                if xml.chars > MAX_EVENT_CHARS or len(xml.lines) >= MAX_EVENT_LINES:
                    self.xml = None
                    self.tally.problem(f"line {xml.start}: event XML longer than "
                                       f"{MAX_EVENT_CHARS} characters or {MAX_EVENT_LINES} lines")
                    self._resolve(xml.lines, False, "<oversized event XML>")
                    self.line_bad = True
                    break
                if self.line_ok:
                    self.tally.used_line()       # an event ended on this line
                else:
                    xml.lines.append(lineno)     # decided when the event ends
                return
            xml.parts.append(seg[:end + 8])
            self.xml = None
            self._emit_xml(xml)
            pos += end + 8
            nxt, nesc = _find_event_start(text, pos)
            if nxt < 0:
                break
            self.xml = _OpenXml(lineno, nesc or unescaped)
            pos = nxt
        self._finish_line(lineno, raw)

    def _cut_short(self, xml: _OpenXml) -> None:
        self.xml = None
        self.tally.problem(f"line {xml.start}: event XML not closed before the next event")
        self._resolve(xml.lines, False, "<event XML cut short>")

    def _finish_line(self, lineno: int, raw: str) -> None:
        if self.line_ok:
            self.tally.used_line()
        else:
            self.tally.unknown(lineno, raw)

    def _text_line(self, lineno: int, s: str) -> None:
        """A line outside any event XML: header, description, banner or noise."""
        hl = _header_label(s)
        block = self.block
        if hl is not None and hl[0] == "log":
            self._close_block()
            self.block = _Block(lineno, {"log": hl[1]}, [lineno])
            return
        if block is not None:
            block.lines.append(lineno)
            if block.in_description:
                if hl is not None and hl[0] == "xml":
                    return
                if block.desc_chars < MAX_DESCRIPTION_CHARS:
                    block.description.append(s)
                    block.desc_chars += len(s) + 1
                return
            if hl is not None:
                key, value = hl
                if key == "description":
                    block.in_description = True
                    if value:
                        block.description.append(value)
                elif key != "xml":
                    block.fields.setdefault(key, value[:400])
            return
        if _is_banner(s) or (hl is not None and hl[0] == "xml"):
            self.tally.skip()
        else:
            self.tally.unknown(lineno, s)


def _text_lines_head(inp: LogInput, limit: int = 400) -> list[str]:
    return [_dequote(x) for x in inp.head.splitlines()[:limit]]


class EventXmlParser:
    name = "event-xml"
    description = ("Windows event XML: wevtutil qe /f:xml or /f:RenderedXml, Get-WinEvent "
                   "ToXml(), Event Viewer 'Save as XML' exports and pasted XML views")

    def sniff(self, inp: LogInput) -> int:
        if inp.is_binary():
            return 0
        head = inp.head
        if "schemas.microsoft.com/win/2004/08/events/event" not in head:
            return 0
        pos, escaped = _find_event_start(head)
        if pos < 0 or escaped:
            return 0
        labels = {(_header_label(x) or ("", ""))[0] for x in _text_lines_head(inp)}
        return 50 if {"log", "id"} <= labels else 90

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        tally.clock = "utc"
        yield from _XmlTextReader(inp, tally).parse()


class EventTextParser:
    name = "event-text"
    description = ("Event Viewer 'Copy details as text' (Log Name/Source/Date/Event ID ... "
                   "Event Xml), also HTML-escaped or without the XML")

    def sniff(self, inp: LogInput) -> int:
        if inp.is_binary():
            return 0
        labels = {(_header_label(x) or ("", ""))[0] for x in _text_lines_head(inp)}
        if {"log", "id"} <= labels:
            return 95
        pos, escaped = _find_event_start(inp.head)
        return 80 if pos >= 0 and escaped else 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        tally.clock = "utc"
        yield from _XmlTextReader(inp, tally).parse()


# --------------------------------------------------------------- JSON form

_JSON_TOKEN = re.compile(r'[\[\]{}"]')
_JSON_BRACKET = re.compile(r"[\[\]{}]")
_JSON_STR_REST = re.compile(r'(?:[^"\\]|\\.)*"')
_JSON_STRUCTURE = frozenset("[]{},: \t")


def _ps_time(value: Any) -> _When | None:
    """TimeCreated as ConvertTo-Json writes it (5.1: /Date(ms)/, 7: ISO)."""
    if isinstance(value, Mapping):          # a PSObject-wrapped DateTime (5.1)
        value = value.get("value")
    if not isinstance(value, str):
        return None
    m = _PS_DATE.fullmatch(value.strip())
    if m:
        return _When(int(m[1]) * 1_000_000)
    return parse_iso(value)


def _hex64(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"0x{value & 0xFFFFFFFFFFFFFFFF:016X}"
    return value


def ps_record(obj: Mapping[str, Any]) -> tuple[dict[str, Any], _When | None, tuple[str, ...]]:
    """A ``Get-WinEvent | ConvertTo-Json`` object -> a record (the lab's decode-script
    records, which have no ``TimeCreated``, pass through unchanged)."""
    if "TimeCreated" not in obj:
        return dict(obj), None, ()
    flags: list[str] = []
    rec: dict[str, Any] = {k: obj.get(k) for k in (
        "Id", "Version", "Qualifiers", "Level", "Task", "Opcode", "RecordId", "ProviderName",
        "ProviderId", "LogName", "ProcessId", "ThreadId", "MachineName", "ActivityId",
        "RelatedActivityId", "LevelDisplayName", "Message") if k in obj}
    rec["Keywords"] = _hex64(obj.get("Keywords"))
    props: list[Any] = []
    raw_props = obj.get("Properties")
    if isinstance(raw_props, list):
        for p in raw_props:
            if isinstance(p, Mapping):
                props.append(p.get("Value"))
            elif p == _PS_TRUNCATED:
                flags.append("properties-not-serialised")
                props = []
                break
            else:
                props.append(p)
    rec["Properties"] = props
    when = _ps_time(obj.get("TimeCreated"))
    return rec, when, tuple(sorted(set(flags)))


@dataclass
class _JsonRecord:
    start: int
    depth: int
    parts: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    chars: int = 0
    oversize: bool = False
    broken: bool = False


class _JsonReader:
    """Top-level objects (or the objects of a top-level array) one at a time, by a
    scan of brackets outside strings; JSON strings never span lines, so every line is
    scanned on its own and memory holds one record at most."""

    def __init__(self, inp: LogInput, tally: Tally) -> None:
        self.inp = inp
        self.tally = tally
        self.sink = _Sink(inp, tally)
        self.depth = 0
        self.array = False
        self.rec: _JsonRecord | None = None
        self.out: list[Event] = []
        self.parsed = 0
        self.first_error: tuple[int, int] | None = None
        self.saw_content = False
        self.line_ok = False
        self.line_bad = False

    def _error(self, line: int, col: int, message: str) -> None:
        if self.first_error is None:
            self.first_error = (line, col)
        self.tally.problem(f"line {line} column {col}: {message}")

    def _resolve(self, lines: list[int], ok: bool) -> None:
        if ok:
            self.tally.used_line(len(lines))
            return
        for n in lines:
            self.tally.unknown(n, "<JSON record not understood>")

    def _finish_record(self, rec: _JsonRecord) -> None:
        ok = False
        if rec.oversize:
            self._error(rec.start, 1, f"record longer than {MAX_RECORD_CHARS} characters")
        elif not rec.broken:
            text = "\n".join(rec.parts)
            try:
                obj = json.loads(text)
            except ValueError as exc:
                line = getattr(exc, "lineno", 1)
                col = getattr(exc, "colno", 1)
                self._error(rec.start + line - 1, col, "not valid JSON")
            except RecursionError:
                self._error(rec.start, 1, "JSON nested too deeply")
            else:
                if isinstance(obj, Mapping):
                    records: list[Any] = [obj]
                    # Windows PowerShell 5.1 wraps some arrays as {"value": [...], "Count": n}
                    if set(obj) == {"value", "Count"} and isinstance(obj["value"], list):
                        records = obj["value"]
                    for item in records:
                        if isinstance(item, Mapping):
                            rec_d, when, flags = ps_record(item)
                            self.out.append(self.sink.emit(rec_d, f"line {rec.start}", when=when,
                                                           flags=flags))
                            ok = True
                            self.parsed += 1
                if not ok:
                    self._error(rec.start, 1, "not an event record (no JSON object)")
        self._resolve(rec.lines, ok)
        if ok:
            self.line_ok = True
        else:
            self.line_bad = True

    def parse(self) -> Iterator[Event]:
        out = self.out
        for lineno, raw in self.inp.lines(self.tally):
            self.line_ok = self.line_bad = False
            self._line(lineno, raw)
            if out:
                yield from out
                out.clear()
        if self.rec is not None:
            rec, self.rec = self.rec, None
            self._error(rec.start, 1, "record not closed at the end of the file (truncated)")
            self._resolve(rec.lines, False)
        elif self.depth > 0:
            self._error(self.tally.lines, 1, "JSON document not closed at the end of the file")
        self.sink.finish()
        if self.parsed == 0 and (self.first_error is not None or self.saw_content):
            line, col = self.first_error or (1, 1)
            raise LogFormatError(f"{self.inp.display}: not a JSON event export "
                                 f"(line {line} column {col})")

    def _line(self, lineno: int, raw: str) -> None:
        s = _dequote(raw)
        rec0 = self.rec
        if rec0 is not None and _JSON_BRACKET.search(s) is None:
            # fast path: a line inside a record with no bracket at all cannot end it
            self._add(rec0, s)
            rec0.lines.append(lineno)
            return
        if self.depth == 0 and self.rec is None and not s.startswith(("[", "{")):
            if _is_banner(s):
                self.tally.skip()
            else:
                self.saw_content = True
                self.tally.unknown(lineno, raw)
            return
        i = 0
        seg_start = 0 if self.rec is not None else -1
        while True:
            m = _JSON_TOKEN.search(s, i)
            if m is None:
                break
            c, j = m.group(), m.start()
            if c == '"':
                e = _JSON_STR_REST.match(s, j + 1)
                if e is None:
                    self._error(lineno, j + 1, "string not closed on its line")
                    if self.rec is not None:
                        self.rec.broken = True
                    i = len(s)
                    break
                i = e.end()
                continue
            i = j + 1
            if c in "[{":
                if self.depth == 0 and c == "[":
                    self.array = True
                elif self.rec is None and c == "{" and (self.depth == 0 or (self.depth == 1 and self.array)):
                    self.rec = _JsonRecord(lineno, self.depth)
                    seg_start = j
                self.depth += 1
                continue
            self.depth -= 1
            if self.depth < 0:
                self._error(lineno, j + 1, "closing bracket with nothing open")
                self.depth = 0
                self.array = False
                continue
            rec = self.rec
            if rec is not None and self.depth == rec.depth:
                self._add(rec, s[max(seg_start, 0):j + 1])
                self.rec = None
                seg_start = -1
                self._finish_record(rec)
            if self.depth == 0:
                self.array = False
        if self.rec is not None:
            self._add(self.rec, s[max(seg_start, 0):])
            if self.line_ok:
                self.tally.used_line()
            else:
                self.rec.lines.append(lineno)
            return
        if self.line_ok:
            self.tally.used_line()
        elif self.line_bad or not set(s) <= _JSON_STRUCTURE:
            self.tally.unknown(lineno, raw)
        else:
            self.tally.skip()

    @staticmethod
    def _add(rec: _JsonRecord, text: str) -> None:
        if rec.oversize:
            return
        rec.chars += len(text) + 1
        if rec.chars > MAX_RECORD_CHARS:
            rec.oversize = True
            rec.parts.clear()
            return
        rec.parts.append(text)


class EventJsonParser:
    name = "event-json"
    description = ("Get-WinEvent | ConvertTo-Json (Windows PowerShell 5.1 or PowerShell 7) "
                   "and the lab's Kernel-PnP decode JSON")

    def sniff(self, inp: LogInput) -> int:
        if inp.is_binary():
            return 0
        head = inp.head
        first = next((x for x in _text_lines_head(inp, 50) if x and not _is_banner(x)), "")
        if not first.startswith(("[", "{")) or '"Id"' not in head:
            return 0
        if '"TimeCreated' in head or '"ProviderName"' in head:
            return 90
        return 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        tally.clock = "utc"
        yield from _JsonReader(inp, tally).parse()


# --------------------------------------------------------------- .evtx

def _is_panic(exc: BaseException) -> bool:
    """pyo3 turns a Rust panic into ``PanicException``, a BaseException subclass."""
    return type(exc).__name__ == "PanicException"


class EvtxParser:
    name = "evtx"
    description = "Windows .evtx event log files (binary), via the evtx package"

    def sniff(self, inp: LogInput) -> int:
        return 100 if inp.head_bytes.startswith(EVTX_MAGIC) else 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        if not inp.head_bytes.startswith(EVTX_MAGIC):
            raise LogFormatError(f"{inp.display}: not an .evtx file (no ElfFile signature)")
        try:
            import evtx
        except ImportError:
            raise LogFormatError(f"{inp.display}: reading .evtx needs the 'evtx' package") from None
        tally.clock = "utc"
        tally.encoding = "binary"
        sink = _Sink(inp, tally)
        try:
            fd = os.open(inp.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise LogFormatError(f"{inp.display}: cannot read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise LogFormatError(f"{inp.display}: not a regular file")
            try:
                records = iter(evtx.PyEvtxParser(f, 1).records())
            except Exception:
                raise LogFormatError(f"{inp.display}: the .evtx file header cannot be read") from None
            except BaseException as exc:
                if not _is_panic(exc):
                    raise
                raise LogFormatError(f"{inp.display}: the .evtx file header cannot be read") from None
            yield from self._records(records, inp, tally, sink)
        if tally.lines == 0:
            tally.problem("no record could be read (empty, truncated or damaged file)")
        sink.finish()

    @staticmethod
    def _records(records: Iterator[Any], inp: LogInput, tally: Tally, sink: _Sink) -> Iterator[Event]:
        failures = 0
        while True:
            try:
                r = next(records)
            except StopIteration:
                return
            except Exception:
                failed = True
            except BaseException as exc:
                if not _is_panic(exc):
                    raise
                failed = True
            else:
                failed = False
            tally.lines += 1
            n = tally.lines
            if failed or not isinstance(r, Mapping):
                failures += 1
                tally.unknown(n, "<record could not be decoded>")
                tally.problem(f"record {n}: could not be decoded")
                if failures > 1000:
                    return
                continue
            rid = r.get("event_record_id", n)
            try:
                rec, when, _ = parse_event_xml(str(r.get("data", "")))
            except _BadEvent:
                tally.unknown(n, "<record XML not understood>")
                tally.problem(f"record {rid}: its XML is not an event")
                continue
            # the record header's FILETIME keeps all 7 digits (the XML rendering has 6)
            stamp = parse_iso(str(r.get("timestamp", "")))
            if stamp is not None and not stamp.local:
                when = stamp
            tally.used_line()
            yield sink.emit(rec, f"record {rid}", when=when)


XML_PARSER = EventXmlParser()
TEXT_PARSER = EventTextParser()
JSON_PARSER = EventJsonParser()
EVTX_PARSER = EvtxParser()
PARSERS = (XML_PARSER, TEXT_PARSER, JSON_PARSER, EVTX_PARSER)
