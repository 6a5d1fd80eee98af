"""Watching QEMU's WAV capture grow: the checkpoints that put host time on its frames.

QEMU's ``-audiodev wav`` writes what the guest plays, paced by the virtual clock, and
writes nothing while no stream runs or the VM is paused. So the samples alone cannot
say *when* a stream stopped or how long the outage lasted before the next one began:
the file just continues. The host's view can: this watcher polls the file's size and
keeps ``(host ns, frames in the file)`` checkpoints, which lab.audio_analysis uses to
map frames to host time and to find the stalls between streams.

It logs what changed, not every poll: a checkpoint when the frame count changed, the
last unchanged sample before a change (so a stream's restart is known to within one
poll), and a heartbeat while nothing changes.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

#: the canonical WAV header QEMU writes before the frames
WAV_HEADER_BYTES = 44
FRAME_BYTES = 4
POLL_S = 0.005
HEARTBEAT_NS = 250_000_000
#: checkpoints kept at most (a 10-minute stream writes ~60 a second): beyond, thinned
MAX_CHECKPOINTS = 100_000


def frames_in(path: Path) -> int:
    try:
        size = os.stat(path).st_size
    except OSError:
        return 0
    return max(0, size - WAV_HEADER_BYTES) // FRAME_BYTES


class CaptureWatch:
    """Polls ``path`` in a thread between ``start`` and ``stop``."""

    def __init__(self, path: Path, *, poll_s: float = POLL_S) -> None:
        self.path = path
        self.poll_s = poll_s
        self._points: list[tuple[int, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.polls = 0

    def start(self) -> CaptureWatch:
        self._points = [(time.time_ns(), frames_in(self.path))]
        self._thread = threading.Thread(target=self._run, name="audio-capture-watch", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last_t, last_f = self._points[0]
        prev_t = last_t           # the latest poll, recorded or not
        while not self._stop.wait(self.poll_s):
            t, f = time.time_ns(), frames_in(self.path)
            self.polls += 1
            with self._lock:
                if f != last_f:
                    if prev_t != last_t:
                        self._points.append((prev_t, last_f))   # unchanged until then
                    self._points.append((t, f))
                    last_t, last_f = t, f
                elif t - last_t >= HEARTBEAT_NS:
                    self._points.append((t, f))
                    last_t = t
                if len(self._points) > MAX_CHECKPOINTS:
                    self._points = self._points[:1] + self._points[1:-1:2] + self._points[-1:]
            prev_t = t

    def checkpoints(self) -> list[tuple[int, int]]:
        """The checkpoints so far, ending with a fresh sample (callable while running)."""
        with self._lock:
            pts = list(self._points)
        now = (time.time_ns(), frames_in(self.path))
        if not pts or now[1] != pts[-1][1] or now[0] > pts[-1][0]:
            pts.append(now)
        return pts

    def stop(self) -> list[tuple[int, int]]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        return self.checkpoints()
