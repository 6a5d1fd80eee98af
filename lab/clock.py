"""Guest-to-host clock alignment from causality evidence.

The guest stamps its kernel events with its own clock (printk/ftrace "local" clock,
ns since boot); the host stamps with ``time.time_ns()``. To merge both into one
timeline we need ``host = f(guest)``. We never trust a single round trip: every piece
of evidence is turned into an *interval* the true mapping must pass through, and the
estimate is whatever all intervals allow (NTP/Cristian, done with a line instead of a
constant so that drift is fitted too).

Evidence (``SyncSample``), all stated as "the guest instant stamped ``g`` happened
on the host no earlier than ``not_before_ns`` and no later than ``not_after_ns``":

- two-way: the host writes a token to the guest's ttyS1 at ``h_send`` (stamped
  *before* the write), a guest loop writes ``rebalab-sync <token>`` to /dev/kmsg
  (stamped ``g``), the console line arrives on ttyS0 at ``h_recv``. So
  ``h_send <= host(g) <= h_recv``.
- one-way: any console line with a guest timestamp: ``host(g) <= h_recv`` only.
- paired: an action seen on both sides (a config write the guest logs right before
  doing it, and QEMU's ``pci_cfg_write`` trace line for it) gives one side tightly.

Model, per segment between VM pauses (see ``Pause``):
``host = guest + offset_ns + skew * (guest - ref_guest_ns)``, i.e. the offset
``o(g) = host(g) - g`` is a line in ``g``. Each sample gives
``lo_i <= o(g_i) <= hi_i``; the feasible lines form a convex polygon in
(offset, skew) space (only the convex hulls of the bound points matter). We clip a
prior box (``|skew| <= max_skew_ppm``) by every constraint and read the set of
offsets the polygon allows at both ends of the sampled guest range. The reported line
passes through the midpoints of those two ranges, which minimises the worst-case
error over the range (in the coordinates "offset at start, offset at end" the error
is an L-infinity distance, whose minimiser is the box centre). The guaranteed bound
is the largest distance from that line to any feasible line at either end; by
convexity it holds everywhere in between. Outside the sampled range it grows by at
most ``skew_err_ppm`` per ns of extrapolation (``Segment.bound_at``).

Why the bound is tight with a serial console: the interval width at one instant is
``min(return delay) + min(forward delay)``. Console lines measured 1.7-3.8 ms after
their guest stamp; the token write to ttyS1 is fast. Hundreds of samples push both
minima to their floor, so the half-width lands just under 1 ms.

Pauses (QMP ``stop``/``cont``). While the VM is stopped the guest runs nothing, so no
guest event can be stamped inside a pause. What the guest *clock* does is not assumed:
under TCG the virtual clock (and the TSC derived from it) stops; with KVM's kvmclock
QEMU also freezes the clock across stop/cont, but a raw-TSC clocksource keeps running.
So every pause starts a new segment, fitted from its own samples, and the offset jump
across the pause is only assumed to lie in ``[0, pause length]`` (clock stopped fully
.. kept running). A segment with no samples inherits its neighbour's line shifted by
half the pause with the bound widened by half the pause; a measured jump is reported
(``Segment.jump_ns``) so the behaviour can be measured rather than guessed. Samples
whose host interval overlaps a pause, or that arrive within ``pause_guard_ns`` after
one, are dropped: their guest stamp may belong to either side.

Inconsistent evidence (no line satisfies every sample: a mismatched token, an
undeclared pause, a host clock step) does not raise. The fit finds the smallest
uniform relaxation that makes the samples consistent, rejects the samples responsible
(one at a time where one suffices) and reports what it did: ``rejected`` > 0,
``guaranteed`` False, and a note naming the worst violation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lab.errors import LabError
from lab.events import Event, Kind

#: ``[   12.345678] text`` as printed on the console and by /dev/kmsg readers (us).
PRINTK_RE = re.compile(r"^\s*(?:<\d+>)?\[\s*(\d+)\.(\d{1,9})\]\s?(.*)$")
#: the line the guest sync loop writes to /dev/kmsg for each token it reads on ttyS1
SYNC_RE = re.compile(r"rebalab-sync (\S+)")
#: printk's console timestamp resolution: microseconds, truncated
PRINTK_RESOLUTION_NS = 1000

DEFAULT_MAX_SKEW_PPM = 5000.0
DEFAULT_PAUSE_GUARD_NS = 50_000_000


class AlignmentUnknown(LabError):
    """``to_host`` was asked for a mapping that no evidence supports."""


@dataclass(frozen=True)
class SyncSample:
    """One piece of evidence: guest instant ``g_ns`` happened on the host inside
    ``[not_before_ns, not_after_ns]`` (either side may be unknown).

    ``g_resolution_ns`` is how much the printed guest stamp may lag the true instant
    (printk truncates to microseconds): the lower bound must allow for it, the upper
    bound need not.
    """

    g_ns: int
    not_after_ns: int | None
    not_before_ns: int | None = None
    g_resolution_ns: int = 0
    kind: str = "one-way"
    token: str | None = None

    @classmethod
    def two_way(cls, token: str, h_send_ns: int, g_ns: int, h_recv_ns: int,
                g_resolution_ns: int = PRINTK_RESOLUTION_NS) -> SyncSample:
        return cls(g_ns=g_ns, not_after_ns=h_recv_ns, not_before_ns=h_send_ns,
                   g_resolution_ns=g_resolution_ns, kind="two-way", token=token)

    @classmethod
    def one_way(cls, g_ns: int, h_recv_ns: int,
                g_resolution_ns: int = PRINTK_RESOLUTION_NS) -> SyncSample:
        return cls(g_ns=g_ns, not_after_ns=h_recv_ns, g_resolution_ns=g_resolution_ns)

    @classmethod
    def paired(cls, g_ns: int, host_ns: int, *, guest_stamp_first: bool,
               g_resolution_ns: int = 0) -> SyncSample:
        """An action stamped in the guest and seen by QEMU at ``host_ns``.

        If the guest stamped before acting, the stamp precedes the host's view
        (``host(g) <= host_ns``); if after, it follows it (``host(g) >= host_ns``).
        """
        if guest_stamp_first:
            return cls(g_ns=g_ns, not_after_ns=host_ns, g_resolution_ns=g_resolution_ns,
                       kind="paired")
        return cls(g_ns=g_ns, not_after_ns=None, not_before_ns=host_ns,
                   g_resolution_ns=g_resolution_ns, kind="paired")

    @property
    def host_ref_ns(self) -> int:
        """Host time used to place the sample between pauses."""
        ref = self.not_after_ns if self.not_after_ns is not None else self.not_before_ns
        assert ref is not None
        return ref

    def offset_bounds(self) -> tuple[int | None, int | None]:
        """``(lo, hi)`` with ``lo <= host(g) - g <= hi``; ``None`` for an open side."""
        lo = (None if self.not_before_ns is None
              else self.not_before_ns - self.g_ns - self.g_resolution_ns)
        hi = None if self.not_after_ns is None else self.not_after_ns - self.g_ns
        return lo, hi

    def to_json(self) -> dict[str, Any]:
        return {"g_ns": self.g_ns, "not_after_ns": self.not_after_ns,
                "not_before_ns": self.not_before_ns, "g_resolution_ns": self.g_resolution_ns,
                "kind": self.kind, "token": self.token}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SyncSample:
        return cls(g_ns=int(d["g_ns"]), not_after_ns=_opt_int(d.get("not_after_ns")),
                   not_before_ns=_opt_int(d.get("not_before_ns")),
                   g_resolution_ns=int(d.get("g_resolution_ns", 0)),
                   kind=str(d.get("kind", "one-way")), token=d.get("token"))


@dataclass(frozen=True)
class Pause:
    """A host-known interval in which the VM did not run (QMP ``stop`` .. ``cont``)."""

    start_ns: int
    end_ns: int

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)


def pauses_from_events(events: Iterable[Event]) -> tuple[Pause, ...]:
    """Pair host PAUSE/RESUME events (QMP STOP/RESUME) into pauses.

    A pause still open at the end is closed at the last event seen, so the guard
    logic still drops samples taken inside it.
    """
    out: list[Pause] = []
    start: int | None = None
    last = 0
    for ev in sorted(events, key=lambda e: e.t_host_ns):
        last = max(last, ev.t_host_ns)
        if ev.kind == Kind.PAUSE and start is None:
            start = ev.t_host_ns
        elif ev.kind == Kind.RESUME and start is not None:
            out.append(Pause(start, ev.t_host_ns))
            start = None
    if start is not None:
        out.append(Pause(start, max(start, last)))
    return tuple(out)


def parse_printk(line: str) -> tuple[int, str] | None:
    """``(guest_ns, text)`` from a console/kmsg line with a printk timestamp."""
    m = PRINTK_RE.match(line)
    if not m:
        return None
    frac = m[2].ljust(9, "0")[:9]
    return int(m[1]) * 1_000_000_000 + int(frac), m[3]


def samples_from_console(lines: Iterable[tuple[int, str]], sent: Mapping[str, int],
                         *, one_way: bool = True) -> list[SyncSample]:
    """Turn ``(h_recv_ns, console line)`` pairs into samples.

    ``sent`` maps each token written to ttyS1 to the host time taken just before the
    write. Sync lines whose token is in ``sent`` become two-way samples; every other
    timestamped line becomes a one-way sample when ``one_way`` is set.
    """
    out: list[SyncSample] = []
    for h_recv, line in lines:
        parsed = parse_printk(line)
        if parsed is None:
            continue
        g, text = parsed
        m = SYNC_RE.search(text)
        if m and m[1] in sent:
            out.append(SyncSample.two_way(m[1], sent[m[1]], g, h_recv))
        elif one_way:
            out.append(SyncSample.one_way(g, h_recv))
    return out


@dataclass(frozen=True)
class Segment:
    """The mapping between two pauses: ``host = g + offset + skew*(g - ref)``.

    ``g_start_ns`` is the guest time from which this segment applies (None: from the
    beginning). ``g_lo_ns..g_hi_ns`` is the guest range the samples cover (for an
    ``inherited`` segment: its source segment's); ``bound_ns`` is guaranteed inside it,
    ``bound_at`` extends it outside.
    """

    offset_ns: int
    skew_ppm: float
    ref_guest_ns: int
    bound_ns: int | None
    n_samples: int
    method: str
    g_start_ns: int | None = None
    host_start_ns: int | None = None
    g_lo_ns: int | None = None
    g_hi_ns: int | None = None
    skew_err_ppm: float | None = None
    rejected: int = 0
    jump_ns: int | None = None
    pause_ns: int | None = None

    def to_host(self, g_ns: int) -> int:
        return g_ns + self.offset_ns + round(self.skew_ppm * 1e-6 * (g_ns - self.ref_guest_ns))

    def to_guest(self, h_ns: int) -> int:
        s = self.skew_ppm * 1e-6
        return round((h_ns - self.offset_ns + s * self.ref_guest_ns) / (1.0 + s))

    def bound_at(self, g_ns: int) -> int | None:
        """Guaranteed error at ``g_ns``: ``bound_ns`` inside the sampled range,
        growing with the skew uncertainty outside it."""
        if self.bound_ns is None:
            return None
        if self.g_lo_ns is None or self.g_hi_ns is None or self.skew_err_ppm is None:
            return self.bound_ns
        dist = max(0, self.g_lo_ns - g_ns, g_ns - self.g_hi_ns)
        return self.bound_ns + math.ceil(self.skew_err_ppm * 1e-6 * dist)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Segment:
        return cls(offset_ns=int(d["offset_ns"]), skew_ppm=float(d.get("skew_ppm", 0.0)),
                   ref_guest_ns=int(d.get("ref_guest_ns", 0)),
                   bound_ns=_opt_int(d.get("bound_ns")), n_samples=int(d.get("n_samples", 0)),
                   method=str(d.get("method", "")), g_start_ns=_opt_int(d.get("g_start_ns")),
                   host_start_ns=_opt_int(d.get("host_start_ns")),
                   g_lo_ns=_opt_int(d.get("g_lo_ns")), g_hi_ns=_opt_int(d.get("g_hi_ns")),
                   skew_err_ppm=_opt_float(d.get("skew_err_ppm")),
                   rejected=int(d.get("rejected", 0)), jump_ns=_opt_int(d.get("jump_ns")),
                   pause_ns=_opt_int(d.get("pause_ns")))


@dataclass(frozen=True)
class Alignment:
    """Guest clock -> host clock, piecewise between pauses.

    The top-level ``offset_ns``/``skew_ppm``/``ref_guest_ns``/``method`` describe the
    first segment (the whole run when there were no pauses); ``bound_ns`` is the worst
    segment's bound, ``None`` when any segment has no guaranteed bound or nothing is
    known.
    """

    segments: tuple[Segment, ...] = ()
    n_samples: int = 0
    rejected: int = 0
    notes: tuple[str, ...] = ()
    pauses: tuple[Pause, ...] = ()

    VERSION = 1

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def unknown(cls, note: str = "no clock evidence") -> Alignment:
        return cls(notes=(note,))

    @classmethod
    def fixed(cls, offset_ns: int, *, skew_ppm: float = 0.0, ref_guest_ns: int = 0,
              bound_ns: int | None = None, method: str = "fixed") -> Alignment:
        """A mapping known by other means (tests, a tracer already on host time)."""
        return cls(segments=(Segment(offset_ns, skew_ppm, ref_guest_ns, bound_ns, 0, method),))

    # ---- views ----------------------------------------------------------------------
    @property
    def known(self) -> bool:
        return bool(self.segments)

    @property
    def offset_ns(self) -> int | None:
        return self.segments[0].offset_ns if self.segments else None

    @property
    def skew_ppm(self) -> float | None:
        return self.segments[0].skew_ppm if self.segments else None

    @property
    def ref_guest_ns(self) -> int | None:
        return self.segments[0].ref_guest_ns if self.segments else None

    @property
    def method(self) -> str:
        if not self.segments:
            return "unknown"
        methods = sorted({s.method for s in self.segments})
        return methods[0] if len(methods) == 1 else "piecewise(" + ",".join(methods) + ")"

    @property
    def bound_ns(self) -> int | None:
        if not self.segments or any(s.bound_ns is None for s in self.segments):
            return None
        return max(s.bound_ns for s in self.segments if s.bound_ns is not None)

    @property
    def guaranteed(self) -> bool:
        """True when ``bound_ns`` follows from the samples alone (nothing rejected)."""
        return self.bound_ns is not None and self.rejected == 0

    def segment_for(self, g_ns: int) -> Segment:
        if not self.segments:
            raise AlignmentUnknown(
                "guest clock alignment is unknown (no sync samples); guest events keep "
                "their host receive times")
        chosen = self.segments[0]
        for seg in self.segments[1:]:
            if seg.g_start_ns is not None and g_ns >= seg.g_start_ns:
                chosen = seg
        return chosen

    def to_host(self, g_ns: int) -> int:
        """Host wall-clock ns for guest clock ``g_ns``; raises ``AlignmentUnknown``."""
        return self.segment_for(g_ns).to_host(g_ns)

    def bound_at(self, g_ns: int) -> int | None:
        return self.segment_for(g_ns).bound_at(g_ns) if self.segments else None

    # ---- JSON -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.VERSION, "known": self.known, "method": self.method,
            "offset_ns": self.offset_ns, "skew_ppm": self.skew_ppm,
            "ref_guest_ns": self.ref_guest_ns, "bound_ns": self.bound_ns,
            "guaranteed": self.guaranteed, "n_samples": self.n_samples,
            "rejected": self.rejected, "notes": list(self.notes),
            "pauses": [[p.start_ns, p.end_ns] for p in self.pauses],
            "segments": [s.to_json() for s in self.segments],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any] | None) -> Alignment:
        if not d:
            return cls.unknown("no alignment recorded")
        segs = tuple(Segment.from_json(s) for s in d.get("segments") or ())
        if not segs and d.get("known") and d.get("offset_ns") is not None:
            # a hand-written header: top-level fields only
            segs = (Segment(int(d["offset_ns"]), float(d.get("skew_ppm") or 0.0),
                            int(d.get("ref_guest_ns") or 0), _opt_int(d.get("bound_ns")),
                            int(d.get("n_samples", 0)), str(d.get("method", "fixed"))),)
        return cls(segments=segs, n_samples=int(d.get("n_samples", 0)),
                   rejected=int(d.get("rejected", 0)), notes=tuple(d.get("notes") or ()),
                   pauses=tuple(Pause(int(a), int(b)) for a, b in d.get("pauses") or ()))


# ---- estimation -----------------------------------------------------------------------

@dataclass(frozen=True)
class _Constraint:
    x: float          # seconds from the segment's reference guest time
    y: float          # ns, relative to the segment's base offset
    upper: bool       # True: o(x) <= y; False: o(x) >= y
    sample: int       # index into the segment's sample list


@dataclass
class _Fit:
    offset_rel: float
    skew_nsps: float          # ns of offset per second of guest time
    bound: float | None
    skew_err_nsps: float | None
    method: str
    rejected: list[int] = field(default_factory=list)
    worst_violation: float = 0.0


def estimate(samples: Iterable[SyncSample], *, pauses: Iterable[Pause] = (),
             max_skew_ppm: float = DEFAULT_MAX_SKEW_PPM,
             pause_guard_ns: int = DEFAULT_PAUSE_GUARD_NS,
             assumed_one_way_delay_ns: int = 0,
             max_reject_fraction: float = 0.2) -> Alignment:
    """Fit the guest->host mapping from ``samples``; never raises on bad evidence.

    ``max_skew_ppm`` is the prior on drift (0 forces a constant offset).
    ``assumed_one_way_delay_ns`` is subtracted when a segment has only upper bounds
    (one-way samples): its estimate then rests on that assumption and has no bound.
    """
    all_samples = list(samples)
    ps = _merge_pauses(pauses)
    notes: list[str] = []
    if not all_samples:
        return Alignment(notes=("no clock evidence",), pauses=ps)

    # place samples between pauses; drop those that may straddle one
    buckets: list[list[SyncSample]] = [[] for _ in range(len(ps) + 1)]
    dropped = 0
    for s in all_samples:
        if s.not_after_ns is None and s.not_before_ns is None:
            dropped += 1
            continue
        k = _segment_index(s, ps, pause_guard_ns)
        if k is None:
            dropped += 1
        else:
            buckets[k].append(s)
    if dropped:
        notes.append(f"{dropped} sample(s) dropped: no bound, or too close to a pause")

    fits: list[tuple[_Fit, list[SyncSample], int] | None] = []
    for bucket in buckets:
        if not bucket:
            fits.append(None)
            continue
        base = _base_offset(bucket)
        g_ref = min(s.g_ns for s in bucket)
        fit = _fit_segment(bucket, base, g_ref, max_skew_ppm, assumed_one_way_delay_ns,
                           max_reject_fraction)
        fits.append((fit, bucket, base) if fit is not None else None)
        if fit is not None and fit.method == "minimax-inconsistent":
            notes.append(f"segment {len(fits) - 1}: samples inconsistent by "
                         f"{fit.worst_violation / 1e6:.3f} ms and no small subset explains it "
                         "(an undeclared pause or clock step?); using the least-violating "
                         "line, no bound")
        if fit is not None and fit.rejected:
            notes.append(f"segment {len(fits) - 1}: samples inconsistent by up to "
                         f"{fit.worst_violation / 1e6:.3f} ms; rejected {len(fit.rejected)} "
                         f"({_describe_rejected(bucket, fit.rejected)})")

    segments: list[Segment | None] = []
    for k, entry in enumerate(fits):
        if entry is None:
            segments.append(None)
            continue
        fit, bucket, base = entry
        g_ref = min(s.g_ns for s in bucket)
        kept = [s for i, s in enumerate(bucket) if i not in set(fit.rejected)]
        g_lo = min(s.g_ns for s in kept) if kept else g_ref
        g_hi = max(s.g_ns for s in kept) if kept else g_ref
        # re-express the line at g_lo (integer ns offset, ppm skew)
        offset = base + fit.offset_rel + fit.skew_nsps * (g_lo - g_ref) / 1e9
        bound = None if fit.bound is None else math.ceil(fit.bound) + 1   # +1: int rounding
        segments.append(Segment(
            offset_ns=round(offset), skew_ppm=fit.skew_nsps / 1e3, ref_guest_ns=g_lo,
            bound_ns=bound, n_samples=len(kept), method=fit.method,
            host_start_ns=ps[k - 1].end_ns if k > 0 else None,
            g_lo_ns=g_lo, g_hi_ns=g_hi,
            skew_err_ppm=None if fit.skew_err_nsps is None else fit.skew_err_nsps / 1e3,
            rejected=len(fit.rejected), pause_ns=ps[k - 1].duration_ns if k > 0 else None))

    if all(s is None for s in segments):
        return Alignment(n_samples=len(all_samples) - dropped, notes=tuple(notes), pauses=ps)

    final = _link_segments(segments, ps, notes)
    n = sum(s.n_samples for s in final if s.method != "inherited")
    return Alignment(segments=tuple(final), n_samples=n,
                     rejected=sum(s.rejected for s in final), notes=tuple(notes), pauses=ps)


def estimate_monotone(samples: Iterable[SyncSample], *, pauses: Iterable[Pause] = (),
                      ) -> Alignment:
    """Fit a guest clock that is monotone but not linear in host time: a polyline
    inside every sample's interval.

    Why: under QEMU's ``-icount shift=auto`` (``--record``) the guest clock counts
    executed instructions times 2**shift, and QEMU re-tunes shift as the host keeps up
    or not. Measured here over recorded iterations of ~7 s: no line fits (the samples
    were inconsistent with every line by 0.2-0.6 s, with any drift prior), and an oops
    in a guest-driven race was placed in the module load before it. What still holds is
    that both clocks only move forward. So for guest instants ``g_a < g < g_b`` with
    ``host(g_a) >= L_a`` and ``host(g_b) <= U_b``, ``host(g)`` lies in ``[L_a, U_b]``;
    a line between points ``P_a <= P_b`` inside the anchors' intervals is at most
    ``max(P_b - L_a, U_b - P_a)`` from it, which is the segment's guaranteed bound.
    Bounds are first tightened by order (``L`` the latest floor before, ``U`` the
    earliest ceiling after), so every
    console or kprobe line after a token is an anchor too, and the polyline keeps every
    sample's floor and ceiling at its own instant (merged segments are checked against
    the anchors they skip). The bound is as good as the anchors are dense: the runner
    sends a token at both ends of each step under ``--record`` (``GuestTrace.mark``),
    so an event is placed within the step it happened in.

    Falls back to ``estimate`` (one line per stretch between pauses) when there are
    pauses (QMP stop/cont is refused under --record anyway), no two-way sample, or
    samples that contradict monotonicity.
    """
    all_samples = list(samples)
    ps = _merge_pauses(pauses)
    if ps:
        return estimate(all_samples, pauses=ps)
    ordered = sorted((s for s in all_samples if s.not_after_ns is not None
                      or s.not_before_ns is not None), key=lambda s: s.g_ns)
    n = len(ordered)
    lo: list[int | None] = [None] * n
    hi: list[int | None] = [None] * n
    run_lo: int | None = None
    for i, s in enumerate(ordered):          # host(g) >= every earlier lower bound
        if s.not_before_ns is not None:
            own = s.not_before_ns - s.g_resolution_ns
            run_lo = own if run_lo is None else max(run_lo, own)
        lo[i] = run_lo
    run_hi: int | None = None
    for i in range(n - 1, -1, -1):           # host(g) <= every later upper bound
        s = ordered[i]
        if s.not_after_ns is not None:
            run_hi = s.not_after_ns if run_hi is None else min(run_hi, s.not_after_ns)
        hi[i] = run_hi
    both = [(i, lo_i, hi_i) for i, (lo_i, hi_i) in enumerate(zip(lo, hi))
            if lo_i is not None and hi_i is not None]
    bad = [lo_i - hi_i for _, lo_i, hi_i in both if lo_i > hi_i]
    if bad:
        fallback = estimate(all_samples)
        return replace(fallback, notes=fallback.notes + (
            f"monotone fit refused: {len(bad)} sample(s) contradict a forward-moving "
            f"clock by up to {max(bad) / 1e6:.3f} ms; fitted with lines instead",))
    # every sample with a floor and a ceiling is an anchor: (g, L, U), one per guest
    # instant (the tightest). A console or kprobe line (one-way) has a floor once a
    # token before it gives one: the line of an oops bounds the oops from above, however
    # late the next token's echo comes
    anchors: list[tuple[int, int, int]] = []
    for i, lo_i, hi_i in both:
        g = ordered[i].g_ns
        if anchors and g == anchors[-1][0]:
            anchors[-1] = (g, max(lo_i, anchors[-1][1]), min(hi_i, anchors[-1][2]))
            continue
        anchors.append((g, lo_i, hi_i))
    if not anchors:
        return estimate(all_samples)
    used = sum(1 for i, _, _ in both if ordered[i].kind == "two-way")
    # the point each anchor puts the line through. A token's interval is narrow: its
    # middle. A console or kprobe line's reaches back to the last token (seconds, in a
    # long step) but the line was relayed at once: its receipt less the quickest
    # token's half-width. Kept non-decreasing, so inside [L, U] still. Only the estimate
    # depends on this choice; the bounds hold for any such points.
    two_way_g = {ordered[i].g_ns for i, _, _ in both if ordered[i].kind == "two-way"}
    d0 = min(((hi - lo) // 2 for g, lo, hi in anchors if g in two_way_g), default=0)
    points: list[int] = []
    for g, lo_a, hi_a in anchors:
        p = (lo_a + hi_a) // 2 if g in two_way_g else max(lo_a, hi_a - d0)
        points.append(max(p, points[-1]) if points else p)
    if len(anchors) == 1:
        (g, lo_a, hi_a), p = anchors[0], points[0]
        seg = Segment(offset_ns=p - g, skew_ppm=0.0, ref_guest_ns=g,
                      bound_ns=max(p - lo_a, hi_a - p) + 1, n_samples=used, method="monotone",
                      g_lo_ns=g, g_hi_ns=g, skew_err_ppm=MONOTONE_OUTSIDE_PPM)
        return Alignment(segments=(seg,), n_samples=used, notes=_monotone_note(1, used, both))
    segs: list[Segment] = []
    for k, (a, b) in enumerate(_simplify(anchors, points)):
        (ga, _, _), (gb, _, _) = anchors[a], anchors[b]
        pa, pb = points[a], points[b]
        slope = (pb - pa) / (gb - ga)                     # host ns per guest ns

        def line(g: int) -> float:
            return pa + slope * (g - ga)
        # between consecutive anchors i, i+1 the truth is in [L_i, U_{i+1}] (both clocks
        # go forward) and the line between line(g_i) and line(g_{i+1})
        bound = max(max(line(anchors[i + 1][0]) - anchors[i][1],
                        anchors[i + 1][2] - line(anchors[i][0])) for i in range(a, b))
        segs.append(Segment(offset_ns=pa - ga, skew_ppm=(slope - 1.0) * 1e6, ref_guest_ns=ga,
                            bound_ns=math.ceil(bound) + 1, n_samples=used, method="monotone",
                            g_start_ns=None if k == 0 else ga, g_lo_ns=ga, g_hi_ns=gb,
                            skew_err_ppm=MONOTONE_OUTSIDE_PPM))
    return Alignment(segments=tuple(segs), n_samples=used,
                     notes=_monotone_note(len(segs) + 1, used, both))


#: at most this many anchors merged into one segment (the check is quadratic in it)
MONOTONE_MAX_MERGE = 256


def _monotone_note(kept: int, used: int, both: Sequence[tuple[int, int, int]]) -> tuple[str]:
    return (f"guest clock counts instructions (icount): monotone fit, piecewise through "
            f"{kept} anchor(s) from {used} two-way and {len(both) - used} one-way sample(s)",)


def _simplify(anchors: Sequence[tuple[int, int, int]], points: Sequence[int]
              ) -> list[tuple[int, int]]:
    """Segments (anchor index pairs) of the polyline through ``points``, merged while
    the merged line stays inside every skipped anchor's ``[L, U]``: every sample's
    floor and ceiling still hold at its own instant, with a few segments instead of one
    per console line."""
    out: list[tuple[int, int]] = []
    a, n = 0, len(anchors)
    while a < n - 1:
        b = a + 1
        while b + 1 < n and b + 1 - a <= MONOTONE_MAX_MERGE and _fits(anchors, points, a, b + 1):
            b += 1
        out.append((a, b))
        a = b
    return out


def _fits(anchors: Sequence[tuple[int, int, int]], points: Sequence[int], a: int, b: int) -> bool:
    ga, gb = anchors[a][0], anchors[b][0]
    slope = (points[b] - points[a]) / (gb - ga)
    return all(anchors[i][1] <= points[a] + slope * (anchors[i][0] - ga) <= anchors[i][2]
               for i in range(a + 1, b))


#: outside its anchors a monotone segment's bound grows one for one: nothing but order
#: constrains an instructions-counting clock there
MONOTONE_OUTSIDE_PPM = 1_000_000.0


def _merge_pauses(pauses: Iterable[Pause]) -> tuple[Pause, ...]:
    out: list[Pause] = []
    for p in sorted(pauses, key=lambda p: p.start_ns):
        if p.end_ns < p.start_ns:
            continue
        if out and p.start_ns <= out[-1].end_ns:
            out[-1] = Pause(out[-1].start_ns, max(out[-1].end_ns, p.end_ns))
        else:
            out.append(p)
    return tuple(out)


def _segment_index(s: SyncSample, ps: Sequence[Pause], guard: int) -> int | None:
    """Which inter-pause segment the sample belongs to; None when it may straddle a
    pause. The guest instant lies in ``[start, hi]``: ``start`` is the send time of a
    two-way sample, else the receive time minus ``guard``."""
    hi = s.not_after_ns if s.not_after_ns is not None else s.not_before_ns
    assert hi is not None
    start = s.not_before_ns if s.not_before_ns is not None else hi - guard
    k = sum(1 for p in ps if p.start_ns <= hi)
    if k > 0 and start < ps[k - 1].end_ns:
        return None          # inside the pause, or too close after it to place
    return k


def _base_offset(bucket: Sequence[SyncSample]) -> int:
    """An integer close to the offsets, so the float maths works on small numbers."""
    his = [hi for s in bucket for hi in (s.offset_bounds()[1],) if hi is not None]
    los = [lo for s in bucket for lo in (s.offset_bounds()[0],) if lo is not None]
    return min(his) if his else max(los)


def _constraints(bucket: Sequence[SyncSample], base: int, g_ref: int,
                 skip: set[int]) -> list[_Constraint]:
    out: list[_Constraint] = []
    for i, s in enumerate(bucket):
        if i in skip:
            continue
        lo, hi = s.offset_bounds()
        x = (s.g_ns - g_ref) / 1e9
        if hi is not None:
            out.append(_Constraint(x, float(hi - base), True, i))
        if lo is not None:
            out.append(_Constraint(x, float(lo - base), False, i))
    return out


def _hull_reduce(cons: Sequence[_Constraint]) -> list[_Constraint]:
    """Keep only constraints on the relevant convex hulls.

    A line below every upper point is below their lower convex hull and vice versa;
    the other points add nothing. Keeping extra points is harmless, so ties are
    resolved simply.
    """
    uppers: dict[float, _Constraint] = {}
    lowers: dict[float, _Constraint] = {}
    for c in cons:
        if c.upper:
            if c.x not in uppers or c.y < uppers[c.x].y:
                uppers[c.x] = c
        elif c.x not in lowers or c.y > lowers[c.x].y:
            lowers[c.x] = c

    def hull(points: list[_Constraint], keep_lower: bool) -> list[_Constraint]:
        out: list[_Constraint] = []
        for p in points:
            while len(out) >= 2:
                a, b = out[-2], out[-1]
                cross = (b.x - a.x) * (p.y - a.y) - (b.y - a.y) * (p.x - a.x)
                if (cross <= 0) if keep_lower else (cross >= 0):
                    out.pop()
                else:
                    break
            out.append(p)
        return out

    return (hull(sorted(uppers.values(), key=lambda c: c.x), True)
            + hull(sorted(lowers.values(), key=lambda c: c.x), False))


def _clip(poly: list[tuple[float, float]], ca: float, cs: float,
          c: float) -> list[tuple[float, float]]:
    """Sutherland-Hodgman: keep the part of convex ``poly`` with ``ca*a + cs*s <= c``."""
    out: list[tuple[float, float]] = []
    n = len(poly)
    tol = 1e-9 * (1.0 + abs(c))
    for i in range(n):
        p, q = poly[i], poly[(i + 1) % n]
        fp = ca * p[0] + cs * p[1] - c
        fq = ca * q[0] + cs * q[1] - c
        if fp <= tol:
            out.append(p)
        if (fp < -tol and fq > tol) or (fp > tol and fq < -tol):
            t = fp / (fp - fq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _polygon(cons: Sequence[_Constraint], smax: float, relax: float) -> list[tuple[float, float]]:
    """Feasible (a, s) region for ``a + s*x`` within every constraint relaxed by ``relax``."""
    xs = [abs(c.x) for c in cons] or [0.0]
    ys = [c.y for c in cons] or [0.0]
    span = smax * max(xs) + max(abs(y) for y in ys) + relax + 1e9
    a_lo, a_hi = -span, span
    poly = [(a_lo, -smax), (a_hi, -smax), (a_hi, smax), (a_lo, smax)]
    for c in cons:
        if c.upper:                    # a + s*x <= y + relax
            poly = _clip(poly, 1.0, c.x, c.y + relax)
        else:                          # -(a + s*x) <= -(y - relax)
            poly = _clip(poly, -1.0, -c.x, -(c.y - relax))
        if not poly:
            break
    return poly


def _fit_segment(bucket: Sequence[SyncSample], base: int, g_ref: int, max_skew_ppm: float,
                 one_way_delay: int, max_reject_fraction: float) -> _Fit | None:
    smax = max(0.0, max_skew_ppm) * 1e3          # ns per s
    rejected: set[int] = set()
    worst = 0.0
    limit = max(1, int(len(bucket) * max_reject_fraction))
    while True:
        cons = _hull_reduce(_constraints(bucket, base, g_ref, rejected))
        if not cons:
            return None
        if not any(not c.upper for c in cons):
            fit = _fit_one_way(cons, smax, one_way_delay)
            fit.rejected = sorted(rejected)
            fit.worst_violation = worst
            return fit
        poly = _polygon(cons, smax, 0.0)
        if len(poly) >= 1:
            fit = _fit_polygon(cons, poly, smax)
            fit.rejected = sorted(rejected)
            fit.worst_violation = worst
            fit.method = "interval" if not rejected else "interval-rejected"
            return fit
        # inconsistent: find the smallest relaxation, blame the samples at its edge
        tstar, active = _minimax(cons, smax)
        worst = max(worst, tstar)
        culprit = _single_culprit(bucket, base, g_ref, smax, rejected, active)
        if culprit is not None:
            rejected.add(culprit)
        else:
            rejected.update(active)
        if len(rejected) > limit:
            # too much disagreement to trust any line: report the minimax compromise
            cons = _hull_reduce(_constraints(bucket, base, g_ref, set()))
            tstar, _ = _minimax(cons, smax)
            poly = _polygon(cons, smax, tstar * (1 + 1e-9) + 1e-6)
            fit = _fit_polygon(cons, poly, smax)
            fit.bound = None
            fit.method = "minimax-inconsistent"
            fit.rejected = []
            fit.worst_violation = tstar
            return fit


def _fit_polygon(cons: Sequence[_Constraint], poly: Sequence[tuple[float, float]],
                 smax: float) -> _Fit:
    x1 = min(c.x for c in cons)
    x2 = max(c.x for c in cons)
    at1 = [a + s * x1 for a, s in poly]
    at2 = [a + s * x2 for a, s in poly]
    m1 = (min(at1) + max(at1)) / 2
    m2 = (min(at2) + max(at2)) / 2
    if x2 - x1 > 1e-9:
        s_line = (m2 - m1) / (x2 - x1)
        s_line = max(-smax, min(smax, s_line))
    else:
        s_lo = min(s for _, s in poly)
        s_hi = max(s for _, s in poly)
        s_line = 0.0 if s_lo <= 0.0 <= s_hi else (s_lo + s_hi) / 2
    a_line = m1 - s_line * x1
    bound = 0.0
    for a, s in poly:
        for x in (x1, x2):
            bound = max(bound, abs((a_line + s_line * x) - (a + s * x)))
    skew_err = max(abs(s_line - s) for _, s in poly)
    # express at x=0 (g_ref)
    return _Fit(offset_rel=a_line, skew_nsps=s_line, bound=bound, skew_err_nsps=skew_err,
                method="interval")


def _fit_one_way(cons: Sequence[_Constraint], smax: float, delay: int) -> _Fit:
    """Only upper bounds: the highest line under all of them at the mean guest time
    (the minimum-delay envelope), lowered by the assumed delay. No bound."""
    pts = sorted((c for c in cons if c.upper), key=lambda c: c.x)
    xbar = sum(c.x for c in pts) / len(pts)
    if len(pts) == 1 or smax == 0.0:
        y = min(c.y for c in pts)
        return _Fit(offset_rel=y - delay, skew_nsps=0.0, bound=None, skew_err_nsps=None,
                    method="one-way")
    # pts is the lower hull (from _hull_reduce); find the edge spanning xbar
    slope = 0.0
    a = pts[0].y
    for p, q in zip(pts, pts[1:], strict=False):
        if p.x <= xbar <= q.x and q.x > p.x:
            slope = (q.y - p.y) / (q.x - p.x)
            a = p.y - slope * p.x
            break
    if abs(slope) > smax:
        slope = max(-smax, min(smax, slope))
        a = min(c.y - slope * c.x for c in pts)
    return _Fit(offset_rel=a - delay, skew_nsps=slope, bound=None, skew_err_nsps=None,
                method="one-way")


def _minimax(cons: Sequence[_Constraint], smax: float) -> tuple[float, list[int]]:
    """Smallest uniform relaxation ``t`` that makes the constraints feasible, and the
    samples whose constraints are (nearly) tight there."""
    lo_max = max(c.y for c in cons if not c.upper)
    hi_min = min(c.y for c in cons if c.upper)
    a0 = (lo_max + hi_min) / 2
    t_hi = max(max(c.y - a0 for c in cons if not c.upper),
               max(a0 - c.y for c in cons if c.upper), 0.0) + 1.0
    t_lo = 0.0
    for _ in range(80):
        if t_hi - t_lo <= max(0.5, t_hi * 1e-9):
            break
        mid = (t_lo + t_hi) / 2
        if _polygon(cons, smax, mid):
            t_hi = mid
        else:
            t_lo = mid
    poly = _polygon(cons, smax, t_hi)
    a = sum(p[0] for p in poly) / len(poly)
    s = sum(p[1] for p in poly) / len(poly)
    viol = []
    for c in cons:
        v = (a + s * c.x) - c.y if c.upper else c.y - (a + s * c.x)
        viol.append((v, c.sample))
    cut = t_hi * 0.5
    active = sorted({i for v, i in viol if v >= cut})
    if not active:
        active = [max(viol)[1]]
    return t_hi, active


def _single_culprit(bucket: Sequence[SyncSample], base: int, g_ref: int, smax: float,
                    rejected: set[int], active: Sequence[int]) -> int | None:
    """If removing one of the active samples makes the rest consistent, that one."""
    best: tuple[float, int] | None = None
    for i in active:
        cons = _hull_reduce(_constraints(bucket, base, g_ref, rejected | {i}))
        if not cons or not any(not c.upper for c in cons):
            continue
        poly = _polygon(cons, smax, 0.0)
        if poly:
            width = _fit_polygon(cons, poly, smax).bound or 0.0
            if best is None or width < best[0]:
                best = (width, i)
    return None if best is None else best[1]


def _describe_rejected(bucket: Sequence[SyncSample], idx: Sequence[int]) -> str:
    parts = []
    for i in list(idx)[:5]:
        s = bucket[i]
        parts.append(f"{s.kind}{' ' + s.token if s.token else ''} at g={s.g_ns}")
    more = len(idx) - len(parts)
    return ", ".join(parts) + (f", +{more} more" if more > 0 else "")


def _link_segments(segments: Sequence[Segment | None], ps: Sequence[Pause],
                   notes: list[str]) -> list[Segment]:
    """Fill segments without samples from neighbours, set guest-time boundaries and
    measure offset jumps across pauses."""
    filled: list[Segment | None] = list(segments)
    n = len(filled)
    # forward fill, then backward fill
    for k in range(1, n):
        prev = filled[k - 1]
        if filled[k] is None and prev is not None:
            p = ps[k - 1]
            half = p.duration_ns // 2
            filled[k] = replace(prev, offset_ns=prev.offset_ns + half,
                                bound_ns=None if prev.bound_ns is None else prev.bound_ns + half
                                + p.duration_ns % 2,
                                n_samples=0, method="inherited", rejected=0, jump_ns=None,
                                host_start_ns=p.end_ns, pause_ns=p.duration_ns)
            notes.append(f"segment {k}: no samples after the {p.duration_ns / 1e6:.1f} ms "
                         "pause; inherited with the bound widened by half the pause")
    for k in range(n - 2, -1, -1):
        nxt = filled[k + 1]
        if filled[k] is None and nxt is not None:
            p = ps[k]
            half = p.duration_ns // 2
            filled[k] = replace(nxt, offset_ns=nxt.offset_ns - half,
                                bound_ns=None if nxt.bound_ns is None else nxt.bound_ns + half
                                + p.duration_ns % 2,
                                n_samples=0, method="inherited", rejected=0, jump_ns=None,
                                host_start_ns=ps[k - 1].end_ns if k > 0 else None,
                                pause_ns=ps[k - 1].duration_ns if k > 0 else None)
            notes.append(f"segment {k}: no samples before the next pause; inherited")
    out: list[Segment] = []
    for k, seg in enumerate(filled):
        assert seg is not None
        if k == 0:
            out.append(replace(seg, g_start_ns=None))
            continue
        prev = out[-1]
        p = ps[k - 1]
        if prev.method != "inherited" or seg.method == "inherited":
            g_b = prev.to_guest(p.start_ns)
        else:
            g_b = seg.to_guest(p.end_ns)
        jump = None
        if prev.method != "inherited" and seg.method != "inherited":
            jump = (seg.to_host(g_b) - g_b) - (prev.to_host(g_b) - g_b)
            what = ("the guest clock stopped while paused"
                    if abs(jump - p.duration_ns) <= max(2_000_000, p.duration_ns // 20)
                    else "the guest clock kept running while paused"
                    if abs(jump) <= max(2_000_000, p.duration_ns // 20)
                    else "the offset jump matches neither a stopped nor a running clock")
            notes.append(f"pause {k}: {p.duration_ns / 1e6:.1f} ms, offset jump "
                         f"{jump / 1e6:.3f} ms: {what}")
        out.append(replace(seg, g_start_ns=g_b, jump_ns=jump))
    return out



# ---- a request/reply exchange (Windows guests) ----------------------------------------
# A Windows guest has no serial sync loop: the host asks for the guest's clock over the
# agent. Each round is Cristian's algorithm, sharpened by a second guest stamp: the
# guest reports when its command's process was created (the kernel's record, after the
# host sent the request) and when it read the clock (before it replied), so the guest's
# own start-up time is discounted from the round trip.

@dataclass(frozen=True)
class ExchangeSample:
    """One round: the host stamped ``h_send_ns`` before sending and ``h_recv_ns`` after the
    reply; the guest's process began at ``g_start_ns`` (None: unknown) and read its
    clock at ``g_read_ns``, both on the guest clock with ``g_resolution_ns`` of lag."""

    h_send_ns: int
    h_recv_ns: int
    g_read_ns: int
    g_start_ns: int | None = None
    g_resolution_ns: int = 0

    @property
    def rtt_ns(self) -> int:
        return self.h_recv_ns - self.h_send_ns

    @property
    def guest_ns(self) -> int:
        """The guest's own time between its two stamps (0 when it gave only one, or when
        they contradict the round trip: then only the plain interval is trusted)."""
        if self.g_start_ns is None:
            return 0
        d = self.g_read_ns - self.g_start_ns
        return d if 0 <= d <= self.rtt_ns + self.g_resolution_ns else 0

    def offset_bounds(self) -> tuple[int, int]:
        """``lo <= host(g) - g <= hi``: the process began after the send, the read was
        before the reply; each stamp may lag its instant by the resolution."""
        first = self.g_read_ns - self.guest_ns
        return (self.h_send_ns - first - self.g_resolution_ns, self.h_recv_ns - self.g_read_ns)

    @property
    def bound_ns(self) -> int:
        lo, hi = self.offset_bounds()
        return max(0, math.ceil((hi - lo) / 2))

    def to_json(self) -> dict[str, Any]:
        lo, hi = self.offset_bounds()
        return {"h_send_ns": self.h_send_ns, "h_recv_ns": self.h_recv_ns, "g_read_ns": self.g_read_ns,
                "g_start_ns": self.g_start_ns, "g_resolution_ns": self.g_resolution_ns,
                "rtt_ns": self.rtt_ns, "guest_ns": self.guest_ns, "offset_lo_ns": lo,
                "offset_hi_ns": hi, "bound_ns": self.bound_ns}


def best_exchange(samples: Iterable[ExchangeSample]) -> ExchangeSample:
    """The round whose interval is narrowest: the shortest round trip once the guest's own
    start-up is discounted (ties: the shorter raw round trip). ``ValueError`` if none."""
    got = list(samples)
    if not got:
        raise ValueError("no clock exchange samples")
    return min(got, key=lambda s: (s.bound_ns, s.rtt_ns))


def exchange_alignment(samples: Sequence[ExchangeSample], *,
                       method: str = "windows-clock-exchange") -> Alignment:
    """A fixed offset from the best round: the midpoint of its interval, half its width
    as the guaranteed bound (drift over the run is not modelled: one exchange at start)."""
    best = best_exchange(samples)
    lo, hi = best.offset_bounds()
    if hi < lo:
        return Alignment.unknown(f"clock exchange inconsistent: offset interval [{lo}, {hi}] is empty")
    seg = Segment(offset_ns=(lo + hi) // 2, skew_ppm=0.0, ref_guest_ns=best.g_read_ns,
                  bound_ns=best.bound_ns, n_samples=len(samples), method=method,
                  g_lo_ns=best.g_read_ns, g_hi_ns=best.g_read_ns)
    note = (f"{method}: best of {len(samples)} rounds, round trip {best.rtt_ns / 1e6:.1f} ms "
            f"(guest start-up {best.guest_ns / 1e6:.1f} ms discounted), bound +/-{best.bound_ns / 1e6:.1f} ms")
    return Alignment(segments=(seg,), n_samples=len(samples), notes=(note,))


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)
