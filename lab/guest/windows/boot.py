"""Windows guests: an image built by ``rebalab image windows``, reached over WinRM or
Windows OpenSSH, traced with ETW, waited on with Get-PnpDevice, rebalanced with WDTF.

The Windows path cannot be exercised end to end on the development hosts (no licence,
no working nested KVM), so every piece here is built to be checked without Windows:
pinned scripts, parsers of the formats Microsoft documents, and a scripted guest side
(``lab.guest.windows.simulated``) that runs through the real pipeline.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import paramiko

from lab import accel as accel_mod
from lab.privacy import child_env
from lab.accel import Accel
from lab.agent.base import Agent
from lab.agent.powershell import POWERSHELL, build_script
from lab.agent.ssh import SshAgent
from lab.deadline import Deadline, seconds
from lab.errors import (
    AgentError,
    ConfigError,
    DeadlineExceeded,
    EnvironmentProblem,
    LabError,
)
from lab.guest.audio_player import AudioPlayer, WindowsAudioPlayer
from lab.guest.base import (AGENTS, KEEP_DISK_CHOICES, READY_SLICE_S, AgentKind, BootFiles,
                            DeviceWait, GuestArgs, GuestOs, GuestTrace, MachineView, OsName,
                            ShutdownStep, TriggerHalves, check_machine)
from lab.image import GuestImage
from vdevice.inventory import QemuInventory
from vdevice.topology import Placement, Topology

if TYPE_CHECKING:
    from lab.agent.winrm import WinRmConfig, WinRmCredentials
    from lab.guest.windows.trace.tracer import WindowsTraceConfig
    from lab.guest.windows.vmconfig import OvmfPaths
    from lab.machine import Machine
    from lab.scenario.model import GuestSpec
    from lab.scenario.steps import Step
    from vdevice.topology import Device

#: the command line budget through OpenSSH on Windows, whose default shell is cmd.exe
CMD_EXE_LIMIT = 8_191

#: why cpu-hotplug is refused on Windows 10/11: learn.microsoft.com/windows-hardware/
#: drivers/install/devpkey-device-dhp-rebalance-policy ("On a dynamically partitionable
#: server that is running Windows Server 2008 or later versions of Windows Server, the
#: operating system initiates a system-wide resource rebalance whenever a new processor
#: is dynamically added")
CPU_HOTPLUG_CLIENT = ("Windows rebalances resources after a processor hot-add only on a "
                      "dynamically partitionable server running Windows Server "
                      "(DEVPKEY_Device_DHP_Rebalance_Policy); {what} is not one, so this "
                      "trigger would exercise nothing: use rebalance: {{trigger: wdtf, "
                      "action: rebalance}}")


def _refusals() -> dict[type, str]:
    """Steps only a Linux guest can do, and what to use on Windows instead."""
    from lab.scenario.steps import Module, RebalanceRescan, RebalanceResize
    return {
        Module: "module loads a Linux kernel module; a Windows guest gets its driver installed "
                "into the image (rebalab image windows --driver PATH)",
        RebalanceRescan: "the rescan trigger is Linux sysfs (remove + rescan); to make Windows "
                         "stop and restart the device (with new resources) use "
                         "rebalance: {trigger: wdtf, device: ..., action: rebalance}",
        RebalanceResize: "the resize trigger reads the device's capabilities from Linux sysfs",
    }


def cpu_hotplug_refusal(image: str | None) -> str | None:
    """None when the image is a Windows Server edition (by its manifest), else the reason."""
    from lab.guest.windows.image import image_edition

    edition = image_edition(Path(image)) if image else None
    if edition is not None and edition.is_server:
        return None
    what = (f"{edition.key} ({edition.image_name})" if edition is not None else
            "an image whose edition is unknown (no manifest from `rebalab image windows` next "
            "to it)")
    return CPU_HOTPLUG_CLIENT.format(what=what)


class PowerShellSshAgent(SshAgent):
    """Windows OpenSSH: commands are PowerShell scripts, sent as ``-EncodedCommand``.

    The default shell of Windows OpenSSH is cmd.exe, so the encoded command line must
    fit cmd's 8191 characters. ``SshAgent.wait_ready`` probes with the POSIX ``true``,
    which is no PowerShell command; this class probes with a PowerShell expression and
    otherwise keeps SshAgent's connect/retry behaviour.
    """

    PROBE = build_script("[Environment]::OSVersion.Version.ToString()")

    def __init__(self, host: str, port: int, user: str, key_path: Path, host_key: str, *,
                 log: Callable[[str], None] | None = None) -> None:
        super().__init__(host, port, user, key_path, host_key, shell=POWERSHELL,
                         wrap=_encode_for_cmd, log=log)

    def wait_ready(self, timeout: float) -> None:
        dl = Deadline(f"SSH (PowerShell) to {self.user}@{self.host}:{self.port}", timeout)
        delay, last = 0.2, "no attempt"
        while True:
            try:
                if self._client is None:
                    self._client = self._connect_once(max(0.5, min(10.0, dl.remaining())))
                self.run(self.PROBE, timeout=max(1.0, min(30.0, dl.remaining()))).check()
                self._log(f"ssh (powershell) ready {self.host}:{self.port}")
                return
            except paramiko.BadHostKeyException as exc:
                raise AgentError(f"the guest's SSH host key does not match the one the image "
                                 f"manifest recorded ({exc}); is this the right image?") from None
            except paramiko.AuthenticationException as exc:
                raise AgentError(f"SSH authentication to the Windows guest failed with {self.key_path}: "
                                 f"{exc} (the key must match the --ssh-key the image was built with)"
                                 ) from None
            except (OSError, paramiko.SSHException, EOFError, AgentError, DeadlineExceeded) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._drop()
            if dl.expired():
                raise DeadlineExceeded(dl.what, timeout, last)
            time.sleep(min(delay, dl.remaining()))
            delay = min(delay * 2, 5.0)


def _encode_for_cmd(script: str) -> str:
    try:
        return POWERSHELL.encode(script, limit=CMD_EXE_LIMIT)
    except ValueError as exc:
        raise AgentError(f"cannot send this script over SSH to Windows: {exc}") from None


# Hyper-V enlightenments and what each needs (QEMU docs/system/i386/hyperv.rst)
_HV_DEPENDS: dict[str, tuple[str, ...]] = {
    "hv-synic": ("hv-vpindex",),
    "hv-stimer": ("hv-synic", "hv-time"),
}
_CPU_PROP_RE = re.compile(r"^(hv-[a-z-]+)(?:=(.*))?$")


def probe_hyperv(binary: str, timeout: float = 20.0) -> frozenset[str] | None:
    """The hv-* features KVM offers on this host, or None when that cannot be told.

    Asks QEMU the way libvirt does: ``-machine none -accel kvm`` (no vCPU, no guest)
    and ``query-cpu-model-expansion`` of ``host`` with ``hv-passthrough``; QEMU
    (>= 6.1) then expands exactly the Hyper-V features KVM supports. That expansion is
    only authoritative when KVM can answer system-wide (KVM_CAP_SYS_HYPERV_CPUID,
    Linux >= 5.11); otherwise None, and QEMU's own check at start has the last word.
    """
    if _kvm_extension(191) <= 0:       # KVM_CAP_SYS_HYPERV_CPUID
        return None
    cmds = [{"execute": "qmp_capabilities"},
            {"execute": "query-cpu-model-expansion",
             "arguments": {"type": "full", "model": {"name": "host", "props": {"hv-passthrough": True}}}},
            {"execute": "quit"}]
    try:
        r = subprocess.run([binary, "-machine", "none", "-accel", "kvm", "-nodefaults", "-no-user-config",
                            "-display", "none", "-S", "-qmp", "stdio"],
                           input="".join(json.dumps(c) + "\n" for c in cmds), capture_output=True,
                           text=True, timeout=timeout, check=False, env=child_env())
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in r.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        ret = msg.get("return") if isinstance(msg, dict) else None
        if isinstance(ret, dict) and isinstance(ret.get("model"), dict):
            props = ret["model"].get("props") or {}
            return frozenset(k for k, v in props.items() if k.startswith("hv-") and v is True)
    return None


def _kvm_extension(cap: int) -> int:
    """KVM_CHECK_EXTENSION on /dev/kvm; -1 when KVM cannot be opened."""
    import fcntl

    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return -1
    try:
        return int(fcntl.ioctl(fd, 0xAE03, cap))   # _IO(KVMIO, 0x03)
    except OSError:
        return -1
    finally:
        os.close(fd)


def _hv_name(prop: str) -> str | None:
    m = _CPU_PROP_RE.match(prop)
    return m[1] if m else None


def hv_unsupported(requested: Sequence[str], supported: frozenset[str]) -> list[str]:
    """The boolean hv-* features of ``requested`` to drop: unsupported ones and their dependants."""
    names = [m[1] for m in (_CPU_PROP_RE.match(p) for p in requested)
             if m and (m[2] in (None, "on", "true"))]
    drop = {n for n in names if n not in supported}
    changed = True
    while changed:
        changed = False
        for n in names:
            if n not in drop and any(d in drop for d in _HV_DEPENDS.get(n, ())):
                drop.add(n)
                changed = True
    return [n for n in names if n in drop]


def _pem_thumbprint(pem: str) -> str | None:
    """SHA-1 of the certificate's DER, upper-case hex: what Windows calls the thumbprint."""
    m = re.search(r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", pem, re.S)
    if not m:
        return None
    try:
        der = base64.b64decode("".join(m[1].split()), validate=True)
    except ValueError:
        return None
    return hashlib.sha1(der).hexdigest().upper()


def _sibling(image: Path, suffix: str, recorded: object) -> Path | None:
    """A file the image builder keeps next to the image (``<image><suffix>``).

    The naming convention wins over the path the manifest recorded, which may be
    relative to wherever the build ran; the recorded path is the fallback.
    """
    beside = image.with_name(image.name + suffix)
    if beside.is_file():
        return beside
    if isinstance(recorded, str) and recorded:
        p = Path(recorded)
        if p.is_absolute() and p.is_file():
            return p
    return None


class WindowsOs(GuestOs):
    """What every Windows guest does the same way, however it boots: the steps it
    refuses, its rules, PnP waits, the ETW trace and the rebalance triggers' guest half.
    ``WindowsGuest`` boots a real image; ``lab.guest.windows.simulated`` a scripted one."""

    os: OsName = "windows"
    default_rules = ("windows-pnp", "bugcheck", "audio")
    #: the driver's WPP/TraceLogging trace (scenario ``guest.trace``); every observation's
    #: ``WindowsTracer`` uses it
    trace_config: WindowsTraceConfig | None = None

    # ---- before any VM ------------------------------------------------------------------
    @classmethod
    def refused_step(cls, step: Step, spec: GuestSpec) -> str | None:
        from lab.scenario.steps import RebalanceCpuHotplug
        why = next((w for kind, w in _refusals().items() if isinstance(step, kind)), None)
        if why is None and isinstance(step, RebalanceCpuHotplug):
            why = cpu_hotplug_refusal(spec.image)
        return why

    def check_scenario(self, steps: Iterable[Step]) -> None:
        """WinRM has no streaming channel: a background guest command needs Windows OpenSSH."""
        from lab.scenario.steps import Guest
        if self.agent_kind != "winrm":
            return
        bg = next((st for st in steps if isinstance(st, Guest) and st.background), None)
        if bg is not None:
            raise LabError(f"{bg.where}: a background guest command needs a streaming "
                           "agent; WinRM has none. Use the Windows OpenSSH agent "
                           "(guest: {os: windows, image: ..., agent: ssh})")

    def snapshot_refusal(self) -> str | None:
        return ("reset: snapshot is verified on the built-in Linux guest only (a Windows "
                "guest's agent and ETW session across a restore are not); use reset: reboot "
                "or replug")

    def versions(self) -> dict[str, str]:
        win = self.describe_image().get("windows") or {}
        return {"windows": " ".join(str(v) for v in (win.get("edition"), win.get("build"),
                                                     win.get("ubr")) if v) or "?"}

    # ---- devices: PnP state ---------------------------------------------------------------
    def bound_wait(self, m: Machine, dev: Device, bdf: str | None,
                   timeout: float) -> DeviceWait | None:
        from lab.guest.windows import waits
        model = dev.catalog()
        if not model.windows_hwid:
            return None
        return waits.started(m, dev.id, model.driver, model.windows_hwid, timeout)

    def gone_wait(self, m: Machine, dev: Device, bdf: str | None,
                  timeout: float) -> DeviceWait | None:
        from lab.guest.windows import waits
        model = dev.catalog()
        return waits.gone(m, dev.id, model.windows_hwid, timeout) if model.windows_hwid else None

    def trace(self, m: Machine, *, kprobes: bool = True) -> GuestTrace:
        from lab.guest.windows.observation import WindowsTrace
        return WindowsTrace(m, self.trace_config)

    # ---- the rebalance triggers' guest half ---------------------------------------------
    def triggers(self) -> TriggerHalves:
        from lab.guest.windows.triggers import WindowsTriggers
        return WindowsTriggers()

    def audio_player(self) -> AudioPlayer:
        return WindowsAudioPlayer()


class WindowsGuest(WindowsOs):
    """A Windows image built by ``rebalab image windows``, booted from a per-run overlay.

    * KVM only: ``choose_accel`` refuses TCG before anything exists, naming why KVM was
      not chosen. ``REBALAB_KVM=1`` (as for the image build) asserts KVM works.
    * Each machine boots a copy-on-write overlay of the base image (and its own copy of
      the UEFI variable store, which the firmware writes), made in the machine's
      artifacts directory: on the run's disk, not in the private socket directory under
      the system temp dir (often tmpfs, i.e. RAM), since the overlay grows by what the
      guest writes.
    * ``keep_disk`` decides what stop does with them: ``"on-panic"`` (default) deletes
      them unless the guest bug-checked, because the crash dump is still inside the
      overlay's page file and Windows extracts MEMORY.DMP only on its next boot;
      ``"always"`` keeps them for post-mortem, ``"never"`` always deletes.
    * Readiness is the agent answering (no serial marker), under ``windows_ready``;
      between attempts the machine is checked, so a bug check or a dead QEMU ends the
      wait at once.
    """

    def __init__(self, image_path: str | Path, agent: str = "winrm", *,
                 keep_disk: str = "on-panic", memory_mb: int = 4096, smp: int = 2,
                 ssh_key: str | Path | None = None, winrm: Mapping[str, Any] | None = None,
                 credentials: WinRmCredentials | None = None, ovmf: OvmfPaths | None = None,
                 qemu_img: str = "qemu-img", probe_image: GuestImage | None = None,
                 hyperv_probe: Callable[[str], frozenset[str] | None] | None = probe_hyperv,
                 trace_config: WindowsTraceConfig | None = None) -> None:
        from lab.guest.windows.image import load_manifest
        from lab.guest.windows.vmconfig import AGENT_GUEST_PORT, OvmfPaths

        if agent not in AGENTS["windows"]:
            raise ConfigError(f"unknown agent {agent!r} for a Windows guest; choose one of: "
                              + ", ".join(AGENTS["windows"]))
        if keep_disk not in KEEP_DISK_CHOICES:
            raise ConfigError(f"keep_disk must be one of {', '.join(KEEP_DISK_CHOICES)}, not {keep_disk!r}")
        if memory_mb < 4096:
            raise ConfigError(f"Windows guests need at least 4096 MiB of memory, got {memory_mb}")
        if smp < 1:
            raise ConfigError("smp must be at least 1")
        # the driver's WPP/TraceLogging trace (scenario guest.trace); every Observation's
        # WindowsTracer uses it (lab.observe)
        self.trace_config = trace_config
        self.image_path = Path(image_path).expanduser().absolute()
        if not self.image_path.is_file():
            raise ConfigError(f"Windows image not found: {self.image_path} (build one with "
                              "`rebalab image windows --out PATH`)")
        self.manifest: dict[str, Any] = load_manifest(self.image_path)
        self.agent_kind: AgentKind = "winrm" if agent == "winrm" else "ssh"
        self.guest_port = AGENT_GUEST_PORT[self.agent_kind]
        self.keep_disk = keep_disk
        self.memory_mb = memory_mb
        self.smp = smp
        self.qemu_img = qemu_img
        self.ovmf = ovmf or OvmfPaths()
        self._probe_image = probe_image
        self._hyperv_probe = hyperv_probe
        self._hv_drop: tuple[str, ...] | None = None   # decided once per host, in preflight
        self._credentials = credentials
        self._winrm_extra = dict(winrm or {})
        self.facts: dict[str, Any] = dict(self.manifest.get("facts") or {})
        self.firmware = str(self.manifest.get("firmware", ""))
        self.disk_bus = str(self.manifest.get("disk_bus", ""))
        if self.firmware not in ("uefi", "bios"):
            raise ConfigError(f"{self.image_path}: manifest firmware is {self.firmware!r}, "
                              "expected uefi or bios")
        if self.disk_bus not in ("virtio", "ahci"):
            raise ConfigError(f"{self.image_path}: manifest disk_bus is {self.disk_bus!r}, "
                              "expected virtio or ahci (the bus Windows was installed on)")
        self.vars_template: Path | None = None
        if self.firmware == "uefi":
            self.vars_template = _sibling(self.image_path, ".vars.fd", self.manifest.get("vars_file"))
            if self.vars_template is None:
                raise ConfigError(f"{self.image_path} is a UEFI image but its variable store "
                                  f"{self.image_path.name}.vars.fd is missing (it holds the Windows "
                                  "boot entry; copy it next to the image)")
        self.user = str(self.manifest.get("admin_user") or "")
        self.ca_bundle = _sibling(self.image_path, ".winrm.pem", self.manifest.get("winrm_certificate"))
        self.ssh_key = Path(ssh_key).expanduser() if ssh_key else (
            Path(os.environ["REBALAB_WINDOWS_SSH_KEY"]).expanduser()
            if os.environ.get("REBALAB_WINDOWS_SSH_KEY") else None)

    # ---- before anything exists -----------------------------------------------------
    def choose_accel(self, binary: str, want: str | None) -> Accel:
        """KVM or a clear refusal. Uses the lab's KVM verdict (a probe boot of the Linux image)."""
        acc = self._accel_verdict(binary, want)
        if acc.name != "kvm":
            cached = " (a cached verdict: delete ~/.cache/rebalab/accel-*.json to probe again)" \
                if acc.cached else ""
            raise EnvironmentProblem(
                f"Windows guests need KVM, and this host would run TCG: {acc.reason}{cached}. "
                "Run on a host with working KVM; if KVM does work here, say so with --accel kvm "
                "(REBALAB_ACCEL=kvm) or REBALAB_KVM=1")
        return acc

    def _accel_verdict(self, binary: str, want: str | None) -> Accel:
        wanted = (want or os.environ.get("REBALAB_ACCEL") or "auto").lower()
        if wanted == "tcg":
            return Accel("tcg", "forced by REBALAB_ACCEL/--accel")
        if wanted != "kvm" and os.environ.get("REBALAB_KVM") == "1":
            why_not = accel_mod.kvm_usable()
            return Accel("kvm", "asserted by REBALAB_KVM=1" + (f" (warning: {why_not})" if why_not else ""))
        why_not = accel_mod.kvm_usable()
        if wanted == "kvm":
            return Accel("kvm", "forced by REBALAB_ACCEL/--accel" + (f" (warning: {why_not})" if why_not else ""))
        if why_not:
            return Accel("tcg", why_not)
        # the verdict comes from booting the built-in Linux image under KVM (cached per host)
        image = self._probe_image
        if image is None:
            try:
                image = GuestImage.load()
            except LabError as exc:
                raise EnvironmentProblem(
                    "Windows guests need KVM, and whether KVM works here is decided by a probe boot "
                    f"of the built-in Linux image, which is not available ({exc}). Build it with "
                    "`make image`, or assert KVM with --accel kvm / REBALAB_KVM=1") from None
        return accel_mod.choose(binary, image, want="auto")

    def preflight(self, binary: str, inventory: QemuInventory, accel: Accel,
                  log: Callable[[str], None]) -> None:
        """Firmware, qemu-img, agent credentials/keys, Hyper-V features, QEMU's devices."""
        from lab import qemu_caps
        from lab.guest.windows.vmconfig import HV_ENLIGHTENMENTS, verify_qemu_args

        if self.firmware == "uefi":
            self.ovmf.check()
        if shutil.which(self.qemu_img) is None:
            raise EnvironmentProblem(f"{self.qemu_img} not found (apt-get install qemu-utils): it makes "
                                     "the run's copy-on-write overlay of the Windows image")
        if self.agent_kind == "winrm":
            self.winrm_config(0)         # validates the certificate and the configuration
            if self._credentials is None:
                from lab.agent.winrm import WinRmCredentials
                self._credentials = WinRmCredentials.resolve(self._winrm_extra.get("credentials_file"))
        else:
            self._check_ssh()
        if self._hv_drop is None:
            supported = self._hyperv_probe(binary) if self._hyperv_probe is not None else None
            if supported is None:
                self._hv_drop = ()
            else:
                self._hv_drop = tuple(hv_unsupported(HV_ENLIGHTENMENTS, supported))
                if self._hv_drop:
                    log(f"KVM here lacks Hyper-V features {', '.join(self._hv_drop)}; "
                        "booting Windows without them")
        if "hv-crash" in self._hv_drop:
            raise EnvironmentProblem(
                "KVM on this host does not offer the Hyper-V crash MSRs (hv-crash): a Windows bug "
                "check would be invisible to the lab (no GUEST_PANICKED). Use a host whose KVM has "
                "Hyper-V support (KVM_CAP_HYPERV)")
        cache: dict[str, dict[str, str]] = {}

        def props_of(dev: str) -> dict[str, str]:
            if dev not in cache:
                cache[dev] = qemu_caps.device_properties(binary, dev)
            return cache[dev]

        dry = self._vm_args(Path("/nonexistent/disk.qcow2"), Path("/nonexistent/vars.fd"), 1,
                            accel, memory_mb=self.memory_mb, smp=self.smp)
        problems = verify_qemu_args([*dry.boot, *dry.network], inventory, props_of)
        if problems:
            raise EnvironmentProblem("the installed QEMU cannot boot this Windows guest: "
                                     + "; ".join(problems))

    def _check_ssh(self) -> None:
        if self.ssh_key is None:
            raise ConfigError("agent ssh for a Windows guest needs the private key matching the "
                              "--ssh-key the image was built with: set REBALAB_WINDOWS_SSH_KEY")
        if not self.ssh_key.is_file():
            raise ConfigError(f"SSH private key not found: {self.ssh_key}")
        mode = stat.S_IMODE(self.ssh_key.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"the SSH private key {self.ssh_key} is readable by others (mode {mode:o}); "
                              f"run `chmod 600 {self.ssh_key}`")
        if not self.facts.get("ssh_host_key"):
            raise ConfigError(f"{self.image_path}: the manifest records no SSH host key (OpenSSH was "
                              "not set up in the image; see facts.steps in its manifest); use agent winrm")
        if not self.user:
            raise ConfigError(f"{self.image_path}: the manifest names no admin_user to log in as")

    def winrm_config(self, port: int) -> WinRmConfig:
        """WinRM over HTTPS to the forwarded port, validating against the image's certificate.

        The certificate (``<image>.winrm.pem``) is self-signed with SAN IP 127.0.0.1, so it
        is its own CA bundle; its SHA-1 must match the thumbprint the guest recorded, which
        catches a .pem from another build of the image.
        """
        from lab.agent.winrm import WinRmConfig

        for k in ("host", "port", "ca_bundle", "scheme"):
            if k in self._winrm_extra:
                raise ConfigError(f"winrm.{k} is set by the lab for a Windows guest (the forwarded "
                                  "127.0.0.1 port over HTTPS, the image's certificate)")
        cfg: dict[str, Any] = {"host": "127.0.0.1", "port": port or 5986, "scheme": "https",
                               **self._winrm_extra}
        if cfg.get("server_cert_validation", "validate") == "validate":
            if self.ca_bundle is None:
                raise ConfigError(
                    f"{self.image_path}: no WinRM certificate ({self.image_path.name}.winrm.pem) to "
                    "validate the guest against; copy it next to the image, or, knowingly, set "
                    "winrm.server_cert_validation: ignore")
            want = str(self.facts.get("winrm_thumbprint") or "").upper()
            got = _pem_thumbprint(self.ca_bundle.read_text(errors="replace"))
            if got is None:
                raise ConfigError(f"{self.ca_bundle} holds no PEM certificate")
            if want and got != want:
                raise ConfigError(f"{self.ca_bundle} (thumbprint {got}) is not the certificate this image's "
                                  f"WinRM listener uses ({want}); it belongs to another build")
            cfg["ca_bundle"] = str(self.ca_bundle)
        return WinRmConfig.from_mapping(cfg)

    def adjust_topology(self, topology: Topology) -> Topology:
        """At least ``memory_mb`` and ``smp`` vCPUs, keeping the topology's free vCPU slots."""
        free = topology.max_cpus - topology.cpus
        cpus = max(topology.cpus, self.smp)
        return replace(topology, memory_mb=max(topology.memory_mb, self.memory_mb), cpus=cpus,
                       max_cpus=max(topology.max_cpus, cpus + free))

    # ---- per machine ----------------------------------------------------------------
    def disk_path(self, m: MachineView) -> Path:
        return m.artifacts / "windows-disk.qcow2"

    def prepare(self, m: MachineView) -> BootFiles:
        from lab.guest.windows.image import create_overlay

        disk = self.disk_path(m)
        created: list[Path] = []
        try:
            create_overlay(self.image_path, disk, qemu_img=self.qemu_img)
            created.append(disk)
            vars_file: Path | None = None
            if self.vars_template is not None:
                vars_file = m.artifacts / "windows-vars.fd"
                shutil.copyfile(self.vars_template, vars_file)
                created.append(vars_file)
        except BaseException:
            for p in created:
                p.unlink(missing_ok=True)
            raise
        m.log(f"windows: overlay {disk} on {self.image_path}"
              + (f", UEFI variables {vars_file}" if vars_file else ""))
        if m.topology.kernel_args:
            m.log(f"windows: topology kernel_args {list(m.topology.kernel_args)} do not apply and are ignored")
        return BootFiles(disk=disk, vars_file=vars_file, created=tuple(created))

    def _vm_args(self, disk: Path, vars_file: Path | None, port: int, accel: Accel, *,
                 memory_mb: int, smp: int) -> GuestArgs:
        """``windows_vm_args`` split for the Machine: -m/-smp come from the topology.

        The topology's ``-smp`` carries ``maxcpus`` (the CPU hot-plug trigger), so the
        duplicate ``-m``/``-smp`` are dropped here rather than relying on QEMU merging
        repeated options. Hyper-V features KVM lacks are dropped from ``-cpu``. A VGA
        device is added: Windows was installed with one, and it keeps ``screendump``
        useful when a boot hangs.
        """
        from lab.guest.windows.vmconfig import network_args, windows_vm_args

        args = list(windows_vm_args(disk, accel.name, self.firmware, self.agent_kind,  # type: ignore[arg-type]
                                    host_port=port, disk_bus=self.disk_bus,  # type: ignore[arg-type]
                                    vars_file=vars_file, ovmf=self.ovmf, memory_mb=memory_mb, smp=smp))
        net = network_args(self.agent_kind, port)
        if args[-len(net):] != net:
            raise LabError("lab.guest.windows.vmconfig.windows_vm_args no longer ends with its network "
                           "arguments; update lab.guest.WindowsGuest._vm_args")
        args = args[:-len(net)]
        out: list[str] = []
        i = 0
        while i < len(args):
            opt = args[i]
            if opt in ("-m", "-smp"):
                i += 2
                continue
            if opt == "-cpu" and self._hv_drop:
                model, *props = args[i + 1].split(",")
                kept = [p for p in props if _hv_name(p) not in self._hv_drop]
                out += [opt, ",".join([model, *kept])]
                i += 2
                continue
            out.append(opt)
            i += 1
        return GuestArgs(boot=(*out, "-device", "VGA"), network=tuple(net))

    def qemu_args(self, m: MachineView, files: BootFiles) -> GuestArgs:
        assert m.accel is not None and m.ssh_port is not None and files.disk is not None
        return self._vm_args(files.disk, files.vars_file, m.ssh_port, m.accel,
                             memory_mb=m.topology.memory_mb, smp=m.topology.cpus)

    def make_agent(self, m: MachineView) -> Agent:
        assert m.ssh_port is not None
        if self.agent_kind == "winrm":
            from lab.agent.winrm import WinRmAgent
            return WinRmAgent(self.winrm_config(m.ssh_port), self._credentials)
        assert self.ssh_key is not None
        return PowerShellSshAgent("127.0.0.1", m.ssh_port, self.user, self.ssh_key,
                                  str(self.facts["ssh_host_key"]), log=m.log)

    def wait_agent(self, m: MachineView, agent: Agent) -> None:
        """Poll the agent in slices under ``windows_ready``, checking QEMU between slices.

        Windows has no serial ready marker: readiness is the agent answering. A wrong
        password or an untrusted certificate ends the wait at once (the agents raise
        AgentError for those); a bug check ends it with GuestPanicked.
        """
        total = seconds("windows_ready")
        dl = Deadline(f"the Windows guest's {self.agent_kind} agent on 127.0.0.1:{m.ssh_port} to answer",
                      total)
        last = "no attempt yet"
        while True:
            check_machine(m)
            try:
                agent.wait_ready(max(1.0, min(READY_SLICE_S, dl.remaining())))
                check_machine(m)
                self._check_driver_bound(m, agent)
                return
            except DeadlineExceeded as exc:
                last = exc.last_seen or str(exc)
            if dl.expired():
                check_machine(m)
                shot = self._screendump(m, "ready-timeout-screen.ppm")
                raise DeadlineExceeded(dl.what, total, last + (f"; screen saved to {shot}" if shot else ""))

    def _check_driver_bound(self, m: MachineView, agent: Agent) -> None:
        """Once per image: the driver ``image windows --driver`` staged is bound to each
        cold device under test (pnputil only staged it when the install VM had no such
        device, exit 259). Hot-plugged devices are checked by their plug wait."""
        driver = self.manifest.get("driver")
        if not driver or getattr(self, "_driver_checked", False):
            return
        from lab.guest.windows.driver_check import verify_bound
        from vdevice.catalog import MODELS, Role

        for dev in m.topology.devices:
            model = MODELS.get(dev.model)
            if dev.placement == Placement.COLD and model is not None and \
                    model.role in (Role.AUDIO, Role.TEST):
                found = verify_bound(agent, driver, model)
                if found is not None:
                    m.log(f"driver check: {dev.id} is {found.instance_id}, bound to "
                          f"{found.driver_inf or '?'}")
        self._driver_checked = True

    @staticmethod
    def _screendump(m: MachineView, name: str) -> Path | None:
        if m.qmp is None:
            return None
        path = m.artifacts / name
        try:
            m.qmp.execute("screendump", {"filename": str(path)}, timeout=5)
        except LabError:
            return None
        return path if path.exists() else None

    def shutdown_steps(self, m: MachineView, agent: Agent | None) -> list[ShutdownStep]:
        """Crash dump first if the guest bug-checked; else Stop-Computer, ACPI power button, quit.

        Windows needs far longer than the 5 s ``shutdown_step`` to power off, so each
        polite step waits itself (``windows_shutdown``) for QEMU to exit; ``-no-reboot``
        turns the guest's power-off or post-dump reset into QEMU exiting.
        """
        proc, qmp = m.process, m.qmp
        steps: list[ShutdownStep] = []

        def wait_exit(limit: str) -> None:
            if proc is not None:
                proc.wait(seconds(limit))

        if m.panic is not None:
            # Windows writes the dump to the page file, then resets: -no-reboot ends QEMU
            steps.append(("crash-dump", lambda: wait_exit("windows_crash_dump")))
        elif agent is not None:
            a = agent

            def stop_computer() -> None:
                try:
                    a.run(build_script("Stop-Computer -Force"), timeout=15)
                except LabError:
                    pass      # the connection often drops as Windows goes down
                wait_exit("windows_shutdown")

            steps.append(("guest-shutdown", stop_computer))
        if qmp is not None and m.panic is None:
            def powerdown() -> None:
                qmp.execute("system_powerdown", timeout=2)
                wait_exit("windows_shutdown")

            steps.append(("acpi-powerdown", powerdown))
        if qmp is not None:
            steps.append(("qmp-quit", lambda: qmp.execute("quit", timeout=2)))
        return steps

    def release(self, m: MachineView, files: BootFiles) -> dict[str, Any]:
        keep = self.keep_disk == "always" or (self.keep_disk == "on-panic" and m.panic is not None)
        if keep:
            size = sum(p.stat().st_size for p in files.created if p.exists())
            why = "keep_disk=always" if self.keep_disk == "always" else "the guest bug-checked"
            m.log(f"windows: kept the run's disk ({size / 2**20:.0f} MiB: "
                  f"{', '.join(str(p) for p in files.created)}) because {why}; it needs the base "
                  f"{self.image_path} unchanged. After a bug check the dump is extracted to "
                  "MEMORY.DMP on the next boot of this disk, then `rebalab collect-dump` fetches it")
            return {"disk": str(files.disk) if files.disk else None, "kept": True, "why": why}
        for p in files.created:
            p.unlink(missing_ok=True)
        return {"disk": str(files.disk) if files.disk else None, "kept": False}

    # ---- records --------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "os": self.os, "agent": self.agent_kind, "guest_port": self.guest_port,
            "firmware": self.firmware, "disk_bus": self.disk_bus, "memory_mb_min": self.memory_mb,
            "smp_min": self.smp, "keep_disk": self.keep_disk,
            "hyperv_dropped": list(self._hv_drop or ()),
        }
        if self.agent_kind == "winrm":
            out["winrm"] = {"ca_bundle": str(self.ca_bundle) if self.ca_bundle else None,
                            "thumbprint": self.facts.get("winrm_thumbprint"),
                            "credentials": self._credentials.source if self._credentials else None,
                            **{k: v for k, v in self._winrm_extra.items() if k != "credentials_file"}}
        else:
            out["ssh"] = {"user": self.user, "key": str(self.ssh_key) if self.ssh_key else None,
                          "host_key_fingerprint": self.facts.get("ssh_host_key_fingerprint")}
        return out

    def describe_image(self) -> dict[str, Any]:
        f = self.facts
        return {"path": str(self.image_path), "edition": self.manifest.get("edition"),
                "windows": {k: f.get(k) for k in ("edition", "build", "ubr", "display_version", "version")},
                "firmware": self.firmware, "disk_bus": self.disk_bus,
                "built_utc": self.manifest.get("built_utc"), "driver": self.manifest.get("driver")}

