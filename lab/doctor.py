"""``rebalab doctor``: the preflight a user runs first on their own machine.

It checks every assumption the lab makes, one line each, with the fix when it fails,
so that a broken setup is found in one run instead of one error at a time in the
middle of a scenario. Three groups, in the order a run needs them:

* host: the QEMU binary and version, a private temp dir where AF_UNIX socket paths
  fit, the runs directory (writable, its permissions, free space), the host tools the
  lab calls, the accelerator (KVM, or TCG and why: a warning for Linux, a failure for
  Windows, which needs KVM), and OVMF for a UEFI Windows image;
* the guest image: the built-in Linux image's manifest and file hashes, or a Windows
  image's manifest and the files next to it;
* the guest itself, booted once: for Linux ``lab.guest.linux.doctor`` (SSH, kprobes, BTF,
  the tracer, the clock bound, a hot-plug); for Windows ``lab.guest.windows.doctor`` (only
  when KVM works).

A check that cannot run (an exception of the lab, an OSError) is a failed check naming
the error, never a crash: the doctor's job is to report every problem at once. Only
bad arguments (or a bug) make the doctor itself fail, with exit status 2.

Exit status: 0 every check passed (warnings allowed), 1 a check failed, 2 the doctor
could not run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lab.errors import ConfigError, LabError

EXIT_OK, EXIT_FAIL, EXIT_DOCTOR = 0, 1, 2

#: below this much free space under --runs a warning: a run keeps its console, QEMU
#: trace, timelines and (with audio) WAV captures; a Windows run adds a disk overlay
LOW_SPACE_BYTES = {"linux": 1 << 30, "windows": 10 << 30}
#: below this a failure: not even the first run directory would fit
MIN_SPACE_BYTES = 100 << 20
#: sun_path of sockaddr_un is 108 bytes on Linux, including the terminating NUL
AF_UNIX_PATH_MAX = 107
#: the longest socket name a machine puts in its private dir (lab.machine.Machine.argv)
LONGEST_SOCKET = "console.sock"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report; ``fix`` says what to do when ``ok`` is False.

    ``warn`` marks an ok check worth knowing about (TCG instead of KVM, little disk
    space): it never changes the exit status. ``seconds`` is how long the check took,
    set by the doctor that ran it.
    """

    name: str
    ok: bool
    detail: str
    fix: str = ""
    warn: bool = False
    seconds: float | None = None

    @property
    def status(self) -> str:
        return "fail" if not self.ok else "warn" if self.warn else "ok"

    @property
    def symbol(self) -> str:
        return {"ok": "✓", "warn": "!", "fail": "✗"}[self.status]

    def line(self) -> str:
        """The plain form (logs): ``ok``/``warn``/``FAIL``, the detail, the fix."""
        if self.ok and not self.warn:
            return f"ok    {self.name}: {self.detail}"
        head = "warn " if self.ok else "FAIL "
        return f"{head} {self.name}: {self.detail}" + (f" -> fix: {self.fix}" if self.fix else "")

    def render(self, width: int = 18) -> str:
        """The terminal form: symbol, name, detail, timing; the fix on its own line."""
        took = f" ({self.seconds:.2f}s)" if self.seconds is not None else ""
        text = f"{self.symbol} {self.name:<{width}} {self.detail}{took}"
        if self.fix and self.status != "ok":
            text += f"\n  {'':<{width}} fix: {self.fix}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


def exit_code(checks: list[Check]) -> int:
    return EXIT_OK if all(c.ok for c in checks) else EXIT_FAIL


@dataclass
class Doctor:
    """Runs checks one at a time, times them and hands each to ``emit`` as it finishes
    (a boot takes seconds: the user sees the host lines before it)."""

    runs: Path
    guest: str = "linux"                  # "linux" or "windows"
    accel: str | None = None              # --accel: None (auto), "kvm" or "tcg"
    quick: bool = False
    emit: Callable[[Check], None] = lambda c: None
    checks: list[Check] = field(default_factory=list)
    run_dir: Path | None = None           # the booted guest's run directory, if any
    # facts found by one check that a later one needs
    binary: str | None = None
    inventory: Any = None

    def check(self, name: str, fn: Callable[[], Check], *, fix: str) -> Check:
        """Run ``fn``; a LabError or OSError it raises is a failed check with ``fix``."""
        t0 = time.monotonic()
        try:
            c = fn()
        except LabError as exc:          # the lab's messages say what failed already
            c = Check(name, False, str(exc), fix)
        except OSError as exc:
            c = Check(name, False, f"{type(exc).__name__}: {exc}", fix)
        return self.add(replace(c, seconds=round(time.monotonic() - t0, 3)))

    def add(self, c: Check) -> Check:
        self.checks.append(c)
        self.emit(c)
        return c

    def failed(self, *names: str) -> bool:
        return any(c.name in names and not c.ok for c in self.checks)

    @property
    def exit_code(self) -> int:
        return exit_code(self.checks)


