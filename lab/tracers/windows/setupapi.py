"""setupapi.dev.log: read the part written during a run and cut it into sections.

Format (learn.microsoft.com/windows-hardware/drivers/install/ "Format of a Text Log
Section", "... Section Header", "... Section Body", "... Section Footer"):

    >>>  [Device Install (Hardware initiated) - PCI\\VEN_8086&DEV_293E&...\\3&11583659&0&20]
    >>>  Section start 2024/01/15 10:00:00.123
         ump: Creating Install Process: DrvInst.exe 10:00:00.125
    !    dvi: Device not started: Device has problem: 0x0a (CM_PROB_FAILED_START)
    !!!  dvi: Default installer: failed!
    <<<  Section end 2024/01/15 10:00:02.456
    <<<  [Exit status: FAILURE(0xe0000219)]

* Header: ``>>>  [title - instance]`` (or ``[title]``), then the start time stamp. The
  documentation shows ``>>>  yyyy/mm/dd hh:mm:ss.sss: Section start`` (older builds);
  current builds write ``>>>  Section start yyyy/mm/dd hh:mm:ss.sss``. Both are read.
* Body entries: prefix ``!!! `` error, ``! `` warning, blank for information.
* Footer: ``<<<  Section end <time>`` (or ``<<<  [<time>: Section end]``) and
  ``<<<  [Exit status: SUCCESS]`` / ``FAILURE(0x...)`` (or ``[Exit Status(0x...)]``).
* Time stamps are the guest's *local* time with milliseconds; the image sets the
  guest time zone to UTC, and ``parse`` takes the guest's UTC offset otherwise.

Only the tail written since the run started is fetched: the size at start is recorded
(``size_script``) and the bytes from there on are read later (``tail_script``), with
the file opened for shared read/write because SetupAPI keeps writing to it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from lab.events import DeviceId, Event, Kind, Source
from lab.tracers.windows.common import GuestScript, ParsedTrace, flagged, looks_like_instance_id, validate_guest_path

DEFAULT_LOG = r"C:\Windows\INF\setupapi.dev.log"

_TS = r"(\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2}\.\d{3})"
_HEADER_RE = re.compile(r"^>>>\s+\[(?P<body>.*)\]\s*$")
_START_RE = re.compile(rf"^>>>\s+(?:Section start\s+(?P<a>\S.*?)|(?P<b>\S.*?):?\s+Section start)\s*$")
_END_RE = re.compile(rf"^<<<\s+(?:Section end\s+(?P<a>\S.*?)|\[(?P<b>\S.*?):?\s+Section end\])\s*$")
_EXIT_RE = re.compile(r"^<<<\s+\[Exit(?:\s+[Ss]tatus[:(]?\s*(?P<status>[^\]]*?)\)?)?\]\s*$")
_BOOT_RE = re.compile(rf"^\[Boot Session:\s+{_TS}\]\s*$")
_TS_ONLY = re.compile(rf"^{_TS}$")


def parse_timestamp(text: str, utc_offset: timedelta = timedelta(0)) -> int:
    """``yyyy/mm/dd hh:mm:ss.sss`` in guest local time -> ns since the Unix epoch (UTC)."""
    t = text.strip()
    if not _TS_ONLY.match(t):
        raise ValueError(f"not a SetupAPI time stamp: {text!r}")
    local = datetime.strptime(t, "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=timezone(utc_offset))
    return int(local.timestamp()) * 1_000_000_000 + local.microsecond * 1000


@dataclass
class Section:
    title: str
    instance: str | None
    start_text: str | None = None
    end_text: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    exit_status: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    line: int = 0
    flags: set[str] = field(default_factory=set)

    @property
    def succeeded(self) -> bool | None:
        if self.exit_status is None:
            return None
        s = self.exit_status.upper()
        return s.startswith("SUCCESS") or s in ("0X00000000", "0")

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "instance": self.instance, "start": self.start_text,
                "end": self.end_text, "exit_status": self.exit_status, "succeeded": self.succeeded,
                "errors": self.errors, "warnings": self.warnings, "line": self.line,
                "body_lines": len(self.body), "flags": sorted(self.flags)}


@dataclass
class SetupApiLog:
    sections: list[Section]
    boot_sessions: list[str]
    problems: list[str]


def _split_header(body: str) -> tuple[str, str | None]:
    if " - " in body:
        title, instance = body.split(" - ", 1)
        return title.strip(), instance.strip() or None
    return body.strip(), None


def parse(text: str, *, utc_offset: timedelta = timedelta(0), since_ns: int | None = None,
          at_eof_open: bool = True) -> SetupApiLog:
    """Cut ``text`` into sections.

    ``since_ns``: keep only sections that started at or after it (the run start); a
    section whose start time cannot be read is kept and flagged ``bad-timestamp``,
    never dropped. A section cut short by the next header is flagged ``truncated``;
    one still open at the end of the text is flagged ``incomplete`` (SetupAPI may
    still be writing it) unless ``at_eof_open`` is False, then ``truncated`` too.
    Footer lines without a header (the tail began inside a section) are reported in
    ``problems``.
    """
    sections: list[Section] = []
    boots: list[str] = []
    problems: list[str] = []
    cur: Section | None = None
    pending_header: Section | None = None  # header seen, start line not yet

    def close(sec: Section, flag: str | None) -> None:
        if flag:
            sec.flags.add(flag)
        sections.append(sec)

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r\n")
        stripped = line.strip()
        if not stripped:
            continue
        m = _HEADER_RE.match(line)
        if m:
            for open_sec in (cur, pending_header):
                if open_sec is not None:
                    close(open_sec, "truncated")
            title, instance = _split_header(m["body"])
            pending_header, cur = Section(title=title, instance=instance, line=lineno), None
            continue
        m = _START_RE.match(line)
        if m:
            sec = pending_header or Section(title="(untitled)", instance=None, line=lineno,
                                            flags={"missing-header"})
            pending_header = None
            stamp = (m["a"] or m["b"] or "").strip().rstrip(":")
            sec.start_text = stamp
            try:
                sec.start_ns = parse_timestamp(stamp, utc_offset)
            except ValueError:
                sec.flags.add("bad-timestamp")
                problems.append(f"line {lineno}: bad section start time {stamp!r}")
            if cur is not None:
                close(cur, "truncated")
            cur = sec
            continue
        if pending_header is not None:
            # a header must be followed by its start line
            pending_header.flags.add("missing-start")
            cur, pending_header = pending_header, None
        m = _END_RE.match(line)
        if m:
            stamp = (m["a"] or m["b"] or "").strip().rstrip(":")
            if cur is None:
                problems.append(f"line {lineno}: section end without a section start (tail began mid-section)")
                continue
            cur.end_text = stamp
            try:
                cur.end_ns = parse_timestamp(stamp, utc_offset)
            except ValueError:
                cur.flags.add("bad-timestamp")
                problems.append(f"line {lineno}: bad section end time {stamp!r}")
            continue
        m = _EXIT_RE.match(line)
        if m:
            if cur is None:
                problems.append(f"line {lineno}: exit status without a section start")
                continue
            status = (m["status"] or "").strip()
            if "(" in status and not status.endswith(")"):
                status += ")"  # FAILURE(0x...) lost its ")" to the optional Status(...) form
            cur.exit_status = status or "EXIT"
            close(cur, None if cur.end_text is not None else "missing-end")
            cur = None
            continue
        bm = _BOOT_RE.match(stripped)
        if bm:
            boots.append(bm[1])
            continue
        if cur is None:
            continue  # file header lines ([Device Install Log], OS Version = ...)
        cur.body.append(line)
        if line.startswith("!!!"):
            cur.errors.append(line[3:].strip())
        elif line.startswith("!"):
            cur.warnings.append(line[1:].strip())
    for open_sec in (cur, pending_header):
        if open_sec is not None:
            close(open_sec, "incomplete" if at_eof_open else "truncated")
    if since_ns is not None:
        sections = [s for s in sections if s.start_ns is None or s.start_ns >= since_ns]
    return SetupApiLog(sections=sections, boot_sessions=boots, problems=problems)


def to_events(log: SetupApiLog, *, received_ns: int) -> ParsedTrace:
    """One SETUPAPI_SECTION event per section (device = its instance id if it is one)."""
    out = ParsedTrace(problems=list(log.problems))
    for sec in log.sections:
        data = sec.to_json()
        if sec.flags:
            data = flagged(data, *sec.flags)
        duration = None
        if sec.start_ns is not None and sec.end_ns is not None and sec.end_ns >= sec.start_ns:
            duration = sec.end_ns - sec.start_ns
        dev = DeviceId(instance=sec.instance) if looks_like_instance_id(sec.instance) else None
        out.events.append(Event(t_host_ns=received_ns, source=Source.GUEST_SETUPAPI,
                                kind=Kind.SETUPAPI_SECTION, device=dev, duration_ns=duration,
                                data=data, t_guest_ns=sec.start_ns))
    return out


# --------------------------------------------------------------- guest side

_SIZE = r"""
$now = [DateTime]::UtcNow
$len = if (Test-Path -LiteralPath $p.Path) { (Get-Item -LiteralPath $p.Path).Length } else { 0 }
[pscustomobject]@{
    Length = [int64]$len
    GuestUtcFileTime = $now.ToFileTimeUtc()
    UtcOffsetMinutes = [int][TimeZoneInfo]::Local.GetUtcOffset($now).TotalMinutes
}
"""

_TAIL = r"""
if (-not (Test-Path -LiteralPath $p.Path)) {
    [pscustomobject]@{ Offset = [int64]0; Length = [int64]0; Rotated = $false; Missing = $true; Data = '' }
    return
}
$f = [IO.File]::Open($p.Path, [IO.FileMode]::Open, [IO.FileAccess]::Read, [IO.FileShare]::ReadWrite)
try {
    $len = $f.Length
    $off = [int64]$p.Offset
    $rotated = $false
    if ($off -gt $len) { $off = 0; $rotated = $true }
    $count = [int64][Math]::Min($len - $off, [int64]$p.MaxBytes)
    [void]$f.Seek($off, [IO.SeekOrigin]::Begin)
    $buf = New-Object byte[] $count
    $n = 0
    while ($n -lt $count) { $r = $f.Read($buf, $n, $count - $n); if ($r -le 0) { break }; $n += $r }
    [pscustomobject]@{
        Offset = $off; Length = [int64]$len; Rotated = $rotated; Missing = $false
        Truncated = ($len - $off) -gt $n
        Data = [Convert]::ToBase64String($buf, 0, $n)
    }
} finally { $f.Dispose() }
"""


def size_script(path: str = DEFAULT_LOG) -> GuestScript:
    """Size of the log and the guest's clock and UTC offset, recorded at run start."""
    return GuestScript("setupapi: size at run start", _SIZE, {"Path": validate_guest_path(path)},
                       structured=True, depth=2)


