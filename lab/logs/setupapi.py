"""setupapi.dev.log, the SetupAPI device installation text log: sections -> events.

The format (Microsoft Learn, learn.microsoft.com/windows-hardware/drivers/install/):

* "SetupAPI Text Logs" (setupapi-text-logs): ANSI text in the machine's code page, one
  log entry per line; a header, then sections, and entries written outside any section.
* "Format of a Text Log Header" (format-of-a-text-log-header)::

      [Device Install Log]
           OS Version = 10.0.22621            (also Service Pack, Suite, ProductType,
      [BeginLog]                               Architecture)

* "Format of a Text Log Section Header" (format-of-a-text-log-section-header)::

      >>>  [section_title - instance_identifier]      or  >>>  [section_title]
      >>>  yyyy/mm/dd hh:mm:ss.sss: Section start           (documented form)
      >>>  Section start yyyy/mm/dd hh:mm:ss.sss            (what Windows 7 and later write)

  The time stamp is the machine's *local* time with milliseconds; no zone is written.
* "Format of a Text Log Section Body" (format-of-a-text-log-section-body):
  ``entry_prefix [time_stamp] event_category indentation formatted_message``; the prefix
  is ``"!!!  "`` (error), ``"!    "`` (warning) or five spaces; the category is three
  letters and a colon (``dvi:``, ``ndv:``, ``inf:``, ``ump:`` ... or ``ui :``); the
  indentation is units of five spaces; an entry is at most 336 characters.
* "Format of a Text Log Section Footer" (format-of-a-text-log-section-footer)::

      <<<  [yyyy/mm/dd hh:mm:ss.sss: Section end]   /  <<<  Section end <time> (real logs)
      <<<  [Exit Status(0x00000000)]  /  <<<  [Exit]  /  <<<  [Exit status: SUCCESS]
                                         (real logs: FAILURE(0xe0000219), SUCCESS (REBOOT_REQUIRED))

* Not in the documentation, in every Windows 10 log of the corpus: ``[Boot Session:
  <time>]`` between sections, one per boot.

What a section tells about a device is in its body, not only in its header: a
``Device Install (UpdateDriverForPlugAndPlayDevices)`` section is titled with the
*hardware* id the caller passed (``PCI\\VEN_8086&DEV_8C4F``) and names the device
instance it updated in ``{Update Device Driver - PCI\\VEN_...\\3&11583659&0&F8}``; the
device's problem code appears as ``Device not started: Device has problem: 0x0a
(CM_PROB_FAILED_START), problem status: 0xc00000e5.`` or ``Device Status: 0x01802401,
Problem: 0x38``. The lines read for each are listed next to the code that reads them,
with the sample (tests/unit/data/logs/setupapi/PROVENANCE.md) they come from.

People share this log pasted into issues and forums, so a section is also found when
its lines are indented, quoted with ``> `` or turned into ``> > >`` by Markdown (the
``>>>`` marker read as three nested quotes), and when the first ``>>>`` was lost
altogether (a bare ``[title]`` line followed by ``Section start``).

Events (``SetupApiParser.parse``): one SETUPAPI_SECTION per section, at its start time
(local time taken as UTC: ``Tally.clock = "local"``), device = its instance id, duration
= end - start; and one PROBLEM per device a section leaves with a problem code
(``data["code"]``, read by lab/rules/windows_pnp.py). Lines: a section's lines and
``[Boot Session]`` banners are used; blank lines, the log header and paste fences are
skipped; other text outside a section is not understood.

Everything is read in one pass, line by line, with ``str`` methods and patterns applied
only to short bounded slices, so the time is linear in the input and memory is bounded
by one section (whose stored body is capped; the rest is counted).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from lab.events import DeviceId, Event, Kind, Source
from lab.logs.base import MAX_LINE_CHARS, LogFormatError, LogInput, Tally

#: body lines kept per section (the rest are counted in ``body_count``)
MAX_BODY_LINES = 64
#: error and warning entries kept per section (each)
MAX_NOTES = 32
#: device instance ids remembered per section
MAX_INSTANCES = 16
#: characters kept of a stored line (an entry is at most 336: section-body page above)
MAX_KEPT_CHARS = 400
#: ``[Boot Session]`` times ``parse`` returns (a log has one per boot; more are counted)
MAX_BOOTS = 4096
#: lines of the head ``sniff`` looks at
SNIFF_LINES = 2000

#: DN_HAS_PROBLEM in the ``Device Status`` flags (cfg.h, "Device node status flags")
_DN_HAS_PROBLEM = 0x400

_TS_SHAPE = re.compile(r"[0-9]{4}/[0-9]{2}/[0-9]{2} [0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}")
_TOD_SHAPE = re.compile(r"[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
# <enumerator>\<device id>\<instance>: learn.microsoft.com/windows-hardware/drivers/install/device-instance-ids
_INSTANCE_SHAPE = re.compile(r"[A-Za-z0-9_]{1,64}\\[^\\\x00-\x20']{1,400}\\[^\x00-\x20']{1,400}")
_OEM_INF = re.compile(r"oem[0-9]{1,6}\.inf", re.IGNORECASE)
#: the text log header's fields (format-of-a-text-log-header)
_HEADER_FIELDS = frozenset({"OS Version", "Service Pack", "Suite", "ProductType", "Architecture"})
_NS = 1_000_000_000
_DAY_NS = 86_400 * _NS


# --------------------------------------------------------------------- time stamps

def parse_timestamp(text: str, utc_offset: timedelta = timedelta(0)) -> int:
    """``yyyy/mm/dd hh:mm:ss.sss`` in the machine's local time -> ns since the Unix epoch.

    ``utc_offset`` is the machine's offset from UTC (the log does not say it): with 0 the
    local time is taken as UTC, as ``inspect`` does (``Tally.clock = "local"``).
    Raises ValueError (without quoting the text) for anything else.
    """
    t = text.strip()
    if len(t) != 23 or not _TS_SHAPE.fullmatch(t):
        raise ValueError("not a SetupAPI time stamp (yyyy/mm/dd hh:mm:ss.sss)")
    try:
        local = datetime(int(t[0:4]), int(t[5:7]), int(t[8:10]), int(t[11:13]), int(t[14:16]),
                         int(t[17:19]), int(t[20:23]) * 1000, tzinfo=timezone(utc_offset))
        return int(local.timestamp()) * _NS + local.microsecond * 1000
    except (ValueError, OverflowError):     # 2024/13/45, or year 1 moved before year 1
        raise ValueError("not a valid SetupAPI time stamp") from None


def _tod_ns(text: str) -> int | None:
    """``hh:mm:ss.sss`` -> ns since midnight, or None."""
    if len(text) != 12 or not _TOD_SHAPE.fullmatch(text):
        return None
    h, m, s, ms = int(text[0:2]), int(text[3:5]), int(text[6:8]), int(text[9:12])
    if h > 23 or m > 59 or s > 60:
        return None
    return ((h * 60 + m) * 60 + s) * _NS + ms * 1_000_000


# --------------------------------------------------------------------- line shapes

def split_quote(raw: str) -> tuple[str, int]:
    """(the line without leading blanks and quote markers, the number of ``>`` removed).

    ``>>>  [x]``, ``> >>>  [x]`` (quoted), ``> > >  [x]`` (Markdown's nested quotes) and
    ``    >>>  [x]`` (indented) all give ``[x]``. A body line (``     dvi: ...``) gives
    its text with no ``>`` removed. Linear: one scan of the prefix.
    """
    s = raw.lstrip()
    if not s.startswith(">"):
        return s, 0
    n = i = 0
    size = len(s)
    while i < size:
        c = s[i]
        if c == ">":
            n += 1
        elif c not in " \t":
            break
        i += 1
    return s[i:], n


def _start_stamp(core: str) -> str | None:
    """The time text of a section-start line (either documented form), else None."""
    if core.startswith("Section start"):
        rest = core[13:]
        if rest and rest[0] not in " \t:":
            return None
        return rest.strip(" \t:")
    if core.endswith("Section start") and core[:1].isdigit():
        return core[:-13].strip().rstrip(":").strip()
    return None


def _end_stamp(rest: str) -> str | None:
    """The time text of a section-end footer (``rest`` is the text after ``<<<``)."""
    if rest.startswith("Section end"):
        return rest[11:].strip(" \t:")
    if rest.startswith("[") and rest.endswith("]"):
        inner = rest[1:-1].rstrip()
        if inner.endswith("Section end"):
            return inner[:-11].strip().rstrip(":").strip()
    return None


def _exit_status(rest: str) -> str | None:
    """The status of an exit footer: ``[Exit status: X]`` -> X, ``[Exit Status(X)]`` -> X,
    ``[Exit]`` -> ``EXIT`` (section-footer page above); None if not an exit footer."""
    if not (rest.startswith("[Exit") and rest.endswith("]")):
        return None
    inner = rest[5:-1].strip()
    if not inner:
        return "EXIT"
    low = inner[:7].lower()
    if low.startswith("status:"):
        return inner[7:].strip() or "EXIT"
    if low.startswith("status(") and inner.endswith(")"):
        return inner[7:-1].strip() or "EXIT"
    if low.startswith("status"):
        return inner[6:].strip(" :") or "EXIT"
    return inner


def _split_header(inner: str) -> tuple[str, str | None]:
    """``section_title - instance_identifier`` -> (title, identifier)."""
    title, sep, ident = inner.partition(" - ")
    if not sep:
        return inner.strip(), None
    return title.strip(), ident.strip() or None


def _hex(text: str, start: int) -> tuple[int | None, int]:
    """An ``0x...`` (or bare hex) number at ``start``: (value or None, index after it)."""
    i = start
    if text.startswith(("0x", "0X"), i):
        i += 2
    j = i
    size = len(text)
    while j < size and j - i < 16 and text[j] in _HEX_DIGITS:
        j += 1
    if j == i:
        return None, start
    return int(text[i:j], 16), j


def looks_like_instance_id(value: object) -> bool:
    """``ENUMERATOR\\DEVICE-ID\\INSTANCE`` shaped (``PCI\\VEN_...\\3&11583659&0&F8``),
    as opposed to a hardware id (``PCI\\VEN_8086&DEV_8C4F``) or an INF path."""
    return isinstance(value, str) and len(value) < 800 and bool(_INSTANCE_SHAPE.fullmatch(value))


def _quoted(text: str, start: int) -> str | None:
    """The text between the quote at ``start - 1`` and the next ``'``."""
    end = text.find("'", start)
    return text[start:end] if end > start else None


def _basename(path: str) -> str:
    return path.replace("/", "\\").rpartition("\\")[2].strip().strip("[]'\"")


# --------------------------------------------------------------------- body entries

#: ``{Title - <instance>}`` / ``{Title: <instance>}`` block openers that name the device:
#: plaso (``{Update Device Driver - PCI\\...\\3&267A616A&1&20}``, ``{Installing device - ...}``,
#: ``{Plug and Play Service: Device Install for ...}``), MS Learn log-files.md
#: (``ndv: {Update Device Driver - ...}``), nmap#1746 (``{Update Driver Software Wizard -
#: ROOT\\NET\\0001}``), Windows-driver-samples#57 (``{Update Driver Software Wizard for ...}``),
#: tap-windows6#70 (``{Install Device - ROOT\\NET\\0001}``, ``{Configure Device - ...}``),
#: Windows-driver-samples#46 (``{Configure Device: ...}``, ``{Install Root Device: ...}``),
#: libwdi#235 (``{Delete Device - ...}``), and Microsoft's Windows Embedded blog, "Diagnosis
#: of driver setup issues ... part 3" (``{DiInstallDevice(ROOT\\COMPOSITEBUS\\0000)}``).
_BRACE_PREFIXES = (
    "Update Device Driver - ", "Installing device - ", "Install Device - ",
    "Configure Device - ", "Configure Device: ", "Plug and Play Service: Device Install for ",
    "Update Driver Software Wizard for ", "Update Driver Software Wizard - ",
    "Install Root Device: ", "Delete Device - ", "DiInstallDevice(",
)
#: entries that quote the device instance id: ``Install Device: Starting device 'X'.``
#: (Windows-driver-samples#1047, nmap#1746), ``Install Device: Removing device 'X' and
#: sub-tree.`` (ovpn-dco-win#60), ``Failed to install device instance 'X'.`` (libwdi#171),
#: ``No better matching drivers found for device 'X'.`` (log-files.md), ``Device 'X' not
#: started: ...`` (roshkins/IddSampleDriver#11)
_QUOTE_PREFIXES = (
    "Install Device: Starting device '", "Install Device: Removing device '",
    "Failed to install device instance '", "No better matching drivers found for device '",
    "Device '",
)
#: entries with the id after a label: ``Restart: X`` (plaso), ``Start: X`` (libwdi#242),
#: ``Device Instance Id = X`` (Windows-driver-samples#46)
_LABEL_PREFIXES = ("Restart: ", "Start: ", "Device Instance Id = ")
#: first characters of the entries above (a cheap filter: most entries name nothing)
_INSTANCE_FIRST = frozenset(p[0] for p in ("{",) + _QUOTE_PREFIXES + _LABEL_PREFIXES)


def instance_in(msg: str) -> str | None:
    """The device instance id an entry names, if it names one (see the prefixes above)."""
    if msg.startswith("{"):
        close = msg.find("}")
        inner = msg[1:close] if close > 0 else msg[1:]
        if not inner.startswith(_BRACE_PREFIXES):       # one C call for the common case
            return None
        for p in _BRACE_PREFIXES:
            if inner.startswith(p):
                cand = inner[len(p):].strip()
                if p.endswith("("):
                    cand = cand.rstrip(")")
                return cand if looks_like_instance_id(cand) else None
        return None
    if not msg.startswith(_QUOTE_PREFIXES) and not msg.startswith(_LABEL_PREFIXES):
        return None
    for p in _QUOTE_PREFIXES:
        if msg.startswith(p):
            quoted = _quoted(msg, len(p))
            return quoted if quoted is not None and looks_like_instance_id(quoted) else None
    for p in _LABEL_PREFIXES:
        if msg.startswith(p):
            cand = msg[len(p):].strip()
            return cand if looks_like_instance_id(cand) else None
    return None


@dataclass(frozen=True)
class ProblemReport:
    """A problem code as one entry states it."""

    code: int | None               # None: the device has a problem, the entry gives no code
    name: str | None = None        # CM_PROB_* when the entry names it
    status: str | None = None      # the problem status (an NTSTATUS), as written
    device: str | None = None      # an instance id the entry itself names


def problem_in(msg: str) -> ProblemReport | None:
    """The problem code an entry reports, in the forms real logs use:

    * ``Device not started: Device has problem: 0x0a (CM_PROB_FAILED_START), problem
      status: 0xc00000e5.`` and ``Device pending start: ...`` (nmap#1746,
      ovpn-dco-win#60); ``Device 'X' not started: Device has problem: ...``
      (roshkins/IddSampleDriver#11);
      ``... Device has problem: 0x34: CM_PROB_UNSIGNED_DRIVER.`` (older builds, MS Learn
      "Troubleshooting Driver Signing Installation");
    * ``Device Status: 0x01802401, Problem: 0x38`` / ``..., Problem: 0x1c (0x00000000)``
      (nmap#1746, libwdi#171), ``Device Status: 0x01806400 [0x01 - 0xc0000493]``
      (libwdi#310) and ``Device Status: 0x0180200b`` alone (no problem unless the status
      has DN_HAS_PROBLEM).
    """
    at = msg.find("Device has problem: ")
    if at >= 0:
        code, i = _hex(msg, at + 20)
        if code is None:
            return None
        name: str | None = None
        rest = msg[i:i + 80]
        if rest.startswith(" ("):
            end = rest.find(")")
            name = rest[2:end] if end > 2 else None
        elif rest.startswith(": "):
            name = rest[2:].split(",", 1)[0].split(" ", 1)[0].rstrip(".") or None
        status: str | None = None
        ps = msg.find("problem status: ", i)
        if ps >= 0:
            val, j = _hex(msg, ps + 16)
            status = msg[ps + 16:j] if val is not None else None
        device = _quoted(msg, 8) if msg.startswith("Device '") else None
        if name is not None and not name.startswith("CM_PROB_"):
            name = None
        return ProblemReport(code, name, status, device if looks_like_instance_id(device) else None)
    if msg.startswith("Device Status: "):
        flags, i = _hex(msg, 15)
        if flags is None:
            return None
        rest = msg[i:i + 120]
        if rest.startswith(", Problem: "):
            code, j = _hex(rest, 11)
            st = rest[j:].strip()
            status = None
            if st.startswith("(") and st.endswith(")"):
                status = st[1:-1].strip() or None
            return ProblemReport(code, None, status)
        if rest.startswith(" [") and rest.endswith("]"):
            code, j = _hex(rest, 2)
            status = rest[j:-1].strip(" -") or None
            return ProblemReport(code, None, status)
        return ProblemReport(None if flags & _DN_HAS_PROBLEM else 0)
    return None


@dataclass(frozen=True)
class PackageRef:
    """What one entry says about the driver package a section installs."""

    inf: str | None = None          # an INF name (the published oemNN.inf when known)
    package: str | None = None      # a path of the package's INF
    store: bool = False             # ``package`` is its Driver Store path (better than a source path)
    continues: bool = False         # the published name follows on the next line


_NO_PACKAGE = PackageRef()
#: first characters of the entries ``package_in`` reads (a cheap filter)
_PACKAGE_FIRST = frozenset("DPI{SC")


def _inf_before_colon(text: str) -> str | None:
    colon = text.find(":")
    name = text[:colon] if colon > 0 else ""
    return name if name.lower().endswith(".inf") else None


def package_in(msg: str) -> PackageRef:
    """The driver package an entry names, in the forms real logs use:

    ``Driver package 'a.inf' exists under 'C:\\...\\a.inf' (oem20.inf).`` (plaso; in
    Windows-driver-samples#26 the part from the store path on is on the next line),
    ``Driver Store Path: ...`` and ``Published Inf Path: ...\\oem2.inf`` (plaso
    SetupCopyOEMInf), ``Driver INF Path: ...`` (plaso), ``{Configure Driver Package: ...}``
    (plaso), ``Inf Name - oem1.inf`` (MS Learn log-files.md), ``InfFile - [...]`` (plaso,
    log-files.md), ``Selected driver installs from section [S] in 'P'.``
    (Windows-driver-samples#26), ``Configuration: oem1.inf:...`` (Windows-driver-samples#1047),
    ``Install Device: Configuring device (nettun.inf:...)`` (plaso), ``Published 'x\\a.inf'
    to 'oem3.inf'.`` (plaso).
    """
    c = msg[:1]
    if c == "D":
        if msg.startswith("Driver package '"):
            at = msg.find(" exists under")
            if at < 0:
                return _NO_PACKAGE
            after = msg[at + 13:].strip()
            if not after:
                return PackageRef(continues=True)
            store = _quoted(after, 1) if after.startswith("'") else None
            tail = after.rstrip(".")
            paren = tail.rfind("(")
            inf = tail[paren + 1:-1] if paren >= 0 and tail.endswith(")") else None
            return PackageRef(inf=inf, package=store, store=store is not None)
        if msg.startswith("Driver Store Path: "):
            return PackageRef(package=msg[19:].strip() or None, store=True)
        if msg.startswith("Driver INF Path: "):
            return PackageRef(inf=_basename(msg[17:]) or None)
        return _NO_PACKAGE
    if c == "P":
        if msg.startswith("Published Inf Path: "):
            return PackageRef(inf=_basename(msg[20:]) or None)
        if msg.startswith("Published '"):
            at = msg.find("' to '")
            return PackageRef(inf=_quoted(msg, at + 6)) if at > 0 else _NO_PACKAGE
        return _NO_PACKAGE
    if c == "I":
        if msg.startswith("Inf Name"):
            return PackageRef(inf=msg[8:].strip().lstrip("-").strip() or None)
        if msg.startswith("InfFile"):
            return PackageRef(package=msg[7:].strip().lstrip("-").strip().strip("[]") or None)
        if msg.startswith("Install Device: Configuring device ("):
            return PackageRef(inf=_inf_before_colon(msg[36:]))
        return _NO_PACKAGE
    if c == "{" and msg.startswith("{Configure Driver Package: "):
        path = msg[27:].partition("}")[0].strip()
        if not path or path.startswith("exit"):        # the block's closing entry
            return _NO_PACKAGE
        return PackageRef(package=path, store="\\DriverStore\\" in path)
    if c == "S" and msg.startswith("Selected driver installs from section ["):
        at = msg.find("] in '")
        return PackageRef(package=_quoted(msg, at + 6)) if at > 0 else _NO_PACKAGE
    if c == "C" and msg.startswith("Configuration: "):
        return PackageRef(inf=_inf_before_colon(msg[15:]))
    return _NO_PACKAGE


# --------------------------------------------------------------------- sections

@dataclass(frozen=True)
class DeviceProblem:
    """A device's problem code at the end of a section (the last report wins)."""

    instance: str | None
    code: int
    name: str | None
    status: str | None
    line: int
    t_ns: int | None
    timed: bool


@dataclass
class Section:
    """One ``>>>`` ... ``<<<`` section, reduced to what a reader of the timeline needs."""

    title: str
    instance: str | None               # the device instance id (header, else the body)
    ident: str | None = None           # the header's instance_identifier, as written
    hardware_id: str | None = None     # ident, when it is a hardware id (not an instance)
    start_text: str | None = None
    end_text: str | None = None
    start_ns: int | None = None
    end_ns: int | None = None
    exit_status: str | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    line: int = 0
    end_line: int = 0
    flags: set[str] = field(default_factory=set)
    body_count: int = 0
    errors_count: int = 0
    warnings_count: int = 0
    instances: list[str] = field(default_factory=list)
    inf: str | None = None
    driver_package: str | None = None
    boot_session: str | None = None
    problems: list[DeviceProblem] = field(default_factory=list)
    #: the time of the last timed line before the header (for an untimed section)
    before_ns: int | None = field(default=None, repr=False, compare=False)

    @property
    def succeeded(self) -> bool | None:
        if self.exit_status is None:
            return None
        s = self.exit_status.upper()
        return s.startswith("SUCCESS") or s in ("0X00000000", "0")

    @property
    def exit_code(self) -> int | None:
        """The hex code in the exit status (``FAILURE(0xe0000219)`` -> 0xe0000219)."""
        if self.exit_status is None:
            return None
        at = self.exit_status.find("0x")
        if at < 0:
            at = self.exit_status.find("0X")
        return _hex(self.exit_status, at)[0] if at >= 0 else None

    @property
    def problem(self) -> DeviceProblem | None:
        """The problem the section's own device is left with (others: ``problems``)."""
        for p in self.problems:
            if p.instance == self.instance:
                return p
        return None

    @property
    def duration_ns(self) -> int | None:
        if self.start_ns is None or self.end_ns is None or self.end_ns < self.start_ns:
            return None
        return self.end_ns - self.start_ns

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "title": self.title, "instance": self.instance, "start": self.start_text,
            "end": self.end_text, "exit_status": self.exit_status, "succeeded": self.succeeded,
            "errors": list(self.errors), "warnings": list(self.warnings), "line": self.line,
            "body_lines": self.body_count, "flags": sorted(self.flags)}
        for key, value in (("id", self.ident), ("hardware_id", self.hardware_id),
                           ("exit_code", self.exit_code), ("inf", self.inf),
                           ("driver_package", self.driver_package),
                           ("boot_session", self.boot_session), ("end_line", self.end_line or None)):
            if value is not None:
                out[key] = value
        if len(self.instances) > 1:
            out["instances"] = list(self.instances)
        if self.errors_count > len(self.errors):
            out["errors_count"] = self.errors_count
        if self.warnings_count > len(self.warnings):
            out["warnings_count"] = self.warnings_count
        p = self.problem
        if p is not None:
            out["code"] = p.code
            if p.name:
                out["problem"] = p.name
            if p.status:
                out["problem_status"] = p.status
        return out


