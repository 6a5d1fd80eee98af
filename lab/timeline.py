"""One ordered, clock-aligned, identity-resolved view of everything a run observed.

Tracers hand over ``Event`` lists per source; ``Timeline.build`` merges them:

1. Guest events carrying their own clock (``t_guest_ns``) get ``t_host_ns`` from the
   clock ``Alignment``; the host receive time they arrived with is kept in
   ``data["t_recv_ns"]`` so a reader can see how late a line reached the host. With
   no alignment they keep the receive time, and the header says the clock is unknown.
2. Device identities are completed from the lab's table (QOM id <-> guest BDF <->
   Windows instance id), so a rule asking about ``snd0`` sees the guest's
   ``0000:01:00.0`` probe and the Windows ``PCI\\VEN_...`` IRPs as the same device.
   Bindings may be limited in time because a BDF is reused after unplug/replug.
3. Events are ordered by (time, source priority, original order) - a stable order,
   so re-building from the same inputs gives the same ``seq`` numbers, which the
   violations and reports cite.

The file form (``timeline.jsonl``) is a header line followed by one event per line,
readable with ``jq`` and nothing else; ``read`` tolerates the torn last line an
interrupted run leaves behind and says so (``truncated``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, overload

from lab.clock import Alignment
from lab.errors import LabError
from lab.events import DeviceId, Event, Kind, Source

FORMAT_VERSION = 1

#: order of sources for events with the same timestamp: cause before effect - the
#: lab's request, QEMU's answer, the hardware's view, then the guest's reaction.
SOURCE_PRIORITY: Mapping[Source, int] = {
    Source.HOST_LAB: 0, Source.HOST_QMP: 1, Source.HOST_TRACE: 2,
    Source.GUEST_KERNEL: 3, Source.GUEST_KPROBE: 4, Source.GUEST_UEVENT: 5,
    Source.GUEST_PNP: 6, Source.GUEST_ETW: 7, Source.GUEST_WPP: 8,
    Source.GUEST_SETUPAPI: 9, Source.HOST_AUDIO: 10,
}

#: the largest timeline.jsonl ``read`` takes
MAX_TIMELINE_BYTES = 2 * 1024 * 1024 * 1024

#: keys in ``Event.data`` the timeline itself writes
RECV_KEY = "t_recv_ns"

_SHORT_BDF = re.compile(r"^[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


class TimelineFormatError(LabError):
    """A timeline file is unreadable beyond a torn last line."""


# ---- device identity ---------------------------------------------------------------

def normalize_bdf(bdf: str | None) -> str | None:
    """``01:00.0`` (QEMU's view) and ``0000:01:00.0`` (the guest's) are one address."""
    if bdf is None:
        return None
    b = bdf.strip().lower()
    return "0000:" + b if _SHORT_BDF.match(b) else b


def _norm(dev: DeviceId) -> tuple[str | None, str | None, str | None]:
    return (dev.qom, normalize_bdf(dev.bdf),
            dev.instance.upper() if dev.instance else None)


def device_matches(dev: DeviceId | None, query: DeviceId | str | None) -> bool:
    """Does ``dev`` answer to ``query``? A string matches any of the three names;
    BDFs compare with or without the PCI domain, instance ids without case."""
    if query is None:
        return True
    if dev is None:
        return False
    q, b, i = _norm(dev)
    if isinstance(query, str):
        return query in (q, b, i) or normalize_bdf(query) == b or query.upper() == i
    qq, qb, qi = _norm(query)
    return any(x is not None and x == y for x, y in ((q, qq), (b, qb), (i, qi)))


def device_label(dev: DeviceId | None) -> str:
    return dev.label() if dev is not None else "-"


@dataclass(frozen=True)
class DeviceBinding:
    """One device's full identity, valid for host times ``[since_ns, until_ns)``."""

    device: DeviceId
    since_ns: int | None = None
    until_ns: int | None = None

    def active(self, t_ns: int) -> bool:
        return ((self.since_ns is None or t_ns >= self.since_ns)
                and (self.until_ns is None or t_ns < self.until_ns))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: v for k, v in (("qom", self.device.qom),
                                               ("bdf", self.device.bdf),
                                               ("instance", self.device.instance)) if v}
        if self.since_ns is not None:
            d["since_ns"] = self.since_ns
        if self.until_ns is not None:
            d["until_ns"] = self.until_ns
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DeviceBinding:
        return cls(DeviceId(qom=d.get("qom"), bdf=d.get("bdf"), instance=d.get("instance")),
                   since_ns=d.get("since_ns"), until_ns=d.get("until_ns"))


