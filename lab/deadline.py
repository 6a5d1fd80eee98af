"""Deadlines: every wait in the lab goes through here.

qemu.qmp has no timeouts of its own and paramiko's are per socket operation, so the
lab puts one named deadline around each logical wait. Defaults live in ``DEFAULTS``
so that a slow host (TCG on a loaded CI runner) can scale all of them at once with
``REBALAB_TIMEOUT_SCALE``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from lab.errors import DeadlineExceeded

T = TypeVar("T")


@dataclass(frozen=True)
class Defaults:
    """Default deadlines in seconds (before scaling)."""

    qemu_start: float = 15.0
    qmp_connect: float = 10.0
    qmp_command: float = 10.0
    boot_marker: float = 90.0
    agent_ready: float = 60.0
    guest_command: float = 30.0
    driver_bound: float = 20.0
    device_deleted: float = 20.0
    native_unplug: float = 30.0
    guest_gone: float = 20.0
    shutdown_step: float = 5.0
    kvm_probe: float = 12.0
    # a snapshot reset's restore point (QMP migrate of a 512 MiB guest: ~0.7 s under TCG)
    snapshot_save: float = 60.0
    # Windows guests (KVM only). Readiness is the agent answering after a full Windows
    # boot, which on a fresh overlay includes device setup: minutes, not seconds.
    windows_ready: float = 900.0
    # Stop-Computer / the ACPI power button until QEMU exits (-no-reboot)
    windows_shutdown: float = 120.0
    # after a bug check: Windows writes the dump to the page file, then resets
    windows_crash_dump: float = 300.0


def scale() -> float:
    try:
        return max(0.1, float(os.environ.get("REBALAB_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


DEFAULTS = Defaults()


def seconds(name: str) -> float:
    """The default deadline called ``name``, scaled for this host."""
    return float(getattr(DEFAULTS, name)) * scale()


class Deadline:
    """A point in monotonic time with a name, for waits split over several calls."""

    def __init__(self, what: str, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        self.start = time.monotonic()
        self.end = self.start + timeout

    def remaining(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.end

    def check(self, last_seen: str | None = None) -> None:
        if self.expired():
            raise DeadlineExceeded(self.what, self.timeout, last_seen)


async def within(what: str, timeout: float, aw: Awaitable[T]) -> T:
    """Await ``aw`` under a deadline; the error names ``what`` and the limit."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except asyncio.TimeoutError:
        raise DeadlineExceeded(what, timeout) from None


def poll(what: str, timeout: float, probe: Callable[[], T | None], *,
         first: float = 0.005, factor: float = 1.5, ceiling: float = 0.1,
         describe: Callable[[], str | None] | None = None) -> T:
    """Call ``probe`` with a short exponential backoff until it returns non-None.

    Used where no event exists (a sysfs link in the guest). The backoff starts at 5 ms
    so that fast transitions are seen fast, and is capped so slow ones cost few calls.
    """
    dl = Deadline(what, timeout)
    delay = first
    while True:
        result = probe()
        if result is not None:
            return result
        if dl.expired():
            raise DeadlineExceeded(what, timeout, describe() if describe else None)
        time.sleep(min(delay, dl.remaining()))
        delay = min(delay * factor, ceiling)
