"""An in-memory file tree written out as a reproducible newc cpio archive.

Entries are owned by root, carry a fixed mtime and are written parents first in
sorted order, so the same inputs give the same bytes.  Device nodes can be added
without privileges (the kernel's initramfs unpacker creates them).
"""

from __future__ import annotations

import gzip
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from . import BuildError


@dataclass(frozen=True)
class Entry:
    path: str  # absolute guest path, e.g. "/bin/busybox"
    mode: int  # full st_mode (type bits | permissions)
    source: Path | None = None  # regular file: host file to copy
    data: bytes | None = None  # regular file: literal content
    target: str | None = None  # symlink target
    rdev: tuple[int, int] = (0, 0)  # device nodes: (major, minor)
    origin: str = ""  # who added it (package name, "overlay", "generated"), for listings

    def size(self) -> int:
        if stat.S_ISREG(self.mode):
            return len(self.data) if self.data is not None else os.path.getsize(self.source)  # type: ignore[arg-type]
        if stat.S_ISLNK(self.mode):
            return len(self.target.encode())  # type: ignore[union-attr]
        return 0

    def content(self) -> bytes:
        if stat.S_ISREG(self.mode):
            return self.data if self.data is not None else Path(self.source).read_bytes()  # type: ignore[arg-type]
        if stat.S_ISLNK(self.mode):
            return self.target.encode()  # type: ignore[union-attr]
        return b""


def _norm(path: str) -> str:
    p = PurePosixPath("/") / path
    parts = [x for x in p.parts[1:] if x not in ("", ".")]
    if ".." in parts:
        raise BuildError(f"guest path may not contain '..': {path}")
    return "/" + "/".join(parts)


class Tree:
    """The guest root file system, built up before being archived."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {"/": Entry("/", stat.S_IFDIR | 0o755, origin="generated")}

    # -- adding -------------------------------------------------------------
    def _put(self, entry: Entry, replace: bool) -> None:
        path = entry.path
        parent = str(PurePosixPath(path).parent)
        if path != "/" and parent not in self.entries:
            self.mkdir(parent, origin=entry.origin)
        old = self.entries.get(path)
        if old is not None and not replace:
            if stat.S_ISDIR(old.mode) and stat.S_ISDIR(entry.mode):
                return
            if old.mode == entry.mode and old.content() == entry.content():
                return
            raise BuildError(f"{path}: added twice with different content ({old.origin} and {entry.origin})")
        if old is not None and stat.S_ISDIR(old.mode) and not stat.S_ISDIR(entry.mode):
            raise BuildError(f"{path}: cannot replace a directory with a non-directory")
        self.entries[path] = entry

    def mkdir(self, path: str, mode: int = 0o755, origin: str = "generated", replace: bool = False) -> None:
        self._put(Entry(_norm(path), stat.S_IFDIR | mode, origin=origin), replace)

    def add_file(self, path: str, source: Path | bytes | str, mode: int = 0o644,
                 origin: str = "generated", replace: bool = False) -> None:
        if isinstance(source, str):
            source = source.encode()
        if isinstance(source, bytes):
            e = Entry(_norm(path), stat.S_IFREG | mode, data=source, origin=origin)
        else:
            e = Entry(_norm(path), stat.S_IFREG | mode, source=Path(source), origin=origin)
        self._put(e, replace)

    def add_symlink(self, path: str, target: str, origin: str = "generated", replace: bool = False) -> None:
        self._put(Entry(_norm(path), stat.S_IFLNK | 0o777, target=target, origin=origin), replace)

    def add_node(self, path: str, kind: str, major: int, minor: int, mode: int = 0o600,
                 origin: str = "generated") -> None:
        fmt = {"c": stat.S_IFCHR, "b": stat.S_IFBLK}[kind]
        self._put(Entry(_norm(path), fmt | mode, rdev=(major, minor), origin=origin), replace=True)

    def add_host_path(self, host: Path, guest: str, origin: str, replace: bool = False) -> None:
        """Copy a host file, symlink or directory tree, keeping permission bits and symlinks."""
        st = os.lstat(host)
        if stat.S_ISLNK(st.st_mode):
            self.add_symlink(guest, os.readlink(host), origin=origin, replace=replace)
        elif stat.S_ISDIR(st.st_mode):
            self.mkdir(guest, stat.S_IMODE(st.st_mode), origin=origin, replace=replace)
            for child in sorted(os.listdir(host)):
                self.add_host_path(host / child, f"{guest}/{child}", origin, replace)
        elif stat.S_ISREG(st.st_mode):
            self.add_file(guest, host, stat.S_IMODE(st.st_mode), origin=origin, replace=replace)
        else:
            raise BuildError(f"{host}: unsupported file type")

    # -- querying -----------------------------------------------------------
    def __contains__(self, path: str) -> bool:
        return _norm(path) in self.entries

    def get(self, path: str) -> Entry | None:
        return self.entries.get(_norm(path))

    def sorted_entries(self) -> list[Entry]:
        return sorted(self.entries.values(), key=lambda e: PurePosixPath(e.path).parts)

    def total_size(self) -> int:
        return sum(e.size() for e in self.entries.values())

    # -- writing ------------------------------------------------------------
    def write_newc(self, out: BinaryIO, mtime: int = 0) -> None:
        ino = 1
        for e in self.sorted_entries():
            name = "." if e.path == "/" else e.path[1:]
            data = e.content()
            _write_record(out, name, ino, e.mode, 2 if stat.S_ISDIR(e.mode) else 1, mtime, data, e.rdev)
            ino += 1
        _write_record(out, "TRAILER!!!", 0, 0, 1, 0, b"", (0, 0))

    def write_gzip(self, path: Path, mtime: int = 0, level: int = 6, mode: int = 0o644) -> None:
        """Write ``path`` atomically as a gzip-compressed newc archive with permissions ``mode``."""
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=mtime) as gz:
                self.write_newc(gz, mtime)  # type: ignore[arg-type]
        os.chmod(tmp, mode)
        os.replace(tmp, path)

    def listing(self) -> Iterator[str]:
        for e in self.sorted_entries():
            kind = stat.filemode(e.mode)
            extra = f" -> {e.target}" if e.target else ""
            yield f"{kind} {e.size():>9} {e.path}{extra}  [{e.origin}]"


def _write_record(out: BinaryIO, name: str, ino: int, mode: int, nlink: int, mtime: int,
                  data: bytes, rdev: tuple[int, int]) -> None:
    bname = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, mtime, len(data), 0, 0, rdev[0], rdev[1], len(bname), 0)
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.write(header + bname)
    out.write(b"\0" * (-(len(header) + len(bname)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def read_newc(blob: bytes) -> Iterator[tuple[str, int, bytes, tuple[int, int]]]:
    """Parse a newc archive (used by tests and the build's self-check): (name, mode, data, rdev)."""
    pos = 0
    while True:
        if blob[pos:pos + 6] != b"070701":
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(blob[pos + 6 + 8 * i: pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        pos += 110
        name = blob[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += -pos % 4
        data = blob[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return
        yield name, f[1], data, (f[9], f[10])
