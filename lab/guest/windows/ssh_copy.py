"""Byte-exact file copy to and from a Windows guest over its OpenSSH server.

Why not ``cat``: the POSIX agent copies with ``cat > file`` on an exec channel, but on
Windows the command runs in PowerShell, where ``cat`` is an alias of Get-Content: it
reads *text* (decodes, splits lines, re-encodes), so CR LF, NUL and non-UTF-8 bytes do
not survive (issue 10, point 6).

How, in order:

1. SFTP. Windows' OpenSSH server ships ``sftp-server.exe`` and its default
   ``sshd_config`` enables it (``Subsystem sftp sftp-server.exe``;
   learn.microsoft.com/windows-server/administration/openssh/openssh-server-configuration),
   and SFTP moves bytes. Paths: Win32-OpenSSH names a drive path ``/C:/dir/file``
   (its SFTP server answers REALPATH with ``/C:/Users/...``: github.com/PowerShell/
   Win32-OpenSSH issues 62 and 476), so ``C:\\dir\\file`` is sent as ``/C:/dir/file``.
   Uploads go to ``<path>.rebalab-part``, are checked by size, then renamed into place
   (``posix-rename@openssh.com`` when offered, else remove + rename), so an interrupted
   copy never leaves a plausible file.
2. Base64 chunks through PowerShell (the WinRM agent's method, the same templates from
   ``lab.agent.powershell``), when the guest offers no SFTP subsystem (an admin removed
   it): every chunk is a parameter literal of a fixed script, the result is checked by
   SHA-256 in the guest before it is moved into place. Chunks are sized for cmd.exe's
   8191-character command line (Windows OpenSSH's default shell).
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from lab.agent.base import Agent
from lab.agent.powershell import (
    FILE_GET_CHUNK,
    FILE_HASH_PREFIX,
    FILE_PUT_BEGIN,
    FILE_PUT_CHUNK,
    FILE_PUT_COMMIT,
    build_script,
    decode_structured,
    structured_script,
)
from lab.errors import AgentError

#: cmd.exe's command-line maximum: Windows OpenSSH runs commands through cmd by default
CMD_EXE_LIMIT = 8_191
PART_SUFFIX = ".rebalab-part"
_DRIVE_PATH = re.compile(r"^[A-Za-z]:[\\/]")


def sftp_path(remote: str) -> str:
    """``C:\\dir\\file`` as Win32-OpenSSH's SFTP server names it: ``/C:/dir/file``."""
    if not _DRIVE_PATH.match(remote):
        raise AgentError(f"guest path {remote!r} is not an absolute drive-letter path (C:\\...)")
    return "/" + remote.replace("\\", "/")


# ------------------------------------------------------------------ SFTP

def open_sftp(transport: paramiko.Transport, timeout: float) -> paramiko.SFTPClient | None:
    """An SFTP session, or None when the server refuses the ``sftp`` subsystem.

    Only the subsystem request's refusal means "no SFTP here"; a connection that fails
    before or after it raises (the caller must not fall back on a dead connection).
    """
    chan = transport.open_session(timeout=timeout)
    chan.settimeout(timeout)
    try:
        chan.invoke_subsystem("sftp")
    except paramiko.SSHException:
        chan.close()
        if not transport.is_active():
            raise
        return None
    return paramiko.SFTPClient(chan)


def _mkdirs(sftp: paramiko.SFTPClient, path: str) -> None:
    """Create the parent directories of ``path`` (SFTP form) that do not exist."""
    parts = path.split("/")[1:-1]        # ['C:', 'dir', ...]
    cur = ""
    for i, part in enumerate(parts):
        cur += "/" + part
        if i == 0:
            continue                     # the drive itself
        try:
            st = sftp.stat(cur)
            if st.st_mode is not None and not stat.S_ISDIR(st.st_mode):
                raise AgentError(f"guest path {cur} exists and is not a directory")
        except FileNotFoundError:
            sftp.mkdir(cur)


def sftp_put(sftp: paramiko.SFTPClient, data: bytes, remote: str) -> None:
    path = sftp_path(remote)
    part = path + PART_SUFFIX
    _mkdirs(sftp, path)
    sftp.putfo(io.BytesIO(data), part, file_size=len(data), confirm=True)
    size = sftp.stat(part).st_size
    if size != len(data):
        sftp.remove(part)
        raise AgentError(f"SFTP upload to {remote} wrote {size} bytes, expected {len(data)}")
    try:
        sftp.posix_rename(part, path)
    except OSError:
        try:
            sftp.remove(path)
        except FileNotFoundError:
            pass
        sftp.rename(part, path)


def sftp_get(sftp: paramiko.SFTPClient, remote: str) -> bytes:
    buf = io.BytesIO()
    sftp.getfo(sftp_path(remote), buf)
    return buf.getvalue()


