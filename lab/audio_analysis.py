"""What the guest's playback sounded like on the host: gaps, drops and repeats.

The signal (``generate_signal``): 16-bit stereo where frame ``n`` is a pure function
of ``c = n mod 65536``:

- right channel: ``c`` itself, as a 16-bit two's-complement sample (a frame counter);
- left channel: a sine of exactly ``SINE_CYCLES`` (1486) periods per 65536 frames -
  999.94 Hz at 44.1 kHz - at -6 dBFS with a 45 degree phase offset, so no frame of
  the cycle is all zeros and silence is never mistaken for signal.

Because every frame is determined by the counter, the whole 65536-frame cycle is one
256 KiB table, and checking a capture is comparing large byte slices of the file
with the table (C speed: a 5-minute capture takes tens of milliseconds). A mismatch
is located by bisection and classified: a run of all-zero frames is a *gap*; a
counter that resumes elsewhere is a *discontinuity* (``jump`` frames of signal
missing when positive, repeated when negative - stale ring-buffer data replayed);
frames that fit no counter are *unrecognised*. The counter needs a bit-exact path
(QEMU ``hda-*`` with ``mixer=off``, the guest playing 44.1 kHz s16 stereo without
resampling or volume); if the counter is absent (a mixer scaled it) the analysis
falls back to gaps only (``summary.signal == "unknown"``). Jumps are modulo 65536
frames (1.486 s): a loss of exactly a cycle is invisible, larger ones alias.

Reading: QEMU's ``-audiodev wav`` writes the RIFF sizes only on a clean close; a
SIGKILLed QEMU leaves a 44-byte header with zero sizes. The data size is therefore
taken from the file size whenever the header's is zero, absurd, or larger than the
file, and a torn last frame is dropped (``summary.truncated``).

Timing (``AudioTimebase``): QEMU paces the wav backend by the virtual clock and
writes in audio-timer ticks (10 ms by default), and writes nothing while the VM is
paused (and nothing while no stream runs). Frame ``f`` maps to
``start + f/rate`` plus the length of every host-known pause that began before it.
That is good to roughly a timer tick plus the uncertainty of ``start`` (the host time
QEMU's audio started - about ±20 ms unless anchored), and it silently drifts once a
stream stops and restarts. Give ``progress`` checkpoints (host time, frames in the
file, from polling its size) and the mapping interpolates between them instead; the
same checkpoints reveal *stalls* - the file not growing while the VM ran inside the
stream - which leave no trace in the samples themselves.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from lab.clock import Pause
from lab.errors import LabError
from lab.events import DeviceId, Event, Kind, Source

RATE = 44100
CHANNELS = 2
SAMPLE_BYTES = 2
FRAME_BYTES = CHANNELS * SAMPLE_BYTES
CYCLE = 65536
SINE_CYCLES = 1486
AMPLITUDE = 16384
PHASE = math.pi / 4
#: frames that must match the counter pattern to (re)acquire lock
LOCK_FRAMES = 8
DEFAULT_MIN_GAP_MS = 1.0
DEFAULT_START_UNCERTAINTY_NS = 20_000_000


class AudioFormatError(LabError):
    """The capture is not a WAV file this analysis understands."""


# ---- the signal -----------------------------------------------------------------------

@lru_cache(maxsize=1)
def cycle_table() -> bytes:
    """One full counter cycle, twice (so any 65536-frame window is one slice), s16le."""
    frames = bytearray(CYCLE * FRAME_BYTES)
    pack = struct.pack_into
    w = 2 * math.pi * SINE_CYCLES / CYCLE
    for c in range(CYCLE):
        left = round(AMPLITUDE * math.sin(w * c + PHASE))
        right = c - CYCLE if c >= CYCLE // 2 else c
        pack("<hh", frames, c * FRAME_BYTES, left, right)
    return bytes(frames) * 2


def signal_frequency(rate: int = RATE) -> float:
    return rate * SINE_CYCLES / CYCLE


def generate_pcm(frames: int, start_counter: int = 0) -> bytes:
    """Raw s16le stereo frames of the test signal, beginning at ``start_counter``."""
    table = cycle_table()[: CYCLE * FRAME_BYTES]
    c0 = start_counter % CYCLE
    rotated = table[c0 * FRAME_BYTES:] + table[: c0 * FRAME_BYTES]
    full, rest = divmod(frames, CYCLE)
    return rotated * full + rotated[: rest * FRAME_BYTES]


def generate_signal(seconds: float, rate: int = RATE, start_counter: int = 0) -> bytes:
    """A complete WAV file (bytes) of the test signal, for the guest to play."""
    frames = round(seconds * rate)
    pcm = generate_pcm(frames, start_counter)
    header = _wav_header(rate, len(pcm))
    return header + pcm


def write_signal(path: str | os.PathLike[str], seconds: float, rate: int = RATE) -> Path:
    p = Path(path)
    p.write_bytes(generate_signal(seconds, rate))
    return p


def _wav_header(rate: int, data_bytes: int) -> bytes:
    return (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, CHANNELS, rate, rate * FRAME_BYTES,
                                    FRAME_BYTES, 8 * SAMPLE_BYTES)
            + b"data" + struct.pack("<I", data_bytes))


# ---- reading captures ------------------------------------------------------------------

@dataclass(frozen=True)
class WavInfo:
    rate: int
    channels: int
    sample_bytes: int
    data_offset: int
    data_bytes: int
    header_sizes_ok: bool          # False: sizes missing (QEMU killed) or wrong
    truncated: bool                # a torn last frame was dropped

    @property
    def frame_bytes(self) -> int:
        return self.channels * self.sample_bytes

    @property
    def frames(self) -> int:
        return self.data_bytes // self.frame_bytes


def parse_wav_header(head: bytes, file_size: int) -> WavInfo:
    """Find the format and the PCM data in a RIFF/WAVE file, trusting the file size
    over the header's sizes (see the module docstring)."""
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise AudioFormatError("not a RIFF/WAVE file (is the capture empty, or not "
                               "written by QEMU's wav audiodev?)")
    pos = 12
    fmt: tuple[int, int, int, int] | None = None
    while pos + 8 <= len(head):
        cid = head[pos:pos + 4]
        size = struct.unpack_from("<I", head, pos + 4)[0]
        body = pos + 8
        if cid == b"fmt ":
            if body + 16 > len(head):
                break
            tag, ch, rate, _br, _align, bits = struct.unpack_from("<HHIIHH", head, body)
            fmt = (tag, ch, rate, bits)
        elif cid == b"data":
            if fmt is None:
                raise AudioFormatError("WAV data chunk before its fmt chunk")
            tag, ch, rate, bits = fmt
            if tag not in (1, 0xFFFE) or bits != 16 or ch < 1 or rate <= 0:
                raise AudioFormatError(f"unsupported WAV format (tag {tag:#x}, {bits}-bit, "
                                       f"{ch} ch); the capture must be 16-bit PCM")
            avail = max(0, file_size - body)
            ok = 0 < size <= avail and size != 0xFFFFFFFF
            nbytes = size if ok else avail
            frame = ch * 2
            whole = nbytes - nbytes % frame
            return WavInfo(rate=rate, channels=ch, sample_bytes=2, data_offset=body,
                           data_bytes=whole, header_sizes_ok=ok,
                           truncated=whole != nbytes)
        pos = body + size + (size & 1)
    raise AudioFormatError("WAV file has no data chunk (the header is incomplete)")


