"""The monotone fit for a guest clock that counts instructions (``--record``).

The clocks here are made up but shaped like the measured one: a recorded iteration's
guest clock ran up to 5.8 % ahead of the host's over 7 s, and unevenly (a 597 ms
stretch of guest time took 110 ms of host time). Samples are what the lab takes: a
burst of two-way tokens at both ends, one token per step, a console line now and then
(one-way). The property that matters: wherever the fit says it is within ``bound``,
the true host instant is within it."""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.clock import Pause, SyncSample, estimate, estimate_monotone

MS = 1_000_000
H0 = 1_796_000_000_000_000_000          # a host epoch in ns


class Clock:
    """host(g): piecewise linear and increasing through ``knots`` (guest ns, host ns)."""

    def __init__(self, knots: Sequence[tuple[int, int]]) -> None:
        self.g = [k[0] for k in knots]
        self.h = [k[1] for k in knots]

    def host(self, g: int) -> int:
        i = min(max(bisect.bisect_right(self.g, g) - 1, 0), len(self.g) - 2)
        g0, g1, h0, h1 = self.g[i], self.g[i + 1], self.h[i], self.h[i + 1]
        return h0 + (h1 - h0) * (g - g0) // (g1 - g0)


def two_way(c: Clock, g: int, before: int, after: int) -> SyncSample:
    h = c.host(g)
    return SyncSample.two_way("t", h - before, g, h + after)


def burst(c: Clock, g0: int, rng: random.Random, n: int = 24) -> list[SyncSample]:
    return [two_way(c, g0 + k * 5 * MS, rng.randint(200_000, 3 * MS), rng.randint(1 * MS, 4 * MS))
            for k in range(n)]


def uneven() -> Clock:
    # 15.8 s .. 23.2 s of guest time over ~7 s of host: fast, then a 597 ms jump in 110 ms
    return Clock([(15_800 * MS, H0), (20_280 * MS, H0 + 4_300 * MS),
                  (20_880 * MS, H0 + 4_410 * MS), (23_200 * MS, H0 + 7_000 * MS)])


def samples_for(c: Clock, marks: Sequence[int], rng: random.Random) -> list[SyncSample]:
    s = burst(c, 15_800 * MS, rng) + burst(c, 23_000 * MS, rng)
    s += [two_way(c, g, rng.randint(100_000, 2 * MS), rng.randint(2 * MS, 30 * MS)) for g in marks]
    # console lines: an upper bound each, arriving 2-40 ms late
    s += [SyncSample.one_way(g, c.host(g) + rng.randint(2 * MS, 40 * MS))
          for g in range(16_000 * MS, 23_000 * MS, 137 * MS)]
    return s


MARKS = [16_900 * MS, 18_700 * MS, 19_950 * MS, 20_250 * MS, 21_100 * MS, 22_400 * MS]


def test_a_clock_no_line_fits_is_fitted_within_its_bound_everywhere() -> None:
    rng = random.Random(7)
    c = uneven()
    samples = samples_for(c, MARKS, rng)
    lines = estimate(samples)
    assert lines.bound_ns is None and lines.method == "minimax-inconsistent"   # the old fit
    a = estimate_monotone(samples)
    assert a.method == "monotone" and a.bound_ns is not None
    assert "monotone fit" in a.notes[0]
    for g in range(15_800 * MS, 23_100 * MS, 3 * MS):
        err = abs(a.to_host(g) - c.host(g))
        bound = a.bound_at(g)
        assert bound is not None and err <= bound, (g, err, bound)


def test_an_event_between_two_step_marks_lands_between_them() -> None:
    """What phase attribution needs: the race's oops (guest 20.287 s, inside the jump)
    maps between the host instants of the marks around it, not into an earlier step."""
    rng = random.Random(3)
    c = uneven()
    a = estimate_monotone(samples_for(c, MARKS, rng))
    h = a.to_host(20_287 * MS)
    assert c.host(20_250 * MS) - 2 * MS <= h <= c.host(21_100 * MS) + 30 * MS
    # the line fit puts it far off: more than 100 ms from the truth
    assert abs(estimate(samples_for(c, MARKS, random.Random(3))).to_host(20_287 * MS)
               - c.host(20_287 * MS)) > 100 * MS


def test_more_marks_give_a_tighter_bound() -> None:
    c = uneven()
    sparse = estimate_monotone(samples_for(c, [], random.Random(1)))
    dense = estimate_monotone(samples_for(c, MARKS, random.Random(1)))
    assert sparse.bound_ns is not None and dense.bound_ns is not None
    assert dense.bound_ns < sparse.bound_ns


def test_samples_that_contradict_a_forward_clock_fall_back_to_lines_and_say_so() -> None:
    c = Clock([(0, H0), (10_000 * MS, H0 + 10_000 * MS)])
    rng = random.Random(5)
    s = burst(c, 0, rng) + burst(c, 9_000 * MS, rng)
    # a later guest instant that the host saw before an earlier one was even sent
    s.append(SyncSample.one_way(8_000 * MS, H0 + 100 * MS))
    a = estimate_monotone(s)
    assert a.method != "monotone"
    assert any("contradict a forward-moving clock" in n for n in a.notes), a.notes


def test_pauses_and_a_lack_of_two_way_samples_use_the_line_fit() -> None:
    c = Clock([(0, H0), (10_000 * MS, H0 + 10_000 * MS)])
    s = burst(c, 0, random.Random(2)) + burst(c, 9_000 * MS, random.Random(3))
    paused = estimate_monotone(s, pauses=[Pause(H0 + 5_000 * MS, H0 + 5_100 * MS)])
    assert paused.method != "monotone"
    one_way = [SyncSample.one_way(g, c.host(g) + 3 * MS) for g in range(0, 9_000 * MS, 500 * MS)]
    assert estimate_monotone(one_way).method != "monotone"


