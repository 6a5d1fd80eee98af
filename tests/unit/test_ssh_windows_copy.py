"""File copy over the Windows SSH agent is byte-exact (issue 10, point 6).

The agent under test is the real ``PowerShellSshAgent`` (paramiko client, pinned host
key, key authentication) talking to a real paramiko SSH server on 127.0.0.1: paramiko's
own ``SFTPServer`` serves the ``sftp`` subsystem over a local directory (through an
``SFTPServerInterface`` implementation, the way paramiko's documentation says a server
provides one), so the SFTP protocol on both ends is paramiko's, not ours. Without the
subsystem the agent must fall back to base64 chunks through PowerShell: the server's
exec handler decodes each ``-EncodedCommand`` and plays the lab's fixed file templates
on the same directory (no PowerShell here: that part is an emulation of our own
templates, as in test_winrm_agent.py).

Windows paths map to the directory as Win32-OpenSSH's SFTP server names them:
``C:\\a\\b`` is ``/C:/a/b`` is ``<root>/C/a/b``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, OPEN_SUCCEEDED
from paramiko.sftp import SFTP_FAILURE, SFTP_OK, SFTP_OP_UNSUPPORTED

from lab.agent.powershell import FILE_PUT_CHUNK, decode_encoded_command, script_params
from lab.errors import AgentError
from lab.guest import PowerShellSshAgent
from lab.guest.windows import ssh_copy
from lab.guest.windows.scripted_agent import structured_stdout

# all 256 byte values, CR LF and lone LF and CR, runs of NUL, and a UTF-16 BOM: what a
# text pipeline (Get-Content / Set-Content) would change
PAYLOAD = (bytes(range(256)) * 3 + b"line1\r\nline2\nline3\rend\r\n" + b"\x00" * 17
           + b"\xff\xfe" + "päss€\r\n".encode("utf-16-le")
           + b"".join(hashlib.sha256(bytes([i])).digest() for i in range(256)))


def _real(root: Path, path: str) -> Path:
    """``/C:/a/b`` (SFTP) or ``C:\\a\\b`` (PowerShell) -> ``root/C/a/b``."""
    m = re.match(r"^/?([A-Za-z]):[\\/](.*)$", path)
    if not m:
        raise OSError(2, f"not a drive path: {path}")
    rest = [p for p in re.split(r"[\\/]", m[2]) if p]
    if any(p == ".." for p in rest):
        raise OSError(13, "no ..")
    return root.joinpath(m[1].upper(), *rest)


class LocalSftp(paramiko.SFTPServerInterface):
    """paramiko's SFTPServerInterface over a local directory, Windows path names."""

    def __init__(self, server: Any, *args: Any, root: Path, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.root = root

    def _p(self, path: str) -> Path:
        return _real(self.root, path)

    def canonicalize(self, path: str) -> str:
        return path if path.startswith("/") else "/C:/Users/rebalab/" + path

    def open(self, path: str, flags: int, attr: Any) -> Any:
        try:
            fd = os.open(self._p(path), flags, 0o644)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or 0)
        if flags & os.O_WRONLY:
            mode = "ab" if flags & os.O_APPEND else "wb"
        elif flags & os.O_RDWR:
            mode = "a+b" if flags & os.O_APPEND else "r+b"
        else:
            mode = "rb"
        f = os.fdopen(fd, mode)
        handle = paramiko.SFTPHandle(flags)
        handle.filename = str(self._p(path))  # type: ignore[attr-defined]
        handle.readfile = f  # type: ignore[attr-defined]
        handle.writefile = f  # type: ignore[attr-defined]
        return handle

    def stat(self, path: str) -> Any:
        try:
            return paramiko.SFTPAttributes.from_stat(os.stat(self._p(path)))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or 0)

    lstat = stat

    def remove(self, path: str) -> int:
        try:
            os.remove(self._p(path))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or 0)
        return SFTP_OK

    def rename(self, oldpath: str, newpath: str) -> int:
        if self._p(newpath).exists():
            return SFTP_FAILURE          # SFTP v3 rename does not overwrite
        os.rename(self._p(oldpath), self._p(newpath))
        return SFTP_OK

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        if not self.posix_rename_ok:
            return SFTP_OP_UNSUPPORTED
        os.replace(self._p(oldpath), self._p(newpath))
        return SFTP_OK

    posix_rename_ok = True

    def mkdir(self, path: str, attr: Any) -> int:
        try:
            os.mkdir(self._p(path))
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or 0)
        return SFTP_OK