def read_wav(path: str | os.PathLike[str]) -> tuple[WavInfo, bytes]:
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(65536)
            info = parse_wav_header(head, size)
            f.seek(info.data_offset)
            data = f.read(info.data_bytes)
    except OSError as exc:
        raise AudioFormatError(f"cannot read capture {p}: {exc}") from exc
    if len(data) < info.data_bytes:          # the file shrank under us
        n = len(data) - len(data) % info.frame_bytes
        data = data[:n]
        info = WavInfo(info.rate, info.channels, info.sample_bytes, info.data_offset, n,
                       info.header_sizes_ok, True)
    return info, data


# ---- results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioIssue:
    """One anomaly at a frame position in the capture.

    ``kind``: ``gap`` (``frames`` zero frames), ``discontinuity`` (the counter resumed
    ``jump`` frames away: >0 signal lost, <0 repeated), ``unrecognised`` (``frames``
    frames that fit no counter value), ``stall`` (the file stopped growing for
    ``stall_ns`` while the VM ran; from progress checkpoints).
    """

    kind: str
    frame: int
    frames: int = 0
    jump: int | None = None
    counter_before: int | None = None
    counter_after: int | None = None
    stall_ns: int | None = None


@dataclass(frozen=True)
class AudioSummary:
    rate: int
    channels: int
    frames: int
    duration_s: float
    header_sizes_ok: bool
    truncated: bool
    signal: str                      # "counter" | "unknown" | "silent"
    stream_start_frame: int | None
    stream_end_frame: int | None
    gaps: int
    longest_gap_ms: float
    total_gap_ms: float
    short_gaps: int
    discontinuities: int
    dropped_frames: int
    repeated_frames: int
    unrecognised_frames: int
    stalls: int = 0
    longest_stall_ms: float = 0.0
    analysis_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudioTimebase:
    """Maps capture frames to host time (see the module docstring for the model)."""

    start_host_ns: int
    rate: int = RATE
    pauses: tuple[Pause, ...] = ()
    progress: tuple[tuple[int, int], ...] = ()     # (host_ns, frames in the file)
    uncertainty_ns: int = DEFAULT_START_UNCERTAINTY_NS

    def host_ns(self, frame: int) -> int:
        pts = self.progress
        if len(pts) >= 2:
            for (h0, f0), (h1, f1) in zip(pts, pts[1:], strict=False):
                if f0 <= frame <= f1 and f1 > f0:
                    return h0 + round((frame - f0) * (h1 - h0) / (f1 - f0))
            h_last, f_last = pts[-1] if frame > pts[-1][1] else pts[0]
            return self._paced(h_last, frame - f_last)
        return self._paced(self.start_host_ns, frame)

    def _paced(self, h0: int, frames: int) -> int:
        t = h0 + round(frames * 1e9 / self.rate)
        for p in sorted(self.pauses, key=lambda p: p.start_ns):
            if h0 <= p.start_ns <= t:
                t += p.duration_ns
        return t


