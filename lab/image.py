"""The built-in Linux guest image, as the lab sees it: its manifest and files.

The image builder (``images/linux/build.py``) writes ``manifest.json``; this module
only reads and checks it, so a half-built or tampered image is refused with a message
saying how to rebuild, before any VM starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import EnvironmentProblem

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE_DIR = REPO_ROOT / "images" / "build" / "linux"
BUILD_HINT = "build it with `make image` (or `python3 images/linux/build.py`)"


def default_image_dir() -> Path:
    env = os.environ.get("REBALAB_IMAGE")
    return Path(env) if env else DEFAULT_IMAGE_DIR


@dataclass(frozen=True)
class GuestImage:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: Path | None = None) -> GuestImage:
        path = Path(path) if path else default_image_dir()
        mf = path / "manifest.json"
        if not mf.is_file():
            raise EnvironmentProblem(f"no guest image at {path} (missing manifest.json); "
                                     + BUILD_HINT)
        try:
            manifest = json.loads(mf.read_text())
        except ValueError as exc:
            raise EnvironmentProblem(f"{mf} is not valid JSON ({exc}); " + BUILD_HINT) from None
        img = cls(path, manifest)
        img.check()
        return img

    # ---- files -----------------------------------------------------------------------
    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def kernel_release(self) -> str:
        return str(self.manifest.get("kernel_release") or self.manifest.get("kernel", {})
                   .get("release", "?"))

    def kernel(self, prefer_vmlinux: bool = True) -> Path:
        boot = self.manifest.get("boot", {})
        preferred = boot.get("preferred", "bzImage")
        if prefer_vmlinux and preferred == "vmlinux" and self.file("vmlinux").is_file():
            return self.file("vmlinux")
        return self.file(boot.get("fallback", "bzImage"))

    @property
    def initrd(self) -> Path:
        return self.file(self.manifest.get("initrd", "initramfs.cpio.gz"))

    @property
    def cmdline(self) -> str:
        return str(self.manifest.get("cmdline", "console=ttyS0"))

    @property
    def ready_marker(self) -> str:
        return str(self.manifest.get("ready_marker", "REBALAB-READY"))

    @property
    def ssh(self) -> dict[str, Any]:
        return dict(self.manifest.get("ssh", {}))

    @property
    def ssh_key(self) -> Path:
        return self.file(self.ssh.get("key", "id_ed25519"))

    @property
    def host_key(self) -> str:
        return self.file(self.ssh.get("host_key", "host_key.pub")).read_text().strip()

    @property
    def input_hash(self) -> str:
        return str(self.manifest.get("input_hash", ""))

    def check(self) -> None:
        """Required files exist and the private key is private."""
        for p in (self.kernel(prefer_vmlinux=False), self.initrd, self.ssh_key,
                  self.file(self.ssh.get("host_key", "host_key.pub"))):
            if not p.is_file():
                raise EnvironmentProblem(f"guest image file {p} is missing; " + BUILD_HINT)
        mode = stat.S_IMODE(self.ssh_key.stat().st_mode)
        if mode & 0o077:
            raise EnvironmentProblem(
                f"the guest's private key {self.ssh_key} is readable by others (mode {mode:o}); "
                f"run `chmod 600 {self.ssh_key}`")

    def describe(self) -> dict[str, Any]:
        """What a run records about the image (no key material)."""
        return {"path": str(self.path), "kernel_release": self.kernel_release,
                "input_hash": self.input_hash,
                "packages": self.manifest.get("packages", {}),
                "initrd_sha256": self.manifest.get("files", {}).get(self.initrd.name)}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
