"""What the guest's playback sounded like on the host: gaps, drops, repeats and outages.

The signal (``generate_signal``): 16-bit stereo where frame ``n`` is a pure function
of ``c = n mod 65536``:

- right channel: ``c`` itself, as a 16-bit two's-complement sample (a frame counter);
- left channel: a sine of exactly ``SINE_CYCLES`` (1486) periods per 65536 frames -
  999.94 Hz at 44.1 kHz - at -6 dBFS with a 45 degree phase offset, so no frame of
  the cycle is all zeros and silence is never mistaken for signal.

Because every frame is determined by the counter, the whole 65536-frame cycle is one
256 KiB table, and checking a capture is comparing large byte slices of the file
with the table (C speed, no copies: a 10-minute window takes about ten milliseconds).
A mismatch is located by bisection and classified: a run of all-zero frames is a
*gap*; a counter that resumes elsewhere is a *discontinuity* (``jump`` frames of
signal missing when positive, repeated when negative - stale ring-buffer data
replayed); frames that fit no counter are *unrecognised*. The counter needs a
bit-exact path (QEMU ``hda-*`` with ``mixer=off``, the guest playing 44.1 kHz s16
stereo without resampling or volume); if the counter is absent (a mixer scaled it)
the analysis falls back to gaps only (``summary.signal == "unknown"``). Jumps are
modulo 65536 frames (1.486 s): a loss of exactly a cycle is invisible, and one of
32768 frames or more aliases (a drop of 40000 frames reads as a repeat of 25536).

Reading: QEMU's ``-audiodev wav`` writes the RIFF sizes only on a clean close; a
SIGKILLed QEMU leaves a 44-byte header with zero sizes. The data size is therefore
taken from the file size whenever the header's is zero, absurd, or larger than the
file, and a torn last frame is dropped (``summary.truncated``). One file covers a
whole VM life; ``analyze_window`` maps only the frames of one iteration (``mmap``:
only those pages are read), and reports frame numbers relative to the whole file.

Streams and outages. QEMU writes the file only while a playback stream runs and the
VM runs, so when the guest's player dies (a PCI rebalance unbinds the driver) and a
new one starts later, the file holds no trace of the outage: stream 2 follows stream
1 directly, its counter restarted. The outage is visible only in host time, through
progress checkpoints ``(host_ns, frames in the file)`` polled by the lab. A *stall*
is a frame count at which the file stood still for more than ``min_stall_ms`` of VM
running time (pauses excluded); each stall is a stream stop and restart, and:

- the switch from stream 1 to stream 2 lies at or after the stall's frame (stream 2
  cannot be in the file before it was started) and at most ``RESTART_SLACK_FRAMES``
  after it: QEMU's wav backend writes with ``fwrite`` and never flushes, so the tail
  of stream 1 (under one 4 KiB stdio buffer, 1024 frames) reaches the file only with
  stream 2's first writes. A counter jump there is the restart, not a discontinuity
  (if several jumps qualify, the one landing on the lowest counter: a new player
  starts the signal at counter 0);
- zeros and unrecognised frames between stream 1's last good frame and stream 2's
  first (silence fill, start-up) are part of the outage, not gaps;
- a stall at the window's last frame is a stop that did not resume in the window;
  one at its first frame means the window opens with the previous stream's tail,
  which is skipped (its stop belongs to the previous window).

Timing (``AudioTimebase``). QEMU paces the wav backend by the virtual clock in
audio-timer ticks (``TICK_NS``, 10 ms): each tick appends the frames due since the
last one; stdio makes them visible in 4 KiB flushes. With progress checkpoints, frame
``f`` is timed from the checkpoint at which the file first held more than ``f``
frames, ``(h_b, f_b)``, by pacing back ``f_b - f`` frames of VM running time:
``t(f) = h_b - (f_b - f)/rate``, pauses skipped. That is the frame's nominal play
time, late by the poll latency (under one poll period, because the poller records
every change) plus the part of the flushing tick still in the stdio buffer (under a
tick): ``FrameTime.uncertainty_ns`` is ``min(poll window, poll period) + tick``, the
poll window being the time since the previous checkpoint. Linear interpolation
between checkpoints would be wrong at a resume when the checkpoint before the first
growth is a heartbeat (up to 250 ms earlier): the frames appeared only at its end.
An outage is ``t(first good after) - t(last good before)``; both ends are late by
the same kind of error, so its uncertainty is the larger of the two, one poll period
plus one tick: 15 ms with ``lab.audio_capture``'s 5 ms polls (which log the poll just
before each change, so the poll window is one poll), checked against
``simulate_capture`` over random phases in tests/unit/test_audio_analysis.py and
bench/audio_gaps.py (worst error about 0.6 of it, 0.8 with poll jitter).
Without checkpoints frame ``f`` maps to ``start + f/rate`` plus the host-known pauses,
good to a tick plus the uncertainty of ``start`` (about ±20 ms unless anchored), and
no stall can be seen.
"""

from __future__ import annotations

import bisect
import io
import math
import mmap
import operator
import os
import random
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property, lru_cache
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
DEFAULT_MIN_STALL_MS = 50.0
DEFAULT_START_UNCERTAINTY_NS = 20_000_000
#: QEMU's audio timer period (``-audiodev ...,timer-period=10000``, the default)
TICK_NS = 10_000_000
#: glibc's stdio buffer for a regular file (st_blksize): what the file size lags behind
STDIO_BUFFER_BYTES = 4096
#: how far after a stall's frame stream 1's tail may reach: a stdio buffer (1024 frames)
#: plus two ticks (882), rounded up; a jump this close after a stall is the restart
RESTART_SLACK_FRAMES = 2048
#: QEMU's HDA codec (hw/audio/hda-codec.c with ``use-timer``, the default) holds a
#: stream in an 8 KiB buffer filled by the guest's DMA on the virtual clock and drained
#: by the audio backend; finding it full at the backend's next callback, it drops all
#: of it (2048 frames, 46.44 ms at 44.1 kHz s16 stereo) and traces
#: ``hda_audio_overrun``. That is the emulator's host falling behind, not the guest.
HDA_CODEC_BUFFER_BYTES = 8192
#: how far (host time) a drop may lie from the overrun that explains it: the drop's
#: frame is timed to within a poll and an audio tick, the trace line to the microsecond
OVERRUN_MATCH_NS = 100_000_000
#: ``AudioIssue.cause`` (and the timeline event's ``cause``) of what the emulator did,
#: not the guest: a codec buffer dropped, a stall of QEMU's own audio timer
EMULATOR_OVERRUN = "emulator-overrun"
EMULATOR_DELAY = "emulator-delay"
#: the largest all-zero block compared at once
_ZERO_BLOCK_BYTES = 1 << 22

Buffer = bytes | bytearray | memoryview


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


@lru_cache(maxsize=1)
def _zero_block() -> bytes:
    return bytes(_ZERO_BLOCK_BYTES)


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
    """The whole capture in memory (``analyze_window`` maps only a window instead)."""
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


