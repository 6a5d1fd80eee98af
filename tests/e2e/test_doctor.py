"""`rebalab doctor` on this machine, as a user runs it (issue 10): the real CLI in a
child process, booting the built-in guest once.

Other people's VMs run on the same host, so "nothing left behind" is judged by what
belongs to the doctor: QEMU processes whose command line names its runs directory,
and private temp dirs whose owner.pid is the doctor's pid.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from lab.image import GuestImage
from tests.e2e.conftest import qemu_pids_for

LINUX_CHECKS = ("qemu", "temp dir", "runs dir", "disk space", "host tools", "image manifest",
                "image files", "accelerator", "boot", "ssh", "kprobes", "btf", "tracer start",
                "clock", "hot-plug", "tracer stop", "shutdown")


def _doctor(*args: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess[str], int]:
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "doctor", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def _private_dirs_of(pid: int) -> list[Path]:
    left = []
    for d in Path(tempfile.gettempdir()).glob("rebalab-*"):
        try:
            if (d / "owner.pid").read_text().strip() == str(pid):
                left.append(d)
        except OSError:
            continue
    return left


def test_doctor_linux_all_ok(image: GuestImage, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    r, pid = _doctor("--json", "--runs", str(runs))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    doc = json.loads(r.stdout)
    by = {c["name"]: c for c in doc["checks"]}
    assert list(by) == list(LINUX_CHECKS)
    bad = [c for c in doc["checks"] if not c["ok"]]
    assert not bad, bad
    for c in doc["checks"]:
        assert c["seconds"] is not None and c["seconds"] >= 0
        assert c["status"] == "ok" or (c["status"] == "warn" and c["fix"])
    assert image.kernel_release in by["ssh"]["detail"]
    assert "±" in by["clock"]["detail"]
    assert "snd_hda_intel bound" in by["hot-plug"]["detail"]
    bdf = re.search(r" at ([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]):", by["hot-plug"]["detail"])
    assert bdf, by["hot-plug"]
    assert f"probe of {bdf[1]}" in by["tracer stop"]["detail"]
    # the run's artifacts are kept; nothing else is
    run_dir = Path(doc["run_dir"])
    assert run_dir.parent == runs and (run_dir / "console.log").stat().st_size > 0
    assert qemu_pids_for(runs) == []
    assert _private_dirs_of(pid) == []


def test_doctor_linux_text_quick(image: GuestImage, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    r, pid = _doctor("--quick", "--runs", str(runs))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name in LINUX_CHECKS:
        assert any(line[2:].startswith(name + " ") and line[0] in "✓!" for line in lines), name
    assert any(line.startswith("! hot-plug") and "skipped (--quick)" in line for line in lines)
    assert "0 failed" in lines[-1]
    assert qemu_pids_for(runs) == []
    assert _private_dirs_of(pid) == []


def test_doctor_windows_fake_image(tmp_path: Path) -> None:
    fake = tmp_path / "no-such-windows.qcow2"
    runs = tmp_path / "runs"
    r, pid = _doctor("--guest", f"windows:{fake}", "--runs", str(runs), timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr and r.stderr == ""
    lines = r.stdout.splitlines()
    image_line = next(line for line in lines if line.startswith("✗ windows image"))
    assert str(fake) in image_line
    accel = next(line for line in lines if line[2:].startswith("accelerator"))
    # this machine has no working KVM: the doctor says so instead of trying to boot
    assert accel.startswith("✓") or "Windows needs KVM: " in accel
    assert any(line.startswith("✗ boot") and "not booted" in line for line in lines)
    assert not runs.exists() or not any(runs.iterdir())
    assert qemu_pids_for(tmp_path) == []
    assert _private_dirs_of(pid) == []
