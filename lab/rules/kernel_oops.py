"""Kernel crash reports in the guest log, and guest panics QEMU reports.

A WARN, BUG or oops during a hot-plug or rebalance is the driver's (or the kernel's)
bug whatever the rest of the run looked like, so every report found in guest
KERNEL_LOG/KERNEL_OOPS events becomes a violation carrying its first lines (header,
RIP, call trace head) so the report is readable without opening the log. Lines that
belong to one report (``BUG: kernel NULL pointer dereference`` followed by ``Oops:``
and the trace, up to ``---[ end trace``) make one violation.

Device attribution: a module under test named in brackets in the call trace or RIP
line (``azx_probe+0x12/0x40 [snd_hda_intel]``) or the device's BDF in the report
attributes it to that device; ``Modules linked in:`` lists everything loaded and is
ignored for this. Otherwise the device is ``guest``.

``GUEST_PANICKED`` (QMP; on Windows with Hyper-V crash MSRs it carries the bugcheck
code and parameters) is the ``bugcheck`` check.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lab.events import Event, Kind, Source
from lab.results import Violation
from lab.rules.base import GUEST, RuleContext, register, violation
from lab.timeline import Timeline, normalize_bdf

MAX_LINES = 15
#: a report's lines arrive together; a later header this far away is a new report
REPORT_WINDOW_NS = 2_000_000_000

_PREFIX_RE = re.compile(r"^\s*(?:<\d+>)?(?:\[\s*\d+\.\d+\]\s*)?(?:\[\s*[TC]\d+\]\s*)?")
_STARTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("kernel.panic", re.compile(r"Kernel panic - not syncing")),
    ("kernel.oops", re.compile(r"\bOops(?::| -|\s\[#)|general protection fault|"
                               r"Unable to handle kernel|kernel NULL pointer dereference|"
                               r"(?:^|\s)BUG: ")),
    ("kernel.warning", re.compile(r"(?:^|\s)WARNING: (?:CPU: \d+ PID: \d+|at )")),
    ("kernel.hung-task", re.compile(r"INFO: task .+ blocked for more than \d+ seconds")),
)
_END_RE = re.compile(r"---\[ end (?:trace|Kernel panic)")
_MODULE_RE = re.compile(r"\[([A-Za-z0-9_\-]+)\]\s*$|\[([A-Za-z0-9_\-]+)\]")
_BDF_RE = re.compile(r"\b(?:[0-9a-f]{4}:)?[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]\b")
_SEVERITY = {"kernel.panic": 3, "kernel.oops": 2, "kernel.hung-task": 1, "kernel.warning": 0}


def event_text(ev: Event) -> str:
    for k in ("message", "line", "text", "msg"):
        v = ev.data.get(k)
        if v:
            return str(v)
    return ""


def strip_prefix(line: str) -> str:
    """Drop the syslog level and printk timestamp a console line carries."""
    return _PREFIX_RE.sub("", line, count=1).rstrip()


def classify(line: str) -> str | None:
    """The check id a report header line starts, or None."""
    for rule, rx in _STARTS:
        if rx.search(line):
            return rule
    return None


@dataclass
class _Report:
    rule: str
    first: Event
    last: Event
    lines: list[str] = field(default_factory=list)
    closed: bool = False


class KernelOopsRule:
    id = "kernel-oops"
    description = "kernel oops/BUG/WARNING/panic in the guest log, and guest panics (bugcheck)"
    checks: Mapping[str, str] = {
        "kernel.oops": "the guest kernel oopsed (BUG:, Oops, GPF, NULL dereference)",
        "kernel.warning": "the guest kernel hit a WARN_ON (WARNING: CPU: .. PID: ..)",
        "kernel.panic": "the guest kernel panicked",
        "kernel.hung-task": "a guest task was blocked for longer than the hung-task timeout",
        "bugcheck": "QEMU reported a guest panic (GUEST_PANICKED; Windows bugcheck)",
    }

    def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        reports: list[_Report] = []
        cur: _Report | None = None
        for ev in timeline.select(kinds=(Kind.KERNEL_LOG, Kind.KERNEL_OOPS)):
            if not ev.source.is_guest:
                continue
            lines = _lines_of(ev)
            for raw in lines:
                line = strip_prefix(raw)
                rule = classify(line)
                if cur is not None and (cur.closed
                                        or ev.t_host_ns - cur.first.t_host_ns > REPORT_WINDOW_NS):
                    cur = None                          # that report is complete
                if rule is not None:
                    if cur is None:
                        cur = _Report(rule, ev, ev)
                        reports.append(cur)
                    elif _SEVERITY[rule] > _SEVERITY[cur.rule]:
                        cur.rule = rule                 # BUG: then its Oops; oops then panic
                if cur is None:
                    continue
                if len(cur.lines) < MAX_LINES:
                    cur.lines.append(line)
                cur.last = ev
                if _END_RE.search(line):
                    cur.closed = True
        for rep in reports:
            device = _attribute(rep.lines, context)
            header = rep.lines[0] if rep.lines else ""
            out.append(violation(
                rep.rule, device, context.phase_at(rep.first.t_host_ns),
                f"guest kernel {_WHAT[rep.rule]}: {header[:160]}",
                [rep.first, rep.last if rep.last is not rep.first else None],
                lines=rep.lines))
        for ev in timeline.select(kinds=Kind.GUEST_PANICKED):
            info = ev.data.get("info") or {}
            code = info.get("arg1") if isinstance(info, Mapping) else None
            detail = (f" (bugcheck {int(code):#x})" if isinstance(code, int)
                      else f" ({ev.data.get('action')})" if ev.data.get("action") else "")
            out.append(violation(
                "bugcheck", GUEST, context.phase_at(ev.t_host_ns),
                f"QEMU reported the guest panicked{detail}.", [ev],
                info=info, action=ev.data.get("action"),
                source=ev.source.value if ev.source != Source.HOST_QMP else None))
        return out


_WHAT = {"kernel.oops": "oops", "kernel.warning": "warning", "kernel.panic": "panic",
         "kernel.hung-task": "hung task"}


def _lines_of(ev: Event) -> list[str]:
    lines = ev.data.get("lines")
    if isinstance(lines, (list, tuple)) and lines:
        return [str(x) for x in lines]
    text = event_text(ev)
    return text.splitlines() or [text]


def _attribute(lines: list[str], ctx: RuleContext) -> str:
    for line in lines:
        if line.lstrip().startswith("Modules linked in"):
            continue
        for m in _MODULE_RE.finditer(line):
            name = m[1] or m[2]
            dev = ctx.driver_device(name)
            if dev is not None:
                return dev
        for m in _BDF_RE.finditer(line):
            bdf = normalize_bdf(m[0])
            for d in ctx.devices:
                if d.bdf and normalize_bdf(d.bdf) == bdf:
                    return d.label()
    return GUEST


register(KernelOopsRule())
