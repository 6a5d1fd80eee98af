"""setupapi.dev.log in the live run: fetch the part written during the run.

Only the tail written since the run started is fetched: the size at start is recorded
(``size_script``) and the bytes from there on are read later (``tail_script``), with
the file opened for shared read/write because SetupAPI keeps writing to it.

The text is cut into sections by ``lab.logs.setupapi`` (one reader of the format for
both the live tracer and ``rebalab inspect``); ``parse``, ``parse_timestamp``,
``Section`` and ``SetupApiLog`` are that module's, re-exported here for the tracer.
``to_events`` stays here because it returns the tracers' ``ParsedTrace``: ``lab.logs``
cannot import ``lab.guest.windows.trace`` (that package imports the tracer, which imports
this module, which imports ``lab.logs.setupapi``).
Time stamps are the guest's *local* time; the image sets the guest time zone to UTC,
and ``parse`` takes the guest's UTC offset otherwise.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lab.logs.setupapi import Section, SetupApiLog, log_events, parse, parse_timestamp
from lab.guest.windows.trace.common import GuestScript, ParsedTrace, validate_guest_path

DEFAULT_LOG = r"C:\Windows\INF\setupapi.dev.log"


def to_events(log: SetupApiLog, *, received_ns: int, with_problems: bool = False) -> ParsedTrace:
    """One SETUPAPI_SECTION event per section (device = its instance id if it is one),
    at ``received_ns`` with the guest time in ``t_guest_ns``; ``with_problems`` adds a
    PROBLEM event per device a section leaves with a problem code. The log's structural
    problems (footers without a header, bad time stamps) come along in ``problems``."""
    return ParsedTrace(events=log_events(log, received_ns=received_ns, with_problems=with_problems),
                       problems=list(log.problems))


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


__all__ = ["DEFAULT_LOG", "Section", "SetupApiLog", "Tail", "decode_tail", "parse",
           "parse_timestamp", "size_script", "tail_script", "to_events"]