def _int_params(script: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^    ([A-Za-z_]\w*) = (-?\d+)$", script, re.M)}


class Guest(paramiko.ServerInterface):
    """sshd of the 'guest': key auth for the lab's key; exec runs emulated PowerShell."""

    def __init__(self, root: Path, client_key: paramiko.PKey) -> None:
        self.root = root
        self.client_key = client_key
        self.commands: list[str] = []

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "rebalab" and key.get_base64() == self.client_key.get_base64()
        return AUTH_SUCCESSFUL if ok else AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_SUCCEEDED if kind == "session" else \
            OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        text = command.decode("utf-8")
        self.commands.append(text)
        threading.Thread(target=self._exec, args=(channel, text), daemon=True).start()
        return True

    def _exec(self, channel: paramiko.Channel, cmdline: str) -> None:
        try:
            code, out = self._powershell(decode_encoded_command(cmdline))
        except Exception as exc:  # what the test must see as a failed command
            code, out = 1, f"emulation: {exc}"
        channel.sendall(out.encode("utf-8"))
        channel.send_exit_status(code)
        channel.close()

    def _powershell(self, script: str) -> tuple[int, str]:
        p: dict[str, Any] = {**script_params(script), **_int_params(script)}
        if "OSVersion" in script:
            return 0, "10.0.22631.0\r\n"
        if "[IO.File]::WriteAllBytes($p.Part" in script:
            part = _real(self.root, p["Part"])
            part.parent.mkdir(parents=True, exist_ok=True)
            part.write_bytes(b"")
            return 0, ""
        if "FromBase64String($p.Data)" in script:
            with open(_real(self.root, p["Part"]), "ab") as f:
                f.write(base64.b64decode(p["Data"], validate=True))
            return 0, ""
        if "SHA256]::Create()" in script:
            data = _real(self.root, p["Path"]).read_bytes()
            if p["Length"] >= 0:
                data = data[:p["Length"]]
            return 0, structured_stdout([{"Length": len(data),
                                          "Sha256": hashlib.sha256(data).hexdigest().upper()}])
        if "Move-Item -LiteralPath $p.Part" in script:
            os.replace(_real(self.root, p["Part"]), _real(self.root, p["Path"]))
            return 0, ""
        if "ToBase64String($buf, 0, $n)" in script:
            data = _real(self.root, p["Path"]).read_bytes()[p["Offset"]:p["Offset"] + p["Count"]]
            return 0, base64.b64encode(data).decode("ascii") + "\r\n"
        return 1, "the emulated guest does not know this script"


class SshdFixture:
    def __init__(self, tmp: Path, *, sftp: bool) -> None:
        self.root = tmp / "guest"
        (self.root / "C").mkdir(parents=True)          # the guest's drive C:
        self.host_key = paramiko.RSAKey.generate(1024)
        self.client_key = paramiko.RSAKey.generate(1024)
        self.key_path = tmp / "id_rsa"
        self.client_key.write_private_key_file(str(self.key_path))
        self.guest = Guest(self.root, self.client_key)
        self.sftp = sftp
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.listener.accept()
            except (socket.timeout, OSError):
                continue
            t = paramiko.Transport(sock)
            t.add_server_key(self.host_key)
            if self.sftp:
                t.set_subsystem_handler("sftp", paramiko.SFTPServer, LocalSftp, root=self.root)
            t.start_server(server=self.guest)
            self.transports.append(t)

    def agent(self, log: list[str]) -> PowerShellSshAgent:
        a = PowerShellSshAgent("127.0.0.1", self.port, "rebalab", self.key_path,
                               f"ssh-rsa {self.host_key.get_base64()}", log=log.append)
        a.wait_ready(10)
        return a

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        for t in self.transports:
            t.close()
        self.listener.close()


@pytest.fixture(params=[True, False], ids=["sftp", "no-sftp"])
def sshd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SshdFixture]:
    s = SshdFixture(tmp_path, sftp=request.param)
    yield s
    s.close()


