"""QEMU arguments a Windows guest needs, and checking arguments against the installed QEMU.

Choices and why:
* KVM only. Windows under TCG takes hours to install and its timers misbehave; a run
  on TCG would measure the emulator, not the driver. ``windows_vm_args`` refuses TCG
  with "Windows guests need KVM".
* ``-cpu host`` plus Hyper-V enlightenments (hv-relaxed, hv-vapic, hv-spinlocks,
  hv-vpindex, hv-runtime, hv-time, hv-synic, hv-stimer, hv-frequencies, hv-reset) as
  QEMU's docs/system/i386/hyperv.rst recommends for Windows, and **hv-crash**, through
  which Windows reports bug check codes to QEMU (see lab.guest.panic).
* Firmware: UEFI uses Debian's ``ovmf`` package, ``/usr/share/OVMF/OVMF_CODE_4M.fd``
  with a per-image copy of ``OVMF_VARS_4M.fd`` (the non-Secure-Boot build described by
  /usr/share/qemu/firmware/60-edk2-x86_64.json: test-signed drivers
  (``bcdedit /set testsigning on``) cannot load with Secure Boot on). BIOS is SeaBIOS.
* Disk: virtio-blk needs the viostor driver from virtio-win (Windows has none in-box),
  AHCI (``ide-hd`` on q35's built-in ICH9 AHCI) works without it. The image manifest
  records which one the installed system boots from; the lab must keep it.
* Network: e1000e (Intel 82574L, in-box driver in Windows 8 and later) behind QEMU user
  networking restricted to a host-only forward of the agent port (22 or 5986).
* ``-action panic=none``: on a bug check QEMU emits GUEST_PANICKED (with the hv-crash
  parameters) but lets the guest go on writing MEMORY.DMP; QEMU's default action
  would stop the VM before the dump exists. ``collect-dump`` fetches it afterwards.
* ``-rtc base=utc,driftfix=slew``: the image sets the guest time zone to UTC, so the
  RTC and Windows agree, and lost timer ticks are slewed rather than replayed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lab.errors import ConfigError, EnvironmentProblem
from vdevice.inventory import QemuInventory
from vdevice.topology import qemu_opts

Firmware = Literal["uefi", "bios"]
AgentKind = Literal["winrm", "ssh"]
DiskBus = Literal["virtio", "ahci"]

HV_ENLIGHTENMENTS: tuple[str, ...] = (
    "hv-relaxed=on", "hv-vapic=on", "hv-spinlocks=0x1fff", "hv-vpindex=on", "hv-runtime=on",
    "hv-time=on", "hv-synic=on", "hv-stimer=on", "hv-frequencies=on", "hv-reset=on", "hv-crash=on",
)
CPU_MODEL = "host"
CPU_DEVICE_TYPE = "host-x86_64-cpu"   # where QEMU lists the hv-* properties (-device host-x86_64-cpu,help)

AGENT_GUEST_PORT = {"winrm": 5986, "ssh": 22}


@dataclass(frozen=True)
class OvmfPaths:
    """Debian 12 ``ovmf`` package layout (checked with ``dpkg-deb -c ovmf_2022.11-6+deb12u2``)."""

    code: Path = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
    vars_template: Path = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")

    def check(self) -> None:
        missing = [str(p) for p in (self.code, self.vars_template) if not p.is_file()]
        if missing:
            raise EnvironmentProblem(
                f"UEFI firmware not found ({', '.join(missing)}): sudo apt-get install ovmf, "
                "or use --firmware bios")


def cpu_arg() -> str:
    return ",".join((CPU_MODEL, *HV_ENLIGHTENMENTS))


def disk_args(image: Path, bus: DiskBus, *, drive_id: str = "windisk", bootindex: int | None = 0,
              fmt: str = "qcow2") -> list[str]:
    """The system disk; ``bus`` must be the one Windows was installed on."""
    drive = qemu_opts({"file": image, "format": fmt, "if": "none", "id": drive_id,
                       "cache": "writeback", "discard": "unmap"})
    boot = f",bootindex={bootindex}" if bootindex is not None else ""
    if bus == "virtio":
        dev = f"virtio-blk-pci,drive={drive_id}{boot}"
    elif bus == "ahci":
        dev = f"ide-hd,drive={drive_id},bus=ide.0{boot}"
    else:
        raise ConfigError(f"disk bus must be virtio or ahci, not {bus!r}")
    return ["-drive", drive, "-device", dev]


def firmware_args(firmware: Firmware, ovmf: OvmfPaths, vars_file: Path | None) -> list[str]:
    if firmware == "bios":
        return []
    if firmware != "uefi":
        raise ConfigError(f"firmware must be uefi or bios, not {firmware!r}")
    if vars_file is None:
        raise ConfigError("UEFI needs the image's own OVMF variable store (the .vars.fd next to it)")
    return ["-drive", qemu_opts({"if": "pflash", "format": "raw", "unit": 0, "readonly": True,
                                 "file": ovmf.code}),
            "-drive", qemu_opts({"if": "pflash", "format": "raw", "unit": 1, "file": vars_file})]


def network_args(agent: AgentKind, host_port: int, *, netdev_id: str = "winnet") -> list[str]:
    if agent not in AGENT_GUEST_PORT:
        raise ConfigError(f"agent must be winrm or ssh, not {agent!r}")
    if not 1 <= host_port <= 65535:
        raise ConfigError(f"host port out of range: {host_port}")
    guest = AGENT_GUEST_PORT[agent]
    return ["-netdev", f"user,id={netdev_id},restrict=on,hostfwd=tcp:127.0.0.1:{host_port}-:{guest}",
            "-device", f"e1000e,netdev={netdev_id}"]


@dataclass(frozen=True)
class WindowsVmArgs:
    args: tuple[str, ...]
    machine: str = "q35"
    min_memory_mb: int = 4096

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.args)


def windows_vm_args(image: Path, accelerator: str, firmware: Firmware, agent: AgentKind, *,
                    host_port: int, disk_bus: DiskBus = "ahci", vars_file: Path | None = None,
                    ovmf: OvmfPaths | None = None, memory_mb: int = 4096, smp: int = 2) -> WindowsVmArgs:
    """The extra QEMU arguments for a Windows lab guest (pure: touches no file).

    ``image`` is normally a per-run overlay (``lab.guest.windows.image.create_overlay``);
    ``disk_bus`` and ``firmware`` must match what the image was installed with (its
    manifest says). Raises ConfigError for TCG: Windows guests need KVM.
    """
    if accelerator.lower() != "kvm":
        raise ConfigError(f"Windows guests need KVM (accelerator here: {accelerator}); TCG is too slow "
                          "for Windows and would measure the emulator instead of the driver")
    if memory_mb < 4096:
        raise ConfigError(f"Windows guests need at least 4096 MiB of memory, got {memory_mb}")
    if smp < 1:
        raise ConfigError("smp must be at least 1")
    args: list[str] = ["-cpu", cpu_arg(), "-m", str(memory_mb), "-smp", str(smp),
                       "-rtc", "base=utc,driftfix=slew", "-global", "kvm-pit.lost_tick_policy=delay",
                       "-action", "panic=none"]
    args += firmware_args(firmware, ovmf or OvmfPaths(), vars_file)
    args += disk_args(image, disk_bus)
    args += network_args(agent, host_port)
    return WindowsVmArgs(tuple(args))


# ------------------------------------------------------------------ checking args

_DEVICE_OPT_RE = re.compile(r"^([A-Za-z0-9_.\-]+)((?:,.*)?)$")


def _split_props(rest: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for part in [p for p in rest.split(",") if p]:
        if "=" in part:
            k, v = part.split("=", 1)
            out.append((k, v))
        else:
            out.append((part, None))
    return out


# properties every qdev device has but '-device X,help' does not always list
_GENERIC_DEVICE_PROPS = frozenset({"id", "bus", "addr", "netdev", "drive", "bootindex", "romfile"})


def verify_qemu_args(argv: Sequence[str], inventory: QemuInventory,
                     props_of: Callable[[str], dict[str, str] | None]) -> list[str]:
    """Problems with ``-device`` and ``-cpu`` options of ``argv`` for this QEMU.

    Every device must exist (``-device help``) and every property must be one the
    device lists (``-device NAME,help``); CPU properties are checked against the
    ``host-x86_64-cpu`` device. ``props_of`` returns the property map of a device
    (``lab.qemu_caps.device_properties`` bound to the binary, or a cached one).
    """
    problems: list[str] = []
    items = list(argv)
    for i, opt in enumerate(items[:-1]):
        val = items[i + 1]
        if opt == "-device":
            m = _DEVICE_OPT_RE.match(val)
            if not m:
                problems.append(f"-device {val!r}: cannot read")
                continue
            name, rest = m[1], m[2]
            if not inventory.has_device(name):
                problems.append(f"-device {name}: this QEMU ({inventory.version_str}) has no such device")
                continue
            props = inventory.props(name) or props_of(name) or {}
            for k, _ in _split_props(rest):
                if k not in props and k not in _GENERIC_DEVICE_PROPS:
                    problems.append(f"-device {name}: no property {k!r} in this QEMU")
        elif opt == "-cpu":
            model, _, rest = val.partition(",")
            if model != CPU_MODEL:
                continue
            props = props_of(CPU_DEVICE_TYPE) or {}
            if not props:
                problems.append(f"-cpu {model}: could not list the properties of {CPU_DEVICE_TYPE}")
                continue
            for k, _ in _split_props(rest):
                if k not in props:
                    problems.append(f"-cpu {model}: no property {k!r} in this QEMU")
        elif opt == "-machine":
            mtype = val.split(",", 1)[0]
            if "=" not in mtype and inventory.machines and mtype not in inventory.machines:
                problems.append(f"-machine {mtype}: not a machine type of this QEMU")
    return problems
