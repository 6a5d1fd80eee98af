"""``report.html``: one self-contained page a driver engineer can open from CI.

Self-contained means no server and no network: CSS is inline, pictures are inline
SVG, there is no JavaScript, and every link is a relative path into the run
directory, so the page works from a downloaded CI artifact and leaks nothing. The
page shows the header (scenario, status, accelerator, clock-alignment bound), the
signatures with reproduction rates, failure rates per parameter value, a timeline
picture per chosen iteration (failing ones first) with one swim lane per event
source, durations as spans and violations in red linked to their table rows, and
the table of all iterations.

Layout (coordinates, colours, tooltips) is computed here in plain Python; the
Jinja2 template (``lab/templates/report.html.j2``, autoescape on) only draws it, so
no string from a trace can inject markup.
"""

from __future__ import annotations

import json
import math
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2

from lab import __version__
from lab.events import Event, Kind, Source
from lab.report.console import fmt_measurement
from lab.report.summary import (GroupStats, Summary, fmt_params, fmt_rate, fmt_value,
                                iteration_duration_s)
from lab.report.summary import load_summary
from lab.results import IterationResult, Status, Violation

REPORT_FILE = "report.html"
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
RUN_ARTIFACTS = ("run.json", "summary.json", "junit.xml", "timeline.jsonl", "qemu-cmdline.txt",
                 "qmp.jsonl", "console.log", "qemu-trace.log")

# ---- timeline files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """A ``timeline.jsonl``: its header line (clock alignment...) and its events."""

    header: Mapping[str, Any]
    events: tuple[Event, ...]
    bad_lines: int = 0

    @property
    def alignment_bound_ns(self) -> int | None:
        return alignment_bound_ns(self.header)


def alignment_bound_ns(header: Mapping[str, Any]) -> int | None:
    """The guest/host clock alignment bound from a timeline header, if it states one."""
    for key in ("alignment_bound_ns", "bound_ns"):
        v = header.get(key)
        if isinstance(v, (int, float)):
            return int(v)
    al = header.get("alignment")
    if isinstance(al, Mapping):
        for key in ("bound_ns", "alignment_bound_ns"):
            v = al.get(key)
            if isinstance(v, (int, float)):
                return int(v)
    return None


def read_timeline(path: str | Path) -> Timeline:
    """Read ``timeline.jsonl``: an optional header line with ``"type": "header"``, then one
    ``Event.to_json()`` object per line. Unreadable lines are counted, not fatal: a
    report of a crashed run is still worth having."""
    header: dict[str, Any] = {}
    events: list[Event] = []
    bad = 0
    with Path(path).open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                if n == 0 and isinstance(obj, dict) and obj.get("type") == "header":
                    header = obj
                    continue
                events.append(Event.from_json(obj))
            except (ValueError, KeyError, TypeError):
                bad += 1
    return Timeline(header, tuple(events), bad)


# ---- timeline picture layout -----------------------------------------------------------

SOURCE_ORDER = [Source.HOST_LAB, Source.HOST_QMP, Source.HOST_TRACE, Source.HOST_AUDIO,
                Source.GUEST_KERNEL, Source.GUEST_KPROBE, Source.GUEST_UEVENT, Source.GUEST_PNP,
                Source.GUEST_ETW, Source.GUEST_WPP, Source.GUEST_SETUPAPI]

