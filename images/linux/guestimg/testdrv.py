"""Out-of-tree kernel modules (images/linux/testdrv/) built against Debian's headers.

Debian's headers come in three packages that are meant to be installed under
/usr/src and /usr/lib: unpacked together into one folder they work once the
arch headers' Makefile, which includes the common one by absolute path, points
into that folder.  The module is built in a scratch copy, never in the source tree.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

from . import BuildError

#: Files a kernel module build leaves behind; never part of the sources.
ARTEFACT = re.compile(r"(\.(o|ko|mod|mod\.c|cmd|order|symvers|a|tmp)$)|(^\.)|(^Module\.symvers$)|(^modules\.order$)")


def present(src: Path) -> bool:
    return src.is_dir() and any((src / f).is_file() for f in ("Makefile", "Kbuild"))


def source_files(src: Path) -> dict[str, str]:
    """{relative path: sha256} of the driver's sources (for the input hash)."""
    out = {}
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_file() and not any(ARTEFACT.search(part) for part in rel.parts):
            out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def header_packages(release: str) -> list[str]:
    """linux-headers-6.1.0-NN-amd64, linux-headers-6.1.0-NN-common, linux-kbuild-6.1."""
    m = re.match(r"^(\d+\.\d+)\.\d+-(\d+)-(.+)$", release)
    if not m:
        raise BuildError(f"cannot derive header package names from kernel release {release!r}")
    abi = release[: -len(m.group(3)) - 1]
    return [f"linux-headers-{release}", f"linux-headers-{abi}-common", f"linux-kbuild-{m.group(1)}"]


def prepare_headers(debs: list[Path], release: str, dest: Path) -> Path:
    """Unpack the three header packages into ``dest`` (cached) and fix the include path.

    Returns the directory to pass to ``make -C``."""
    kdir = dest / "usr/src" / f"linux-headers-{release}"
    if (dest / ".complete").exists():
        return kdir
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for deb in debs:
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
    mk = kdir / "Makefile"
    if not mk.is_file():
        raise BuildError(f"{mk} missing after unpacking the headers packages")
    text = mk.read_text()
    fixed = re.sub(r"(?m)^include /usr/src/", f"include {dest}/usr/src/", text)
    if fixed == text:
        raise BuildError(f"{mk}: no absolute 'include /usr/src/...' line to rewrite; header layout changed?")
    mk.write_text(fixed)
    (dest / ".complete").write_text("ok\n")
    return kdir


def build(src: Path, kdir: Path, release: str, work: Path, log) -> dict[str, Path]:
    """make -C <headers> M=<copy of src> modules; returns {relative .ko path: built file}."""
    if not shutil.which("make"):
        raise BuildError("testdrv: 'make' is not installed on the host (see images/linux/host-packages.txt)")
    copy = work / "testdrv"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(src, copy, ignore=lambda d, names: [n for n in names if ARTEFACT.search(n)])
    proc = subprocess.run(["make", "-C", str(kdir), f"M={copy}", "modules"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"testdrv: module build failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    kos = {str(p.relative_to(copy)): p for p in sorted(copy.rglob("*.ko"))}
    if not kos:
        raise BuildError("testdrv: the build produced no .ko file")
    for rel, ko in kos.items():
        vermagic = subprocess.run(["modinfo", "-F", "vermagic", str(ko)], capture_output=True, text=True).stdout.strip()
        if vermagic.split(" ", 1)[0] != release:
            raise BuildError(f"testdrv: {rel} has vermagic {vermagic!r}, not for {release}")
    return kos
