"""`rebalab image windows`: refusals that create nothing, the dry-run command line checked
against the installed QEMU, a full build with a simulated guest (secrets never kept),
overlays, the VM arguments of a lab guest, GUEST_PANICKED and crash-dump collection."""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from lab.agent.powershell import JSON_MARKER, PowerShell
from lab.agent.base import Agent, CommandResult
from lab.errors import ConfigError, EnvironmentProblem, LabError
from lab.events import Kind
from lab.guest.windows import cli as wincli
from lab.guest.windows import image as winimage
from lab.guest.windows import vmconfig
from lab.guest.windows.dumps import collect_dumps
from lab.guest.panic import describe_guest_panicked, panic_event
from vdevice.inventory import QemuInventory

PASSWORD = "Secret-Pa55<&>'\"word"


def qemu_available() -> bool:
    return shutil.which("qemu-system-x86_64") is not None


@pytest.fixture()
def iso(tmp_path: Path) -> Path:
    p = tmp_path / "Win11.iso"
    p.write_bytes(b"\0" * 2048)
    return p


@pytest.fixture()
def ovmf(tmp_path: Path) -> vmconfig.OvmfPaths:
    d = tmp_path / "ovmf"
    d.mkdir()
    (d / "OVMF_CODE_4M.fd").write_bytes(b"code")
    (d / "OVMF_VARS_4M.fd").write_bytes(b"vars")
    return vmconfig.OvmfPaths(d / "OVMF_CODE_4M.fd", d / "OVMF_VARS_4M.fd")


def files_under(p: Path) -> set[Path]:
    return {f for f in p.rglob("*")} if p.exists() else set()


# ------------------------------------------------------------------ refusals

def test_without_kvm_nothing_is_created(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths) -> None:
    out = tmp_path / "build" / "win11.qcow2"
    before = files_under(tmp_path)
    spec = winimage.WindowsImageSpec(iso=iso, out=out, ovmf=ovmf)
    with pytest.raises(EnvironmentProblem, match="KVM is required"):
        winimage.build(spec, kvm_available=lambda: False, password=lambda: PASSWORD)
    with pytest.raises(EnvironmentProblem, match="KVM is required"):
        winimage.dry_run(spec, kvm_available=lambda: False)
    assert files_under(tmp_path) == before


def test_missing_iso_nothing_is_created(tmp_path: Path, ovmf: vmconfig.OvmfPaths) -> None:
    out = tmp_path / "build" / "win11.qcow2"
    before = files_under(tmp_path)
    spec = winimage.WindowsImageSpec(iso=tmp_path / "nope.iso", out=out, ovmf=ovmf)
    asked: list[bool] = []
    with pytest.raises(ConfigError, match="Windows ISO not found"):
        winimage.build(spec, kvm_available=lambda: asked.append(True) or True, password=lambda: PASSWORD)
    assert files_under(tmp_path) == before and not asked  # the ISO is checked before KVM


@pytest.mark.parametrize("change,match", [
    ({"virtio_win": Path("/nonexistent/virtio.iso")}, "virtio-win ISO not found"),
    ({"disk_bus": "virtio"}, "needs --virtio-win"),
    ({"driver_dir": Path("/nonexistent")}, "driver folder not found"),
    ({"memory_mb": 2048}, "4096"),
    ({"edition": "win98"}, "unknown Windows edition"),
])
def test_other_refusals(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths, change: dict, match: str) -> None:
    spec = winimage.WindowsImageSpec(iso=iso, out=tmp_path / "w.qcow2", ovmf=ovmf, **change)
    with pytest.raises((ConfigError, EnvironmentProblem), match=match):
        winimage.check_inputs(spec, lambda: True)


def test_missing_host_tools_are_named(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths) -> None:
    spec = winimage.WindowsImageSpec(iso=iso, out=tmp_path / "w.qcow2", ovmf=ovmf)
    with pytest.raises(EnvironmentProblem, match="mtools"):
        winimage.check_inputs(spec, lambda: True, which=lambda t: None if t == "mcopy" else "/usr/bin/" + t)


