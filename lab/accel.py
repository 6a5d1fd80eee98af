"""KVM when a real boot proves it works, TCG otherwise; the choice is recorded.

/dev/kvm existing proves nothing: on this kind of host it is a nested software KVM
on which the guest hangs or aborts (PLATFORM.md). So the probe boots the guest image
under KVM with a short deadline and accepts KVM only if the ready marker appears. The
verdict is cached per host (kernel, CPU model, QEMU binary) so only the first run pays.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.privacy import child_env
from lab.deadline import seconds
from lab.image import GuestImage


@dataclass(frozen=True)
class Accel:
    name: str            # "kvm" or "tcg"
    reason: str
    cached: bool = False
    probe_s: float | None = None

    def qemu_args(self) -> list[str]:
        if self.name == "kvm":
            return ["-accel", "kvm"]
        # TCG emulates RDRAND: with it the guest's CRNG is ready at once, instead of after
        # ~1 s of jitter entropy that the SSH server's first getrandom() waits for (measured
        # here: ready marker 7.1 s -> 5.5 s after boot)
        return ["-accel", "tcg", "-cpu", "qemu64,+rdrand"]

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_path(binary: str) -> Path:
    st = os.stat(binary)
    key = hashlib.sha256(f"{platform.release()}|{_cpu_model()}|{binary}|{st.st_size}|"
                         f"{int(st.st_mtime)}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rebalab"
    return base / f"accel-{key}.json"


def kvm_usable() -> str | None:
    """None if /dev/kvm can be opened read-write, else why not."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm not usable ({exc.strerror})"
    os.close(fd)
    return None


def probe_kvm(binary: str, image: GuestImage, timeout: float) -> tuple[bool, str]:
    """Boot the image under KVM; True if the ready marker shows within ``timeout``."""
    with tempfile.TemporaryDirectory(prefix="rebalab-kvmprobe-") as tmp:
        out = Path(tmp) / "serial.log"
        argv = [binary, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-accel", "kvm", "-machine", "q35", "-m", "256", "-smp", "1",
                "-kernel", str(image.kernel()), "-initrd", str(image.initrd),
                "-append", image.cmdline, "-serial", f"file:{out}"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True,
                                env=child_env())
        end = time.monotonic() + timeout
        try:
            while time.monotonic() < end:
                if proc.poll() is not None:
                    err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")
                    return False, f"QEMU exited under KVM ({err.strip().splitlines()[-1:] or '?'})"
                try:
                    if image.ready_marker in out.read_text(errors="replace"):
                        return True, "a probe boot under KVM reached the ready marker"
                except OSError:
                    pass
                time.sleep(0.1)
            return False, f"a probe boot under KVM did not reach the ready marker in {timeout:.0f}s"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


def choose(binary: str, image: GuestImage, *, want: str | None = None) -> Accel:
    """Pick the accelerator. ``want`` (or REBALAB_ACCEL) may force 'kvm' or 'tcg'."""
    want = (want or os.environ.get("REBALAB_ACCEL") or "auto").lower()
    if want == "tcg":
        return Accel("tcg", "forced by REBALAB_ACCEL/--accel")
    why_not = kvm_usable()
    if want == "kvm":
        return Accel("kvm", "forced by REBALAB_ACCEL/--accel" + (f" (warning: {why_not})"
                                                                  if why_not else ""))
    if why_not:
        return Accel("tcg", why_not)
    cache = _cache_path(binary)
    try:
        d = json.loads(cache.read_text())
        return Accel(d["name"], d["reason"], cached=True, probe_s=d.get("probe_s"))
    except (OSError, ValueError, KeyError):
        pass
    t0 = time.monotonic()
    ok, reason = probe_kvm(binary, image, seconds("kvm_probe"))
    acc = Accel("kvm" if ok else "tcg", reason, probe_s=round(time.monotonic() - t0, 2))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(acc.to_json()))
    except OSError:
        pass
    return acc
