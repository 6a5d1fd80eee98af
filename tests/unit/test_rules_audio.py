"""The audio rules on recorded host.audio events: gaps, glitches, outages, no resume."""

from __future__ import annotations

from lab.events import DeviceId, Event, Kind, Source
from lab.rules import check_all
from lab.rules.base import Limits, RuleContext
from lab.timeline import Timeline

SND = DeviceId(qom="snd0")
MS = 1_000_000


def ev(t_ms: float, kind: Kind, dur_ms: float | None = None, **data: object) -> Event:
    return Event(int(t_ms * MS), Source.HOST_AUDIO, kind, SND,
                 None if dur_ms is None else int(dur_ms * MS), data=dict(data))


def judge(events: list[Event], **limits: float | None) -> list[str]:
    tl = Timeline.build(events + [Event(0, Source.HOST_LAB, Kind.OPERATION,
                                        data={"name": "rebalance"}, duration_ns=500 * MS)])
    ctx = RuleContext.from_timeline(tl, devices=(SND,), limits=Limits(**limits))  # type: ignore[arg-type]
    return [str(v.signature) for v in check_all(tl, ctx, ["audio"])]


def test_a_clean_stream_with_a_measured_outage_passes() -> None:
    evs = [ev(10, Kind.AUDIO_START), ev(300, Kind.AUDIO_STOP, reason="stall"),
           ev(900, Kind.AUDIO_RESUMED, 600, outage_ms=600.0)]
    assert judge(evs) == []                                   # measured, not judged
    assert judge(evs, audio_max_outage_ms=1000) == []


def test_outage_over_the_limit() -> None:
    evs = [ev(10, Kind.AUDIO_START), ev(300, Kind.AUDIO_STOP),
           ev(2300, Kind.AUDIO_RESUMED, 2000, outage_ms=2000.0)]
    assert judge(evs, audio_max_outage_ms=1500) == ["audio.outage@snd0/after:rebalance"]


def test_not_resumed_only_when_a_resume_is_expected() -> None:
    evs = [ev(10, Kind.AUDIO_START), ev(300, Kind.AUDIO_STOP, resumed=False)]
    assert judge(evs) == []
    assert judge(evs, audio_max_outage_ms=1500) == ["audio.not-resumed@snd0/rebalance"]


def test_gaps_and_discontinuities() -> None:
    evs = [ev(10, Kind.AUDIO_START),
           ev(700, Kind.AUDIO_GAP, 5, cause="silence", ms=5.0),
           ev(800, Kind.AUDIO_GAP, 40, cause="silence", ms=40.0),
           ev(900, Kind.AUDIO_DISCONTINUITY, 100, cause="drop", jump=4410, ms=100.0),
           ev(950, Kind.AUDIO_DISCONTINUITY, 23, cause="repeat", jump=-1024, ms=23.2)]
    got = judge(evs)
    assert got == ["audio.gap@snd0/after:rebalance", "audio.discontinuity@snd0/after:rebalance"]
    assert judge(evs, audio_max_gap_ms=50, audio_max_discontinuities=2) == []


def test_limits_come_from_the_scenario_mapping() -> None:
    lim = Limits.from_mapping({"audio_max_outage_ms": 5000, "audio_max_gap_ms": "20"})
    assert lim.audio_max_outage_ms == 5000.0 and lim.audio_max_gap_ms == 20.0
    assert Limits().audio_max_outage_ms is None