def test_missing_ovmf_is_named(tmp_path: Path, iso: Path) -> None:
    spec = winimage.WindowsImageSpec(iso=iso, out=tmp_path / "w.qcow2",
                                     ovmf=vmconfig.OvmfPaths(tmp_path / "no_code.fd", tmp_path / "no_vars.fd"))
    with pytest.raises(EnvironmentProblem, match="apt-get install ovmf"):
        winimage.check_inputs(spec, lambda: True, which=lambda t: "/bin/" + t)


# ------------------------------------------------------------------ dry run against the real QEMU

@pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")
@pytest.mark.parametrize("firmware,bus,virtio", [("uefi", "ahci", False), ("bios", "virtio", True)])
def test_dry_run_command_line_exists_in_installed_qemu(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths,
                                                       capsys: pytest.CaptureFixture[str], firmware: str,
                                                       bus: str, virtio: bool) -> None:
    virtio_iso = None
    if virtio:
        virtio_iso = tmp_path / "virtio-win.iso"
        virtio_iso.write_bytes(b"\0")
    out = tmp_path / "images" / "build" / "win11.qcow2"
    before = files_under(tmp_path)
    args = argparse.Namespace(
        iso=str(iso), out=str(out), virtio_win=str(virtio_iso) if virtio_iso else None, driver=None,
        edition="win11", image_name=None, image_index=None, firmware=firmware, disk_bus=bus, disk_size="64G",
        memory=4096, smp=2, locale="en-US", user="rebalab", ssh_key=None, timeout_min=90.0,
        install_network=False, qemu=None, dry_run=True)
    monkey_ovmf = ovmf
    orig = winimage.WindowsImageSpec

    def spec_with_ovmf(**kw: Any) -> winimage.WindowsImageSpec:
        return orig(ovmf=monkey_ovmf, **kw)

    winimage_spec = winimage.WindowsImageSpec
    try:
        winimage.WindowsImageSpec = spec_with_ovmf  # type: ignore[misc, assignment]
        assert wincli.cmd_image_windows(args, kvm_available=lambda: True) == 0
    finally:
        winimage.WindowsImageSpec = winimage_spec  # type: ignore[misc]
    line = capsys.readouterr().out.strip()
    assert files_under(tmp_path) == before  # dry run creates nothing
    assert "-accel kvm" in line and "hv-crash=on" in line and "usb-storage,bus=xhci.0,drive=prov,removable=on" in line
    assert ("if=pflash" in line) == (firmware == "uefi")
    assert ("virtio-blk-pci" in line) == (bus == "virtio")
    # every device and property is re-checked independently against this QEMU
    from lab import qemu_caps

    binary = qemu_caps.find_binary()
    inv = qemu_caps.probe(binary)
    argv = line.split(" ")
    assert vmconfig.verify_qemu_args(argv, inv, lambda d: qemu_caps.device_properties(binary, d)) == []


def test_verify_qemu_args_finds_unknown_devices_and_properties() -> None:
    inv = QemuInventory(version=(7, 2, 0), devices=frozenset({"e1000e", "ide-hd"}),
                        properties={"ide-hd": {"drive": "str", "bootindex": "int32"}})
    props = {"host-x86_64-cpu": {"hv-relaxed": "bool"}}
    problems = vmconfig.verify_qemu_args(
        ["-device", "virtio-sound-pci", "-device", "ide-hd,drive=d,bus=ide.0,wibble=1",
         "-cpu", "host,hv-relaxed=on,hv-nonsense=on", "-device", "e1000e,netdev=n"],
        inv, lambda d: props.get(d))
    assert problems == ["-device virtio-sound-pci: this QEMU (7.2.0) has no such device",
                        "-device ide-hd: no property 'wibble' in this QEMU",
                        "-cpu host: no property 'hv-nonsense' in this QEMU"]