@dataclass(frozen=True)
class DeviceTable:
    """The lab's mapping between the names each side gives a device."""

    bindings: tuple[DeviceBinding, ...] = ()

    @classmethod
    def of(cls, items: DeviceTable | Iterable[DeviceId | DeviceBinding] | None) -> DeviceTable:
        if items is None:
            return cls()
        if isinstance(items, DeviceTable):
            return items
        return cls(tuple(b if isinstance(b, DeviceBinding) else DeviceBinding(b) for b in items))

    def resolve(self, dev: DeviceId | None, t_ns: int) -> DeviceId | None:
        """The full identity for ``dev`` at ``t_ns``; ``dev`` itself when unknown.

        When several bindings match (a BDF reused by another device), the one matched
        by the most specific name wins: QOM id, then instance id, then BDF.
        """
        if dev is None or not self.bindings:
            return dev
        q, b, i = _norm(dev)
        best: tuple[int, DeviceBinding] | None = None
        for bind in self.bindings:
            if not bind.active(t_ns):
                continue
            bq, bb, bi = _norm(bind.device)
            rank = (3 if q is not None and q == bq else 2 if i is not None and i == bi
                    else 1 if b is not None and b == bb else 0)
            if rank and (best is None or rank > best[0]):
                best = (rank, bind)
        if best is None:
            return dev
        full = best[1].device
        return DeviceId(qom=full.qom or dev.qom, bdf=full.bdf or dev.bdf,
                        instance=full.instance or dev.instance)


