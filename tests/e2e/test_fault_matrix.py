"""The fault matrix (issue 13): each fault injected at boot, during a hot-plug wait and
during a guest command, through the real CLI. For every case: the exit code, the cause
named in the summary (or on the terminal when nothing can be written), where the run
stopped, the run ending within the step's own deadline plus a few seconds, and nothing
left behind (no QEMU, no socket directory, no temporary file).

The trigger watches the run's own artifacts (lab.log, qmp.jsonl) for the phase, then
injects the fault from outside, as a person or a CI runner would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab.image import GuestImage

REPO = Path(__file__).resolve().parents[2]

#: one guest command that runs long enough to be interrupted; its 15 s timeout is the
#: deadline a frozen QEMU must be noticed within
COMMAND = """name: fault-command
topology: default
guest: linux
steps:
  - guest: {run: "echo started; sleep 12", timeout: 15s}
"""

#: a plug whose driver never binds (the test driver is never loaded by alias, and this
#: scenario does not load it): the lab waits its 20 s for "bound"
HOTPLUG_WAIT = """name: fault-hotplug-wait
topology: default
guest: linux
steps:
  - plug: {device: t0, model: edu, port: rp1}
  - wait: {event: bound, device: t0, timeout: 20s}
"""

#: a panic while the lab waits for a driver: triggered from the guest itself
PANIC_IN_WAIT = """name: fault-panic-in-wait
topology: default
guest: linux
steps:
  - guest: {run: "sleep 1; echo c > /proc/sysrq-trigger", background: true, name: panic}
  - plug: {device: t0, model: edu, port: rp1}
  - wait: {event: bound, device: t0, timeout: 20s}
"""

#: the guest's SSH server killed by the iteration's own command; the next iteration
#: must not be charged with it
SSHD_KILLED = """name: fault-sshd-killed
topology: default
guest: linux
parameters:
  n: [0, 1]
steps:
  - guest: {run: "if [ ${n} = 0 ]; then kill -9 $(pidof sshd dropbear); fi; echo ok", timeout: 15s}