# ------------------------------------------------------------------ a build with a simulated guest

class DirMedia:
    """Provisioning media as a directory: what FatMedia does, without mtools."""

    def create(self, staging: Path, image: Path, label: str) -> None:
        shutil.copytree(staging, image)

    def read(self, image: Path, name: str) -> bytes | None:
        p = image / name
        return p.read_bytes() if p.is_file() else None


class SimulatedInstall:
    """Plays Windows Setup + provision.ps1: reads the answer file, writes the results."""

    def __init__(self, facts_ok: bool = True, leak: bool = False, pnputil_code: int = 0) -> None:
        self.facts_ok = facts_ok
        self.leak = leak
        self.pnputil_code = pnputil_code
        self.argv: list[str] = []

    def run(self, argv: Sequence[str], *, qmp_socket: Path, log_dir: Path, timeout_s: float,
            log: Callable[[str], None]) -> None:
        self.argv = list(argv)
        prov = Path(next(a for a in argv if "id=prov" in a).split("file=", 1)[1].split(",", 1)[0])
        answer = (prov / "Autounattend.xml").read_text()
        assert PASSWORD.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")[:8] in answer
        (log_dir / "qemu.stderr").write_text("qemu: terminating on guest poweroff\n")
        (prov / "provision.log").write_text("Transcript started\nstep winrm-https ok\n"
                                            + (f"oops {PASSWORD}\n" if self.leak else ""))
        (prov / "winrm-cert.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        (prov / "facts.json").write_text(json.dumps({
            "ok": self.facts_ok, "failed_steps": [] if self.facts_ok else ["winrm-https"],
            "edition": "Windows 11 Pro", "build": "22631", "winrm_thumbprint": "AB" * 20,
            "ssh_host_key": "ssh-ed25519 AAAAC3Nz guest"}), encoding="utf-8")
        (prov / "manifest.json").write_text(json.dumps({"schema": 1, "driver": {
            "pnputil_exit_code": self.pnputil_code}}))


def fake_caps() -> dict[str, Any]:
    inv = QemuInventory(version=(7, 2, 0), devices=frozenset(
        {"VGA", "ide-hd", "ide-cd", "virtio-blk-pci", "qemu-xhci", "usb-storage", "e1000e"}),
        properties={}, machines=frozenset({"q35"}))
    props = {"usb-storage": {"drive": "str", "removable": "bool"}, "ide-cd": {"drive": "str", "bootindex": "int32"},
             "ide-hd": {"drive": "str", "bootindex": "int32"},
             "virtio-blk-pci": {"drive": "str", "bootindex": "int32"},
             "host-x86_64-cpu": {p.split("=")[0]: "bool" for p in vmconfig.HV_ENLIGHTENMENTS},
             "e1000e": {}, "VGA": {}, "qemu-xhci": {}}
    return {"inventory": inv, "props_of": lambda d: props.get(d)}


def fake_qemu_img(tmp_path: Path) -> str:
    script = tmp_path / "qemu-img"
    script.write_text("#!/bin/sh\n# fake qemu-img: create FILE\nfor last; do :; done\n"
                      'if [ "$1" = create ]; then eval f=\\${$(($#-1))}; : > "$f"; fi\n')
    script.chmod(0o755)
    return str(script)