class _Window:
    """A read-only view of ``nbytes`` at ``offset`` of an open file, mapped rather than
    read so a 100 MB capture costs nothing but the pages of the window compared.

    The capture may grow while mapped (QEMU appends); it must not shrink (a new QEMU
    reusing the path would truncate it, and touching a truncated page is SIGBUS), so
    each VM life needs its own capture file. Falls back to reading if mapping fails.
    """

    def __init__(self, f: io.BufferedReader, offset: int, nbytes: int) -> None:
        self._mm: mmap.mmap | None = None
        self._whole: memoryview | None = None
        if nbytes <= 0:
            self.view = memoryview(b"")
            return
        gran = mmap.ALLOCATIONGRANULARITY
        base = offset - offset % gran
        try:
            self._mm = mmap.mmap(f.fileno(), offset - base + nbytes, access=mmap.ACCESS_READ,
                                 offset=base)
        except (OSError, ValueError):
            f.seek(offset)
            buf = bytearray(nbytes)
            got = f.readinto(buf) or 0
            self.view = memoryview(buf)[:got]
            return
        self._whole = memoryview(self._mm)
        self.view = self._whole[offset - base:offset - base + nbytes]

    def close(self) -> None:
        self.view.release()
        if self._whole is not None:
            self._whole.release()
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:        # a view escaped; the collector unmaps it later
                pass


# ---- time --------------------------------------------------------------------------------

def _merge_pauses(pauses: Iterable[Pause]) -> tuple[tuple[int, int], ...]:
    """Sorted, non-overlapping ``(start, end)`` spans, so pacing can walk them once."""
    spans = sorted((p.start_ns, p.end_ns) for p in pauses if p.end_ns > p.start_ns)
    out: list[list[int]] = []
    for s, e in spans:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return tuple((s, e) for s, e in out)


def _paused_ns(spans: Sequence[tuple[int, int]], a: int, b: int) -> int:
    if b <= a:
        return 0
    return sum(max(0, min(e, b) - max(s, a)) for s, e in spans)


def _pace_forward(spans: Sequence[tuple[int, int]], t: int, ns: int) -> int:
    """The host time ``ns`` of VM running time after ``t`` (the VM's audio clock
    stands still while it is paused)."""
    if ns < 0:
        return _pace_back(spans, t, -ns)
    for s, e in spans:
        if e <= t:
            continue
        if s > t:
            if s >= t + ns:
                break
            ns -= s - t
        t = e
    return t + ns


def _pace_back(spans: Sequence[tuple[int, int]], t: int, ns: int) -> int:
    """The host time ``ns`` of VM running time before ``t``."""
    if ns < 0:
        return _pace_forward(spans, t, -ns)
    for s, e in reversed(spans):
        if s >= t:
            continue
        if e < t:
            if e <= t - ns:
                break
            ns -= t - e
        t = s
    return t - ns


@dataclass(frozen=True)
class FrameTime:
    """When a frame played, in host time, and how far off that may be.

    ``bounded``: the frame lies between two checkpoints, so the error is the poll
    window plus a tick (see the module docstring); otherwise it is the timebase's
    ``uncertainty_ns`` (the anchor's).
    """

    t_ns: int
    uncertainty_ns: int
    bounded: bool


@dataclass(frozen=True)
class _Steps:
    """Progress reduced to the distinct frame counts: when each was first and last seen."""

    counts: list[int]
    first_ns: list[int]
    last_ns: list[int]


@dataclass(frozen=True)
class AudioTimebase:
    """Maps capture frames to host time (see the module docstring for the model).

    ``progress``: ``(host_ns, frames in the file)`` checkpoints; ``start_frame`` is the
    frame at ``start_host_ns`` when there are none; ``poll_ns`` overrides the poll
    period estimated from the checkpoints (the spacing of the closest ones).
    """

    start_host_ns: int
    rate: int = RATE
    pauses: tuple[Pause, ...] = ()
    progress: tuple[tuple[int, int], ...] = ()     # (host_ns, frames in the file)
    uncertainty_ns: int = DEFAULT_START_UNCERTAINTY_NS
    start_frame: int = 0
    poll_ns: int | None = None
    tick_ns: int = TICK_NS

    @cached_property
    def spans(self) -> tuple[tuple[int, int], ...]:
        return _merge_pauses(self.pauses)

    @cached_property
    def steps(self) -> _Steps:
        pts = sorted(self.progress)
        if not pts:
            return _Steps([], [], [])
        hs = [h for h, _ in pts]
        fs = [f for _, f in pts]
        if fs == sorted(fs):        # the file only grows: list comprehensions, C speed
            starts = [0] + [i for i, (a, b) in enumerate(zip(fs, fs[1:]), 1) if a != b]
            return _Steps([fs[i] for i in starts], [hs[i] for i in starts],
                          [hs[j - 1] for j in starts[1:]] + [hs[-1]])
        counts: list[int] = []
        first: list[int] = []
        last: list[int] = []
        for h, f in pts:
            if counts and f <= counts[-1]:      # unchanged, or a glitch of the size poll
                last[-1] = max(last[-1], h)
                continue
            counts.append(f)
            first.append(h)
            last.append(h)
        return _Steps(counts, first, last)

    @cached_property
    def poll_period_ns(self) -> int | None:
        """The poller's period, from spacings that are exactly one poll for one of the
        two ways of logging: the checkpoint after one that saw a change (a poller that
        logs the first unchanged poll after a change), or the one that saw a change
        after the one before it (``lab.audio_capture.CaptureWatch``, which logs the last
        unchanged poll before a change). Each is an overestimate for the other way, so
        the smaller wins; the 95th percentile of each covers jitter without letting one
        late poll inflate every uncertainty."""
        if self.poll_ns:
            return self.poll_ns
        pts = sorted(self.progress)
        after: list[int] = []
        into: list[int] = []
        for prev, a, b in zip([None, *pts], pts, pts[1:], strict=False):
            if b[0] <= a[0]:
                continue
            if prev is None or a[1] != prev[1]:
                after.append(b[0] - a[0])
            if b[1] != a[1]:
                into.append(b[0] - a[0])
        est = [g[max(0, math.ceil(len(g) * 0.95) - 1)] for g in (sorted(after), sorted(into)) if g]
        return min(est) if est else None

    def frames_ns(self, frames: int) -> int:
        return round(frames * 1e9 / self.rate)

    def frame_time(self, frame: int) -> FrameTime:
        st = self.steps
        spans = self.spans
        if not st.counts:
            d = frame - self.start_frame
            return FrameTime(_pace_forward(spans, self.start_host_ns, self.frames_ns(d)),
                             self.uncertainty_ns, False)
        i = bisect.bisect_right(st.counts, frame)
        if i == 0:
            return FrameTime(_pace_back(spans, st.first_ns[0],
                                        self.frames_ns(st.counts[0] - frame)),
                             self.uncertainty_ns, False)
        if i == len(st.counts):
            return FrameTime(_pace_forward(spans, st.last_ns[-1],
                                           self.frames_ns(frame - st.counts[-1])),
                             self.uncertainty_ns, False)
        t = _pace_back(spans, st.first_ns[i], self.frames_ns(st.counts[i] - frame))
        window = st.first_ns[i] - st.last_ns[i - 1]
        poll = self.poll_period_ns
        w = min(window, poll) if poll else window
        return FrameTime(t, w + self.tick_ns, True)

    def host_ns(self, frame: int) -> int:
        return self.frame_time(frame).t_ns

    def running_ns(self, a: int, b: int) -> int:
        """VM running time between two host times."""
        return b - a - _paused_ns(self.spans, a, b)