# ---- spans ------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """An enter/exit pair (probe, remove, a PnP handler). Either side may be missing:
    an enter with no exit is a handler that never returned (or a run cut off)."""

    enter: Event | None
    exit: Event | None

    @property
    def complete(self) -> bool:
        return self.enter is not None and self.exit is not None

    @property
    def start_ns(self) -> int:
        ev = self.enter or self.exit
        assert ev is not None
        return ev.t_host_ns

    @property
    def end_ns(self) -> int | None:
        return self.exit.t_host_ns if self.exit is not None else None

    @property
    def duration_ns(self) -> int | None:
        """Measured by the clock that stamped both ends when there is one: no alignment
        error, and it is the time the driver lived through (under ``--record`` the
        guest clock counts instructions, and a msleep(4000) in remove() passed in about
        a second of host time while the guest idled). Otherwise on the host clock."""
        if self.enter is not None and self.exit is not None:
            g_in, g_out = self.enter.t_guest_ns, self.exit.t_guest_ns
            if g_in is not None and g_out is not None and self.enter.source == self.exit.source:
                return g_out - g_in
            return self.exit.t_host_ns - self.enter.t_host_ns
        if self.exit is not None and self.exit.duration_ns is not None:
            return self.exit.duration_ns
        return None

    @property
    def device(self) -> DeviceId | None:
        ev = self.enter or self.exit
        return ev.device if ev is not None else None


def default_span_key(ev: Event) -> tuple[Any, ...]:
    """Pair enters and exits of the same function in the same task for one device.

    A kretprobe reports its exit from the task that entered, so the pid (or tid) is
    the right key when present; the CPU only when nothing better exists, since a
    sleeping probe may resume elsewhere.
    """
    d = ev.data
    task = d.get("pid", d.get("tid", d.get("cpu")))
    return (device_label(ev.device), d.get("func") or d.get("function"), task)


# ---- the timeline ------------------------------------------------------------------

KindsArg = Kind | str | Iterable[Kind | str] | None
SourcesArg = Source | str | Iterable[Source | str] | None


def _kinds(k: KindsArg) -> frozenset[Kind] | None:
    if k is None:
        return None
    if isinstance(k, (Kind, str)):
        return frozenset({Kind(k)})
    return frozenset(Kind(x) for x in k)


def _sources(s: SourcesArg) -> frozenset[Source] | None:
    if s is None:
        return None
    if isinstance(s, (Source, str)):
        return frozenset({Source(s)})
    return frozenset(Source(x) for x in s)


class Timeline:
    """An immutable, ordered event sequence with its clock alignment and devices.

    ``seq`` numbers start at 1 (0 stays "not in a timeline") and follow the order.
    """

    __slots__ = ("events", "alignment", "devices", "truncated", "meta", "_by_seq")

    def __init__(self, events: Sequence[Event], *, alignment: Alignment | None = None,
                 devices: DeviceTable | Iterable[DeviceId | DeviceBinding] | None = None,
                 truncated: bool = False, meta: Mapping[str, Any] | None = None) -> None:
        self.events: tuple[Event, ...] = tuple(events)
        self.alignment: Alignment = alignment or Alignment.unknown()
        self.devices: DeviceTable = DeviceTable.of(devices)
        self.truncated = truncated
        self.meta: Mapping[str, Any] = dict(meta or {})
        self._by_seq = {e.seq: e for e in self.events}

    # ---- building ---------------------------------------------------------------
    @classmethod
    def build(cls, sources: Iterable[Event] | Mapping[Any, Iterable[Event]], *,
              alignment: Alignment | None = None,
              source_alignment: Mapping[Source, Alignment] | None = None,
              devices: DeviceTable | Iterable[DeviceId | DeviceBinding] | None = None,
              priority: Mapping[Source, int] | None = None,
              meta: Mapping[str, Any] | None = None) -> Timeline:
        """Merge, align, resolve and order. ``sources`` is one iterable or a mapping
        of name -> iterable (the names are only for the caller's convenience).

        ``source_alignment`` overrides the alignment for sources on another guest
        clock (e.g. Windows ETW on QPC while the kernel log is on the Linux clock).
        """
        if isinstance(sources, Mapping):
            raw: list[Event] = [e for evs in sources.values() for e in evs]
        else:
            raw = list(sources)
        align = alignment or Alignment.unknown()
        table = DeviceTable.of(devices)
        prio = priority or SOURCE_PRIORITY
        staged: list[tuple[int, int, int, Event]] = []
        for idx, ev in enumerate(raw):
            ev = _align_event(ev, (source_alignment or {}).get(ev.source, align))
            dev = table.resolve(ev.device, ev.t_host_ns)
            if dev is not ev.device:
                ev = replace(ev, device=dev)
            staged.append((ev.t_host_ns, prio.get(ev.source, 50), idx, ev))
        staged.sort(key=lambda t: t[:3])
        events = [replace(ev, seq=n) for n, (_, _, _, ev) in enumerate(staged, start=1)]
        return cls(events, alignment=align, devices=table, meta=meta)

    # ---- sequence protocol --------------------------------------------------------
    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    @overload
    def __getitem__(self, i: int) -> Event: ...

    @overload
    def __getitem__(self, i: slice) -> tuple[Event, ...]: ...

    def __getitem__(self, i: int | slice) -> Event | tuple[Event, ...]:
        return self.events[i]

    def by_seq(self, seq: int) -> Event:
        return self._by_seq[seq]

    @property
    def t0_ns(self) -> int | None:
        return self.events[0].t_host_ns if self.events else None

    @property
    def t_end_ns(self) -> int | None:
        return self.events[-1].t_host_ns if self.events else None

    @property
    def bound_ns(self) -> int | None:
        return self.alignment.bound_ns

    def source_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.events:
            out[e.source.value] = out.get(e.source.value, 0) + 1
        return dict(sorted(out.items()))

    def device_ids(self) -> tuple[DeviceId, ...]:
        """Every distinct device: the table's, then others seen in events."""
        seen: dict[tuple[str | None, str | None, str | None], DeviceId] = {}
        for b in self.devices.bindings:
            seen.setdefault(_norm(b.device), b.device)
        for e in self.events:
            if e.device is not None:
                seen.setdefault(_norm(e.device), e.device)
        return tuple(seen.values())

    # ---- queries --------------------------------------------------------------------
    def select(self, *, kinds: KindsArg = None, device: DeviceId | str | None = None,
               sources: SourcesArg = None, start_ns: int | None = None,
               end_ns: int | None = None, after: Event | None = None,
               where: Callable[[Event], bool] | None = None) -> list[Event]:
        """Events matching every given filter, in timeline order.

        ``start_ns`` is inclusive, ``end_ns`` exclusive; ``after`` keeps events later
        in the sequence than that event (exact even at equal timestamps).
        """
        ks, ss = _kinds(kinds), _sources(sources)
        out = []
        for e in self.events:
            if ks is not None and e.kind not in ks:
                continue
            if ss is not None and e.source not in ss:
                continue
            if start_ns is not None and e.t_host_ns < start_ns:
                continue
            if end_ns is not None and e.t_host_ns >= end_ns:
                continue
            if after is not None and e.seq <= after.seq:
                continue
            if device is not None and not device_matches(e.device, device):
                continue
            if where is not None and not where(e):
                continue
            out.append(e)
        return out

    def first(self, kind: KindsArg = None, device: DeviceId | str | None = None, *,
              after: Event | int | None = None, before: Event | int | None = None,
              sources: SourcesArg = None,
              where: Callable[[Event], bool] | None = None) -> Event | None:
        """The first matching event; ``after``/``before`` take an event (sequence
        order) or a host time in ns (inclusive after, exclusive before)."""
        for e in self._iter_window(kind, device, after, before, sources, where):
            return e
        return None

    def last(self, kind: KindsArg = None, device: DeviceId | str | None = None, *,
             after: Event | int | None = None, before: Event | int | None = None,
             sources: SourcesArg = None,
             where: Callable[[Event], bool] | None = None) -> Event | None:
        found = None
        for e in self._iter_window(kind, device, after, before, sources, where):
            found = e
        return found

    def _iter_window(self, kind: KindsArg, device: DeviceId | str | None,
                     after: Event | int | None, before: Event | int | None,
                     sources: SourcesArg, where: Callable[[Event], bool] | None,
                     ) -> Iterator[Event]:
        ks, ss = _kinds(kind), _sources(sources)
        for e in self.events:
            if isinstance(after, Event):
                if e.seq <= after.seq:
                    continue
            elif after is not None and e.t_host_ns < after:
                continue
            if isinstance(before, Event):
                if e.seq >= before.seq:
                    break
            elif before is not None and e.t_host_ns >= before:
                break
            if ks is not None and e.kind not in ks:
                continue
            if ss is not None and e.source not in ss:
                continue
            if device is not None and not device_matches(e.device, device):
                continue
            if where is not None and not where(e):
                continue
            yield e

    def spans(self, enter: Kind, exit: Kind, *, device: DeviceId | str | None = None,
              key: Callable[[Event], Any] = default_span_key,
              start_ns: int | None = None, end_ns: int | None = None) -> list[Span]:
        """Pair enter/exit events into spans, ordered by start.

        Pairs are matched per ``key`` (device, function, task by default) and nest
        LIFO, so a recursive or re-entered handler pairs correctly. Unmatched exits
        become spans without an enter; unmatched enters, spans without an exit.
        """
        stacks: dict[Any, list[Event]] = {}
        out: list[Span] = []
        for e in self.select(kinds=(enter, exit), device=device, start_ns=start_ns,
                             end_ns=end_ns):
            k = key(e)
            if e.kind == enter:
                stacks.setdefault(k, []).append(e)
            else:
                stack = stacks.get(k)
                if stack:
                    out.append(Span(stack.pop(), e))
                else:
                    out.append(Span(None, e))
        for stack in stacks.values():
            out.extend(Span(e, None) for e in stack)
        out.sort(key=lambda s: (s.start_ns, (s.enter or s.exit).seq))  # type: ignore[union-attr]
        return out

    # ---- files ------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {
            "type": "header", "version": FORMAT_VERSION,
            "alignment": self.alignment.to_json(), "bound_ns": self.alignment.bound_ns,
            "sources": self.source_counts(),
            "devices": [b.to_json() for b in self.devices.bindings],
            "count": len(self.events), "t0_ns": self.t0_ns, "t_end_ns": self.t_end_ns,
            "meta": dict(self.meta),
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write ``timeline.jsonl`` atomically (a reader never sees half a file)."""
        from lab.atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.header(), sort_keys=True, default=str) + "\n")
            for e in self.events:
                f.write(e.dumps() + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Timeline:
        """Read a timeline file. A torn or missing tail (interrupted run) sets
        ``truncated``; damage anywhere else raises ``TimelineFormatError``."""
        from lab.inputs import read_bytes
        from vdevice.errors import SpecError

        p = Path(path)
        try:
            # regular files only, capped: a timeline may come from someone else's run
            text = read_bytes(p, "timeline", MAX_TIMELINE_BYTES).decode("utf-8", "replace")
        except SpecError as exc:
            raise TimelineFormatError(f"cannot read timeline {p}: {exc.bare_message}") from None
        lines = text.split("\n")
        torn = bool(lines) and lines[-1] != ""
        if lines and lines[-1] == "":
            lines.pop()
        header: dict[str, Any] | None = None
        events: list[Event] = []
        truncated = False
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            is_last = n == len(lines)
            try:
                obj = json.loads(line)
                if n == 1 and isinstance(obj, dict) and obj.get("type") == "header":
                    header = obj
                    continue
                events.append(Event.from_json(obj))
            except (ValueError, KeyError, TypeError) as exc:
                if is_last and torn:
                    truncated = True
                    break
                raise TimelineFormatError(f"{p}:{n}: not a timeline record ({exc})") from exc
        if header is not None:
            if int(header.get("version", FORMAT_VERSION)) > FORMAT_VERSION:
                raise TimelineFormatError(
                    f"{p}: timeline format version {header.get('version')} is newer than "
                    f"this rebalab understands ({FORMAT_VERSION}); upgrade rebalab")
            if header.get("count") is not None and int(header["count"]) != len(events):
                truncated = True
        return cls(events,
                   alignment=Alignment.from_json(header.get("alignment") if header else None),
                   devices=[DeviceBinding.from_json(d) for d in (header or {}).get("devices", ())],
                   truncated=truncated, meta=(header or {}).get("meta") or {})


def _align_event(ev: Event, alignment: Alignment) -> Event:
    if ev.t_guest_ns is None or not alignment.known:
        return ev
    data = dict(ev.data)
    data.setdefault(RECV_KEY, ev.t_host_ns)
    return replace(ev, t_host_ns=alignment.to_host(ev.t_guest_ns), data=data)


# ---- text view ----------------------------------------------------------------------

ROW_COLUMNS: tuple[str, ...] = ("seq", "t_ms", "time", "source", "device", "kind",
                                "duration", "detail")

_DETAIL_KEYS = ("name", "phase", "func", "function", "irp", "callback", "status", "ret",
                "code", "problem", "resources", "event", "trace", "action", "cause",
                "frames", "jump", "ms", "title", "exit_status", "inf")
_TEXT_KEYS = ("message", "line", "text", "msg")
_SKIP_KEYS = {RECV_KEY, "raw", "lines", "pid", "tid", "cpu", "qemu_name", "args"}


def summarize(ev: Event, width: int = 96) -> str:
    """A short human description of an event, for text views and EventRefs."""
    d = ev.data
    parts = [f"{k}={_short(d[k])}" for k in _DETAIL_KEYS if d.get(k) not in (None, "", [], {})]
    if isinstance(d.get("addr"), int):
        size = d.get("size")
        parts.append(f"bar{d.get('bar', '')}={d['addr']:#x}"
                     + (f"+{size:#x}" if isinstance(size, int) else ""))
    text = next((d[k].strip() for k in _TEXT_KEYS if isinstance(d.get(k), str) and d[k]), None)
    if not parts and text is None:
        parts = [f"{k}={_short(v)}" for k, v in d.items()
                 if k not in _SKIP_KEYS and k not in ("addr", "size", "bar")][:3]
    s = " ".join(parts + ([text] if text else []))
    return s if len(s) <= width else s[: width - 1] + "…"


def _short(v: Any) -> str:
    if isinstance(v, (dict, list, tuple)):
        s = json.dumps(v, default=str, separators=(",", ":"))
    else:
        s = str(v)
    return s if len(s) <= 40 else s[:39] + "…"


def _fmt_time(t_ns: int, tz: timezone) -> str:
    dt = datetime.fromtimestamp(t_ns // 1_000_000_000, tz)
    return f"{dt:%H:%M:%S}.{(t_ns % 1_000_000_000) // 1000:06d}"


def _fmt_duration(ns: int | None) -> str:
    if ns is None:
        return ""
    if ns < 1_000_000:
        return f"{ns / 1000:.1f}us"
    if ns < 10_000_000_000:
        return f"{ns / 1e6:.3f}ms"
    return f"{ns / 1e9:.3f}s"


def rows(timeline: Timeline, *, origin_ns: int | None = None,
         device: DeviceId | str | None = None, sources: SourcesArg = None,
         kinds: KindsArg = None, start_ns: int | None = None, end_ns: int | None = None,
         tz: timezone = timezone.utc, width: int = 96) -> list[tuple[str, ...]]:
    """The text view as rows of strings (columns: ``ROW_COLUMNS``), for rich tables.

    Relative time is ms from ``origin_ns`` (default: the first event of the whole
    timeline, so filtered views keep the same clock).
    """
    origin = origin_ns if origin_ns is not None else (timeline.t0_ns or 0)
    out: list[tuple[str, ...]] = []
    for e in timeline.select(kinds=kinds, device=device, sources=sources,
                             start_ns=start_ns, end_ns=end_ns):
        rel = (e.t_host_ns - origin) / 1e6
        out.append((str(e.seq), f"{rel:+.3f}", _fmt_time(e.t_host_ns, tz), e.source.value,
                    device_label(e.device), e.kind.value, _fmt_duration(e.duration_ns),
                    summarize(e, width)))
    return out


def render_text(timeline: Timeline, *, origin_ns: int | None = None,
                device: DeviceId | str | None = None, sources: SourcesArg = None,
                kinds: KindsArg = None, start_ns: int | None = None,
                end_ns: int | None = None, tz: timezone = timezone.utc,
                width: int = 96) -> str:
    """A plain-text timeline: one line per event, host and guest interleaved."""
    body = rows(timeline, origin_ns=origin_ns, device=device, sources=sources, kinds=kinds,
                start_ns=start_ns, end_ns=end_ns, tz=tz, width=width)
    a = timeline.alignment
    if a.known:
        clock = (f"guest clock aligned by {a.method}: bound "
                 + (f"±{a.bound_ns / 1e6:.3f} ms" if a.bound_ns is not None else "unknown")
                 + ("" if a.guaranteed or a.bound_ns is None else " (not guaranteed)"))
    else:
        clock = "guest clock NOT aligned: guest events at host receive time"
    t0 = origin_ns if origin_ns is not None else timeline.t0_ns
    when = (datetime.fromtimestamp(t0 / 1e9, tz).strftime("%Y-%m-%d %H:%M:%S %Z")
            if t0 is not None else "-")
    head = [f"# {len(body)} of {len(timeline)} events; t=0 at {when}; {clock}"
            + ("; TRUNCATED" if timeline.truncated else "")]
    if not body:
        return "\n".join(head) + "\n"
    widths = [max(len(r[i]) for r in body) for i in range(len(ROW_COLUMNS) - 1)]
    lines = head
    for r in body:
        cells = [r[i].rjust(widths[i]) if i in (0, 1) else r[i].ljust(widths[i])
                 for i in range(len(ROW_COLUMNS) - 1)]
        lines.append("  ".join(cells) + "  " + r[-1])
    return "\n".join(lines) + "\n"