KIND_GROUPS: list[tuple[str, str, tuple[Kind, ...]]] = [
    ("hot-plug / QMP", "#2563eb", (Kind.HOTPLUG_REQUEST, Kind.UNPLUG_REQUEST,
                                   Kind.DEVICE_DELETED, Kind.QMP_EVENT, Kind.OPERATION,
                                   Kind.SLOT_EVENT)),
    ("bind state", "#0d9488", (Kind.BOUND, Kind.UNBOUND)),
    ("driver calls", "#7c3aed", (Kind.PROBE_ENTER, Kind.PROBE_EXIT, Kind.REMOVE_ENTER,
                                 Kind.REMOVE_EXIT, Kind.CALL_ENTER, Kind.CALL_EXIT)),
    ("resources", "#ca8a04", (Kind.BAR_MAPPED, Kind.BAR_UNMAPPED, Kind.DECODE_ON,
                              Kind.DECODE_OFF, Kind.CONFIG_WRITE, Kind.PCI_SNAPSHOT,
                              Kind.RESOURCE_MOVED, Kind.RESOURCES_ASSIGNED,
                              Kind.RESOURCE_UNASSIGNED, Kind.RESOURCE_RELEASED,
                              Kind.REBALANCE_START, Kind.REBALANCE_END)),
    ("Windows PnP", "#db2777", (Kind.QUERY_STOP, Kind.STOP, Kind.CANCEL_STOP, Kind.START,
                                Kind.SURPRISE_REMOVAL, Kind.REMOVE, Kind.QUERY_REMOVE,
                                Kind.CANCEL_REMOVE, Kind.PROBLEM, Kind.DEVICE_STATE)),
    # what the host heard: stream start, stop, resume (span = the outage), gaps, glitches
    ("audio", "#0891b2", (Kind.AUDIO_START, Kind.AUDIO_STOP, Kind.AUDIO_RESUMED,
                          Kind.AUDIO_GAP, Kind.AUDIO_DISCONTINUITY, Kind.AUDIO_OVERRUN,
                          Kind.AUDIO_TIMER_LATE)),
    ("driver I/O", "#16a34a", (Kind.DRIVER_IO,)),
    ("VM state", "#475569", (Kind.PAUSE, Kind.RESUME)),
    ("alarms", "#e11d48", (Kind.KERNEL_OOPS, Kind.GUEST_PANICKED)),
    ("logs", "#94a3b8", (Kind.KERNEL_LOG, Kind.UEVENT, Kind.SETUPAPI_SECTION)),
]
_KIND_COLOR = {k: (name, color) for name, color, kinds in KIND_GROUPS for k in kinds}
VIOLATION_COLOR = "#dc2626"

WIDTH = 1160
LABEL_W = 150
PAD_R = 24
AXIS_H = 28
LANE_H = 30
MAX_MARKS_PER_LANE = 1500


@dataclass
class Mark:
    x: float
    y: float
    color: str
    title: str
    r: float = 3.6


@dataclass
class Span:
    x: float
    y: float
    w: float
    h: float
    color: str
    title: str
    label: str = ""
    failed: bool = False


@dataclass
class VMark:
    """A violation: a red ring on each of its events, a line at the first, a link."""

    x: float
    y: float
    href: str
    title: str
    number: int


@dataclass
class Lane:
    name: str
    y: float
    label: str
    count: int
    shown: int


@dataclass
class Tick:
    x: float
    label: str


@dataclass
class TimelineView:
    index: int | str
    width: int
    height: int
    plot_left: int
    plot_right: int
    lanes: list[Lane] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    vmarks: list[VMark] = field(default_factory=list)
    vlines: list[VMark] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    t0_ns: int = 0
    lane_h: int = LANE_H
    caption: str = ""


#: kinds whose duration ends at the event (a handler's exit, a stream's resume after its
#: outage); every other event's duration starts at it
ENDS_AT_EVENT = frozenset({Kind.PROBE_EXIT, Kind.REMOVE_EXIT, Kind.CALL_EXIT,
                           Kind.AUDIO_RESUMED})


def span_of(e: Event) -> tuple[int, int]:
    """The host-time interval an event with a duration covers."""
    d = e.duration_ns or 0
    return (e.t_host_ns - d, e.t_host_ns) if e.kind in ENDS_AT_EVENT else (e.t_host_ns,
                                                                           e.t_host_ns + d)


def _nice_step(span: float, target: int = 8) -> float:
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _fmt_rel(ns: float, span_ns: float) -> str:
    if span_ns >= 5e9:
        return f"+{ns / 1e9:.3g} s" if ns else "0"
    return f"+{ns / 1e6:.4g} ms" if ns else "0"