# ---- results -----------------------------------------------------------------------------

@dataclass(frozen=True)
class AudioIssue:
    """One anomaly at a frame position in the capture (frames count from the file's start).

    ``kind``: ``gap`` (``frames`` zero frames), ``discontinuity`` (the counter resumed
    ``jump`` frames away: >0 signal lost, <0 repeated), ``unrecognised`` (``frames``
    frames that fit no counter value), ``stall`` (the file stopped growing for
    ``stall_ns`` while the VM ran; from progress checkpoints; it ended a stream).
    """

    kind: str
    frame: int
    frames: int = 0
    jump: int | None = None
    counter_before: int | None = None
    counter_after: int | None = None
    stall_ns: int | None = None
    # set when something outside the guest explains it ("emulator-overrun")
    cause: str = ""


@dataclass(frozen=True)
class AudioOutage:
    """A stream stop (a stall) and what followed, frames relative to the file.

    ``boundary_frame``: the count at which the file stood still; ``stalls``/``stall_ns``:
    how many stalls it spans (a restart that produced no signal before the next one
    merges them) and how long the file stood still while the VM ran. ``first_good_frame``
    is None when the stream did not come back in the window. ``counter_continued``: the
    counter went on where it stopped (the stream stalled, no new player). Times are
    from the progress checkpoints given to the analysis (None without them).
    """

    boundary_frame: int
    stalls: int
    stall_ns: int
    last_good_frame: int
    last_counter: int | None
    first_good_frame: int | None
    restart_counter: int | None
    counter_continued: bool
    silent_frames: int
    unrecognised_frames: int
    stop_host_ns: int | None = None
    resume_host_ns: int | None = None
    outage_ns: int | None = None
    uncertainty_ns: int | None = None
    open_ns: int | None = None            # not resumed: out at least this long (window end)

    @property
    def resumed(self) -> bool:
        return self.first_good_frame is not None