# ================================================================ host checks

def check_qemu(doc: Doctor) -> Check:
    from lab import qemu_caps
    from vdevice.catalog import MODELS, unavailable_reason

    binary = qemu_caps.find_binary()
    inv = qemu_caps.probe(binary)
    doc.binary, doc.inventory = binary, inv
    if "q35" not in inv.machines:
        return Check("qemu", False, f"QEMU {inv.version_str} ({binary}) has no q35 machine type",
                     "install the distribution's qemu-system-x86 (the lab's topologies are q35)")
    audio = [m.driver for m in MODELS.values() if m.role.value == "audio" and m.hotpluggable
             and unavailable_reason(m, inv) is None]
    if not audio:
        return Check("qemu", False, f"QEMU {inv.version_str} ({binary}) offers none of the "
                     "catalog's hot-pluggable audio devices",
                     "install a full qemu-system-x86 (not a minimal build); `rebalab models` lists "
                     "what this QEMU offers")
    return Check("qemu", True, f"QEMU {inv.version_str} ({binary}); audio models: {', '.join(audio)}")


def check_temp_dir(tmp: str | None = None) -> Check:
    """The machine's private 0700 socket directory: creatable, and short enough that
    QEMU's AF_UNIX socket paths fit in sun_path (108 bytes)."""
    from lab.machine import OWNER_FILE, PRIVATE_PREFIX

    root = tmp or tempfile.gettempdir()
    fix = "point TMPDIR at a short, writable local directory (e.g. export TMPDIR=/tmp)"
    try:
        d = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX + "doctor-", dir=root))
    except OSError as exc:
        return Check("temp dir", False, f"cannot create a private directory in {root}: "
                     f"{exc.strerror}", fix)
    try:
        # whose it is, as a machine marks its own: a doctor killed here leaves a dir the
        # next machine reclaims (lab.machine.reclaim_stale_private_dirs)
        (d / OWNER_FILE).write_text(f"{os.getpid()}\n")
        os.chmod(d, 0o700)
        # the machine's names plus their random part are what QEMU binds
        longest = d / LONGEST_SOCKET
        n = len(os.fsencode(longest))
        if n > AF_UNIX_PATH_MAX:
            return Check("temp dir", False, f"socket paths in {root} are {n} bytes, over "
                         f"AF_UNIX's {AF_UNIX_PATH_MAX}", fix)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(longest))
        return Check("temp dir", True, f"{root}: private dir and AF_UNIX socket OK "
                     f"({n} of {AF_UNIX_PATH_MAX} bytes)")
    except OSError as exc:
        return Check("temp dir", False, f"cannot bind a socket in {d}: {exc.strerror}",
                     fix + "; the file system must allow sockets (not a FUSE or network mount)")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def check_runs_dir(runs: Path) -> Check:
    """Writable, ours, not open to others: run directories hold console output, QMP
    traffic and guest logs (each is 0700 itself; the root decides who can swap them)."""
    fix = f"pass --runs DIR (or REBALAB_RUNS) naming a directory you own, or `chmod 700 {runs}`"
    existed = runs.exists()
    runs.mkdir(parents=True, exist_ok=True)
    st = runs.stat()
    if not stat.S_ISDIR(st.st_mode):
        return Check("runs dir", False, f"{runs} is not a directory", fix)
    fd, probe = tempfile.mkstemp(prefix=".rebalab-doctor-", dir=runs)
    os.close(fd)
    os.unlink(probe)
    mode = stat.S_IMODE(st.st_mode)
    made = "" if existed else " (created)"
    if st.st_uid != os.getuid():
        return Check("runs dir", True, f"{runs}{made} is owned by uid {st.st_uid}, not you "
                     f"(uid {os.getuid()})", fix, warn=True)
    if mode & 0o002 and not mode & stat.S_ISVTX:
        return Check("runs dir", True, f"{runs}{made} is writable by everyone (mode {mode:o}): "
                     "others could replace run directories", fix, warn=True)
    return Check("runs dir", True, f"{runs.resolve()}{made} writable, mode {mode:o}")


