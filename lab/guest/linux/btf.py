"""Just enough BTF to find struct member offsets in the guest kernel.

Kprobe fetch-args in Linux 6.1 cannot name struct members, only byte offsets
(``+OFF(%di)``). The offsets of ``pci_dev.dev``, ``device.kobj`` and ``kobject.name``
change between kernel builds, so instead of hard-coding them we read the kernel's own
type information: the ``.BTF`` section of the image's vmlinux (the same data the guest
exposes as /sys/kernel/btf/vmlinux). Format: Documentation/bpf/btf.rst.
"""

from __future__ import annotations

import functools

import struct
from dataclasses import dataclass
from pathlib import Path

KIND_STRUCT, KIND_UNION = 4, 5
# extra bytes after the 12-byte btf_type header, by kind (per vlen where noted)
_FIXED = {1: 4, 3: 12, 14: 4, 17: 4}          # INT, ARRAY, VAR, DECL_TAG
_PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}   # STRUCT, UNION, ENUM, FUNC_PROTO, DATASEC, ENUM64


class BtfError(Exception):
    pass


def btf_section(vmlinux: Path) -> bytes:
    data = Path(vmlinux).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise BtfError(f"{vmlinux} is not a 64-bit ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i: int) -> tuple[int, ...]:
        return struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)

    strtab_off = sh(shstrndx)[4]
    for i in range(shnum):
        s = sh(i)
        name_end = data.index(b"\0", strtab_off + s[0])
        if data[strtab_off + s[0]:name_end] == b".BTF":
            return data[s[4]:s[4] + s[5]]
    raise BtfError(f"{vmlinux} has no .BTF section (kernel built without CONFIG_DEBUG_INFO_BTF)")


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    bit_offset: int


class Btf:
    def __init__(self, blob: bytes) -> None:
        magic, _ver, _flags, hdr_len = struct.unpack_from("<HBBI", blob, 0)
        if magic != 0xEB9F:
            raise BtfError("bad BTF magic")
        type_off, type_len, str_off, str_len = struct.unpack_from("<IIII", blob, 8)
        self._types = blob[hdr_len + type_off:hdr_len + type_off + type_len]
        self._strs = blob[hdr_len + str_off:hdr_len + str_off + str_len]
        self.structs: dict[str, list[Member]] = {}
        self._index()

    def _str(self, off: int) -> str:
        end = self._strs.index(b"\0", off)
        return self._strs[off:end].decode()

    def _index(self) -> None:
        t, pos = self._types, 0
        while pos < len(t):
            name_off, info, _size = struct.unpack_from("<III", t, pos)
            kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
            pos += 12
            if kind in (KIND_STRUCT, KIND_UNION):
                members = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", t, pos + 12 * i)
                    members.append(Member(self._str(m_name), m_type,
                                          m_off & 0xFFFFFF if kflag else m_off))
                name = self._str(name_off)
                if name and name not in self.structs:
                    self.structs[name] = members
            pos += _FIXED.get(kind, 0) + _PER_VLEN.get(kind, 0) * vlen

    def offset(self, struct_name: str, member: str) -> int:
        """Byte offset of a direct member (no nested anonymous lookup needed here)."""
        for m in self.structs.get(struct_name, ()):
            if m.name == member:
                if m.bit_offset % 8:
                    raise BtfError(f"{struct_name}.{member} is a bitfield")
                return m.bit_offset // 8
        raise BtfError(f"struct {struct_name} has no member {member!r} in this kernel's BTF")


@dataclass(frozen=True)
class DeviceNameOffsets:
    """Where the device name string pointer sits, from a ``struct device *`` and a
    ``struct pci_dev *``: ``dev_name(dev)`` is ``dev->kobj.name``."""

    device_name: int
    pci_dev_name: int

    @classmethod
    def from_vmlinux(cls, vmlinux: Path) -> DeviceNameOffsets:
        """Read from the kernel's BTF; cached per file and mtime (a 60 MiB parse that
        every iteration's tracer asks for)."""
        st = vmlinux.stat()
        return _offsets_cached(str(vmlinux), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _offsets_cached(path: str, mtime_ns: int, size: int) -> DeviceNameOffsets:
    btf = Btf(btf_section(Path(path)))
    dev_name = btf.offset("device", "kobj") + btf.offset("kobject", "name")
    return DeviceNameOffsets(dev_name, btf.offset("pci_dev", "dev") + dev_name)
