"""Minimal ELF64 little-endian reader: interpreter, DT_NEEDED, SONAME, notes.

Only what the image builder needs to copy a dynamically linked program with its
shared libraries, and to check that a decompressed kernel has a PVH entry note.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

PT_LOAD, PT_DYNAMIC, PT_INTERP, PT_NOTE = 1, 2, 3, 4
DT_NULL, DT_NEEDED, DT_STRTAB, DT_SONAME, DT_RPATH, DT_RUNPATH = 0, 1, 5, 14, 15, 29
EM_X86_64 = 62
#: Xen ELF note type carrying the 32-bit PVH entry point (XEN_ELFNOTE_PHYS32_ENTRY).
XEN_ELFNOTE_PHYS32_ENTRY = 18


class ElfError(ValueError):
    """The file is not an ELF64 little-endian image we can read."""


@dataclass(frozen=True)
class Note:
    name: str
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfInfo:
    machine: int
    elf_type: int
    interp: str | None
    needed: tuple[str, ...]
    soname: str | None
    runpath: tuple[str, ...]
    notes: tuple[Note, ...]

    @property
    def is_dynamic(self) -> bool:
        return self.interp is not None or bool(self.needed)

    def pvh_entry(self) -> int | None:
        """The PVH (Xen PHYS32_ENTRY) entry address, or None if there is no such note."""
        for note in self.notes:
            if note.name == "Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY and len(note.desc) in (4, 8):
                return int.from_bytes(note.desc, "little")
        return None


def is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def parse(data: bytes) -> ElfInfo:
    """Parse an ELF64 LE image held in memory."""
    if data[:4] != b"\x7fELF":
        raise ElfError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise ElfError("only ELF64 little-endian is supported")
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_phoff = struct.unpack_from("<Q", data, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    phdrs = []
    for i in range(e_phnum):
        phdrs.append(struct.unpack_from("<IIQQQQQQ", data, e_phoff + i * e_phentsize))
    # (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)
    loads = [p for p in phdrs if p[0] == PT_LOAD]

    def vaddr_to_offset(vaddr: int) -> int:
        for p in loads:
            if p[3] <= vaddr < p[3] + p[5]:
                return vaddr - p[3] + p[2]
        raise ElfError(f"address {vaddr:#x} is not in any PT_LOAD segment")

    interp = None
    needed: list[str] = []
    soname = None
    runpath: list[str] = []
    notes: list[Note] = []
    for p_type, _f, off, _va, _pa, filesz, _ms, align in phdrs:
        if p_type == PT_INTERP:
            interp = data[off:off + filesz].split(b"\0", 1)[0].decode()
        elif p_type == PT_NOTE:
            notes.extend(_parse_notes(data[off:off + filesz], 8 if align == 8 else 4))
        elif p_type == PT_DYNAMIC:
            entries = []
            for pos in range(off, off + filesz, 16):
                tag, val = struct.unpack_from("<qQ", data, pos)
                if tag == DT_NULL:
                    break
                entries.append((tag, val))
            strtab = next((v for t, v in entries if t == DT_STRTAB), None)
            if strtab is None:
                continue
            base = vaddr_to_offset(strtab)

            def string(o: int) -> str:
                end = data.index(b"\0", base + o)
                return data[base + o:end].decode()

            for tag, val in entries:
                if tag == DT_NEEDED:
                    needed.append(string(val))
                elif tag == DT_SONAME:
                    soname = string(val)
                elif tag in (DT_RUNPATH, DT_RPATH):
                    runpath.extend(x for x in string(val).split(":") if x)
    return ElfInfo(e_machine, e_type, interp, tuple(needed), soname, tuple(runpath), tuple(notes))


def read(path: Path) -> ElfInfo:
    return parse(Path(path).read_bytes())


def _parse_notes(blob: bytes, align: int) -> list[Note]:
    notes = []
    pos = 0

    def up(n: int) -> int:
        return (n + align - 1) & ~(align - 1)

    while pos + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, pos)
        pos += 12
        name = blob[pos:pos + namesz].rstrip(b"\0").decode(errors="replace")
        pos += up(namesz)
        desc = blob[pos:pos + descsz]
        pos += up(descsz)
        notes.append(Note(name, ntype, bytes(desc)))
    return notes
