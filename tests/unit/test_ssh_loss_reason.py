"""What the SSH agent says when a connection is lost (issue 13: it logged "()").

A real paramiko SSH server runs in this process on 127.0.0.1 (no QEMU): it serves
exec channels the way the guest's sshd does and, for one command, closes the TCP
connection while the command runs, which is what the old dropbear guest did.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from lab.agent.ssh import SshAgent, _KeepDisconnect
from lab.errors import ConnectionLost

HANG = "hang-until-the-server-goes"


def _key(path: Path) -> paramiko.Ed25519Key:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    path.write_bytes(pem)
    path.chmod(0o600)
    return paramiko.Ed25519Key.from_private_key_file(str(path))


class _Server(paramiko.ServerInterface):
    def __init__(self, client_key: paramiko.PKey, transport_box: list[paramiko.Transport]) -> None:
        self.client_key = client_key
        self.box = transport_box

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        ok = username == "root" and key.asbytes() == self.client_key.asbytes()
        return paramiko.AUTH_SUCCESSFUL if ok else paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED if kind == "session" else paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(target=self._exec, args=(channel, command.decode()), daemon=True).start()
        return True

    def _exec(self, channel: paramiko.Channel, command: str) -> None:
        channel.send_stderr(b"\x01")  # the agent's start marker: the command began
        if HANG in command:
            threading.Event().wait(0.3)
            self.box[-1].close()  # the TCP connection goes, no exit status, no disconnect message
            return
        channel.send_exit_status(0)
        channel.close()


@pytest.fixture
def server(tmp_path: Path):
    host_key = _key(tmp_path / "host")
    client_key = _key(tmp_path / "client")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    transports: list[paramiko.Transport] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (socket.timeout, OSError):
                continue
            t = paramiko.Transport(conn)
            t.add_server_key(host_key)
            transports.append(t)
            t.start_server(server=_Server(client_key, transports))

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    try:
        yield listener.getsockname()[1], tmp_path / "client", f"ssh-ed25519 {host_key.get_base64()}"
    finally:
        stop.set()
        th.join(timeout=5)
        for t in transports:
            t.close()
        listener.close()


def test_a_lost_connection_is_logged_with_its_reason_and_the_command_it_cut(server) -> None:
    port, key_path, host_line = server
    lines: list[str] = []
    agent = SshAgent("127.0.0.1", port, "root", key_path, host_line, log=lines.append)
    try:
        agent.wait_ready(10)
        with pytest.raises(ConnectionLost) as lost:
            agent.run(HANG, timeout=10)
        # the error says why: the exception type and what it means, not "()"
        assert "EOFError: the server closed the TCP connection" in str(lost.value)
        assert repr(HANG) in str(lost.value)
        # the next command reconnects, and the run log says why the old connection went
        assert agent.run("true", timeout=10).ok
        lost_lines = [ln for ln in lines if ln.startswith("ssh: connection lost")]
        assert len(lost_lines) == 1 and agent.reconnects == 1
        assert "connection lost ()" not in lost_lines[0]
        assert "EOFError: the server closed the TCP connection" in lost_lines[0]
        assert f"1 command(s) not finished on it: {HANG!r}" in lost_lines[0]
        assert "server SSH-2.0-paramiko" in lost_lines[0]
        # the new connection starts clean: its own loss would not name the old command
        t = agent._client.get_transport()  # type: ignore[union-attr]
        assert "no command running on it" in agent._loss_reason(t)
    finally:
        agent.close()


def test_only_the_disconnect_message_of_paramikos_info_lines_is_kept() -> None:
    def record(level: int, msg: str) -> logging.LogRecord:
        return logging.LogRecord("paramiko.transport", level, __file__, 1, msg, None, None)

    keep = _KeepDisconnect()
    assert keep.filter(record(logging.INFO, "Disconnect (code 11): Too many sessions"))
    assert keep.filter(record(logging.WARNING, "Socket exception: Connection reset by peer (104)"))
    assert not keep.filter(record(logging.INFO, "Authentication (publickey) successful!"))
    assert not keep.filter(record(logging.DEBUG, "Disconnect (code 2): debug copy"))
