"""argparse wiring for the Windows commands; ``lab/cli.py`` calls the ``add_*`` functions.

* ``rebalab image windows --iso ISO [--virtio-win ISO] [--driver DIR] [--edition NAME]
  [--firmware uefi|bios] --out images/build/win11.qcow2 [--dry-run]``
* ``rebalab collect-dump RUN_DIR``

Handlers return the CLI exit status (0 ok, 2 lab error via LabError); errors are raised
as LabError subclasses for ``lab.cli.main`` to print and map.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.errors import ConfigError
from lab.guest.windows import image as winimage
from lab.guest.windows.unattend import EDITIONS


def default_kvm_available() -> bool:
    """Does KVM really work here? The lab's boot probe decides (``lab.accel.choose``).

    Opening /dev/kvm is not enough on hosts with a broken nested KVM (PLATFORM.md), so
    the verdict comes from the cached probe boot of the built-in Linux guest. Without
    that image there is no verdict and the answer is no: an install under a KVM that
    hangs would only time out after an hour. ``REBALAB_KVM=1`` asserts that KVM works
    (a CI runner known to have it) and skips the probe.
    """
    if os.environ.get("REBALAB_KVM") == "1":
        return True
    try:
        from lab import accel, qemu_caps
        from lab.image import GuestImage

        if accel.kvm_usable() is not None:
            return False
        chosen = accel.choose(qemu_caps.find_binary(), GuestImage.load(), want="auto")
        return chosen.name == "kvm"
    except Exception:  # no probe image, no QEMU: no verdict, so no KVM
        return False


def _spec_from_args(a: argparse.Namespace) -> winimage.WindowsImageSpec:
    timeout_s = float(a.timeout_min) * 60
    return winimage.WindowsImageSpec(
        iso=Path(a.iso), out=Path(a.out), virtio_win=Path(a.virtio_win) if a.virtio_win else None,
        driver_dir=Path(a.driver) if a.driver else None,
        wdtf_dir=Path(a.wdtf) if getattr(a, "wdtf", None) else None,
        edition=a.edition, image_name=a.image_name,
        image_index=a.image_index, firmware=a.firmware, disk_bus=a.disk_bus, disk_size=a.disk_size,
        memory_mb=a.memory, smp=a.smp, locale=a.locale, admin_user=a.user,
        ssh_public_key=Path(a.ssh_key) if a.ssh_key else None, timeout_s=timeout_s,
        install_network=a.install_network)


def cmd_image_windows(a: argparse.Namespace, *, kvm_available: Callable[[], bool] | None = None,
                      out: Callable[[str], None] = print, **build_kwargs: Any) -> int:
    spec = _spec_from_args(a)
    kvm = kvm_available or default_kvm_available
    if a.dry_run:
        out(winimage.dry_run(spec, kvm_available=kvm, qemu_binary=a.qemu, **_caps_kwargs(build_kwargs)))
        return 0
    manifest = winimage.build(spec, kvm_available=kvm, qemu_binary=a.qemu, log=out, **build_kwargs)
    out(f"built {manifest.image} ({manifest.facts.get('edition')}, build {manifest.facts.get('build')}); "
        f"manifest {spec.manifest_path}")
    return 0


def _caps_kwargs(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw[k] for k in ("inventory", "props_of") if k in kw}


def add_windows_image_parser(image_subparsers: Any) -> argparse.ArgumentParser:
    """Attach ``windows`` under an existing ``image`` command's subparsers."""
    w = image_subparsers.add_parser(
        "windows", help="install Windows unattended into a qcow2 image (needs KVM)",
        description="Install Windows 10/11 or Server 2019/2022/2025 unattended into a qcow2 image "
                    "provisioned for the lab (WinRM over HTTPS, OpenSSH, test signing, crash dumps, "
                    "Kernel-PnP tracing). The administrator password comes from "
                    f"{winimage.PASSWORD_ENV} or a prompt and is never stored.")
    w.add_argument("--iso", required=True, help="Windows installation ISO")
    w.add_argument("--virtio-win", help="virtio-win driver ISO (enables the virtio-blk system disk)")
    w.add_argument("--driver", help="folder with the driver package under test (.inf/.sys/.cat, test .cer)")
    w.add_argument("--wdtf", metavar="DIR",
                   help="folder with the WDTF runtime from your WDK (the *WDTF*.msi and .cab files "
                        "of Windows Kits\\10\\Testing\\Runtimes for the guest's architecture): "
                        "installed into the image for the wdtf rebalance trigger")
    w.add_argument("--edition", default="win11", choices=sorted(EDITIONS),
                   help="Windows release (default win11)")
    sel = w.add_mutually_exclusive_group()
    sel.add_argument("--image-name", help="install.wim image NAME to install (default: the edition's)")
    sel.add_argument("--image-index", type=int, help="install.wim image index to install")
    w.add_argument("--firmware", choices=("uefi", "bios"), default="uefi")
    w.add_argument("--disk-bus", choices=("virtio", "ahci"), default=None,
                   help="system disk bus (default virtio with --virtio-win, else ahci)")
    w.add_argument("--disk-size", default="64G")
    w.add_argument("--memory", type=int, default=4096, help="MiB (at least 4096)")
    w.add_argument("--smp", type=int, default=2)
    w.add_argument("--locale", default="en-US")
    w.add_argument("--user", default="rebalab", help="local administrator account to create")
    w.add_argument("--ssh-key", help="the lab's SSH public key for administrators_authorized_keys")
    w.add_argument("--timeout-min", type=float, default=winimage.DEFAULT_TIMEOUT_MIN,
                   help=f"install deadline in minutes (default {winimage.DEFAULT_TIMEOUT_MIN:.0f})")
    w.add_argument("--install-network", action="store_true",
                   help="give the installing guest outbound network (OpenSSH on Windows 10/Server "
                        "2019/2022 comes from Windows Update)")
    w.add_argument("--qemu", default=None, help="QEMU binary (default: qemu-system-x86_64 on PATH)")
    w.add_argument("--out", required=True, help="image to create, e.g. images/build/win11.qcow2")
    w.add_argument("--dry-run", action="store_true", help="print the QEMU command line; create nothing")
    w.set_defaults(func=cmd_image_windows)
    return w


