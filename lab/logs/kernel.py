"""The Linux kernel log, in the shapes people paste it: ``dmesg``, journald, syslog, kmsg.

One parser (``kernel-log``) for every variant, sniffed line by line because a pasted log
mixes them (a ``dmesg | grep`` under a ``journalctl -k`` excerpt, a quoted reply, a shell
prompt). The same per-line code serves the lab's live serial console
(``lab.tracers.kernel_log``), so ``rebalab inspect`` and a lab run read a message alike.

Line forms (``split_line``), each as the tool prints it:

- printk stamp ``[    1.234567] msg``: ``%5lu.%06lu`` seconds since boot
  (kernel/printk/printk.c ``print_time``); ``dmesg -r`` keeps the syslog prefix
  ``<6>[    1.234567] msg``; ``CONFIG_PRINTK_CALLER`` adds ``[    T123]`` after the stamp;
  ``dmesg -d`` adds ``< 0.000123>`` inside the bracket.
- ``dmesg -T`` (ctime) ``[Mon Dec  2 04:23:38 2026] msg``: local wall clock, printed with
  strftime in the reader's locale (``[Ter Set 19 06:01:41 2017]`` on pt_BR), so month
  names are looked up in a few languages. ``dmesg -H``/``-e`` relative stamps
  (``[  +0.000123]``) carry no absolute time: they are stripped and the line is untimed.
- ``dmesg --time-format=iso`` ``2026-12-02T04:23:38,123456+00:00 msg`` (comma fraction).
- ``dmesg -x`` ``kern  :info  : [    1.234567] msg`` (facility and level decoded).
- /dev/kmsg records ``6,1234,5678901,-;msg``: ``prio,seq,usec,flags[,caller=..];text``
  with dictionary lines `` KEY=VALUE`` after them; text bytes outside printable ASCII are
  escaped ``\\xNN`` (Documentation/ABI/testing/dev-kmsg).
- journalctl ``-o short`` ``Dec 02 04:23:38 host kernel: msg`` (no year: it comes from a
  ``-- Logs begin at ... --``/``-- Journal begins at ... --`` header, else 1970 and the flag
  ``no-year``; a month going backwards is a new year); ``short-precise`` adds ``.123456``;
  ``short-full`` ``Mon 2026-12-02 04:23:38 CET host kernel: msg``; ``short-iso``
  ``2026-12-02T04:23:38+0000 host kernel: msg`` (also ``+00:00``); ``short-monotonic``
  ``[    1.234567] host kernel: msg``.
- syslog kern.log ``Dec  2 04:23:38 host kernel: [    1.234567] msg`` (both clocks: the boot
  stamp orders, the wall time is kept in ``data["wall"]``), OpenWrt ``logread``
  ``Thu Mar 12 20:49:18 2020 kern.info kernel: [    0.186275] msg``, socklog/svlogd
  ``2015-10-01T18:25:37.34135 kern.debug: [    0.520776] msg``, and any other collector
  prefix in front of a printk stamp (found in the first 300 characters; there the stamp
  must have printk's six fraction digits).
- no stamp at all: each line is a message, ordered and untimed. A stamp-less line
  indented deeper than the message before it continues that message (stack traces and
  multi-line reports as ``dmesg`` and journalctl print them), unless it is itself a
  device message (``drv 0000:01:00.0: ...``).
- not kernel messages, recognised and skipped: blank lines, journal markers
  (``-- Boot ... --``, ``-- No entries --``), shell prompt lines with their command,
  Markdown code fences, elisions (``...``, ``[...]``), separators without letters,
  syslog/journal lines of other programs.

Clock (``tally.clock``): "boot" if any line has a boot-relative stamp (kernel time orders
best, and syslog lines carry both), else "utc" (a wall time with an offset) or "local"
(zone unknown, taken as UTC); lines whose only time is in another domain keep it in
``data["wall"]`` and are ordered as untimed. ``data["boot"]`` numbers boots in a
boot-clocked file (a ``-- Boot --`` marker, or the boot clock going back by > 1 s).

Every event's data also has ``at`` (``FILE:LINE``) and, when the line said so, ``level``
(0-7), ``facility``, ``caller`` (printk caller id), ``prefix`` (a collector's text before
the stamp), ``kmsg`` (the /dev/kmsg dictionary), ``lines`` (first line and continuation
lines; ``text`` is then all of them joined by newlines; ``lines_dropped`` past
``MAX_CONTINUATION_LINES``) and ``flags``: ``untimed``, ``no-year``, ``reltime`` (a
relative dmesg stamp), ``stamp-cut`` (a printk stamp that lost its ``[``), ``bad-time``,
``untimed-locale`` (a ``dmesg -T`` month name not known), ``truncated``.

Message kinds (``classify_message``), from the kernel's own format strings:

- ``rebalab-uevent ...`` (the lab image's hot-plug helper) -> ``Source.GUEST_UEVENT``
  ``Kind.UEVENT``; ``rebalab-sync`` lines (``lab.clock.SYNC_RE``) are clock evidence, skipped.
- ``OOPS_RE`` (Oops, BUG:, WARNING:, panic, Call Trace:) -> ``Kind.KERNEL_OOPS``.
- device messages ``dev_printk``: ``"<driver or bus> <device name>: msg"``
  (drivers/base/core.c ``dev_driver_string``): device ``DeviceId(bdf=...)``,
  ``data["driver"]`` unless the prefix is the bus or a port service (``NON_DRIVERS``).
  pciehp's old service device name ``0000:00:1c.0:pcie004`` names the port.
- PCI resource assignment (``Kind.RESOURCES_ASSIGNED``/``RESOURCE_UNASSIGNED``/
  ``RESOURCE_RELEASED``), ``%pR`` as lib/vsprintf.c ``resource_string`` prints it:
  ``[mem 0xfe800000-0xfe803fff 64bit pref]``, ``[io  0x1000-0x1fff]``, and
  ``[mem size 0x04000000]`` while the resource is ``IORESOURCE_UNSET``.

  * 4.x to 6.7, drivers/pci/setup-res.c ``pci_assign_resource``/``pci_release_resource``
    (read in the Rtoax/linux-5.10.13 and adennnqt/DumpC2J-6.6 trees; setup-bus.c read in
    bit-brick/k1-linux-6.1; the 4.19 strings are the same, printed with ``pci_info``
    since 4.16): ``"BAR %d: no space for %pR"``, ``"BAR %d: failed to assign %pR"``,
    ``"BAR %d: assigned %pR"``, ``"BAR %d: releasing %pR"``,
    ``"BAR %d: can't assign %pR (bogus alignment)"``,
    ``"BAR %d: reassigned %pR (expanded by %#llx)"``,
    ``"BAR %d: %pR (failed to expand by %#llx)"``,
    ``"can't claim BAR %d %pR: no compatible bridge window"`` / ``address conflict with``,
    ``"can't enable device: BAR %d %pR not assigned"`` / ``not claimed``; setup-bus.c
    ``"resource %d %pR released"`` (``pci_bridge_release_resources``),
    ``"BAR %d: releasing %pR"`` (``pci_reassign_bridge_resources``),
    ``"BAR %d: %pR has bogus alignment"``, ``"disabling BAR %d: %pR (bad alignment %#llx)"``.
    BAR numbers there are resource indexes: 7.. (13.. with SR-IOV) are bridge windows.
  * 6.8+ ("PCI: Use resource names in PCI log messages": ``pci_resource_name`` in
    drivers/pci/pci.c names "BAR 0".."BAR 5", "ROM", "VF BAR n", "bridge window",
    "CardBus bridge window n"; setup-res.c/setup-bus.c read in the Sky1-Linux/linux and
    Ramir-o/linux-6.18.y trees; distribution kernels backport it, e.g. CentOS Stream 9's
    5.14): ``"%s %pR: can't assign; no space"``, ``"%s %pR: failed to assign"``,
    ``"%s %pR: assigned"``, ``"%s %pR: releasing"``, ``"%s %pR: can't assign; bogus
    alignment"``, ``"%s %pR: reassigned; expanded by %#llx"``, ``"%s %pR: failed to expand
    by %#llx"``, ``"%s %pR: can't claim; ..."``, ``"%s %pR: not assigned; can't enable
    device"``, ``"%s %pR: failed to add optional %llx"``, ``"%s %pR: disabling; bad alignment
    %#llx"``.
  * ``"PCI: No. %d try to assign unassigned res"`` (setup-bus.c, also as a ``pci_bus``
    message) stays ``KERNEL_LOG`` with ``data["assign_try"]``.

  ``data``: ``resource`` ("BAR 14", "bridge window", "ROM", ...; an old ``resource 14``
  is reported as "BAR 14", the same index), ``bar`` (int, when numbered), ``space``
  ("mem", "io", ...), ``prefetch``, ``mem64``, ``start``/``end``/``size`` (int or None),
  ``reason`` ("no space", "failed to assign", "assigned", "releasing", ...), ``range``
  (the printed ``%pR``).
- pciehp slot messages, drivers/pci/hotplug/pciehp_ctrl.c and pciehp_hpc.c (read in the
  l1k/linux tree of the 4.19 era and a current one, Kingxukai/linux):
  ``"Slot(%s): Card present"``, ``"Card not present"``, ``"Link Up"``, ``"Link Down"``,
  ``"Attention button pressed"``, ``"Powering off due to button press"`` (the current
  driver says ``"Button press: will power off in 5 sec"``), ``"Button cancel"`` (now
  ``"Button press: canceling request to power ..."``), printed by the service device
  ``pciehp 0000:00:1c.0:pcie004:`` in 4.x and as ``pcieport 0000:00:1c.0: pciehp:``
  (``dev_fmt``) in 5.x and later; 3.x wrote ``"Card present on Slot(%s)"`` and
  ``"slot(%s): Link Down event"`` -> ``Kind.SLOT_EVENT`` with ``data["slot"]``,
  ``data["event"]`` (a slug: "card-present", "link-down", ...), device = the port.
- driver core probe failures, drivers/base/dd.c ``call_driver_probe``: ``"%s: probe of %s
  failed with error %d"`` (``pr_warn``) and, since a 2024 change, ``"probe with driver %s
  failed with error %d"`` (``dev_err``, so prefixed with the device)
  -> ``KERNEL_LOG`` with ``data["probe_error"]`` and ``data["driver"]``.
- everything else -> ``Kind.KERNEL_LOG`` with ``data["text"]``; a message naming a BDF
  anywhere gets that device, as the live console always did.
"""