@dataclass(frozen=True)
class AudioSummary:
    rate: int
    channels: int
    frames: int                      # in the window
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
    streams: int = 0
    outages_ms: tuple[float, ...] = ()           # resumed outages, in order
    longest_outage_ms: float = 0.0
    resumed: bool = True             # no stop, or the last stream ran at the window's end
    open_outage_ms: float | None = None          # not resumed: out at least this long
    window_start_frame: int = 0
    window_end_frame: int = 0
    # drops QEMU's HDA codec made itself (hda_audio_overrun), not in discontinuities
    emulator_drops: int = 0
    # stalls QEMU's late audio timer explains (audio_timer_delayed), not outages
    host_stalls: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AudioAnalysis:
    summary: AudioSummary
    issues: tuple[AudioIssue, ...]
    min_gap_frames: int = 1
    outages: tuple[AudioOutage, ...] = ()
    first_good_frame: int | None = None          # the window's first stream starts here
    first_counter: int | None = None
    leading_stall: bool = False                  # the window opened inside a stall
    clock: AudioTimebase | None = field(default=None, compare=False)

    def stream_span(self, timebase: AudioTimebase) -> tuple[int, int] | None:
        """Host times of the first and last non-silent frame (None: silent capture)."""
        s = self.summary
        if s.stream_start_frame is None or s.stream_end_frame is None:
            return None
        return timebase.host_ns(s.stream_start_frame), timebase.host_ns(s.stream_end_frame)

    def excuse_emulator_drops(self, overruns_ns: Sequence[int],
                              delays: Sequence[tuple[int, int]] = (), *,
                              tolerance_ns: int = OVERRUN_MATCH_NS) -> AudioAnalysis:
        """This analysis with the drops QEMU's HDA codec made itself set apart.

        A drop of exactly the codec's buffer within ``tolerance_ns`` of a
        ``hda_audio_overrun`` trace line (each line explains one drop) is
        ``cause="emulator-overrun"`` and counts in ``summary.emulator_drops`` instead of
        ``discontinuities``: the driver under test did not lose those frames, a host too
        slow for real time did. The same drop right after a stall (the host stood still,
        then the codec found its buffer full) reads as a stream stop and a restart; when
        the frames run on in the file with the counter exactly one buffer further and an
        overrun beside it, it was no stop: the outage becomes that excused drop. Any
        other drop, or one no overrun is near, stays the guest's.

        ``delays``: ``(host ns, ns)`` of QEMU's ``audio_timer_delayed`` lines (its audio
        timer ran that late: the host did not run QEMU). A stall the counter ran on
        across, frame after frame, that such a delay as long explains is the host's
        too: no stop, no outage, no new stream; it stays on the timeline as an
        ``audio-gap`` with ``cause="emulator-delay"`` and counts in
        ``summary.host_stalls``."""
        s = self.summary
        if (not overruns_ns and not delays) or s.signal != "counter":
            return self
        size = HDA_CODEC_BUFFER_BYTES // (s.channels * SAMPLE_BYTES)
        tb = self.clock or AudioTimebase(0, rate=s.rate)
        left = sorted(overruns_ns)

        def take(t: int) -> bool:
            if not left:
                return False
            near = min(left, key=lambda o: abs(o - t))
            if abs(near - t) > tolerance_ns:
                return False
            left.remove(near)
            return True

        issues: list[AudioIssue] = []
        n = 0
        for it in self.issues:
            if it.kind == "discontinuity" and it.jump == size and not it.cause \
                    and take(tb.host_ns(it.frame)):
                it = replace(it, cause=EMULATOR_OVERRUN)
                n += 1
            issues.append(it)
        outages: list[AudioOutage] = []
        merged = stalled = 0
        late = sorted(delays)
        for o in self.outages:
            first = o.first_good_frame
            # the frames run on in the file: no silence, no start-up noise between
            if (first is None or first != o.last_good_frame + 1 or o.silent_frames
                    or o.unrecognised_frames):
                outages.append(o)
                continue
            t = tb.host_ns(first)
            if o.counter_continued:
                # the timer's lateness explains the stillness, to within the ticks the
                # file is written in
                why = next((d for d in late if abs(d[0] - t) <= tolerance_ns
                            and d[1] + 2 * TICK_NS >= o.stall_ns), None)
                if why is not None:
                    late.remove(why)
                    issues = [replace(i, cause=EMULATOR_DELAY)
                              if i.kind == "stall" and i.frame == o.boundary_frame and not i.cause
                              else i for i in issues]
                    stalled += 1
                    continue
            elif (o.last_counter is not None
                    and o.restart_counter == (o.last_counter + 1 + size) % CYCLE and take(t)):
                issues.append(AudioIssue("discontinuity", first, jump=size,
                                         counter_before=o.last_counter,
                                         counter_after=o.restart_counter,
                                         cause=EMULATOR_OVERRUN))
                merged += 1
                continue
            outages.append(o)
        if not n and not merged and not stalled:
            return self
        issues.sort(key=lambda i: i.frame)
        out_ms = tuple(round((o.outage_ns or 0) / 1e6, 3) for o in outages if o.resumed)
        summary = replace(s, discontinuities=s.discontinuities - n,
                          dropped_frames=s.dropped_frames - n * size,
                          emulator_drops=s.emulator_drops + n + merged,
                          host_stalls=s.host_stalls + stalled,
                          streams=s.streams - merged - stalled, outages_ms=out_ms,
                          longest_outage_ms=max(out_ms, default=0.0))
        return replace(self, summary=summary, issues=tuple(issues), outages=tuple(outages))

    def events(self, timebase: AudioTimebase | None = None,
               device: DeviceId | None = None) -> list[Event]:
        """The window as timeline events (Source.HOST_AUDIO), in frame order: the start
        of the first stream, each stop and resume (duration: the outage), gaps and
        discontinuities inside streams. ``timebase`` defaults to the one built from the
        progress given to the analysis."""
        tb = timebase or self.clock or AudioTimebase(0, rate=self.summary.rate)
        rate = self.summary.rate
        out: list[tuple[int, int, Event]] = []

        def base(frame: int, ft: FrameTime) -> dict[str, Any]:
            return {"frame": frame, "t_uncertainty_ns": ft.uncertainty_ns,
                    "position_s": round(frame / rate, 6)}

        if self.first_good_frame is not None:
            ft = tb.frame_time(self.first_good_frame)
            out.append((self.first_good_frame, 0, Event(
                ft.t_ns, Source.HOST_AUDIO, Kind.AUDIO_START, device,
                data={**base(self.first_good_frame, ft), "counter": self.first_counter,
                      "after_stall": self.leading_stall})))
        for o in self.outages:
            stop, resume = _outage_times(tb, o)
            stop_data = {**base(o.last_good_frame, stop), "counter": o.last_counter,
                         "reason": "stall", "boundary_frame": o.boundary_frame,
                         "stalls": o.stalls, "stall_ms": round(o.stall_ns / 1e6, 3),
                         "resumed": o.resumed}
            if resume is None or o.first_good_frame is None:
                stop_data["open_ms"] = None if o.open_ns is None else round(o.open_ns / 1e6, 3)
            out.append((o.last_good_frame, 1, Event(
                stop.t_ns, Source.HOST_AUDIO, Kind.AUDIO_STOP, device, data=stop_data)))
            if resume is None or o.first_good_frame is None:
                continue
            if tb.progress or o.outage_ns is None:
                dur = resume.t_ns - stop.t_ns
                unc = max(stop.uncertainty_ns, resume.uncertainty_ns)
            else:                   # a bare timebase cannot see outages; keep the analysis'
                dur, unc = o.outage_ns, o.uncertainty_ns or 0
            out.append((o.first_good_frame, 2, Event(
                resume.t_ns, Source.HOST_AUDIO, Kind.AUDIO_RESUMED, device, dur,
                data={**base(o.first_good_frame, resume), "outage_ms": round(dur / 1e6, 3),
                      "uncertainty_ms": round(unc / 1e6, 3),
                      "restart_counter": o.restart_counter,
                      "counter_continued": o.counter_continued,
                      "boundary_frame": o.boundary_frame, "stalls": o.stalls,
                      "silent_frames": o.silent_frames,
                      "unrecognised_frames": o.unrecognised_frames})))
        for it in self.issues:
            if it.kind == "stall":          # told by the stop/resume events
                if it.cause:                # unless it was no stop (the host stood still)
                    ft = tb.frame_time(it.frame)
                    out.append((it.frame, 3, Event(
                        ft.t_ns, Source.HOST_AUDIO, Kind.AUDIO_GAP, device, it.stall_ns,
                        data={**base(it.frame, ft), "cause": it.cause, "frames": 0,
                              "ms": round((it.stall_ns or 0) / 1e6, 3)})))
                continue
            if it.kind == "gap" and it.frames < self.min_gap_frames:
                continue
            ft = tb.frame_time(it.frame)
            if it.kind == "gap":
                dur = round(it.frames * 1e9 / rate)
                out.append((it.frame, 3, Event(
                    ft.t_ns, Source.HOST_AUDIO, Kind.AUDIO_GAP, device, dur,
                    data={**base(it.frame, ft), "cause": "silence", "frames": it.frames,
                          "ms": round(dur / 1e6, 3)})))
                continue
            frames = (it.frames if it.kind == "unrecognised" or it.jump is None
                      else abs(it.jump))
            cause = it.cause or ("unrecognised" if it.kind == "unrecognised"
                                 else "drop" if (it.jump or 0) > 0 else "repeat")
            out.append((it.frame, 3, Event(
                ft.t_ns, Source.HOST_AUDIO, Kind.AUDIO_DISCONTINUITY, device,
                round(frames * 1e9 / rate),
                data={**base(it.frame, ft), "cause": cause, "jump": it.jump,
                      "frames": it.frames, "counter_before": it.counter_before,
                      "counter_after": it.counter_after,
                      "ms": round(frames * 1e3 / rate, 3)})))
        out.sort(key=lambda x: (x[0], x[1]))
        return [e for _, _, e in out]


def _outage_times(tb: AudioTimebase, o: AudioOutage) -> tuple[FrameTime, FrameTime | None]:
    """Times of an outage's last good and first good frame.

    A last good frame at or after the stall's frame was still in QEMU's stdio buffer
    when the file stopped: it played right after the frames already in the file, so it
    is paced forward from the one before the stall, not timed by its late flush.
    """
    stop = tb.frame_time(o.last_good_frame)
    if o.last_good_frame >= o.boundary_frame:
        before = tb.frame_time(o.boundary_frame - 1)
        stop = FrameTime(_pace_forward(tb.spans, before.t_ns,
                                       tb.frames_ns(o.last_good_frame - o.boundary_frame + 1)),
                         before.uncertainty_ns, before.bounded)
    resume = tb.frame_time(o.first_good_frame) if o.first_good_frame is not None else None
    return stop, resume


# ---- analysis ------------------------------------------------------------------------------

def analyze(path: str | os.PathLike[str], *, min_gap_ms: float = DEFAULT_MIN_GAP_MS,
            progress: Sequence[tuple[int, int]] = (), pauses: Iterable[Pause] = (),
            min_stall_ms: float = DEFAULT_MIN_STALL_MS) -> AudioAnalysis:
    """Analyse a whole capture file. ``progress``/``pauses`` enable stalls and outages."""
    return analyze_window(path, min_gap_ms=min_gap_ms, progress=progress, pauses=pauses,
                          min_stall_ms=min_stall_ms)


