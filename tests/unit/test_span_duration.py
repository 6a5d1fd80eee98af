"""A span's duration is read on the clock that stamped both ends when there is one.

Under --record the guest clock counts instructions and the alignment between two sync
tokens can be seconds wide: the planted slow remove() (msleep 4000) measured 2.1 s on
aligned host times and 4.9 s on the guest clock that stamped both its kprobe lines; the
rule missed it. The guest clock is also what the driver's own log says."""

from __future__ import annotations

from lab.events import Event, Kind, Source
from lab.timeline import Span

MS = 1_000_000


def ev(kind: Kind, t_host: int, t_guest: int | None, source: Source = Source.GUEST_KPROBE) -> Event:
    return Event(t_host, source, kind, t_guest_ns=t_guest, data={"func": "pci_device_remove"})


def test_both_ends_on_the_guest_clock_use_it() -> None:
    s = Span(ev(Kind.REMOVE_ENTER, 1000 * MS, 17_785 * MS), ev(Kind.REMOVE_EXIT, 3100 * MS, 22_649 * MS))
    assert s.duration_ns == 4_864 * MS


def test_ends_from_different_sources_or_without_a_guest_stamp_use_the_host_clock() -> None:
    enter = ev(Kind.REMOVE_ENTER, 1000 * MS, 17_785 * MS)
    assert Span(enter, ev(Kind.REMOVE_EXIT, 1400 * MS, 22_649 * MS, Source.GUEST_KERNEL)
                ).duration_ns == 400 * MS
    assert Span(enter, ev(Kind.REMOVE_EXIT, 1400 * MS, None)).duration_ns == 400 * MS
    assert Span(enter, None).duration_ns is None
