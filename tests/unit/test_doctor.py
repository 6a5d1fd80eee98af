"""`rebalab doctor`'s host and image checks, its report forms and exit codes (issue 10).

Real files, directories and sockets wherever they can vary here (a temp dir too long
for AF_UNIX, a world-writable runs dir, an image whose file changed, a build holding
its lock). Monkeypatched only what this machine cannot show: a missing /dev/kvm,
a nearly full disk, missing host tools (through the ``which`` the check takes).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from lab import accel as accel_mod
from lab import doctor
from lab.cli import main
from lab.doctor import Check, Doctor
from lab.errors import ConfigError
from lab.image import GuestImage


def _image(tmp: Path) -> Path:
    """A minimal image directory GuestImage.load accepts, with recorded hashes."""
    d = tmp / "img"
    d.mkdir()
    files = {"bzImage": b"kernel", "initramfs.cpio.gz": b"initrd", "host_key.pub": b"ssh-ed25519 AAAA x\n"}
    for name, data in files.items():
        (d / name).write_bytes(data)
    key = d / "id_ed25519"
    key.write_bytes(b"private")
    key.chmod(0o600)
    (d / "manifest.json").write_text(json.dumps({
        "kernel_release": "6.1.0-test", "input_hash": "ab" * 32, "boot": {"fallback": "bzImage"},
        "initrd": "initramfs.cpio.gz",
        "files": {n: hashlib.sha256(b).hexdigest() for n, b in files.items()}}))
    return d


# ---------------------------------------------------------------- the report

def test_check_forms() -> None:
    ok, warn, bad = (Check("a", True, "fine"), Check("b", True, "slow", "do x", warn=True),
                     Check("c", False, "broken", "do y", seconds=0.5))
    assert [c.status for c in (ok, warn, bad)] == ["ok", "warn", "fail"]
    assert [c.symbol for c in (ok, warn, bad)] == ["✓", "!", "✗"]
    assert bad.line() == "FAIL  c: broken -> fix: do y" and warn.line().startswith("warn  b: slow")
    assert "fix: do y" in bad.render() and "(0.50s)" in bad.render()
    assert "fix" not in ok.render()
    assert json.loads(json.dumps(bad.to_json())) == {"name": "c", "ok": False, "detail": "broken",
                                                     "fix": "do y", "warn": False, "seconds": 0.5,
                                                     "status": "fail"}
    # one Check type for both halves of the doctor
    from lab.guest.windows import doctor as doctor_windows
    assert doctor_windows.Check is Check


def test_exit_code_warnings_do_not_fail() -> None:
    assert doctor.exit_code([Check("a", True, "x"), Check("b", True, "y", warn=True)]) == 0
    assert doctor.exit_code([Check("a", True, "x"), Check("b", False, "y", "z")]) == 1


def test_a_check_that_raises_is_a_failed_check_with_its_fix(tmp_path: Path) -> None:
    seen: list[Check] = []
    doc = Doctor(tmp_path, emit=seen.append)

    def boom() -> Check:
        raise ConfigError("the thing is missing")
    c = doc.check("thing", boom, fix="install the thing")
    assert not c.ok and "the thing is missing" in c.detail and c.fix == "install the thing"
    assert c.seconds is not None and seen == [c] and doc.exit_code == 1


@pytest.mark.parametrize("spec, want", [("linux", ("linux", None)), (" Linux ", ("linux", None)),
                                        ("windows:/x/w.qcow2", ("windows", "/x/w.qcow2"))])
def test_parse_guest(spec: str, want: tuple[str, str | None]) -> None:
    assert doctor.parse_guest(spec) == want


@pytest.mark.parametrize("spec", ["", "windows", "windows:", "linux:x", "macos"])
def test_parse_guest_refuses(spec: str) -> None:
    with pytest.raises(ConfigError, match="linux or windows:"):
        doctor.parse_guest(spec)


# ---------------------------------------------------------------- host checks

def test_temp_dir_ok_and_leaves_nothing() -> None:
    # not tmp_path: under pytest-xdist that is /tmp/pytest-of-USER/pytest-NN/popen-gwN/
    # TEST0, where the doctor's private dir and socket name reach 108 bytes once NN >= 10
    # (AF_UNIX allows 107): the check would be right to refuse it
    root = Path(tempfile.mkdtemp(prefix="rbl-"))
    try:
        c = doctor.check_temp_dir(str(root))
        assert c.ok, c
        assert list(root.iterdir()) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_temp_dir_too_long_for_af_unix(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    c = doctor.check_temp_dir(str(deep))
    assert not c.ok and "AF_UNIX" in c.detail and "TMPDIR" in c.fix
    assert list(deep.iterdir()) == []


def test_temp_dir_not_writable(tmp_path: Path) -> None:
    c = doctor.check_temp_dir(str(tmp_path / "absent"))
    assert not c.ok and "cannot create" in c.detail and "TMPDIR" in c.fix


def test_runs_dir_created_and_private(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    c = doctor.check_runs_dir(runs)
    assert c.ok and not c.warn and "(created)" in c.detail and runs.is_dir()
    assert list(runs.iterdir()) == []            # the write probe is gone


def test_runs_dir_world_writable_is_a_warning(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o777)
    c = doctor.check_runs_dir(runs)
    assert c.ok and c.warn and "writable by everyone" in c.detail and "--runs" in c.fix
    runs.chmod(0o1777)                           # sticky, like /tmp: fine
    assert not doctor.check_runs_dir(runs).warn


def test_runs_dir_that_is_a_file_fails_through_the_doctor(tmp_path: Path) -> None:
    f = tmp_path / "runs"
    f.write_text("not a dir")
    doc = Doctor(f)
    doctor.host_checks(doc)
    runs = next(c for c in doc.checks if c.name == "runs dir")
    assert not runs.ok and "--runs" in runs.fix
    assert "disk space" not in [c.name for c in doc.checks]   # nothing to measure


def test_disk_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = doctor.check_disk_space(tmp_path, "linux")
    assert "GiB free" in real.detail
    usage = type("U", (), {"total": 1 << 40, "used": 0, "free": 0})
    for free, ok, warn in ((50 << 20, False, False), (500 << 20, True, True), (5 << 30, True, False)):
        usage.free = free
        monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage)
        c = doctor.check_disk_space(tmp_path, "linux")
        assert (c.ok, c.warn) == (ok, warn), c
        assert ok and not warn or "--runs" in c.fix
    usage.free = 5 << 30                           # a Windows overlay needs more
    assert doctor.check_disk_space(tmp_path, "windows").warn


def test_host_tools() -> None:
    have = lambda tool: f"/usr/bin/{tool}"          # noqa: E731
    assert doctor.check_host_tools("linux", have).status == "ok"
    no_depmod = doctor.check_host_tools("linux", lambda t: None if t == "depmod" else have(t))
    assert no_depmod.ok and no_depmod.warn and "kmod" in no_depmod.fix
    no_qemu_img = doctor.check_host_tools("windows", lambda t: None if t == "qemu-img" else have(t))
    assert not no_qemu_img.ok and "qemu-utils" in no_qemu_img.fix


def test_qemu_check_is_real(tmp_path: Path) -> None:
    doc = Doctor(tmp_path)
    c = doctor.check_qemu(doc)
    assert c.ok and doc.binary and doc.inventory.version_str in c.detail


def test_qemu_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("REBALAB_QEMU", raising=False)
    doc = Doctor(tmp_path)
    c = doc.check("qemu", lambda: doctor.check_qemu(doc), fix="sudo apt-get install qemu-system-x86")
    assert not c.ok and "not found" in c.detail and "qemu-system-x86" in c.fix


# ---------------------------------------------------------------- accelerator

def test_no_kvm_is_a_warning_for_linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: "/dev/kvm not usable (No such file or directory)")
    monkeypatch.delenv("REBALAB_ACCEL", raising=False)
    doc = Doctor(tmp_path)
    doctor.check_qemu(doc)
    c = doctor.check_accel_linux(doc, GuestImage.load(_image(tmp_path)))
    assert c.ok and c.warn and c.detail.startswith("TCG: /dev/kvm not usable")


def test_no_kvm_fails_for_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: "/dev/kvm not usable (No such file or directory)")
    for var in ("REBALAB_ACCEL", "REBALAB_KVM"):
        monkeypatch.delenv(var, raising=False)
    doc = Doctor(tmp_path, "windows")
    doctor.check_qemu(doc)
    c = doctor.check_accel_windows(doc)
    assert not c.ok and c.detail.startswith("Windows needs KVM: /dev/kvm not usable") and "KVM" in c.fix
    doc.accel = "tcg"
    assert "TCG was forced" in doctor.check_accel_windows(doc).detail


# ---------------------------------------------------------------- the Linux image

def test_missing_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBALAB_IMAGE", str(tmp_path / "nothing"))
    holder: dict[str, object] = {}
    c = doctor.check_linux_manifest(Doctor(tmp_path), holder)
    assert not c.ok and "manifest.json" in c.detail and "make image" in c.fix and not holder


def test_manifest_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _image(tmp_path)
    monkeypatch.setenv("REBALAB_IMAGE", str(d))
    holder: dict[str, object] = {}
    c = doctor.check_linux_manifest(Doctor(tmp_path), holder)
    assert c.ok and "6.1.0-test" in c.detail
    assert doctor.check_linux_files(holder["image"]).ok
    (d / "initramfs.cpio.gz").write_bytes(b"tampered")
    bad = doctor.check_linux_files(holder["image"])
    assert not bad.ok and "initramfs.cpio.gz changed" in bad.detail and "make image" in bad.fix


def test_image_being_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _image(tmp_path)
    monkeypatch.setenv("REBALAB_IMAGE", str(d))
    with open(d / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # what images/linux/build.py holds
        c = doctor.check_linux_manifest(Doctor(tmp_path), {})
    assert not c.ok and "being rebuilt" in c.detail and "wait" in c.fix
    assert doctor.check_linux_manifest(Doctor(tmp_path), {}).ok


def test_broken_image_is_not_booted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBALAB_IMAGE", str(tmp_path / "nothing"))
    doc = doctor.run_doctor("linux", runs=tmp_path / "runs")
    assert doc.exit_code == 1 and doc.run_dir is None
    boot = next(c for c in doc.checks if c.name == "boot")
    assert not boot.ok and "not booted" in boot.detail


# ---------------------------------------------------------------- the Windows image

def test_windows_image_missing(tmp_path: Path) -> None:
    c = doctor.check_windows_image(str(tmp_path / "w.qcow2"), {})
    assert not c.ok and "not found" in c.detail and "rebalab image windows" in c.fix


def test_windows_manifest_missing_or_incomplete(tmp_path: Path) -> None:
    img = tmp_path / "w.qcow2"
    img.write_bytes(b"QFI\xfb")
    doc = Doctor(tmp_path, "windows")
    c = doc.check("windows image", lambda: doctor.check_windows_image(str(img), {}), fix="rebuild")
    assert not c.ok and "w.qcow2.json" in c.detail
    (tmp_path / "w.qcow2.json").write_text(json.dumps({"firmware": "uefi", "disk_bus": "ahci",
                                                       "facts": {"build": "22631"}}))
    holder: dict[str, object] = {}
    assert doctor.check_windows_image(str(img), holder).ok and "22631" in \
        doctor.check_windows_image(str(img), {}).detail
    g = doc.check("windows guest", lambda: doctor.check_windows_guest(str(img), holder), fix="copy it")
    assert not g.ok and "vars.fd" in g.detail


def test_cli_windows_without_image_exits_1_in_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", "--guest", f"windows:{tmp_path / 'none.qcow2'}", "--json",
               "--runs", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert rc == 1 and doc["exit_code"] == 1 and doc["run_dir"] is None
    by = {c["name"]: c for c in doc["checks"]}
    assert by["windows image"]["status"] == "fail" and by["windows image"]["fix"]
    assert by["boot"]["status"] == "fail"
    assert all(c["fix"] for c in doc["checks"] if c["status"] == "fail")
    assert not any(os.scandir(tmp_path / "runs"))          # no VM, no run directory


def test_cli_bad_guest_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--guest", "plan9"]) == 2
    assert "linux or windows:" in capsys.readouterr().err


def test_cli_text_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["doctor", "--guest", f"windows:{tmp_path / 'none.qcow2'}", "--runs", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert any(line.startswith("✗ windows image") for line in out.splitlines())
    assert any(line.startswith("✓ qemu") for line in out.splitlines())
    assert "fix: build one with `rebalab image windows" in out and "failed" in out.splitlines()[-1]


def test_ovmf_matches_the_file_system() -> None:
    from lab.guest.windows.vmconfig import OvmfPaths

    p = OvmfPaths()
    c = doctor.check_ovmf()
    assert c.ok == (p.code.is_file() and p.vars_template.is_file())
    assert c.ok or ("apt-get install ovmf" in c.fix and str(p.code) in c.detail + str(p.vars_template))


def test_windows_complete_image_stops_at_kvm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole image (qemu-img qcow2, manifest, UEFI variables, WinRM certificate): the
    image checks pass, and without KVM the doctor fails there and boots nothing."""
    from tests.unit.test_guest import make_windows_image

    base = make_windows_image(tmp_path / "win")
    monkeypatch.setattr(accel_mod, "kvm_usable", lambda: "/dev/kvm not usable (No such file or directory)")
    for var in ("REBALAB_ACCEL", "REBALAB_KVM", "REBALAB_WINRM_USER", "REBALAB_WINRM_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    doc = doctor.run_doctor(f"windows:{base}", runs=tmp_path / "runs")
    creds = next(c for c in doc.checks if c.name == "winrm credentials")
    assert not creds.ok and "REBALAB_WINRM_PASSWORD" in creds.fix
    monkeypatch.setenv("REBALAB_WINRM_USER", "rebalab")
    monkeypatch.setenv("REBALAB_WINRM_PASSWORD", "s3cret-doctor-pw")
    doc = doctor.run_doctor(f"windows:{base}", runs=tmp_path / "runs")
    by = {c.name: c for c in doc.checks}
    assert by["winrm credentials"].ok and "environment" in by["winrm credentials"].detail
    assert "s3cret-doctor-pw" not in json.dumps([c.to_json() for c in doc.checks])
    assert by["windows image"].ok and "22631" in by["windows image"].detail
    assert by["windows guest"].ok and "firmware uefi, disk bus ahci" in by["windows guest"].detail
    assert not by["accelerator"].ok and "Windows needs KVM" in by["accelerator"].detail
    assert not by["boot"].ok and doc.run_dir is None and doc.exit_code == 1


def test_windows_certificate_of_another_build(tmp_path: Path) -> None:
    from tests.unit.test_guest import make_windows_image

    base = make_windows_image(tmp_path / "win", thumbprint="00" * 20)
    doc = Doctor(tmp_path, "windows")
    c = doc.check("windows guest", lambda: doctor.check_windows_guest(str(base), {}), fix="-")
    assert not c.ok and "another build" in c.detail
