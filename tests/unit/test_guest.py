"""Guest selection: the Linux command line is unchanged, Windows is built, checked and refused.

What runs for real here: the installed QEMU (its device/property lists, and a Windows
command line started under a TCG stand-in with a boot sector that panics through
pvpanic, so GUEST_PANICKED really comes over QMP), and qemu-img (the overlay). What
cannot run here: Windows itself and KVM (this host's nested KVM does not work).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lab.deadline
from lab import qemu_caps
from lab.accel import Accel
from lab.agent.base import Agent, CommandResult
from lab.agent.powershell import POWERSHELL, decode_encoded_command
from lab.agent.winrm import WinRmAgent, WinRmCredentials
from lab.errors import ConfigError, DeadlineExceeded, EnvironmentProblem, LabError, QemuError
from lab.events import Event, Kind, Source
from lab.guest import (
    BootFiles,
    GuestArgs,
    GuestPanicked,
    LinuxGuest,
    PowerShellSshAgent,
    WindowsGuest,
    hv_unsupported,
    parse_guest_spec,
)
from lab.image import GuestImage
from lab.machine import Machine, MachineState
from lab.rules import RuleContext, check_all
from lab.rundir import RunDir
from lab.timeline import Timeline
from lab.guest.windows import image as winimage
from lab.guest.windows.boot import _pem_thumbprint
from lab.guest.windows.vmconfig import HV_ENLIGHTENMENTS, OvmfPaths, verify_qemu_args
from vdevice.presets import default_topology, switch_topology

BINARY = qemu_caps.find_binary()
FAKE_LINUX = GuestImage(Path("/IMG"), {"cmdline": "console=ttyS0 quiet", "boot": {"preferred": "bzImage"}})
OVMF_CODE_SIZE = 3_653_632      # Debian's OVMF_CODE_4M.fd / OVMF_VARS_4M.fd sizes
OVMF_VARS_SIZE = 540_672

# ---------------------------------------------------------------- Linux: unchanged argv
# Captured from lab/machine.py *before* the guest refactoring (same inputs: the image
# above, ssh port 40022/40023, private dir /PRIV; <ART> is the machine's artifacts dir).
_TAIL_SERIAL = [
    "-chardev", "socket,id=qmp0,path=/PRIV/qmp.sock,server=on,wait=off", "-mon", "chardev=qmp0,mode=control",
    "-chardev", "socket,id=con0,path=/PRIV/console.sock,server=on,wait=off", "-serial", "chardev:con0",
    "-chardev", "socket,id=sync0,path=/PRIV/sync.sock,server=on,wait=off", "-serial", "chardev:sync0",
    "-chardev", "socket,id=trace0,path=/PRIV/trace.sock,server=on,wait=off", "-serial", "chardev:trace0",
]
_HEAD = ["/usr/bin/qemu-system-x86_64", "-name", "rebalab,debug-threads=on", "-nodefaults", "-no-user-config",
         "-display", "none", "-no-reboot", "-S"]
_TRACES = ["-trace", "pci_update_mappings_add", "-trace", "pci_update_mappings_del", "-trace", "pci_cfg_write"]
_ROOT_PORTS = [a for i in range(1, 5) for a in ("-device", f"pcie-root-port,id=rp{i},bus=pcie.0,chassis={i},slot={i}")]
GOLDEN_LINUX: dict[str, list[str]] = {
    "default": [
        *_HEAD, "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-machine", "q35", "-m", "512", "-smp", "1,maxcpus=2", *_ROOT_PORTS,
        "-kernel", "/IMG/bzImage", "-initrd", "/IMG/initramfs.cpio.gz", "-append", "console=ttyS0 quiet",
        *_TAIL_SERIAL,
        "-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device", "virtio-net-pci,netdev=n0,bus=pcie.0", "-audiodev", "none,id=audio0",
        "-D", "<ART>/qemu-trace.log", "-msg", "timestamp=on", *_TRACES],
    "switch": [
        *_HEAD, "-accel", "kvm", "-machine", "q35", "-m", "512", "-smp", "1",
        "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
        "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
        "-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=2,slot=2",
        "-device", "x3130-upstream,id=sw1,bus=rp2",
        "-device", "xio3130-downstream,id=sw1p1,bus=sw1,chassis=3,slot=1",
        "-device", "xio3130-downstream,id=sw1p2,bus=sw1,chassis=3,slot=2",
        "-device", "ich9-intel-hda,id=snd0,bus=sw1p1",
        "-device", "hda-duplex,id=snd0-codec,bus=snd0.0,mixer=off,audiodev=audio0",
        "-kernel", "/IMG/bzImage", "-initrd", "/IMG/initramfs.cpio.gz", "-append", "console=ttyS0 quiet",
        *_TAIL_SERIAL,
        "-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40022-:22",
        "-device", "virtio-net-pci,netdev=n0,bus=pcie.0", "-audiodev", "wav,id=audio0,path=<ART>/audio.wav",
        # (audio captured: QEMU's own buffer drops traced too, added after the refactoring)
        "-D", "<ART>/qemu-trace.log", "-msg", "timestamp=on", *_TRACES,
        "-trace", "hda_audio_overrun", "-trace", "audio_timer_delayed", "-smp", "2"],
    "kernel_args": [
        *_HEAD, "-accel", "tcg", "-cpu", "qemu64,+rdrand", "-machine", "q35", "-m", "512", "-smp", "1,maxcpus=2", *_ROOT_PORTS,
        "-kernel", "/IMG/bzImage", "-initrd", "/IMG/initramfs.cpio.gz",
        "-append", "console=ttyS0 quiet pci=realloc,hpmemsize=128M foo=bar",
        *_TAIL_SERIAL,
        "-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40023-:22",
        "-device", "virtio-net-pci,netdev=n0,bus=pcie.0", "-audiodev", "none,id=audio0",
        "-D", "<ART>/qemu-trace.log", "-msg", "timestamp=on", *_TRACES],
}


@pytest.fixture
def run(tmp_path: Path) -> Iterator[RunDir]:
    r = RunDir(tmp_path, "run", path=tmp_path / "run")
    yield r
    r.close()


def _linux_argv(run: RunDir, case: str, **kw: Any) -> list[str]:
    topo = {"default": default_topology(), "switch": switch_topology(),
            "kernel_args": dataclasses.replace(default_topology(),
                                               kernel_args=("pci=realloc,hpmemsize=128M", "foo=bar"))}[case]
    extra = {"switch": {"audio_capture": True, "extra_args": ("-smp", "2")}}.get(case, {})
    m = Machine(topo, run, binary="/usr/bin/qemu-system-x86_64", subdir="vm1" if case == "kernel_args" else None,
                **extra, **kw)  # type: ignore[arg-type]
    m.accel = Accel("kvm" if case == "switch" else "tcg", "test")
    m.ssh_port = 40023 if case == "kernel_args" else 40022
    m.private = Path("/PRIV")
    return [a.replace(str(m.artifacts), "<ART>") for a in m.argv()]


@pytest.mark.parametrize("case", sorted(GOLDEN_LINUX))
def test_linux_argv_is_unchanged_by_the_refactoring(run: RunDir, case: str) -> None:
    assert _linux_argv(run, case, image=FAKE_LINUX) == GOLDEN_LINUX[case]


@pytest.mark.parametrize("case", sorted(GOLDEN_LINUX))
def test_linux_guest_equals_image_parameter(run: RunDir, case: str) -> None:
    assert _linux_argv(run, case, guest=LinuxGuest(FAKE_LINUX)) == GOLDEN_LINUX[case]


def test_machine_refuses_guest_and_image_together(run: RunDir) -> None:
    with pytest.raises(ConfigError, match="not both"):
        Machine(default_topology(), run, guest=LinuxGuest(FAKE_LINUX), image=FAKE_LINUX)


def test_linux_machine_keeps_its_image_and_records_the_guest(run: RunDir) -> None:
    m = Machine(default_topology(), run, image=FAKE_LINUX)
    assert m.guest.image is FAKE_LINUX and m.topology == default_topology()  # type: ignore[attr-defined]
    d = m.describe()
    assert d["guest"] == {"os": "linux", "agent": "ssh", "guest_port": 22}
    assert d["image"]["path"] == "/IMG"


def test_linux_shutdown_ladder_is_the_old_one(run: RunDir) -> None:
    from lab.agent.ssh import SshAgent
    m = Machine(default_topology(), run, image=FAKE_LINUX)
    agent = SshAgent("127.0.0.1", 1, "root", Path("/k"), "ssh-ed25519 AAAA")
    m.qmp = object()  # type: ignore[assignment]
    assert [n for n, _ in m.guest.shutdown_steps(m, agent)] == ["guest-poweroff", "qmp-quit"]
    with pytest.raises(LabError, match="not connected"):
        _ = m.ssh_agent
    m.agent = agent
    assert m.ssh_agent is agent


# ---------------------------------------------------------------- Windows image fixtures

def _cert() -> tuple[str, str]:
    """A self-signed certificate like provision.ps1 makes (SAN IP 127.0.0.1) and its thumbprint."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "REBALAB-WIN")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode(), cert.fingerprint(hashes.SHA1()).hex().upper()


