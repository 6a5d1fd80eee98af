"""Clock alignment on synthetic evidence with known offset, skew and delays."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from lab.clock import (Alignment, AlignmentUnknown, Pause, Segment, SyncSample, estimate,
                       parse_printk, pauses_from_events, samples_from_console)
from lab.events import Event, Kind, Source

EPOCH = 1_700_000_000_000_000_000
G0 = 5_000_000_000
MS = 1_000_000

Truth = Callable[[int], int]


def linear_truth(offset: int = EPOCH, skew_ppm: float = 37.0) -> Truth:
    return lambda g: g + offset + round(skew_ppm * 1e-6 * (g - G0))


def synth(seed: int, truth: Truth, *, n: int = 600, seconds: float = 60.0, one_way: int = 1000,
          fwd: tuple[int, int] = (20_000, 300_000),
          back: tuple[int, int] = (1_700_000, 3_800_000),
          start: int = G0) -> list[SyncSample]:
    """Two-way samples: token write -> guest stamp (fast) -> console (1.7-3.8 ms);
    one-way: ordinary console lines. Guest stamps printed truncated to microseconds."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        g = start + int(r.uniform(0, seconds) * 1e9)
        h = truth(g)
        out.append(SyncSample.two_way(f"t{i}", h - int(r.uniform(*fwd)), g - g % 1000,
                                      h + int(r.uniform(*back))))
    for _ in range(one_way):
        g = start + int(r.uniform(0, seconds) * 1e9)
        out.append(SyncSample.one_way(g - g % 1000, truth(g) + int(r.uniform(*back))))
    return out


