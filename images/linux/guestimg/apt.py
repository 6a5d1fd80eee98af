"""Debian packages without installing them: resolve with apt-cache, fetch with
``apt-get download`` into a cache, verify against the archive's SHA256, unpack
with ``dpkg-deb -x`` into a per-version extraction cache.

apt-cache is pointed at a binary cache of our own (``cache/apt/pkgcache.bin``):
some hosts (Docker-style images) disable apt's cache, which makes every
apt-cache call re-parse all package lists (~0.8 s each instead of ~0.02 s).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import BuildError


@dataclass(frozen=True)
class DebInfo:
    name: str
    version: str
    arch: str
    sha256: str
    size: int
    filename: str  # archive path, e.g. pool/main/b/busybox/busybox-static_1.35.0-4_amd64.deb
    depends: tuple[tuple[str, ...], ...]  # each entry: alternatives, version constraints removed
    section: str

    @property
    def deb_name(self) -> str:
        return self.filename.rsplit("/", 1)[-1]


def parse_depends(field: str) -> tuple[tuple[str, ...], ...]:
    out = []
    for item in field.split(","):
        alts = []
        for alt in item.split("|"):
            name = re.sub(r"\(.*?\)|\[.*?\]|<.*?>", "", alt).strip().split(":", 1)[0]
            if name:
                alts.append(name)
        if alts:
            out.append(tuple(alts))
    return tuple(out)


def _stanzas(text: str) -> list[dict[str, str]]:
    result = []
    for block in re.split(r"\n\s*\n", text.strip()):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, val = line.partition(":")
                fields[key] = val.strip()
        if fields:
            result.append(fields)
    return result


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class Apt:
    def __init__(self, cache: Path, log=print) -> None:
        self.cache = cache
        self.debs = cache / "debs"
        self.extracted = cache / "extract"
        self.log = log
        self._updated = False
        aptdir = cache / "apt"
        aptdir.mkdir(parents=True, exist_ok=True)
        self.opts = ["-o", f"Dir::Cache::pkgcache={aptdir / 'pkgcache.bin'}",
                     "-o", f"Dir::Cache::srcpkgcache={aptdir / 'srcpkgcache.bin'}"]
        if os.geteuid() == 0:
            self.opts += ["-o", "APT::Sandbox::User=root"]
        self._info: dict[tuple[str, str], DebInfo] = {}

    # -- apt-cache ------------------------------------------------------------
    def _apt_cache(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["apt-cache", *self.opts, *args], capture_output=True, text=True)
        except FileNotFoundError as exc:
            raise BuildError("apt-cache not found: this builder needs a Debian/Ubuntu host with apt") from exc

    def _no_lists(self, what: str) -> None:
        """Package lists are missing or stale: run apt-get update when root, else say so."""
        if os.geteuid() == 0 and not self._updated:
            self.log(f"apt: {what}; running 'apt-get update'")
            proc = subprocess.run(["apt-get", "-q", "update"], capture_output=True, text=True)
            self._updated = True
            if proc.returncode != 0:
                raise BuildError(f"'apt-get update' failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            return
        raise BuildError(f"apt: {what}. Run 'sudo apt-get update' and build again.")

    def depends_of(self, name: str) -> str:
        """First hard dependency of a (meta) package, e.g. linux-image-amd64 -> linux-image-6.1.0-NN-amd64."""
        for attempt in range(2):
            proc = self._apt_cache("depends", name)
            m = re.search(r"^\s+Depends:\s*(\S+)", proc.stdout, re.M)
            if proc.returncode == 0 and m:
                return m.group(1)
            if attempt == 0:
                self._no_lists(f"cannot resolve package '{name}' ({proc.stderr.strip() or 'no Depends'})")
        raise BuildError(f"apt: package '{name}' not found (is it in your apt sources?)")

    def candidates(self, names: list[str], strict: bool = True) -> dict[str, str]:
        """Candidate version of each package (what apt-get download would fetch).

        strict=False: leave out packages that have none instead of failing."""
        names = sorted(set(names))
        for attempt in range(2):
            proc = self._apt_cache("policy", *names)
            found: dict[str, str] = {}
            current = None
            for line in proc.stdout.splitlines():
                if line and not line[0].isspace() and line.endswith(":"):
                    current = line[:-1].split(":", 1)[0]
                elif current and line.strip().startswith("Candidate:"):
                    ver = line.split(":", 1)[1].strip()
                    if ver != "(none)":
                        found[current] = ver
            missing = [n for n in names if n not in found]
            if not missing or not strict:
                return found
            if attempt == 0:
                self._no_lists(f"no installable version of {', '.join(missing)}")
        raise BuildError(f"apt: no installable version of {', '.join(missing)} (check your apt sources)")

    def info(self, pins: dict[str, str]) -> dict[str, DebInfo]:
        """Archive metadata (SHA256, Filename, Depends) for exact name=version pairs."""
        todo = {n: v for n, v in pins.items() if (n, v) not in self._info}
        if todo:
            proc = self._apt_cache("show", "--no-all-versions", *[f"{n}={v}" for n, v in sorted(todo.items())])
            for st in _stanzas(proc.stdout):
                if "Package" not in st or "Version" not in st:
                    continue
                if "Filename" not in st or "SHA256" not in st:
                    # Known only from /var/lib/dpkg/status: installed here, not downloadable.
                    self._no_lists(f"{st['Package']}={st['Version']} is installed but not downloadable "
                                   f"from the configured apt sources")
                    return self.info(pins)
                info = DebInfo(st["Package"], st["Version"], st.get("Architecture", ""), st["SHA256"],
                               int(st.get("Size", "0")), st["Filename"],
                               parse_depends(st.get("Depends", "") + ("," + st["Pre-Depends"] if "Pre-Depends" in st else "")),
                               st.get("Section", ""))
                self._info[(info.name, info.version)] = info
        out = {}
        for n, v in pins.items():
            if (n, v) not in self._info:
                raise BuildError(f"apt: no archive record for {n}={v}")
            out[n] = self._info[(n, v)]
        return out

    # -- download -------------------------------------------------------------
    def fetch(self, infos: list[DebInfo]) -> tuple[dict[str, Path], int]:
        """Make sure every .deb is in the cache and matches the archive's SHA256.

        Returns ({name: path}, number downloaded now)."""
        self.debs.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        need: list[DebInfo] = []
        for i in infos:
            p = self.debs / i.deb_name
            if p.exists() and sha256_file(p) == i.sha256:
                paths[i.name] = p
            else:
                if p.exists():
                    self.log(f"apt: cached {p.name} does not match the archive's SHA256; fetching it again")
                    p.unlink()
                need.append(i)
        if need:
            tmp = self.debs / ".download"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            cmd = ["apt-get", "-q", *self.opts, "download", *[f"{i.name}={i.version}" for i in need]]
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr or proc.stdout).strip()
                if "Unable to locate" in err or "Can't find a source" in err or "not found" in err:
                    self._no_lists("download failed: " + err.splitlines()[-1])
                    return self.fetch(infos)
                raise BuildError(f"apt-get download failed:\n{err[-3000:]}")
            for i in need:
                hits = [p for p in tmp.glob(f"{i.name}_*.deb")]
                if len(hits) != 1:
                    raise BuildError(f"apt-get download did not produce {i.name} ({[p.name for p in tmp.iterdir()]})")
                if sha256_file(hits[0]) != i.sha256:
                    raise BuildError(f"{hits[0].name}: SHA256 does not match the archive's record")
                dest = self.debs / i.deb_name
                os.replace(hits[0], dest)
                paths[i.name] = dest
            shutil.rmtree(tmp, ignore_errors=True)
        return paths, len(need)

    # -- housekeeping ---------------------------------------------------------
    def prune_superseded(self, current: list[DebInfo]) -> int:
        """Delete cached .debs and unpacked trees of other versions of these packages.

        The builder always uses the candidate version, so a superseded one is never used again.
        Returns the number of entries removed."""
        removed = 0
        for info in current:
            keep_deb = info.deb_name
            for p in self.debs.glob(f"{info.name}_*.deb"):
                if p.name != keep_deb:
                    p.unlink()
                    removed += 1
            keep_dir = self._extract_dir(info).name
            for p in self.extracted.glob(f"{info.name}_*"):
                if p.name != keep_dir and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                    removed += 1
        return removed

    # -- extraction -----------------------------------------------------------
    def _extract_dir(self, info: DebInfo) -> Path:
        return self.extracted / re.sub(r"[^A-Za-z0-9.+~-]", "_", f"{info.name}_{info.version}_{info.arch}")

    def extract(self, info: DebInfo, deb: Path) -> Path:
        """Unpacked tree of a .deb (cached per package version)."""
        dest = self._extract_dir(info)
        if (dest / ".complete").exists():
            return dest
        shutil.rmtree(dest, ignore_errors=True)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"dpkg-deb -x {deb.name} failed: {proc.stderr.strip()}")
        (tmp / ".complete").write_text(f"{info.name} {info.version} {info.sha256}\n")
        os.replace(tmp, dest)
        return dest