def analyze_window(path: str | os.PathLike[str], *, start_frame: int = 0,
                   end_frame: int | None = None,
                   progress: Sequence[tuple[int, int]] = (), pauses: Iterable[Pause] = (),
                   min_gap_ms: float = DEFAULT_MIN_GAP_MS,
                   min_stall_ms: float = DEFAULT_MIN_STALL_MS,
                   start_host_ns: int | None = None,
                   end_host_ns: int | None = None) -> AudioAnalysis:
    """Analyse frames ``[start_frame, end_frame)`` of a capture (one iteration of a VM
    life), mapping only that part of the file; frame numbers in the result count from
    the file's start, like ``progress``.

    ``start_host_ns``: the host time at which the file held ``start_frame`` frames (the
    iteration's start); it is one more checkpoint, so a window opening while the file
    stands still is seen, and it anchors the times when there is no progress.
    ``end_host_ns``: likewise for ``end_frame`` (the iteration's end), so a stream that
    stopped and never came back is known to have stayed out until then, not only until
    the last heartbeat.
    """
    t0 = time.perf_counter()
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            info = parse_wav_header(f.read(65536), size)
            fb = info.frame_bytes
            lo = max(0, min(start_frame, info.frames))
            hi = info.frames if end_frame is None else max(lo, min(end_frame, info.frames))
            win = _Window(f, info.data_offset + lo * fb, (hi - lo) * fb)
    except OSError as exc:
        raise AudioFormatError(f"cannot read capture {p}: {exc}") from exc
    try:
        return analyze_pcm(win.view, info, min_gap_ms=min_gap_ms, progress=progress,
                           pauses=pauses, min_stall_ms=min_stall_ms, start_frame=lo,
                           start_host_ns=start_host_ns, end_host_ns=end_host_ns, _t0=t0)
    finally:
        win.close()


def analyze_pcm(data: Buffer, info: WavInfo, *, min_gap_ms: float = DEFAULT_MIN_GAP_MS,
                progress: Sequence[tuple[int, int]] = (), pauses: Iterable[Pause] = (),
                min_stall_ms: float = DEFAULT_MIN_STALL_MS, start_frame: int = 0,
                start_host_ns: int | None = None, end_host_ns: int | None = None,
                _t0: float | None = None) -> AudioAnalysis:
    """Analyse PCM frames already in memory; ``data[0]`` is frame ``start_frame`` of the
    file (see ``analyze_window`` for the rest)."""
    t0 = _t0 if _t0 is not None else time.perf_counter()
    buf = memoryview(data).cast("B")
    fb = info.frame_bytes
    n = len(buf) // fb
    min_gap = max(1, round(min_gap_ms * info.rate / 1000))
    clock = _clock(info.rate, progress, pauses, start_frame, start_frame + n, start_host_ns,
                   end_host_ns)
    start = _zero_run(buf, 0, n, fb)
    runs: list[_Run] = []
    s_start: int | None = None
    s_end: int | None = None
    signal = "silent"
    if start < n:
        end = n - _zero_run_back(buf, n, fb)
        s_start, s_end = start, end
        if fb == FRAME_BYTES and _has_counter(buf, start, end):
            signal = "counter"
            runs = _walk_runs(buf, start, end)
        else:
            signal = "unknown"
            runs = _gap_runs(buf, start, end, fb, min_gap)
    stalls = (_find_stalls(clock, start_frame, start_frame + n, min_stall_ms * 1e6)
              if clock is not None and clock.progress else [])
    plan = _plan(runs, stalls, start_frame, n)
    issues = _issues(buf, fb, runs, plan, s_start, s_end, start_frame)
    outages = tuple(_outage(buf, fb, runs, op, start_frame, n, clock) for op in plan.outages)
    issues.extend(AudioIssue("stall", st.frame, 0, stall_ns=st.idle_ns)
                  for op in plan.outages for st in op.stalls)
    issues.sort(key=lambda i: (i.frame, i.kind))
    first = runs[plan.first_run] if plan.first_run is not None else None
    return AudioAnalysis(
        summary=_summary(info, n, signal, s_start, s_end, start_frame, issues, min_gap,
                         outages, first is not None, t0),
        issues=tuple(issues), min_gap_frames=min_gap, outages=outages,
        first_good_frame=None if first is None else first.start + start_frame,
        first_counter=None if first is None else first.counter,
        leading_stall=plan.leading_stall, clock=clock)


def _clock(rate: int, progress: Sequence[tuple[int, int]], pauses: Iterable[Pause],
           start_frame: int, end_frame: int, start_host_ns: int | None,
           end_host_ns: int | None) -> AudioTimebase | None:
    """The timebase of a window: the progress plus its start and end as checkpoints.
    Progress of a whole VM life is cut to the checkpoints around the window (by
    bisection, when the counts grow with time as they do), so a short window does not
    pay for every checkpoint of the life."""
    pts = sorted(progress)
    counts = [f for _, f in pts]
    if pts and counts == sorted(counts):
        a = max(0, bisect.bisect_left(counts, start_frame) - 2)
        pts = pts[a:bisect.bisect_right(counts, end_frame) + 2]
    prog = tuple(pts)
    if start_host_ns is not None:
        prog += ((start_host_ns, start_frame),)
    if end_host_ns is not None:
        prog += ((end_host_ns, end_frame),)
    ps = tuple(pauses)
    if not prog:
        return None
    return AudioTimebase(prog[0][0] if start_host_ns is None else start_host_ns, rate=rate,
                         pauses=ps, progress=prog, start_frame=start_frame)


def _summary(info: WavInfo, n: int, signal: str, s_start: int | None, s_end: int | None,
             base: int, issues: list[AudioIssue], min_gap: int,
             outages: tuple[AudioOutage, ...], streaming: bool, t0: float) -> AudioSummary:
    gaps = [i for i in issues if i.kind == "gap" and i.frames >= min_gap]
    short = [i for i in issues if i.kind == "gap" and i.frames < min_gap]
    jumps = [i for i in issues if i.kind == "discontinuity"]
    unrec = [i for i in issues if i.kind == "unrecognised"]
    stalls = [i for i in issues if i.kind == "stall"]
    gap_ms = [i.frames * 1000 / info.rate for i in gaps]
    resumed = [o for o in outages if o.resumed]
    out_ms = tuple(round((o.outage_ns or 0) / 1e6, 3) for o in resumed)
    still_out = next((o for o in outages if not o.resumed), None)
    return AudioSummary(
        rate=info.rate, channels=info.channels, frames=n, duration_s=n / info.rate,
        header_sizes_ok=info.header_sizes_ok, truncated=info.truncated, signal=signal,
        stream_start_frame=None if s_start is None else s_start + base,
        stream_end_frame=None if s_end is None else s_end + base,
        gaps=len(gaps), longest_gap_ms=round(max(gap_ms, default=0.0), 3),
        total_gap_ms=round(sum(gap_ms), 3), short_gaps=len(short),
        discontinuities=len(jumps) + len(unrec),
        dropped_frames=sum(i.jump for i in jumps if i.jump and i.jump > 0),
        repeated_frames=-sum(i.jump for i in jumps if i.jump and i.jump < 0),
        unrecognised_frames=sum(i.frames for i in unrec),
        stalls=len(stalls),
        longest_stall_ms=round(max((i.stall_ns or 0 for i in stalls), default=0) / 1e6, 3),
        analysis_s=round(time.perf_counter() - t0, 4),
        streams=(1 + len(resumed)) if streaming else 0,
        outages_ms=out_ms, longest_outage_ms=max(out_ms, default=0.0),
        resumed=still_out is None,
        open_outage_ms=(None if still_out is None or still_out.open_ns is None
                        else round(still_out.open_ns / 1e6, 3)),
        window_start_frame=base, window_end_frame=base + n)


