"""``rebalab inspect``: logs from real machines through the lab's own pipeline.

A driver team already holds evidence from hardware: a field failure's
setupapi.dev.log, Kernel-PnP events exported from Event Viewer, ``pnputil
/enum-devices``, a Linux ``dmesg``. Each file goes through the parser of its format
(the same parsers the live tracers use), the events are merged into one ``Timeline``,
the rules judge every device (or the devices named with ``--device``), and the
verdict comes out as a run's would: console, JSON, or timeline.jsonl + summary.json +
junit.xml + report.html.

Nothing is dropped silently: every file's lines are accounted for (used, skipped, not
understood, with the first few not-understood lines shown), the counts go into the
timeline header, and a file in which nothing was understood is an error (exit 2),
never an empty success.

A run directory can be inspected too: its iterations' timelines are re-checked with
the rule selection and context the run recorded (``iterations/K/rules.json``), which
shows that a verdict follows from the recorded events alone.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lab import logs
from lab.errors import ConfigError
from lab.events import DeviceId, Event, Kind
from lab.logs.base import LogFormatError, LogInput, Tally
from lab.results import IterationResult, Status, Violation
from lab.rules import check_all
from lab.rules.base import Limits, RuleContext, selected_checks
from lab.timeline import DeviceBinding, Timeline, device_label, normalize_bdf

#: plain log lines (kernel-log events) kept in one inspection's timeline; past it they
#: are counted instead of kept, so a 100 MB dmesg is judged in bounded memory
MAX_LOG_LINES = 100_000
#: events the rules read (everything but plain log lines) kept at most; past it they are
#: counted too and the inspection says that its verdict covers only what was kept
MAX_RULE_EVENTS = 250_000
#: files one inspection reads
MAX_FILES = 256

_BDF_RE = re.compile(r"^(?:[0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class DeviceSpec:
    """``--device NAME=IDENTITY``: a name for the report, and what the logs call it.

    IDENTITY is a PCI address (``0000:01:00.0`` or ``01:00.0``), a Windows device
    instance id (``PCI\\VEN_8086&DEV_293E&...\\3&...``), or a glob over instance ids
    (``PCI\\VEN_8086&DEV_293E*``, ``HDAUDIO\\FUNC_01&VEN_1AF4*``), case-insensitive.
    """

    name: str
    identity: str

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        name, sep, ident = text.partition("=")
        name, ident = name.strip(), ident.strip()
        if not sep or not name or not ident:
            raise ConfigError(f"--device {text!r}: expected NAME=IDENTITY (a PCI address, "
                              "an instance id, or a glob such as PCI\\VEN_8086&DEV_293E*)")
        if not _NAME_RE.match(name):
            raise ConfigError(f"--device: {name!r} is not a usable device name (letters, "
                              "digits, '_', '.', '-'; at most 64)")
        if len(ident) > 512 or any(ord(c) < 32 for c in ident):
            raise ConfigError(f"--device {name}: the identity is not a PCI address or an "
                              "instance id")
        return cls(name, ident)

    @property
    def is_bdf(self) -> bool:
        return bool(_BDF_RE.match(self.identity))

    def matches(self, dev: DeviceId) -> bool:
        if self.is_bdf:
            return dev.bdf is not None and normalize_bdf(dev.bdf) == normalize_bdf(self.identity)
        if dev.instance is None:
            return False
        return fnmatch.fnmatchcase(dev.instance.upper(), self.identity.upper())


@dataclass
class FileReport:
    """One input file: its format, its accounting, and what it added to the timeline."""

    tally: Tally
    kept: int = 0
    left_out: int = 0           # plain log lines past MAX_LOG_LINES
    left_out_rule: int = 0      # events the rules read, past MAX_RULE_EVENTS

    def to_json(self) -> dict[str, Any]:
        return {**self.tally.to_json(), "kept": self.kept, "left_out": self.left_out,
                "left_out_rule_events": self.left_out_rule}


@dataclass
class DeviceVerdict:
    label: str
    identities: list[str]
    events: int
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_json(self) -> dict[str, Any]:
        return {"device": self.label, "identities": self.identities, "events": self.events,
                "verdict": "ok" if self.ok else "violations",
                "violations": [v.to_json() for v in self.violations]}


@dataclass
class Inspection:
    """What ``inspect`` found: the files, the timeline, the violations per device."""

    files: list[FileReport]
    timeline: Timeline
    violations: list[Violation]
    devices: list[DeviceVerdict]
    rules: list[str] | None
    unmatched: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.violations else 0

    def to_json(self) -> dict[str, Any]:
        return {"files": [f.to_json() for f in self.files],
                "events": len(self.timeline),
                "devices": [d.to_json() for d in self.devices],
                "violations": [v.to_json() for v in self.violations],
                "unmatched_devices": self.unmatched,
                "verdict": "violations" if self.violations else "ok"}


@dataclass
class _Budget:
    """What one inspection may still keep (shared by its files)."""

    log_lines: int
    rule_events: int

    @classmethod
    def new(cls) -> _Budget:
        return cls(MAX_LOG_LINES, MAX_RULE_EVENTS)

    def take(self, ev: Event) -> bool:
        if ev.kind == Kind.KERNEL_LOG:
            self.log_lines -= 1
            return self.log_lines >= 0
        self.rule_events -= 1
        return self.rule_events >= 0


def read_file(path: str | Path, fmt: str = "auto", budget: _Budget | None = None
              ) -> tuple[FileReport, list[Event]]:
    """Parse one file with the named parser (or the detected one)."""
    inp = LogInput(path)
    parser = logs.detect(inp) if fmt == "auto" else logs.get(fmt)
    tally = Tally(path=inp.display, format=parser.name)
    events: list[Event] = []
    report = FileReport(tally)
    budget = budget or _Budget.new()
    for ev in parser.parse(inp, tally):
        if budget.take(ev):
            events.append(ev)
        elif ev.kind == Kind.KERNEL_LOG:
            report.left_out += 1
        else:
            report.left_out_rule += 1
    if report.left_out_rule:
        tally.problem(f"{report.left_out_rule} event(s) the rules read were past the "
                      f"{MAX_RULE_EVENTS} an inspection keeps: the verdict covers the "
                      "events before them; split the file to judge the rest")
    report.kept = len(events)
    if tally.events == 0 and tally.used == 0:
        raise LogFormatError(
            f"{inp.display}: nothing in it was understood as {parser.name} "
            f"({tally.lines} line(s), {tally.not_understood} not understood"
            + (f", first at line {tally.samples[0][0]}" if tally.samples else "")
            + "); name another format with --format")
    return report, events


def _after(untimed: Sequence[Event], last_ns: int) -> list[Event]:
    """Files without time (pnputil, a dmesg without stamps) say how things are *now*,
    when they were taken: after everything timed, in their own order."""
    if not untimed:
        return []
    base = last_ns + 1 - min(e.t_host_ns for e in untimed)
    return [replace(e, t_host_ns=e.t_host_ns + base) for e in untimed]


def _bindings(specs: Sequence[DeviceSpec], events: Iterable[Event]
              ) -> tuple[list[DeviceBinding], list[str]]:
    """Each spec bound to every identity in the events that it matches."""
    seen: dict[str, set[tuple[str | None, str | None]]] = {s.name: set() for s in specs}
    for ev in events:
        d = ev.device
        if d is None:
            continue
        for s in specs:
            if s.matches(d):
                seen[s.name].add((normalize_bdf(d.bdf) if s.is_bdf else None,
                                  d.instance if not s.is_bdf else None))
    out: list[DeviceBinding] = []
    unmatched: list[str] = []
    for s in specs:
        ids = sorted(seen[s.name], key=str)
        if not ids:
            unmatched.append(s.name)
            if s.is_bdf:
                ids = [(normalize_bdf(s.identity), None)]
            elif "*" not in s.identity and "?" not in s.identity:
                ids = [(None, s.identity)]
        out.extend(DeviceBinding(DeviceId(qom=s.name, bdf=b, instance=i)) for b, i in ids)
    return out, unmatched


def inspect_files(paths: Sequence[str | Path], *, fmt: str = "auto",
                  devices: Sequence[DeviceSpec] = (), rules: Sequence[str] | None = None,
                  limits: Mapping[str, Any] | None = None) -> Inspection:
    """Read, merge, judge. Raises ``LogFormatError``/``ConfigError`` for unreadable input
    (before any rule runs)."""
    if not paths:
        raise ConfigError("inspect: name at least one file")
    if len(paths) > MAX_FILES:
        raise ConfigError(f"inspect: {len(paths)} files is more than {MAX_FILES}")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise ConfigError("inspect: a --device name is given twice")
    lim = Limits.from_mapping(limits)
    files: list[FileReport] = []
    events: list[Event] = []
    untimed: list[Event] = []
    budget = _Budget.new()
    for p in paths:
        report, evs = read_file(p, fmt, budget)
        files.append(report)
        (untimed if report.tally.clock == "none" else events).extend(evs)
    events.extend(_after(untimed, max((e.t_host_ns for e in events), default=0)))
    bindings, unmatched = _bindings(devices, events)
    meta = {"inspect": {"files": [f.to_json() for f in files],
                        "clocks": sorted({f.tally.clock for f in files})}}
    tl = Timeline.build({"logs": events}, devices=bindings, meta=meta)
    under_test = tuple(DeviceId(qom=d.name) for d in devices)
    ctx = RuleContext.from_timeline(tl, devices=under_test, limits=lim, bound_at_start=None)
    violations = check_all(tl, ctx, list(rules) if rules else None)
    return Inspection(files=files, timeline=tl, violations=violations,
                      devices=_verdicts(tl, ctx, violations, devices),
                      rules=list(rules) if rules else None, unmatched=unmatched)


def _verdicts(tl: Timeline, ctx: RuleContext, violations: Sequence[Violation],
              specs: Sequence[DeviceSpec]) -> list[DeviceVerdict]:
    """One verdict per device: the named ones, else every device with evidence."""
    out: dict[str, DeviceVerdict] = {}
    for s in specs:
        out[s.name] = DeviceVerdict(s.name, [], 0)
    for ev in tl:
        if ev.device is None or not ctx.under_test(ev.device):
            continue
        label = ctx.label(ev.device)
        v = out.setdefault(label, DeviceVerdict(label, [], 0))
        v.events += 1
        for ident in (ev.device.instance, ev.device.bdf):
            if ident and ident not in v.identities and len(v.identities) < 16:
                v.identities.append(ident)
    for viol in violations:
        out.setdefault(viol.device, DeviceVerdict(viol.device, [], 0)).violations.append(viol)
    return sorted(out.values(), key=lambda d: (d.ok, d.label))


# ---- reports -----------------------------------------------------------------------

def write_reports(insp: Inspection, out_dir: str | Path, *, argv: Sequence[str] = ()) -> Path:
    """timeline.jsonl, summary.json, junit.xml and report.html, as a run writes them:
    one "iteration" (index 0) holding the whole inspection."""
    from lab import __version__
    from lab.report.html import write_report
    from lab.report.junit import write_junit
    from lab.report.summary import RunInfo, write_summary

    out = Path(out_dir)
    # a report holds the user's logs: private, like the logs themselves should be
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    insp.timeline.write(out / "timeline.jsonl")
    (out / "inspect.json").write_text(json.dumps(insp.to_json(), indent=2, default=str) + "\n",
                                      encoding="utf-8")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result = IterationResult(
        index=0, parameters={"files": [Path(f.tally.path).name for f in insp.files]}, seed=0,
        status=Status.FAILED if insp.violations else Status.PASSED,
        violations=tuple(insp.violations),
        artifacts={"timeline": "timeline.jsonl", "inspect": "inspect.json"})
    info = RunInfo(scenario="inspect", accelerator="none (logs)",
                   versions={"rebalab": __version__}, started_at=now, ended_at=now,
                   guest="logs: " + ", ".join(sorted({f.tally.format for f in insp.files})),
                   parameters={})
    summary = write_summary(out, info, [result])
    write_junit(out, summary)
    write_report(out, summary)
    return out


def event_time(ev: Event, clocks: Mapping[str, str]) -> str:
    """An event's time in its file's own clock: a date for wall clocks (``local``: the
    machine's zone, unknown here), seconds since boot for printk stamps, ``-`` untimed."""
    path = str(ev.data.get("at", "")).rpartition(":")[0]
    clock = clocks.get(path, "utc")
    flags = ev.data.get("flags") or ()
    if clock == "none" or "untimed" in flags:
        return "untimed".ljust(26)
    if clock == "boot":
        t = ev.t_guest_ns if ev.t_guest_ns is not None else ev.t_host_ns
        return f"[{t / 1e9:12.6f}] boot".ljust(26)
    dt = datetime.fromtimestamp(ev.t_host_ns / 1e9, timezone.utc)
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f")[:23] + (" L" if clock == "local" else " Z")


def render_files(files: Sequence[FileReport]) -> list[str]:
    """Per file: format, lines, how they were accounted for, the first few not
    understood (the user's own file, shown to the user: this is the report, not an
    error message)."""
    out: list[str] = []
    for f in files:
        t = f.tally
        line = (f"{t.path}: {t.format}, {t.lines} line(s): {t.used} used, {t.skipped} skipped, "
                f"{t.not_understood} not understood; {t.events} event(s)")
        if f.left_out:
            line += f" ({f.left_out} plain log lines left out of the timeline)"
        if f.left_out_rule:
            line += f" ({f.left_out_rule} events past the cap: NOT judged)"
        if t.clock == "none":
            line += "; untimed (ordered only)"
        elif t.clock in ("local", "boot"):
            line += f"; clock: {t.clock}"
        out.append(line)
        for n, text in t.samples:
            out.append(f"    not understood, line {n}: {text[:120]}")
        for p in t.problems[:5]:
            out.append(f"    problem: {p}")
        if len(t.problems) > 5 or t.problems_dropped:
            out.append(f"    ... {len(t.problems) - 5 + t.problems_dropped} more problem(s)")
        if t.decode_errors:
            out.append(f"    {t.decode_errors} line(s) were not valid UTF-8 (read as cp1252)")
        if t.cut_lines:
            out.append(f"    {t.cut_lines} over-long line(s) were cut")
    return out


def render_verdicts(insp: Inspection) -> list[str]:
    out: list[str] = []
    if not insp.devices:
        out.append("no device had evidence the rules could judge")
    for d in insp.devices:
        ids = ", ".join(d.identities[:3]) + (" ..." if len(d.identities) > 3 else "")
        head = f"{d.label}: {'ok' if d.ok else f'{len(d.violations)} violation(s)'}"
        out.append(f"{head} ({d.events} event(s){'; ' + ids if ids and ids != d.label else ''})")
        for v in d.violations:
            out.append(f"    {v.signature}: {v.message}")
    for name in insp.unmatched:
        out.append(f"{name}: no event in the files names this device")
    return out


def device_labels(evs: Iterable[Event]) -> list[str]:
    return sorted({device_label(e.device) for e in evs if e.device is not None})


# ---- a run directory ------------------------------------------------------------------

@dataclass
class IterationRecheck:
    """One iteration of a run, judged again from its files."""

    key: str
    recorded: list[Violation]
    rechecked: list[Violation]
    rules: list[str]
    note: str = ""

    @staticmethod
    def _sig(v: Violation) -> tuple[str, str, str, str]:
        return (v.rule, v.device, v.phase, v.message)

    @property
    def from_steps(self) -> list[Violation]:
        """Recorded violations the final rules do not produce: the run's own steps
        (guest checks, asserts, audio checks) found them, not the recorded events."""
        re_ = {self._sig(v) for v in self.rechecked}
        return [v for v in self.recorded if self._sig(v) not in re_]

    @property
    def reproduced(self) -> bool:
        """Every re-checked violation was recorded, and no recorded violation of a
        selected rule went missing."""
        rec = {self._sig(v) for v in self.recorded}
        if any(self._sig(v) not in rec for v in self.rechecked):
            return False
        wanted = selected_checks(self.rules)
        return not any(v.rule in wanted for v in self.from_steps)

    def to_json(self) -> dict[str, Any]:
        return {"iteration": self.key, "reproduced": self.reproduced, "rules": self.rules,
                "recorded": [str(v.signature) for v in self.recorded],
                "rechecked": [str(v.signature) for v in self.rechecked],
                "from_steps": [str(v.signature) for v in self.from_steps], "note": self.note}


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "summary.json").is_file()