def test_put_and_get_are_byte_exact(sshd: SshdFixture, tmp_path: Path) -> None:
    log: list[str] = []
    agent = sshd.agent(log)
    try:
        src = tmp_path / "payload.bin"
        src.write_bytes(PAYLOAD)
        agent.put(src, r"C:\rebalab\in put\payload.bin")
        landed = sshd.root / "C" / "rebalab" / "in put" / "payload.bin"
        assert landed.read_bytes() == PAYLOAD
        assert not list(landed.parent.glob("*.rebalab-part"))
        # overwrite with other bytes: replaced, not appended
        src.write_bytes(PAYLOAD[::-1])
        agent.put(src, r"C:\rebalab\in put\payload.bin")
        assert landed.read_bytes() == PAYLOAD[::-1]
        back = tmp_path / "back" / "payload.bin"
        agent.get(r"C:\rebalab\in put\payload.bin", back)
        assert back.read_bytes() == PAYLOAD[::-1]
    finally:
        agent.close()
    scripts = [decode_encoded_command(c) for c in sshd.guest.commands]
    # never the text pipeline (PowerShell's cat is Get-Content)
    assert not any(re.search(r"\b(cat|Get-Content|Set-Content|Out-File)\b", s) for s in scripts)
    if sshd.sftp:
        assert all("OSVersion" in s for s in scripts), "with SFTP no PowerShell copy runs"
    else:
        assert any("no SFTP subsystem" in ln for ln in log)
        chunks = [s for s in scripts if "FromBase64String($p.Data)" in s]
        assert len(chunks) >= 2, "the payload must need several chunks"
        # each command line fits cmd.exe (Windows OpenSSH's default shell)
        assert max(len(c) for c in sshd.guest.commands) <= ssh_copy.CMD_EXE_LIMIT


def test_sftp_without_posix_rename_replaces_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LocalSftp, "posix_rename_ok", False)
    s = SshdFixture(tmp_path, sftp=True)
    agent = s.agent([])
    try:
        src = tmp_path / "a.bin"
        for content in (b"first\r\n", b"\x00second"):
            src.write_bytes(content)
            agent.put(src, r"C:\x\a.bin")
            assert (s.root / "C" / "x" / "a.bin").read_bytes() == content
    finally:
        agent.close()
        s.close()


def test_sftp_path_names() -> None:
    assert ssh_copy.sftp_path(r"C:\rebalab\trace\wpp.etl") == "/C:/rebalab/trace/wpp.etl"
    assert ssh_copy.sftp_path("d:/x y/z") == "/d:/x y/z"
    with pytest.raises(AgentError, match="drive-letter"):
        ssh_copy.sftp_path(r"\\server\share\f")
    with pytest.raises(AgentError, match="drive-letter"):
        ssh_copy.sftp_path("relative\\f")


def test_chunk_size_fits_cmd_exe() -> None:
    part = "C:\\" + "p" * 200 + ".rebalab-part"
    n = ssh_copy.chunk_size(part)
    from lab.agent.powershell import POWERSHELL, build_script
    line = POWERSHELL.encode(build_script(FILE_PUT_CHUNK, {"Part": part,
                                                           "Data": base64.b64encode(b"\xff" * n).decode()}))
    assert len(line) <= ssh_copy.CMD_EXE_LIMIT
    assert n > 1000