# a boot sector: out 0x505 <- 1 (pvpanic "panicked"), then halt forever
PANIC_MBR = bytes.fromhex("BA0505B001EEFAF4EBFD")


def make_windows_image(d: Path, *, firmware: str = "uefi", disk_bus: str = "ahci",
                       boot_sector: bytes | None = None, thumbprint: str | None = None) -> Path:
    """A base qcow2 made with qemu-img plus what ``rebalab image windows`` keeps next to it."""
    d.mkdir(parents=True, exist_ok=True)
    base = d / "win.qcow2"
    if boot_sector is None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "64M"], check=True)
    else:
        raw = d / "win.raw"
        raw.write_bytes(boot_sector.ljust(510, b"\0") + b"\x55\xaa" + bytes(1 << 20))
        subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(base)], check=True)
        raw.unlink()
    pem, thumb = _cert()
    (d / "win.qcow2.winrm.pem").write_text(pem)
    if firmware == "uefi":
        (d / "win.qcow2.vars.fd").write_bytes(bytes(OVMF_VARS_SIZE))
    manifest: dict[str, Any] = {"image": str(base), "edition": "win11", "firmware": firmware, "disk_bus": disk_bus,
                "vars_file": "relative/at/build/time/win.qcow2.vars.fd" if firmware == "uefi" else None,
                "winrm_certificate": str(d / "win.qcow2.winrm.pem"), "admin_user": "rebalab",
                "facts": {"ok": True, "edition": "Windows 11 Pro", "build": "22631",
                          "winrm_thumbprint": thumbprint or thumb, "ssh_host_key": "ssh-ed25519 AAAAC3Nz test"},
                "driver": None, "qemu_argv": [], "built_utc": "2024-01-01T00:00:00Z", "build_seconds": 1.0}
    (d / "win.qcow2.json").write_text(json.dumps(manifest))
    return base


