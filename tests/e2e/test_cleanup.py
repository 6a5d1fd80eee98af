"""Whatever goes wrong, no QEMU process, socket or temporary file is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab import operations as ops
from lab.errors import LabError, QemuError
from lab.image import GuestImage
from lab.rundir import RunDir
from tests.e2e.conftest import boot, qemu_pids_for
from vdevice.topology import Device


def _tmp_entries() -> set[str]:
    import tempfile
    return {p.name for p in Path(tempfile.gettempdir()).iterdir() if p.name.startswith("rebalab")}


# serial: `_tmp_entries() <= before` looks at every rebalab-* entry of the temp dir; another
# worker's VM starting meanwhile adds one
@pytest.mark.serial
def test_qemu_killed_mid_run(image: GuestImage, run_dir: RunDir) -> None:
    before = _tmp_entries()
    m = boot(image, run_dir)
    try:
        assert m.process is not None and m.process.pid is not None
        os.kill(m.process.pid, signal.SIGKILL)
        m.process.wait(10)
        with pytest.raises(QemuError, match="QEMU has exited"):
            ops.plug(m, Device("snd0", "AC97", "rp1"))
    finally:
        m.stop()
    assert m.process.stopped_by == "exited"
    assert qemu_pids_for(run_dir.path) == []
    assert not m.private.exists()
    assert _tmp_entries() <= before
    assert (run_dir.path / "console.log").stat().st_size > 0


@pytest.mark.serial      # (as above: the whole temp dir)
def test_exception_mid_run(image: GuestImage, run_dir: RunDir) -> None:
    before = _tmp_entries()
    with pytest.raises(RuntimeError, match="boom"):
        with boot(image, run_dir) as m:
            ops.plug(m, Device("snd0", "AC97", "rp1"))
            raise RuntimeError("boom")
    assert m.state.value == "stopped"
    assert m.process is not None and not m.process.alive()
    assert m.process.stopped_by in ("guest-poweroff", "qmp-quit")
    assert qemu_pids_for(run_dir.path) == []
    assert not m.private.exists()
    assert _tmp_entries() <= before
    assert "snd_intel8x0" in (run_dir.path / "dmesg.txt").read_text() or \
        (run_dir.path / "dmesg.txt").stat().st_size > 0


def test_ctrl_c_during_demo_keeps_artifacts(tmp_path: Path) -> None:
    """SIGINT to the CLI mid-run: exit 130, report says where it stopped, nothing left."""
    runs = tmp_path / "runs"
    # the child hears SIGINT whatever this suite inherited: run from a script in the
    # background (nohup, some CI runners) SIGINT arrives ignored, and Python then installs
    # no KeyboardInterrupt handler, so the test would interrupt nothing
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "demo", "--runs", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # wait until the VM is being booted (console.log appears), then interrupt
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not list(runs.glob("*/console.log")):
            time.sleep(0.05)
        assert list(runs.glob("*/console.log")), "the demo never started QEMU"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    run = next(runs.iterdir())
    import json
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert summary["stopped_at"]
    assert "INTERRUPTED" in (run / "summary.txt").read_text()
    assert qemu_pids_for(run) == []


def test_bad_input_fails_before_any_vm(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    r = subprocess.run([sys.executable, "-m", "lab.cli", "demo", "--model", "AC79",
                        "--runs", str(runs)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "did you mean 'AC97'" in r.stderr
    assert not runs.exists() or not any(runs.iterdir())


def test_missing_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="make image"):
        GuestImage.load(tmp_path)
