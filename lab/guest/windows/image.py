"""``rebalab image windows``: install Windows unattended into a qcow2 image.

Flow
----
1. Check everything that can be checked before anything is created: the ISOs and the
   driver folder exist, KVM works (an injectable ``kvm_available()``; the lab's boot
   probe, not "/dev/kvm opens"), the host tools exist (qemu-img, mkfs.fat, mcopy), the
   UEFI firmware files exist, and every QEMU device and property on the command line
   exists in the installed QEMU (``lab.qemu_caps``). Any failure: a clear error and
   nothing created.
2. ``--dry-run`` stops here and prints the QEMU command line.
3. Render autounattend.xml (password from REBALAB_WINDOWS_ADMIN_PASSWORD or a prompt),
   stage it with provision.ps1, the lab's SSH public key and the driver folder in a
   private temporary directory, and make a FAT image labelled REBAPROV from it
   (dosfstools + mtools: no root, no loop mount). Windows Setup reads Autounattend.xml
   from the root of removable media, so the FAT image is attached as a removable USB
   stick (qemu-xhci + usb-storage,removable=on), which also lets provision.ps1 write
   its results back.
4. ``qemu-img create`` the disk (as ``<out>.partial``), boot QEMU with the install ISO
   (and virtio-win), press Enter through "Press any key to boot from CD" over QMP,
   and wait, under a configurable deadline (default 90 min), for the guest to power
   off when provisioning ends.
5. Read facts.json, manifest.json, the WinRM certificate and provision.log back from
   the FAT image, move the disk into place and write ``<out>.json`` (the image
   manifest). The temporary directory, which held the only copy of the rendered
   answer file and so the password, is deleted in every case.

Kept artifacts (next to the image): the image, its OVMF variable store (UEFI), the
manifest, the WinRM certificate, the build log directory (QEMU stderr, QMP log,
provision.log, facts.json). None of them contains the password; ``build`` checks that
before returning and fails loudly if it ever would.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from lab.privacy import child_env
from lab.errors import ConfigError, DeadlineExceeded, EnvironmentProblem, LabError, QemuError
from lab.guest.windows import unattend
from lab.guest.windows.vmconfig import (
    OvmfPaths,
    cpu_arg,
    disk_args,
    firmware_args,
    verify_qemu_args,
)
from vdevice.inventory import QemuInventory
from vdevice.topology import qemu_opt, qemu_opts

PASSWORD_ENV = "REBALAB_WINDOWS_ADMIN_PASSWORD"
PRODUCT_KEY_ENV = "REBALAB_WINDOWS_PRODUCT_KEY"
DEFAULT_TIMEOUT_MIN = 90.0
HOST_TOOLS = {"qemu-img": "qemu-utils", "mkfs.fat": "dosfstools", "mcopy": "mtools"}

Firmware = Literal["uefi", "bios"]
DiskBus = Literal["virtio", "ahci"]


@dataclass(frozen=True)
class WindowsImageSpec:
    """What to build. Holds no secret (the password is fetched at build time)."""

    iso: Path
    out: Path
    virtio_win: Path | None = None
    driver_dir: Path | None = None
    #: the WDTF runtime from the user's WDK (its .msi/.cab files): the wdtf trigger
    #: (lab.guest.windows.wdtf) needs it in the guest
    wdtf_dir: Path | None = None
    edition: str = "win11"
    image_name: str | None = None
    image_index: int | None = None
    firmware: Firmware = "uefi"
    disk_bus: DiskBus | None = None          # default: virtio with virtio-win, else ahci
    disk_size: str = "64G"
    memory_mb: int = 4096
    smp: int = 2
    locale: str = "en-US"
    admin_user: str = "rebalab"
    ssh_public_key: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_MIN * 60
    install_network: bool = False
    ovmf: OvmfPaths = field(default_factory=OvmfPaths)

    @property
    def bus(self) -> DiskBus:
        if self.disk_bus is not None:
            return self.disk_bus
        return "virtio" if self.virtio_win is not None else "ahci"

    @property
    def partial(self) -> Path:
        return self.out.with_name(self.out.name + ".partial")

    @property
    def vars_file(self) -> Path:
        return self.out.with_name(self.out.name + ".vars.fd")

    @property
    def manifest_path(self) -> Path:
        return self.out.with_name(self.out.name + ".json")

    @property
    def cert_path(self) -> Path:
        return self.out.with_name(self.out.name + ".winrm.pem")

    @property
    def log_dir(self) -> Path:
        return self.out.with_name(self.out.name + ".build")


# ------------------------------------------------------------------ checks

def check_inputs(spec: WindowsImageSpec, kvm_available: Callable[[], bool],
                 which: Callable[[str], str | None] = shutil.which, *, for_dry_run: bool = False) -> None:
    """Everything that must hold before anything is created; raises, never creates."""
    unattend.edition(spec.edition)
    if not spec.iso.is_file():
        raise ConfigError(f"Windows ISO not found: {spec.iso} (pass --iso PATH to an installation ISO)")
    if spec.virtio_win is not None and not spec.virtio_win.is_file():
        raise ConfigError(f"virtio-win ISO not found: {spec.virtio_win}")
    if spec.bus == "virtio" and spec.virtio_win is None:
        raise ConfigError("--disk-bus virtio needs --virtio-win (Windows has no in-box virtio-blk driver)")
    if spec.driver_dir is not None:
        if not spec.driver_dir.is_dir():
            raise ConfigError(f"driver folder not found: {spec.driver_dir}")
        if not any(spec.driver_dir.rglob("*.inf")):
            raise ConfigError(f"driver folder {spec.driver_dir} holds no .inf file")
    if spec.wdtf_dir is not None:
        check_wdtf_dir(spec.wdtf_dir)
    if spec.ssh_public_key is not None and not spec.ssh_public_key.is_file():
        raise ConfigError(f"SSH public key not found: {spec.ssh_public_key}")
    if spec.memory_mb < 4096:
        raise ConfigError("Windows needs at least 4096 MiB (--memory)")
    if not math.isfinite(spec.timeout_s) or spec.timeout_s <= 0:
        raise ConfigError("the install timeout must be a positive number of minutes (--timeout-min)")
    if not 1 <= spec.smp <= 64:
        raise ConfigError(f"--smp {spec.smp}: the install VM needs 1 to 64 vCPUs")
    if spec.image_index is not None and spec.image_index < 1:
        raise ConfigError(f"--image-index {spec.image_index}: install.wim indexes start at 1")
    if not re.fullmatch(r"[1-9][0-9]{0,5}[MGT]", spec.disk_size):
        raise ConfigError(f"--disk-size {spec.disk_size!r}: a positive size with a unit, e.g. 64G")
    if spec.out.exists() and not for_dry_run:
        raise ConfigError(f"{spec.out} exists; remove it or choose another --out")
    if not kvm_available():
        raise EnvironmentProblem(
            "KVM is required to install Windows and none works on this host (the lab's KVM boot probe "
            "failed or /dev/kvm is missing); run the image build on a machine with working KVM")
    missing = [f"{tool} (apt-get install {pkg})" for tool, pkg in HOST_TOOLS.items() if which(tool) is None]
    if missing and not for_dry_run:
        raise EnvironmentProblem("host tools missing: " + ", ".join(missing))
    if spec.firmware == "uefi":
        spec.ovmf.check()


# ------------------------------------------------------------------ the command line

@dataclass(frozen=True)
class InstallPaths:
    prov_image: Path
    qmp_socket: Path


def install_argv(spec: WindowsImageSpec, qemu_binary: str, paths: InstallPaths) -> list[str]:
    """The QEMU command line of the install run (pure)."""
    argv = [qemu_binary, "-name", "rebalab-windows-install", "-nodefaults", "-no-user-config",
            "-machine", "q35", "-accel", "kvm", "-cpu", cpu_arg(),
            "-m", str(spec.memory_mb), "-smp", str(spec.smp),
            "-rtc", "base=utc,driftfix=slew", "-display", "none", "-device", "VGA",
            "-qmp", "unix:" + qemu_opts({"server": True, "wait": False}, qemu_opt(paths.qmp_socket)),
            "-monitor", "none", "-serial", "none"]
    argv += firmware_args(spec.firmware, spec.ovmf, spec.vars_file if spec.firmware == "uefi" else None)
    argv += disk_args(spec.partial, spec.bus, bootindex=0)
    argv += ["-drive", qemu_opts({"file": spec.iso, "media": "cdrom", "if": "none", "id": "cd0",
                                  "readonly": True}),
             "-device", "ide-cd,drive=cd0,bus=ide.1,bootindex=1"]
    if spec.virtio_win is not None:
        argv += ["-drive", qemu_opts({"file": spec.virtio_win, "media": "cdrom", "if": "none",
                                      "id": "cd1", "readonly": True}),
                 "-device", "ide-cd,drive=cd1,bus=ide.2"]
    argv += ["-device", "qemu-xhci,id=xhci",
             "-drive", qemu_opts({"file": paths.prov_image, "format": "raw", "if": "none", "id": "prov"}),
             "-device", "usb-storage,bus=xhci.0,drive=prov,removable=on"]
    net = "user,id=winnet" + ("" if spec.install_network else ",restrict=on")
    argv += ["-netdev", net, "-device", "e1000e,netdev=winnet"]
    return argv


def check_argv(argv: Sequence[str], inventory: QemuInventory,
               props_of: Callable[[str], dict[str, str] | None]) -> None:
    problems = verify_qemu_args(argv, inventory, props_of)
    if problems:
        raise EnvironmentProblem("the installed QEMU cannot run the Windows install: " + "; ".join(problems))


def _default_caps(qemu_binary: str | None) -> tuple[str, QemuInventory, Callable[[str], dict[str, str] | None]]:
    from lab import qemu_caps

    binary = qemu_binary or qemu_caps.find_binary()
    inv = qemu_caps.probe(binary)
    cache: dict[str, dict[str, str]] = {}

    def props_of(dev: str) -> dict[str, str] | None:
        if dev not in cache:
            cache[dev] = qemu_caps.device_properties(binary, dev)
        return cache[dev]

    return binary, inv, props_of


def dry_run(spec: WindowsImageSpec, *, kvm_available: Callable[[], bool], qemu_binary: str | None = None,
            inventory: QemuInventory | None = None,
            props_of: Callable[[str], dict[str, str] | None] | None = None) -> str:
    """The install command line, checked against the installed QEMU; creates nothing."""
    check_inputs(spec, kvm_available, for_dry_run=True)
    binary, inv, props = _resolve_caps(qemu_binary, inventory, props_of)
    argv = install_argv(spec, binary, InstallPaths(Path("<tmp>/provision.img"), Path("<tmp>/qmp.sock")))
    check_argv(argv, inv, props)
    return shlex.join(argv)


def _resolve_caps(qemu_binary: str | None, inventory: QemuInventory | None,
                  props_of: Callable[[str], dict[str, str] | None] | None,
                  ) -> tuple[str, QemuInventory, Callable[[str], dict[str, str] | None]]:
    if inventory is not None and props_of is not None:
        return qemu_binary or "qemu-system-x86_64", inventory, props_of
    return _default_caps(qemu_binary)


# ------------------------------------------------------------------ secrets

def admin_password(environ: Mapping[str, str] | None = None,
                   prompt: Callable[[str], str] | None = None) -> str:
    """From REBALAB_WINDOWS_ADMIN_PASSWORD, else an interactive prompt (twice), else an error."""
    env = os.environ if environ is None else environ
    pw = env.get(PASSWORD_ENV)
    if pw:
        return pw
    if prompt is None:
        if not sys.stdin.isatty():
            raise ConfigError(f"no administrator password: set {PASSWORD_ENV} (it is used only for the "
                              "install and never stored), or run interactively to be prompted")
        prompt = getpass.getpass
    first = prompt("Password for the Windows guest's administrator account: ")
    if not first:
        raise ConfigError("empty password")
    if prompt("Repeat: ") != first:
        raise ConfigError("the two passwords differ")
    return first


def assert_no_secret(paths: Sequence[Path], secret: str, *, remove: bool = False) -> None:
    """Fail if ``secret`` (raw, UTF-16LE or XML-escaped) is in any file under ``paths``.

    With ``remove`` (the failure path of ``build``) offending files are deleted instead.
    """
    from xml.sax.saxutils import escape

    needles = {secret.encode("utf-8"), secret.encode("utf-16-le"),
               escape(secret, {'"': "&quot;", "'": "&apos;"}).encode("utf-8")}
    for base in paths:
        files = [base] if base.is_file() else ([p for p in base.rglob("*") if p.is_file()] if base.is_dir() else [])
        for f in files:
            if f.stat().st_size > 512 * 1024 * 1024:
                continue  # disk images: the password only ever went to the FAT image
            data = f.read_bytes()
            if any(n and n in data for n in needles):
                if remove:
                    f.unlink()
                    continue
                raise LabError(f"refusing to keep {f}: it contains the administrator password")


# ------------------------------------------------------------------ media and runner

class ProvisioningMedia(Protocol):
    def create(self, staging: Path, image: Path, label: str) -> None: ...
    def read(self, image: Path, name: str) -> bytes | None: ...


class FatMedia:
    """A FAT image made and read with dosfstools and mtools (no root, no mount)."""

    def __init__(self, size_mb: int = 256) -> None:
        self.size_mb = size_mb

    def create(self, staging: Path, image: Path, label: str) -> None:
        used = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        size_mb = max(self.size_mb, used // (1024 * 1024) * 2 + 64)
        _run(["mkfs.fat", "-C", "-F", "32", "-n", label, str(image), str(size_mb * 1024)], "mkfs.fat")
        entries = [str(p) for p in sorted(staging.iterdir())]
        if entries:
            _run(["mcopy", "-s", "-o", "-i", str(image), *entries, "::/"], "mcopy")

    def read(self, image: Path, name: str) -> bytes | None:
        with tempfile.TemporaryDirectory(prefix="rebalab-fat-") as tmp:
            dest = Path(tmp) / "out"
            r = subprocess.run(["mcopy", "-n", "-i", str(image), f"::/{name}", str(dest)],
                               capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                               env=child_env())
            if r.returncode != 0 or not dest.exists():
                return None
            return dest.read_bytes()


def _run(argv: Sequence[str], what: str) -> None:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL,
                           timeout=300, env=child_env())
    except FileNotFoundError:
        raise EnvironmentProblem(f"{argv[0]} not found: apt-get install "
                                 f"{HOST_TOOLS.get(argv[0], argv[0])}") from None
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{what} did not finish within 300 s") from None
    if r.returncode != 0:
        raise EnvironmentProblem(f"{what} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-300:]}")


class InstallRunner(Protocol):
    def run(self, argv: Sequence[str], *, qmp_socket: Path, log_dir: Path, timeout_s: float,
            log: Callable[[str], None]) -> None: ...


class QemuInstallRunner:
    """Start QEMU, press Enter at "Press any key to boot from CD", wait for power-off.

    The disk has bootindex 0 and the CD 1, so once Setup has written the disk the CD
    is never asked again; the key presses only matter for the very first boot.
    """

    def __init__(self, key_window_s: float = 40.0, poll_s: float = 5.0) -> None:
        self.key_window_s = key_window_s
        self.poll_s = poll_s

    def run(self, argv: Sequence[str], *, qmp_socket: Path, log_dir: Path, timeout_s: float,
            log: Callable[[str], None]) -> None:
        from lab.qemu_process import QemuProcess
        from lab.qmp import QmpSession

        proc = QemuProcess(argv, stderr_path=log_dir / "qemu.stderr", log=log)
        proc.start()
        qmp: QmpSession | None = None
        start = time.monotonic()
        try:
            for _ in range(50):
                if qmp_socket.exists() or not proc.alive():
                    break
                time.sleep(0.1)
            if not proc.alive():
                raise QemuError(f"QEMU exited at once: {proc.stderr_tail()}")
            qmp = QmpSession(qmp_socket, log_dir / "qmp.jsonl", name="rebalab-image")
            qmp.connect()
            while time.monotonic() - start < self.key_window_s and proc.alive():
                try:
                    qmp.execute("send-key", {"keys": [{"type": "qcode", "data": "ret"}]})
                except QemuError:
                    break
                time.sleep(1.0)
            log(f"waiting up to {timeout_s / 60:.0f} min for the guest to install, provision and power off")
            while proc.alive():
                elapsed = time.monotonic() - start
                if elapsed >= timeout_s:
                    try:
                        qmp.execute("screendump", {"filename": str(log_dir / "timeout-screen.ppm")})
                    except Exception:
                        pass
                    raise DeadlineExceeded("the Windows install to finish and power off", timeout_s,
                                           f"QEMU still running; screen in {log_dir / 'timeout-screen.ppm'}")
                proc.wait(min(self.poll_s, timeout_s - elapsed))
            rc = proc.returncode()
            if rc not in (0, None):
                raise QemuError(f"QEMU exited with status {rc} during the install: {proc.stderr_tail()}")
        finally:
            session = qmp
            proc.stop([("qmp quit", lambda: session.execute("quit") if session else None)])
            if session is not None:
                session.close()


def wdtf_msis(folder: Path) -> list[Path]:
    """The WDTF runtime installers in ``folder``, in install order (by name: the WDK's
    ``OneCoreUap_WDTF_Desktop_Kit_Content-<arch>_<lang>.msi`` before
    ``WDTF_Desktop_Kit_Product-<arch>_<lang>.msi``)."""
    return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".msi"
                   and "wdtf" in p.name.lower()), key=lambda p: p.name.lower())


def check_wdtf_dir(folder: Path) -> None:
    """``--wdtf DIR``: a folder with the WDK's WDTF runtime MSI(s).

    learn.microsoft.com/windows-hardware/drivers/wdtf/wdtf-runtime-library ("Manually
    install WDTF on a test computer"): the WDTF installation files (*.msi and *.cab) are
    in %ProgramFiles(x86)%\\Windows Kits\\10\\Testing\\Runtimes on the development
    system; copy the ones matching the test computer's architecture and run msiexec /i.
    """
    if not folder.is_dir():
        raise ConfigError(f"--wdtf: folder not found: {folder}")
    if not wdtf_msis(folder):
        raise ConfigError(f"--wdtf: {folder} holds no WDTF .msi; copy the WDTF runtime files for "
                          "the guest's architecture (*WDTF*.msi and their .cab files) from your "
                          "WDK's Windows Kits\\10\\Testing\\Runtimes into it")


# ------------------------------------------------------------------ build

@dataclass(frozen=True)
class ImageManifest:
    image: str
    edition: str
    firmware: str
    disk_bus: str
    vars_file: str | None
    winrm_certificate: str | None
    admin_user: str
    facts: dict[str, Any]
    driver: dict[str, Any] | None
    qemu_argv: list[str]
    built_utc: str
    build_seconds: float
    wdtf: dict[str, Any] | None = None     # what provision.ps1 installed for --wdtf

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _staging(spec: WindowsImageSpec, staging: Path, password: str, product_key: str | None,
             templates: Path) -> None:
    xml = unattend.render(
        edition_key=spec.edition, firmware=spec.firmware, admin_user=spec.admin_user,
        admin_password=password, image_name=spec.image_name, image_index=spec.image_index,
        locale=unattend.Locale.single(spec.locale), product_key=product_key,
        with_virtio=spec.virtio_win is not None, templates=templates)
    (staging / "Autounattend.xml").write_text(xml, encoding="utf-8")
    shutil.copyfile(templates / "provision.ps1", staging / "provision.ps1")
    config: dict[str, Any] = {"schema": 1, "admin_user": spec.admin_user, "ssh_public_key_file": None,
                              "driver_dir": None, "wdtf_dir": None}
    if spec.ssh_public_key is not None:
        shutil.copyfile(spec.ssh_public_key, staging / "lab_ssh_key.pub")
        config["ssh_public_key_file"] = "lab_ssh_key.pub"
    if spec.driver_dir is not None:
        shutil.copytree(spec.driver_dir, staging / "driver")
        config["driver_dir"] = "driver"
    if spec.wdtf_dir is not None:
        shutil.copytree(spec.wdtf_dir, staging / "wdtf")
        config["wdtf_dir"] = "wdtf"
    (staging / "provision.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def build(spec: WindowsImageSpec, *, kvm_available: Callable[[], bool],
          media: ProvisioningMedia | None = None, runner: InstallRunner | None = None,
          password: Callable[[], str] | None = None, qemu_binary: str | None = None,
          inventory: QemuInventory | None = None,
          props_of: Callable[[str], dict[str, str] | None] | None = None,
          qemu_img: str = "qemu-img", which: Callable[[str], str | None] = shutil.which,
          templates: Path | None = None, log: Callable[[str], None] = print) -> ImageManifest:
    """Install Windows into ``spec.out``; see the module docstring for the steps."""
    check_inputs(spec, kvm_available, which)
    binary, inv, props = _resolve_caps(qemu_binary, inventory, props_of)
    templates = templates or unattend.template_dir()
    check_argv(install_argv(spec, binary, InstallPaths(Path("/x/p.img"), Path("/x/q.sock"))), inv, props)
    secret = (password or admin_password)()
    product_key = os.environ.get(PRODUCT_KEY_ENV) or None
    media = media or FatMedia()
    runner = runner or QemuInstallRunner()
    started = time.monotonic()
    spec.out.parent.mkdir(parents=True, exist_ok=True)
    created: list[Path] = []
    tmp = Path(tempfile.mkdtemp(prefix="rebalab-wininst-"))
    os.chmod(tmp, 0o700)
    ok = False
    try:
        staging = tmp / "staging"
        staging.mkdir()
        _staging(spec, staging, secret, product_key, templates)
        paths = InstallPaths(prov_image=tmp / "provision.img", qmp_socket=tmp / "qmp.sock")
        media.create(staging, paths.prov_image, unattend.PROVISION_LABEL)
        shutil.rmtree(staging)  # the answer file now exists only inside the FAT image
        spec.log_dir.mkdir(parents=True, exist_ok=True)
        created.append(spec.log_dir)
        _run([qemu_img, "create", "-f", "qcow2", str(spec.partial), spec.disk_size], "qemu-img create")
        created.append(spec.partial)
        if spec.firmware == "uefi":
            shutil.copyfile(spec.ovmf.vars_template, spec.vars_file)
            created.append(spec.vars_file)
        argv = install_argv(spec, binary, paths)
        (spec.log_dir / "qemu-cmdline.txt").write_text(shlex.join(argv) + "\n", encoding="utf-8")
        log(f"installing {spec.edition} from {spec.iso} into {spec.out} ({spec.firmware}, {spec.bus})")
        runner.run(argv, qmp_socket=paths.qmp_socket, log_dir=spec.log_dir, timeout_s=spec.timeout_s, log=log)
        facts_raw = media.read(paths.prov_image, "facts.json")
        for name in ("provision.log", "facts.json", "manifest.json"):
            data = media.read(paths.prov_image, name)
            if data is not None:
                (spec.log_dir / name).write_bytes(data)
        if facts_raw is None:
            raise LabError("the guest powered off without writing facts.json: provisioning did not run or "
                           f"failed early; see {spec.log_dir} (provision.log if present)")
        facts = json.loads(facts_raw.decode("utf-8-sig"))
        if not facts.get("ok", False):
            raise LabError(f"provisioning failed in the guest: {facts.get('failed_steps')}; "
                           f"see {spec.log_dir / 'provision.log'}")
        cert = media.read(paths.prov_image, "winrm-cert.pem")
        if cert is not None:
            spec.cert_path.write_bytes(cert)
            created.append(spec.cert_path)
        drv_raw = media.read(paths.prov_image, "manifest.json")
        guest_manifest = json.loads(drv_raw.decode("utf-8-sig")) if drv_raw else {}
        driver = guest_manifest.get("driver")
        wdtf = guest_manifest.get("wdtf") if isinstance(guest_manifest.get("wdtf"), dict) else None
        if spec.wdtf_dir is not None and not (wdtf or {}).get("com_ok"):
            raise LabError("--wdtf: the WDTF runtime did not install in the guest "
                           f"({(wdtf or {}).get('error') or 'no result recorded'}); see "
                           f"{spec.log_dir / 'provision.log'} and the msiexec logs listed there")
        if isinstance(driver, dict):
            # 259 is "staged, no matching device" (the install VM has none), not a failure
            from lab.guest.windows.driver_check import describe_pnputil, pnputil_outcome

            code = driver.get("pnputil_exit_code")
            driver.setdefault("status", pnputil_outcome(code if isinstance(code, int) else None))
            log(describe_pnputil(code if isinstance(code, int) else None))
        spec.partial.replace(spec.out)
        created.remove(spec.partial)
        created.append(spec.out)
        manifest = ImageManifest(
            image=str(spec.out), edition=spec.edition, firmware=spec.firmware, disk_bus=spec.bus,
            vars_file=str(spec.vars_file) if spec.firmware == "uefi" else None,
            winrm_certificate=str(spec.cert_path) if cert is not None else None,
            admin_user=spec.admin_user, facts=facts, driver=driver, wdtf=wdtf, qemu_argv=argv,
            built_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            build_seconds=round(time.monotonic() - started, 1))
        spec.manifest_path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
        created.append(spec.manifest_path)
        assert_no_secret([spec.manifest_path, spec.log_dir, spec.cert_path], secret)
        ok = True
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not ok:
            for p in (spec.partial, spec.out, spec.manifest_path, spec.vars_file, spec.cert_path):
                if p in created and p.exists():
                    p.unlink()
            # the build log stays for diagnosis, minus anything that should never be kept
            assert_no_secret([spec.log_dir], secret, remove=True)


# ------------------------------------------------------------------ per-run overlays

def create_overlay(base: Path, overlay: Path, *, qemu_img: str = "qemu-img") -> Path:
    """A copy-on-write overlay of ``base`` for one lab run (the base is never written).

    ``qemu-img create -f qcow2 -b BASE -F qcow2 OVERLAY``; the backing path is made
    absolute so the overlay works from any directory.
    """
    if not base.is_file():
        raise ConfigError(f"base image not found: {base}")
    if overlay.exists():
        raise ConfigError(f"overlay {overlay} already exists")
    overlay.parent.mkdir(parents=True, exist_ok=True)
    _run([qemu_img, "create", "-f", "qcow2", "-b", str(base.resolve()), "-F", "qcow2", str(overlay)],
         "qemu-img create (overlay)")
    return overlay


def image_edition(image: Path) -> unattend.Edition | None:
    """The edition ``rebalab image windows`` recorded for ``image`` (its manifest's
    ``edition`` key), or None when there is no readable manifest or the key is unknown.

    Validation uses it before any VM exists (cpu-hotplug is refused on Windows 10/11);
    it never raises, so a scenario for an image not built yet still validates what it
    can and says the edition is unknown.
    """
    try:
        data = load_manifest(image)
    except ConfigError:
        return None
    key = data.get("edition") if isinstance(data, dict) else None
    return unattend.EDITIONS.get(key) if isinstance(key, str) else None


def load_manifest(image: Path) -> dict[str, Any]:
    """The manifest written next to ``image`` by ``build`` (firmware, disk bus, facts)."""
    p = image.with_name(image.name + ".json")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"{image} has no manifest {p}; was it built with `rebalab image windows`?") from None
    except ValueError as exc:
        raise ConfigError(f"manifest {p} is not valid JSON: {exc}") from None
