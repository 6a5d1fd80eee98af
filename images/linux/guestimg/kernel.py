"""The guest kernel: bzImage header, vmlinux recovery, module selection.

vmlinux recovery follows the kernel's scripts/extract-vmlinux: the bzImage holds
the compressed vmlinux as its payload.  Boot protocol >= 2.08 headers give the
payload's offset and length exactly; if that fails we scan for compression
magics like extract-vmlinux does.  The result must be an x86-64 ELF; its Xen
PHYS32_ENTRY note (PVH entry) is what lets QEMU boot it with ``-kernel vmlinux``.
"""

from __future__ import annotations

import bz2
import lzma
import os
import re
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import BuildError, elf

# (name, magic) in the order extract-vmlinux tries them.
MAGICS = [
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00\x00"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
]


@dataclass(frozen=True)
class BzImageHeader:
    protocol: str
    version_string: str  # "6.1.0-56-amd64 (debian-kernel@...) #1 SMP PREEMPT_DYNAMIC Debian ..."
    payload_offset: int  # absolute file offset of the compressed vmlinux
    payload_length: int

    @property
    def release(self) -> str:
        return self.version_string.split(" ", 1)[0]


@dataclass(frozen=True)
class Vmlinux:
    data: bytes
    compression: str
    method: str  # "boot-header" or "magic-scan"
    pvh_entry: int | None


def read_header(image: bytes) -> BzImageHeader:
    if len(image) < 0x270 or image[0x202:0x206] != b"HdrS":
        raise BuildError("not a bzImage (no 'HdrS' boot header)")
    proto = struct.unpack_from("<H", image, 0x206)[0]
    setup_sects = image[0x1F1] or 4
    kver_ptr = struct.unpack_from("<H", image, 0x20E)[0]
    version = ""
    if kver_ptr:
        raw = image[kver_ptr + 0x200:kver_ptr + 0x200 + 256]
        version = raw.split(b"\0", 1)[0].decode(errors="replace")
    off = length = 0
    if proto >= 0x208:
        po, length = struct.unpack_from("<II", image, 0x248)
        off = (setup_sects + 1) * 512 + po
    return BzImageHeader(f"{proto >> 8}.{proto & 0xFF:02d}", version, off, length)


def _decompress(kind: str, blob: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(blob)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(blob)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(blob)
    tool = {"zstd": ["zstd", "-dcq"], "lz4": ["lz4", "-dcq"], "lzo": ["lzop", "-dcq"]}[kind]
    if not shutil.which(tool[0]):
        raise BuildError(f"{kind}-compressed kernel: install '{tool[0]}' on the host to extract vmlinux")
    proc = subprocess.run(tool, input=blob, capture_output=True)
    # Trailing data after the stream makes some tools exit non-zero after a full decode: judge by output.
    return proc.stdout


def _check(data: bytes) -> elf.ElfInfo:
    info = elf.parse(data)
    if info.machine != elf.EM_X86_64:
        raise elf.ElfError(f"ELF machine {info.machine} is not x86-64")
    return info


def extract_vmlinux(image: bytes) -> Vmlinux:
    """Recover the uncompressed ELF vmlinux from a bzImage (raises BuildError)."""
    hdr = read_header(image)
    errors = []
    if hdr.payload_offset and hdr.payload_length:
        blob = image[hdr.payload_offset:hdr.payload_offset + hdr.payload_length]
        for kind, magic in MAGICS:
            if blob.startswith(magic):
                try:
                    data = _decompress(kind, blob)
                    info = _check(data)
                    return Vmlinux(data, kind, "boot-header", info.pvh_entry())
                except (elf.ElfError, lzma.LZMAError, zlib.error, OSError, ValueError, EOFError) as exc:
                    errors.append(f"{kind} at header offset: {exc}")
    for kind, magic in MAGICS:  # the extract-vmlinux way
        for m in re.finditer(re.escape(magic), image):
            try:
                data = _decompress(kind, image[m.start():])
                info = _check(data)
                return Vmlinux(data, kind, "magic-scan", info.pvh_entry())
            except (elf.ElfError, lzma.LZMAError, zlib.error, OSError, ValueError, EOFError, struct.error, IndexError) as exc:
                errors.append(f"{kind}@{m.start()}: {exc}")
                continue
    raise BuildError("could not recover vmlinux from the bzImage: " + "; ".join(errors[:5]))


# ------------------------------------------------------------------ modules ---
def release_of(tree: Path) -> str:
    rels = [p.name for p in (tree / "lib/modules").iterdir() if p.is_dir()]
    if len(rels) != 1:
        raise BuildError(f"expected one kernel release in {tree}/lib/modules, found {rels}")
    return rels[0]


def depmod(base: Path, release: str) -> None:
    proc = subprocess.run(["depmod", "-b", str(base), release], capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"depmod -b {base} {release} failed: {proc.stderr.strip()}")


def prepare_full_tree(tree: Path, release: str) -> None:
    """modules.dep is not shipped in the package: generate it once for the cached tree."""
    stamp = tree / ".depmod-done"
    if not stamp.exists():
        depmod(tree, release)
        stamp.write_text("ok\n")


def resolve_modules(tree: Path, release: str, names: list[str]) -> tuple[list[str], list[str]]:
    """Module files (relative to lib/modules/<release>) needed for ``names``, dependencies
    included, in load order; and the names that are built into the kernel."""
    moddir = tree / "lib/modules" / release
    files: list[str] = []
    builtin: list[str] = []
    for name in names:
        proc = subprocess.run(["modprobe", "-d", str(tree), "-S", release, "--show-depends", name],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise BuildError(f"kernel module '{name}' not found for {release}: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            parts = line.split()
            if parts[:1] == ["builtin"]:
                builtin.append(parts[1])
            elif parts[:1] == ["insmod"]:
                rel = os.path.relpath(parts[1], moddir)
                if rel.startswith(".."):
                    raise BuildError(f"modprobe returned a module outside {moddir}: {parts[1]}")
                if rel not in files:
                    files.append(rel)
    return files, sorted(set(builtin))


MODULE_METADATA = ("modules.builtin", "modules.builtin.modinfo", "modules.order")


def stage_modules(tree: Path, release: str, files: list[str], extra: dict[str, Path], dest: Path) -> list[str]:
    """Copy the selected modules (+ ``extra`` {relpath: .ko}) into ``dest`` and run depmod there.

    Returns the list of generated/copied paths relative to ``dest``."""
    moddir = tree / "lib/modules" / release
    out = dest / "lib/modules" / release
    shutil.rmtree(dest / "lib", ignore_errors=True)
    out.mkdir(parents=True)
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(moddir / rel, out / rel)
    for rel, src in extra.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / rel)
    for meta in MODULE_METADATA:
        if (moddir / meta).exists():
            shutil.copy2(moddir / meta, out / meta)
    if (moddir / "modules.order").exists():  # only the modules we ship, in the kernel's order
        keep = set(files)
        lines = [ln for ln in (moddir / "modules.order").read_text().splitlines() if ln in keep]
        (out / "modules.order").write_text("".join(ln + "\n" for ln in lines))
    depmod(dest, release)
    return sorted(str(p.relative_to(dest)) for p in out.rglob("*") if p.is_file())
