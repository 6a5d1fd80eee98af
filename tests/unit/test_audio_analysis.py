"""Audio capture analysis: signal, robust WAV reading, gaps, jumps, timing, speed."""

from __future__ import annotations

import io
import random
import struct
import time
import wave
from pathlib import Path
from typing import Any

import pytest

from lab.audio_analysis import (CYCLE, DEFAULT_MIN_GAP_MS, RESTART_SLACK_FRAMES, AudioAnalysis,
                                AudioFormatError, AudioTimebase, SimulatedCapture, analyze,
                                analyze_pcm, analyze_window, cycle_table, generate_pcm,
                                generate_signal, read_wav, signal_frequency, simulate_capture,
                                write_signal)
from lab.clock import Pause
from lab.events import DeviceId, Event, Kind, Source

FB = 4
RATE = 44100
MS = 1_000_000


def wav(pcm: bytes, *, sizes: bool = True, rate: int = RATE) -> bytes:
    """A WAV as QEMU writes it: sizes filled on clean close, zero after SIGKILL."""
    n = len(pcm) if sizes else 0
    return (b"RIFF" + struct.pack("<I", 36 + n if sizes else 0) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, rate, rate * FB, FB, 16)
            + b"data" + struct.pack("<I", n) + pcm)


def silence(frames: int) -> bytes:
    return bytes(frames * FB)


def cap(tmp_path: Path, *parts: bytes, sizes: bool = True, name: str = "audio.wav") -> Path:
    p = tmp_path / name
    p.write_bytes(wav(b"".join(parts), sizes=sizes))
    return p


def sig(start: int, frames: int) -> bytes:
    return generate_pcm(frames, start_counter=start)


def fns(frames: int) -> int:
    """Frames as nanoseconds of audio."""
    return round(frames * 1e9 / RATE)


def inner(r: AudioAnalysis, tb: AudioTimebase | None = None) -> list[Event]:
    """The events about the inside of the streams (not start/stop/resume)."""
    return [e for e in r.events(tb) if e.kind in (Kind.AUDIO_GAP, Kind.AUDIO_DISCONTINUITY)]


def test_generated_signal_is_a_valid_wav_with_the_counter(tmp_path: Path) -> None:
    data = generate_signal(2.0)
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == \
            (2, 2, RATE, 2 * RATE)
        frames = w.readframes(70000)
    left, right = struct.unpack_from("<hh", frames, 65537 * FB)
    assert right == 1                                         # counter wrapped at 65536
    assert signal_frequency() == pytest.approx(999.94, abs=0.01)
    table = cycle_table()[: CYCLE * FB]
    assert all(table[i:i + FB] != b"\0\0\0\0" for i in range(0, len(table), FB))
    p = write_signal(tmp_path / "play.wav", 1.0)
    assert p.stat().st_size == 44 + RATE * FB


def test_clean_capture_with_lead_in_and_tail(tmp_path: Path) -> None:
    r = analyze(cap(tmp_path, silence(5000), sig(0, 3 * RATE), silence(777)))
    s = r.summary
    assert s.signal == "counter" and r.issues == ()
    assert (s.stream_start_frame, s.stream_end_frame) == (5000, 5000 + 3 * RATE)
    assert s.header_sizes_ok and not s.truncated and s.gaps == 0


def test_killed_qemu_header_and_torn_frame(tmp_path: Path) -> None:
    p = cap(tmp_path, sig(0, RATE), sizes=False)
    with open(p, "ab") as f:
        f.write(b"\x01\x02\x03")                              # half a frame
    s = analyze(p).summary
    assert not s.header_sizes_ok and s.truncated and s.frames == RATE
    assert s.signal == "counter" and s.discontinuities == 0


def test_gap_with_and_without_lost_signal(tmp_path: Path) -> None:
    a = 20000
    r = analyze(cap(tmp_path, sig(0, a), silence(441), sig(a, 10000),        # inserted
                    silence(882), sig(a + 10000 + 882, 10000)))             # replaced
    gaps = [i for i in r.issues if i.kind == "gap"]
    assert [(i.frame, i.frames) for i in gaps] == [(a, 441), (a + 441 + 10000, 882)]
    jumps = [i for i in r.issues if i.kind == "discontinuity"]
    assert [(i.frame, i.jump) for i in jumps] == [(a + 441 + 10000 + 882, 882)]
    s = r.summary
    assert s.gaps == 2 and s.longest_gap_ms == pytest.approx(20.0)
    assert s.total_gap_ms == pytest.approx(30.0) and s.dropped_frames == 882