@dataclass
class SetupApiLog:
    """What ``parse`` returns for the live tracer: the sections, the boot banners' times,
    and the structural problems (by line number)."""

    sections: list[Section]
    boot_sessions: list[str]
    problems: list[str]


@dataclass
class _Report:
    """The last problem report seen for one device in the open section."""

    code: int
    name: str | None
    status: str | None
    line: int
    t_ns: int | None
    timed: bool


class _Builder:
    """The open section: its header, the body entries read so far, and per device the
    last problem report (a device's state changes during an install: ``Problem: 0x1c``
    before the driver is installed, ``0x0`` once it started)."""

    def __init__(self, sec: Section, last_ns: int | None, utc_offset: timedelta) -> None:
        self.sec = sec
        sec.before_ns = last_ns
        self.utc_offset = utc_offset
        self.started = False
        self.day_base: int | None = None
        self.start_ns_for_tod: int | None = None
        self.current: str | None = sec.instance
        self.reports: dict[str | None, _Report] = {}
        self.await_published = False
        self.store_pkg = False
        self.last_ns: int | None = None

    def set_start(self, ns: int | None, stamp: str) -> None:
        self.sec.start_ns = ns
        if ns is not None:
            tod = _tod_ns(stamp[11:]) if len(stamp) == 23 else None
            self.day_base = ns - tod if tod is not None else None
            self.start_ns_for_tod = ns
            self.last_ns = ns

    def line_time(self, tod: int | None) -> int | None:
        """A body entry's time of day on the section's day (next day past midnight)."""
        if tod is None or self.day_base is None or self.start_ns_for_tod is None:
            return None
        t = self.day_base + tod
        if t < self.start_ns_for_tod - 60 * _NS:
            t += _DAY_NS
        return t

    def remember(self, inst: str) -> None:
        sec = self.sec
        if sec.instance is None:
            sec.instance = inst
        if inst not in sec.instances and len(sec.instances) < MAX_INSTANCES:
            sec.instances.append(inst)
        self.current = inst

    def body(self, lineno: int, core: str) -> None:
        """One body entry (``core``: the line without indentation and quote markers)."""
        sec = self.sec
        sec.body_count += 1
        if len(sec.body) < MAX_BODY_LINES:
            sec.body.append(core[:MAX_KEPT_CHARS])
        text = core
        if core[0] == "!":
            if core.startswith("!!!"):
                text = core[3:].strip()
                sec.errors_count += 1
                if len(sec.errors) < MAX_NOTES:
                    sec.errors.append(text[:MAX_KEPT_CHARS])
            else:
                text = core[1:].strip()
                sec.warnings_count += 1
                if len(sec.warnings) < MAX_NOTES:
                    sec.warnings.append(text[:MAX_KEPT_CHARS])
        # optional time stamp field (SetupWriteTextLog with TXTLOG_TIMESTAMP; section-body page)
        t_ns: int | None = None
        if text[4:5] == "/" and _TS_SHAPE.fullmatch(text, 0, 23):
            try:
                t_ns = parse_timestamp(text[:23], self.utc_offset)
            except ValueError:
                t_ns = None
            text = text[23:].lstrip(" :")
        # event category: three characters and a colon ("dvi: ", "ui : ")
        if text[3:4] == ":" and text[4:5] in (" ", "\t", ""):
            msg = text[4:].strip()
        else:
            msg = text.rstrip()
        if not msg:
            return
        if t_ns is None and msg[-4:-3] == "." and msg[-13:-12] == " ":
            t_ns = self.line_time(_tod_ns(msg[-12:]))
        timed = t_ns is not None
        if timed:
            self.last_ns = t_ns
        if self.await_published:
            self.await_published = False
            tail = msg.rstrip(".")
            if tail.endswith(".inf)"):
                store = _quoted(msg, 1) if msg.startswith("'") else None
                self._set_package(PackageRef(inf=tail[tail.rfind("(") + 1:-1], package=store,
                                             store=store is not None))
                return
        c0 = msg[0]
        if c0 in _INSTANCE_FIRST:
            inst = instance_in(msg)
            if inst is not None:
                self.remember(inst)
        if "roblem" in msg or msg.startswith("Device Status: "):
            rep = problem_in(msg)
            if rep is not None:
                self._report(lineno, rep, t_ns if timed else self.last_ns, timed)
        if c0 in _PACKAGE_FIRST:
            ref = package_in(msg)
            if ref is not _NO_PACKAGE:
                self._set_package(ref)
                self.await_published = ref.continues

    def _set_package(self, ref: PackageRef) -> None:
        """The first published ``oemNN.inf`` wins over other INF names; the first Driver
        Store path over a source path."""
        sec = self.sec
        if ref.inf:
            inf = ref.inf.strip()[:MAX_KEPT_CHARS]
            if sec.inf is None or (_OEM_INF.fullmatch(inf) and not _OEM_INF.fullmatch(sec.inf)):
                sec.inf = inf
        if ref.package and (sec.driver_package is None or (ref.store and not self.store_pkg)):
            sec.driver_package = ref.package.strip()[:MAX_KEPT_CHARS]
            self.store_pkg = ref.store
            if sec.inf is None:
                sec.inf = _basename(ref.package) or None

    def _report(self, lineno: int, rep: ProblemReport, t_ns: int | None, timed: bool) -> None:
        device = rep.device or self.current
        if rep.device is not None:
            self.remember(rep.device)
        old = self.reports.get(device)
        code = rep.code
        if code is None:                # "has a problem" without a code: keep the one we know
            if old is None:
                return
            code = old.code
        name = rep.name
        if name is None and old is not None and old.code == code:
            name = old.name             # "Problem: 0x38" after "0x38 (CM_PROB_NEED_CLASS_CONFIG)"
        status = rep.status
        if status is None and old is not None and old.code == code:
            status = old.status
        if device not in self.reports and len(self.reports) >= MAX_INSTANCES:
            return
        self.reports[device] = _Report(code, name, status, lineno, t_ns, timed)

    def finish(self) -> Section:
        sec = self.sec
        for device, r in self.reports.items():
            if r.code:
                sec.problems.append(DeviceProblem(device or sec.instance, r.code, r.name, r.status,
                                                  r.line, r.t_ns, r.timed))
        return sec