from __future__ import annotations

import calendar
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from lab.clock import SYNC_RE
from lab.events import DeviceId, Event, Kind, Source
from lab.logs.base import LogFormatError, LogInput, Tally

UEVENT_PREFIX = "rebalab-uevent "
#: oops/BUG/WARNING/panic report lines (the live console's long-standing definition)
OOPS_RE = re.compile(r"(Oops|BUG:|WARNING:|general protection fault|Unable to handle kernel|"
                     r"kernel NULL pointer dereference|Kernel panic|Call Trace:)")
#: device-message prefixes that name a bus or a PCIe port service, not a function's driver
NON_DRIVERS = frozenset({"pci", "pci_bus", "pcieport", "pciehp", "aer", "dpc", "pcie_pme",
                         "pcie_bwctrl", "shpchp"})

_KV_RE = re.compile(r"(\w+)=(\S*)")
_BDF_RE = re.compile(r"\b([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\b")
_BDF_FULL_RE = re.compile(r"^[0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")

#: a stamp-less line is searched this far for a collector-prefixed printk stamp
PREFIX_SEARCH_CHARS = 300
#: a message keeps at most this many continuation lines (the rest are counted, not kept)
MAX_CONTINUATION_LINES = 200
#: int64 nanoseconds end in 2262; later (or garbled) times are not used as times
_MAX_NS = 2**63 - 1
_NS = 1_000_000_000

_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp",
               "cron", "authpriv", "ftp", "res0", "res1", "res2", "res3", "local0", "local1",
               "local2", "local3", "local4", "local5", "local6", "local7")
_LEVELS = ("emerg", "alert", "crit", "err", "warn", "notice", "info", "debug")
_LEVEL_BY_NAME = {n: i for i, n in enumerate(_LEVELS)} | {"warning": 4, "error": 3,
                                                          "panic": 0}
#: month abbreviations as strftime("%b") prints them (dmesg -T) in common locales
_MONTHS: dict[str, int] = {}
for _i, _names in enumerate((
        "jan gen ene janv", "feb fev fév févr", "mar mär mrz mars mrt", "apr abr avr",
        "may mai mag mei", "jun giu juin", "jul lug juil", "aug ago août", "sep set sept",
        "oct out okt ott", "nov", "dec dez dic déc"), start=1):
    for _n in _names.split():
        _MONTHS[_n] = _i
_MON = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
_DOW = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"

_ANSI_RE = re.compile(r"\x1b\[[0-9;?]{0,32}[A-Za-z]")
_QUOTE_RE = re.compile(r"^[ \t]*(?:>[ \t]?)+")
_DECODE_RE = re.compile(r"^(" + "|".join(_FACILITIES) + r") {0,8}:(" + "|".join(_LEVELS)
                        + r") {0,8}: ?")