def test_drop_repeat_and_garbage(tmp_path: Path) -> None:
    garbage = bytes((i * 37 + 11) % 256 for i in range(300 * FB))
    r = analyze(cap(tmp_path, sig(0, 30000), sig(31000, 30000),            # 1000 dropped
                    sig(59000, 20000),                                      # 2000 repeated
                    garbage, sig(79300, 5000)))                             # 300 unrecognised
    got = [(i.kind, i.frame, i.jump, i.frames) for i in r.issues]
    assert got == [("discontinuity", 30000, 1000, 0), ("discontinuity", 60000, -2000, 0),
                   ("unrecognised", 80000, 300, 300)]
    s = r.summary
    assert (s.dropped_frames, s.repeated_frames, s.unrecognised_frames) == (1000, 2000, 300)
    assert s.discontinuities == 3
    unrec = r.events(AudioTimebase(0))[-1]
    assert unrec.data["cause"] == "unrecognised" and unrec.duration_ns == round(300 * 1e9 / RATE)


def test_counter_wraps_without_a_false_jump(tmp_path: Path) -> None:
    r = analyze(cap(tmp_path, sig(CYCLE - 100, 3000)))
    assert r.issues == () and r.summary.signal == "counter"
    assert r.stream_span(AudioTimebase(1000)) == (1000, 1000 + round(3000 * 1e9 / RATE))


def test_short_gaps_are_counted_not_reported(tmp_path: Path) -> None:
    p = cap(tmp_path, sig(0, 1000), silence(10), sig(1000, 1000))
    r = analyze(p, min_gap_ms=1.0)
    assert r.summary.gaps == 0 and r.summary.short_gaps == 1
    assert [e.kind for e in r.events(AudioTimebase(0))] == [Kind.AUDIO_START]
    assert analyze(p, min_gap_ms=0.1).summary.gaps == 1


