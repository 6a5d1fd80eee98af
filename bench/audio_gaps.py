"""Benchmark: what the audio analysis detects, how precisely, and how fast.

Every figure is measured by running ``lab.audio_analysis`` on synthetic captures: the
test signal with crafted edits written as WAV, and, for outages, ``simulate_capture``
(the model of QEMU's wav writer - 10 ms ticks, a 4 KiB stdio buffer - and of the
lab's poller - 10 ms polls, change/first-unchanged/heartbeat checkpoints):

- the smallest silence gap (default ``min_gap_ms`` and 0), drop, repeat and garbage
  detected, searched upwards from one frame, and the largest jump read right;
- the cases the lab relies on: a restart at a stall (not a discontinuity), a 100 ms
  drop and a replayed 1024-frame buffer in the second stream;
- outages: ``--seeds`` random captures (phases, fills, start-ups, jitter): the worst
  error against the stated uncertainty; the shortest stall reported as an outage with
  the default ``min_stall_ms``; false stalls in a steady stream;
- speed: a ``--minutes`` window (10) of a capture file with its checkpoints, MB/s,
  and a 10-second window of the same file (read by mmap: only its pages).

Run with ``python bench/audio_gaps.py`` (tests pin the same limits; this prints them).
"""

from __future__ import annotations

import argparse
import functools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab.audio_analysis import (DEFAULT_MIN_GAP_MS, DEFAULT_MIN_STALL_MS, FRAME_BYTES,  # noqa: E402
                                RATE, AudioAnalysis, _wav_header, analyze_window, generate_pcm,
                                simulate_capture)
from lab.report.console import PLAIN_WIDTH  # noqa: E402

MS = 1_000_000


@dataclass(frozen=True)
class Row:
    case: str
    inserted: str
    detected: str
    smallest: str


def us(frames: int) -> str:
    return f"{frames} fr ({frames * 1e6 / RATE:.1f} µs)"


def ms(frames: int) -> str:
    return f"{frames} fr ({frames * 1e3 / RATE:.1f} ms)"