def add_image_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``image`` (with ``windows`` under it) to the top-level subparsers.

    If the lead's CLI already has an ``image`` command, call
    ``add_windows_image_parser`` on its subparsers instead.
    """
    img = subparsers.add_parser("image", help="build guest images")
    sub = img.add_subparsers(dest="image_kind", metavar="KIND")
    add_windows_image_parser(sub)
    return img


# ------------------------------------------------------------------ collect-dump

def _agent_from_args(a: argparse.Namespace) -> Any:
    from lab.agent.winrm import WinRmAgent, WinRmConfig

    cfg: dict[str, Any] = {}
    saved = Path(a.run_dir) / "windows-agent.json"
    if saved.is_file():
        try:
            cfg.update(json.loads(saved.read_text(encoding="utf-8")).get("winrm", {}))
        except ValueError as exc:
            raise ConfigError(f"{saved} is not valid JSON: {exc}") from None
    for key, val in (("host", a.host), ("port", a.port), ("transport", a.transport),
                     ("ca_bundle", a.ca_bundle), ("credentials_file", a.credentials_file)):
        if val is not None:
            cfg[key] = val
    if a.insecure:
        cfg["server_cert_validation"] = "ignore"
    if "port" not in cfg:
        raise ConfigError(f"no WinRM port: pass --port, or run with a run directory holding {saved.name}")
    cfg.setdefault("host", "127.0.0.1")
    return WinRmAgent(WinRmConfig.from_mapping(cfg))


def cmd_collect_dump(a: argparse.Namespace, *, agent_factory: Callable[[argparse.Namespace], Any] | None = None,
                     out: Callable[[str], None] = print) -> int:
    from lab.deadline import seconds
    from lab.guest.windows.dumps import collect_dumps

    run_dir = Path(a.run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    agent = (agent_factory or _agent_from_args)(a)
    try:
        agent.wait_ready(seconds("agent_ready"))
        files = collect_dumps(agent, run_dir, minidump_only=a.minidump_only)
    finally:
        agent.close()
    if not files:
        out("no crash dumps in the guest")
    for f in files:
        out(f"{f.kind:9} {f.length:>12} {f.local}")
    return 0


def add_collect_dump_parser(subparsers: Any) -> argparse.ArgumentParser:
    c = subparsers.add_parser("collect-dump", help="copy a Windows guest's crash dumps into RUN_DIR/dumps")
    c.add_argument("run_dir", metavar="RUN_DIR")
    c.add_argument("--host", default=None, help="WinRM host (default 127.0.0.1)")
    c.add_argument("--port", type=int, default=None, help="WinRM HTTPS port forwarded to the guest")
    c.add_argument("--transport", choices=("ntlm", "kerberos", "credssp", "basic"), default=None)
    c.add_argument("--ca-bundle", default=None, help="the image's .winrm.pem certificate")
    c.add_argument("--credentials-file", default=None, help="0600 JSON {username, password}")
    c.add_argument("--insecure", action="store_true", help="do not validate the WinRM certificate")
    c.add_argument("--minidump-only", action="store_true", help="skip MEMORY.DMP (large)")
    c.set_defaults(func=cmd_collect_dump)
    return c


__all__ = ["add_image_parser", "add_windows_image_parser", "add_collect_dump_parser",
           "cmd_image_windows", "cmd_collect_dump", "default_kvm_available"]