_RAW_LEVEL_RE = re.compile(r"^<(\d{1,4})>")
_PRINTK_RE = re.compile(r"^\[\s{0,12}(\d{1,10})\.(\d{1,9})(?:\s{0,8}<\s{0,12}[\d.,]{1,24}>)?\] ?")
_PRINTK_TRUNC_RE = re.compile(r"^(\d{1,10})\.(\d{6})\] ")
_PRINTK6_RE = re.compile(r"\[\s{0,12}(\d{1,10})\.(\d{6})\] ?")
_RELTIME_RE = re.compile(r"^\[\s{0,12}\+\s{0,4}\d{1,10}[.,]\d{1,9}\] ?|"
                         r"^\[\w{3,5}\.? ?\d{1,2} \d\d:\d\d\] ?")
_CTIME_RE = re.compile(r"^\[(\w{2,8})\.? {1,2}(\w{2,8})\.? {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) "
                       r"(\d{4})\] ?")
_CALLER_RE = re.compile(r"^\[\s{0,12}([TC]\d{1,10})\] ?")
#: anything that may be a boot stamp (a printk bracket, a /dev/kmsg record): the clock
#: scan splits only such lines
_BOOT_HINT_RE = re.compile(r"\[\s{0,12}\d{1,10}\.\d{1,9}(?:\]|\s{0,8}<)|^\s*\d{1,4},\d{1,20},\d|"
                           r"^\s*\d{1,10}\.\d{6}\] ")
_KMSG_RE = re.compile(r"^(\d{1,4}),(\d{1,20}),(\d{1,16}),([^;]{0,200});")
_KMSG_DICT_RE = re.compile(r"^[A-Z_][A-Z0-9_]{0,63}=")
_KMSG_ESC_RE = re.compile(r"\\x([0-9a-fA-F]{2})")
_SYSLOG_RE = re.compile(r"^(" + _MON + r") {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))? ")
_OPENWRT_RE = re.compile(r"^(?:" + _DOW + r") (" + _MON + r") {1,2}(\d{1,2}) (\d\d):(\d\d):(\d\d) "
                         r"(\d{4}) ")
_FULL_RE = re.compile(r"^(?:" + _DOW + r") (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))? "
                      r"([A-Za-z][A-Za-z0-9+\-/_]{0,40}) ")
_ISO_RE = re.compile(r"^(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:([.,])(\d{1,9}))?"
                     r"(Z|[+-]\d\d:?\d\d)?[ \t]+")
_FAC_KERNEL_RE = re.compile(r"^(?:\S{1,255} )?kern\.([a-z]{1,10})(?: kernel)?: ?")
_HOST_KERNEL_RE = re.compile(r"^\S{1,255} kernel: ?")
_OTHER_IDENT_RE = re.compile(r"^(?:\S{1,255} ){0,2}[^\s:\[\]]{1,128}(?:\[\d{1,10}\])?: ")
_MARKER_YEAR_RE = re.compile(r"\b((?:19|20|21)\d\d)-\d\d-\d\d\b")
_PROMPT_RE = re.compile(
    r"^(?:\[[^\]\n]{1,80}\]|[\w.-]{1,64}@[\w.-]{1,64}(?::[^\s$#%]{0,200})?"
    r"(?: [~/][^\s$#%]{0,200})?)? ?[$#%]\s+\S")
_ELISION_RE = re.compile(r"^(?:\.{3,}|…|\[\.\.\.\]|\[…\]|<snip>|\[snip\]|-+ ?snip ?-+)$",
                         re.IGNORECASE)
_CTRL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

# ---- message content
_DEV_MSG_RE = re.compile(r"^([A-Za-z0-9_.\-]{1,64}) ([0-9a-fA-F]{4,8}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}"
                         r"\.[0-7])(?::pcie\d{1,4})?: ?")
_RES = (r"(\[(io|mem|irq|dma|bus|\?\?\?)\s{1,2}(?:size (0x[0-9a-fA-F]{1,16})|"
        r"(0x[0-9a-fA-F]{1,16}|[0-9a-fA-F]{1,16})(?:-(0x[0-9a-fA-F]{1,16}|[0-9a-fA-F]{1,16}))?)"
        r"([^\]\[]{0,64})\])")
_NEW_RES_RE = re.compile(r"^(BAR \d{1,2}|VF BAR \d{1,2}|ROM|bridge window|CardBus bridge window \d)"
                         r" " + _RES + r": (.{0,200})$")
_OLD_BAR_RE = re.compile(r"^BAR (\d{1,2}): (.{0,300})$")
_OLD_TAIL_RES = re.compile(r"^(no space for|failed to assign|assigned|releasing|can't assign|"
                           r"reassigned|trying firmware assignment) " + _RES + r"(.{0,120})$")
_OLD_RES_FIRST = re.compile(r"^" + _RES + r" (.{0,160})$")
_RELEASED_RE = re.compile(r"^resource (\d{1,2}) " + _RES + r" released$")
_CLAIM_RE = re.compile(r"^can't claim BAR (\d{1,2}) " + _RES + r": (.{0,160})$")
_ENABLE_RE = re.compile(r"^can't enable device: BAR (\d{1,2}) " + _RES + r" not (assigned|claimed)$")
_DISABLING_RE = re.compile(r"^disabling BAR (\d{1,2}): " + _RES + r" \(bad alignment")
_ASSIGN_TRY_RE = re.compile(r"No\. (\d{1,4}) try to assign unassigned res")
_SLOT_RE = re.compile(r"^[Ss]lot\(([^()]{0,64})\):? ?(.{0,200})$")
_SLOT_OLD_RE = re.compile(r"^(.{1,80}?) on Slot\(([^()]{0,64})\)$")
_PROBE_NEW_RE = re.compile(r"probe with driver (.{1,64}?) failed with error (-?\d{1,6})\s*$")
_PROBE_OLD_RE = re.compile(r"^([^\s:]{1,64}): probe of (\S{1,128}) failed with error (-?\d{1,6})\s*$")
_SLUG_RE = re.compile(r"[^a-z0-9]+")