@pytest.fixture
def ovmf(tmp_path: Path) -> OvmfPaths:
    code, vars_ = tmp_path / "ovmf" / "OVMF_CODE_4M.fd", tmp_path / "ovmf" / "OVMF_VARS_4M.fd"
    code.parent.mkdir()
    code.write_bytes(bytes(OVMF_CODE_SIZE))
    vars_.write_bytes(bytes(OVMF_VARS_SIZE))
    return OvmfPaths(code=code, vars_template=vars_)


CREDS = WinRmCredentials("rebalab", "not-a-real-password", source="test")


def windows_guest(base: Path, ovmf: OvmfPaths, agent: str = "winrm", **kw: Any) -> WindowsGuest:
    kw.setdefault("hyperv_probe", None)
    if agent == "winrm":
        kw.setdefault("credentials", CREDS)
    return WindowsGuest(base, agent, ovmf=ovmf, **kw)


def _props_of() -> Any:
    cache: dict[str, dict[str, str]] = {}

    def props_of(dev: str) -> dict[str, str]:
        if dev not in cache:
            cache[dev] = qemu_caps.device_properties(BINARY, dev)
        return cache[dev]
    return props_of


def _opts(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == opt]


def _prepared(run: RunDir, guest: WindowsGuest, port: int = 45986) -> Machine:
    """A Machine with the guest's files made, as start() has them just before QEMU starts."""
    m = Machine(default_topology(), run, guest=guest)
    m.accel = Accel("kvm", "test")
    guest.preflight(m.binary, m.inventory, m.accel, m.log)
    m.private = run.path / "priv"
    m.private.mkdir()
    m.ssh_port = port
    m.boot_files = guest.prepare(m)
    return m


# ---------------------------------------------------------------- Windows argv

@pytest.mark.parametrize("agent", ["winrm", "ssh"])
@pytest.mark.parametrize("firmware,disk_bus", [("uefi", "virtio"), ("uefi", "ahci"), ("bios", "virtio"),
                                               ("bios", "ahci")])
def test_windows_argv(tmp_path: Path, run: RunDir, ovmf: OvmfPaths, firmware: str, disk_bus: str,
                      agent: str) -> None:
    base = make_windows_image(tmp_path / "img", firmware=firmware, disk_bus=disk_bus)
    key = tmp_path / "id_ed25519"
    key.write_text("not a key")
    key.chmod(0o600)
    g = windows_guest(base, ovmf, agent, ssh_key=key)
    m = _prepared(run, g)
    argv = m.argv()
    inv = qemu_caps.probe(BINARY)

    # every device and property exists in the installed QEMU (and the machine type)
    assert verify_qemu_args(argv, inv, _props_of()) == []
    for dev in _opts(argv, "-device"):
        assert inv.has_device(dev.split(",")[0]), dev

    assert _opts(argv, "-accel") == ["kvm"] and _opts(argv, "-machine") == ["q35"]
    cpu = _opts(argv, "-cpu")
    assert cpu == [",".join(("host", *HV_ENLIGHTENMENTS))] and "hv-crash=on" in cpu[0]
    assert _opts(argv, "-action") == ["panic=none"]
    # one -m / -smp, from the topology raised to what Windows needs (the free vCPU slot kept)
    assert _opts(argv, "-m") == ["4096"] and _opts(argv, "-smp") == ["2,maxcpus=3"]
    assert "-kernel" not in argv and "-append" not in argv
    # the disk is the run's overlay on the bus Windows was installed on; the base is never opened
    drives = _opts(argv, "-drive")
    disk = [d for d in drives if "id=windisk" in d]
    assert disk == [f"file={m.artifacts / 'windows-disk.qcow2'},format=qcow2,if=none,id=windisk,"
                    "cache=writeback,discard=unmap"]
    assert not any(str(base) + "," in d for d in drives)
    want_dev = "virtio-blk-pci,drive=windisk,bootindex=0" if disk_bus == "virtio" else \
        "ide-hd,drive=windisk,bus=ide.0,bootindex=0"
    assert want_dev in _opts(argv, "-device")
    pflash = [d for d in drives if "if=pflash" in d]
    if firmware == "uefi":
        assert pflash == [f"if=pflash,format=raw,unit=0,readonly=on,file={ovmf.code}",
                          f"if=pflash,format=raw,unit=1,file={m.artifacts / 'windows-vars.fd'}"]
    else:
        assert pflash == []
    # the agent port only, on 127.0.0.1 only, no other network
    port = 5986 if agent == "winrm" else 22
    assert _opts(argv, "-netdev") == [f"user,id=winnet,restrict=on,hostfwd=tcp:127.0.0.1:45986-:{port}"]
    assert "e1000e,netdev=winnet" in _opts(argv, "-device")
    assert not any("virtio-net" in d for d in _opts(argv, "-device"))
    # shared parts stay: three serial ports, QMP, the trace log
    assert _opts(argv, "-serial") == ["chardev:con0", "chardev:sync0", "chardev:trace0"]
    assert "VGA" in _opts(argv, "-device") and _opts(argv, "-display") == ["none"]
    assert m.describe()["guest"]["firmware"] == firmware


