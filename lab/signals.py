"""Turn SIGTERM (and SIGHUP) into an exception, so cleanup runs as for Ctrl-C.

CI runners and `timeout` stop jobs with SIGTERM; Python's default for it is to die
without unwinding, which would skip every ``finally`` that stops QEMU and writes the
report. Inside ``graceful()`` they raise ``Interrupted`` like SIGINT raises
KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

from lab.errors import Interrupted


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(f"interrupted by {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
