"""What a rule is, what it is told, and how all of them are run.

A rule reads a ``Timeline`` (recorded events only: a run can be re-checked from its
directory) and a ``RuleContext`` (limits, devices under test, the lab's operations
as phases) and returns ``Violation`` values. A rule *family* (Windows PnP, Linux
driver model, kernel oops) produces several check ids, e.g. ``pnp.stop-failed``;
the check id is what a ``Violation`` carries and what users select or disable, and
``(check id, device, phase)`` is the failure's signature, so the same bug found in
two iterations is counted once.

Phases come from the lab's ``Kind.OPERATION`` events (data ``name`` and optional
``phase``; ``duration_ns`` gives the span): a violation inside ``rebalance``'s
``rescan`` step is signed ``rebalance:rescan``, one after the operation ended
``after:rebalance``, one before any operation ``setup``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lab.errors import ConfigError
from lab.events import DeviceId, Event, Kind
from lab.results import EventRef, Violation
from lab.timeline import Timeline, device_label, device_matches, summarize

GUEST = "guest"


@dataclass(frozen=True)
class Limits:
    """Timing limits, in ms. Defaults are deliberately loose for TCG; scenarios tighten.

    PortCls calls ``PnpQueryStop``/``PnpCancelStop`` holding the device global lock
    (it blocks every create meanwhile), so those handlers must be quick.
    """

    query_stop_max_ms: float = 100.0
    cancel_stop_max_ms: float = 100.0
    unbound_decode_max_ms: float = 500.0
    remove_max_ms: float = 2000.0
    audio_max_gap_ms: float = 20.0
    audio_max_discontinuities: float = 0.0
    audio_max_outage_ms: float | None = None     # None: the outage is measured, not judged

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> Limits:
        if not d:
            return cls()
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown rule limit(s) {', '.join(unknown)}; "
                              f"known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {k: (None if v is None else float(v)) for k, v in d.items()}
        return cls(**values)


@dataclass(frozen=True)
class Phase:
    """A lab operation (or one step of it) and the host time span it covered."""

    name: str
    start_ns: int
    end_ns: int | None = None        # None: lasted until the end of the run

    def contains(self, t_ns: int) -> bool:
        return t_ns >= self.start_ns and (self.end_ns is None or t_ns <= self.end_ns)

    @property
    def operation(self) -> str:
        return self.name.split(":", 1)[0]


@dataclass(frozen=True)
class RuleContext:
    """What the rules need beyond the events.

    ``devices``: devices under test (empty: every device with evidence).
    ``drivers``: driver or module name -> device label, to attribute kernel reports
    and driver-level events (``snd_hda_intel`` -> ``snd0``).
    ``complete``: False when the run was cut off; handlers still open at the end are
    then reported as ``*-incomplete`` instead of hung.
    ``bound_at_start``: labels of devices whose driver was bound before tracing began;
    None when the lab does not know (then a first remove is not held against it).
    """

    limits: Limits = field(default_factory=Limits)
    devices: tuple[DeviceId, ...] = ()
    drivers: Mapping[str, str] = field(default_factory=dict)
    phases: tuple[Phase, ...] = ()
    complete: bool = True
    end_ns: int | None = None
    bound_at_start: frozenset[str] | None = None
    allowed_problem_codes: frozenset[int] = frozenset()
    alignment_bound_ns: int | None = None
    disabled: frozenset[str] = frozenset()

    @classmethod
    def from_timeline(cls, timeline: Timeline, **kw: Any) -> RuleContext:
        """A context whose phases, completeness and clock bound come from the timeline
        (explicit keyword arguments win)."""
        kw.setdefault("phases", phases_from_timeline(timeline))
        kw.setdefault("complete", not timeline.truncated)
        kw.setdefault("alignment_bound_ns", timeline.alignment.bound_ns)
        return cls(**kw)

    def recorded(self) -> dict[str, Any]:
        """What a re-check needs beyond the timeline (phases, completeness and the clock
        bound come from the timeline itself): written next to each iteration's timeline
        so ``rebalab inspect RUN_DIR`` judges it exactly as the run did."""
        return {"devices": [{k: v for k, v in (("qom", d.qom), ("bdf", d.bdf),
                                               ("instance", d.instance)) if v}
                            for d in self.devices],
                "drivers": dict(self.drivers),
                "limits": {k: getattr(self.limits, k) for k in Limits.__dataclass_fields__},
                "bound_at_start": (sorted(self.bound_at_start)
                                   if self.bound_at_start is not None else None),
                "allowed_problem_codes": sorted(self.allowed_problem_codes),
                "disabled": sorted(self.disabled)}

    @classmethod
    def from_recorded(cls, timeline: Timeline, d: Mapping[str, Any]) -> RuleContext:
        """The inverse of ``recorded`` (a ``ConfigError`` names a malformed field)."""
        try:
            devices = tuple(DeviceId(qom=x.get("qom"), bdf=x.get("bdf"), instance=x.get("instance"))
                            for x in d.get("devices") or ())
            bas = d.get("bound_at_start")
            return cls.from_timeline(
                timeline, devices=devices,
                drivers={str(k): str(v) for k, v in (d.get("drivers") or {}).items()},
                limits=Limits.from_mapping(d.get("limits")),
                bound_at_start=frozenset(str(x) for x in bas) if bas is not None else None,
                allowed_problem_codes=frozenset(int(x) for x in d.get("allowed_problem_codes") or ()),
                disabled=frozenset(str(x) for x in d.get("disabled") or ()))
        except (AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"recorded rule context is malformed ({type(exc).__name__})") from None

    def phase_at(self, t_ns: int) -> str:
        """The innermost phase containing ``t_ns``; ``after:<op>`` past the last one
        that ended before it; ``setup`` before any."""
        inside = [p for p in self.phases if p.contains(t_ns)]
        if inside:
            return max(inside, key=lambda p: (p.start_ns, p.name.count(":"))).name
        before = [p for p in self.phases if p.end_ns is not None and p.end_ns < t_ns]
        if before:
            return "after:" + max(before, key=lambda p: p.end_ns or 0).operation
        return "setup"

    def under_test(self, dev: DeviceId | None) -> bool:
        if not self.devices:
            return dev is not None
        return dev is not None and any(device_matches(dev, d) for d in self.devices)

    def label(self, dev: DeviceId | None) -> str:
        """The device's name in violations: the label the lab gave it, if under test."""
        if dev is None:
            return GUEST
        for d in self.devices:
            if device_matches(dev, d):
                return d.label()
        return device_label(dev)

    def driver_device(self, name: str) -> str | None:
        n = name.replace("-", "_")
        for k, v in self.drivers.items():
            if k.replace("-", "_") == n:
                return v
        return None

    def end_of(self, timeline: Timeline) -> int:
        return self.end_ns if self.end_ns is not None else (timeline.t_end_ns or 0)