_NEW_REASONS: tuple[tuple[str, Kind, str], ...] = (
    ("can't assign; no space", Kind.RESOURCE_UNASSIGNED, "no space"),
    ("can't assign; bogus alignment", Kind.RESOURCE_UNASSIGNED, "bogus alignment"),
    ("failed to assign", Kind.RESOURCE_UNASSIGNED, "failed to assign"),
    ("assigned", Kind.RESOURCES_ASSIGNED, "assigned"),
    ("reassigned", Kind.RESOURCES_ASSIGNED, "reassigned"),
    ("releasing", Kind.RESOURCE_RELEASED, "releasing"),
    ("failed to expand", Kind.RESOURCE_UNASSIGNED, "failed to expand"),
    ("can't claim", Kind.RESOURCE_UNASSIGNED, "can't claim"),
    ("not assigned; can't enable", Kind.RESOURCE_UNASSIGNED, "not assigned"),
    ("not claimed; can't enable", Kind.RESOURCE_UNASSIGNED, "not claimed"),
    ("failed to add optional", Kind.RESOURCE_UNASSIGNED, "failed to add optional"),
    ("disabling; bad alignment", Kind.RESOURCE_UNASSIGNED, "bad alignment"),
    ("alignment must not be zero", Kind.RESOURCE_UNASSIGNED, "bogus alignment"),
)
#: the common tails, looked up whole before the prefix scan
_NEW_EXACT: dict[str, tuple[Kind, str]] = {pre: (k, r) for pre, k, r in _NEW_REASONS
                                           if pre in ("can't assign; no space", "failed to assign",
                                                      "assigned", "releasing")}
_OLD_VERBS: dict[str, tuple[Kind, str]] = {
    "no space for": (Kind.RESOURCE_UNASSIGNED, "no space"),
    "failed to assign": (Kind.RESOURCE_UNASSIGNED, "failed to assign"),
    "assigned": (Kind.RESOURCES_ASSIGNED, "assigned"),
    "releasing": (Kind.RESOURCE_RELEASED, "releasing"),
    "can't assign": (Kind.RESOURCE_UNASSIGNED, "bogus alignment"),
    "reassigned": (Kind.RESOURCES_ASSIGNED, "reassigned"),
}
#: newer pciehp wordings mapped onto the older event names, so one name means one thing
_SLOT_ALIASES = {
    "button press: will power off in 5 sec": "powering-off-due-to-button-press",
    "button press: will power on in 5 sec": "powering-on-due-to-button-press",
    "button press: canceling request to power off": "button-cancel",
    "button press: canceling request to power on": "button-cancel",
    "action canceled due to button press": "button-cancel",
    "button pressed": "attention-button-pressed",
}


# ===================================================================== line level

class WallTime(NamedTuple):
    """A wall-clock stamp as printed; ``year`` None when the format has none (syslog),
    ``offset_s`` None when the zone is unknown (local time). A tuple: built for every
    syslog line, and a frozen dataclass cost a fifth of such a line's parse time."""

    year: int | None
    month: int
    day: int
    hour: int
    minute: int
    second: int
    frac_ns: int = 0
    offset_s: int | None = None

    @property
    def clock(self) -> str:
        return "local" if self.offset_s is None else "utc"

    def valid(self, year: int | None = None) -> bool:
        y = self.year if self.year is not None else year
        return (y is not None and 1970 <= y <= 2261 and 1 <= self.month <= 12
                and 1 <= self.day <= 31 and self.hour <= 23 and self.minute <= 59
                and self.second <= 60)

    def to_ns(self, year: int | None = None) -> int | None:
        """ns since the epoch (local time taken as UTC), or None if not a real time."""
        y = self.year if self.year is not None else year
        if y is None or not self.valid(y):
            return None
        key = (y, self.month, self.day, self.hour, self.minute, self.second)
        secs = _TIMEGM_LAST.get(key)
        if secs is None:                          # consecutive lines share their second
            _TIMEGM_LAST.clear()
            secs = _TIMEGM_LAST[key] = calendar.timegm(key + (0, 0, 0))
        ns = (secs - (self.offset_s or 0)) * _NS + self.frac_ns
        return ns if 0 <= ns <= _MAX_NS else None

    def iso(self, year: int | None = None) -> str:
        y = self.year if self.year is not None else year
        date = f"{y:04d}-{self.month:02d}-{self.day:02d}" if y is not None \
            else f"--{self.month:02d}-{self.day:02d}"
        s = f"{date}T{self.hour:02d}:{self.minute:02d}:{self.second:02d}"
        if self.frac_ns:
            s += f".{self.frac_ns:09d}".rstrip("0")
        if self.offset_s is not None:
            sign = "-" if self.offset_s < 0 else "+"
            off = abs(self.offset_s)
            s += f"{sign}{off // 3600:02d}:{off % 3600 // 60:02d}"
        return s


_TIMEGM_LAST: dict[tuple[int, ...], int] = {}


#: what a line is, as ``split_line`` sees it
RECORD = "record"          # a kernel message (maybe stamped)
BLANK = "blank"
MARKER = "marker"          # journalctl "-- ... --"
PROMPT = "prompt"          # a shell prompt with its command
FENCE = "fence"            # Markdown code fence
ELISION = "elision"        # "...", "[...]" where a paste was cut
NONKERNEL = "nonkernel"    # a syslog/journal line of another program
GARBLED = "garbled"        # a wall-clock line whose rest is not a syslog line


@dataclass(slots=True)
class LineParts:
    """One line split into stamp(s), syslog level and message text."""

    form: str
    text: str = ""
    boot_ns: int | None = None
    wall: WallTime | None = None
    level: int | None = None
    facility: str | None = None
    indent: int = 0
    caller: str | None = None
    prefix: str | None = None
    kmsg: bool = False
    flags: tuple[str, ...] = ()

    @property
    def stamped(self) -> bool:
        return self.boot_ns is not None or self.wall is not None


def _frac_ns(digits: str | None) -> int:
    return int(digits.ljust(9, "0")[:9]) if digits else 0


def _boot_ns(secs: str, frac: str) -> int | None:
    ns = int(secs) * _NS + (int(frac) * 1000 if len(frac) == 6 else _frac_ns(frac))
    return ns if ns <= _MAX_NS else None


def _offset(zone: str | None) -> int | None:
    """``Z``, ``+0000``, ``+00:00``, ``-05:30`` -> seconds east of UTC."""
    if zone is None:
        return None
    if zone == "Z":
        return 0
    digits = zone[1:].replace(":", "")
    secs = int(digits[:2]) * 3600 + int(digits[2:4]) * 60
    return -secs if zone[0] == "-" else secs


def _set_prio(parts: LineParts, prio: int) -> None:
    parts.level = prio & 7
    fac = prio >> 3
    parts.facility = _FACILITIES[fac] if fac < len(_FACILITIES) else str(fac)


