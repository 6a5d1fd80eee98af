"""Reading files someone else may have written: scenarios, topologies, run.json,
timelines. Regular files only (a FIFO would hang the lab, /dev/zero exhaust it), a
size cap checked before reading, strict UTF-8; every failure names the file and never
quotes its content. Logs for ``inspect`` have their own streaming reader
(lab.logs.base.LogInput) under the same rules.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from vdevice.errors import SpecError

#: a scenario or topology (YAML): generous for hand-written files
MAX_SPEC_BYTES = 1024 * 1024
#: run.json, summary.json, rules.json
MAX_JSON_BYTES = 64 * 1024 * 1024


def read_bytes(path: str | os.PathLike[str], what: str, max_bytes: int) -> bytes:
    p = Path(path)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise SpecError(f"{what} not found: {p}", file=str(p)) from None
    except OSError as exc:
        raise SpecError(f"cannot read {what} ({exc.strerror})", file=str(p)) from None
    # fstat before fdopen: fdopen itself refuses a directory with IsADirectoryError
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise SpecError(f"{what} is {kind}", file=str(p))
    with os.fdopen(fd, "rb") as f:
        if st.st_size > max_bytes:
            raise SpecError(f"{what} has {st.st_size} bytes, more than the {max_bytes} it may "
                            "have", file=str(p))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:           # it grew while we looked
        raise SpecError(f"{what} has more than the {max_bytes} bytes it may have", file=str(p))
    return data


def read_text(path: str | os.PathLike[str], what: str,
              max_bytes: int = MAX_SPEC_BYTES) -> str:
    data = read_bytes(path, what, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{what} is not UTF-8 text (byte {exc.start})", file=str(path)) from None


def read_json(path: str | os.PathLike[str], what: str,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    text = read_text(path, what, max_bytes)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        where = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise SpecError(f"{what} is not valid JSON{where}", file=str(path)) from None
