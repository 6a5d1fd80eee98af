"""Guest user space from unpacked Debian packages: busybox, programs and the
shared libraries they really need (ELF DT_NEEDED closure + the ELF interpreter).

A library that none of the unpacked packages provides is looked for in the
Depends of the package whose binary needs it (dpkg-shlibdeps puts exactly
those there); candidates are tried best guess first, in batches.
"""

from __future__ import annotations

import os
import posixpath
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from . import BuildError, elf
from .apt import Apt, DebInfo
from .cpio import Tree

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "lib", "usr/lib")


@dataclass
class Unpacked:
    info: DebInfo
    deb: Path
    root: Path
    roles: set[str] = field(default_factory=set)  # why the image uses it; empty = fetched but unused


class PackagePool:
    """Packages fetched and unpacked for this build, keyed by name."""

    def __init__(self, apt: Apt) -> None:
        self.apt = apt
        self.pkgs: dict[str, Unpacked] = {}
        self.downloaded = 0
        self.versions: dict[str, str] = {}  # known candidate versions (pre-resolved in one batch)

    def ensure(self, names: list[str], pins: dict[str, str] | None = None) -> None:
        todo = [n for n in dict.fromkeys(names) if n not in self.pkgs]
        if not todo:
            return
        pins = dict(pins or {})
        unknown = [n for n in todo if n not in pins and n not in self.versions]
        if unknown:
            self.versions.update(self.apt.candidates(unknown))
        wanted = {n: pins.get(n) or self.versions[n] for n in todo}
        infos = self.apt.info(wanted)
        paths, n = self.apt.fetch(list(infos.values()))
        self.downloaded += n
        for name, info in infos.items():
            self.pkgs[name] = Unpacked(info, paths[name], self.apt.extract(info, paths[name]))

    def __getitem__(self, name: str) -> Unpacked:
        return self.pkgs[name]

    def use(self, name: str, role: str) -> Unpacked:
        self.ensure([name])
        p = self.pkgs[name]
        p.roles.add(role)
        return p

    def used(self) -> dict[str, Unpacked]:
        return {n: p for n, p in sorted(self.pkgs.items()) if p.roles}


def _resolve_in(root: Path, guest_path: str, depth: int = 0) -> str:
    """Follow symlinks of ``guest_path`` inside the unpacked package ``root``; the final guest path."""
    if depth > 20:
        raise BuildError(f"symlink loop at {guest_path} in {root}")
    host = root / guest_path.lstrip("/")
    if host.is_symlink():
        target = os.readlink(host)
        nxt = target if target.startswith("/") else posixpath.normpath(posixpath.join(posixpath.dirname(guest_path), target))
        return _resolve_in(root, nxt, depth + 1)
    return guest_path


def copy_path(tree: Tree, pkg: Unpacked, guest_path: str, role: str) -> str:
    """Copy one path (file, symlink chain or directory) from a package; returns the final file's guest path."""
    root = pkg.root
    host = root / guest_path.lstrip("/")
    if not host.exists() and not host.is_symlink():
        raise BuildError(f"{pkg.info.name} {pkg.info.version} has no {guest_path}")
    pkg.roles.add(role)
    seen = 0
    path = guest_path
    while (root / path.lstrip("/")).is_symlink():
        h = root / path.lstrip("/")
        target = os.readlink(h)
        tree.add_symlink(path, target, origin=pkg.info.name)
        path = target if target.startswith("/") else posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        seen += 1
        if seen > 20:
            raise BuildError(f"symlink loop at {guest_path} in {pkg.info.name}")
    tree.add_host_path(root / path.lstrip("/"), path, origin=pkg.info.name)
    return path


# ---------------------------------------------------------------- busybox ---
def install_busybox(tree: Tree, pkg: Unpacked) -> tuple[int, bool]:
    """/bin/busybox plus one symlink per applet at its usual place.

    Returns (number of applet links, True if the list came from running the binary;
    when it cannot run here, only /bin/sh is linked and the guest's init runs
    ``busybox --install -s``)."""
    path = copy_path(tree, pkg, "/bin/busybox", "busybox")
    host = pkg.root / path.lstrip("/")
    try:
        out = subprocess.run([str(host), "--list-full"], capture_output=True, text=True, timeout=20)
        applets = [a.strip() for a in out.stdout.splitlines() if a.strip()] if out.returncode == 0 else []
    except (OSError, subprocess.SubprocessError):
        applets = []
    tree.add_symlink("/bin/sh", "busybox", origin=pkg.info.name)
    n = 0
    for a in applets:
        guest = "/" + a
        if guest in tree or guest == "/bin/busybox":
            continue
        tree.add_symlink(guest, posixpath.relpath("/bin/busybox", posixpath.dirname(guest)), origin=pkg.info.name)
        n += 1
    return n, bool(applets)