def split_line(line: str) -> LineParts:
    """Split one line of any supported form; never raises, linear in the line length."""
    s = _ANSI_RE.sub("", line) if "\x1b" in line else line
    st = s.lstrip(" \t")
    if st[:1] == ">":
        m = _QUOTE_RE.match(s)
        if m:
            s = s[m.end():]
            st = s.lstrip(" \t")
    indent = len(s) - len(st)
    if not st:
        return LineParts(BLANK, indent=indent)
    parts = LineParts(RECORD, "", None, None, None, None, indent)
    c = st[0]
    if c == "[":                                   # the common case: plain dmesg
        m = _PRINTK_RE.match(st)
        if m:
            frac = m[2]
            ns = int(m[1]) * _NS + (int(frac) * 1000 if len(frac) == 6 else _frac_ns(frac))
            return _after_printk(st[m.end():], parts, ns if ns <= _MAX_NS else None)
    elif c.isalpha() and st.find(":", 3, 16) > 0:
        m = _DECODE_RE.match(st)                   # dmesg -x
        if m:
            parts.facility, parts.level = m[1], _LEVEL_BY_NAME[m[2]]
            st = st[m.end():]
    elif c == "<":                                 # dmesg -r, /proc/kmsg: "<6>"
        m = _RAW_LEVEL_RE.match(st)
        if m:
            _set_prio(parts, int(m[1]))
            st = st[m.end():]
    return _split_body(st, parts)


def _split_body(st: str, parts: LineParts) -> LineParts:
    c = st[:1]
    if c == "[":
        m = _PRINTK_RE.match(st)
        if m:
            return _after_printk(st[m.end():], parts, _boot_ns(m[1], m[2]))
        m = _CTIME_RE.match(st)
        if m:
            return _after_ctime(st[m.end():], parts, m)
        m = _RELTIME_RE.match(st)
        if m:
            parts.flags += ("reltime",)
            parts.text = st[m.end():]
            return parts
    elif c.isdigit():
        m = _KMSG_RE.match(st)
        if m:
            return _kmsg(st[m.end():], parts, m)
        m = _ISO_RE.match(st)
        if m:
            frac = _frac_ns(m[8])
            parts.wall = WallTime(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]),
                                  int(m[6]), frac, _offset(m[9]))
            return _after_wall(st[m.end():], parts, bare_ok=m[7] == ",")
        m = _PRINTK_TRUNC_RE.match(st)              # "[" lost when the paste was copied
        if m:
            parts.flags += ("stamp-cut",)
            return _after_printk(st[m.end():], parts, _boot_ns(m[1], m[2]))
    elif c.isalpha():
        m = _SYSLOG_RE.match(st)
        if m:
            parts.wall = WallTime(None, _MONTHS[m[1].lower()], int(m[2]), int(m[3]),
                                  int(m[4]), int(m[5]), _frac_ns(m[6]))
            return _after_wall(st[m.end():], parts, bare_ok=False)
        m = _OPENWRT_RE.match(st)
        if m:
            parts.wall = WallTime(int(m[6]), _MONTHS[m[1].lower()], int(m[2]), int(m[3]),
                                  int(m[4]), int(m[5]))
            return _after_wall(st[m.end():], parts, bare_ok=False)
        m = _FULL_RE.match(st)
        if m:
            zone = 0 if m[8] in ("UTC", "GMT", "Z") else None
            parts.wall = WallTime(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]),
                                  int(m[6]), _frac_ns(m[7]), zone)
            return _after_wall(st[m.end():], parts, bare_ok=False)
        if st.startswith("kernel: "):
            st = st[8:]
            m = _PRINTK_RE.match(st)
            if m:
                return _after_printk(st[m.end():], parts, _boot_ns(m[1], m[2]))
    elif c == "-" and st.startswith("-- ") and st.rstrip().endswith(" --"):
        parts.form, parts.text = MARKER, st.strip()
        return parts
    elif c == "`" and st.startswith("```") or c == "~" and st.startswith("~~~"):
        parts.form = FENCE
        return parts
    # no stamp of a known form at the start
    m = _PRINTK6_RE.search(st, 0, PREFIX_SEARCH_CHARS)
    if m and m.start() > 0:                         # a collector's prefix before the stamp
        parts.prefix = st[:m.start()].rstrip()[:120]
        return _after_printk(st[m.end():], parts, _boot_ns(m[1], m[2]))
    if c in "[$#%" or "@" in st[:130]:
        if _PROMPT_RE.match(st):
            parts.form = PROMPT
            return parts
    if c in ".…[<-" and _ELISION_RE.match(st.rstrip()):
        parts.form = ELISION
        return parts
    parts.text = st
    return parts


def _after_printk(rest: str, parts: LineParts, boot_ns: int | None) -> LineParts:
    parts.boot_ns = boot_ns
    if boot_ns is None:
        parts.flags += ("bad-time",)
    if rest.startswith("["):
        m = _CALLER_RE.match(rest)
        if m:
            parts.caller = m[1]
            rest = rest[m.end():]
    if rest.find(" kernel:", 0, 264) > 0:          # journalctl -o short-monotonic
        m = _HOST_KERNEL_RE.match(rest)
        if m:
            rest = rest[m.end():]
    parts.text = rest
    return parts


def _after_ctime(rest: str, parts: LineParts, m: re.Match[str]) -> LineParts:
    month = _MONTHS.get(m[2].lower().rstrip("."))
    if month is None:
        parts.flags += ("untimed-locale",)
    else:
        parts.wall = WallTime(int(m[7]), month, int(m[3]), int(m[4]), int(m[5]), int(m[6]))
    parts.text = rest
    return parts


def _kmsg(rest: str, parts: LineParts, m: re.Match[str]) -> LineParts:
    _set_prio(parts, int(m[1]))
    ns = int(m[3]) * 1000
    parts.boot_ns = ns if ns <= _MAX_NS else None
    parts.kmsg = True
    for item in m[4].split(","):
        if item.startswith("caller="):
            parts.caller = item[7:]
    parts.text = _KMSG_ESC_RE.sub(lambda e: chr(int(e[1], 16)), rest) if "\\x" in rest else rest
    return parts


def _after_wall(rest: str, parts: LineParts, *, bare_ok: bool) -> LineParts:
    """What follows a wall-clock stamp: ``host kernel:``, ``kern.info kernel:``,
    ``kern.debug:``, another program's ``host ident[pid]:``, or (dmesg) the message."""
    m = _FAC_KERNEL_RE.match(rest) if rest.find("kern.", 0, 270) >= 0 else None
    if m:
        parts.facility = "kern"
        parts.level = _LEVEL_BY_NAME.get(m[1], parts.level)
        rest = rest[m.end():]
    else:
        m = _HOST_KERNEL_RE.match(rest)
        if m:
            rest = rest[m.end():]
        elif bare_ok:
            pass
        elif _OTHER_IDENT_RE.match(rest):
            parts.form = NONKERNEL
            return parts
        else:
            parts.form = GARBLED
            return parts
    if rest.startswith("["):                        # kern.log: the boot stamp follows
        m = _PRINTK_RE.match(rest)
        if m:
            return _after_printk(rest[m.end():], parts, _boot_ns(m[1], m[2]))
    parts.text = rest
    return parts