def test_windows_argv_is_accepted_by_qemu(tmp_path: Path, run: RunDir, ovmf: OvmfPaths) -> None:
    """QEMU parses and realizes the whole Windows command line (TCG and a TCG CPU stand in for KVM)."""
    base = make_windows_image(tmp_path / "img", firmware="uefi", disk_bus="ahci")
    m = _prepared(run, windows_guest(base, ovmf))
    argv = m.argv()
    argv[argv.index("-accel") + 1] = "tcg"
    argv[argv.index("-cpu") + 1] = "qemu64"
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert m.private is not None
        sock = m.private / "qmp.sock"
        end = time.monotonic() + 15
        while not sock.exists() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        assert proc.poll() is None, proc.communicate()[0].decode()
        from lab.qmp import QmpSession
        q = QmpSession(sock, run.path / "qmp.jsonl")
        try:
            q.connect()
            blocks = {b["device"] or b.get("qdev", ""): b for b in q.execute("query-block")}
            assert blocks["windisk"]["inserted"]["file"] == str(m.artifacts / "windows-disk.qcow2")
            assert blocks["windisk"]["inserted"]["backing_file"] == str(base.resolve())
            q.execute("quit")
        finally:
            q.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_hyperv_features_kvm_lacks_are_dropped_with_their_dependants(tmp_path: Path, run: RunDir,
                                                                     ovmf: OvmfPaths) -> None:
    names = [p.split("=")[0] for p in HV_ENLIGHTENMENTS]
    without_synic = frozenset(n for n in names if n != "hv-synic")
    assert hv_unsupported(HV_ENLIGHTENMENTS, without_synic) == ["hv-synic", "hv-stimer"]
    assert hv_unsupported(HV_ENLIGHTENMENTS, frozenset(names)) == []
    base = make_windows_image(tmp_path / "img")
    g = windows_guest(base, ovmf, hyperv_probe=lambda binary: without_synic)
    m = _prepared(run, g)
    cpu = _opts(m.argv(), "-cpu")[0]
    assert "hv-synic" not in cpu and "hv-stimer" not in cpu and "hv-crash=on" in cpu
    assert "hv-spinlocks=0x1fff" in cpu
    assert g.describe()["hyperv_dropped"] == ["hv-synic", "hv-stimer"]


def test_kvm_without_hv_crash_is_refused(tmp_path: Path, run: RunDir, ovmf: OvmfPaths) -> None:
    base = make_windows_image(tmp_path / "img")
    g = windows_guest(base, ovmf, hyperv_probe=lambda binary: frozenset())
    m = Machine(default_topology(), run, guest=g)
    with pytest.raises(EnvironmentProblem, match="hv-crash"):
        g.preflight(m.binary, m.inventory, Accel("kvm", "t"), m.log)


# ---------------------------------------------------------------- TCG refusal

class _NoQemu:
    def __init__(self, *a: object, **k: object) -> None:
        raise AssertionError("QEMU must not be started for a refused guest")