def worst_error(a: Alignment, truth: Truth, lo: int, hi: int, steps: int = 400) -> int:
    return max(abs(a.to_host(g) - truth(g)) for g in range(lo, hi, max(1, (hi - lo) // steps)))


@pytest.mark.parametrize("seed", range(6))
def test_bound_holds_and_is_under_a_millisecond(seed: int) -> None:
    truth = linear_truth(skew_ppm=[37.0, -120.0, 0.0, 450.0, -3.5, 1200.0][seed])
    samples = synth(seed, truth)
    a = estimate(samples)
    assert a.known and a.guaranteed and a.method == "interval"
    assert a.bound_ns is not None and a.bound_ns < 1 * MS
    seg = a.segments[0]
    assert seg.g_lo_ns is not None and seg.g_hi_ns is not None
    assert worst_error(a, truth, seg.g_lo_ns, seg.g_hi_ns) <= a.bound_ns
    assert a.n_samples == len(samples)


def test_skew_is_recovered_over_a_long_run() -> None:
    truth = linear_truth(skew_ppm=-800.0)
    a = estimate(synth(11, truth, n=300, seconds=600.0, one_way=0))
    assert a.skew_ppm == pytest.approx(-800.0, abs=0.5)
    seg = a.segments[0]
    assert worst_error(a, truth, seg.g_lo_ns or 0, seg.g_hi_ns or 0) <= (a.bound_ns or 0)


def test_bound_grows_outside_the_sampled_range_but_stays_valid() -> None:
    truth = linear_truth(skew_ppm=250.0)
    a = estimate(synth(3, truth, n=200, seconds=20.0, one_way=0))
    seg = a.segments[0]
    far = (seg.g_hi_ns or 0) + 30 * 1_000_000_000
    assert (a.bound_at(far) or 0) > (a.bound_ns or 0)
    assert abs(a.to_host(far) - truth(far)) <= (a.bound_at(far) or 0)


def test_no_samples_means_unknown() -> None:
    a = estimate([])
    assert not a.known and a.bound_ns is None and a.method == "unknown"
    with pytest.raises(AlignmentUnknown):
        a.to_host(G0)
    assert Alignment.from_json(a.to_json()).known is False


def test_one_way_only_gives_an_estimate_without_a_bound() -> None:
    truth = linear_truth(skew_ppm=0.0)
    r = random.Random(5)
    samples = [SyncSample.one_way(g, truth(g) + int(r.uniform(1_700_000, 3_800_000)))
               for g in (G0 + i * 50_000_000 for i in range(400))]
    a = estimate(samples, assumed_one_way_delay_ns=1_700_000)
    assert a.known and a.bound_ns is None and not a.guaranteed and a.method == "one-way"
    assert abs(a.to_host(G0 + 10_000_000_000) - truth(G0 + 10_000_000_000)) < 100_000


def test_a_mismatched_token_is_rejected_not_fatal() -> None:
    truth = linear_truth()
    samples = synth(2, truth, n=300, one_way=0)
    g = G0 + 30 * 1_000_000_000
    # a stale token pairing: "sent" 40 ms after the guest really printed
    samples.append(SyncSample.two_way("bad", truth(g) + 40 * MS, g, truth(g) + 45 * MS))
    a = estimate(samples)
    assert a.rejected == 1 and not a.guaranteed
    assert any("inconsistent" in n and "bad" in n for n in a.notes)
    seg = a.segments[0]
    assert worst_error(a, truth, seg.g_lo_ns or 0, seg.g_hi_ns or 0) <= (a.bound_ns or 0)


def test_undeclared_clock_step_does_not_crash() -> None:
    # half the samples see a 100 ms step nobody told us about
    before = linear_truth()
    after = linear_truth(offset=EPOCH + 100 * MS)
    s1 = synth(1, before, n=100, seconds=10.0, one_way=0)
    s2 = synth(2, after, n=100, seconds=10.0, one_way=0, start=G0 + 10 * 1_000_000_000)
    a = estimate(s1 + s2)
    assert a.known and not a.guaranteed
    assert a.rejected > 0 or a.bound_ns is None
    assert any("inconsistent" in n for n in a.notes)


def _paused_truth(pause_start_g: int, pause_ns: int, stopped: bool) -> Truth:
    base = linear_truth(skew_ppm=0.0)
    return lambda g: base(g) + (pause_ns if stopped and g >= pause_start_g else 0)


@pytest.mark.parametrize("stopped", [True, False])
def test_pause_splits_the_fit_and_measures_the_jump(stopped: bool) -> None:
    pause_g = G0 + 20 * 1_000_000_000
    p_ns = 2_000 * MS
    truth = _paused_truth(pause_g, p_ns, stopped)
    h_stop = linear_truth(skew_ppm=0.0)(pause_g)
    pause = Pause(h_stop, h_stop + p_ns)
    resume_g = pause_g if stopped else pause_g + p_ns
    s = synth(4, truth, n=200, seconds=19.9, one_way=0)
    s += synth(5, truth, n=200, seconds=20.0, one_way=0, start=resume_g + 100 * MS)
    a = estimate(s, pauses=[pause])
    assert len(a.segments) == 2
    jump = a.segments[1].jump_ns
    assert jump is not None
    assert abs(jump - (p_ns if stopped else 0)) < 2 * MS
    assert any(("stopped" if stopped else "kept running") in n for n in a.notes)
    for g in (G0 + 5 * 1_000_000_000, resume_g + 5 * 1_000_000_000):
        assert abs(a.to_host(g) - truth(g)) <= (a.bound_ns or 0)


def test_segment_without_samples_inherits_with_a_wider_bound() -> None:
    truth = linear_truth(skew_ppm=0.0)
    h = truth(G0 + 30 * 1_000_000_000)
    a = estimate(synth(6, truth, n=200, seconds=20.0, one_way=0),
                 pauses=[Pause(h, h + 500 * MS)])
    assert [s.method for s in a.segments] == ["interval", "inherited"]
    assert (a.segments[1].bound_ns or 0) >= (a.segments[0].bound_ns or 0) + 250 * MS
    assert a.bound_ns == a.segments[1].bound_ns


def test_samples_straddling_a_pause_are_dropped() -> None:
    truth = linear_truth(skew_ppm=0.0)
    h = truth(G0 + 10 * 1_000_000_000)
    pause = Pause(h, h + 100 * MS)
    inside = SyncSample.one_way(G0 + 10 * 1_000_000_000, h + 50 * MS)
    just_after = SyncSample.one_way(G0 + 10 * 1_000_000_000, h + 110 * MS)
    a = estimate(synth(7, truth, n=100, seconds=9.0, one_way=0) + [inside, just_after],
                 pauses=[pause])
    assert any("2 sample(s) dropped" in n for n in a.notes)


def test_json_round_trip_preserves_the_mapping() -> None:
    truth = linear_truth(skew_ppm=-42.0)
    h = truth(G0 + 30 * 1_000_000_000)
    a = estimate(synth(8, truth, n=200, seconds=60.0, one_way=0), pauses=[Pause(h, h + 10 * MS)])
    b = Alignment.from_json(a.to_json())
    assert b == a
    for g in (G0, G0 + 31 * 1_000_000_000, G0 + 59 * 1_000_000_000):
        assert a.to_host(g) == b.to_host(g)
    j = a.to_json()
    for key in ("offset_ns", "skew_ppm", "ref_guest_ns", "bound_ns", "n_samples", "method"):
        assert key in j


def test_zero_skew_prior_fits_a_constant_offset() -> None:
    truth = linear_truth(skew_ppm=0.0)
    a = estimate(synth(9, truth, n=200, one_way=0), max_skew_ppm=0.0)
    assert a.skew_ppm == 0.0 and (a.bound_ns or 0) < 1 * MS
    assert abs(a.to_host(G0) - truth(G0)) <= (a.bound_ns or 0)


def test_fixed_alignment() -> None:
    a = Alignment.fixed(1000, bound_ns=5)
    assert a.to_host(10) == 1010 and a.bound_ns == 5 and a.method == "fixed"
    assert Segment(0, 0.0, 0, None, 0, "x").to_guest(123) == 123


def test_console_lines_become_samples() -> None:
    assert parse_printk("[   12.345678] hello") == (12_345_678_000, "hello")
    assert parse_printk("<6>[    0.000001] x") == (1000, "x")
    assert parse_printk("no stamp") is None
    lines = [(EPOCH + 12_348_000_000, "[   12.345678] rebalab-sync abc"),
             (EPOCH + 12_350_000_000, "[   12.347000] snd_hda_intel 0000:01:00.0: probe"),
             (EPOCH + 12_351_000_000, "plain line")]
    s = samples_from_console(lines, {"abc": EPOCH + 12_345_000_000})
    assert [x.kind for x in s] == ["two-way", "one-way"]
    lo, hi = s[0].offset_bounds()
    assert lo == EPOCH + 12_345_000_000 - 12_345_678_000 - 1000
    assert hi == EPOCH + 12_348_000_000 - 12_345_678_000
    assert SyncSample.from_json(s[0].to_json()) == s[0]


def test_paired_evidence_and_pauses_from_events() -> None:
    before = SyncSample.paired(100, 1000, guest_stamp_first=True)
    after = SyncSample.paired(100, 1000, guest_stamp_first=False)
    assert before.offset_bounds() == (None, 900)
    assert after.offset_bounds() == (900, None)
    evs = [Event(10, Source.HOST_QMP, Kind.PAUSE), Event(30, Source.HOST_QMP, Kind.RESUME),
           Event(50, Source.HOST_QMP, Kind.PAUSE), Event(70, Source.HOST_LAB, Kind.OPERATION)]
    assert pauses_from_events(evs) == (Pause(10, 30), Pause(50, 70))
