"""``pnputil /enum-devices`` output: one device state per block, as Events.

The format (PnPUtil, Windows 10 1903 and later; Microsoft Learn, "PnPUtil Command
Syntax", learn.microsoft.com/windows-hardware/drivers/devtest/pnputil-command-syntax,
and the example output in "How to test a driver package (manual deployment)",
learn.microsoft.com/windows-hardware/drivers/develop/test-a-driver-package-manual-deployment)::

    Microsoft PnP Utility                                  <- banner

    Instance ID:                USB\\VID_0547&PID_1002\\5&353525f&0&3
    Device Description:         WDF Sample Driver ...
    Status:                     Problem
    Problem Code:               52 (0x34) [CM_PROB_UNSIGNED_DRIVER]
    Problem Status:             0xC0000428
    Driver Name:                oem40.inf
    Hardware IDs:               USB\\VID_0547&PID_1002&REV_0000
                                USB\\VID_0547&PID_1002     <- aligned continuation

One block per device, each opened by its ``Instance ID:`` line; ``Label: value`` lines
with the value at a fixed column; list fields (``/ids``, ``/deviceids``, ``/relations``:
Hardware IDs, Compatible IDs, Children, Extension Driver Names) continue on lines
aligned under the first value; ``/drivers``, ``/interfaces``, ``/properties`` and
``/resources`` open a section (``Matching Drivers:``) whose records are indented
``Label: value`` lines separated by blank lines. Fields the tool could not read print
``Unknown``. Newer builds add the ``CM_PROB_*`` name to the problem code
(``28 (0x1C) [CM_PROB_FAILED_INSTALL]``); older ones print the number only.

Why every block becomes an event: a snapshot of device states is evidence for the
rules (a problem code left after a rebalance is the failure itself), and the order of
the blocks is kept by the timeline's stable sort. pnputil prints no time at all, so
every event is untimed (``t_host_ns = 0``, clock ``none``).

Labels are English in the samples we have; PnPUtil ships localised (``PnPUtil.exe.mui``)
so a label we do not know is kept as data under its own name, never counted as not
understood. A block in a language we cannot read is still found: its first line's value
has the shape of a device instance id (``<enumerator>\\<device id>\\<instance>``,
learn.microsoft.com/windows-hardware/drivers/install/device-instance-ids), and a problem
code is recognised by its value's shape (``28 (0x1C)``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lab.events import DeviceId, Event, Kind, Source
from lab.logs.base import LogFormatError, LogInput, Tally

#: the banner every PnPUtil command prints first
BANNER = "microsoft pnp utility"
#: the label that opens a device block (English)
INSTANCE_LABEL = "instance id"
#: labels never read as a block start even when the value looks like an instance id
#: (``/enum-interfaces`` prints ``Device Instance ID:``; ``/relations`` prints these)
_NOT_START = frozenset({"device instance id", "parent", "children", "instance id"})
#: a label longer than this is prose, not a field
MAX_LABEL = 64
#: values kept per block; the rest are counted as used and dropped (bounded memory)
MAX_VALUES = 4096

# Status values (English); learn.microsoft.com/windows-hardware/drivers/devtest/pnputil-examples:
# "An enabled device appears with status Started; a disabled device appears as Disabled".
_STATUS_KIND = {"started": Kind.BOUND, "disconnected": Kind.UNBOUND}

_CM_PROB_NAME = re.compile(r"CM_PROB_[A-Z0-9_]{1,64}")
# "28 (0x1C) ..." / "28" / "0x1C": the number is first
_CODE_HEAD = re.compile(r"(0[xX][0-9A-Fa-f]{1,8}|[0-9]{1,10})(?:\s+\((0[xX][0-9A-Fa-f]{1,8})\))?")
_CODE_SHAPE = re.compile(r"[0-9]{1,10} \(0[xX][0-9A-Fa-f]{1,8}\)")
# <enumerator>\<device id>\<instance id>, no whitespace (device-instance-ids, above)
_INSTANCE_SHAPE = re.compile(r"[A-Za-z0-9_.&{}#-]{1,64}\\\S{1,400}\\\S")
_LABEL_BAD = frozenset('\\"<>|=*?;`$%')

@dataclass(slots=True)
class _Line:
    """One input line, quoting and indentation measured."""

    lineno: int
    text: str            # without quote prefix and trailing blanks
    indent: int
    label: str | None = None
    value: str = ""
    value_col: int = 0


@dataclass
class _Section:
    """A field whose content is indented ``Label: value`` records (``Matching Drivers``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    sub: str | None = None           # the sub-field being filled
    sub_col: int = 0
    gap: bool = False                # a blank line since the last sub-field


@dataclass
class _Block:
    """One device's lines, gathered until the next block or the end."""

    first: int
    base: int                        # indentation of the Instance ID line
    by_position: bool                # opened by value shape, not by the English label
    fields: dict[str, Any] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    used: int = 0
    values: int = 0
    capped: bool = False
    top: str | None = None           # the top-level field being filled
    top_col: int = 0
    section: _Section | None = None
    gap: bool = False
    command: str | None = None
    repeats: dict[str, int] = field(default_factory=dict)

    def add_top(self, ln: _Line) -> None:
        """A top-level ``Label: value`` line; a repeated label is kept as ``Label#2``."""
        assert ln.label is not None
        label = ln.label
        if self.values >= MAX_VALUES:
            self.capped = True            # drop it; later lines of it are dropped too
            self.top, self.section = None, None
            return
        if label in self.fields:
            n = self.repeats[ln.label] = self.repeats.get(ln.label, 1) + 1
            label = f"{ln.label}#{n}"
        self.fields[label] = ln.value
        self.order.append(label)
        self.values += 1
        self.top, self.top_col, self.section = label, ln.value_col, None

    def _append(self, target: list[Any], item: Any) -> None:
        if self.values >= MAX_VALUES:
            self.capped = True
            return
        self.values += 1
        target.append(item)

    def continue_top(self, text: str) -> None:
        """An aligned continuation of the current top-level field."""
        if self.top is None or self.top not in self.fields:
            return
        cur = self.fields[self.top]
        if isinstance(cur, str):
            cur = [cur] if cur else []
            self.fields[self.top] = cur
        if cur and isinstance(cur[-1], dict):     # a section: continue its last sub-field
            sec = self.section
            if sec is not None and sec.sub is not None:
                self._continue_sub(sec, text)
                return
        self._append(cur, text)

    def sub_field(self, ln: _Line) -> None:
        """An indented ``Label: value`` line: a record field of the current section."""
        assert ln.label is not None and self.top is not None
        cur = self.fields[self.top]
        sec = self.section
        if sec is None:
            if cur != "":                 # a field with a value: this is more of it
                self.continue_top(ln.text)
                return
            sec = self.section = _Section()
            self.fields[self.top] = sec.records
        if self.values >= MAX_VALUES:
            self.capped = True
            return
        if not sec.records or sec.gap or ln.label in sec.records[-1]:
            sec.records.append({})
        rec = sec.records[-1]
        rec[ln.label] = ln.value
        self.values += 1
        sec.sub, sec.sub_col, sec.gap = ln.label, ln.value_col, False

    def _continue_sub(self, sec: _Section, text: str) -> None:
        assert sec.sub is not None
        rec = sec.records[-1]
        cur = rec[sec.sub]
        if isinstance(cur, str):
            cur = [cur] if cur else []
            rec[sec.sub] = cur
        self._append(cur, text)


def _quote_strip(raw: str) -> str:
    """Drop e-mail/Markdown quoting (``> ``, ``> > ``); ``>pnputil`` (a prompt) stays."""
    i = 0
    while raw.startswith("> ", i):
        i += 2
    s = raw[i:]
    return "" if s == ">" else s


def _split_label(s: str) -> tuple[str, str, int] | None:
    """``Label:   value`` -> (label, value, value offset in ``s``); None if not a field.

    The label is short, starts with a letter and holds no path or shell characters, and
    the colon ends the line or is followed by blanks (so ``C:\\Users`` is no field).
    """
    i = s.find(":", 0, MAX_LABEL + 1)
    if i <= 0:
        return None
    rest = s[i + 1:]
    if rest and rest[0] not in " \t":
        return None
    label = s[:i].rstrip()
    if not label or not label[0].isalpha() or ". " in label:
        return None
    if not _LABEL_BAD.isdisjoint(label):
        return None
    stripped = rest.lstrip(" \t")
    return label, stripped.rstrip(), i + 1 + (len(rest) - len(stripped))


def _measure(lineno: int, raw: str) -> _Line:
    text = (_quote_strip(raw) if raw.startswith(">") else raw).rstrip()
    body = text.lstrip(" \t")
    indent = len(text) - len(body)
    ln = _Line(lineno, body, indent)
    split = _split_label(body)
    if split is not None:
        ln.label, ln.value, off = split
        ln.value_col = indent + off
    return ln


def _is_instance_shape(value: str) -> bool:
    return _INSTANCE_SHAPE.match(value) is not None


def _command_of(text: str) -> str | None:
    """``C:\\>pnputil /enum-devices ...`` -> the command from ``pnputil`` on (else None).

    Only a command line: ``pnputil`` first, or after a prompt (``>``, ``$``, ``#``, or
    PowerShell's ``&``), so prose that mentions pnputil is not taken for one.
    """
    low = text.lower()
    i = low.find("pnputil")
    if i < 0:
        return None
    before = text[:i].rstrip()
    if before and before[-1] not in ">$#&":
        return None
    after = low[i + 7:i + 12]
    if after and not (after[0] in " \t" or after.startswith(".exe")):
        return None
    return text[i:]


def _no_devices(text: str) -> bool:
    """PnPUtil's "nothing matched" messages ("No devices were found ...")."""
    low = text.lower()
    if low.startswith("info:"):
        low = low[5:].lstrip()
    return low.startswith("no ") and "device" in low


@dataclass(frozen=True)
class ProblemCode:
    code: int
    name: str | None
    consistent: bool


def parse_problem_code(value: str) -> ProblemCode | None:
    """``28 (0x1C) [CM_PROB_FAILED_INSTALL]``, ``28``, ``10 (CM_PROB_FAILED_START)``.

    The decimal number comes first, the same number in hex in parentheses, the
    ``CM_PROB_*`` name in brackets on newer builds (Microsoft Learn sample above).
    """
    m = _CODE_HEAD.match(value.strip())
    if m is None:
        return None
    head = m.group(1)
    try:
        code = int(head, 16) if head[:2].lower() == "0x" else int(head, 10)
        consistent = m.group(2) is None or int(m.group(2), 16) == code
    except ValueError:
        return None
    name = _CM_PROB_NAME.search(value)
    return ProblemCode(code, name.group(0) if name else None, consistent)


def normalise_ntstatus(value: str) -> str:
    """``0xc0000428`` -> ``0xC0000428`` (the form ``pnp_state`` writes); else unchanged."""
    s = value.strip()
    try:
        n = int(s, 16) if s[:2].lower() == "0x" else None
    except ValueError:
        n = None
    if n is None or n > 0xFFFFFFFF:
        return s
    return f"0x{n:08X}"


def _table_name(code: int) -> str | None:
    """The ``CM_PROB_*`` name from the lab's one table (``pnp_state.CM_PROB``, cfg.h).

    Imported when first needed: ``lab.guest.windows.trace`` loads the live tracers, which
    may load this module.
    """
    mod = importlib.import_module("lab.guest.windows.trace.pnp_state")
    name = mod.problem_name(code)
    return name if isinstance(name, str) else None


def _field(low: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` (lower case) in ``low`` (fields by lower-cased label)."""
    for n in names:
        if n in low:
            return low[n]
    return None


def _scalar(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v and isinstance(v[0], str):
        return v[0]
    return None


def block_event(block: _Block, display: str, tally: Tally) -> Event:
    """A finished block as one Event (see the module docstring for the mapping)."""
    fields = block.fields
    low = {k.lower(): v for k, v in fields.items()}
    first_label = block.order[0] if block.order else ""
    instance = _scalar(fields.get(first_label)) or ""
    flags = ["untimed"]
    data: dict[str, Any] = {"at": f"{display}:{block.first}", "fields": fields}
    if block.command:
        data["command"] = block.command
    if block.by_position:
        flags.append("instance-id-by-position")
    status = _scalar(_field(low, "status"))
    data["status"] = status
    for key, names in (("description", ("device description",)), ("class", ("class name",)),
                       ("driver", ("driver name",))):
        v = _scalar(_field(low, *names))
        if v and v.lower() != "unknown":
            data[key] = v
    raw_code = _scalar(_field(low, "problem code"))
    if raw_code is None:                       # a label we do not know, a value we do
        for label in block.order[1:]:
            v = _scalar(fields.get(label))
            if v is not None and _CODE_SHAPE.match(v):
                raw_code = v
                flags.append("problem-code-by-shape")
                break
    pc = parse_problem_code(raw_code) if raw_code else None
    if raw_code and pc is None:
        tally.problem(f"line {block.first}: device block has a problem code that is not a number")
        flags.append("problem-code-unreadable")
    kind: Kind
    if pc is not None and pc.code:
        kind = Kind.PROBLEM
        name = pc.name
        if name is None:
            name = _table_name(pc.code)
            flags.append("problem-name-from-table")
        if not pc.consistent:
            tally.problem(f"line {block.first}: problem code and its hex form disagree")
            flags.append("problem-code-inconsistent")
        ps = _scalar(_field(low, "problem status"))
        data.update(code=pc.code, problem_code=pc.code, problem=name,
                    problem_status=normalise_ntstatus(ps) if ps else None)
    else:
        kind = _STATUS_KIND.get((status or "").strip().lower(), Kind.DEVICE_STATE)
        if (status or "").strip().lower() == "problem":
            flags.append("status-problem-without-code")
    if status is None and not block.by_position:
        tally.problem(f"line {block.first}: device block has no Status line (output cut off?)")
        flags.append("incomplete")
    if block.capped:
        tally.problem(f"line {block.first}: device block has more than {MAX_VALUES} values; "
                      "the rest were dropped")
        flags.append("values-capped")
    data["flags"] = sorted(set(flags))
    return Event(t_host_ns=0, source=Source.GUEST_PNP, kind=kind,
                 device=DeviceId(instance=instance or None), data=data, t_guest_ns=0)


class PnputilParser:
    """``pnputil /enum-devices`` (any options), as redirected or pasted."""

    name = "pnputil"
    description = "pnputil /enum-devices output (device status, problem codes, IDs, relations)"

    def sniff(self, inp: LogInput) -> int:
        """The banner, or ``Instance ID:`` lines near the start (a paste may lack the banner)."""
        try:
            head = inp.head
        except LogFormatError:          # unreadable: not ours to judge
            return 0
        banner = instances = others = 0
        for n, raw in enumerate(head.splitlines()[:200]):
            ln = _measure(n + 1, raw)
            if not ln.text:
                continue
            if ln.text.lower() == BANNER:
                banner += 1
            elif ln.label is not None and ln.label.lower() == INSTANCE_LABEL and ln.value:
                instances += 1
            elif ln.label is None:
                others += 1
        if instances and banner:
            return 90
        if instances:
            return 75 if instances > others else 50
        return 30 if banner else 0

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]:
        tally.format = self.name
        tally.clock = "none"
        p = _Parse(inp.display, tally)
        for lineno, raw in inp.lines(tally):
            ev = p.feed(lineno, raw)
            if ev is not None:
                yield ev
        last = p.flush()
        if last is not None:
            yield last


class _Parse:
    """The line-by-line state machine (one per file)."""

    def __init__(self, display: str, tally: Tally) -> None:
        self.display = display
        self.tally = tally
        self.block: _Block | None = None
        self.orphan: int | None = None        # first line of fields with no Instance ID
        self.orphan_col = 0
        self.after_gap = True                 # start of input or a blank/banner line before
        self.command: str | None = None

    # ---- block boundaries -----------------------------------------------------
    def flush(self) -> Event | None:
        b, self.block = self.block, None
        if b is None:
            return None
        self.tally.used_line(b.used)
        self.tally.events += 1
        return block_event(b, self.display, self.tally)

    def _starts_block(self, ln: _Line) -> bool:
        if ln.label is None or not ln.value:
            return False
        low = ln.label.lower()
        b = self.block
        if b is not None and ln.indent > b.base:
            return False
        if low == INSTANCE_LABEL:
            return True
        # a block in a language we cannot read: first field after a gap, instance-id shaped
        return (low not in _NOT_START and self.after_gap and (b is None or b.gap)
                and _is_instance_shape(ln.value))

    def _open(self, ln: _Line) -> None:
        assert ln.label is not None
        b = _Block(first=ln.lineno, base=ln.indent,
                   by_position=ln.label.lower() != INSTANCE_LABEL, command=self.command)
        b.add_top(ln)
        b.used = 1
        self.block = b
        self.orphan = None

    # ---- lines -------------------------------------------------------------------
    def feed(self, lineno: int, raw: str) -> Event | None:
        """One line; the event of the block it ends, if it ends one (at most one)."""
        ln = _measure(lineno, raw)
        tally = self.tally
        if not ln.text:
            tally.skip()
            if self.block is not None:
                self.block.gap = True
                if self.block.section is not None:
                    self.block.section.gap = True
            self.after_gap = True
            return None
        if self._starts_block(ln):
            ev = self.flush()
            self._open(ln)
            self.after_gap = False
            return ev
        b = self.block
        if b is not None and self._in_block(b, ln):
            b.used += 1
            b.gap = False
            self.after_gap = False
            return None
        # outside any block (or a line that ends the current one)
        ev = self.flush()
        self._outside(ln)
        return ev

    def _in_block(self, b: _Block, ln: _Line) -> bool:
        """Take ``ln`` into block ``b`` if it belongs there; False ends the block.

        A device's fields follow each other without blank lines (blank lines separate
        devices, and the records of a section such as ``Matching Drivers``), so an
        unindented field after a blank line that opens no block is someone else's.
        """
        if ln.indent <= b.base:
            if ln.label is None or b.gap:
                return False               # prose, a prompt, a banner: the block is over
            b.add_top(ln)
            return True
        if b.top is None or b.top not in b.fields:
            return True                    # more of a field dropped by the value cap
        sec = b.section
        if sec is not None and sec.sub is not None and ln.indent >= sec.sub_col \
                and sec.sub_col > 0 and not sec.gap:
            b.continue_top(ln.text)        # aligned under a record's value
            return True
        top_val = b.fields.get(b.top)
        top_empty = top_val == "" or (isinstance(top_val, list) and top_val
                                      and isinstance(top_val[0], dict))
        if ln.label is not None and (top_empty or ln.indent < b.top_col):
            b.sub_field(ln)
            return True
        b.continue_top(ln.text)
        return True

    def _outside(self, ln: _Line) -> None:
        tally = self.tally
        low = ln.text.lower()
        if low == BANNER:
            tally.skip()
            self.after_gap = True
            self.orphan = None
            return
        if ln.label is None or not ln.value:     # "... pnputil says:" is prose
            cmd = _command_of(ln.text)
            if cmd is not None:
                self.command = cmd
                tally.skip()
                self.after_gap = True
                self.orphan = None
                return
            if _no_devices(ln.text):
                tally.skip()
                self.after_gap = True
                self.orphan = None
                return
            if self.orphan is not None and ln.indent >= self.orphan_col > 0:
                tally.skip()                # continuation of fields we cannot attribute
                return
            tally.unknown(ln.lineno, ln.text)
            self.after_gap = False
            self.orphan = None
            return
        # a field with no device: an excerpt that starts mid-block, or another command
        if self.orphan is None:
            self.orphan = ln.lineno
            tally.problem(f"line {ln.lineno}: fields outside any device block (an excerpt "
                          "that starts mid-device, or another command's output); "
                          "not attributed")
        self.orphan_col = ln.value_col
        tally.skip()
        self.after_gap = False


PARSER = PnputilParser()
PARSERS = (PARSER,)

__all__ = ["PARSER", "PARSERS", "PnputilParser", "ProblemCode", "block_event",
           "normalise_ntstatus", "parse_problem_code"]
