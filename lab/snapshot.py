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
  is restored with it (the kprobe relay keeps running inside the guest, the probes armed
  as at the point: ``LinuxTracer`` asks the restored guest nothing at start);
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

from lab.deadline import poll, seconds
from lab.errors import DeadlineExceeded, QemuError

if TYPE_CHECKING:
    from lab.machine import Machine

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
    qmp = m.qmp
    assert qmp is not None
    t0 = time.monotonic()
    t_ns = time.time_ns()
    qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(str(path))}"})
    last: dict[str, Any] = {}

    def done() -> bool | None:
        last.clear()
        last.update(qmp.execute("query-migrate") or {})
        status = str(last.get("status", "?"))
        if status in ("failed", "cancelled"):
            raise QemuError(f"saving the restore point failed: migration {status} "
                            f"({last.get('error-desc', 'no reason given')})")
        return True if status == "completed" else None

    timeout = seconds("snapshot_save")
    try:
        poll("the restore point's migration", timeout, done, ceiling=0.02)
    except DeadlineExceeded:
        qmp.execute("migrate_cancel")
        raise QemuError(f"saving the restore point took over {timeout:.0f} s (migration "
                        f"{last.get('status', '?')}); cancelled") from None
    save_s = time.monotonic() - t0
    qmp.execute("cont")
    point = RestorePoint(file=path, size=path.stat().st_size, save_s=save_s,
                         taken_at_ns=t_ns, guest_cache=dict(m.guest_cache))
    m.run.log(f"restore point saved: {point.describe()}")
    return point


def wait_incoming(m: Machine, timeout: float) -> float:
    """Until the incoming migration is in (the VM stays paused: -S); seconds taken."""
    qmp = m.qmp
    assert qmp is not None
    t0 = time.monotonic()

    def restored() -> str | None:
        status = str((qmp.execute("query-status") or {}).get("status", "?"))
        if status != "inmigrate":
            return status
        if m.process is not None and not m.process.alive():
            raise QemuError(f"QEMU exited while restoring the snapshot: "
                            f"{m.process.stderr_tail()}")
        return None

    try:
        status = poll("the snapshot's restore", timeout, restored, ceiling=0.01)
    except DeadlineExceeded:
        raise QemuError(f"the snapshot was not restored within {timeout:.0f} s") from None
    if status not in ("paused", "prelaunch", "postmigrate"):
        raise QemuError(f"restoring the snapshot left QEMU {status!r}, not paused")
    return time.monotonic() - t0