def phases_from_timeline(timeline: Timeline) -> tuple[Phase, ...]:
    """Phases from ``Kind.OPERATION`` events.

    An event with ``duration_ns`` is a span. One without is a marker that lasts until
    the next marker of the same operation (or the end): ``data["edge"] == "end"``
    closes the operation's open marker instead.
    """
    out: list[Phase] = []
    open_: dict[str, tuple[str, int]] = {}
    for ev in timeline.select(kinds=Kind.OPERATION):
        name = str(ev.data.get("name") or "operation")
        step = ev.data.get("phase")
        full = f"{name}:{step}" if step else name
        if ev.duration_ns is not None:
            out.append(Phase(full, ev.t_host_ns, ev.t_host_ns + ev.duration_ns))
            continue
        if name in open_:
            prev_name, prev_start = open_.pop(name)
            out.append(Phase(prev_name, prev_start, ev.t_host_ns))
        if ev.data.get("edge") != "end":
            open_[name] = (full, ev.t_host_ns)
    for full, start in open_.values():
        out.append(Phase(full, start, None))
    return tuple(sorted(out, key=lambda p: (p.start_ns, p.name)))


def ref(ev: Event) -> EventRef:
    """The pointer a violation keeps to an event."""
    return EventRef(seq=ev.seq, t_host_ns=ev.t_host_ns, kind=ev.kind.value,
                    source=ev.source.value, summary=summarize(ev, 80))


