"""`rebalab run --guest windows:IMAGE` on this host (no KVM): refused clearly, before any VM.

A Windows image cannot be installed here, so the image is what ``rebalab image
windows`` leaves behind, made with qemu-img (tests/unit/test_guest.py). What is checked
is the lab's side: the guest choice reaches the runner, Linux-only steps are refused
with their line, and without KVM the run stops with the reason and leaves no QEMU.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.conftest import qemu_pids_for
from tests.e2e.test_scenarios import SCENARIOS, rebalab
from tests.unit.test_guest import make_windows_image


def test_windows_guest_without_kvm_is_refused_before_any_vm(tmp_path: Path) -> None:
    img = make_windows_image(tmp_path / "img")
    runs = tmp_path / "runs"
    r = rebalab("run", str(SCENARIOS / "hotplug-cycle.yaml"), "--guest", f"windows:{img}",
                "--accel", "tcg", "--runs", str(runs))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "Windows guests need KVM" in r.stderr
    assert not runs.exists() or not any(runs.rglob("qemu-cmdline.txt"))
    assert qemu_pids_for(img) == []


def test_linux_only_steps_are_refused_for_a_windows_guest(tmp_path: Path) -> None:
    img = make_windows_image(tmp_path / "img")
    sc = SCENARIOS / "race-planted.yaml"
    r = rebalab("run", str(sc), "--guest", f"windows:{img}", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2
    assert f"{sc}:" in r.stderr and "not for a windows guest" in r.stderr
    assert "rebalab image windows --driver" in r.stderr      # the module step, first
    assert not (tmp_path / "runs").exists()


def test_a_missing_windows_image_is_named(tmp_path: Path) -> None:
    r = rebalab("run", str(SCENARIOS / "hotplug-cycle.yaml"), "--guest",
                f"windows:{tmp_path / 'nope.qcow2'}", "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2
    assert "nope.qcow2" in r.stderr and "not found" in r.stderr
