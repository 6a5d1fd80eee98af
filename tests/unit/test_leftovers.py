"""Nothing left behind, nothing waited for in vain, nothing stopped by a full disk: socket
directories of labs killed with -9 are reclaimed, a suspended QEMU is stopped at once,
and a log write that fails (ENOSPC) does not stop its caller (issue 13)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from lab.qemu_process import QemuProcess



def test_socket_directories_of_dead_labs_are_reclaimed(tmp_path: Path) -> None:
    """kill -9 of the CLI leaves its socket directory; the next machine removes it."""
    from lab.machine import OWNER_FILE, PRIVATE_PREFIX, reclaim_stale_private_dirs

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f"{PRIVATE_PREFIX}stale"
    stale.mkdir(mode=0o700)
    (stale / OWNER_FILE).write_text(f"{dead.pid}\n")
    (stale / "qmp.sock").write_text("")
    live = tmp_path / f"{PRIVATE_PREFIX}live"
    live.mkdir(mode=0o700)
    (live / OWNER_FILE).write_text(f"{os.getpid()}\n")
    foreign = tmp_path / f"{PRIVATE_PREFIX}foreign"      # no owner file: not ours to judge
    foreign.mkdir()
    seen: list[str] = []
    removed = reclaim_stale_private_dirs(seen.append, tmp=tmp_path)
    assert removed == [stale] and not stale.exists()
    assert live.exists() and foreign.exists() and "died (pid" in seen[0]


def test_a_suspended_qemu_is_seen_and_stopped_at_once(tmp_path: Path) -> None:
    """SIGSTOP'd QEMU: no polite rung can work, SIGTERM needs a SIGCONT to arrive."""
    import time

    p = QemuProcess(["sleep", "30"], stderr_path=tmp_path / "err", log=lambda m: None)
    p.start()
    assert p.pid is not None and not p.suspended()
    os.kill(p.pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while not p.suspended() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.suspended()
    t0 = time.monotonic()
    assert p.stop(step_timeout=5.0) == "SIGTERM"
    assert time.monotonic() - t0 < 2 and not p.alive()


class _FullDisk:
    """A file whose writes fail as on a full disk (ENOSPC)."""

    closed = False

    def write(self, text: str) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.closed = True


def test_a_full_disk_does_not_stop_logging_callers(tmp_path: Path) -> None:
    from lab.console import Console
    from lab.events import Event, Kind, Source
    from lab.rundir import RunDir

    run = RunDir(tmp_path, "r")
    run._log = _FullDisk()            # type: ignore[assignment]
    run._events = _FullDisk()         # type: ignore[assignment]
    run.log("machine stopping")       # the shutdown ladder logs every rung: no raise
    run.record(Event(1, Source.HOST_LAB, Kind.OPERATION))
    assert run.write_failures == 2 and len(run.events) == 1
    con = Console(tmp_path / "none.sock", tmp_path / "console.log")
    con._log = _FullDisk()            # type: ignore[assignment]
    con._add(1, b"[    1.000000] hello")          # the reader thread keeps going
    assert con.write_failures == 1 and [ln.text for ln in con.lines()] == ["[    1.000000] hello"]