def _device_text(e: Event) -> str:
    if e.device is None:
        return ""
    parts = [p for p in (e.device.qom, e.device.bdf, e.device.instance) if p]
    return " / ".join(parts)


def _data_text(data: Mapping[str, Any], limit: int = 240) -> str:
    if not data:
        return ""
    text = json.dumps(data, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _event_title(e: Event, t0: int) -> str:
    lines = [f"{_fmt_ms(e.t_host_ns - t0)}  {e.kind.value}  #{e.seq}",
             f"source: {e.source.value}"]
    dev = _device_text(e)
    if dev:
        lines.append(f"device: {dev}")
    if e.duration_ns is not None:
        lines.append(f"duration: {e.duration_ns / 1e6:.3f} ms")
    if e.t_guest_ns is not None:
        lines.append(f"guest clock: {e.t_guest_ns / 1e9:.6f} s")
    d = _data_text(e.data)
    if d:
        lines.append(d)
    return "\n".join(lines)


def _fmt_ms(ns: float) -> str:
    return f"+{ns / 1e6:.3f} ms"


def layout_timeline(result: IterationResult, events: Sequence[Event], *,
                    bound_ns: int | None = None, width: int = WIDTH,
                    window: tuple[int, int] | None = None) -> TimelineView:
    """Positions of everything in one iteration's timeline picture.

    Times are shown relative to the iteration's first record. ``window`` (host ns)
    draws only that stretch: races of a few milliseconds vanish in a picture of
    seconds, so the page adds a zoom around each iteration's violations.
    """
    plot_l, plot_r = LABEL_W, width - PAD_R
    plot_w = plot_r - plot_l
    times = [t for e in events for t in span_of(e)] + \
        [t.started_ns for t in result.timings] + \
        [t.started_ns + t.duration_ns for t in result.timings] + \
        [ref.t_host_ns for v in result.violations for ref in v.events]
    t0 = min(times) if times else 0
    t1 = max(times) if times else 1
    span = max(t1 - t0, 1_000_000)             # at least 1 ms, so a lone event is centred
    if t1 == t0:
        t0 -= span // 2
    t1 = t0 + span
    pad = span * 0.02
    lo, hi = t0 - pad, t1 + pad
    if window is not None:
        lo, hi = float(window[0]), float(max(window[1], window[0] + 1000))
        span = int(hi - lo)

    def x_of(t: float) -> float:
        return plot_l + (t - lo) / (hi - lo) * plot_w

    def inside(t: float) -> bool:
        return lo <= t <= hi

    def clip(a: float, b: float) -> tuple[float, float] | None:
        if b < lo or a > hi:
            return None
        x0, x1 = x_of(max(a, lo)), x_of(min(b, hi))
        return x0, max(x1 - x0, 2.0)

    shown_events = [e for e in events if inside(e.t_host_ns) or
                    (e.duration_ns and clip(*span_of(e)))]
    sources_present = {e.source for e in (shown_events if window else events)} | \
        {Source(ref.source) for v in result.violations for ref in v.events
         if ref.source in Source._value2member_map_}
    order = [s for s in SOURCE_ORDER if s in sources_present] + \
        sorted((s for s in sources_present if s not in SOURCE_ORDER), key=lambda s: s.value)
    view = TimelineView(index=result.key, width=width, height=0, plot_left=plot_l,
                        plot_right=plot_r, t0_ns=int(t0))
    if window is not None:
        view.caption = (f"zoom {_fmt_ms(lo - t0)} … {_fmt_ms(hi - t0)} "
                        "around the violations")
    y = AXIS_H
    lane_y: dict[str, float] = {}
    if result.timings:
        view.lanes.append(Lane("steps", y, "steps", len(result.timings), len(result.timings)))
        for t in result.timings:
            c = clip(t.started_ns, t.started_ns + t.duration_ns)
            if c is None:
                continue
            x0, w = c
            label = t.name if w >= 7 * len(t.name) else \
                (t.name[:int(w / 7) - 1] + "…" if w >= 28 else "")
            title = (f"{t.name}\n{_fmt_ms(t.started_ns - t0)}, {t.duration_ns / 1e6:.3f} ms"
                     + ("" if t.ok else "\nFAILED") + (f"\n{t.detail}" if t.detail else ""))
            view.spans.append(Span(x0, y + 6, w, LANE_H - 12, "#64748b" if t.ok else
                                   VIOLATION_COLOR, title, label, not t.ok))
        y += LANE_H
    by_source: dict[Source, list[Event]] = {}
    for e in shown_events:
        by_source.setdefault(e.source, []).append(e)
    used_groups: dict[str, str] = {}
    for src in order:
        evs = by_source.get(src, [])
        shown = evs
        if len(evs) > MAX_MARKS_PER_LANE:
            step = len(evs) / MAX_MARKS_PER_LANE
            keep = {int(i * step) for i in range(MAX_MARKS_PER_LANE)}
            shown = [e for i, e in enumerate(evs) if i in keep or e.duration_ns]
            view.notes.append(f"{src.value}: {len(shown)} of {len(evs)} events drawn "
                              "(thinned evenly; the timeline file has all)")
        label = src.value
        if bound_ns is not None and src.is_guest:
            label += f" ±{bound_ns / 1e6:.1f} ms"
        view.lanes.append(Lane(src.value, y, label, len(evs), len(shown)))
        lane_y[src.value] = y + LANE_H / 2
        for e in shown:
            group, color = _KIND_COLOR.get(e.kind, ("other", "#334155"))
            used_groups[group] = color
            title = _event_title(e, int(t0))
            if e.duration_ns:
                c = clip(*span_of(e))
                if c is not None:
                    view.spans.append(Span(c[0], y + 9, c[1], LANE_H - 18, color, title))
            if inside(e.t_host_ns):
                view.marks.append(Mark(x_of(e.t_host_ns), y + LANE_H / 2, color, title))
        y += LANE_H
    by_seq = {e.seq: e for e in events if e.seq}
    for n, v in enumerate(result.violations):
        href = f"#v-{result.key}-{n}"
        title = f"violation {n + 1}: {v.rule} on {v.device} ({v.phase})\n{v.message}"
        first = True
        for ref in v.events:
            ev = by_seq.get(ref.seq)
            t_ref = ev.t_host_ns if ev is not None else ref.t_host_ns
            if not inside(t_ref):
                continue
            lane = ev.source.value if ev is not None else ref.source
            yy = lane_y.get(lane, AXIS_H + LANE_H / 2)
            vm = VMark(x_of(t_ref), yy, href, title + f"\nevent #{ref.seq} {ref.kind}"
                       + (f": {ref.summary}" if ref.summary else ""), n + 1)
            view.vmarks.append(vm)
            if first:
                view.vlines.append(vm)
                first = False
    view.height = int(y + 8)
    step = _nice_step(span)
    k = math.ceil((lo - t0) / step)
    while t0 + k * step <= hi:
        rel = k * step
        view.ticks.append(Tick(x_of(t0 + rel), _fmt_rel(rel, span)))
        k += 1
    names = [g[0] for g in KIND_GROUPS]
    view.legend = sorted(used_groups.items(),
                         key=lambda kv: names.index(kv[0]) if kv[0] in names else 99)
    if result.violations:
        view.legend.append(("violation", VIOLATION_COLOR))
    return view


def violation_window(result: IterationResult, events: Sequence[Event],
                     margin_ns: int = 10_000_000) -> tuple[int, int] | None:
    """The stretch around an iteration's violation events worth a zoomed picture, or
    None when the full picture already shows it at a readable scale."""
    ts = [r.t_host_ns for v in result.violations for r in v.events]
    if not ts:
        return None
    lo, hi = min(ts) - margin_ns, max(ts) + margin_ns
    all_t = [e.t_host_ns for e in events] + [t.started_ns for t in result.timings] + \
        [t.started_ns + t.duration_ns for t in result.timings] + ts
    full = max(all_t) - min(all_t)
    if full <= 4 * (hi - lo):
        return None
    return lo, hi


# ---- page ----------------------------------------------------------------------------------

_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def safe_href(path: str) -> str | None:
    """A relative link into the run directory, or None for anything that would leave it
    (a URL with a scheme, ``//host``, an absolute path)."""
    p = str(path).replace("\\", "/")
    if not p or _SCHEME_RE.match(p) or p.startswith("/"):
        return None
    return urllib.parse.quote(p, safe="/._-~")


def choose_iterations(summary: Summary, limit: int = 5) -> list[int | str]:
    """Which iterations get a timeline picture: failed first, then lab errors, else the
    first iteration that ran (so a green run still shows what happened)."""
    failed = [r.key for r in summary.results if r.status == Status.FAILED]
    errors = [r.key for r in summary.results if r.status == Status.ERROR]
    chosen = (failed + errors)[:limit]
    if not chosen:
        ran = [r.key for r in summary.results if r.status in (Status.PASSED, Status.FAILED,
                                                                Status.ERROR)]
        chosen = ran[:1]
    return chosen


@dataclass
class ViolationRow:
    anchor: str
    number: int
    violation: Violation
    events: list[str]


def _violation_rows(r: IterationResult, t0: int) -> list[ViolationRow]:
    rows = []
    for n, v in enumerate(r.violations):
        evs = [f"{_fmt_ms(e.t_host_ns - t0)} {e.source} {e.kind} #{e.seq}"
               + (f": {e.summary}" if e.summary else "") for e in v.events]
        rows.append(ViolationRow(f"v-{r.key}-{n}", n + 1, v, evs))
    return rows


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt_value"] = fmt_value
    env.filters["fmt_params"] = fmt_params
    env.filters["href"] = safe_href
    env.filters["num"] = lambda v: f"{v:.1f}"
    return env


def render_report(summary: Summary, timelines: Mapping[int | str, Sequence[Event]], *,
                  headers: Mapping[int | str, Mapping[str, Any]] | None = None,
                  run_artifacts: Sequence[str] = (), notes: Mapping[int | str, Sequence[str]]
                  | None = None, generated_at: str | None = None) -> str:
    """The page as a string. ``timelines`` maps a result's key (its index, or
    ``"4.2"`` for a replay attempt) to its events; only those
    iterations get a picture (use ``choose_iterations``). ``run_artifacts`` are paths
    relative to the run directory to link to."""
    headers = headers or {}
    bound = summary.run.alignment_bound_ns
    if bound is None:
        for h in headers.values():
            bound = alignment_bound_ns(h)
            if bound is not None:
                break
    pictures = []
    for idx, events in timelines.items():
        r = summary.result(idx)
        b = alignment_bound_ns(headers.get(idx, {})) or bound
        view = layout_timeline(r, list(events), bound_ns=b)
        view.notes.extend((notes or {}).get(idx, ()))
        views = [view]
        win = violation_window(r, list(events))
        if win is not None:
            views.append(layout_timeline(r, list(events), bound_ns=b, window=win))
        pictures.append({"result": r, "view": view, "views": views,
                         "violations": _violation_rows(r, view.t0_ns),
                         "params": fmt_params(r.parameters),
                         "artifacts": _artifact_links(r)})
    rows = []
    for r in summary.results:
        sigs = sorted({str(v.signature) for v in r.violations})
        dur = iteration_duration_s(r)
        rows.append({"r": r, "params": fmt_params(r.parameters), "signatures": sigs,
                     "measured": ", ".join(f"{k} {v:g}" for k, v in sorted(r.measurements.items())),
                     "duration": f"{dur:.2f} s" if dur is not None else "",
                     "has_picture": r.key in timelines,
                     "note": r.error or (r.stopped_at if r.status == Status.SKIPPED else "")
                     or "", "artifacts": _artifact_links(r)})
    run = summary.run
    duration = _run_duration(run.started_at, run.ended_at)
    ctx = {
        "s": summary, "run": run, "status": summary.status.value,
        "bound": f"±{bound / 1e6:.2f} ms" if bound is not None else "not stated",
        "duration": duration,
        "started": _fmt_time(run.started_at),
        "pictures": pictures, "rows": rows,
        "signatures": [{"s": s, "rate": fmt_rate(s.count, s.ran), "pct": 100 * s.rate}
                       for s in summary.signatures],
        "by_parameter": {k: [{"g": g, "value": fmt_value(g.values[k]),
                              "rate": fmt_rate(g.failed, g.ran), "pct": 100 * g.failure_rate,
                              "measured": [(m, fmt_measurement(g.measurements.get(m)))
                                           for m in _measured(v)]}
                             for g in v] for k, v in summary.by_parameter.items()},
        "measured_names": {k: _measured(v) for k, v in summary.by_parameter.items()},
        "run_artifacts": [(a, safe_href(a)) for a in run_artifacts if safe_href(a)],
        "versions": sorted(run.versions.items()),
        "generated_at": generated_at or datetime.now(timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S UTC"),
        "rebalab_version": __version__,
        "counts": summary.counts,
    }
    return _env().get_template("report.html.j2").render(**ctx)


def _measured(groups: Sequence[GroupStats]) -> list[str]:
    return sorted({m for g in groups for m in g.measurements})


def _artifact_links(r: IterationResult) -> list[tuple[str, str]]:
    out = [(f"iterations/{r.key}/", f"iterations/{r.key}/")]
    for name, rel in sorted(r.artifacts.items()):
        h = safe_href(rel)
        if h:
            out.append((name, h))
    return out


def _fmt_time(iso: str | None) -> str:
    """``2024-11-22 05:40:00 UTC`` from an ISO 8601 string (as is when unparsable)."""
    if not iso:
        return ""
    try:
        t = datetime.fromisoformat(iso)
    except ValueError:
        return iso
    if t.tzinfo is not None:
        return t.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return t.strftime("%Y-%m-%d %H:%M:%S")


def _run_duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return ""
    try:
        secs = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except ValueError:
        return ""
    return f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.1f} min"


def timeline_path(run_dir: Path, r: IterationResult) -> Path:
    """Where an iteration's timeline is: its ``timeline`` artifact, else the convention
    ``iterations/<k>/timeline.jsonl``."""
    rel = r.artifacts.get("timeline")
    if rel and safe_href(rel):
        return run_dir / rel
    return run_dir / "iterations" / str(r.key) / "timeline.jsonl"


def write_report(run_dir: str | Path, summary: Summary | None = None, *,
                 max_timelines: int = 5, path: str | Path | None = None) -> Path:
    """Render ``report.html`` into ``run_dir`` from ``summary.json`` and the timelines."""
    rd = Path(run_dir)
    summary = summary or load_summary(rd)
    timelines: dict[int | str, Sequence[Event]] = {}
    headers: dict[int | str, Mapping[str, Any]] = {}
    notes: dict[int | str, list[str]] = {}
    for idx in choose_iterations(summary, max_timelines):
        r = summary.result(idx)
        tp = timeline_path(rd, r)
        if tp.is_file():
            tl = read_timeline(tp)
            timelines[idx], headers[idx] = tl.events, tl.header
            if tl.bad_lines:
                notes[idx] = [f"{tl.bad_lines} unreadable line(s) in {tp.name} were skipped"]
        else:
            timelines[idx] = ()
            notes[idx] = [f"no timeline file ({tp.relative_to(rd)}); showing step timings only"]
    present = [a for a in RUN_ARTIFACTS if (rd / a).exists()] + \
        [a for a in ("iterations/",) if (rd / "iterations").is_dir()]
    html = render_report(summary, timelines, headers=headers, run_artifacts=present,
                         notes=notes)
    out = Path(path) if path is not None else rd / REPORT_FILE
    from lab.atomic import atomic_write
    return atomic_write(out, html)