@dataclass(frozen=True)
class AudioAnalysis:
    summary: AudioSummary
    issues: tuple[AudioIssue, ...]
    min_gap_frames: int = 1

    def stream_span(self, timebase: AudioTimebase) -> tuple[int, int] | None:
        """Host times of the first and last non-silent frame (None: silent capture)."""
        s = self.summary
        if s.stream_start_frame is None or s.stream_end_frame is None:
            return None
        return timebase.host_ns(s.stream_start_frame), timebase.host_ns(s.stream_end_frame)

    def events(self, timebase: AudioTimebase, device: DeviceId | None = None) -> list[Event]:
        """The issues as timeline events (Source.HOST_AUDIO), gaps and discontinuities."""
        rate = self.summary.rate
        out: list[Event] = []
        for it in self.issues:
            t = timebase.host_ns(it.frame)
            base = {"frame": it.frame, "t_uncertainty_ns": timebase.uncertainty_ns,
                    "position_s": round(it.frame / rate, 6)}
            if it.kind in ("gap", "stall"):
                dur = it.stall_ns if it.kind == "stall" else round(it.frames * 1e9 / rate)
                if it.kind == "gap" and it.frames < self.min_gap_frames:
                    continue
                out.append(Event(t, Source.HOST_AUDIO, Kind.AUDIO_GAP, device, dur,
                                 data={**base, "cause": "silence" if it.kind == "gap" else "stall",
                                       "frames": it.frames,
                                       "ms": round((dur or 0) / 1e6, 3)}))
            else:
                frames = (it.frames if it.kind == "unrecognised" or it.jump is None
                          else abs(it.jump))
                cause = ("unrecognised" if it.kind == "unrecognised"
                         else "drop" if (it.jump or 0) > 0 else "repeat")
                out.append(Event(t, Source.HOST_AUDIO, Kind.AUDIO_DISCONTINUITY, device,
                                 round(frames * 1e9 / rate),
                                 data={**base, "cause": cause, "jump": it.jump,
                                       "frames": it.frames,
                                       "counter_before": it.counter_before,
                                       "counter_after": it.counter_after,
                                       "ms": round(frames * 1e3 / rate, 3)}))
        return out


# ---- analysis ------------------------------------------------------------------------------

def analyze(path: str | os.PathLike[str], *, min_gap_ms: float = DEFAULT_MIN_GAP_MS,
            progress: Sequence[tuple[int, int]] = (), pauses: Iterable[Pause] = (),
            min_stall_ms: float = 50.0) -> AudioAnalysis:
    """Analyse a capture file. ``progress``/``pauses`` enable stall detection."""
    t0 = time.perf_counter()
    info, data = read_wav(path)
    return analyze_pcm(data, info, min_gap_ms=min_gap_ms, progress=progress, pauses=pauses,
                       min_stall_ms=min_stall_ms, _t0=t0)


