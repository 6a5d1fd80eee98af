"""Snapshot reset: a VM's state saved once, every later iteration started from it.

The restore point is taken with QMP ``migrate`` to a file in the run's private
directory (QEMU 7.2 has no ``file:`` URI; ``exec:cat > FILE``); an iteration starts from
it in a fresh QEMU launched with the same command line and ``-incoming exec:cat FILE``.
Chosen over ``savevm``/``loadvm`` (bench/snapshot_mechanism.py, TCG: reset to the first
command answered 0.81 s this way, 0.96 s by ``loadvm`` in the same QEMU on a qcow2: the
new SSH handshake costs the same, ``loadvm`` is slower than a new process taking the
state in), and a fresh process is also how an iteration that oopsed or lost QEMU comes
back, so there is one way in, not two. What a restore keeps true:

- the hardware: the restored QEMU's command line is the topology's plus, as cold-plugged
  devices, those hot-plugged before the point (a ``snapshot:`` step after the setup's
  plugs), on the same ports, so every device's migration section finds its twin;
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
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.deadline import poll, seconds
from lab.errors import DeadlineExceeded, QemuError
from vdevice.inventory import QemuInventory
from vdevice.topology import Placement, Topology

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
    # the machine at the point: devices hot-plugged before it are cold-plugged here
    topology: Topology | None = None
    # which setup (the steps before a ``snapshot:`` step) the point holds ("": none)
    key: str = ""
    name: str = ""

    def incoming_uri(self) -> str:
        # exec: runs through /bin/sh -c: the path is quoted for that shell
        return f"exec:cat {shlex.quote(str(self.file))}"

    def describe(self) -> str:
        # the private directory's name too: it tells this run's point from another's
        return f"{self.file.parent.name}/{self.file.name} ({self.size / 2**20:.1f} MiB, saved in {self.save_s:.2f} s)"


@dataclass(frozen=True)
class PointDevice:
    """A device present at the restore point: its id, QEMU type and where it came from."""

    id: str
    driver: str
    source: str          # "the topology" or the plug step's file:line


def unmigratable(devices: Iterable[PointDevice], inventory: QemuInventory) -> str | None:
    """Why a point holding ``devices`` cannot be restored (None: it can, or QEMU cannot
    say). ``migrate`` does not refuse a device without migration state: the restored VM
    would have it reset while its guest driver believes it set up."""
    bad = [d for d in devices if inventory.can_migrate(d.driver) is False]
    if not bad:
        return None
    names = "; ".join(f"{d.id} ({d.driver}, {d.source})" for d in bad)
    return (f"reset: snapshot cannot restore {names}: QEMU {inventory.version_str} keeps no "
            f"migration state for {'that type' if len(bad) == 1 else 'those types'} "
            f"(-dump-vmstate lists none), so a restored VM would hold it reset under a "
            f"driver that believes it is set up. Plug it after the restore point (after the "
            f"snapshot step, or with no snapshot step at all), or use reset: replug or reboot")


def topology_at(m: Machine) -> Topology:
    """The machine's topology with every device present now cold-plugged, and only
    those: the command line a QEMU needs to take this machine's state in. A declared
    device not plugged now stays with the scenario's topology, where plug steps find it
    (its port may be the one a setup step plugged another device into)."""
    devices = tuple(replace(d, placement=Placement.COLD)
                    for d in m.topology.devices if d.id in m.present)
    return replace(m.topology, devices=devices)


def save(m: Machine, path: Path, *, key: str = "", name: str = "") -> RestorePoint:
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
                         taken_at_ns=t_ns, guest_cache=dict(m.guest_cache),
                         topology=topology_at(m), key=key, name=name)
    m.run.log(f"restore point {(name + ' ') if name else ''}saved: {point.describe()}")
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