# ------------------------------------------------------------ ELF closure ---
def _soname_score(soname: str, pkg: str) -> int:
    """How well a package name fits a soname, Debian policy 8.1 style: 0 best, 3 a blind guess.

    libfoo.so.3 is in libfoo3 or libfoo-3 (0); libpam.so.0 in libpam0g, whose suffix
    starts with the soname version (1), rather than in libpam-modules (2)."""
    m = re.match(r"(.+?)\.so(?:\.(\d+))?", soname)
    base, ver = (m.group(1), m.group(2) or "") if m else (soname, "")
    base = base.lower().replace("_", "-")
    if pkg in (f"{base}{ver}", f"{base}-{ver}"):
        return 0
    rest = pkg[len(base):] if pkg.startswith(base) else None
    if rest is not None and ver and rest.startswith((ver, f"-{ver}")):  # libpam.so.0 -> libpam0g
        return 1
    if rest is not None and (rest == "" or rest[0].isdigit() or rest[0] == "-"):  # libfoo.so.N -> libfooM
        return 2
    core = base[3:] if base.startswith("lib") else base
    if core and pkg.startswith(core):  # libz.so.1 -> zlib1g
        return 2
    return 3


@dataclass
class LibIndex:
    """soname/guest path -> providing package, over the unpacked packages."""
    pool: PackagePool
    scanned: set[str] = field(default_factory=set)
    by_name: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # file name -> [(pkg, guest path)]

    def refresh(self) -> None:
        for name, p in self.pool.pkgs.items():
            if name in self.scanned:
                continue
            self.scanned.add(name)
            for d in LIB_DIRS:
                host = p.root / d
                if not host.is_dir():
                    continue
                for entry in os.scandir(host):
                    if ".so" in entry.name and (entry.is_file() or entry.is_symlink()):
                        self.by_name.setdefault(entry.name, []).append((name, f"/{d}/{entry.name}"))

    def find(self, soname: str, runpath: tuple[str, ...]) -> tuple[str, str] | None:
        self.refresh()
        if "/" in soname:  # an absolute path (the ELF interpreter)
            for name, p in self.pool.pkgs.items():
                h = p.root / soname.lstrip("/")
                if h.exists() or h.is_symlink():
                    return name, soname
            return None
        hits = self.by_name.get(soname, [])
        order = [f"/{d}/" for d in LIB_DIRS]
        for rp in runpath:
            order.insert(0, rp.rstrip("/") + "/")
        for prefix in order:
            for name, path in hits:
                if path == prefix + soname:
                    return name, path
        return None


def install_programs(tree: Tree, pool: PackagePool, programs: list[tuple[str, str]], log) -> dict[str, str]:
    """Copy programs [(package, guest path)] and their library closure; returns {soname: package}."""
    index = LibIndex(pool)
    pending: list[tuple[str, str]] = []  # (guest path of an ELF now in the tree, owning package)
    for pkg_name, path in programs:
        pkg = pool.use(pkg_name, "program")
        final = copy_path(tree, pkg, path, "program")
        pending.append((final, pkg_name))
    installed = list(pending)
    provided: dict[str, str] = {}
    tried: dict[str, set[str]] = {}
    for _round in range(12):
        misses: list[tuple[str, str]] = []  # (soname, needed-by package)
        while pending:
            path, owner = pending.pop()
            host = pool[owner].root / path.lstrip("/")
            if not elf.is_elf(host):
                continue
            info = elf.read(host)
            wants = list(info.needed) + ([info.interp] if info.interp else [])
            for so in wants:
                if so in provided:
                    continue
                hit = index.find(so, info.runpath)
                if hit is None:
                    misses.append((so, owner))
                    continue
                name, guest = hit
                final = copy_path(tree, pool[name], guest, "library")
                provided[so] = name
                pending.append((final, name))
                installed.append((final, name))
        if not misses:
            return provided
        # Look for the missing libraries in the Depends of the packages that need them.  Misses
        # without a plausible candidate by name wait a round when others are being fetched:
        # libc6, fetched for libc.so.6, also brings the loader and libm.
        fetch: list[str] = []
        blind: list[tuple[str, str]] = []
        owners: dict[str, list[str]] = {}
        for so, owner in misses:
            owners.setdefault(so, []).append(owner)
        for so in sorted(owners):
            deps = list(dict.fromkeys(alts[0] for o in owners[so] for alts in pool[o].info.depends))
            cands = [d for d in deps if d not in pool.pkgs and d not in tried.setdefault(so, set())]
            if not cands:
                raise BuildError(f"no package provides {so} (needed by {', '.join(sorted(set(owners[so])))}); "
                                 f"searched {sorted(tried[so] | {d for d in deps if d in pool.pkgs})}")
            # a blind guess tries library packages first (libcrypto.so.3 is in libssl3,
            # never in adduser, which openssh-server also depends on)
            best = min(cands, key=lambda d: (_soname_score(so, d), not d.startswith("lib"), deps.index(d)))
            if _soname_score(so, best) < 3:
                tried[so].add(best)
                fetch.append(best)
            else:
                blind.append((so, best))
        if not fetch:
            for so, best in blind:
                tried[so].add(best)
                fetch.append(best)
        log(f"libs: fetching {', '.join(sorted(set(fetch)))} for {', '.join(sorted({m for m, _ in misses}))}")
        pool.ensure(sorted(set(fetch)))
        # Re-queue the ELFs whose needs are not met yet.
        pending = list(installed)
    raise BuildError("library resolution did not converge")