def test_unknown_signal_falls_back_to_gaps(tmp_path: Path) -> None:
    # the counter destroyed by a mixer (halved), plus a 20 ms dropout
    def halve(b: bytes) -> bytes:
        vals = struct.unpack(f"<{len(b) // 2}h", b)
        return struct.pack(f"<{len(vals)}h", *(v // 2 for v in vals))
    r = analyze(cap(tmp_path, halve(sig(1, 10000)), silence(882), halve(sig(10883, 10000))))
    assert r.summary.signal == "unknown"
    assert [(i.kind, i.frame, i.frames) for i in r.issues] == [("gap", 10000, 882)]


def test_silent_and_invalid_files(tmp_path: Path) -> None:
    assert analyze(cap(tmp_path, silence(1000))).summary.signal == "silent"
    bad = tmp_path / "x.wav"
    bad.write_bytes(b"not a wav at all")
    with pytest.raises(AudioFormatError, match="RIFF"):
        analyze(bad)
    eight = tmp_path / "8bit.wav"
    eight.write_bytes(b"RIFF" + struct.pack("<I", 40) + b"WAVE" + b"fmt "
                      + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 8000, 1, 8)
                      + b"data" + struct.pack("<I", 4) + b"\x80" * 4)
    with pytest.raises(AudioFormatError, match="16-bit"):
        analyze(eight)
    with pytest.raises(AudioFormatError, match="cannot read"):
        analyze(tmp_path / "missing.wav")


def test_events_and_time_mapping(tmp_path: Path) -> None:
    start = 1_700_000_000_000_000_000
    pause = Pause(start + 500_000_000, start + 1_500_000_000)    # 1 s pause at 0.5 s
    r = analyze(cap(tmp_path, sig(0, RATE), silence(441), sig(RATE, RATE)))
    tb = AudioTimebase(start, pauses=(pause,))
    evs = r.events(tb, DeviceId(qom="snd0"))
    assert [e.kind for e in evs] == [Kind.AUDIO_START, Kind.AUDIO_GAP]
    assert evs[0].t_host_ns == start and evs[0].data["counter"] == 0
    e = evs[1]
    assert e.source == Source.HOST_AUDIO and e.device == DeviceId(qom="snd0")
    assert e.duration_ns == 10_000_000 and e.data["frames"] == 441
    assert e.t_host_ns == start + 1_000_000_000 + 1_000_000_000     # 1 s of audio + the pause
    assert e.data["t_uncertainty_ns"] == tb.uncertainty_ns
    # progress checkpoints take over the mapping: a frame is paced back from the
    # checkpoint that first showed it (the file grows at most at the audio rate, so 1 s
    # of audio in 2 s means it stood still first, then played)
    tb2 = AudioTimebase(start, progress=((start, 0), (start + 2_000_000_000, RATE)))
    assert tb2.host_ns(RATE // 2) == start + 1_500_000_000
    assert tb2.host_ns(RATE + RATE) == start + 3_000_000_000


def test_discontinuity_events(tmp_path: Path) -> None:
    r = analyze(cap(tmp_path, sig(0, 1000), sig(1441, 1000), sig(2000, 1000)))
    evs = inner(r, AudioTimebase(0))
    assert [(e.kind, e.data["cause"], e.data["jump"]) for e in evs] == [
        (Kind.AUDIO_DISCONTINUITY, "drop", 441), (Kind.AUDIO_DISCONTINUITY, "repeat", -441)]
    assert evs[0].duration_ns == 10_000_000


def test_stalls_from_progress(tmp_path: Path) -> None:
    p = cap(tmp_path, sig(0, 2 * RATE))
    progress = [(0, 0), (100 * MS, 4410), (200 * MS, 8820), (500 * MS, 8820),   # 300 ms stall
                (600 * MS, 13230), (700 * MS, 17640), (900 * MS, 17640),         # paused: ok
                (1000 * MS, 22050)]
    r = analyze(p, progress=progress, pauses=[Pause(700 * MS, 900 * MS)])
    stalls = [i for i in r.issues if i.kind == "stall"]
    assert [(i.frame, i.stall_ns) for i in stalls] == [(8820, 300 * MS)]
    assert r.summary.stalls == 1 and r.summary.longest_stall_ms == 300.0
    # a stall ends a stream; here the same one went on (its counter continued)
    [o] = r.outages
    assert (o.last_good_frame, o.first_good_frame, o.counter_continued) == (8819, 8820, True)
    assert r.summary.streams == 2 and r.summary.discontinuities == 0
    evs = r.events(AudioTimebase(0, progress=tuple(progress)))
    assert [e.kind for e in evs] == [Kind.AUDIO_START, Kind.AUDIO_STOP, Kind.AUDIO_RESUMED]
    assert evs[2].duration_ns == 300 * MS + fns(1) and evs[2].t_host_ns == 500 * MS


def test_five_minutes_analyse_fast(tmp_path: Path) -> None:
    frames = 300 * RATE
    cut = 150 * RATE
    p = cap(tmp_path, sig(0, cut), silence(4410), sig(cut + 100, frames - cut - 100),
            sizes=False)
    t = time.perf_counter()
    r = analyze(p)
    elapsed = time.perf_counter() - t
    assert r.summary.gaps == 1 and r.summary.dropped_frames == 100
    assert elapsed < 2.0, f"5 min took {elapsed:.2f}s"


# ---- detection limits ----------------------------------------------------------------------

def test_detection_limit_silence_gaps(tmp_path: Path) -> None:
    """The shortest silence reported as a gap is ``min_gap_ms``: 44 frames (997.7 us) by
    default; with ``min_gap_ms=0`` a single zero frame (22.7 us) is one."""
    def gaps(frames: int, min_gap_ms: float = DEFAULT_MIN_GAP_MS) -> tuple[int, int, list[int]]:
        r = analyze(cap(tmp_path, sig(0, 5000), silence(frames), sig(5000, 5000)),
                    min_gap_ms=min_gap_ms)
        return r.summary.gaps, r.summary.short_gaps, [e.data["frames"] for e in inner(r)]
    assert gaps(43) == (0, 1, [])
    assert gaps(44) == (1, 0, [44]) and round(44 / RATE * 1e6, 1) == 997.7
    assert gaps(1, min_gap_ms=0) == (1, 0, [1]) and round(1 / RATE * 1e6, 1) == 22.7


def test_detection_limit_drops_repeats_and_garbage(tmp_path: Path) -> None:
    """One frame is enough: a counter that skips one (+1), repeats one (-1), one frame
    off by one bit. Jumps are modulo the 65536-frame cycle: up to 32767 frames (743 ms)
    they read right, beyond they alias, a whole cycle lost is invisible."""
    def issues(*parts: bytes) -> list[tuple[str, int, int | None, int]]:
        r = analyze(cap(tmp_path, *parts))
        return [(i.kind, i.frame, i.jump, i.frames) for i in r.issues]
    assert issues(sig(0, 5000), sig(5001, 5000)) == [("discontinuity", 5000, 1, 0)]
    assert issues(sig(0, 5000), sig(4999, 5000)) == [("discontinuity", 5000, -1, 0)]
    flipped = bytearray(sig(0, 10000))
    flipped[5000 * FB] ^= 1                                   # the LSB of one sample
    assert issues(bytes(flipped)) == [("unrecognised", 5000, 1, 1)]
    assert issues(sig(0, 5000), sig(5000 + 32767, 5000)) == [("discontinuity", 5000, 32767, 0)]
    assert issues(sig(0, 5000), sig(5000 + 40000, 5000)) == [("discontinuity", 5000, -25536, 0)]
    assert issues(sig(0, 5000), sig(5000 + CYCLE, 5000)) == []


# ---- time ----------------------------------------------------------------------------------

def test_frame_times_around_a_stall() -> None:
    # count 4410 first seen at 100 ms, still at 400 ms (a heartbeat), 4851 at 410 ms
    tb = AudioTimebase(0, progress=((0, 0), (100 * MS, 4410), (400 * MS, 4410),
                                    (410 * MS, 4851)))
    assert tb.host_ns(4409) == 100 * MS - fns(1)      # the last before the stall: before it
    assert tb.host_ns(4410) == 400 * MS               # the first after: 441 frames before 410
    ft = tb.frame_time(4410)
    assert ft.bounded and ft.uncertainty_ns == 10 * MS + 10 * MS     # poll window + a tick
    paused = AudioTimebase(0, progress=tb.progress, pauses=(Pause(405 * MS, 408 * MS),))
    assert paused.host_ns(4410) == 397 * MS           # pacing back skips the pause
    outside = tb.frame_time(5000)                     # after the last checkpoint
    assert not outside.bounded and outside.uncertainty_ns == tb.uncertainty_ns
    assert tb.poll_period_ns == 100 * MS              # the spacings into a change
    assert AudioTimebase(0, progress=tb.progress, poll_ns=10 * MS).poll_period_ns == 10 * MS


# ---- streams and outages ---------------------------------------------------------------------

def simulated(tmp_path: Path, streams: list[tuple[int, bytes]], end_ns: int,
              **kw: Any) -> tuple[Path, AudioAnalysis, SimulatedCapture]:
    sim = simulate_capture(streams, end_ns=end_ns, **kw)
    p = tmp_path / "sim.wav"
    p.write_bytes(sim.wav())
    r = analyze_window(p, end_frame=sim.progress[-1][1], progress=sim.progress)
    return p, r, sim


def test_outage_across_a_stall(tmp_path: Path) -> None:
    """Player 1 plays 2 s then 300 frames of silence fill and dies; 500 ms later player
    2 starts with 200 frames of silence, its counter from 0. The file has no trace of
    the outage (and QEMU's stdio buffer held the last 147 frames of player 1 until
    player 2 wrote); the checkpoints measure it."""
    s1 = sig(0, 2 * RATE) + silence(300)
    s2 = silence(200) + sig(0, 2 * RATE)
    t2 = fns(2 * RATE + 300) + 500 * MS
    _, r, sim = simulated(tmp_path, [(0, s1), (t2, s2)], t2 + 2000 * MS,
                          tick_phase_ns=4 * MS, poll_phase_ns=7 * MS)
    [o] = r.outages
    last, first = 2 * RATE - 1, 2 * RATE + 500
    assert (o.boundary_frame, o.last_good_frame, o.first_good_frame) == (88053, last, first)
    assert (o.restart_counter, o.counter_continued, o.silent_frames) == (0, False, 500)
    true = sim.nominal_ns(first) - sim.nominal_ns(last)
    assert true == 511_360_544                  # 500 ms + 300 + 200 frames of silence
    assert o.outage_ns == 508_140_590 and o.uncertainty_ns == 15 * MS   # 5 ms poll + tick
    assert o.outage_ns is not None and abs(o.outage_ns - true) <= o.uncertainty_ns
    s = r.summary
    assert (s.streams, s.outages_ms, s.longest_outage_ms, s.resumed) == (2, (508.141,), 508.141,
                                                                         True)
    assert (s.discontinuities, s.gaps, s.stalls) == (0, 0, 1)       # restart, fill: outage
    evs = r.events()
    assert [e.kind for e in evs] == [Kind.AUDIO_START, Kind.AUDIO_STOP, Kind.AUDIO_RESUMED]
    stop, resumed = evs[1], evs[2]
    assert stop.data["frame"] == last and stop.data["reason"] == "stall"
    assert stop.t_host_ns == o.stop_host_ns and resumed.t_host_ns == o.resume_host_ns
    assert resumed.duration_ns == o.outage_ns
    assert (resumed.data["outage_ms"], resumed.data["uncertainty_ms"],
            resumed.data["restart_counter"]) == (508.141, 15.0, 0)


@pytest.mark.parametrize(("log", "poll_ms", "jitter_ms"), [
    ("watch", 5, 0), ("watch", 5, 3), ("first-unchanged", 10, 0), ("first-unchanged", 10, 5)])
def test_outage_error_stays_inside_its_uncertainty(tmp_path: Path, log: str, poll_ms: int,
                                                   jitter_ms: int) -> None:
    """Random phases of QEMU's tick and the poll, fills, start-ups, outages, counters that
    restart or continue, both ways of logging checkpoints (lab.audio_capture's, and one
    that logs the first unchanged poll instead of the last): the measured outage is
    within the stated uncertainty, and that is a poll (plus its jitter) and a tick."""
    rng = random.Random(poll_ms + jitter_ms)
    for _ in range(60):
        n1 = rng.randrange(RATE // 2, 2 * RATE)
        fill, startup = rng.choice([0, rng.randrange(3000)]), rng.choice([0, rng.randrange(3000)])
        continued = rng.random() < 0.2
        s2 = silence(startup) + sig(n1 if continued else 0, RATE)
        t1 = rng.randrange(50 * MS)
        t2 = t1 + fns(n1 + fill) + rng.randrange(60, 900) * MS
        _, r, sim = simulated(tmp_path, [(t1, sig(0, n1) + silence(fill)), (t2, s2)],
                              t2 + 1000 * MS, tick_phase_ns=rng.randrange(10 * MS),
                              poll_phase_ns=rng.randrange(10 * MS), poll_ns=poll_ms * MS,
                              poll_jitter_ns=jitter_ms * MS, log=log, seed=rng.randrange(1000))
        [o] = r.outages
        assert r.summary.discontinuities == 0 and r.summary.gaps == 0 and r.summary.streams == 2
        assert o.first_good_frame is not None and o.outage_ns and o.uncertainty_ns
        if not (continued and fill == 0 and startup == 0):     # else: no seam in the data
            assert (o.last_good_frame, o.first_good_frame) == (n1 - 1, n1 + fill + startup)
        true = sim.nominal_ns(n1 + fill + startup) - sim.nominal_ns(n1 - 1)
        assert abs(o.outage_ns - true) <= o.uncertainty_ns
        assert o.uncertainty_ns <= (poll_ms + jitter_ms + 10) * MS


def test_drop_and_replay_inside_the_second_stream(tmp_path: Path) -> None:
    """After the restart (not a discontinuity): 100 ms of signal dropped, then a
    1024-frame buffer replayed."""
    a = 3 * RATE // 2
    s2 = sig(0, a) + sig(a + 4410, RATE) + sig(a + 4410 + RATE - 1024, RATE)
    t2 = fns(RATE) + 700 * MS
    _, r, _sim = simulated(tmp_path, [(0, sig(0, RATE)), (t2, s2)], t2 + fns(len(s2) // FB))
    got = [(i.kind, i.frame, i.jump) for i in r.issues if i.kind != "stall"]
    assert got == [("discontinuity", RATE + a, 4410), ("discontinuity", 2 * RATE + a, -1024)]
    s = r.summary
    assert (s.streams, s.discontinuities, s.dropped_frames, s.repeated_frames) == (2, 2, 4410, 1024)
    [o] = r.outages
    assert (o.first_good_frame, o.restart_counter) == (RATE, 0)
    disc = [(e.data["cause"], e.data["jump"], e.data["ms"]) for e in inner(r)]
    assert disc == [("drop", 4410, 100.0), ("repeat", -1024, 23.22)]


def test_replay_in_the_tail_before_a_stop(tmp_path: Path) -> None:
    """The stall was seen at frame 9500, but stdio held more of player 1, which replayed
    256 stale frames before dying: that replay is a discontinuity of stream 1; the
    restart is the jump to counter 0 after it. The last good frame was written before
    the stall, so it is timed from the frames before the stall, not by its late flush."""
    p = cap(tmp_path, sig(0, 9800), sig(9800 - 256, 256), silence(200), sig(0, 10000))
    progress = [(0, 0), (100 * MS, 4410), (200 * MS, 8820), (210 * MS, 9500), (890 * MS, 9500),
                (900 * MS, 10624), (910 * MS, 11065), (920 * MS, 11506)]
    r = analyze_window(p, end_frame=11506, progress=progress)
    assert [(i.kind, i.frame, i.jump) for i in r.issues] == [
        ("stall", 9500, None), ("discontinuity", 9800, -256)]
    [o] = r.outages
    assert (o.last_good_frame, o.first_good_frame, o.restart_counter) == (10055, 10256, 0)
    assert o.stop_host_ns == 210 * MS - fns(1) + fns(10055 - 9500 + 1)
    assert o.resume_host_ns == 900 * MS - fns(10624 - 10256)
    assert o.outage_ns == o.resume_host_ns - o.stop_host_ns


def test_a_stream_that_never_came_back(tmp_path: Path) -> None:
    sim = simulate_capture([(0, sig(0, 2 * RATE))], end_ns=3000 * MS)
    p = tmp_path / "sim.wav"
    p.write_bytes(sim.wav())
    end = sim.progress[-1][1]
    r = analyze_window(p, end_frame=end, progress=sim.progress, start_host_ns=0,
                       end_host_ns=3000 * MS)
    [o] = r.outages
    assert not o.resumed and o.last_good_frame == end - 1 and o.open_ns is not None
    s = r.summary
    assert (s.streams, s.resumed, s.outages_ms) == (1, False, ())
    assert s.open_outage_ms == pytest.approx(1000.0, abs=20.0)
    evs = r.events()
    assert [e.kind for e in evs] == [Kind.AUDIO_START, Kind.AUDIO_STOP]
    assert evs[1].data["resumed"] is False and evs[1].data["open_ms"] == s.open_outage_ms


def test_windows_of_one_capture(tmp_path: Path) -> None:
    """One file, two iterations; the cut falls inside the outage. Each window reads only
    its frames (garbage elsewhere does not matter), numbers frames from the file's start,
    and the second one skips the first player's tail that stdio flushed into it."""
    s1 = sig(0, 2 * RATE)
    s2 = silence(300) + sig(0, 2 * RATE)
    sim = simulate_capture([(0, s1), (3000 * MS, s2)], end_ns=5000 * MS, poll_jitter_ns=2 * MS)
    p = tmp_path / "life.wav"
    p.write_bytes(sim.wav())
    cut = 2500 * MS
    c = sim.count_at(cut)
    w1 = analyze_window(p, end_frame=c, progress=[x for x in sim.progress if x[0] <= cut],
                        start_host_ns=0, end_host_ns=cut)
    with open(p, "r+b") as f:                    # iteration 1's frames: garbage now
        f.seek(44 + 1000 * FB)
        f.write(bytes(range(256)) * 64)
    end = sim.progress[-1][1]
    w2 = analyze_window(p, start_frame=c, end_frame=end, start_host_ns=cut,
                        progress=[x for x in sim.progress if x[0] >= cut])
    assert c == 88053 and (w1.summary.window_start_frame, w1.summary.window_end_frame) == (0, c)
    assert (w1.summary.streams, w1.summary.resumed) == (1, False)
    assert w1.summary.open_outage_ms == pytest.approx(500.0, abs=20.0)
    s = w2.summary
    assert (s.window_start_frame, s.window_end_frame, s.frames) == (c, end, end - c)
    assert w2.leading_stall and w2.first_good_frame == 2 * RATE + 300
    assert (s.streams, s.resumed, s.discontinuities, s.gaps, s.stalls) == (1, True, 0, 0, 0)
    [start] = w2.events()
    assert start.kind == Kind.AUDIO_START and start.data["after_stall"] is True
    assert abs(start.t_host_ns - sim.nominal_ns(2 * RATE + 300)) <= start.data["t_uncertainty_ns"]
    assert analyze(p).summary.unrecognised_frames > 0            # the whole file sees it


def test_stalls_that_are_not_outages(tmp_path: Path) -> None:
    """No stream was playing yet (the VM booting), or the VM was paused."""
    p = cap(tmp_path, sig(0, RATE))
    boot = [(0, 0), (400 * MS, 0)] + [(400 * MS + k * 10 * MS, 441 * k) for k in range(1, 100)]
    r = analyze(p, progress=boot)
    assert r.outages == () and r.summary.streams == 1 and r.leading_stall
    assert [e.kind for e in r.events()] == [Kind.AUDIO_START]
    assert r.events()[0].t_host_ns == 400 * MS
    # the stream that starts after the idle file glitches early: its own, reported
    glitchy = cap(tmp_path, sig(0, 1000), sig(1100, RATE), name="glitchy.wav")
    r = analyze(glitchy, progress=boot)
    assert r.first_good_frame == 0 and [(i.kind, i.frame, i.jump) for i in r.issues] == [
        ("discontinuity", 1000, 100)]
    paused = [(0, 0), (100 * MS, 4410), (700 * MS, 4410), (710 * MS, 4851)]
    r = analyze(p, progress=paused, pauses=[Pause(105 * MS, 700 * MS)])
    assert r.outages == () and r.summary.stalls == 0


def test_restart_choice_and_slack(tmp_path: Path) -> None:
    """A jump more than RESTART_SLACK_FRAMES after the stall's frame is not the restart:
    it stays a discontinuity, and the stream is taken to have continued."""
    far = RESTART_SLACK_FRAMES + 100
    p = cap(tmp_path, sig(0, 10000 + far), sig(0, 10000))
    progress = [(0, 0), (200 * MS, 8820), (210 * MS, 10000), (800 * MS, 10000),
                (810 * MS, 10441), (1000 * MS, 20000 + far)]
    r = analyze_window(p, progress=progress)
    [o] = r.outages
    assert o.counter_continued and (o.last_good_frame, o.first_good_frame) == (9999, 10000)
    assert [(i.kind, i.frame, i.jump) for i in r.issues if i.kind != "stall"] == [
        ("discontinuity", 10000 + far, -(10000 + far))]


def test_outage_without_the_counter(tmp_path: Path) -> None:
    """A mixer destroyed the counter: good frames are non-silent ones; outages still."""
    def halve(b: bytes) -> bytes:
        vals = struct.unpack(f"<{len(b) // 2}h", b)
        return struct.pack(f"<{len(vals)}h", *(v // 2 for v in vals))
    p = cap(tmp_path, halve(sig(1, 10000)), silence(300), halve(sig(1, 10000)))
    progress = [(0, 0), (200 * MS, 8820), (210 * MS, 10100), (800 * MS, 10100),
                (810 * MS, 10541), (1000 * MS, 20300)]
    r = analyze_window(p, progress=progress)
    assert r.summary.signal == "unknown" and r.summary.gaps == 0
    [o] = r.outages
    assert (o.last_good_frame, o.first_good_frame, o.silent_frames) == (9999, 10300, 300)
    assert o.restart_counter is None and r.summary.streams == 2


def test_analyze_pcm_window_matches_the_file(tmp_path: Path) -> None:
    p = cap(tmp_path, sig(0, 30000), sig(31000, 30000), silence(500), sig(61500, 30000))
    info, data = read_wav(p)
    lo, hi = 20000, 70000
    a = analyze_window(p, start_frame=lo, end_frame=hi)
    b = analyze_pcm(data[lo * FB:hi * FB], info, start_frame=lo)
    assert a.issues == b.issues and [(i.kind, i.frame) for i in a.issues] == [
        ("discontinuity", 30000), ("gap", 60000), ("discontinuity", 60500)]
    sa, sb = a.summary.to_json(), b.summary.to_json()
    sa.pop("analysis_s"), sb.pop("analysis_s")
    assert sa == sb and sa["window_start_frame"] == lo and sa["window_end_frame"] == hi
    assert {"streams", "outages_ms", "longest_outage_ms", "resumed"} <= set(sa)


# ---- drops QEMU's HDA codec made itself (hda_audio_overrun) ---------------------------------

def test_a_codec_buffer_drop_beside_an_overrun_is_the_emulators(tmp_path: Path) -> None:
    # the capture of a loaded host: drops of 2048 frames (the codec's 8 KiB), 2000,
    # 2048 and 1000 frames (no codec drop has those two sizes)
    p = cap(tmp_path, sig(0, 10_000), sig(12_048, 10_000), sig(24_048, 10_000),
            sig(36_096, 10_000), sig(47_096, 5_000))
    r = analyze(p)
    assert r.summary.discontinuities == 4 and r.summary.emulator_drops == 0
    tb = AudioTimebase(0)
    r = AudioAnalysis(**{**r.__dict__, "clock": tb})
    at = [tb.host_ns(i.frame) for i in r.issues if i.kind == "discontinuity"]
    assert [i.jump for i in r.issues if i.kind == "discontinuity"] == [2048, 2000, 2048, 1000]
    # an overrun 5 ms after the first drop, one beside the 2000-frame drop, one 3 ms
    # before the third, one 400 ms after the fourth (too far)
    ex = r.excuse_emulator_drops([at[0] + 5 * MS, at[1], at[2] - 3 * MS, at[3] + 400 * MS])
    assert ex.summary.discontinuities == 2 and ex.summary.emulator_drops == 2
    assert ex.summary.dropped_frames == r.summary.dropped_frames - 2 * 2048
    causes = [e.data["cause"] for e in inner(ex)]
    assert causes == ["emulator-overrun", "drop", "emulator-overrun", "drop"]
    # one overrun explains one drop; a drop of another size is never the codec's
    one = r.excuse_emulator_drops([at[0], at[0] + MS])
    assert one.summary.emulator_drops == 1
    assert r.excuse_emulator_drops([at[3]]).summary.emulator_drops == 0
    assert r.excuse_emulator_drops([]) is r


def test_the_audio_rule_does_not_count_the_emulators_drops(tmp_path: Path) -> None:
    from lab.rules.audio import AudioRules
    from lab.rules.base import Limits, RuleContext
    from lab.timeline import Timeline

    r = analyze(cap(tmp_path, sig(0, 10_000), sig(12_048, 10_000)))
    tb = AudioTimebase(0)
    r = AudioAnalysis(**{**r.__dict__, "clock": tb})
    (drop,) = [i for i in r.issues if i.kind == "discontinuity"]
    dev = DeviceId(qom="snd0")
    ctx = RuleContext(devices=(dev,), limits=Limits())
    plain = Timeline.build({"audio": r.events(device=dev)})
    assert [v.rule for v in AudioRules().check(plain, ctx)] == ["audio.discontinuity"]
    ex = r.excuse_emulator_drops([tb.host_ns(drop.frame)])
    excused = Timeline.build({"audio": ex.events(device=dev)})
    assert AudioRules().check(excused, ctx) == []
    (ev,) = excused.select(kinds=Kind.AUDIO_DISCONTINUITY)
    assert ev.data["cause"] == "emulator-overrun"        # still on the timeline


def test_a_stall_ended_by_the_codecs_drop_is_no_stream_stop(tmp_path: Path) -> None:
    """The host stood still 200 ms (the file too), then the codec found its buffer full
    and dropped it: the file runs on with the counter 2048 further. Without the trace
    that reads as a stop and a restart; with an overrun beside it, as an excused drop."""
    s1 = sig(0, RATE)
    s2 = sig(RATE + 2048, RATE)
    t2 = fns(RATE) + 200 * MS
    _, r, _ = simulated(tmp_path, [(0, s1), (t2, s2)], t2 + 900 * MS,
                        tick_phase_ns=4 * MS, poll_phase_ns=7 * MS)
    [o] = r.outages
    assert (o.last_counter, o.restart_counter, o.first_good_frame) == (RATE - 1, RATE + 2048,
                                                                       o.last_good_frame + 1)
    assert r.summary.streams == 2
    assert o.resume_host_ns is not None
    # no overrun near the resume: the stop stands (a stream that stalled is no excuse)
    assert r.excuse_emulator_drops([o.resume_host_ns + 300 * MS]) is r
    ex = r.excuse_emulator_drops([o.resume_host_ns - 4 * MS])
    s = ex.summary
    assert (s.streams, s.outages_ms, s.longest_outage_ms, s.emulator_drops) == (1, (), 0.0, 1)
    assert ex.outages == () and s.discontinuities == 0
    kinds = [(e.kind, e.data.get("cause")) for e in ex.events()]
    assert kinds == [(Kind.AUDIO_START, None), (Kind.AUDIO_DISCONTINUITY, "emulator-overrun")]


def test_a_new_player_after_a_stall_is_a_restart_even_beside_an_overrun(tmp_path: Path) -> None:
    s1 = sig(0, RATE)
    t2 = fns(RATE) + 200 * MS
    _, r, _ = simulated(tmp_path, [(0, s1), (t2, sig(0, RATE))], t2 + 900 * MS)
    [o] = r.outages
    assert o.resume_host_ns is not None
    assert r.excuse_emulator_drops([o.resume_host_ns]) is r


def test_a_stall_the_late_audio_timer_explains_is_the_hosts(tmp_path: Path) -> None:
    """QEMU did not run for 200 ms: the file stood still, then the counter ran on
    frame after frame. With an ``audio_timer_delayed`` as long beside it, that is no
    stop of the guest's stream; a shorter delay, or one far away, explains nothing."""
    t2 = fns(RATE) + 200 * MS
    _, r, _ = simulated(tmp_path, [(0, sig(0, RATE)), (t2, sig(RATE, RATE))], t2 + 900 * MS,
                        tick_phase_ns=4 * MS, poll_phase_ns=7 * MS)
    [o] = r.outages
    assert o.counter_continued and r.summary.streams == 2 and o.resume_host_ns is not None
    t = o.resume_host_ns
    assert r.excuse_emulator_drops([], [(t, 50 * MS)]) is r            # too short
    assert r.excuse_emulator_drops([], [(t + 500 * MS, 200 * MS)]) is r  # too far
    assert r.excuse_emulator_drops([t], []) is r                        # no drop to explain
    ex = r.excuse_emulator_drops([], [(t - 2 * MS, 195 * MS)])
    s = ex.summary
    assert (s.streams, s.outages_ms, s.host_stalls, s.emulator_drops) == (1, (), 1, 0)
    evs = ex.events()
    assert [(e.kind, e.data.get("cause")) for e in evs] == [
        (Kind.AUDIO_START, None), (Kind.AUDIO_GAP, "emulator-delay")]
    assert evs[1].duration_ns == o.stall_ns
    # and the audio rule holds no such gap against the guest
    from lab.rules.audio import AudioRules
    from lab.rules.base import RuleContext
    from lab.timeline import Timeline
    dev = DeviceId(qom="snd0")
    tl = Timeline.build({"audio": ex.events(device=dev)})
    assert AudioRules().check(tl, RuleContext(devices=(dev,))) == []