def analyze_pcm(data: bytes, info: WavInfo, *, min_gap_ms: float = DEFAULT_MIN_GAP_MS,
                progress: Sequence[tuple[int, int]] = (), pauses: Iterable[Pause] = (),
                min_stall_ms: float = 50.0, _t0: float | None = None) -> AudioAnalysis:
    t0 = _t0 if _t0 is not None else time.perf_counter()
    fb = info.frame_bytes
    n = len(data) // fb
    min_gap = max(1, round(min_gap_ms * info.rate / 1000))
    start = _zero_run(data, 0, n, fb)
    issues: list[AudioIssue] = []
    if start >= n:
        signal = "silent"
        s_start = s_end = None
    else:
        end = n - _zero_run_back(data, n, fb)
        s_start, s_end = start, end
        counter_ok = fb == FRAME_BYTES and _has_counter(data, start, end)
        if counter_ok:
            signal = "counter"
            issues = _walk(data, start, end)
        else:
            signal = "unknown"
            issues = _scan_gaps(data, start, end, fb, min_gap)
        if s_start is not None and s_end is not None:
            issues.extend(_stalls(progress, pauses, s_start, s_end, info.rate, min_stall_ms))
            issues.sort(key=lambda i: (i.frame, i.kind))
    gaps = [i for i in issues if i.kind == "gap" and i.frames >= min_gap]
    short = [i for i in issues if i.kind == "gap" and i.frames < min_gap]
    jumps = [i for i in issues if i.kind == "discontinuity"]
    unrec = [i for i in issues if i.kind == "unrecognised"]
    stalls = [i for i in issues if i.kind == "stall"]
    gap_ms = [i.frames * 1000 / info.rate for i in gaps]
    summary = AudioSummary(
        rate=info.rate, channels=info.channels, frames=n, duration_s=n / info.rate,
        header_sizes_ok=info.header_sizes_ok, truncated=info.truncated, signal=signal,
        stream_start_frame=s_start, stream_end_frame=s_end,
        gaps=len(gaps), longest_gap_ms=round(max(gap_ms, default=0.0), 3),
        total_gap_ms=round(sum(gap_ms), 3), short_gaps=len(short),
        discontinuities=len(jumps) + len(unrec),
        dropped_frames=sum(i.jump for i in jumps if i.jump and i.jump > 0),
        repeated_frames=-sum(i.jump for i in jumps if i.jump and i.jump < 0),
        unrecognised_frames=sum(i.frames for i in unrec),
        stalls=len(stalls),
        longest_stall_ms=round(max((i.stall_ns or 0 for i in stalls), default=0) / 1e6, 3),
        analysis_s=round(time.perf_counter() - t0, 4))
    return AudioAnalysis(summary=summary, issues=tuple(issues), min_gap_frames=min_gap)


def _counter(data: bytes, f: int) -> int:
    o = f * FRAME_BYTES + 2
    return data[o] | (data[o + 1] << 8)


def _match_len(data: bytes, f: int, c: int, limit: int) -> int:
    """How many frames from ``f`` follow the signal starting at counter ``c``
    (up to ``limit``): galloping slice comparisons, bisection on a mismatch."""
    table = cycle_table()
    fb = FRAME_BYTES
    n = 0
    step = 1024
    while n < limit:
        length = min(step, limit - n, CYCLE)
        cc = (c + n) & 0xFFFF
        a = (f + n) * fb
        if data[a:a + length * fb] == table[cc * fb:(cc + length) * fb]:
            n += length
            step = min(step * 4, CYCLE)
            continue
        lo, hi = 0, length
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if data[a + lo * fb:a + mid * fb] == table[(cc + lo) * fb:(cc + mid) * fb]:
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _locked(data: bytes, f: int, end: int) -> bool:
    need = min(LOCK_FRAMES, end - f)
    return need > 0 and _match_len(data, f, _counter(data, f), need) >= need


