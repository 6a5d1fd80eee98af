"""Turn SIGTERM (and SIGHUP) into an exception, so cleanup runs as for Ctrl-C.

CI runners and `timeout` stop jobs with SIGTERM; Python's default for it is to die
without unwinding, which would skip every ``finally`` that stops QEMU and writes the
report. Inside ``graceful()`` they raise ``Interrupted`` like SIGINT raises
KeyboardInterrupt.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
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


def run_interruptible(main: Callable[[], int], what: str) -> int:
    """``main()`` with SIGTERM/SIGHUP unwinding like Ctrl-C (QEMU stopped, temporary
    directories gone); 130 with one line saying so when it was interrupted. For the
    benchmark scripts; the CLI maps its errors itself."""
    with graceful():
        try:
            return main()
        except (KeyboardInterrupt, Interrupted) as exc:
            print(f"{what} interrupted: {exc or 'Ctrl-C'}", file=sys.stderr)
            return 130
