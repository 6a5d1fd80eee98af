"""Faults end fast and with the right verdict: a guest panic in the middle of a guest
command is the guest's failure (exit 1, kernel.oops), not a lab error, and the next
iteration gets a fresh VM. (A first part of issue 13's fault matrix.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lab.image import GuestImage
from tests.e2e.test_scenarios import rebalab, run_dir_of

PANIC = """name: panic-mid-command
topology: default
guest: linux
parameters:
  n: [1, 2]
steps:
  - guest: {run: "sleep 0.${n}; echo c > /proc/sysrq-trigger; sleep 30", timeout: 60s}
"""


def test_a_panic_during_a_guest_command_is_the_guests_failure(image: GuestImage,
                                                               tmp_path: Path) -> None:
    sc = tmp_path / "panic.yaml"
    sc.write_text(PANIC)
    t0 = time.monotonic()
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    took = time.monotonic() - t0
    out = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 1, out
    run = run_dir_of(r.stdout)
    s = json.loads((run / "summary.json").read_text())
    its = s["iterations"]
    assert [it["status"] for it in its] == ["failed", "failed"], out
    for it in its:
        rules = {v["rule"] for v in it["violations"]}
        assert rules & {"kernel.oops", "kernel.panic"}, it["violations"]
        assert any("sysrq triggered crash" in v["message"] or "Kernel panic" in v["message"]
                   for v in it["violations"] if v["rule"].startswith("kernel.")), it["violations"]
    # QEMU exits at the panic (panic=-1, -no-reboot): the command's 60 s timeout is not
    # waited out, and each iteration had its own VM
    assert took < 60, took
    assert len(list(run.glob("vm*"))) == 2


SLEEPER = """name: qemu-killed
topology: default
guest: linux
steps:
  - guest: {run: "echo started; sleep 20", timeout: 60s}
"""


def test_qemu_killed_mid_command_is_named_as_such(image: GuestImage, tmp_path: Path) -> None:
    """kill -9 of QEMU while a guest command runs: a lab error (exit 2) that says QEMU
    exited, not an SSH drop, and the run ends well before the command's timeout."""
    import os
    import re
    import signal
    import subprocess
    import sys

    sc = tmp_path / "sleeper.yaml"
    sc.write_text(SLEEPER)
    runs = tmp_path / "runs"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", str(sc), "--runs", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        pid = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and pid is None:
            for log in runs.glob("*/lab.log"):
                text = log.read_text()
                m = re.search(r"qemu started pid=(\d+)", text)
                if m and "guest & " not in text and "ssh ready" in text:
                    pid = int(m[1])
            time.sleep(0.1)
        assert pid is not None, "QEMU never started"
        time.sleep(1.5)                       # the guest command is running now
        os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, out[-2000:]
    assert time.monotonic() - t0 < 45
    run = next(runs.iterdir())
    s = json.loads((run / "summary.json").read_text())
    (it,) = s["iterations"]
    assert it["status"] == "error" and it["error"].startswith("QEMU exited"), it