# ---- the counter walk ----------------------------------------------------------------------

@dataclass(frozen=True)
class _Run:
    """Frames ``[start, end)`` (window-relative) following the signal without a break
    (``counter`` at ``start``; None when the signal is unknown: non-silent frames)."""

    start: int
    end: int
    counter: int | None

    def counter_at(self, f: int) -> int | None:
        return None if self.counter is None else (self.counter + f - self.start) & 0xFFFF


def _counter(data: Buffer, f: int) -> int:
    o = f * FRAME_BYTES + 2
    return data[o] | (data[o + 1] << 8)


def _match_len(data: Buffer, f: int, c: int, limit: int) -> int:
    """How many frames from ``f`` follow the signal starting at counter ``c``
    (up to ``limit``): galloping comparisons against the table (``startswith`` of a
    view: no copies), bisection on a mismatch."""
    table = cycle_table()
    fb = FRAME_BYTES
    n = 0
    step = 1024
    while n < limit:
        length = min(step, limit - n, CYCLE)
        cc = (c + n) & 0xFFFF
        a = (f + n) * fb
        if table.startswith(data[a:a + length * fb], cc * fb):
            n += length
            step = min(step * 4, CYCLE)
            continue
        lo, hi = 0, length
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if table.startswith(data[a + lo * fb:a + mid * fb], (cc + lo) * fb):
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _locked(data: Buffer, f: int, end: int) -> bool:
    need = min(LOCK_FRAMES, end - f)
    return need > 0 and _match_len(data, f, _counter(data, f), need) >= need