def test_build_keeps_no_secret(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths) -> None:
    drv = tmp_path / "drv"
    drv.mkdir()
    (drv / "mydrv.inf").write_text("[Version]\n")
    (drv / "test.cer").write_bytes(b"cert")
    key = tmp_path / "id_ed25519.pub"
    key.write_text("ssh-ed25519 AAAAC3 lab\n")
    out = tmp_path / "images" / "build" / "win11.qcow2"
    spec = winimage.WindowsImageSpec(iso=iso, out=out, ovmf=ovmf, driver_dir=drv, ssh_public_key=key)
    runner = SimulatedInstall()
    manifest = winimage.build(spec, kvm_available=lambda: True, media=DirMedia(), runner=runner,
                              password=lambda: PASSWORD, qemu_img=fake_qemu_img(tmp_path),
                              which=lambda t: "/bin/" + t, log=lambda m: None, **fake_caps())
    assert out.is_file() and spec.manifest_path.is_file() and spec.vars_file.is_file() and spec.cert_path.is_file()
    assert not spec.partial.exists()
    data = json.loads(spec.manifest_path.read_text())
    assert data["facts"]["winrm_thumbprint"] == "AB" * 20 and data["disk_bus"] == "ahci"
    assert data["driver"] == {"pnputil_exit_code": 0, "status": "installed"}
    assert manifest.firmware == "uefi"
    # nothing kept anywhere under the output directory contains the password in any form
    winimage.assert_no_secret([out.parent], PASSWORD)
    for f in out.parent.rglob("*"):
        if f.is_file():
            assert PASSWORD.encode() not in f.read_bytes()
    # the temporary directory (answer file, FAT image) is gone
    prov = Path(next(a for a in runner.argv if "id=prov" in a).split("file=", 1)[1].split(",", 1)[0])
    assert not prov.exists() and not prov.parent.exists()


def test_pnputil_259_keeps_the_image_as_staged(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths) -> None:
    """The install VM has no device under test: pnputil says 259 (ERROR_NO_MORE_ITEMS,
    staged) and the image is kept, its manifest saying so (issue 10, point 4)."""
    drv = tmp_path / "drv"
    drv.mkdir()
    (drv / "mydrv.inf").write_text("[Version]\n")
    out = tmp_path / "build" / "win11.qcow2"
    spec = winimage.WindowsImageSpec(iso=iso, out=out, ovmf=ovmf, driver_dir=drv)
    lines: list[str] = []
    winimage.build(spec, kvm_available=lambda: True, media=DirMedia(), runner=SimulatedInstall(pnputil_code=259),
                   password=lambda: PASSWORD, qemu_img=fake_qemu_img(tmp_path), which=lambda t: "/bin/" + t,
                   log=lines.append, **fake_caps())
    assert out.is_file()
    assert json.loads(spec.manifest_path.read_text())["driver"]["status"] == "staged-no-device"
    assert any("ERROR_NO_MORE_ITEMS" in ln and "staged" in ln for ln in lines)


def test_failed_provisioning_removes_the_image_and_scrubs_logs(tmp_path: Path, iso: Path,
                                                              ovmf: vmconfig.OvmfPaths) -> None:
    out = tmp_path / "build" / "win11.qcow2"
    spec = winimage.WindowsImageSpec(iso=iso, out=out, ovmf=ovmf)
    with pytest.raises(LabError, match="provisioning failed"):
        winimage.build(spec, kvm_available=lambda: True, media=DirMedia(),
                       runner=SimulatedInstall(facts_ok=False, leak=True), password=lambda: PASSWORD,
                       qemu_img=fake_qemu_img(tmp_path), which=lambda t: "/bin/" + t, log=lambda m: None,
                       **fake_caps())
    assert not out.exists() and not spec.partial.exists() and not spec.vars_file.exists()
    assert spec.log_dir.is_dir()  # kept for diagnosis...
    for f in spec.log_dir.rglob("*"):
        assert PASSWORD.encode() not in f.read_bytes()  # ...minus the leaked line's file


def test_password_sources() -> None:
    assert winimage.admin_password({winimage.PASSWORD_ENV: "envpw"}) == "envpw"
    answers = iter(["typed", "typed"])
    assert winimage.admin_password({}, prompt=lambda _: next(answers)) == "typed"
    answers2 = iter(["a", "b"])
    with pytest.raises(ConfigError, match="differ"):
        winimage.admin_password({}, prompt=lambda _: next(answers2))


@pytest.mark.skipif(not (shutil.which("mkfs.fat") and shutil.which("mcopy")),
                    reason="dosfstools/mtools not installed (apt-get install dosfstools mtools)")
