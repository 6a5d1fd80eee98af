"""The Windows clock exchange (issue 10, point 7): a dedicated round repeated until the
bound is small, the narrowest round kept, the bound reported.

The guest is a scripted agent on a fake host clock: each round advances the clock by a
forward delay, the guest's PowerShell start-up and a return delay that the test
chooses, and the guest answers with stamps of a clock whose true offset from the host
the test knows (optionally truncated to Windows' ~15.6 ms system-time resolution). So
the assertions are about the estimate against a known truth, never about wall time.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from lab import clock
from lab.errors import LabError
from lab.guest.windows.observation import start_alignment as windows_alignment
from lab.guest.windows.trace import clock_exchange
from lab.guest.windows.trace.common import FILETIME_UNIX_OFFSET
from lab.guest.windows.trace.tracer import WindowsTraceConfig, WindowsTracer
from lab.guest.windows.scripted_agent import FakeClock, ScriptedAgent, structured_stdout

MS = 1_000_000
TRUE_OFFSET = 3_217_654_321          # host - guest, ns
TICK = 15_625_000                    # the default Windows timer interval (64 Hz)


def filetime(host_ns: int, tick: int = 0) -> int:
    g = host_ns - TRUE_OFFSET
    if tick:
        g -= g % tick                # the stamp lags the instant by up to one tick
    return g // 100 + FILETIME_UNIX_OFFSET


def guest(fake: FakeClock, delays: Sequence[tuple[int, int, int]], tick: int = 0,
          setup_ns: int = 0) -> ScriptedAgent:
    """Answers the exchange: forward delay, guest start-up, return delay per round (the
    last triple repeats); the tracer's start scripts take ``setup_ns`` each."""
    rounds = iter(list(delays) + [delays[-1]] * 100)

    def exchange(script: str, params: dict[str, str]) -> str:
        fwd, startup, back = next(rounds)
        fake.advance(fwd)
        started = fake()
        fake.advance(startup)
        read = fake()
        fake.advance(back)
        return f"rebalab-clock {filetime(started, tick)} {filetime(read, tick)}\r\n"

    def slow(reply: str):  # type: ignore[no-untyped-def]
        def answer(script: str, params: dict[str, str]) -> str:
            fake.advance(setup_ns)
            return reply
        return answer

    agent = ScriptedAgent(clock=fake).on("rebalab-clock", exchange)
    agent.on("UtcOffsetMinutes", slow(structured_stdout([{"Length": 0, "GuestUtcFileTime": filetime(fake()),
                                                          "UtcOffsetMinutes": 0}])))
    agent.on("logman.exe", slow("")).on("New-Item -ItemType Directory", slow(""))
    return agent


def test_exchange_script_is_pinned() -> None:
    s = clock_exchange.exchange_script().script
    assert "$start = (Get-Process -Id $PID).StartTime.ToUniversalTime().ToFileTimeUtc()" in s
    assert "$now = [DateTime]::UtcNow.ToFileTimeUtc()" in s
    assert s.index("$start =") < s.index("$now =") < s.index("WriteLine('rebalab-clock '")


def test_rounds_stop_once_the_bound_is_small_and_the_narrowest_round_is_kept() -> None:
    fake = FakeClock()
    # a slow first round (busy guest), then fast ones; round 3 reaches the 20 ms target
    delays = [(400 * MS, 900 * MS, 300 * MS), (60 * MS, 250 * MS, 50 * MS), (8 * MS, 240 * MS, 6 * MS),
              (1 * MS, 200 * MS, 1 * MS)]
    lines: list[str] = []
    res = clock_exchange.exchange(guest(fake, delays), target_bound_ns=20 * MS, now=fake, log=lines.append,
                                  resolution_ns=0)
    assert len(res.samples) == 3, "stops at the first round that meets the target"
    assert res.best is res.samples[2] and res.bound_ns == 7 * MS       # (8 + 6) / 2
    a = res.alignment()
    assert a.method == "windows-clock-exchange" and a.bound_ns == res.bound_ns
    assert abs(a.offset_ns - TRUE_OFFSET) <= a.bound_ns      # type: ignore[operator]
    assert lines == [res.describe()] and "bound +/-7.0 ms" in lines[0] and "reached" in lines[0]
    assert "guest start-up 240.0 ms discounted" in lines[0]
    # the bound is in the alignment's JSON, which is what the timeline's header carries
    doc = a.to_json()
    assert doc["bound_ns"] == 7 * MS and "bound +/-7.0 ms" in doc["notes"][0]
    assert json.loads(clock_exchange.dumps(res))["bound_ns"] == 7 * MS