# ===================================================================== message level

@dataclass(slots=True)
class MessageInfo:
    """What a kernel message says: its event kind, device and data (without timing)."""

    source: Source
    kind: Kind
    device: DeviceId | None
    data: dict[str, Any]


_DEVICE_CACHE: dict[str, DeviceId] = {}


def _device(bdf: str) -> DeviceId:
    """One shared ``DeviceId`` per BDF (frozen, so sharing is safe; building one per
    message was a tenth of the parse time)."""
    dev = _DEVICE_CACHE.get(bdf)
    if dev is None:
        if len(_DEVICE_CACHE) >= 4096:
            _DEVICE_CACHE.clear()
        dev = _DEVICE_CACHE[bdf] = DeviceId(bdf=bdf)
    return dev


def _bdf(text: str) -> str | None:
    return text.lower() if _BDF_FULL_RE.match(text) else None


def parse_resource(text: str) -> dict[str, Any]:
    """``[mem 0xfe800000-0xfe803fff 64bit pref]`` / ``[io  size 0x1000]`` -> fields."""
    m = re.match(_RES, text)
    if not m:
        return {}
    return _res_fields(m, 0)


def _num(text: str | None, space: str) -> int | None:
    """A ``%pR`` number: ``0x``-prefixed hex, bare hex (bus numbers), decimal (irq, dma)."""
    if text is None:
        return None
    if text.startswith("0x"):
        return int(text, 16)
    return int(text, 10 if space in ("irq", "dma") else 16)


def _res_fields(m: re.Match[str], g: int) -> dict[str, Any]:
    """Fields of the ``_RES`` groups starting at group index ``g + 1``."""
    raw, space, size, start, end, tail = (m[g + 1], m[g + 2], m[g + 3], m[g + 4], m[g + 5],
                                          m[g + 6])
    words = tail.split()
    out: dict[str, Any] = {"space": space, "prefetch": "pref" in words, "mem64": "64bit" in words,
                           "start": None, "end": None, "size": None, "range": raw}
    if size is not None:                              # IORESOURCE_UNSET: only the size
        out["size"] = int(size, 16)
        return out
    s = _num(start, space)
    e = _num(end, space) if end is not None else s
    out["start"], out["end"] = s, e
    if s is not None and e is not None:
        out["size"] = max(0, e - s + 1)
    return out


def _resource_name(name: str) -> dict[str, Any]:
    out: dict[str, Any] = {"resource": name}
    tail = name.rsplit(" ", 1)[-1]
    if tail.isdigit() and name.startswith(("BAR", "VF BAR")):
        out["bar"] = int(tail)
    return out


def _classify_resource(body: str) -> tuple[Kind, dict[str, Any]] | None:
    """A PCI resource message body (after ``pci 0000:01:00.0: ``), or None."""
    c = body[:1]
    if c and c in "BRVCb":
        m = _NEW_RES_RE.match(body)
        if m:
            tail = m[8]
            hit = _NEW_EXACT.get(tail)
            if hit is None:
                hit = next(((k, r) for pre, k, r in _NEW_REASONS if tail.startswith(pre)), None)
                if hit is None:
                    return None
            data = _res_fields(m, 1)
            data.update(_resource_name(m[1]))
            data["reason"] = hit[1]
            if hit[1] == "can't claim":
                data["detail"] = tail[len("can't claim; "):]
            return hit[0], data
        if body.startswith("BAR "):
            m = _OLD_BAR_RE.match(body)
            if not m:
                return None
            name = {"resource": f"BAR {int(m[1])}", "bar": int(m[1])}
            tail = m[2]
            t = _OLD_TAIL_RES.match(tail)
            if t:
                verb = t[1]
                if verb == "trying firmware assignment":
                    return None
                if verb == "can't assign" and "bogus alignment" not in t[8]:
                    return None
                kind, reason = _OLD_VERBS[verb]
                return kind, name | _res_fields(t, 1) | {"reason": reason}
            t = _OLD_RES_FIRST.match(tail)
            if t:
                rest = t[7]
                if rest.startswith("(failed to expand"):
                    return Kind.RESOURCE_UNASSIGNED, name | _res_fields(t, 0) | \
                        {"reason": "failed to expand"}
                if rest.startswith("has bogus alignment"):
                    return Kind.RESOURCE_UNASSIGNED, name | _res_fields(t, 0) | \
                        {"reason": "bogus alignment"}
            return None
    elif c == "r" and body.startswith("resource "):
        m = _RELEASED_RE.match(body)
        if m:
            return Kind.RESOURCE_RELEASED, {"resource": f"BAR {int(m[1])}", "bar": int(m[1])} \
                | _res_fields(m, 1) | {"reason": "released"}
    elif c == "c" and body.startswith("can't "):
        m = _CLAIM_RE.match(body)
        if m:
            return Kind.RESOURCE_UNASSIGNED, {"resource": f"BAR {int(m[1])}", "bar": int(m[1])} \
                | _res_fields(m, 1) | {"reason": "can't claim", "detail": m[8]}
        m = _ENABLE_RE.match(body)
        if m:
            return Kind.RESOURCE_UNASSIGNED, {"resource": f"BAR {int(m[1])}", "bar": int(m[1])} \
                | _res_fields(m, 1) | {"reason": f"not {m[8]}"}
    elif c == "d" and body.startswith("disabling BAR "):
        m = _DISABLING_RE.match(body)
        if m:
            return Kind.RESOURCE_UNASSIGNED, {"resource": f"BAR {int(m[1])}", "bar": int(m[1])} \
                | _res_fields(m, 1) | {"reason": "bad alignment"}
    return None


def slot_event_name(text: str) -> str:
    """``Card not present`` -> ``card-not-present``; newer wordings -> the older name."""
    t = text.strip().lower()
    if t.endswith(" event"):
        t = t[:-6]
    t = _SLOT_ALIASES.get(t, t)
    return _SLUG_RE.sub("-", t).strip("-")[:48] or "unknown"


def _classify_slot(body: str) -> dict[str, Any] | None:
    b = body[8:] if body.startswith("pciehp: ") else body
    c = b[:1]
    if c in "Ss" and b[1:5] == "lot(":
        m = _SLOT_RE.match(b)
        if m:
            return {"slot": m[1], "event": slot_event_name(m[2])}
    elif " on Slot(" in b:
        m = _SLOT_OLD_RE.match(b)
        if m:
            return {"slot": m[2], "event": slot_event_name(m[1])}
    return None