def check_disk_space(runs: Path, guest: str) -> Check:
    usage = shutil.disk_usage(runs)
    free = usage.free
    low = LOW_SPACE_BYTES[guest]
    text = f"{free / 2**30:.1f} GiB free under {runs}"
    fix = "free space there, or pass --runs DIR on a larger disk"
    if free < MIN_SPACE_BYTES:
        return Check("disk space", False, text + f" (below {MIN_SPACE_BYTES >> 20} MiB)", fix)
    if free < low:
        return Check("disk space", True, text + f" (below {low >> 30} GiB: long runs may stop "
                     "with a full disk)", fix, warn=True)
    return Check("disk space", True, text)


#: what the lab runs on the host, by guest: (tool, package, needed for what, required?)
HOST_TOOLS: dict[str, tuple[tuple[str, str, str, bool], ...]] = {
    # a run only needs QEMU (checked above); rebuilding the image when its inputs change
    # (`make image`) needs the Debian tools images/linux/build.py calls
    "linux": (("apt-get", "apt", "rebuilding the guest image", False),
              ("dpkg-deb", "dpkg", "rebuilding the guest image", False),
              ("depmod", "kmod", "rebuilding the guest image", False),
              ("modprobe", "kmod", "rebuilding the guest image", False),
              ("make", "make", "building the guest's test driver", False),
              ("gcc-12", "gcc-12", "building the guest's test driver", False)),
    # each Windows run boots a qemu-img overlay; building an image needs the FAT tools
    "windows": (("qemu-img", "qemu-utils", "the run's copy-on-write disk overlay", True),
                ("mkfs.fat", "dosfstools", "`rebalab image windows`", False),
                ("mcopy", "mtools", "`rebalab image windows`", False)),
}


def check_host_tools(guest: str, which: Callable[[str], str | None] = shutil.which) -> Check:
    tools = HOST_TOOLS[guest]
    missing = [t for t in tools if which(t[0]) is None]
    if not missing:
        return Check("host tools", True, ", ".join(t[0] for t in tools))
    pkgs = " ".join(sorted({t[1] for t in missing}))
    fix = f"sudo apt-get install {pkgs} (or `make setup`)"
    required = [t for t in missing if t[3]]
    text = "; ".join(f"{t[0]} missing (for {t[2]})" for t in missing)
    if required:
        return Check("host tools", False, text, fix)
    return Check("host tools", True, text, fix, warn=True)


# ================================================================ accelerator

def _kvm_cache_note(acc: Any) -> str:
    return " (cached verdict: delete ~/.cache/rebalab/accel-*.json to probe again)" \
        if getattr(acc, "cached", False) else ""


def check_accel_linux(doc: Doctor, image: Any) -> Check:
    """KVM when a probe boot proves it, else TCG and why: a warning, Linux runs under TCG."""
    from lab import accel as accel_mod

    assert doc.binary is not None
    if image is None:
        why = accel_mod.kvm_usable()
        return Check("accelerator", True, f"TCG: {why}" if why else
                     "not probed: the probe boots the guest image, which is not usable (above)",
                     "see the image check", warn=True)
    acc = accel_mod.choose(doc.binary, image, want=doc.accel)
    probe = f" (probe boot {acc.probe_s:.1f}s)" if acc.probe_s and not acc.cached else ""
    if acc.name == "kvm":
        return Check("accelerator", True, f"KVM: {acc.reason}{probe}")
    return Check("accelerator", True, f"TCG: {acc.reason}{probe}{_kvm_cache_note(acc)}",
                 "runs work under TCG, about 2-10x slower; for KVM the host needs working "
                 "hardware virtualisation (/dev/kvm read-write for your user)", warn=True)