class Lab:
    """Writes captures into a scratch directory and analyses them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.n = 0

    def path(self, pcm: bytes) -> Path:
        self.n += 1
        p = self.root / f"c{self.n % 4}.wav"
        p.write_bytes(_wav_header(RATE, len(pcm)) + pcm)
        return p

    def run(self, *parts: bytes, min_gap_ms: float = DEFAULT_MIN_GAP_MS) -> AudioAnalysis:
        return analyze_window(self.path(b"".join(parts)), min_gap_ms=min_gap_ms)


def sig(counter: int, frames: int) -> bytes:
    return generate_pcm(frames, start_counter=counter)


def zeros(frames: int) -> bytes:
    return bytes(frames * FRAME_BYTES)


def smallest(pred: Callable[[int], bool], limit: int = 4096) -> int | None:
    """The smallest size (frames) from 1 for which ``pred`` holds."""
    return next((k for k in range(1, limit + 1) if pred(k)), None)


def limits(lab: Lab) -> list[Row]:
    rows: list[Row] = []
    a = 20000

    def gap(k: int, mg: float) -> bool:
        return lab.run(sig(0, a), zeros(k), sig(a, a), min_gap_ms=mg).summary.gaps == 1

    for mg in (DEFAULT_MIN_GAP_MS, 0.0):
        k = smallest(functools.partial(lambda mg, k: gap(k, mg), mg))
        r = lab.run(sig(0, a), zeros(k or 1), sig(a, a), min_gap_ms=mg)
        got = [i.frames for i in r.issues if i.kind == "gap"]
        rows.append(Row(f"silence gap, min_gap_ms={mg:g}", us(k or 0), f"gap of {got[0]} fr",
                        us(k or 0)))

    def jump(k: int) -> list[int | None]:
        return [i.jump for i in lab.run(sig(0, a), sig(a + k, a)).issues]

    k = smallest(lambda k: jump(k) == [k])
    rows.append(Row("drop", us(k or 0), f"jump {jump(k or 1)[0]:+d}", us(k or 0)))
    k = smallest(lambda k: jump(-k) == [-k])
    rows.append(Row("repeat", us(k or 0), f"jump {jump(-(k or 1))[0]:+d}", us(k or 0)))
    big = 32767
    rows.append(Row("largest drop read right", ms(big), f"jump {jump(big)[0]:+d}",
                    f"{big + 1} fr aliases: jump {jump(big + 1)[0]:+d}"))

    flipped = bytearray(sig(0, 2 * a))
    flipped[a * FRAME_BYTES] ^= 1
    r = lab.run(bytes(flipped))
    rows.append(Row("one bit of one sample", "1 fr", f"{r.issues[0].kind} {r.issues[0].frames} fr",
                    us(1)))
    return rows


def two_streams(s1: bytes, s2: bytes, gap_ns: int, *, tick_phase_ns: int = 0,
                poll_phase_ns: int = 3 * MS) -> tuple[AudioAnalysis, int, int]:
    """Analyse player 1 then, ``gap_ns`` later, player 2; return the analysis and the
    true nominal times of stream 1's last and stream 2's first frame written."""
    n1 = len(s1) // FRAME_BYTES
    t2 = round(n1 * 1e9 / RATE) + gap_ns
    end = t2 + round(len(s2) // FRAME_BYTES * 1e9 / RATE)
    sim = simulate_capture([(0, s1), (t2, s2)], end_ns=end, tick_phase_ns=tick_phase_ns,
                           poll_phase_ns=poll_phase_ns)
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(sim.wav())
        f.flush()
        r = analyze_window(f.name, end_frame=sim.progress[-1][1], progress=sim.progress)
    return r, sim.nominal_ns(n1 - 1), sim.nominal_ns(n1)


def lab_cases() -> list[Row]:
    rows: list[Row] = []
    s1 = sig(0, 2 * RATE) + zeros(300)
    s2 = zeros(200) + sig(0, 2 * RATE)
    r, _, _ = two_streams(s1, s2, 500 * MS, tick_phase_ns=4 * MS, poll_phase_ns=7 * MS)
    o = r.outages[0]
    rows.append(Row("restart at a stall (500 ms out, 300+200 fr silence)",
                    "new player, counter 0",
                    f"{r.summary.discontinuities} discontinuities, {r.summary.gaps} gaps; "
                    f"outage {(o.outage_ns or 0) / 1e6:.1f} ± {(o.uncertainty_ns or 0) / 1e6:.0f} "
                    f"ms", "any stall > min_stall_ms"))
    b = 3 * RATE // 2
    s2 = sig(0, b) + sig(b + 4410, RATE) + sig(b + 4410 + RATE - 1024, RATE)
    r, _, _ = two_streams(sig(0, RATE), s2, 700 * MS)
    jumps = [f"{i.jump:+d}" for i in r.issues if i.kind == "discontinuity"]
    rows.append(Row("100 ms drop in stream 2", "4410 fr", f"jump {jumps[0]}", us(1)))
    rows.append(Row("1024-frame buffer replayed in stream 2", "1024 fr", f"jump {jumps[1]}",
                    us(1)))
    return rows


def outages(seeds: int) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    modes = (("watch", 5, 0), ("watch", 5, 3), ("first-unchanged", 10, 0),
             ("first-unchanged", 10, 5))
    for log, poll, jitter in modes:
        rng = random.Random(poll + jitter)
        worst, ratio, uncs = 0.0, 0.0, []
        for _ in range(seeds):
            n1 = rng.randrange(RATE // 2, 2 * RATE)
            fill = rng.choice([0, rng.randrange(3000)])
            startup = rng.choice([0, rng.randrange(3000)])
            s1 = sig(0, n1) + zeros(fill)
            s2 = zeros(startup) + sig(0, RATE)
            t1 = rng.randrange(50 * MS)
            gap = rng.randrange(60, 900) * MS
            n = n1 + fill
            t2 = t1 + round(n * 1e9 / RATE) + gap
            sim = simulate_capture([(t1, s1), (t2, s2)], end_ns=t2 + 1000 * MS,
                                   tick_phase_ns=rng.randrange(10 * MS),
                                   poll_phase_ns=rng.randrange(10 * MS), poll_ns=poll * MS,
                                   poll_jitter_ns=jitter * MS, log=log, seed=rng.randrange(1000))
            with tempfile.NamedTemporaryFile(suffix=".wav") as f:
                f.write(sim.wav())
                f.flush()
                r = analyze_window(f.name, end_frame=sim.progress[-1][1], progress=sim.progress)
            o = r.outages[0]
            true = sim.nominal_ns(n + startup) - sim.nominal_ns(n1 - 1)
            err = abs((o.outage_ns or 0) - true)
            worst = max(worst, err)
            ratio = max(ratio, err / (o.uncertainty_ns or 1))
            uncs.append(o.uncertainty_ns or 0)
        who = "CaptureWatch" if log == "watch" else "first-unchanged log"
        rows.append(Row(f"outage, {seeds} random captures; {who}, {poll} ms poll "
                        f"+ ≤{jitter} ms", "60-900 ms",
                        f"worst error {worst / 1e6:.1f} ms = {ratio:.2f} × stated",
                        f"stated ±{statistics.median(uncs) / 1e6:.1f} ms (median)"))
    # the shortest stall reported as an outage
    lengths = list(range(20, 101, 2))
    seen: dict[int, int] = {}
    trials = max(4, seeds // 10)
    for length in lengths:
        rng = random.Random(length)
        hits = 0
        for _ in range(trials):
            r, _, _ = two_streams(sig(0, RATE), sig(RATE, RATE), length * MS,
                                  tick_phase_ns=rng.randrange(10 * MS),
                                  poll_phase_ns=rng.randrange(10 * MS))
            hits += len(r.outages) == 1
        seen[length] = hits
    always = next((x for x in lengths if all(seen[y] == trials for y in lengths if y >= x)), None)
    never = max((x for x in lengths if seen[x] == 0), default=None)
    rows.append(Row(f"stall (min_stall_ms={DEFAULT_MIN_STALL_MS:g}), {trials} phases each",
                    "20-100 ms", f"always from {always} ms, never at ≤ {never} ms",
                    f"{always} ms"))
    # false stalls while playing
    sim = simulate_capture([(0, sig(0, 120 * RATE))], end_ns=120_000 * MS, poll_jitter_ns=3 * MS,
                           tick_phase_ns=3 * MS)
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        f.write(sim.wav())
        f.flush()
        r = analyze_window(f.name, end_frame=sim.progress[-1][1], progress=sim.progress)
    notes.append(f"steady 2-minute stream, 5 ms polls + ≤3 ms: {r.summary.stalls} false stalls, "
                 f"{len(sim.progress)} checkpoints")
    return rows, notes


def speed(root: Path, minutes: int) -> list[tuple[str, str, str]]:
    frames = minutes * 60 * RATE
    cut = frames // 2
    pcm = sig(0, cut) + zeros(441) + sig(cut + 441 + 100, frames - cut - 441)
    sim = simulate_capture([(0, pcm)], end_ns=round(frames * 1e9 / RATE), poll_jitter_ns=2 * MS)
    p = root / "long.wav"
    p.write_bytes(sim.wav())                        # sizes zero: as a SIGKILLed QEMU leaves it
    progress = sim.progress
    size_mb = len(pcm) / 1e6
    out: list[tuple[str, str, str]] = []

    def timed(start: int = 0, end: int | None = None) -> tuple[float, AudioAnalysis]:
        runs = []
        r = None
        for _ in range(5):
            t = time.perf_counter()
            r = analyze_window(p, start_frame=start, end_frame=end, progress=progress)
            runs.append(time.perf_counter() - t)
        assert r is not None
        return statistics.median(runs), r

    t, r = timed()
    assert r.summary.gaps == 1 and r.summary.dropped_frames == 541     # 441 zeros + 100
    out.append((f"{minutes}-minute window, {len(progress)} checkpoints",
                f"{size_mb:.1f} MB in {t * 1e3:.1f} ms", f"{size_mb / t:.0f} MB/s"))
    t10, r = timed(cut - 5 * RATE, cut + 5 * RATE)
    out.append(("10-second window of the same file", f"{10 * RATE * FRAME_BYTES / 1e6:.2f} MB in "
                f"{t10 * 1e3:.2f} ms", f"{10 * RATE * FRAME_BYTES / 1e6 / t10:.0f} MB/s"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--seeds", type=int, default=200, help="random captures per outage row")
    ap.add_argument("--minutes", type=int, default=10, help="length of the speed capture")
    args = ap.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else PLAIN_WIDTH, highlight=False)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        rows = limits(Lab(root)) + lab_cases()
        out_rows, notes = outages(args.seeds)
        rows += out_rows
        perf = speed(root, args.minutes)
    table = Table(title="audio analysis: detection limits")
    for col in ("case", "inserted", "detected", "smallest detectable"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.case, row.inserted, row.detected, row.smallest)
    console.print(table)
    for n in notes:
        console.print(n)
    pt = Table(title="audio analysis: speed (median of 5, file in page cache)")
    for col in ("capture", "analysis time", "throughput"):
        pt.add_column(col)
    for row3 in perf:
        pt.add_row(*row3)
    console.print(pt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