def _has_counter(data: bytes, start: int, end: int) -> bool:
    """Is this our signal? Probe a few positions rather than scanning everything."""
    span = end - start
    probes = [start + span * k // 16 for k in range(16)]
    for p in probes:
        for q in range(p, min(end, p + 64)):
            if _locked(data, q, end):
                return True
    return False


def _zero_run(data: bytes, f: int, end: int, fb: int = FRAME_BYTES) -> int:
    """All-zero frames from ``f`` (galloping comparisons against a zero block)."""
    n = 0
    step = 64
    while f + n < end:
        length = min(step, end - f - n)
        a = (f + n) * fb
        chunk = data[a:a + length * fb]
        if chunk.count(0) == len(chunk):
            n += length
            step = min(step * 4, 1 << 20)
            continue
        lo, hi = 0, length
        while hi - lo > 1:
            mid = (lo + hi) // 2
            part = data[a + lo * fb:a + mid * fb]
            if part.count(0) == len(part):
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _zero_run_back(data: bytes, end: int, fb: int = FRAME_BYTES) -> int:
    stripped = len(data[: end * fb].rstrip(b"\x00"))
    return end - (stripped + fb - 1) // fb


def _walk(data: bytes, start: int, end: int) -> list[AudioIssue]:
    issues: list[AudioIssue] = []
    f = start
    if not _locked(data, f, end):
        p = _reacquire(data, f, end)
        if p is None:
            return [AudioIssue("unrecognised", f, end - f)]
        issues.append(AudioIssue("unrecognised", f, p - f))
        f = p
    c = _counter(data, f)
    while f < end:
        m = _match_len(data, f, c, end - f)
        f += m
        c = (c + m) & 0xFFFF
        if f >= end:
            break
        z = _zero_run(data, f, end)
        if z:
            issues.append(AudioIssue("gap", f, z, counter_before=c))
        g = f + z
        if g >= end:
            break
        if _locked(data, g, end):
            v = _counter(data, g)
            jump = _signed16(v - c)
            if jump != 0:
                issues.append(AudioIssue("discontinuity", g, 0, jump=jump, counter_before=c,
                                         counter_after=v))
            f, c = g, v
            continue
        p = _reacquire(data, g, end)
        if p is None:
            issues.append(AudioIssue("unrecognised", g, end - g, counter_before=c))
            break
        v = _counter(data, p)
        issues.append(AudioIssue("unrecognised", g, p - g, jump=_signed16(v - c),
                                 counter_before=c, counter_after=v))
        f, c = p, v
    return issues


def _reacquire(data: bytes, g: int, end: int) -> int | None:
    """First frame after ``g`` from which the counter pattern holds again."""
    stride = 32
    p = g + 1
    while p < end:
        if _locked(data, p, end):
            # refine: the earliest q in (prev probe, p] already on the same pattern
            v = _counter(data, p)
            lo, hi = max(g + 1, p - stride), p
            while lo < hi:
                mid = (lo + hi) // 2
                cs = (v - (p - mid)) & 0xFFFF
                if _match_len(data, mid, cs, p - mid) == p - mid:
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        p += 1 if p - g < 64 else stride
    return None


def _scan_gaps(data: bytes, start: int, end: int, fb: int, min_frames: int) -> list[AudioIssue]:
    """Zero runs of at least ``min_frames`` inside ``[start, end)``, using bytes.find."""
    out: list[AudioIssue] = []
    pat = bytes(fb * max(1, min_frames))
    pos = start * fb
    stop = end * fb
    while pos < stop:
        o = data.find(pat, pos, stop)
        if o < 0:
            break
        f0 = (o + fb - 1) // fb
        z = _zero_run(data, f0, end, fb)
        if z >= min_frames:
            out.append(AudioIssue("gap", f0, z))
        pos = max((f0 + z) * fb, o + 1)
    return out


def _stalls(progress: Sequence[tuple[int, int]], pauses: Iterable[Pause], s_start: int,
            s_end: int, rate: int, min_ms: float) -> list[AudioIssue]:
    """Inside the stream, intervals where the file did not grow although the VM ran."""
    out: list[AudioIssue] = []
    ps = list(pauses)
    pts = sorted(progress)
    i = 0
    while i < len(pts) - 1:
        h0, f0 = pts[i]
        j = i
        while j + 1 < len(pts) and pts[j + 1][1] <= f0:
            j += 1
        if j > i and s_start < f0 < s_end:
            h1 = pts[j][0]
            paused = sum(max(0, min(p.end_ns, h1) - max(p.start_ns, h0)) for p in ps)
            stalled = h1 - h0 - paused
            if stalled > min_ms * 1e6:
                out.append(AudioIssue("stall", f0, 0, stall_ns=stalled))
        i = max(j, i + 1)
    return out


def _signed16(x: int) -> int:
    x &= 0xFFFF
    return x - 0x10000 if x >= 0x8000 else x