def check_accel_windows(doc: Doctor) -> Check:
    """The verdict ``WindowsGuest.choose_accel`` reaches: KVM or a failure (Windows
    under TCG does not boot in any useful time)."""
    from lab import accel as accel_mod
    from lab.image import GuestImage

    assert doc.binary is not None
    want = (doc.accel or os.environ.get("REBALAB_ACCEL") or "auto").lower()
    fix = ("run on a host with working KVM (/dev/kvm read-write, hardware virtualisation on); "
           "if KVM does work here, say so with --accel kvm or REBALAB_KVM=1")
    if want == "tcg":
        return Check("accelerator", False, "Windows needs KVM: TCG was forced (--accel/REBALAB_ACCEL)",
                     "drop --accel tcg / REBALAB_ACCEL=tcg")
    why_not = accel_mod.kvm_usable()
    if want == "kvm" or os.environ.get("REBALAB_KVM") == "1":
        how = "forced by --accel/REBALAB_ACCEL" if want == "kvm" else "asserted by REBALAB_KVM=1"
        if why_not:
            return Check("accelerator", False, f"Windows needs KVM: {why_not} (KVM {how})", fix)
        return Check("accelerator", True, f"KVM: {how}")
    if why_not:
        return Check("accelerator", False, f"Windows needs KVM: {why_not}", fix)
    try:
        image = GuestImage.load()
    except LabError as exc:
        return Check("accelerator", False, "Windows needs KVM, and whether KVM works is decided by a "
                     f"probe boot of the built-in Linux image, which is not usable: {exc}",
                     "build it with `make image`, or assert KVM with --accel kvm / REBALAB_KVM=1")
    acc = accel_mod.choose(doc.binary, image, want="auto")
    if acc.name != "kvm":
        return Check("accelerator", False, f"Windows needs KVM: {acc.reason}{_kvm_cache_note(acc)}", fix)
    return Check("accelerator", True, f"KVM: {acc.reason}")


# ================================================================ the Linux image

def image_being_built(path: Path) -> bool:
    """True while images/linux/build.py holds its lock on ``path`` (a rebuild removes the
    manifest first, so "missing" then only means "wait")."""
    lock = path / ".build.lock"
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)          # closing drops the shared lock at once
    return False


def check_linux_manifest(doc: Doctor, holder: dict[str, Any]) -> Check:
    from lab.image import BUILD_HINT, GuestImage, default_image_dir

    path = default_image_dir()
    if image_being_built(path):
        return Check("image manifest", False, f"the guest image in {path} is being rebuilt right now",
                     "wait for the build (images/linux/build.py) to finish, then run the doctor again")
    try:
        image = GuestImage.load(path)
    except LabError as exc:
        return Check("image manifest", False, str(exc), BUILD_HINT)
    holder["image"] = image
    built = image.manifest.get("built_at", "?")
    return Check("image manifest", True, f"{path}: kernel {image.kernel_release}, "
                 f"input {image.input_hash[:12] or '?'}, built {built}")


def check_linux_files(image: Any) -> Check:
    """Every file the manifest lists hashes to what the build recorded."""
    from lab.image import BUILD_HINT, sha256

    files = image.manifest.get("files") or {}
    if not isinstance(files, dict) or not files:
        return Check("image files", False, "the manifest lists no file hashes (an old or partial build)",
                     "rebuild: `rebalab image linux --force`")
    bad = []
    for name, digest in sorted(files.items()):
        p = image.file(str(name))
        if not p.is_file():
            bad.append(f"{name} missing")
        elif sha256(p) != digest:
            bad.append(f"{name} changed since the build")
    if bad:
        return Check("image files", False, "; ".join(bad), BUILD_HINT.replace("build it", "rebuild it"))
    return Check("image files", True, f"{len(files)} files match their sha256 "
                 f"({', '.join(sorted(files))})")


# ================================================================ the Windows image

def check_windows_image(spec_path: str, holder: dict[str, Any]) -> Check:
    from lab.guest.windows.image import load_manifest

    path = Path(spec_path).expanduser().absolute()
    if not path.is_file():
        return Check("windows image", False, f"Windows image not found: {path}",
                     "build one with `rebalab image windows --iso ISO --out PATH` (on a host with "
                     "KVM), then `rebalab doctor --guest windows:PATH`")
    manifest = load_manifest(path)
    holder["manifest"] = manifest
    facts = manifest.get("facts") or {}
    desc = ", ".join(f"{k} {facts[k]}" for k in ("edition", "display_version", "build") if facts.get(k))
    return Check("windows image", True, f"{path} ({path.stat().st_size / 2**30:.1f} GiB); "
                 f"manifest {path.name}.json: {desc or 'no facts recorded'}")


