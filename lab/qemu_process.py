"""The QEMU process: started in its own session, tied to our life, stopped by a ladder.

QEMU runs in a new session (so a terminal's Ctrl-C reaches us, not it, and we decide
the order of shutdown) with PR_SET_PDEATHSIG=SIGKILL (so even if the lab is killed
with SIGKILL, QEMU dies with it and nothing is left running). Shutdown escalates like
avocado-vt: the caller's polite step (guest poweroff, QMP quit), then SIGTERM, then
SIGKILL, then a check that the process is really gone.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

from lab.privacy import child_env
from lab.errors import QemuError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


class QemuProcess:
    def __init__(self, argv: Sequence[str], *, stderr_path: Path, log: Callable[[str], None]) -> None:
        self.argv = list(argv)
        self.stderr_path = stderr_path
        self._log = log
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.stopped_by: str | None = None

    def start(self) -> None:
        self._stderr = open(self.stderr_path, "ab")
        try:
            self._proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=self._stderr,
                start_new_session=True, preexec_fn=_die_with_parent, close_fds=True,
                env=child_env())
        except OSError as exc:
            raise QemuError(f"could not start {self.argv[0]}: {exc}") from exc
        self._log(f"qemu started pid={self._proc.pid}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def suspended(self) -> bool:
        """QEMU stopped by a signal (SIGSTOP: state T in /proc): it answers nothing, so
        the polite rungs of the shutdown ladder and the guest's clean-up would each wait
        out their deadlines; the ladder goes straight to the signals."""
        if self._proc is None:
            return False
        try:
            with open(f"/proc/{self._proc.pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            return False
        return stat[stat.rfind(b")") + 2:][:1] in (b"T", b"t")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def responsive(self) -> bool:
        """Running and able to answer (not dead, not SIGSTOPped): only then is it worth
        sending QEMU or its guest anything that waits for a reply."""
        return self.alive() and not self.suspended()

    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else None

    def stderr_tail(self, n: int = 5) -> str:
        try:
            lines = self.stderr_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-n:])

    def wait(self, timeout: float) -> bool:
        if self._proc is None:
            return True
        try:
            self._proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, polite: Sequence[tuple[str, Callable[[], None]]] = (), *,
             step_timeout: float = 5.0) -> str:
        """Walk the ladder until QEMU is gone; return the step that ended it.

        ``polite`` are the caller's gentle steps (guest poweroff, QMP quit), each tried
        only while QEMU still runs; failures of a step just move to the next one.
        """
        if self._proc is None:
            return "never-started"
        try:
            if not self.alive():
                self.stopped_by = "exited"
                return self.stopped_by
            for name, action in polite:
                try:
                    action()
                except Exception as exc:  # a step failing is why the ladder exists
                    self._log(f"shutdown step {name} failed: {exc}")
                if self.wait(step_timeout):
                    self.stopped_by = name
                    return name
            for name, sig in (("SIGTERM", signal.SIGTERM), ("SIGKILL", signal.SIGKILL)):
                try:
                    os.killpg(self._proc.pid, sig)
                    if sig == signal.SIGTERM:
                        # a stopped QEMU (SIGSTOP) gets its SIGTERM only once it runs again
                        os.killpg(self._proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
                if self.wait(step_timeout):
                    self.stopped_by = name
                    return name
            raise QemuError(f"QEMU pid {self._proc.pid} survived SIGKILL; it may be stuck in "
                            "the kernel (D state). Check `ps -o stat,wchan -p PID`.")
        finally:
            self._verify_gone()
            if self._stderr is not None:
                self._stderr.close()
            self._log(f"qemu stopped by {self.stopped_by} rc={self.returncode()}")

    def _verify_gone(self) -> None:
        """Reap, and make sure no process of QEMU's group survives."""
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        # the group still has members (helpers QEMU forked): kill them too
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                os.killpg(self._proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