def inspect_run(run_dir: str | Path, *, rules: Sequence[str] | None = None
                ) -> list[IterationRecheck]:
    """Re-check every iteration of a run from its timeline and recorded rule context."""
    from lab.report.summary import load_summary
    from lab.guest.spec import guest_class
    from lab.runner import RULES_FILE

    rd = Path(run_dir)
    try:
        summary = load_summary(rd)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{rd}/summary.json: not a readable run summary "
                          f"({type(exc).__name__})") from None
    # runs made before the guest was recorded were Linux runs
    summary_os = str(getattr(summary, "guest", None) or "linux")
    out: list[IterationRecheck] = []
    for r in summary.results:
        key = str(r.key)
        tp = rd / "iterations" / key / "timeline.jsonl"
        if not tp.is_file():
            out.append(IterationRecheck(key, list(r.violations), [], [],
                                        note="no timeline (the iteration did not get that far)"))
            continue
        tl = Timeline.read(tp)
        rp = rd / "iterations" / key / RULES_FILE
        note = ""
        if rp.is_file():
            try:
                rec = json.loads(rp.read_text(encoding="utf-8"))
                ids = [str(x) for x in rec.get("rules") or ()]
                ctx = RuleContext.from_recorded(tl, rec.get("context") or {})
            except (ValueError, AttributeError) as exc:
                raise ConfigError(f"{rp}: not a rules record ({type(exc).__name__})") from None
        else:
            ids = list(guest_class(summary_os).default_rules)
            devices = tuple(DeviceId(qom=e.device.qom) for e in tl.select(kinds=Kind.HOTPLUG_REQUEST)
                            if e.device and e.device.qom)
            ctx = RuleContext.from_timeline(tl, devices=devices, bound_at_start=frozenset())
            note = f"no {RULES_FILE} (run made before it existed): default {summary_os} rules"
        selected = list(rules) if rules else ids
        if r.status not in (Status.PASSED, Status.FAILED):
            out.append(IterationRecheck(key, list(r.violations), [], selected,
                                        note=f"status {r.status.value}: the run applied no rules"))
            continue
        out.append(IterationRecheck(key, list(r.violations), check_all(tl, ctx, selected),
                                    selected, note))
    return out