def refs(*evs: Event | None) -> tuple[EventRef, ...]:
    return tuple(ref(e) for e in evs if e is not None)


def ms(ns: int | float | None) -> str:
    return "?" if ns is None else f"{ns / 1e6:.3f} ms"


@runtime_checkable
class Rule(Protocol):
    """A rule family. ``checks`` maps every check id it can report to one line of
    explanation (shown by ``rebalab rules`` and in reports)."""

    id: str
    description: str
    checks: Mapping[str, str]

    def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]: ...


_REGISTRY: dict[str, Rule] = {}


def register(rule: Rule) -> Rule:
    """Add a rule family; ids (family and checks) must be unique across families."""
    taken = {c for r in _REGISTRY.values() for c in (r.id, *r.checks)}
    clash = taken & {rule.id, *rule.checks}
    if clash and _REGISTRY.get(rule.id) is not rule:
        raise ValueError(f"rule id(s) already registered: {', '.join(sorted(clash))}")
    _REGISTRY[rule.id] = rule
    return rule


def registered() -> tuple[Rule, ...]:
    _load_builtin()
    return tuple(_REGISTRY.values())


def known_ids() -> dict[str, str]:
    """Every family and check id with its description."""
    out: dict[str, str] = {}
    for r in registered():
        out[r.id] = r.description
        out.update(r.checks)
    return out


def _load_builtin() -> None:
    # importing the package registers the built-in families
    import lab.rules  # noqa: F401


def _selection(rule_ids: Iterable[str] | None) -> tuple[list[Rule], set[str] | None]:
    rules = list(registered())
    if rule_ids is None:
        return rules, None
    wanted: set[str] = set()
    chosen: list[Rule] = []
    ids = list(rule_ids)
    for pattern in ids:
        if not any(fnmatch.fnmatchcase(i, pattern) for r in rules for i in (r.id, *r.checks)):
            raise ConfigError(f"unknown rule {pattern!r}; known: "
                              + ", ".join(sorted(known_ids())))
    for r in rules:
        hit = False
        for pattern in ids:
            if fnmatch.fnmatchcase(r.id, pattern):
                wanted.update(r.checks)
                hit = True
            else:
                matched = {c for c in r.checks if fnmatch.fnmatchcase(c, pattern)}
                if matched:
                    wanted.update(matched)
                    hit = True
        if hit:
            chosen.append(r)
    return chosen, wanted


def selected_checks(rule_ids: Iterable[str]) -> set[str]:
    """The check ids a selection (family ids, check ids, globs) stands for."""
    _, wanted = _selection(rule_ids)
    return wanted or set()


def check_all(timeline: Timeline, context: RuleContext,
              rule_ids: Iterable[str] | None = None) -> list[Violation]:
    """Run the selected rules (all by default; ids, check ids or globs such as
    ``pnp.*``), drop ``context.disabled`` checks, order by first cited event."""
    rules, wanted = _selection(rule_ids)
    out: list[Violation] = []
    for r in rules:
        for v in r.check(timeline, context):
            if wanted is not None and v.rule not in wanted:
                continue
            if any(fnmatch.fnmatchcase(v.rule, d) for d in context.disabled):
                continue
            out.append(v)
    out.sort(key=lambda v: (v.events[0].seq if v.events else 1 << 62, v.rule, v.device))
    return out


def violation(rule: str, device: str, phase: str, message: str,
              events: Sequence[Event | None] = (), **details: Any) -> Violation:
    return Violation(rule=rule, device=device, phase=phase, message=message,
                     events=refs(*events), details=details)