class SectionReader:
    """Cuts numbered lines into Sections, accounting for every line in ``tally``.

    used: lines of a section, ``[Boot Session]`` banners; skipped: blank lines, the text
    log header, code fences of a paste, footers without a section (a problem too); not
    understood: anything else outside a section (prose around a paste, entries written
    outside sections, or the middle of a section whose header is not in the input).
    """

    def __init__(self, tally: Tally, *, utc_offset: timedelta = timedelta(0),
                 at_eof_open: bool = True) -> None:
        self.tally = tally
        self.utc_offset = utc_offset
        self.at_eof_open = at_eof_open
        self.cur: _Builder | None = None
        self.pending: tuple[int, str, str] | None = None    # a bare "[...]" line: lineno, raw, core
        self.boot: str | None = None
        self.boot_sessions: list[str] = []
        self.last_ns: int | None = None
        self.last_lineno = 0

    # -- accounting
    def _problem(self, lineno: int, what: str) -> None:
        self.tally.problem(f"line {lineno}: {what}")

    def _close(self, flag: str | None, lineno: int, why: str | None = None) -> Section | None:
        b = self.cur
        self.cur = None
        if b is None:
            return None
        if flag:
            b.sec.flags.add(flag)
        if why:
            self._problem(b.sec.line, why)
        if b.last_ns is not None and (self.last_ns is None or b.last_ns > self.last_ns):
            self.last_ns = b.last_ns
        b.sec.end_line = b.sec.end_line or lineno
        return b.finish()

    def _time(self, lineno: int, stamp: str, what: str) -> int | None:
        try:
            ns = parse_timestamp(stamp, self.utc_offset)
        except ValueError:
            self._problem(lineno, f"bad {what} time")
            return None
        self.last_ns = ns
        return ns

    # -- the line kinds
    def _header(self, lineno: int, inner: str) -> Iterator[Section]:
        if self.cur is not None:
            sec = self._close("truncated", lineno - 1, "section cut short by the next section header")
            if sec is not None:
                yield sec
        title, ident = _split_header(inner[:MAX_KEPT_CHARS * 2])
        title = title[:MAX_KEPT_CHARS]
        ident = ident[:MAX_KEPT_CHARS] if ident is not None else None
        inst = ident if looks_like_instance_id(ident) else None
        # UpdateDriverForPlugAndPlayDevices is called with a hardware id (tap0901,
        # PCI\\VEN_8086&DEV_8C4F); other titles carry INF paths, GUIDs, hive names
        hw = None
        if ident is not None and inst is None and ":" not in ident and (
                "UpdateDriverForPlugAndPlayDevices" in title
                or ("\\" in ident and not ident.lower().endswith(".inf"))):
            hw = ident
        sec = Section(title=title or "(untitled)", instance=inst, ident=ident, hardware_id=hw,
                      line=lineno, boot_session=self.boot)
        if inst is not None:
            sec.instances.append(inst)
        self.cur = _Builder(sec, self.last_ns, self.utc_offset)
        self.tally.used_line()

    def _start(self, lineno: int, stamp: str) -> Iterator[Section]:
        b = self.cur
        if b is not None and b.started:
            sec = self._close("truncated", lineno - 1, "section cut short by the next section start")
            if sec is not None:
                yield sec
            b = None
        if b is None:
            s = Section(title="(untitled)", instance=None, line=lineno, flags={"missing-header"},
                        boot_session=self.boot)
            self._problem(lineno, "section start without a section header")
            b = self.cur = _Builder(s, self.last_ns, self.utc_offset)
        b.started = True
        b.sec.start_text = stamp[:MAX_KEPT_CHARS]
        ns = self._time(lineno, stamp, "section start")
        if ns is None:
            b.sec.flags.add("bad-timestamp")
        b.set_start(ns, stamp)
        self.tally.used_line()

    def _footer(self, lineno: int, rest: str) -> Iterator[Section]:
        stamp = _end_stamp(rest)
        status = None if stamp is not None else _exit_status(rest)
        b = self.cur
        if stamp is None and status is None:
            if b is not None:
                self._body(lineno, "<<<  " + rest)
            else:
                self.tally.unknown(lineno, "<<<  " + rest)
            return
        if b is None:
            what = "section end" if stamp is not None else "exit status"
            self._problem(lineno, f"{what} without a section start (the input began inside a section)")
            self.tally.skip()
            return
        self._opened(lineno)
        self.tally.used_line()
        b.sec.end_line = lineno
        if stamp is not None:
            b.sec.end_text = stamp[:MAX_KEPT_CHARS]
            ns = self._time(lineno, stamp, "section end")
            if ns is None:
                b.sec.flags.add("bad-timestamp")
            b.sec.end_ns = ns
            if ns is not None:
                b.last_ns = ns
            return
        assert status is not None
        b.sec.exit_status = status[:MAX_KEPT_CHARS]
        sec = self._close(None if b.sec.end_text is not None else "missing-end", lineno)
        if sec is not None:
            yield sec

    def _opened(self, lineno: int) -> None:
        """A header must be followed by its start line; anything else opens it anyway."""
        b = self.cur
        if b is not None and not b.started:
            b.started = True
            b.sec.flags.add("missing-start")
            self._problem(b.sec.line, "section header without a section start line")

    def _body(self, lineno: int, core: str) -> None:
        assert self.cur is not None
        self._opened(lineno)
        self.cur.body(lineno, core)
        self.tally.used_line()

    def _resolve_pending(self) -> None:
        """A bare ``[...]`` line not followed by ``Section start``: body, or not understood."""
        if self.pending is None:
            return
        lineno, raw, core = self.pending
        self.pending = None
        if self.cur is not None:
            self._body(lineno, core)
        else:
            self.tally.unknown(lineno, raw)

    # -- entry point
    def feed(self, lineno: int, raw: str) -> Iterator[Section]:
        """Account for one line; yield the section(s) it closes."""
        self.last_lineno = lineno
        core, gt = split_quote(raw)
        if self.pending is not None:
            stamp = _start_stamp(core) if core else None
            if stamp is not None:
                p_line, _, p_core = self.pending
                self.pending = None
                yield from self._header(p_line, p_core[1:-1])
                yield from self._start(lineno, stamp)
                return
            if core:
                self._resolve_pending()
        if not core:
            self.tally.skip()
            return
        if core.startswith(("```", "~~~")):
            self.tally.skip()                       # a Markdown code fence around a paste
            return
        c0 = core[0]
        if c0 == "[" and core.endswith("]"):
            yield from self._bracket(lineno, raw, core, gt)
            return
        if c0 == "<" and core.startswith("<<<"):
            yield from self._footer(lineno, core[3:].strip())
            return
        if c0 == "S" or c0.isdigit():
            stamp = _start_stamp(core)
            if stamp is not None:
                yield from self._start(lineno, stamp)
                return
        cur = self.cur
        if cur is not None:
            if not cur.started:
                self._opened(lineno)
            cur.body(lineno, core)
            self.tally.used_line()
            return
        key, sep, _ = core.partition(" = ")
        if sep and key in _HEADER_FIELDS:
            self.tally.skip()
            return
        self.tally.unknown(lineno, raw)

    def _bracket(self, lineno: int, raw: str, core: str, gt: int) -> Iterator[Section]:
        inner = core[1:-1].strip()
        if inner in ("Device Install Log", "BeginLog"):
            if self.cur is not None and inner == "Device Install Log":
                sec = self._close("truncated", lineno - 1, "section cut short by a new log header")
                if sec is not None:
                    yield sec
            self.tally.skip()
            return
        if inner.startswith("Boot Session:"):
            if self.cur is not None:
                b = self.cur
                b.sec.flags.add("cut-by-boot")
                sec = self._close("truncated", lineno - 1,
                                  "section cut short by a boot session banner (the machine restarted?)")
                if sec is not None:
                    yield sec
            stamp = inner[13:].strip()
            self._time(lineno, stamp, "boot session")
            self.boot = stamp[:MAX_KEPT_CHARS]
            if len(self.boot_sessions) < MAX_BOOTS:
                self.boot_sessions.append(self.boot)
            self.tally.used_line()
            return
        if _exit_status(core) is not None or _end_stamp(core) is not None:
            yield from self._footer(lineno, core)   # a footer whose "<<<" was lost
            return
        if gt >= 1:
            yield from self._header(lineno, inner)
            return
        self.pending = (lineno, raw, core)          # a header whose ">>>" was lost, or text

    def close(self) -> Iterator[Section]:
        """The end of the input: a section still open is ``incomplete`` (SetupAPI may be
        writing it) or, with ``at_eof_open=False``, ``truncated``."""
        self._resolve_pending()
        if self.cur is not None:
            flag = "incomplete" if self.at_eof_open else "truncated"
            sec = self._close(flag, self.last_lineno, "section not closed at the end of the input")
            if sec is not None:
                yield sec