def check_windows_guest(spec_path: str, holder: dict[str, Any]) -> Check:
    """What the Windows guest needs beside the image: firmware kind, disk bus, the UEFI
    variable store and the WinRM certificate next to it (``WindowsGuest`` validates)."""
    from lab.guest import WindowsGuest

    guest = WindowsGuest(spec_path)
    try:
        guest.winrm_config(0)
    except ConfigError as exc:
        return Check("windows guest", False, str(exc),
                     "put the <image>.winrm.pem that the same `rebalab image windows` build wrote "
                     "next to the image")
    holder["guest"] = guest
    driver = guest.manifest.get("driver")
    infs = [str(p.get("inf")) for p in (driver.get("published") or []) if isinstance(p, dict)] \
        if isinstance(driver, dict) else []
    what = ", ".join(infs) or ("recorded" if driver else "none (build with --driver DIR)")
    return Check("windows guest", True, f"firmware {guest.firmware}, disk bus {guest.disk_bus}, "
                 f"agent winrm as {guest.user or '?'}, driver under test: {what}")


def check_winrm_credentials(guest: Any) -> Check:
    """The agent's credentials resolve (environment or a 0600 file); the password is
    never shown, only where it came from."""
    from lab.agent.winrm import WinRmCredentials

    creds = WinRmCredentials.resolve(getattr(guest, "_winrm_extra", {}).get("credentials_file"))
    text = f"user {creds.username!r} from {creds.source}"
    if guest.user and creds.username.lower() != guest.user.lower():
        return Check("winrm credentials", True, f"{text}; the image's administrator is "
                     f"{guest.user!r}", "log in as the image's administrator (the lab needs an "
                     "elevated token)", warn=True)
    return Check("winrm credentials", True, text)


def check_ovmf() -> Check:
    from lab.guest.windows.vmconfig import OvmfPaths

    paths = OvmfPaths()
    missing = [str(p) for p in (paths.code, paths.vars_template) if not p.is_file()]
    if missing:
        return Check("ovmf", False, f"UEFI firmware not found: {', '.join(missing)}",
                     "sudo apt-get install ovmf (a UEFI image boots from it; a --firmware bios "
                     "image does not need it)")
    return Check("ovmf", True, f"{paths.code}, {paths.vars_template}")


# ================================================================ the whole run

def parse_guest(spec: str) -> tuple[str, str | None]:
    """``linux`` or ``windows:IMAGE`` -> (os, image); anything else is a usage error."""
    text = (spec or "").strip()
    os_name, sep, rest = text.partition(":")
    os_name = os_name.strip().lower()
    if os_name == "linux" and not sep:
        return "linux", None
    if os_name == "windows" and rest.strip():
        return "windows", rest.strip()
    raise ConfigError(f"--guest {text!r}: write linux or windows:<path to image.qcow2>")


def host_checks(doc: Doctor) -> None:
    doc.check("qemu", lambda: check_qemu(doc),
              fix="sudo apt-get install qemu-system-x86 (or `make setup`), or point REBALAB_QEMU "
                  "at the binary")
    doc.check("temp dir", check_temp_dir, fix="point TMPDIR at a short, writable local directory")
    runs = doc.check("runs dir", lambda: check_runs_dir(doc.runs),
                     fix="pass --runs DIR (or REBALAB_RUNS) naming a writable directory you own")
    if runs.ok:
        doc.check("disk space", lambda: check_disk_space(doc.runs, doc.guest),
                  fix="free space there, or pass --runs DIR on a larger disk")
    doc.check("host tools", lambda: check_host_tools(doc.guest),
              fix="sudo apt-get install the missing tools (or `make setup`)")


def run_linux(doc: Doctor) -> None:
    holder: dict[str, Any] = {}
    host_checks(doc)
    doc.check("image manifest", lambda: check_linux_manifest(doc, holder),
              fix="build it with `make image`")
    image = holder.get("image")
    if image is not None:
        doc.check("image files", lambda: check_linux_files(image),
                  fix="rebuild it with `rebalab image linux --force`")
    if doc.binary is not None:
        doc.check("accelerator", lambda: check_accel_linux(doc, image if not doc.failed(
            "image files") else None), fix="see the detail")
    if doc.failed("qemu", "temp dir", "runs dir", "disk space", "image manifest", "image files"):
        doc.add(Check("boot", False, "not booted: a check above failed",
                      "fix the failures above and run the doctor again"))
        return
    from lab.guest.linux.doctor import guest_checks
    assert image is not None             # the manifest check passed
    guest_checks(doc, image)