def _uevent(msg: str) -> MessageInfo:
    """``rebalab-uevent ACTION=bind DEVPATH=/devices/.../0000:01:00.0 SUBSYSTEM=pci ...``."""
    kv = dict(_KV_RE.findall(msg[len(UEVENT_PREFIX):]))
    path = kv.get("DEVPATH", "")
    bdf = next(iter(_BDF_RE.findall(path.rsplit("/", 1)[-1])), None) \
        if kv.get("SUBSYSTEM") == "pci" else None
    return MessageInfo(Source.GUEST_UEVENT, Kind.UEVENT, DeviceId(bdf=bdf) if bdf else None,
                       {"action": kv.get("ACTION"), **kv})


def classify_message(msg: str) -> MessageInfo | None:
    """A kernel message's event kind, device and data; None for clock-sync lines.

    ``data["text"]`` is the message as printed (first line); timing, ``at`` and flags are
    the caller's.
    """
    if msg.startswith(UEVENT_PREFIX):
        return _uevent(msg)
    if "rebalab-sync " in msg and SYNC_RE.search(msg):
        return None                                   # clock evidence, not a guest event
    data: dict[str, Any] = {"text": msg}
    kind = _KERNEL_LOG
    bdf: str | None = None
    m = _DEV_MSG_RE.match(msg)
    if OOPS_RE.search(msg):
        kind = _KERNEL_OOPS
    elif m:
        body = msg[m.end():]
        res = _classify_resource(body) if body[:1] in _RES_FIRST_CHARS else None
        if res is not None:
            kind, fields = res
            data.update(fields)
        elif "lot(" in body:
            slot = _classify_slot(body)
            if slot is not None:
                kind = _SLOT_EVENT
                data.update(slot)
    if m:
        bdf = m[2].lower()
        if m[1] not in NON_DRIVERS:
            data["driver"] = m[1]
    if kind is _KERNEL_LOG and ("probe" in msg or "unassigned res" in msg):
        probed = _probe_and_misc(msg, data)
        bdf = bdf or probed
    if bdf is None and "." in msg and ":" in msg:
        f = _BDF_RE.search(msg)
        bdf = f[1] if f else None
    return MessageInfo(_GUEST_KERNEL, kind, _device(bdf) if bdf else None, data)


_KERNEL_LOG, _KERNEL_OOPS, _SLOT_EVENT = Kind.KERNEL_LOG, Kind.KERNEL_OOPS, Kind.SLOT_EVENT
_GUEST_KERNEL = Source.GUEST_KERNEL
#: first characters of the resource messages ``_classify_resource`` knows
_RES_FIRST_CHARS = frozenset("BRVCbrcd")


def _probe_and_misc(msg: str, data: dict[str, Any]) -> str | None:
    """Probe failures (driver, errno) and assignment retries; returns the probed BDF."""
    if "probe" in msg:
        i = msg.find("probe with driver ")
        if i >= 0:
            m = _PROBE_NEW_RE.match(msg, i)
            if m:
                data["driver"], data["probe_error"] = m[1], int(m[2])
                return None
        if "probe of " in msg:
            m = _PROBE_OLD_RE.match(msg)
            if m:
                data["driver"], data["probe_error"] = m[1], int(m[3])
                return _bdf(m[2])
    elif "try to assign unassigned res" in msg:
        m = _ASSIGN_TRY_RE.search(msg)
        if m:
            data["assign_try"] = int(m[1])
    return None


# ===================================================================== file parser

@dataclass(slots=True)
class _Pending:
    """A record waiting for its continuation lines."""

    lineno: int
    info: MessageInfo
    t_ns: int
    indent: int
    kmsg: bool
    extra: list[str] | None = None
    dropped: int = 0
    kv: dict[str, str] | None = None


@dataclass
class _State:
    clock: str
    display: str
    year: int | None = None          # from a journal header
    rollovers: int = 0               # December -> January seen since the header
    year_month: int = 0
    last_t: int = 0
    boot: int = 0
    boot_records: int = 0
    last_boot_ns: int | None = None
    pending: _Pending | None = None
    warned_year: bool = False
    warned_mixed: bool = False