def read_sections(lines: Iterable[tuple[int, str]], tally: Tally, *,
                  utc_offset: timedelta = timedelta(0), at_eof_open: bool = True) -> Iterator[Section]:
    """Sections of numbered lines, in order, as each one closes (streaming)."""
    reader = SectionReader(tally, utc_offset=utc_offset, at_eof_open=at_eof_open)
    for lineno, raw in lines:
        yield from reader.feed(lineno, raw)
    yield from reader.close()


def _text_lines(text: str, tally: Tally) -> Iterator[tuple[int, str]]:
    """Numbered lines of ``text`` split like ``LogInput.lines`` (LF, CRLF; not \\f or U+2028)."""
    lineno = 0
    start = 0
    size = len(text)
    while start < size:
        end = text.find("\n", start)
        if end < 0:
            end = size
        line = text[start:end]
        start = end + 1
        if line.endswith("\r"):
            line = line[:-1]
        lineno += 1
        tally.lines = lineno
        yield lineno, line


def parse(text: str, *, utc_offset: timedelta = timedelta(0), since_ns: int | None = None,
          at_eof_open: bool = True) -> SetupApiLog:
    """Cut ``text`` (the tail the live tracer fetched, or a whole log) into sections.

    ``since_ns``: keep only sections that started at or after it (the run start); a
    section whose start time cannot be read is kept and flagged ``bad-timestamp``,
    never dropped. A section cut short by the next header is flagged ``truncated``;
    one still open at the end of the text is flagged ``incomplete`` (SetupAPI may
    still be writing it) unless ``at_eof_open`` is False, then ``truncated`` too.
    Footer lines without a header (the tail began inside a section) are reported in
    ``problems``, by line number.
    """
    tally = Tally(path="<text>", format=PARSER.name)
    reader = SectionReader(tally, utc_offset=utc_offset, at_eof_open=at_eof_open)
    sections: list[Section] = []
    for lineno, raw in _text_lines(text, tally):
        sections.extend(reader.feed(lineno, raw))
    sections.extend(reader.close())
    if since_ns is not None:
        sections = [s for s in sections if s.start_ns is None or s.start_ns >= since_ns]
    problems = list(tally.problems)
    if tally.problems_dropped:
        problems.append(f"{tally.problems_dropped} more problems")
    return SetupApiLog(sections=sections, boot_sessions=reader.boot_sessions, problems=problems)