def _record_qemu_img(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Record every host tool call of lab.guest.windows.image (qemu-img), still running it."""
    calls: list[list[str]] = []
    real = winimage._run

    def recording(argv: Any, what: str) -> None:
        calls.append(list(argv))
        real(argv, what)
    monkeypatch.setattr(winimage, "_run", recording)
    return calls


@pytest.fixture
def no_side_effects(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """Fail on any QEMU start; record any qemu-img call."""
    monkeypatch.setattr("lab.machine.QemuProcess", _NoQemu)
    calls = _record_qemu_img(monkeypatch)
    monkeypatch.delenv("REBALAB_ACCEL", raising=False)
    monkeypatch.delenv("REBALAB_KVM", raising=False)
    return calls


def _assert_nothing_created(m: Machine, base: Path, calls: list[list[str]], before: set[str]) -> None:
    assert m.process is None and m.private is None and m.boot_files is None
    assert calls == []
    assert {p.name for p in m.artifacts.iterdir()} == before
    assert sorted(p.name for p in base.parent.iterdir()) == ["win.qcow2", "win.qcow2.json",
                                                             "win.qcow2.vars.fd", "win.qcow2.winrm.pem"]


def test_tcg_forced_is_refused_before_anything_exists(tmp_path: Path, run: RunDir, ovmf: OvmfPaths,
                                                      no_side_effects: list[list[str]]) -> None:
    base = make_windows_image(tmp_path / "img")
    m = Machine(default_topology(), run, guest=windows_guest(base, ovmf), accel="tcg")
    before = {p.name for p in m.artifacts.iterdir()}
    with pytest.raises(EnvironmentProblem, match=r"Windows guests need KVM.*forced by REBALAB_ACCEL/--accel"):
        m.start()
    assert m.state == MachineState.FAILED
    _assert_nothing_created(m, base, no_side_effects, before)
    m.stop()
    assert m.state.value == "stopped"


def test_tcg_because_kvm_unusable_names_the_reason(tmp_path: Path, run: RunDir, ovmf: OvmfPaths,
                                                   no_side_effects: list[list[str]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lab.accel.kvm_usable", lambda: "/dev/kvm not usable (Permission denied)")
    base = make_windows_image(tmp_path / "img")
    m = Machine(default_topology(), run, guest=windows_guest(base, ovmf))
    before = {p.name for p in m.artifacts.iterdir()}
    with pytest.raises(EnvironmentProblem, match=r"would run TCG: /dev/kvm not usable \(Permission denied\)"):
        m.start()
    _assert_nothing_created(m, base, no_side_effects, before)


def test_tcg_from_the_probe_verdict_names_it(tmp_path: Path, run: RunDir, ovmf: OvmfPaths,
                                             no_side_effects: list[list[str]],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lab.accel.kvm_usable", lambda: None)
    seen: list[str | None] = []

    def choose(binary: str, image: GuestImage, *, want: str | None = None) -> Accel:
        seen.append(want)
        assert image is FAKE_LINUX      # the KVM probe boots the Linux image
        return Accel("tcg", "a probe boot under KVM did not reach the ready marker in 12s", cached=True)
    monkeypatch.setattr("lab.accel.choose", choose)
    base = make_windows_image(tmp_path / "img")
    m = Machine(default_topology(), run, guest=windows_guest(base, ovmf, probe_image=FAKE_LINUX))
    before = {p.name for p in m.artifacts.iterdir()}
    with pytest.raises(EnvironmentProblem, match=r"did not reach the ready marker in 12s \(a cached verdict"):
        m.start()
    assert seen == ["auto"]
    _assert_nothing_created(m, base, no_side_effects, before)


def test_kvm_asserted_or_forced_is_accepted(tmp_path: Path, ovmf: OvmfPaths,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REBALAB_ACCEL", raising=False)
    g = windows_guest(make_windows_image(tmp_path / "img"), ovmf)
    monkeypatch.setenv("REBALAB_KVM", "1")
    assert g.choose_accel(BINARY, None).name == "kvm"
    monkeypatch.delenv("REBALAB_KVM")
    assert g.choose_accel(BINARY, "kvm").reason.startswith("forced by")


# ---------------------------------------------------------------- overlay

def test_overlay_is_a_qemu_img_backed_copy_and_goes_at_stop(tmp_path: Path, run: RunDir, ovmf: OvmfPaths,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _record_qemu_img(monkeypatch)
    base = make_windows_image(tmp_path / "img")
    base_bytes = base.read_bytes()
    m = _prepared(run, windows_guest(base, ovmf))
    disk = m.artifacts / "windows-disk.qcow2"
    assert calls == [["qemu-img", "create", "-f", "qcow2", "-b", str(base.resolve()), "-F", "qcow2", str(disk)]]
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(disk)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "qcow2" and info["backing-filename"] == str(base.resolve())
    assert info["backing-filename-format"] == "qcow2"
    assert (m.artifacts / "windows-vars.fd").read_bytes() == bytes(OVMF_VARS_SIZE)
    # stop from STARTING (QEMU never ran): the files go, the base stays as it was
    m.state = MachineState.STARTING
    m.stop()
    assert not disk.exists() and not (m.artifacts / "windows-vars.fd").exists()
    assert base.read_bytes() == base_bytes
    assert m.guest_files == {"disk": str(disk), "kept": False}


@pytest.mark.parametrize("keep,panicked,kept", [("on-panic", False, False), ("on-panic", True, True),
                                                ("always", False, True), ("never", True, False)])
def test_keep_disk_policy(tmp_path: Path, run: RunDir, ovmf: OvmfPaths, keep: str, panicked: bool,
                          kept: bool) -> None:
    m = _prepared(run, windows_guest(make_windows_image(tmp_path / "img"), ovmf, keep_disk=keep))
    if panicked:
        m.panic = Event(1, Source.HOST_QMP, Kind.GUEST_PANICKED, data={"bugcheck": {"description": "x"}})
    assert m.boot_files is not None
    info = m.guest.release(m, m.boot_files)
    assert info["kept"] is kept
    assert (m.artifacts / "windows-disk.qcow2").exists() is kept


def test_a_failed_qemu_start_still_removes_the_overlay(tmp_path: Path, run: RunDir, ovmf: OvmfPaths,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    class Kvm(WindowsGuest):
        def choose_accel(self, binary: str, want: str | None) -> Accel:
            return Accel("kvm", "test")

    base = make_windows_image(tmp_path / "img")
    m = Machine(default_topology(), run,
                guest=Kvm(base, "winrm", ovmf=ovmf, credentials=CREDS, hyperv_probe=None))
    with pytest.raises(QemuError, match="QEMU did not start"):
        m.start()     # -accel kvm -cpu host cannot work on this host: QEMU exits at once
    assert (m.artifacts / "windows-disk.qcow2").exists()
    m.stop()
    assert not (m.artifacts / "windows-disk.qcow2").exists()
    assert m.private is not None and not m.private.exists()


# ---------------------------------------------------------------- GUEST_PANICKED

HV_PANIC = {"event": "GUEST_PANICKED", "timestamp": {"seconds": 1700000000, "microseconds": 5},
            "t_host_ns": 1_700_000_000_000_005_000,
            "data": {"action": "run", "info": {"type": "hyper-v", "arg1": 0x9F, "arg2": 3,
                                                "arg3": 0xFFFFA001_2345_6780, "arg4": 0, "arg5": 0xFFFFA001_0000_0010}}}


def test_guest_panicked_becomes_a_bugcheck_event_and_violation(run: RunDir) -> None:
    m = Machine(default_topology(), run, image=FAKE_LINUX)
    m._on_qmp_event(dict(HV_PANIC))
    [ev] = [e for e in run.events if e.kind == Kind.GUEST_PANICKED]
    assert ev.source == Source.HOST_QMP and ev.t_host_ns == HV_PANIC["t_host_ns"]
    bc = ev.data["bugcheck"]
    assert bc["code_hex"] == "0x0000009F" and bc["name"] == "DRIVER_POWER_STATE_FAILURE"
    assert bc["description"].startswith("bug check 0x0000009F DRIVER_POWER_STATE_FAILURE (0x0000000000000003")
    assert ev.data["action"] == "run" and ev.data["info"]["arg1"] == 0x9F   # what the rule reads
    # the run's events.jsonl has it too, so a run can be re-checked from its directory
    lines = [json.loads(x) for x in (run.path / "events.jsonl").read_text().splitlines()]
    assert any(x["kind"] == "guest-panicked" and x["data"]["bugcheck"]["code"] == 0x9F for x in lines)
    tl = Timeline.build([ev], devices=[])
    vs = check_all(tl, RuleContext.from_timeline(tl, devices=(), drivers={}), ["kernel-oops"])
    assert [(v.rule, v.device) for v in vs] == [("bugcheck", "guest")] and "0x9f" in vs[0].message
    # and the machine refuses further operations, naming the bug check (exit status 1)
    with pytest.raises(GuestPanicked, match="DRIVER_POWER_STATE_FAILURE") as err:
        m.require_running()
    assert err.value.exit_code == 1 and isinstance(err.value, LabError)
    assert m.describe()["panic"]["name"] == "DRIVER_POWER_STATE_FAILURE"


def test_guest_panicked_without_hyperv_info(run: RunDir) -> None:
    m = Machine(default_topology(), run, image=FAKE_LINUX)
    m._on_qmp_event({"event": "GUEST_PANICKED", "t_host_ns": 7, "data": {"action": "pause"}})
    assert m.panic is not None
    assert m.panic.data["bugcheck"]["description"] == "guest panicked, bug check code unknown (no crash parameters)"
    other = {"event": "DEVICE_DELETED", "t_host_ns": 8, "data": {"device": "snd0", "path": "/x"}}
    m._on_qmp_event(other)
    assert run.events[-1].kind == Kind.DEVICE_DELETED and run.events[-1].data == {"event": "DEVICE_DELETED",
                                                                                   "data": other["data"]}


class _NeverReadyAgent(Agent):
    """Stands in for WinRM while Windows 'boots': refused, refused, refused..."""

    shell = POWERSHELL

    def __init__(self) -> None:
        self.attempts = 0
        self.commands: list[str] = []

    def wait_ready(self, timeout: float) -> None:
        self.attempts += 1
        time.sleep(min(timeout, 0.1))
        raise DeadlineExceeded("WinRM at https://127.0.0.1/wsman to answer", timeout, "connection refused")

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        self.commands.append(command)
        raise LabError("not connected")

    def stream(self, command: str, stop: threading.Event | None = None) -> Iterator[str]:
        return iter(())

    def put(self, local: Path, remote: str) -> None: ...
    def get(self, remote: str, local: Path) -> None: ...
    def close(self) -> None: ...


class _TcgStandIn(Accel):
    """A 'kvm' verdict whose QEMU arguments are TCG: KVM does not work on this host."""

    def qemu_args(self) -> list[str]:
        return ["-accel", "tcg"]


class _PanickingWindows(WindowsGuest):
    """The real Windows command line, with TCG and a TCG CPU standing in for KVM and -cpu host."""

    agent_made: _NeverReadyAgent | None = None

    def choose_accel(self, binary: str, want: str | None) -> Accel:
        return _TcgStandIn("kvm", "test stand-in")

    def qemu_args(self, m: Any, files: BootFiles) -> GuestArgs:
        a = super().qemu_args(m, files)
        boot = list(a.boot)
        boot[boot.index("-cpu") + 1] = "qemu64"
        return GuestArgs(tuple(boot), a.network)

    def make_agent(self, m: Any) -> Agent:
        self.agent_made = _NeverReadyAgent()
        return self.agent_made


@pytest.mark.parametrize("disk_bus,keep", [("ahci", "on-panic"), ("virtio", "never")])
def test_real_guest_panicked_ends_the_boot_wait(tmp_path: Path, run: RunDir, ovmf: OvmfPaths,
                                                monkeypatch: pytest.MonkeyPatch, disk_bus: str,
                                                keep: str) -> None:
    """Real QEMU boots a disk whose boot sector writes pvpanic; GUEST_PANICKED ends the wait."""
    monkeypatch.setattr(lab.deadline, "DEFAULTS", dataclasses.replace(
        lab.deadline.DEFAULTS, windows_ready=60.0, windows_crash_dump=1.0, windows_shutdown=1.0,
        shutdown_step=1.0))
    base = make_windows_image(tmp_path / "img", firmware="bios", disk_bus=disk_bus, boot_sector=PANIC_MBR)
    g = _PanickingWindows(base, "winrm", ovmf=ovmf, credentials=CREDS, hyperv_probe=None, keep_disk=keep)
    m = Machine(default_topology(), run, guest=g, extra_args=("-device", "pvpanic"))
    t0 = time.monotonic()
    try:
        with pytest.raises(GuestPanicked, match="bug check code unknown"):
            m.start()
        assert time.monotonic() - t0 < 45
        assert m.state == MachineState.FAILED and m.panic is not None
        assert m.panic.data["action"] == "run"          # -action panic=none: the guest goes on
        assert g.agent_made is not None and g.agent_made.commands == []
    finally:
        step = m.stop()
    assert step == "qmp-quit"              # the crash-dump wait (1 s here) found no reset, then quit
    assert m.process is not None and not m.process.alive()
    assert m.private is not None and not m.private.exists()
    kept = keep == "on-panic"
    assert (m.artifacts / "windows-disk.qcow2").exists() is kept
    assert m.guest_files["kept"] is kept
    log = (run.path / "lab.log").read_text()
    assert "GUEST_PANICKED: guest panicked, bug check code unknown" in log
    assert ("kept the run's disk" in log) is kept


def test_windows_shutdown_ladder(tmp_path: Path, run: RunDir, ovmf: OvmfPaths) -> None:
    m = _prepared(run, windows_guest(make_windows_image(tmp_path / "img"), ovmf))
    agent = _NeverReadyAgent()

    class Proc:
        waited: list[float] = []

        def wait(self, t: float) -> bool:
            self.waited.append(t)
            return True

    m.process = Proc()  # type: ignore[assignment]
    m.qmp = object()  # type: ignore[assignment]
    steps = m.guest.shutdown_steps(m, agent)
    assert [n for n, _ in steps] == ["guest-shutdown", "acpi-powerdown", "qmp-quit"]
    steps[0][1]()
    assert len(agent.commands) == 1 and "Stop-Computer -Force" in agent.commands[0]
    assert Proc.waited == [lab.deadline.seconds("windows_shutdown")]
    m.panic = Event(1, Source.HOST_QMP, Kind.GUEST_PANICKED, data={})
    assert [n for n, _ in m.guest.shutdown_steps(m, agent)] == ["crash-dump", "qmp-quit"]


# ---------------------------------------------------------------- agents

def test_winrm_agent_goes_to_the_forward_and_trusts_the_image_certificate(tmp_path: Path, run: RunDir,
                                                                          ovmf: OvmfPaths) -> None:
    base = make_windows_image(tmp_path / "img")
    m = _prepared(run, windows_guest(base, ovmf), port=41234)
    agent = m.guest.make_agent(m)
    assert isinstance(agent, WinRmAgent)
    assert agent.config.endpoint == "https://127.0.0.1:41234/wsman"
    assert agent.config.server_cert_validation == "validate"
    assert agent.config.ca_bundle == str(base.with_name("win.qcow2.winrm.pem"))
    pem = base.with_name("win.qcow2.winrm.pem").read_text()
    assert _pem_thumbprint(pem) == json.loads(base.with_name("win.qcow2.json").read_text())["facts"]["winrm_thumbprint"]
    m.agent = agent
    with pytest.raises(LabError, match="needs an SSH agent.*WinRmAgent"):
        _ = m.ssh_agent
    d = m.describe()["guest"]
    assert d["winrm"]["credentials"] == "test" and "not-a-real-password" not in json.dumps(m.describe())


def test_winrm_certificate_of_another_build_is_refused(tmp_path: Path, ovmf: OvmfPaths) -> None:
    g = windows_guest(make_windows_image(tmp_path / "img", thumbprint="AB" * 20), ovmf)
    with pytest.raises(ConfigError, match="belongs to another build"):
        g.winrm_config(5986)
    with pytest.raises(ConfigError, match="set by the lab"):
        windows_guest(make_windows_image(tmp_path / "img2"), ovmf, winrm={"host": "10.0.0.1"}).winrm_config(1)


def test_ssh_agent_speaks_powershell_through_cmd(tmp_path: Path, run: RunDir, ovmf: OvmfPaths) -> None:
    key = tmp_path / "id_ed25519"
    key.write_text("x")
    key.chmod(0o600)
    m = _prepared(run, windows_guest(make_windows_image(tmp_path / "img"), ovmf, "ssh", ssh_key=key))
    agent = m.guest.make_agent(m)
    assert isinstance(agent, PowerShellSshAgent) and agent.shell is POWERSHELL
    assert (agent.host, agent.port, agent.user) == ("127.0.0.1", 45986, "rebalab")
    assert agent.host_key == "ssh-ed25519 AAAAC3Nz test"
    line = agent._wrap("Get-PnpDevice -Class 'MEDIA'")
    assert line.startswith("powershell -NoProfile -NonInteractive -EncodedCommand ")
    assert decode_encoded_command(line) == "Get-PnpDevice -Class 'MEDIA'"
    with pytest.raises(LabError, match="8191"):
        agent._wrap("x" * 5000)


def test_ssh_agent_needs_a_private_key(tmp_path: Path, ovmf: OvmfPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REBALAB_WINDOWS_SSH_KEY", raising=False)
    g = windows_guest(make_windows_image(tmp_path / "img"), ovmf, "ssh")
    with pytest.raises(ConfigError, match="REBALAB_WINDOWS_SSH_KEY"):
        g.preflight(BINARY, qemu_caps.probe(BINARY), Accel("kvm", "t"), print)


def test_winrm_needs_credentials(tmp_path: Path, ovmf: OvmfPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REBALAB_WINRM_USER", raising=False)
    monkeypatch.delenv("REBALAB_WINRM_PASSWORD", raising=False)
    g = WindowsGuest(make_windows_image(tmp_path / "img"), "winrm", ovmf=ovmf, hyperv_probe=None)
    with pytest.raises(ConfigError, match="no WinRM credentials"):
        g.preflight(BINARY, qemu_caps.probe(BINARY), Accel("kvm", "t"), print)


def test_windows_topology_gets_enough_memory_and_cpus(tmp_path: Path, run: RunDir, ovmf: OvmfPaths) -> None:
    m = Machine(dataclasses.replace(default_topology(), memory_mb=8192, cpus=4, max_cpus=4), run,
                guest=windows_guest(make_windows_image(tmp_path / "img"), ovmf))
    assert (m.topology.memory_mb, m.topology.cpus, m.topology.max_cpus) == (8192, 4, 4)
    m2 = Machine(default_topology(), run, guest=windows_guest(make_windows_image(tmp_path / "i2"), ovmf))
    assert (m2.topology.memory_mb, m2.topology.cpus, m2.topology.max_cpus) == (4096, 2, 3)


# ---------------------------------------------------------------- parse_guest_spec

def test_parse_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    g = parse_guest_spec("linux", image=FAKE_LINUX)
    assert isinstance(g, LinuxGuest) and g.image is FAKE_LINUX and g.agent_kind == "ssh"
    assert isinstance(parse_guest_spec(" Linux ", "ssh", image=FAKE_LINUX), LinuxGuest)
    with pytest.raises(ConfigError, match="reached over ssh, not winrm"):
        parse_guest_spec("linux", "winrm", image=FAKE_LINUX)
    with pytest.raises(ConfigError, match="REBALAB_IMAGE"):
        parse_guest_spec("linux:/some/where", image=FAKE_LINUX)


def test_parse_windows(tmp_path: Path, ovmf: OvmfPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_windows_image(tmp_path / "img")
    g = parse_guest_spec(f"windows:{base}", ovmf=ovmf)
    assert isinstance(g, WindowsGuest) and g.agent_kind == "winrm" and g.guest_port == 5986
    assert g.keep_disk == "on-panic" and g.firmware == "uefi" and g.disk_bus == "ahci"
    # the manifest's relative vars_file (relative to where the build ran) is not what is used
    assert g.vars_template == base.with_name("win.qcow2.vars.fd")
    g2 = parse_guest_spec(f"windows:{base}", "ssh", keep_disk="always", ovmf=ovmf)
    assert isinstance(g2, WindowsGuest) and (g2.agent_kind, g2.guest_port, g2.keep_disk) == ("ssh", 22, "always")
    monkeypatch.chdir(tmp_path)
    g3 = parse_guest_spec("windows:img/win.qcow2", image=FAKE_LINUX, ovmf=ovmf)
    assert isinstance(g3, WindowsGuest) and g3.image_path == base
    assert g3._probe_image is FAKE_LINUX      # the Linux image is what the KVM probe boots


@pytest.mark.parametrize("spec,agent,match", [
    ("windows:/nope/win.qcow2", None, r"Windows image not found: /nope/win.qcow2"),
    ("windows:", None, r"needs its image: 'windows:<path"),
    ("windows", None, r"needs its image"),
    ("macos", None, r"unknown guest 'macos'"),
    ("", None, r"unknown guest"),
    ("windows:X", "telnet", r"unknown agent 'telnet'; choose one of: ssh, winrm"),
])
def test_parse_errors(spec: str, agent: str | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_guest_spec(spec, agent, image=FAKE_LINUX)


def test_windows_image_problems_are_clear(tmp_path: Path, ovmf: OvmfPaths) -> None:
    base = make_windows_image(tmp_path / "img")
    base.with_name("win.qcow2.vars.fd").unlink()
    with pytest.raises(ConfigError, match="variable store win.qcow2.vars.fd is missing"):
        parse_guest_spec(f"windows:{base}", ovmf=ovmf)
    base.with_name("win.qcow2.json").unlink()
    with pytest.raises(ConfigError, match="has no manifest"):
        parse_guest_spec(f"windows:{base}")
    base2 = make_windows_image(tmp_path / "img2")
    with pytest.raises(ConfigError, match="keep_disk must be one of never, on-panic, always"):
        parse_guest_spec(f"windows:{base2}", keep_disk="sometimes")
    mf = json.loads(base2.with_name("win.qcow2.json").read_text())
    base2.with_name("win.qcow2.json").write_text(json.dumps({**mf, "disk_bus": "scsi"}))
    with pytest.raises(ConfigError, match="disk_bus is 'scsi'"):
        parse_guest_spec(f"windows:{base2}")


def test_uefi_needs_ovmf_installed(tmp_path: Path) -> None:
    g = WindowsGuest(make_windows_image(tmp_path / "img"), "winrm", credentials=CREDS, hyperv_probe=None,
                     ovmf=OvmfPaths(code=tmp_path / "no" / "CODE.fd", vars_template=tmp_path / "no" / "VARS.fd"))
    with pytest.raises(EnvironmentProblem, match="apt-get install ovmf"):
        g.preflight(BINARY, qemu_caps.probe(BINARY), Accel("kvm", "t"), print)


def test_probe_hyperv_is_not_trusted_without_a_system_wide_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.guest.windows import boot as guest
    monkeypatch.setattr(guest, "_kvm_extension", lambda cap: 0)
    assert guest.probe_hyperv(BINARY) is None
