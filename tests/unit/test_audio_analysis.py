"""Audio capture analysis: signal, robust WAV reading, gaps, jumps, timing, speed."""

from __future__ import annotations

import io
import struct
import time
import wave
from pathlib import Path

import pytest

from lab.audio_analysis import (CYCLE, AudioFormatError, AudioTimebase, analyze, cycle_table,
                                generate_pcm, generate_signal, signal_frequency, write_signal)
from lab.clock import Pause
from lab.events import DeviceId, Kind, Source

FB = 4
RATE = 44100


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
    assert r.events(AudioTimebase(0)) == []
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
    assert [e.kind for e in evs] == [Kind.AUDIO_GAP]
    e = evs[0]
    assert e.source == Source.HOST_AUDIO and e.device == DeviceId(qom="snd0")
    assert e.duration_ns == 10_000_000 and e.data["frames"] == 441
    assert e.t_host_ns == start + 1_000_000_000 + 1_000_000_000     # 1 s of audio + the pause
    assert e.data["t_uncertainty_ns"] == tb.uncertainty_ns
    # progress checkpoints take over the mapping
    tb2 = AudioTimebase(start, progress=((start, 0), (start + 2_000_000_000, RATE)))
    assert tb2.host_ns(RATE // 2) == start + 1_000_000_000
    assert tb2.host_ns(RATE + RATE) == start + 3_000_000_000


def test_discontinuity_events(tmp_path: Path) -> None:
    r = analyze(cap(tmp_path, sig(0, 1000), sig(1441, 1000), sig(2000, 1000)))
    evs = r.events(AudioTimebase(0))
    assert [(e.kind, e.data["cause"], e.data["jump"]) for e in evs] == [
        (Kind.AUDIO_DISCONTINUITY, "drop", 441), (Kind.AUDIO_DISCONTINUITY, "repeat", -441)]
    assert evs[0].duration_ns == 10_000_000


def test_stalls_from_progress(tmp_path: Path) -> None:
    p = cap(tmp_path, sig(0, 2 * RATE))
    ms = 1_000_000
    progress = [(0, 0), (100 * ms, 4410), (200 * ms, 8820), (500 * ms, 8820),   # 300 ms stall
                (600 * ms, 13230), (700 * ms, 17640), (900 * ms, 17640),         # paused: ok
                (1000 * ms, 22050)]
    r = analyze(p, progress=progress, pauses=[Pause(700 * ms, 900 * ms)])
    stalls = [i for i in r.issues if i.kind == "stall"]
    assert [(i.frame, i.stall_ns) for i in stalls] == [(8820, 300 * ms)]
    assert r.summary.stalls == 1 and r.summary.longest_stall_ms == 300.0
    [e] = r.events(AudioTimebase(0, progress=tuple(progress)))
    assert e.kind == Kind.AUDIO_GAP and e.data["cause"] == "stall" and e.duration_ns == 300 * ms


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