def test_fat_media_round_trip(tmp_path: Path) -> None:
    staging = tmp_path / "s"
    (staging / "driver").mkdir(parents=True)
    (staging / "Autounattend.xml").write_text("<unattend/>")
    (staging / "driver" / "x.inf").write_text("[Version]")
    img = tmp_path / "prov.img"
    media = winimage.FatMedia(size_mb=64)
    media.create(staging, img, "REBAPROV")
    assert media.read(img, "Autounattend.xml") == b"<unattend/>"
    assert media.read(img, "driver/x.inf") == b"[Version]"
    assert media.read(img, "missing.json") is None
    label = subprocess.run(["mlabel", "-s", "-i", str(img), "::"], capture_output=True, text=True)
    assert "REBAPROV" in label.stdout


@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="qemu-img not installed")
def test_overlay(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(base), "1G"], check=True, capture_output=True)
    ov = winimage.create_overlay(base, tmp_path / "runs" / "r1" / "disk.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(ov)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["backing-filename"] == str(base.resolve()) and info["backing-filename-format"] == "qcow2"
    with pytest.raises(ConfigError, match="exists"):
        winimage.create_overlay(base, ov)
    with pytest.raises(ConfigError, match="not found"):
        winimage.create_overlay(tmp_path / "none.qcow2", tmp_path / "o2.qcow2")


# ------------------------------------------------------------------ lab VM arguments

def test_vm_args_refuse_tcg(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Windows guests need KVM"):
        vmconfig.windows_vm_args(tmp_path / "o.qcow2", "tcg", "uefi", "winrm", host_port=15986,
                                 vars_file=tmp_path / "v.fd")


def test_vm_args(tmp_path: Path) -> None:
    a = list(vmconfig.windows_vm_args(tmp_path / "o.qcow2", "kvm", "uefi", "winrm", host_port=15986,
                                      vars_file=tmp_path / "v.fd", disk_bus="virtio"))
    joined = " ".join(a)
    assert "hostfwd=tcp:127.0.0.1:15986-:5986" in joined and "restrict=on" in joined
    assert "virtio-blk-pci,drive=windisk,bootindex=0" in joined and "if=pflash" in joined
    assert a[a.index("-action") + 1] == "panic=none"
    b = " ".join(vmconfig.windows_vm_args(tmp_path / "o.qcow2", "kvm", "bios", "ssh", host_port=2222))
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in b and "pflash" not in b and "ide-hd" in b
    with pytest.raises(ConfigError, match="4096"):
        vmconfig.windows_vm_args(tmp_path / "o.qcow2", "kvm", "bios", "ssh", host_port=2222, memory_mb=1024)


@pytest.mark.skipif(not qemu_available(), reason="qemu-system-x86_64 not installed")
def test_vm_args_exist_in_installed_qemu(tmp_path: Path) -> None:
    from lab import qemu_caps

    binary = qemu_caps.find_binary()
    inv = qemu_caps.probe(binary)
    for fw, bus, agent in (("uefi", "virtio", "winrm"), ("bios", "ahci", "ssh")):
        argv = list(vmconfig.windows_vm_args(tmp_path / "o.qcow2", "kvm", fw, agent, host_port=15986,  # type: ignore[arg-type]
                                             vars_file=tmp_path / "v.fd", disk_bus=bus))  # type: ignore[arg-type]
        assert vmconfig.verify_qemu_args(argv, inv, lambda d: qemu_caps.device_properties(binary, d)) == []


# ------------------------------------------------------------------ panics and dumps

def test_guest_panicked_with_hyperv_crash_parameters() -> None:
    ev = {"event": "GUEST_PANICKED", "data": {"action": "run", "info": {
        "type": "hyper-v", "arg1": 0x9F, "arg2": 3, "arg3": 0xFFFFA00012345678, "arg4": 0xFFFFF80000001000,
        "arg5": 0xFFFFA00087654321}}, "timestamp": {"seconds": 1, "microseconds": 0}}
    bc = describe_guest_panicked(ev)
    assert bc.code == 0x9F and bc.name == "DRIVER_POWER_STATE_FAILURE"
    assert bc.description.startswith("bug check 0x0000009F DRIVER_POWER_STATE_FAILURE (0x0000000000000003")
    e = panic_event(ev, t_host_ns=5)
    assert e.kind is Kind.GUEST_PANICKED and e.data["bugcheck"]["code_hex"] == "0x0000009F"


def test_guest_panicked_without_parameters() -> None:
    assert describe_guest_panicked({"action": "pause"}).description == \
        "guest panicked, bug check code unknown (no crash parameters)"
    assert describe_guest_panicked({"info": {"type": "s390", "core": 0}}).code is None
    odd = describe_guest_panicked({"info": {"type": "hyper-v", "arg1": 0xFFFFFFFF000000D1}})
    assert odd.code == 0xD1 and odd.name == "DRIVER_IRQL_NOT_LESS_OR_EQUAL"
    assert describe_guest_panicked({"info": {"type": "hyper-v", "arg1": 0x12345}}).name is None


class DumpGuest(Agent):
    shell = PowerShell()

    def __init__(self, names: list[dict[str, Any]]) -> None:
        self.names = names
        self.got: list[tuple[str, Path]] = []

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        assert "CrashControl" in command and "ExpandEnvironmentVariables" in command
        out = JSON_MARKER + base64.b64encode(json.dumps(self.names).encode()).decode() + "\r\n"
        return CommandResult(command, 0, out, "", 0.1)

    def get(self, remote: str, local: Path) -> None:
        local.write_bytes(b"PAGEDU64")
        self.got.append((remote, local))

    def wait_ready(self, timeout: float) -> None: ...
    def stream(self, command: str, stop: Any = None) -> Any: return iter(())
    def put(self, local: Path, remote: str) -> None: ...
    def close(self) -> None: ...


def test_collect_dumps(tmp_path: Path) -> None:
    guest = DumpGuest([
        {"Path": "C:\\Windows\\MEMORY.DMP", "Name": "MEMORY.DMP", "Kind": "memory", "Length": 8,
         "LastWriteUtc": "2024-01-15T10:00:00.0000000Z"},
        {"Path": "C:\\Windows\\Minidump\\011524-1.dmp", "Name": "011524-1.dmp", "Kind": "minidump", "Length": 8,
         "LastWriteUtc": "2024-01-15T10:00:00.0000000Z"}])
    files = collect_dumps(guest, tmp_path)
    assert [f.local for f in files] == ["dumps/MEMORY.DMP", "dumps/Minidump/011524-1.dmp"]
    assert json.loads((tmp_path / "dumps" / "index.json").read_text())[0]["kind"] == "memory"
    bad = DumpGuest([{"Path": "C:\\x", "Name": "..\\..\\evil", "Kind": "memory"}])
    with pytest.raises(Exception, match="refusing"):
        collect_dumps(bad, tmp_path)


def test_cli_parsers_and_collect_dump(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    wincli.add_image_parser(sub)
    wincli.add_collect_dump_parser(sub)
    a = p.parse_args(["image", "windows", "--iso", "x.iso", "--out", "images/build/win11.qcow2", "--dry-run",
                      "--firmware", "bios", "--edition", "server2022"])
    assert a.func is wincli.cmd_image_windows and a.dry_run and a.firmware == "bios"
    b = p.parse_args(["collect-dump", str(tmp_path), "--port", "15986"])
    guest = DumpGuest([])
    lines: list[str] = []
    assert wincli.cmd_collect_dump(b, agent_factory=lambda _: guest, out=lines.append) == 0
    assert lines == ["no crash dumps in the guest"]
    with pytest.raises(ConfigError, match="no WinRM port"):
        wincli._agent_from_args(p.parse_args(["collect-dump", str(tmp_path)]))