"""


@dataclass
class Outcome:
    rc: int | None
    out: str
    took: float
    runs: Path
    qemu_pid: int | None
    sockdir: Path | None

    @property
    def run(self) -> Path:
        return next(p for p in self.runs.iterdir() if p.is_dir())

    def summary(self) -> dict:                                      # type: ignore[type-arg]
        return json.loads((self.run / "summary.json").read_text())


def _lab_log(runs: Path) -> str:
    logs = list(runs.glob("*/lab.log"))
    return logs[0].read_text(errors="replace") if logs else ""


def _qmp_sent(runs: Path, command: str) -> bool:
    return any(f'"{command}"' in p.read_text(errors="replace")
               for p in runs.glob("*/vm*/qmp.jsonl"))


def _phase_reached(phase: str, runs: Path) -> bool:
    log = _lab_log(runs)
    if phase == "boot":
        return "qemu started pid=" in log and "ssh ready" not in log
    if phase == "hotplug-wait":
        return _qmp_sent(runs, "device_add")
    if phase == "command":
        # the iteration's tracer is up: the next thing is the scenario's command
        return "kprobes on" in log
    raise AssertionError(phase)


def _qemu_of(runs: Path) -> tuple[int | None, Path | None]:
    m = re.search(r"qemu started pid=(\d+)", _lab_log(runs))
    sock = None
    for cmd in runs.glob("*/vm*/qemu-cmdline.txt"):
        s = re.search(r"path=(/[^,\s]*/rebalab-[^/,\s]+)/qmp\.sock", cmd.read_text())
        if s:
            sock = Path(s[1])
    return (int(m[1]) if m else None), sock


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _fill(path: Path) -> None:
    """Fill the run directory's filesystem to the last byte."""
    with open(path / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


@pytest.fixture
def small_runs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB filesystem for the run directory, so a test can fill it."""
    d = tmp_path / "runs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip()[:100]}): "
                    "the full-disk cases need root or CAP_SYS_ADMIN")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _inject(fault: str, proc: subprocess.Popen[str], runs: Path) -> None:
    pid, _ = _qemu_of(runs)
    if fault == "qemu-kill9":
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    elif fault == "qemu-sigstop":
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
    elif fault == "cli-sigint":
        proc.send_signal(signal.SIGINT)
    elif fault == "cli-sigterm":
        proc.send_signal(signal.SIGTERM)
    elif fault == "cli-kill9":
        proc.send_signal(signal.SIGKILL)
    elif fault == "enospc":
        _fill(runs)
    elif fault == "qemu-sigstop+cli-sigint":
        # Ctrl-C while QEMU is frozen: the clean-up must not wait on a QEMU that
        # answers nothing (97 s seen before)
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
    else:
        raise AssertionError(fault)


def _run_with_fault(scenario: str, tmp_path: Path, runs: Path, phase: str | None,
                    fault: str | None, *, delay: float = 0.0,
                    timeout: float = 120) -> Outcome:
    sc = tmp_path / "fault.yaml"
    sc.write_text(scenario)
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lab.cli", "run", str(sc), "--runs", str(runs)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        # the child hears SIGINT whatever this suite inherited (see test_cleanup.py)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    qemu_pid: int | None = None
    sockdir: Path | None = None
    try:
        if phase is not None and fault is not None:
            deadline = time.monotonic() + 90
            while not _phase_reached(phase, runs):
                assert proc.poll() is None, f"the run ended before {phase}: {proc.stdout.read()[-2000:] if proc.stdout else ''}"
                assert time.monotonic() < deadline, f"{phase} never reached"
                time.sleep(0.05)
            time.sleep(delay)
            qemu_pid, sockdir = _qemu_of(runs)
            _inject(fault, proc, runs)
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if qemu_pid is not None and fault and fault.startswith("qemu-sigstop") and _alive(qemu_pid):
            os.kill(qemu_pid, signal.SIGCONT)
    if qemu_pid is None:
        qemu_pid, sockdir = _qemu_of(runs)
    return Outcome(proc.returncode, out, time.monotonic() - t0, runs, qemu_pid, sockdir)


def _nothing_left(o: Outcome, *, wait: float = 0.0) -> None:
    deadline = time.monotonic() + wait
    while o.qemu_pid is not None and _alive(o.qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert o.qemu_pid is None or not _alive(o.qemu_pid), f"QEMU {o.qemu_pid} left running"
    assert o.sockdir is None or not o.sockdir.exists(), f"{o.sockdir} left behind"
    tmp = [p for p in o.runs.rglob("*.tmp")]
    assert not tmp, f"temporary files left: {tmp}"


def _stopped_iteration(o: Outcome) -> dict:                          # type: ignore[type-arg]
    s = o.summary()
    (it,) = [i for i in s["iterations"] if i["status"] != "skipped"][:1]
    return it


# ---- QEMU killed ------------------------------------------------------------------------

@pytest.mark.parametrize("phase, scenario", [("boot", COMMAND), ("hotplug-wait", HOTPLUG_WAIT)])
def test_qemu_killed_is_named_and_ends_fast(phase: str, scenario: str, image: GuestImage,
                                            tmp_path: Path) -> None:
    """(Killed during a guest command: tests/e2e/test_faults.py.)"""
    # 1 s after QEMU started: the guest is booting (the ready marker comes at ~3 s)
    o = _run_with_fault(scenario, tmp_path, tmp_path / "runs", phase, "qemu-kill9",
                        delay=1.0)
    assert o.rc == 2, o.out[-2000:]
    it = _stopped_iteration(o)
    assert it["status"] == "error" and "QEMU exited" in it["error"], it
    s = o.summary()
    assert s["run"]["stopped_at"] or it["stopped_at"], s["run"]
    assert o.took < 20 + 15, o.took       # not the bound wait's full 20 s, and no hang
    _nothing_left(o)


# ---- QEMU frozen (SIGSTOP) ----------------------------------------------------------------

@pytest.mark.parametrize("phase, scenario", [("hotplug-wait", HOTPLUG_WAIT),
                                             ("command", COMMAND)])
def test_frozen_qemu_ends_within_the_steps_deadline(phase: str, scenario: str,
                                                    image: GuestImage, tmp_path: Path) -> None:
    o = _run_with_fault(scenario, tmp_path, tmp_path / "runs", phase, "qemu-sigstop",
                        delay=1.0)
    assert o.rc == 2, o.out[-2000:]
    it = _stopped_iteration(o)
    assert it["status"] == "error", it
    assert "stopped" in it["error"] and "SIGSTOP" in it["error"], it["error"]
    assert it["stopped_at"], it
    # the deadlines are 15 s (command) and 20 s (bound wait); boot and shutdown add some
    assert o.took < 20 + 25, o.took
    _nothing_left(o)


# ---- the CLI interrupted ----------------------------------------------------------------

@pytest.mark.parametrize("phase, fault, scenario", [
    ("boot", "cli-sigint", COMMAND), ("boot", "cli-sigterm", COMMAND),
    ("hotplug-wait", "cli-sigint", HOTPLUG_WAIT), ("command", "cli-sigterm", COMMAND),
    ("command", "qemu-sigstop+cli-sigint", COMMAND)])
def test_interrupted_cli_keeps_a_summary_that_says_where(phase: str, fault: str, scenario: str,
                                                         image: GuestImage,
                                                         tmp_path: Path) -> None:
    o = _run_with_fault(scenario, tmp_path, tmp_path / "runs", phase, fault, delay=0.5,
                        timeout=60)
    assert o.rc == 130, o.out[-2000:]
    assert o.took < 45, o.took       # boot + a few seconds, not a deadline per clean-up call
    s = o.summary()
    assert s["status"] == "interrupted", s["status"]
    assert "interrupted" in (s["run"]["stopped_at"] or ""), s["run"]
    (it,) = s["iterations"]
    assert it["status"] == "interrupted", it
    if phase != "boot":
        # where: the step that was running
        assert it["stopped_at"] and "fault.yaml:" in it["stopped_at"], it
    for name in ("junit.xml", "report.html", "lab.log"):
        assert (o.run / name).is_file(), name
    _nothing_left(o)


# serial: the dead lab's socket directory must still be there for this test's own reclaim;
# any other worker's VM that starts meanwhile reclaims it first (Machine.start does)
@pytest.mark.serial
@pytest.mark.parametrize("phase, scenario", [("boot", COMMAND), ("command", COMMAND)])
def test_killed_cli_leaves_qemu_nothing_and_the_next_run_reclaims(phase: str, scenario: str,
                                                                  image: GuestImage,
                                                                  tmp_path: Path) -> None:
    """kill -9 cannot be handled: QEMU must die with its parent (PDEATHSIG) and the
    socket directory, which nobody could remove, is reclaimed by the next lab."""
    from lab.machine import reclaim_stale_private_dirs

    o = _run_with_fault(scenario, tmp_path, tmp_path / "runs", phase, "cli-kill9", delay=0.5)
    assert o.rc == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while o.qemu_pid is not None and _alive(o.qemu_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert o.qemu_pid is not None and not _alive(o.qemu_pid), "QEMU outlived the killed lab"
    assert o.sockdir is not None and o.sockdir.exists()    # nobody could remove it
    removed = reclaim_stale_private_dirs()
    assert o.sockdir in [Path(p) for p in removed] and not o.sockdir.exists(), removed
    assert (o.run / "lab.log").is_file()                 # what was written is kept


# ---- a full disk ----------------------------------------------------------------------------

@pytest.mark.parametrize("phase", ["boot", "command"])
def test_a_full_disk_stops_the_run_as_a_lab_error(phase: str, image: GuestImage,
                                                  tmp_path: Path, small_runs: Path) -> None:
    o = _run_with_fault(COMMAND, tmp_path, small_runs, phase, "enospc", delay=0.5)
    assert o.rc == 2, o.out[-2000:]
    assert "Traceback" not in o.out and "internal error" not in o.out, o.out[-2000:]
    last = [ln for ln in o.out.splitlines() if ln.startswith("error: ")]
    assert last and "not written" in last[-1] and "free space" in last[-1], o.out[-1500:]
    # the results are on the terminal, since the disk did not take them
    assert "fault-command: ERROR" in o.out, o.out[-1500:]
    assert not (o.run / "summary.json").exists() or json.loads(
        (o.run / "summary.json").read_text())["exit_code"] == 2
    _nothing_left(o)
    lab_log = (o.run / "lab.log").read_text(errors="replace")
    assert "qemu started" in lab_log


# ---- the guest breaks ----------------------------------------------------------------------

def test_a_panic_during_a_hotplug_wait_is_the_guests_failure(image: GuestImage,
                                                             tmp_path: Path) -> None:
    o = _run_with_fault(PANIC_IN_WAIT, tmp_path, tmp_path / "runs", None, None)
    assert o.rc == 1, o.out[-2000:]
    (it,) = o.summary()["iterations"]
    assert it["status"] == "failed", it
    assert {v["rule"] for v in it["violations"]} & {"kernel.panic", "kernel.oops"}, it
    assert o.took < 20, o.took               # the 20 s bound wait is not waited out
    _nothing_left(o)


def test_a_killed_ssh_server_is_charged_to_its_own_iteration(image: GuestImage,
                                                             tmp_path: Path) -> None:
    o = _run_with_fault(SSHD_KILLED, tmp_path, tmp_path / "runs", None, None)
    assert o.rc == 2, o.out[-2000:]
    its = o.summary()["iterations"]
    assert [i["status"] for i in its] == ["error", "passed"], its
    first = its[0]
    assert first["stopped_at"] and "fault.yaml:" in first["stopped_at"], first
    assert "SSH" in first["error"], first["error"]
    assert "QEMU exited" not in first["error"], first["error"]
    _nothing_left(o)