# --------------------------------------------------------------------- events

def section_event(sec: Section, *, t_ns: int, at: str | None = None,
                  t_guest_ns: int | None = None, untimed: bool = False) -> Event:
    """The SETUPAPI_SECTION event of a section (device: its instance id, if known)."""
    data = sec.to_json()
    if at is not None:
        data["at"] = at
    flags = set(sec.flags)
    if untimed:
        flags.add("untimed")
    if sec.start_ns is not None and sec.end_ns is not None and sec.end_ns < sec.start_ns:
        flags.add("end-before-start")
    data["flags"] = sorted(flags)
    dev = DeviceId(instance=sec.instance) if sec.instance is not None else None
    return Event(t_host_ns=t_ns, source=Source.GUEST_SETUPAPI, kind=Kind.SETUPAPI_SECTION,
                 device=dev, duration_ns=sec.duration_ns, data=data, t_guest_ns=t_guest_ns)


def problem_events(sec: Section, *, fallback_ns: int, display: str | None = None,
                   host_ns: int | None = None) -> list[Event]:
    """A PROBLEM event per device the section leaves with a problem code.

    ``data["code"]`` is the CM_PROB_* number (lab/rules/windows_pnp.py reads it),
    ``data["problem"]`` its name when the log gives one. The time is that of the entry
    reporting it (or of the last timed entry before it, then flagged ``untimed``).
    """
    out = []
    for p in sec.problems:
        t = p.t_ns if p.t_ns is not None else fallback_ns
        data: dict[str, Any] = {"code": p.code, "section": sec.title, "line": p.line,
                                "exit_status": sec.exit_status}
        if display is not None:
            data["at"] = f"{display}:{p.line}"
            data["section_at"] = f"{display}:{sec.line}"
        if p.name:
            data["problem"] = p.name
        if p.status:
            data["problem_status"] = p.status
        if not p.timed:
            data["flags"] = ["untimed"]
        dev = DeviceId(instance=p.instance) if p.instance is not None else None
        out.append(Event(t_host_ns=host_ns if host_ns is not None else t, source=Source.GUEST_SETUPAPI,
                         kind=Kind.PROBLEM, device=dev, data=data, t_guest_ns=t))
    return out