def tail_script(offset: int, path: str = DEFAULT_LOG, max_bytes: int = 64 * 1024 * 1024) -> GuestScript:
    """The bytes of the log from ``offset`` on (from 0 if the file shrank: rotated)."""
    if offset < 0:
        raise ValueError("offset must be >= 0")
    return GuestScript("setupapi: tail since run start", _TAIL,
                       {"Path": validate_guest_path(path), "Offset": int(offset), "MaxBytes": int(max_bytes)},
                       structured=True, depth=2, timeout=120.0)


@dataclass(frozen=True)
class Tail:
    offset: int
    length: int
    rotated: bool
    missing: bool
    truncated: bool
    text: str


def decode_tail(records: Sequence[Any]) -> Tail:
    """The tail script's record -> text. The log is ANSI/UTF-8 text; undecodable bytes
    are replaced (and counted as a problem by the caller), never fatal."""
    if not records or not isinstance(records[0], dict):
        raise ValueError("setupapi tail: no record returned")
    r = records[0]
    raw = base64.b64decode(str(r.get("Data") or ""), validate=True)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", "replace")
    return Tail(offset=int(r.get("Offset") or 0), length=int(r.get("Length") or 0),
                rotated=bool(r.get("Rotated")), missing=bool(r.get("Missing")),
                truncated=bool(r.get("Truncated")), text=text)
