"""Snapshot reset: a VM's state saved once, every later iteration started from it.

The restore point is taken with QMP ``migrate`` to a file in the run's private
directory (QEMU 7.2 has no ``file:`` URI; ``exec:cat > FILE``); an iteration starts from
it in a fresh QEMU launched with the same command line and ``-incoming exec:cat FILE``.
Chosen over ``savevm``/``loadvm``: the built-in guest has no disk to keep a vmstate in,
and a fresh process is also how an iteration that oopsed or lost QEMU comes back, so
there is one way in, not two. What a restore keeps true:

- the hardware: the point is taken at the start of an iteration, when only the
  topology's cold devices are present, so the restored command line is the topology's;
- the agent: a new connection to the new forward (the guest's host key is the same);
- the serial consoles and the trace relay: new sockets, and the guest's side of them
  is restored with it (the kprobe relay keeps running inside the guest);
- the clock: each observation fits its own alignment from fresh sync samples, so the
  guest clock's jump back to the point's time is absorbed;
- the tracer's knowledge of what the guest has defined (``Machine.guest_cache``) is the
  point's, not the last iteration's.
"""

from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.deadline import seconds
from lab.errors import QemuError

if TYPE_CHECKING:
    from lab.machine import Machine

#: how long a save may take before the lab gives up (512 MiB guest under TCG: ~0.6 s)
SAVE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RestorePoint:
    """Where an iteration starts from under ``reset: snapshot``."""

    file: Path
    size: int
    save_s: float
    taken_at_ns: int
    guest_cache: dict[str, Any] = field(default_factory=dict)

    def incoming_uri(self) -> str:
        # exec: runs through /bin/sh -c: the path is quoted for that shell
        return f"exec:cat {shlex.quote(str(self.file))}"

    def describe(self) -> str:
        return f"{self.file.name} ({self.size / 2**20:.1f} MiB, saved in {self.save_s:.2f} s)"


def save(m: Machine, path: Path) -> RestorePoint:
    """Save the running VM's whole state to ``path`` and let it run on.

    ``migrate`` pauses the guest at its end; ``cont`` resumes it, so the iteration that
    took the point goes on in the VM it was in.
    """
    assert m.qmp is not None
    t0 = time.monotonic()
    t_ns = time.time_ns()
    m.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
    end = t0 + SAVE_TIMEOUT_S * (seconds("qmp_command") / 10.0)
    status = "?"
    while True:
        info = m.qmp.execute("query-migrate") or {}
        status = str(info.get("status", "?"))
        if status == "completed":
            break
        if status in ("failed", "cancelled"):
            raise QemuError(f"saving the restore point failed: migration {status} "
                            f"({info.get('error-desc', 'no reason given')})")
        if time.monotonic() > end:
            m.qmp.execute("migrate_cancel")
            raise QemuError(f"saving the restore point took over "
                            f"{end - t0:.0f} s (migration {status}); cancelled")
        time.sleep(0.02)
    save_s = time.monotonic() - t0
    m.qmp.execute("cont")
    size = path.stat().st_size
    point = RestorePoint(file=path, size=size, save_s=save_s, taken_at_ns=t_ns,
                         guest_cache=dict(m.guest_cache))
    m.run.log(f"restore point saved: {point.describe()}")
    return point


def wait_incoming(m: Machine, timeout: float) -> float:
    """Until the incoming migration is in (the VM stays paused: -S); seconds taken."""
    assert m.qmp is not None
    t0 = time.monotonic()
    while True:
        status = str((m.qmp.execute("query-status") or {}).get("status", "?"))
        if status != "inmigrate":
            if status not in ("paused", "prelaunch", "postmigrate"):
                raise QemuError(f"restoring the snapshot left QEMU {status!r}, not paused")
            return time.monotonic() - t0
        if m.process is not None and not m.process.alive():
            raise QemuError(f"QEMU exited while restoring the snapshot: "
                            f"{m.process.stderr_tail()}")
        if time.monotonic() - t0 > timeout:
            raise QemuError(f"the snapshot was not restored within {timeout:.0f} s")
        time.sleep(0.01)