def log_events(log: SetupApiLog, *, received_ns: int, with_problems: bool = False) -> list[Event]:
    """The live tracer's events: one SETUPAPI_SECTION per section, at the host receive time
    with the guest time in ``t_guest_ns`` (the timeline aligns the clocks); with
    ``with_problems`` also the PROBLEM events of ``problem_events``."""
    out: list[Event] = []
    for sec in log.sections:
        out.append(section_event(sec, t_ns=received_ns, t_guest_ns=sec.start_ns))
        if with_problems:
            fallback = sec.start_ns if sec.start_ns is not None else received_ns
            out.extend(problem_events(sec, fallback_ns=fallback, host_ns=received_ns))
    return out


# --------------------------------------------------------------------- the inspect parser

class SetupApiParser:
    """setupapi.dev.log (and setupapi.app.log, same format), whole or pasted."""

    name = "setupapi"
    description = ("SetupAPI text log (setupapi.dev.log): device install sections, exit "
                   "status, problem codes, driver packages")

    def sniff(self, inp: LogInput) -> int:
        """``[Device Install Log]``, ``Section start`` lines and ``>>>  [`` headers in the
        head, also when indented or quoted."""
        try:
            if inp.is_binary():
                return 0
            head = inp.head
        except LogFormatError:
            return 0
        log_header = starts = headers = footers = boots = 0
        for n, raw in enumerate(head.split("\n")):
            if n >= SNIFF_LINES:
                break
            core, gt = split_quote(raw[:MAX_LINE_CHARS].rstrip("\r"))
            if not core:
                continue
            if core == "[Device Install Log]":
                log_header += 1
            elif core.startswith("[Boot Session:") and core.endswith("]"):
                boots += 1
            elif _start_stamp(core) is not None:
                starts += 1
            elif gt >= 3 and core.startswith("[") and core.endswith("]"):
                headers += 1                # ">>>  [", "> >>>  [", "> > >  [" (not "> [!NOTE]")
            elif core.startswith("<<<") and (_end_stamp(core[3:].strip()) is not None
                                            or _exit_status(core[3:].strip()) is not None):
                footers += 1
        if log_header:
            return 100 if (starts or boots) else 90
        if starts and headers:
            return 95
        if starts:
            return 80
        if headers:
            return 70 if footers else 60
        if boots or footers:
            return 40
        return 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        """Events of every section (and PROBLEM events), in the log's local time."""
        tally.format = self.name
        tally.clock = "local"
        reader = SectionReader(tally)
        display = inp.display

        def emit(sec: Section) -> Iterator[Event]:
            untimed = sec.start_ns is None
            t = sec.start_ns if sec.start_ns is not None else (sec.before_ns or 0)
            yield section_event(sec, t_ns=t, t_guest_ns=t, at=f"{display}:{sec.line}",
                                untimed=untimed)
            tally.events += 1
            for ev in problem_events(sec, fallback_ns=t, display=display):
                yield ev
                tally.events += 1

        for lineno, raw in inp.lines(tally):
            for sec in reader.feed(lineno, raw):
                yield from emit(sec)
        for sec in reader.close():
            yield from emit(sec)


PARSER = SetupApiParser()
PARSERS = (PARSER,)

__all__ = ["PARSER", "PARSERS", "DeviceProblem", "ProblemReport", "Section", "SectionReader",
           "SetupApiLog", "SetupApiParser", "instance_in", "log_events", "looks_like_instance_id",
           "parse", "parse_timestamp", "problem_events", "problem_in", "read_sections",
           "section_event", "split_quote"]