def test_one_anchor_is_a_constant_offset_with_its_own_half_width() -> None:
    c = Clock([(0, H0), (10_000 * MS, H0 + 10_000 * MS)])
    a = estimate_monotone([two_way(c, 5_000 * MS, 1 * MS, 3 * MS)])
    assert a.method == "monotone" and len(a.segments) == 1
    assert abs(a.to_host(5_000 * MS) - c.host(5_000 * MS)) <= 2 * MS
    assert a.bound_ns == (4 * MS + 1000) // 2 + 1   # + printk's 1 us resolution, + rounding


@settings(max_examples=150, deadline=None)
@given(rates=st.lists(st.floats(0.2, 5.0), min_size=1, max_size=8),
       marks=st.lists(st.integers(1, 9_999), max_size=12),
       seed=st.integers(0, 2**31))
def test_property_the_true_instant_is_within_the_bound_between_the_anchors(
        rates: list[float], marks: list[int], seed: int) -> None:
    """Any increasing clock, any step marks: inside the anchored range the error never
    exceeds the stated bound."""
    rng = random.Random(seed)
    knots, h = [], H0
    span = 10_000 * MS
    for k, r in enumerate(rates + [1.0]):
        g = k * span // len(rates)
        knots.append((g, h))
        h += int(span // len(rates) * r)
    c = Clock(knots[:len(rates) + 1])
    s = burst(c, 0, rng, 8) + burst(c, span - 40 * MS, rng, 8)
    s += [two_way(c, m * MS, rng.randint(0, 5 * MS), rng.randint(0, 50 * MS)) for m in marks]
    s += [SyncSample.one_way(g, c.host(g) + rng.randint(0, 60 * MS))
          for g in range(0, span, span // 17)]
    a = estimate_monotone(s)
    assert a.method == "monotone"
    lo = min(x.g_ns for x in s if x.kind == "two-way")
    hi = max(x.g_ns for x in s if x.kind == "two-way")
    for g in range(lo, hi, (hi - lo) // 97 or 1):
        bound = a.bound_at(g)
        assert bound is not None and abs(a.to_host(g) - c.host(g)) <= bound
    # and every sample's own ceiling holds at its instant (a line relayed at time h was
    # never placed after h), its floor too where it has one
    for x in s:
        if lo <= x.g_ns <= hi:
            assert x.not_after_ns is None or a.to_host(x.g_ns) <= x.not_after_ns + 1
            assert x.not_before_ns is None or \
                a.to_host(x.g_ns) >= x.not_before_ns - x.g_resolution_ns - 1


def test_the_console_line_of_an_event_bounds_it_when_the_next_token_echoes_late() -> None:
    """Seen under --record: after the oops the guest echoed no token for 4.4 s, and a
    line through the race's first token and the closing burst placed the oops after the
    race. The oops's own console line (received 18 ms after it) is a ceiling, the
    race's token a floor: the oops lands between them."""
    c = Clock([(15_000 * MS, H0), (16_600 * MS, H0 + 400 * MS),
               (20_900 * MS, H0 + 3_000 * MS), (21_100 * MS, H0 + 3_200 * MS)])
    rng = random.Random(11)
    race_start = two_way(c, 15_420 * MS, 1 * MS, 2 * MS)
    oops_g = 16_551 * MS
    s = burst(c, 15_000 * MS, rng, 4) + [race_start] + burst(c, 20_910 * MS, rng, 4)
    s.append(SyncSample.one_way(oops_g, c.host(oops_g) + 18 * MS))
    a = estimate_monotone(s)
    h = a.to_host(oops_g)
    assert c.host(15_420 * MS) - 1 * MS <= h <= c.host(oops_g) + 18 * MS
    bound = a.bound_at(oops_g)
    assert bound is not None and abs(h - c.host(oops_g)) <= bound


def test_a_line_relayed_at_once_is_placed_near_its_receipt_in_a_long_silent_step() -> None:
    """Seen under --record with the planted slow remove(): 4 s with no token echoed.
    The kprobe line of remove()'s return reaches back to the step's token (a 4 s
    interval); its middle put the return 2.1 s after the entry where the receipts said
    4.2 s. A line is relayed at once, so it is placed at its receipt less the quickest
    token's half-width, and the bound still holds."""
    c = Clock([(10_000 * MS, H0), (20_000 * MS, H0 + 10_000 * MS)])
    rng = random.Random(4)
    s = burst(c, 10_000 * MS, rng, 6) + burst(c, 19_000 * MS, rng, 6)
    s.append(two_way(c, 12_000 * MS, 1 * MS, 2 * MS))                  # the step's token
    enter_g, exit_g = 12_060 * MS, 16_300 * MS
    s += [SyncSample.one_way(enter_g, c.host(enter_g) + 4 * MS),
          SyncSample.one_way(exit_g, c.host(exit_g) + 6 * MS)]
    a = estimate_monotone(s)
    assert abs(a.to_host(exit_g) - c.host(exit_g)) <= 10 * MS
    measured = a.to_host(exit_g) - a.to_host(enter_g)
    assert abs(measured - (c.host(exit_g) - c.host(enter_g))) <= 15 * MS
    for g in (enter_g, exit_g, 14_000 * MS):
        bound = a.bound_at(g)
        assert bound is not None and abs(a.to_host(g) - c.host(g)) <= bound