def _has_counter(data: Buffer, start: int, end: int) -> bool:
    """Is this our signal? Probe a few positions rather than scanning everything."""
    span = end - start
    probes = [start + span * k // 16 for k in range(16)]
    for p in probes:
        for q in range(p, min(end, p + 64)):
            if _locked(data, q, end):
                return True
    return False


def _all_zero(chunk: Buffer) -> bool:
    return _zero_block().startswith(chunk)


def _zero_run(data: Buffer, f: int, end: int, fb: int = FRAME_BYTES) -> int:
    """All-zero frames from ``f`` (galloping comparisons against a zero block)."""
    n = 0
    step = 64
    cap = _ZERO_BLOCK_BYTES // fb
    while f + n < end:
        length = min(step, end - f - n)
        a = (f + n) * fb
        if _all_zero(data[a:a + length * fb]):
            n += length
            step = min(step * 4, cap)
            continue
        lo, hi = 0, length
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _all_zero(data[a + lo * fb:a + mid * fb]):
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _zero_run_back(data: Buffer, end: int, fb: int = FRAME_BYTES, start: int = 0) -> int:
    """All-zero frames ending at ``end`` (not before ``start``), galloping backwards."""
    n = 0
    step = 64
    cap = _ZERO_BLOCK_BYTES // fb
    while end - n > start:
        length = min(step, end - n - start)
        b = (end - n) * fb
        if _all_zero(data[b - length * fb:b]):
            n += length
            step = min(step * 4, cap)
            continue
        lo, hi = 0, length          # the last lo frames of the chunk are zero, hi are not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _all_zero(data[b - mid * fb:b]):
                lo = mid
            else:
                hi = mid
        return n + lo
    return n


def _walk_runs(data: Buffer, start: int, end: int) -> list[_Run]:
    """Split ``[start, end)`` into runs of unbroken signal; what lies between two runs
    (zeros, unrecognised frames, or nothing when the counter just jumped) is classified
    later, once it is known which breaks are stream restarts."""
    runs: list[_Run] = []
    f = start
    if not _locked(data, f, end):
        p = _reacquire(data, f, end)
        if p is None:
            return runs
        f = p
    while f < end:
        c = _counter(data, f)
        m = _match_len(data, f, c, end - f)
        runs.append(_Run(f, f + m, c))
        f += m
        if f >= end:
            break
        g = f + _zero_run(data, f, end)
        if g >= end:
            break
        if _locked(data, g, end):
            f = g
            continue
        p = _reacquire(data, g, end)
        if p is None:
            break
        f = p
    return runs


def _reacquire(data: Buffer, g: int, end: int) -> int | None:
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


def _gap_runs(data: Buffer, start: int, end: int, fb: int, min_gap: int) -> list[_Run]:
    """Without the counter (a mixer changed the samples): runs are the non-silent
    stretches between gaps of at least ``min_gap`` frames."""
    raw = bytes(data[start * fb:end * fb])        # bytes.find needs bytes; fallback only
    runs: list[_Run] = []
    f = start
    for g in _scan_gaps(raw, 0, end - start, fb, min_gap):
        gs = g.frame + start
        if gs > f:
            runs.append(_Run(f, gs, None))
        f = gs + g.frames
    if f < end:
        runs.append(_Run(f, end, None))
    return runs


def _signed16(x: int) -> int:
    x &= 0xFFFF
    return x - 0x10000 if x >= 0x8000 else x


# ---- streams and outages -------------------------------------------------------------------

@dataclass(frozen=True)
class _Stall:
    frame: int             # the file's frame count while it stood still
    idle_ns: int           # VM running time it stood still
    since_ns: int          # when the count was first seen
    until_ns: int          # when it played again (estimated), or when last seen standing


def _find_stalls(tb: AudioTimebase, lo: int, hi: int, min_ns: float) -> list[_Stall]:
    """Counts in ``[lo, hi]`` at which the file stood still for more than ``min_ns`` of
    VM running time: from the time the count was first seen to the (paced back) play
    time of the frame that followed, or to the last sighting if nothing followed."""
    st = tb.steps
    counts, first, last = st.counts, st.first_ns, st.last_ns
    out: list[_Stall] = []
    i0, i1 = bisect.bisect_left(counts, lo), bisect.bisect_right(counts, hi)
    if i0 >= i1:
        return out
    # cheap bound first (C speed): a count stood still no longer than until the next
    # one was seen; while a stream plays that is a flush period, tens of milliseconds
    seen = first[i0:i1 + 1] if i1 < len(counts) else [*first[i0:i1], last[-1]]
    cands = [i0 + k for k, d in enumerate(map(operator.sub, seen[1:], seen)) if d > min_ns]
    for i in cands:
        since = first[i]
        grew = i + 1 < len(counts)
        until = (_pace_back(tb.spans, first[i + 1], tb.frames_ns(counts[i + 1] - counts[i]))
                 if grew else last[i])
        idle = tb.running_ns(since, until)
        if idle > min_ns:
            out.append(_Stall(counts[i], idle, since, until))
    return out


@dataclass
class _OutagePlan:
    boundary: int                    # file frame of the (first) stall
    stalls: list[_Stall]
    last_good: int                   # window-relative
    first_good: int | None           # window-relative; None: not resumed
    continued: bool
    zone: tuple[int, int]            # window-relative frames between them


@dataclass
class _Plan:
    first_run: int | None
    leading_stall: bool
    outages: list[_OutagePlan]
    skip_zones: set[int] = field(default_factory=set)    # k: between runs k and k+1
    open_from_run: int | None = None                      # runs after it: an open outage


def _pick_restart(runs: Sequence[_Run], cands: Sequence[int]) -> int:
    """Of the breaks that may be the restart, the one landing on the lowest counter
    (a new player starts the signal at 0; stale data replayed at the stop does not)."""
    return min(cands, key=lambda k: (runs[k + 1].counter or 0, k))


def _restart_candidates(runs: Sequence[_Run], j: int, b: int) -> list[int]:
    """Breaks ``k`` (between runs k and k+1) with run k+1 at or after ``b`` and run k
    ending within ``RESTART_SLACK_FRAMES`` of it."""
    cands: list[int] = []
    k = max(j - 1, 0)
    while k + 1 < len(runs) and runs[k].end - 1 < b + RESTART_SLACK_FRAMES:
        if runs[k + 1].start >= b:
            cands.append(k)
        k += 1
    return cands


def _plan(runs: Sequence[_Run], stalls: Sequence[_Stall], base: int, n: int) -> _Plan:
    """Decide which breaks between runs are stream stops/restarts (see the module
    docstring); the rest stay gaps and discontinuities inside a stream."""
    plan = _Plan(first_run=0 if runs else None, leading_stall=False, outages=[])
    starts = [r.start for r in runs]
    for s in stalls:
        b = s.frame - base
        if b <= 0:
            plan.leading_stall = True
            cands = _restart_candidates(runs, 0, 0)
            if cands:
                # the first run is the previous stream's tail only if what follows lands
                # lower (a new player starts at 0): else it is this stream's own start,
                # glitch included (the file may just have been idle before any stream)
                k = _pick_restart(runs, cands)
                c0, ck = runs[0].counter, runs[k + 1].counter
                if c0 is None or ck is None or ck < c0:
                    plan.first_run = k + 1
                    plan.skip_zones.update(range(k + 1))
            continue
        if plan.first_run is None or runs[plan.first_run].start >= b:
            continue                              # no stream yet: nothing stopped
        if plan.outages and (plan.outages[-1].first_good is None
                             or plan.outages[-1].first_good >= b):
            plan.outages[-1].stalls.append(s)     # the restart produced nothing before it
            continue
        j = bisect.bisect_left(starts, b)
        cands = _restart_candidates(runs, j, b) if b < n else []
        if cands:
            k = _pick_restart(runs, cands)
            plan.skip_zones.add(k)
            plan.outages.append(_OutagePlan(s.frame, [s], runs[k].end - 1, runs[k + 1].start,
                                            False, (runs[k].end, runs[k + 1].start)))
            continue
        r = runs[j - 1]
        # the same stream went on across the stall (beyond any stdio tail, or to the end)
        if b < n and r.end > b and (r.end - 1 >= b + RESTART_SLACK_FRAMES or r.end >= n):
            plan.outages.append(_OutagePlan(s.frame, [s], b - 1, b, True, (b, b)))
            continue
        plan.open_from_run = j - 1
        plan.skip_zones.update(range(j - 1, len(runs)))
        plan.outages.append(_OutagePlan(s.frame, [s], r.end - 1, None, False, (r.end, n)))
    return plan


def _issues(buf: Buffer, fb: int, runs: Sequence[_Run], plan: _Plan, s_start: int | None,
            s_end: int | None, base: int) -> list[AudioIssue]:
    """Gaps, discontinuities and unrecognised frames inside streams (breaks that are not
    restarts), frames relative to the file."""
    out: list[AudioIssue] = []
    if s_start is None or s_end is None:
        return out
    if not runs:
        return [AudioIssue("unrecognised", s_start + base, s_end - s_start)]
    if plan.first_run == 0 and runs[0].start > s_start:
        out.append(AudioIssue("unrecognised", s_start + base, runs[0].start - s_start))
    for k in range(plan.first_run or 0, len(runs) - 1):
        if k not in plan.skip_zones:
            out.extend(_break_issues(buf, fb, runs[k], runs[k + 1].start, runs[k + 1], base))
    if plan.open_from_run is None and runs[-1].end < s_end:
        out.extend(_break_issues(buf, fb, runs[-1], s_end, None, base))
    return out


def _break_issues(buf: Buffer, fb: int, a: _Run, g1: int, b: _Run | None,
                  base: int) -> list[AudioIssue]:
    """Classify what lies between run ``a`` and frame ``g1`` (run ``b``'s start, or the
    end of the non-silent part): zeros first are a gap, anything else up to ``g1`` is
    unrecognised; the counter's jump across is a discontinuity."""
    out: list[AudioIssue] = []
    g0 = a.end
    c = a.counter_at(a.end)
    z = _zero_run(buf, g0, g1, fb)
    if z:
        out.append(AudioIssue("gap", g0 + base, z, counter_before=c))
    g = g0 + z
    if b is None:
        if g < g1:
            out.append(AudioIssue("unrecognised", g + base, g1 - g, counter_before=c))
        return out
    v = b.counter
    jump = _signed16(v - c) if v is not None and c is not None else None
    if g < g1:
        out.append(AudioIssue("unrecognised", g + base, g1 - g, jump=jump, counter_before=c,
                              counter_after=v))
    elif jump:
        out.append(AudioIssue("discontinuity", g1 + base, 0, jump=jump, counter_before=c,
                              counter_after=v))
    return out


def _outage(buf: Buffer, fb: int, runs: Sequence[_Run], op: _OutagePlan, base: int, n: int,
            clock: AudioTimebase | None) -> AudioOutage:
    """An outage plan with its frames made file-relative, the zone between its good
    frames counted, and its times from the checkpoints."""
    z0, z1 = op.zone
    silent = _zero_run(buf, z0, z1, fb)
    if silent < z1 - z0:
        silent += _zero_run_back(buf, z1, fb, z0 + silent)
    starts = [r.start for r in runs]

    def run_of(f: int) -> _Run | None:
        i = bisect.bisect_right(starts, f) - 1
        return runs[i] if i >= 0 and f < runs[i].end else None

    last_run = run_of(op.last_good)
    first_run = run_of(op.first_good) if op.first_good is not None else None
    last_counter = last_run.counter_at(op.last_good) if last_run else None
    restart = (first_run.counter_at(op.first_good)
               if first_run is not None and op.first_good is not None else None)
    o = AudioOutage(
        boundary_frame=op.boundary, stalls=len(op.stalls),
        stall_ns=sum(s.idle_ns for s in op.stalls),
        last_good_frame=op.last_good + base, last_counter=last_counter,
        first_good_frame=None if op.first_good is None else op.first_good + base,
        restart_counter=restart,
        counter_continued=(op.continued or (restart is not None and last_counter is not None
                                            and restart == (last_counter + 1) & 0xFFFF)),
        silent_frames=silent, unrecognised_frames=z1 - z0 - silent)
    if clock is None or not clock.progress:
        return o
    stop, resume = _outage_times(clock, o)
    if resume is None:
        st = clock.steps
        i = bisect.bisect_right(st.counts, base + n) - 1
        seen = st.last_ns[i] if i >= 0 else stop.t_ns
        open_ns = max(0, clock.running_ns(stop.t_ns, max(seen, op.stalls[-1].until_ns)))
        return _replace(o, stop_host_ns=stop.t_ns, open_ns=open_ns)
    return _replace(o, stop_host_ns=stop.t_ns, resume_host_ns=resume.t_ns,
                    outage_ns=resume.t_ns - stop.t_ns,
                    uncertainty_ns=max(stop.uncertainty_ns, resume.uncertainty_ns))


def _replace(o: AudioOutage, **kw: Any) -> AudioOutage:
    d = asdict(o)
    d.update(kw)
    return AudioOutage(**d)


# ---- a model of the capture, to measure the analysis against ----------------------------

@dataclass(frozen=True)
class SimulatedCapture:
    """What ``simulate_capture`` produced: the capture's PCM, the checkpoints the lab's
    poller would have logged, and the truth (each frame's nominal play time)."""

    pcm: bytes
    progress: tuple[tuple[int, int], ...]
    streams: tuple[tuple[int, int, int], ...]       # (first frame, frames, start host ns)
    rate: int = RATE

    def nominal_ns(self, frame: int) -> int:
        """When ``frame`` played (the host time its stream started plus its offset)."""
        for first, count, start in self.streams:
            if first <= frame < first + count:
                return start + round((frame - first) * 1e9 / self.rate)
        raise ValueError(f"frame {frame} is in no stream")

    def wav(self, *, sizes: bool = False) -> bytes:
        """The file as QEMU leaves it: sizes zero unless it was closed cleanly."""
        head = _wav_header(self.rate, len(self.pcm))
        if not sizes:
            head = head[:4] + bytes(4) + head[8:40] + bytes(4)
        return head + self.pcm

    def count_at(self, host_ns: int) -> int:
        """Frames in the file at ``host_ns`` as the poller last logged them."""
        i = bisect.bisect_right([h for h, _ in self.progress], host_ns) - 1
        return self.progress[i][1] if i >= 0 else 0


def simulate_capture(streams: Sequence[tuple[int, bytes]], *, end_ns: int, rate: int = RATE,
                     tick_ns: int = TICK_NS, tick_phase_ns: int = 0,
                     poll_ns: int = 5_000_000, poll_phase_ns: int = 3_000_000,
                     poll_jitter_ns: int = 0, heartbeat_ns: int = 250_000_000,
                     log: str = "watch", stdio_bytes: int = STDIO_BUFFER_BYTES,
                     header_bytes: int = 44, seed: int = 0) -> SimulatedCapture:
    """The timing model, executable: QEMU's wav backend and the lab's poller.

    ``streams``: ``(start host ns, pcm)``, one per player, in order, not overlapping.
    Every ``tick_ns`` (from ``tick_phase_ns``) QEMU appends the frames whose nominal
    time has come (``start + i/rate``) through a ``stdio_bytes`` stdio buffer, so the
    file grows in whole buffers, header included. The poller sleeps ``poll_ns`` plus up
    to ``poll_jitter_ns`` between size reads and logs a checkpoint when the count
    changed, a heartbeat every ``heartbeat_ns``, and - ``log="watch"``, as
    ``lab.audio_capture.CaptureWatch`` does - the last unchanged poll before a change,
    or - ``log="first-unchanged"`` - the first unchanged poll after one; a last sample
    at ``end_ns``. No pauses: tests of pause handling write their checkpoints by hand.
    """
    if log not in ("watch", "first-unchanged"):
        raise ValueError(f"unknown log mode {log!r}")
    fb = FRAME_BYTES
    layout: list[tuple[int, int, int]] = []
    first = 0
    prev_end = None
    for start, pcm in streams:
        frames = len(pcm) // fb
        if prev_end is not None and start < prev_end:
            raise ValueError("simulated streams overlap")
        layout.append((first, frames, start))
        prev_end = start + round(frames * 1e9 / rate)
        first += frames

    def due(t: int) -> int:
        total = 0
        for _first, frames, start in layout:
            if t > start:
                total += min(frames, -((-(t - start) * rate) // 1_000_000_000))
        return total

    tick_t: list[int] = []
    tick_visible: list[int] = []
    t = tick_phase_ns
    while t <= end_ns:
        written = header_bytes + due(t) * fb
        visible = written - written % stdio_bytes
        tick_t.append(t)
        tick_visible.append(max(0, (visible - header_bytes) // fb))
        t += tick_ns

    def count_at(p: int) -> int:
        i = bisect.bisect_right(tick_t, p) - 1
        return tick_visible[i] if i >= 0 else 0

    rng = random.Random(seed)
    progress: list[tuple[int, int]] = []
    last_count = count_at(poll_phase_ns)
    progress.append((poll_phase_ns, last_count))
    last_rec = prev_p = poll_phase_ns
    changed = False
    p = poll_phase_ns
    while True:
        p += poll_ns + (rng.randrange(poll_jitter_ns + 1) if poll_jitter_ns else 0)
        if p > end_ns:
            break
        count = count_at(p)
        if count != last_count:
            if log == "watch" and prev_p != last_rec:
                progress.append((prev_p, last_count))
            progress.append((p, count))
            changed, last_rec = True, p
        elif (log == "first-unchanged" and changed) or p - last_rec >= heartbeat_ns:
            progress.append((p, count))
            changed, last_rec = False, p
        else:
            changed = False
        last_count, prev_p = count, p
    if progress[-1][0] < end_ns:
        progress.append((end_ns, count_at(end_ns)))
    return SimulatedCapture(pcm=b"".join(pcm for _, pcm in streams),
                            progress=tuple(progress), streams=tuple(layout), rate=rate)
