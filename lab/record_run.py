"""The runner's side of ``--record``: one recorded VM per iteration, its log kept or dropped.

QEMU records from the first instruction of a QEMU process to its exit, and a log is
replayable only once QEMU has exited cleanly (it writes the header last), so an
iteration under recording boots its own VM and stops it at its end (lab.record). The
log is written in the VM's artifact directory (inside the run's 0700 directory), then
moved to ``iterations/K/record/`` when the iteration failed (or always, ``--record
all``), else deleted. What it cost is measured per iteration and lands in summary.json
(``record_*`` measurements).
"""

from __future__ import annotations

import time
from pathlib import Path

from lab.guest import GuestOs
from lab.machine import Machine
from lab.record import (RECORDING_FILE, RecordingInfo, RecordSpec, boot_inputs, file_digest,
                        keep_recording, last_guest_time)
from lab.results import Status
from lab.rundir import RunDir


class Recorder:
    """Per iteration: ``spec`` for the VM to boot, ``begin`` before it, ``finish`` after
    the VM stopped."""

    def __init__(self, mode: str, run: RunDir) -> None:
        if mode not in ("failing", "all"):
            raise ValueError(f"record mode is failing or all, not {mode!r}")
        self.mode = mode
        self.run = run
        self._t0: float | None = None
        self._inputs: dict[str, str] = {}
        self.kept: dict[str, Path] = {}

    def spec(self, vm_dir: Path) -> RecordSpec:
        """The log of the VM about to boot (its own artifact directory). No start
        snapshot (``rrsnapshot``): loading one hung QEMU 7.2's replay at its first
        interrupt here, and it cost 34 MB per recording; a ``--gdb`` replay takes its
        snapshot when gdb attaches (lab.record_debug)."""
        return RecordSpec(vm_dir / RECORDING_FILE)

    def begin(self, guest: GuestOs) -> None:
        """Before the VM boots: the clock, and the digests of the files it boots from
        (an image rebuilt during the recording makes it unreplayable: see finish)."""
        self._t0 = time.monotonic()
        self._inputs = {name: file_digest(path) for name, path in guest.boot_files().items()}

    def finish(self, m: Machine | None, key: str, status: Status, it_dir: Path
               ) -> dict[str, float]:
        """After ``m`` stopped: keep or delete its log; return the iteration's cost."""
        wall = time.monotonic() - self._t0 if self._t0 is not None else 0.0
        self._t0 = None
        if m is None or m.record is None or not m.record.file.exists():
            return {"record_wall_s": round(wall, 3)}
        rrfile = m.record.file
        size = rrfile.stat().st_size
        try:
            console = [ln.split(" ", 1)[1] if " " in ln else ""
                       for ln in (m.artifacts / "console.log").read_text(
                           encoding="utf-8", errors="replace").splitlines()]
        except OSError:
            console = []
        guest_s = last_guest_time(console)
        argv = tuple(m.process.argv) if m.process is not None else ()
        clean = m.timings_stop not in ("SIGKILL", None) and m.process is not None \
            and m.process.returncode() == 0
        now = boot_inputs(argv)
        same_files = all(now.get(k) == v for k, v in self._inputs.items())
        keep = (self.mode == "all" or status in (Status.FAILED, Status.ERROR)) \
            and clean and same_files
        if not clean:
            self.run.log(f"iteration {key}: the recording is not replayable (QEMU stopped by "
                         f"{m.timings_stop}, status {m.process.returncode() if m.process else '?'}"
                         "): QEMU writes the log's header only on a clean exit; not kept")
        if not same_files:
            self.run.log(f"iteration {key}: the guest image's kernel or initrd changed while "
                         "the iteration was recorded (an image rebuild?): its replay would run "
                         "other files; not kept")
        info = RecordingInfo(
            iteration=str(key), status=status.value, mode=self.mode,
            argv=argv, private_dir=str(m.private or ""), artifacts_dir=str(m.artifacts),
            boot_inputs=self._inputs or now, size_bytes=size, wall_s=round(wall, 3),
            boot_s=round(m.timings.get("launch_to_agent_s", 0.0), 3), guest_s=guest_s)
        dest = keep_recording(info, rrfile, it_dir, keep=keep, snapshots=m.record.snapshots)
        if dest is not None:
            self.kept[str(key)] = dest
            self.run.log(f"iteration {key}: recording kept in {dest} ({size / 1e6:.1f} MB, "
                         f"{guest_s or 0:.1f} s of guest time)")
        out = {"record_wall_s": round(wall, 3), "record_mb": round(size / 1e6, 2),
               "record_boot_s": info.boot_s}
        if guest_s:
            out["record_guest_s"] = guest_s
            out["record_mb_per_guest_s"] = round(size / 1e6 / guest_s, 3)
        return out