@pytest.mark.parametrize("delays", [
    [(5 * MS, 300 * MS, 90 * MS)],                         # asymmetric: slow return
    [(90 * MS, 10 * MS, 5 * MS), (30 * MS, 400 * MS, 30 * MS)],
    [(0, 0, 0)],                                           # degenerate: instant
])
def test_truth_is_within_the_bound_with_a_coarse_guest_clock(delays: list[tuple[int, int, int]]) -> None:
    fake = FakeClock(now_ns=1_700_000_000_123_456_789)
    res = clock_exchange.exchange(guest(fake, delays, tick=TICK), target_bound_ns=1, max_rounds=4, now=fake,
                                  resolution_ns=TICK)
    assert len(res.samples) == 4, "an unreachable target uses every round"
    lo, hi = res.best.offset_bounds()
    assert lo <= TRUE_OFFSET <= hi
    a = res.alignment()
    assert abs(a.to_host(0) - TRUE_OFFSET) <= a.bound_ns      # type: ignore[operator]
    assert "NOT reached" in res.describe()


def test_failed_rounds_are_skipped_and_no_answer_is_an_error() -> None:
    fake = FakeClock()
    answers = iter(["garbage\r\n", f"rebalab-clock {filetime(fake())} {filetime(fake())}\r\n"])
    agent = ScriptedAgent().on("rebalab-clock", lambda s, p: next(answers))
    res = clock_exchange.exchange(agent, max_rounds=2, now=fake, resolution_ns=0)
    assert len(res.samples) == 1 and len(res.failures) == 1 and "1 round(s) failed" in res.describe()
    dead = ScriptedAgent().on("rebalab-clock", (1, "", "powershell: access denied"))
    with pytest.raises(LabError, match="got no answer from the guest"):
        clock_exchange.exchange(dead, max_rounds=3, now=fake)


def test_contradictory_guest_stamps_fall_back_to_the_plain_interval() -> None:
    """A process start after the read (or longer ago than the round trip) cannot be; the
    sample is then only as good as Cristian's plain interval."""
    s = clock.ExchangeSample(h_send_ns=1000, h_recv_ns=2000, g_read_ns=500, g_start_ns=900)
    assert s.guest_ns == 0 and s.offset_bounds() == (500, 1500)
    s2 = clock.ExchangeSample(h_send_ns=1000, h_recv_ns=2000, g_read_ns=500, g_start_ns=-10_000)
    assert s2.guest_ns == 0


def test_tracer_start_gives_the_exchange_alignment_not_a_midpoint_of_its_scripts(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Before: the guest clock was read at the end of the start scripts and assumed read at
    their midpoint; with start scripts of 2 s each that put events seconds off."""
    fake = FakeClock()
    agent = guest(fake, [(3 * MS, 250 * MS, 3 * MS)], setup_ns=2_000 * MS)
    lines: list[str] = []
    tracer = WindowsTracer(WindowsTraceConfig(), out_dir=tmp_path, log=lines.append, now=fake)
    tracer.start(agent)
    a = tracer.alignment
    # (3 + 3 ms of transport + 16 ms of guest stamp resolution) / 2, not seconds
    assert a is not None and a.bound_ns == 11 * MS
    assert abs(a.to_host(0) - TRUE_OFFSET) <= a.bound_ns
    assert any(ln.startswith("windows clock exchange: bound +/-11.0 ms") for ln in lines)
    assert (tmp_path / "clock-exchange.json").is_file()
    # the older consumer (midpoint up to its own stamp, taken right after start) stays valid
    old = windows_alignment(tracer.clock_start, fake())
    assert old is not None and abs(old.to_host(0) - TRUE_OFFSET) <= old.bound_ns  # type: ignore[operator]


def test_tracer_start_survives_a_failed_exchange(tmp_path) -> None:  # type: ignore[no-untyped-def]
    fake = FakeClock()
    agent = guest(fake, [(1, 1, 1)])
    agent.handlers.insert(0, ("rebalab-clock", lambda s, p: (1, "", "denied")))
    tracer = WindowsTracer(WindowsTraceConfig(), out_dir=tmp_path, now=fake, clock_rounds=2)
    tracer.start(agent)
    assert tracer.alignment is None and tracer.clock_start is None
    assert any("clock exchange failed" in p for p in tracer.problems)