# ------------------------------------------------------------------ base64 through PowerShell

def chunk_size(part: str, limit: int = CMD_EXE_LIMIT) -> int:
    """Raw bytes per chunk so that the encoded command stays inside ``limit`` characters.

    The chunk is base64 in the script (x4/3), the script is UTF-16LE and base64 again in
    ``-EncodedCommand`` (x8/3); the command's fixed part and the path count too.
    """
    script = build_script(FILE_PUT_CHUNK, {"Data": "", "Part": part})
    overhead = len(script.encode("utf-16-le")) // 2
    budget = (limit - 64) * 3 // 8 - overhead - 16
    return max(0, (budget // 4) * 3)


def _hash(agent: Agent, path: str) -> dict[str, Any]:
    res = agent.run(structured_script(FILE_HASH_PREFIX, {"Path": path, "Length": -1})).check()
    got = decode_structured(res.stdout)
    if not got or not isinstance(got[0], dict):
        raise AgentError(f"the guest returned no size and hash for {path}")
    return got[0]


def base64_put(agent: Agent, data: bytes, remote: str, limit: int = CMD_EXE_LIMIT) -> None:
    part = remote + PART_SUFFIX
    size = chunk_size(part, limit)
    if size < 48:
        raise AgentError(f"guest path too long to upload to through PowerShell: {remote!r}")
    agent.run(build_script(FILE_PUT_BEGIN, {"Path": remote, "Part": part})).check()
    for off in range(0, len(data), size):
        chunk = base64.b64encode(data[off:off + size]).decode("ascii")
        agent.run(build_script(FILE_PUT_CHUNK, {"Part": part, "Data": chunk})).check()
    want = hashlib.sha256(data).hexdigest().upper()
    got = _hash(agent, part)
    if str(got.get("Sha256", "")).upper() != want or int(got.get("Length", -1)) != len(data):
        raise AgentError(f"upload to {remote} failed verification: the guest has {got}, expected "
                         f"{len(data)} bytes sha256 {want}")
    agent.run(build_script(FILE_PUT_COMMIT, {"Part": part, "Path": remote})).check()


def base64_get(agent: Agent, remote: str, limit: int = CMD_EXE_LIMIT) -> bytes:
    info = _hash(agent, remote)
    length, want = int(info["Length"]), str(info["Sha256"]).upper()
    # the reply is not bound by the command line; keep each one moderate all the same
    step = 256 * 1024
    out = bytearray()
    while len(out) < length:
        n = min(step, length - len(out))
        res = agent.run(build_script(FILE_GET_CHUNK, {"Path": remote, "Offset": len(out), "Count": n})).check()
        try:
            piece = base64.b64decode(res.stdout.strip(), validate=True)
        except ValueError:
            raise AgentError(f"download of {remote}: chunk at {len(out)} is not valid base64") from None
        if not piece:
            raise AgentError(f"download of {remote}: file shrank below {length} bytes at {len(out)}")
        out += piece
    if hashlib.sha256(out[:length]).hexdigest().upper() != want:
        raise AgentError(f"download of {remote} failed verification (sha256 differs from the guest's)")
    return bytes(out[:length])


# ------------------------------------------------------------------ the agent's entry points

def windows_put(transport: Callable[[], paramiko.Transport], agent: Agent, local: Path, remote: str, *,
                timeout: float = 120.0, log: Callable[[str], None] | None = None) -> str:
    """Copy ``local`` to the guest's ``remote``; returns the method used (``sftp``/``base64``)."""
    data = Path(local).read_bytes()
    sftp = open_sftp(transport(), timeout)
    if sftp is not None:
        with sftp:
            sftp_put(sftp, data, remote)
        return "sftp"
    if log is not None:
        log(f"ssh: the guest offers no SFTP subsystem; copying {local} in base64 chunks through PowerShell")
    base64_put(agent, data, remote)
    return "base64"


def windows_get(transport: Callable[[], paramiko.Transport], agent: Agent, remote: str, local: Path, *,
                timeout: float = 120.0, log: Callable[[str], None] | None = None) -> str:
    """Copy the guest's ``remote`` to ``local``; returns the method used."""
    sftp = open_sftp(transport(), timeout)
    if sftp is not None:
        with sftp:
            data = sftp_get(sftp, remote)
        method = "sftp"
    else:
        if log is not None:
            log(f"ssh: the guest offers no SFTP subsystem; copying {remote} in base64 chunks through PowerShell")
        data = base64_get(agent, remote)
        method = "base64"
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(local).with_name(Path(local).name + ".part")
    tmp.write_bytes(data)
    tmp.replace(local)
    return method