class KernelLogParser:
    """``kernel-log``: dmesg, journalctl -k, syslog kern.log, /dev/kmsg, plain messages."""

    name = "kernel-log"
    description = ("Linux kernel log: dmesg (plain, -T, -r, -x, iso), /dev/kmsg, journalctl -k "
                   "(short, -precise, -full, -iso, -monotonic), syslog kern.log, OpenWrt "
                   "logread, pasted messages without stamps")

    def sniff(self, inp: LogInput) -> int:
        if inp.is_binary():
            return 0
        lines = inp.head.splitlines()
        if len(inp.head_bytes) < inp.size and len(lines) > 1:
            lines = lines[:-1]                       # the head may end mid-line
        n = stamped = device = 0
        for line in lines[:500]:
            p = split_line(line)
            if p.form == BLANK:
                continue
            n += 1
            if p.form == RECORD:
                if p.stamped or p.kmsg:
                    stamped += 1
                elif _DEV_MSG_RE.match(p.text):
                    device += 1
        if n == 0:
            return 0
        if stamped:
            return min(95, 50 + 45 * stamped // n)
        if device:
            return min(40, 20 + 20 * device // n)
        return 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        if inp.is_binary():
            raise LogFormatError(f"{inp.display}: binary data, not a kernel log")
        tally.clock = _decide_clock(inp)
        st = _State(tally.clock, inp.display)
        for lineno, line in inp.lines(tally):
            ev = _line(st, lineno, line, tally)
            if ev is not None:
                yield ev
        if st.pending is not None:
            yield _flush(st, tally)


def _line(st: _State, lineno: int, line: str, tally: Tally) -> Event | None:
    """Account for one line; returns the previous record's event when this line ends it."""
    p = split_line(line)
    if p.form != RECORD:
        if p.form == MARKER:
            _marker(st, p.text)
        if p.form == GARBLED:
            tally.unknown(lineno, line)
        else:
            tally.skip()
        return None
    pend = st.pending
    plain = p.boot_ns is None and p.wall is None and not p.flags and not p.kmsg \
        and p.prefix is None
    if plain:
        if pend is not None:
            if pend.kmsg and p.indent >= 1 and _KMSG_DICT_RE.match(p.text):
                k, _, v = p.text.partition("=")
                if pend.kv is None:
                    pend.kv = {}
                if len(pend.kv) < 32:
                    pend.kv[k] = v[:256]
                tally.used_line()
                return None
            if p.indent > pend.indent and not _DEV_MSG_RE.match(p.text):
                _continue(pend, p.text)
                tally.used_line()
                return None
        if _CTRL_RE.search(p.text):
            tally.unknown(lineno, line)
            return None
        if not any(ch.isalnum() for ch in p.text[:200]):
            tally.skip()                              # a separator line
            return None
    ev = _flush(st, tally) if pend is not None else None
    info = classify_message(p.text)
    if info is None:
        tally.skip()
        return ev
    tally.used_line()
    st.pending = _start(st, lineno, p, info, tally)
    return ev


def _decide_clock(inp: LogInput) -> str:
    """First pass: "boot" as soon as one boot stamp is seen, else the first wall clock.

    Only lines a cheap search finds a stamp-like bracket or a kmsg record in are split,
    so a file without boot stamps (journalctl) is read at close to I/O speed here.
    """
    wall: str | None = None
    for _, line in inp.lines():
        if wall is not None and not _BOOT_HINT_RE.search(line, 0, PREFIX_SEARCH_CHARS + 40):
            continue
        p = split_line(line)
        if p.form != RECORD:
            continue
        if p.boot_ns is not None:
            return "boot"
        if wall is None and p.wall is not None:
            wall = p.wall.clock
    return wall or "none"


def _marker(st: _State, text: str) -> None:
    """``-- Logs begin at Mon 2019-12-02 ... --`` sets the year; ``-- Boot ... --`` a boot."""
    m = _MARKER_YEAR_RE.search(text)
    if m:
        st.year, st.rollovers, st.year_month = int(m[1]), 0, 0
    if text.startswith(("-- Boot", "-- Reboot")) and st.boot_records:
        st.boot += 1
        st.boot_records = 0
        st.last_boot_ns = None


def _continue(pend: _Pending, text: str) -> None:
    if pend.extra is None:
        pend.extra = []
    if len(pend.extra) < MAX_CONTINUATION_LINES:
        pend.extra.append(text[:4096])
    else:
        pend.dropped += 1
    if pend.info.kind == Kind.KERNEL_LOG and OOPS_RE.search(text):
        pend.info.kind = Kind.KERNEL_OOPS


def _line_meta(data: dict[str, Any], p: LineParts, display: str, lineno: int) -> None:
    """What the line's prefix said besides the time: level, facility, caller, prefix;
    and where the evidence is."""
    if p.level is not None:
        data["level"] = p.level
        if p.facility is not None:
            data["facility"] = p.facility
    if p.caller is not None:
        data["caller"] = p.caller
    if p.prefix is not None:
        data["prefix"] = p.prefix
    data["at"] = f"{display}:{lineno}"


def _start(st: _State, lineno: int, p: LineParts, info: MessageInfo, tally: Tally) -> _Pending:
    """Time a new record (in the file's clock) and put its stamps' extras in its data."""
    data = info.data
    wall = p.wall
    t0 = p.boot_ns
    if wall is None and t0 is not None and not p.flags and st.clock == "boot":
        # the common case (dmesg): one boot stamp, nothing else to reconcile
        last = st.last_boot_ns
        if last is not None and t0 + _NS < last:
            st.boot += 1                              # the boot clock restarted
        st.last_boot_ns = st.last_t = t0
        st.boot_records += 1
        data["boot"] = st.boot
        _line_meta(data, p, st.display, lineno)
        return _Pending(lineno, info, t0, p.indent, p.kmsg)
    flags: list[str] = list(p.flags) if p.flags else []
    year: int | None = None
    if wall is not None and wall.year is None:
        year = _infer_year(st, wall, lineno, tally, flags)
    t: int | None = None
    if st.clock == "boot":
        t = p.boot_ns
        if t is not None:
            last = st.last_boot_ns
            if last is not None and t + _NS < last:
                st.boot += 1                          # the boot clock restarted
            st.last_boot_ns = t
        st.boot_records += 1
        data["boot"] = st.boot
        if wall is not None:
            data["wall"] = _iso(wall, year)
    elif wall is not None:
        if wall.clock == st.clock:
            t = wall.to_ns(year)
            if t is None:
                flags.append("bad-time")
        if t is None:
            data["wall"] = _iso(wall, year)
    if t is None:
        t = st.last_t
        flags.append("untimed")
        if wall is not None and p.boot_ns is None and st.clock not in ("none", wall.clock) \
                and not st.warned_mixed:
            st.warned_mixed = True
            tally.problem(f"line {lineno}: a time stamp in another clock than the file's "
                          f"({st.clock}); such lines are ordered as untimed")
    else:
        st.last_t = t
    _line_meta(data, p, st.display, lineno)
    if flags:
        data["flags"] = sorted(set(flags))
    return _Pending(lineno, info, t, p.indent, p.kmsg)


def _infer_year(st: _State, wall: WallTime, lineno: int, tally: Tally,
                flags: list[str]) -> int | None:
    """A year for a syslog/journal stamp: the header's, plus one per December->January;
    without a header 1970 (flagged ``no-year``) when the wall time orders the file."""
    if st.year_month and wall.month < st.year_month:
        st.rollovers += 1
    st.year_month = wall.month
    if st.year is not None:
        return st.year + st.rollovers
    if st.clock == "boot":
        return None                                   # only kept as data: no year invented
    flags.append("no-year")
    if not st.warned_year:
        st.warned_year = True
        tally.problem(f"line {lineno}: time stamps without a year and no "
                      "'-- Logs begin at' header; dates are placed in 1970")
    return 1970 + st.rollovers


_ISO_LAST: dict[tuple[WallTime, int | None], str] = {}


def _iso(wall: WallTime, year: int | None) -> str:
    key = (wall, year)
    text = _ISO_LAST.get(key)
    if text is None:                                  # consecutive lines share their second
        _ISO_LAST.clear()
        text = _ISO_LAST[key] = wall.iso(year)
    return text


def _flush(st: _State, tally: Tally) -> Event:
    pend = st.pending
    assert pend is not None
    st.pending = None
    info = pend.info
    data = info.data
    if pend.extra:
        first = str(data.get("text", ""))
        data["lines"] = [first, *pend.extra]
        data["text"] = "\n".join(data["lines"])
    if pend.dropped:
        data["lines_dropped"] = pend.dropped
        data["flags"] = sorted(set(data.get("flags", [])) | {"truncated"})
    if pend.kv:
        data["kmsg"] = dict(pend.kv)
    tally.events += 1
    return Event(pend.t_ns, info.source, info.kind, info.device, data=data, t_guest_ns=pend.t_ns)


PARSERS = (KernelLogParser(),)
