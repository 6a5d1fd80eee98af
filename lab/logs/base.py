"""What every log parser shares: reading a file safely, line by line, and counting.

A log may come from anyone (a field failure, a colleague's HLK machine, a bug report),
so it is read as hostile input: regular files only, a size cap, lines capped in
length, decoded by BOM (Windows PowerShell 5.1's ``>`` writes UTF-16LE) with a
counted fallback, and streamed so memory stays bounded whatever the file's size.

The contract of a parser (``LogParser``): it turns every input unit (a line, or a
record for binary formats) into one of three outcomes, and says which to the
``Tally``: part of an event (``tally.used``), recognised but carrying nothing
(``tally.skipped``: blank lines, file banners, separators), or not understood
(``tally.unknown``). ``lines == used + skipped + not_understood`` holds for every
parser and every input, and the tests assert it. Nothing is dropped silently.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from lab.errors import ConfigError
from lab.events import Event

#: the largest log ``inspect`` reads (a 100 MB setupapi.dev.log is normal on a build box)
MAX_FILE_BYTES = 2 * 1024 * 1024 * 1024
#: longer lines are cut here (and counted): no parser ever sees an unbounded line
MAX_LINE_CHARS = 16 * 1024
#: how much of a file format detection looks at
HEAD_BYTES = 64 * 1024
#: not-understood lines kept as examples per file
SAMPLE_LINES = 5
#: structural problems kept per file (the rest are counted)
MAX_PROBLEMS = 50
_CHUNK = 1 << 20


class LogFormatError(ConfigError):
    """A log could not be read at all: not a regular file, too big, not this format.

    The message names the file (and line, where there is one) but never quotes its
    content: a log may hold secrets, and an error message travels further than a report.
    """


@dataclass
class Tally:
    """Per-file accounting: what was read, used, skipped and not understood."""

    path: str
    format: str
    lines: int = 0
    used: int = 0
    skipped: int = 0
    not_understood: int = 0
    events: int = 0
    cut_lines: int = 0
    decode_errors: int = 0
    samples: list[tuple[int, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problems_dropped: int = 0
    encoding: str = "utf-8"
    #: the events' clock: "utc" (absolute), "local" (absolute, the machine's zone),
    #: "boot" (seconds since boot), "none" (ordered, untimed)
    clock: str = "none"

    def used_line(self, n: int = 1) -> None:
        self.used += n

    def skip(self, n: int = 1) -> None:
        self.skipped += n

    def unknown(self, lineno: int, text: str) -> None:
        self.not_understood += 1
        if len(self.samples) < SAMPLE_LINES:
            self.samples.append((lineno, text[:200]))

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self.problems_dropped += 1

    @property
    def balanced(self) -> bool:
        return self.lines == self.used + self.skipped + self.not_understood

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "lines": self.lines,
                "used": self.used, "skipped": self.skipped,
                "not_understood": self.not_understood, "events": self.events,
                "cut_lines": self.cut_lines, "decode_errors": self.decode_errors,
                "samples": [{"line": n, "text": t} for n, t in self.samples],
                "problems": list(self.problems), "problems_dropped": self.problems_dropped,
                "encoding": self.encoding, "clock": self.clock}


class LogInput:
    """One input file: checked once, then read as text lines (or raw bytes).

    ``lines()`` yields ``(line number, text)`` with the line end (LF, CRLF or CR)
    removed, each line at most ``MAX_LINE_CHARS``; it may be called again (each call
    reads the file anew), so a parser can make two passes without holding the file.
    """

    def __init__(self, path: str | os.PathLike[str], *, display: str | None = None,
                 max_bytes: int = MAX_FILE_BYTES) -> None:
        self.path = Path(path)
        self.display = display or str(path)
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise LogFormatError(f"{self.display}: cannot read ({exc.strerror})") from None
        if not stat.S_ISREG(st.st_mode):
            raise LogFormatError(f"{self.display}: not a regular file (logs are read only "
                                 "from regular files)")
        if st.st_size > max_bytes:
            raise LogFormatError(f"{self.display}: {st.st_size} bytes is more than the "
                                 f"{max_bytes} bytes a log may have")
        self.size = st.st_size
        self._head: bytes | None = None
        self.encoding = "utf-8"

    @property
    def head_bytes(self) -> bytes:
        if self._head is None:
            with self._open() as f:
                self._head = f.read(HEAD_BYTES)
            self.encoding = sniff_encoding(self._head)
        return self._head

    @property
    def head(self) -> str:
        """The first ``HEAD_BYTES`` decoded (for format detection)."""
        raw = self.head_bytes
        enc = self.encoding
        dec = codecs.getincrementaldecoder(_codec(enc))("replace")
        return dec.decode(raw, final=False)

    def is_binary(self) -> bool:
        raw = self.head_bytes
        return self.encoding == "utf-8" and b"\x00" in raw[:4096]

    def _open(self) -> Any:
        try:
            # O_NONBLOCK: a FIFO swapped in after the stat check cannot block the open
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            raise LogFormatError(f"{self.display}: cannot read ({exc.strerror})") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LogFormatError(f"{self.display}: not a regular file")
        return os.fdopen(fd, "rb")

    def chunks(self) -> Iterator[bytes]:
        with self._open() as f:
            while True:
                b = f.read(_CHUNK)
                if not b:
                    return
                yield b

    def lines(self, tally: Tally | None = None) -> Iterator[tuple[int, str]]:
        _ = self.head_bytes          # settles the encoding
        if tally is not None:
            tally.encoding = self.encoding
        yield from iter_lines(self.chunks(), self.encoding, tally)


def sniff_encoding(head: bytes) -> str:
    """By BOM; UTF-16 without BOM when every other byte of ASCII text is NUL."""
    if head.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    if head.startswith(codecs.BOM_UTF16_LE):
        return "utf-16-le-bom"
    if head.startswith(codecs.BOM_UTF16_BE):
        return "utf-16-be-bom"
    sample = head[:512]
    if len(sample) >= 8 and sample[1::2].count(0) > len(sample) // 2 * 0.9 and sample[0::2].count(0) == 0:
        return "utf-16-le"
    return "utf-8"


def _codec(enc: str) -> str:
    return {"utf-16-le-bom": "utf-16", "utf-16-be-bom": "utf-16"}.get(enc, enc)


def iter_lines(chunks: Iterator[bytes] | list[bytes], encoding: str = "utf-8",
               tally: Tally | None = None) -> Iterator[tuple[int, str]]:
    """Decode a byte stream and split it into numbered lines, in bounded memory.

    Undecodable UTF-8 is read as cp1252 line by line (SetupAPI writes the machine's
    ANSI code page), and counted in ``tally.decode_errors``. A line longer than
    ``MAX_LINE_CHARS`` is cut there (the rest of it is skipped) and counted.
    """
    utf8 = encoding in ("utf-8", "utf-8-sig")
    dec = None if utf8 else codecs.getincrementaldecoder(_codec(encoding))("replace")
    buf: Any = b"" if utf8 else ""
    lineno = 0
    first = True
    for chunk in chunks:
        if utf8:
            if first and encoding == "utf-8-sig" and chunk.startswith(codecs.BOM_UTF8):
                chunk = chunk[3:]
            first = False
            data: Any = buf + chunk
            parts = data.split(b"\n")
        else:
            assert dec is not None
            data = buf + dec.decode(chunk)
            parts = data.split("\n")
        buf = parts.pop()
        if len(buf) > MAX_LINE_CHARS * 4:
            # a line with no end in sight: keep its start, drop the rest as it comes
            parts.append(buf[:MAX_LINE_CHARS * 4])
            buf = buf[:0]
            if tally is not None:
                tally.cut_lines += 1
        for p in parts:
            lineno += 1
            if tally is not None:
                tally.lines = lineno
            yield lineno, _finish(p, utf8, tally)
    if dec is not None:
        buf = buf + dec.decode(b"", final=True)
    if buf:
        lineno += 1
        if tally is not None:
            tally.lines = lineno
        yield lineno, _finish(buf, utf8, tally)


def _finish(p: Any, utf8: bool, tally: Tally | None) -> str:
    if utf8:
        try:
            text = p.decode("utf-8")
        except UnicodeDecodeError:
            text = p.decode("cp1252", "replace")
            if tally is not None:
                tally.decode_errors += 1
    else:
        text = p
    if text.endswith("\r"):
        text = text[:-1]
    if len(text) > MAX_LINE_CHARS:
        text = text[:MAX_LINE_CHARS]
        if tally is not None:
            tally.cut_lines += 1
    return text


@runtime_checkable
class LogParser(Protocol):
    """One input format. ``sniff`` scores the file's head (0 = not this format,
    100 = certain); ``parse`` streams events and accounts for every line in ``tally``.

    Events carry ``data["at"] = "FILE:LINE"`` so a reader can find the evidence, and
    ``t_host_ns`` is the log's own time (or, for untimed lines, that of the line before
    them, flagged ``untimed``), so one timeline orders them.
    """

    name: str
    description: str

    def sniff(self, inp: LogInput) -> int: ...

    def parse(self, inp: LogInput, tally: Tally) -> Iterator[Event]: ...
