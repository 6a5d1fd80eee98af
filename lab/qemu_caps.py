"""Ask the installed QEMU what it offers, once per binary, and cache the answer.

Every topology is checked against this before a VM starts, so a device or property
the installed QEMU lacks is a clear error naming it, not a QEMU abort after boot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from lab.privacy import child_env
from lab.errors import EnvironmentProblem
from vdevice.inventory import QemuInventory

DEFAULT_BINARY = "qemu-system-x86_64"
_DEVICE_RE = re.compile(r'^name "([^"]+)"', re.M)
_PROP_RE = re.compile(r"^\s+([\w.-]+)=<([^>]+)>", re.M)
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)\.(\d+)")

# the devices whose properties topologies use; probed up front, the rest on demand
_PROBED = (
    "pcie-root-port", "x3130-upstream", "xio3130-downstream", "ich9-intel-hda", "intel-hda",
    "hda-duplex", "hda-output", "hda-micro", "AC97", "ES1370", "virtio-sound-pci",
    "pci-testdev", "ivshmem-plain", "edu", "virtio-net-pci",
)


def find_binary(name: str = DEFAULT_BINARY) -> str:
    path = os.environ.get("REBALAB_QEMU") or shutil.which(name)
    if not path:
        raise EnvironmentProblem(
            f"{name} not found on PATH. Install it with: sudo apt-get install qemu-system-x86 "
            "(or run `make setup`), or point REBALAB_QEMU at the binary.")
    return path


def _run(binary: str, *args: str) -> str:
    try:
        out = subprocess.run([binary, *args], capture_output=True, text=True, timeout=20,
                             stdin=subprocess.DEVNULL, check=False, env=child_env())
    except subprocess.TimeoutExpired:
        raise EnvironmentProblem(f"{binary} {' '.join(args)} did not answer within 20 s") from None
    return out.stdout + out.stderr


def _cache_file(binary: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rebalab"
    st = os.stat(binary)
    key = re.sub(r"[^\w.-]", "_", f"{binary}-{st.st_size}-{int(st.st_mtime)}")
    return base / f"qemu-caps-{key}.json"


def probe(binary: str | None = None) -> QemuInventory:
    """The inventory of ``binary``; about 1 s the first time, then read from cache."""
    binary = binary or find_binary()
    cache = _cache_file(binary)
    try:
        d = json.loads(cache.read_text())
        return QemuInventory(version=tuple(d["version"]), devices=frozenset(d["devices"]),  # type: ignore[arg-type]
                             properties=d["properties"], machines=frozenset(d["machines"]),
                             migratable=(frozenset(d["migratable"]) if d["migratable"] is not None
                                         else None))
    except (OSError, ValueError, KeyError):
        pass
    vm = _VERSION_RE.search(_run(binary, "--version"))
    if not vm:
        raise EnvironmentProblem(f"could not read the version of {binary}")
    version = (int(vm[1]), int(vm[2]), int(vm[3]))
    devices = frozenset(_DEVICE_RE.findall(_run(binary, "-device", "help")))
    machines = frozenset(line.split()[0] for line in _run(binary, "-machine", "help").splitlines()[1:]
                         if line.strip())
    properties = {dev: device_properties(binary, dev) for dev in _PROBED if dev in devices}
    migratable = vmstate_names(binary)
    inv = QemuInventory(version=version, devices=devices, properties=properties, machines=machines,
                        migratable=migratable)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": version, "devices": sorted(devices),
                                   "properties": properties, "machines": sorted(machines),
                                   "migratable": sorted(migratable) if migratable is not None
                                   else None}))
        tmp.replace(cache)
    except OSError:
        pass
    return inv


def vmstate_names(binary: str) -> frozenset[str] | None:
    """The names of every migration state description the binary has
    (``-dump-vmstate``: a JSON object keyed by them, ~1 MB), or None when it cannot say.

    A device type with none (QEMU 7.2's ``edu``) is not refused by ``migrate``: it comes
    back reset, under a guest that believes its BARs are still set up. The snapshot reset
    refuses such a device at its restore point with this list (``lab.snapshot``)."""
    with tempfile.TemporaryDirectory(prefix="rebalab-vmstate-") as tmp:
        out = Path(tmp) / "vmstate.json"
        _run(binary, "-machine", "none", "-nodefaults", "-display", "none",
             "-dump-vmstate", str(out))
        try:
            if not out.is_file() or out.stat().st_size > 16 * 2**20:
                return None
            data = json.loads(out.read_text())
        except (OSError, ValueError):
            return None
    if not isinstance(data, dict):
        return None
    return frozenset(str(k) for k in data)


def device_properties(binary: str, device: str) -> dict[str, str]:
    return dict(_PROP_RE.findall(_run(binary, "-device", f"{device},help")))