def run_windows(doc: Doctor, image_path: str) -> None:
    holder: dict[str, Any] = {}
    host_checks(doc)
    doc.check("windows image", lambda: check_windows_image(image_path, holder),
              fix="build the image with `rebalab image windows` and pass its path")
    if "manifest" in holder:
        doc.check("windows guest", lambda: check_windows_guest(image_path, holder),
                  fix="rebuild the image, or copy the files `rebalab image windows` wrote next to it")
    if "guest" in holder:
        doc.check("winrm credentials", lambda: check_winrm_credentials(holder["guest"]),
                  fix="set REBALAB_WINRM_USER and REBALAB_WINRM_PASSWORD, or a 0600 JSON "
                      "credentials file (README: Windows guests)")
    firmware = (holder.get("manifest") or {}).get("firmware", "uefi")
    if firmware == "uefi":
        doc.check("ovmf", check_ovmf, fix="sudo apt-get install ovmf")
    if doc.binary is not None:
        doc.check("accelerator", lambda: check_accel_windows(doc),
                  fix="run on a host with working KVM")
    if any(not c.ok for c in doc.checks) or "guest" not in holder:
        doc.add(Check("boot", False, "not booted: a check above failed",
                      "fix the failures above and run the doctor again"))
        return
    windows_guest_checks(doc, holder["guest"])


# ================================================================ booting a guest

def boot_check(m: Any) -> Check:
    """Start the machine: the accelerator, QEMU, the boot, the agent answering."""
    m.start()
    acc = m.accel
    marker = m.timings.get("boot_to_marker_s")
    return Check("boot", True, f"{m.guest.os} guest up under {acc.name.upper() if acc else '?'}: "
                 + (f"ready marker {marker:.1f}s, " if marker is not None else "")
                 + f"agent {m.timings['boot_to_agent_s']:.1f}s after start")


def stop_check(m: Any) -> Check:
    """Stop the machine; a QEMU that needed SIGTERM/SIGKILL is worth a warning."""
    step = m.stop()
    proc = m.process
    if proc is not None and proc.alive():
        return Check("shutdown", False, f"QEMU pid {proc.pid} still runs after the stop ladder",
                     f"kill it (kill {proc.pid}) and report this as a bug")
    if step in ("SIGTERM", "SIGKILL"):
        return Check("shutdown", True, f"QEMU stopped only by {step}: the guest ignored "
                     "poweroff and QMP quit", "see lab.log in the doctor's run directory", warn=True)
    return Check("shutdown", True, f"QEMU gone ({step or 'not started'}); private socket dir removed"
                 if m.private is None or not m.private.exists() else
                 f"QEMU gone ({step}) but {m.private} remains")


def windows_guest_checks(doc: Doctor, guest: Any) -> None:
    """Boot the Windows image with the device under test placed cold (an HD Audio
    controller with its codec: the codec's function devnode is what the driver binds),
    then every check of ``lab.guest.windows.doctor``."""
    from lab.guest.windows.doctor import windows_checks
    from lab.machine import Machine
    from lab.rundir import RunDir
    from vdevice.presets import default_topology
    from vdevice.topology import Device, HotplugMode, Placement

    model = "ich9-intel-hda"
    topo = replace(default_topology(HotplugMode.ACPI, model=model),
                   devices=(Device("snd0", model, "rp1", Placement.COLD, codec="hda-duplex"),))
    run = RunDir(doc.runs, "doctor-windows")
    doc.run_dir = run.path
    m: Any = None
    try:
        m = Machine(topo, run, guest=guest, accel=doc.accel)
        boot = doc.check("boot", lambda: boot_check(m),
                         fix=f"read lab.log and console.log in {run.path}")
        if boot.ok:
            for c in windows_checks(m.agent, model, driver=guest.manifest.get("driver")):
                doc.add(c)
    finally:
        if m is not None:
            doc.check("shutdown", lambda: stop_check(m), fix=f"see lab.log in {run.path}")
        run.close()


def run_doctor(guest: str = "linux", *, runs: Path = Path("runs"), accel: str | None = None,
               quick: bool = False, emit: Callable[[Check], None] = lambda c: None) -> Doctor:
    """Every check for ``guest`` ("linux" or "windows:IMAGE"); raises ConfigError only
    for a bad ``guest`` spec (the doctor cannot run), never for a failed check."""
    os_name, image = parse_guest(guest)
    if accel not in (None, "kvm", "tcg"):
        raise ConfigError(f"--accel {accel!r}: auto, kvm or tcg")
    doc = Doctor(Path(runs), os_name, accel, quick, emit)
    if os_name == "linux":
        run_linux(doc)
    else:
        assert image is not None
        run_windows(doc, image)
    return doc
