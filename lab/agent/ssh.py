"""SSH agent on paramiko, for the built-in Linux guest (dropbear) and Windows OpenSSH.

The guest's host key is pinned from the image (no auto-accept: RejectPolicy), the
client key comes from the image directory, and passwords are never used. Dropbear in
the built-in guest has no SFTP server, so files move through ``cat`` on an exec
channel, which works on every POSIX guest.
"""

from __future__ import annotations

import io
import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import paramiko

from lab.agent.base import Agent, CommandResult, Shell
from lab.agent.posix import PosixShell
from lab.deadline import Deadline, seconds
from lab.errors import AgentError, ConnectionLost, DeadlineExceeded


class _ForwardHandler(logging.Handler):
    """paramiko WARNING and worse, as "ssh: ..." lines in the run log."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._forward = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._forward(f"ssh: {record.getMessage()}")
        except Exception:
            pass


RECONNECT_S = 5.0
START_MARKER = b"\x01"


def load_host_key(line: str) -> paramiko.PKey:
    """A public key from an OpenSSH ``type base64 [comment]`` line."""
    parts = line.split()
    if len(parts) < 2:
        raise AgentError(f"cannot read pinned host key {line!r}")
    return paramiko.PKey.from_type_string(parts[0], __import__("base64").b64decode(parts[1]))


class SshAgent(Agent):
    def __init__(self, host: str, port: int, user: str, key_path: Path, host_key: str, *,
                 shell: Shell | None = None,
                 wrap: Callable[[str], str] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.host = host
        self.port = port
        self.user = user
        self.key_path = key_path
        self.host_key = host_key
        self.shell = shell or PosixShell()
        self._wrap = wrap or (lambda c: c)
        # POSIX guests: every command first writes START_MARKER to stderr, so a channel
        # that closes before the exec is confirmed tells whether the command started
        # (stripped again before anyone reads stderr)
        self._marker = wrap is None and isinstance(self.shell, PosixShell)
        self._log = log or (lambda m: None)
        self._client: paramiko.SSHClient | None = None
        self._reconnect_lock = threading.Lock()
        self.reconnects = 0

    # ---- connection --------------------------------------------------------------
    def _connect_once(self, timeout: float) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        hk = load_host_key(self.host_key)
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        client.get_host_keys().add(name, hk.get_name(), hk)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        pkey = paramiko.PKey.from_path(str(self.key_path))
        client.connect(self.host, self.port, username=self.user, pkey=pkey, timeout=timeout,
                       banner_timeout=timeout, auth_timeout=timeout, allow_agent=False,
                       look_for_keys=False)
        transport = client.get_transport()
        if transport is not None:
            transport.set_keepalive(5)
            # paramiko's own warnings (a socket error, a dead transport) go to the run log,
            # or a connection lost mid-run would leave no trace of why
            name = f"paramiko.transport.rebalab-{self.port}"
            transport.set_log_channel(name)
            plog = logging.getLogger(name)
            if not any(isinstance(h, _ForwardHandler) for h in plog.handlers):
                plog.addHandler(_ForwardHandler(self._log))
        return client

    def wait_ready(self, timeout: float) -> None:
        """Connect with retries (the guest's sshd may not listen yet), then prove an exec works.

        The first exec on a fresh connection has been seen to fail with "Channel
        closed" (PLATFORM.md), so the probe command is retried too.
        """
        dl = Deadline(f"SSH to {self.user}@{self.host}:{self.port}", timeout)
        delay = 0.05
        last = "no attempt"
        while True:
            try:
                if self._client is None:
                    self._client = self._connect_once(max(0.5, min(5.0, dl.remaining())))
                self.run("true", timeout=max(0.5, min(5.0, dl.remaining()))).check()
                self._log(f"ssh ready {self.host}:{self.port}")
                return
            except paramiko.BadHostKeyException as exc:
                raise AgentError(f"the guest's SSH host key does not match the key pinned from the "
                                 f"image ({exc}); rebuild the image or check you reach the right VM"
                                 ) from None
            except paramiko.AuthenticationException as exc:
                raise AgentError(f"SSH authentication to the guest failed with the image's key: "
                                 f"{exc}") from None
            except (OSError, paramiko.SSHException, EOFError, AgentError,
                    DeadlineExceeded) as exc:
                last = f"{type(exc).__name__}: {exc}"
                self._drop()
            if dl.expired():
                raise DeadlineExceeded(dl.what, timeout, last)
            time.sleep(min(delay, dl.remaining()))
            delay = min(delay * 1.5, 0.5)

    def _drop(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            except Exception:
                pass
            self._client = None

    def _transport(self) -> paramiko.Transport:
        """The live transport; a connection lost since the last command is made anew.

        Commands that were running on the lost connection have failed already (their
        reads end); only new commands go over the new one, so nothing runs twice. A
        guest that is really gone refuses the reconnect and the error says so.
        """
        if self._client is None:
            raise AgentError("SSH agent is not connected; call wait_ready() first")
        t = self._client.get_transport()
        if t is None or not t.is_active():
            with self._reconnect_lock:
                t = self._client.get_transport() if self._client is not None else None
                if t is None or not t.is_active():
                    t = self._reconnect(t)
        return t

    def _reconnect(self, old: paramiko.Transport | None) -> paramiko.Transport:
        why = (old.get_exception() if old is not None else None) or "closed by the peer"
        self._drop()
        try:
            self._client = self._connect_once(RECONNECT_S)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            self._client = None
            raise AgentError(f"the SSH connection to the guest is closed ({why}) and a new "
                             f"one failed: {type(exc).__name__}: {exc} (did the guest die?)"
                             ) from None
        self.reconnects += 1
        self._log(f"ssh: connection lost ({why}); reconnected (#{self.reconnects})")
        t = self._client.get_transport()
        assert t is not None
        return t

    # ---- commands -----------------------------------------------------------------
    def open(self, command: str) -> paramiko.Channel:
        """Start ``command`` and return its channel (for callers that pipeline waits).

        Opening the channel is retried a few times (the server refused or never
        confirmed it: nothing ran). Once the exec request is sent it is never sent
        again: a failure then is ``ConnectionLost``, the command's fate unknown.
        """
        last: Exception | None = None
        for attempt in range(5):
            if attempt:
                time.sleep(0.05 * attempt)
            try:
                chan = self._transport().open_session(timeout=5)
            except (paramiko.SSHException, OSError, EOFError) as exc:
                # the server refused or never confirmed the channel: nothing ran, so it
                # is asked again; a connection that went down meanwhile is made anew by
                # _transport() ("Unable to open channel." is also what paramiko says
                # when another thread took the server's refusal reason)
                last = exc
                continue
            wire = f"printf '\\001' >&2; {command}" if self._marker else self._wrap(command)
            try:
                chan.exec_command(wire)
                return chan
            except (paramiko.SSHException, OSError, EOFError) as exc:
                last = exc
                # paramiko says "Channel closed." when a fast command's close beat the
                # reply to the exec request: it ran, and its exit status is here
                if chan.exit_status_ready() and chan.recv_exit_status() != -1:
                    return chan
                started = self._started(chan)
                chan.close()
                if started is False and self._transport_alive():
                    # dropbear closed the new channel before the command began (seen
                    # right after a sysfs remove): nothing ran, so it is sent again
                    self._log(f"ssh: {command[:60]!r} did not start "
                              f"({type(exc).__name__}: {exc}); sending it again")
                    continue
                # it started, or nobody can tell: never sent twice here (a blind retry
                # once ran `echo 1 > .../remove` twice); run(idempotent=True) may retry
                raise ConnectionLost(f"starting {command!r} failed after the request was sent "
                                     f"({type(exc).__name__}: {exc or 'no message'}): it may or "
                                     "may not have run") from exc
        raise AgentError(f"could not start guest command {command!r}: "
                         f"{type(last).__name__}: {last or 'no message'}") from last

    def _drain(self, chan: paramiko.Channel, what: str, timeout: float,
               stdin: bytes | None = None) -> tuple[int, bytes, bytes]:
        """Read a started command to its end under a deadline: (status, stdout, stderr)."""
        dl = Deadline(what, timeout)
        out, err = io.BytesIO(), io.BytesIO()
        if stdin is not None:
            try:
                chan.sendall(stdin)
                chan.shutdown_write()
            except OSError as exc:
                raise AgentError(f"could not send input to {what}: {exc}") from exc
        try:
            while True:
                while chan.recv_ready():
                    out.write(chan.recv(65536))
                while chan.recv_stderr_ready():
                    err.write(chan.recv_stderr(65536))
                if chan.exit_status_ready() and not chan.recv_ready() \
                        and not chan.recv_stderr_ready():
                    break
                if chan.closed and not chan.recv_ready():
                    break
                if dl.expired():
                    raise DeadlineExceeded(dl.what, timeout,
                                           (out.getvalue() or err.getvalue())[-200:].decode(
                                               "utf-8", "replace") or None)
                select.select([chan], [], [], min(0.05, max(0.001, dl.remaining())))
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if self._marker and err.getvalue()[:1] == START_MARKER:
                err = io.BytesIO(err.getvalue()[1:])
            # -1: no exit status came (paramiko's value for a channel closed without one)
            if status == -1 and self._transport_dying():
                raise ConnectionLost(f"the SSH connection went down while {what} ran")
        finally:
            chan.close()
        return status, out.getvalue(), err.getvalue()

    def collect(self, chan: paramiko.Channel, command: str, timeout: float,
                t0: float | None = None, stdin: bytes | None = None) -> CommandResult:
        """Read a started command to its end under a deadline."""
        t0 = time.monotonic() if t0 is None else t0
        status, out, err = self._drain(chan, f"guest command {command!r}", timeout, stdin)
        return CommandResult(command, status, out.decode("utf-8", "replace"),
                             err.decode("utf-8", "replace"), time.monotonic() - t0)

    def run(self, command: str, timeout: float | None = None, *,
            stdin: bytes | None = None, idempotent: bool = False) -> CommandResult:
        """Run to the end. ``idempotent`` (a query, a wait on a state) lets a command
        whose connection went down mid-way run once more on a new connection."""
        timeout = timeout if timeout is not None else seconds("guest_command")
        t0 = time.monotonic()
        try:
            return self.collect(self.open(command), command, timeout, t0, stdin)
        except ConnectionLost as exc:
            if not idempotent:
                raise
            self._log(f"ssh: {exc}; running it again (a query)")
            return self.collect(self.open(command), command, timeout, time.monotonic(), stdin)

    def run_argv(self, argv: Sequence[str], timeout: float | None = None, *,
                 idempotent: bool = False) -> CommandResult:
        return self.run(self.shell.join(argv), timeout=timeout, idempotent=idempotent)

    def stream(self, command: str, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield stdout lines of a long-running command as they come.

        The generator ends when the command exits or the connection drops; what was
        received until then has been yielded, so a guest that dies mid-run loses
        nothing already sent.
        """
        chan = self.open(command)
        buf = b""
        try:
            while stop is None or not stop.is_set():
                select.select([chan], [], [], 0.1)
                if chan.recv_ready():
                    data = chan.recv(65536)
                    if not data:
                        break
                    buf += data
                    *lines, buf = buf.split(b"\n")
                    for ln in lines:
                        yield ln.decode("utf-8", "replace")
                elif chan.exit_status_ready() or chan.closed:
                    if not chan.recv_ready():
                        break
                if self._client is None or not self._transport_alive():
                    break
        except (OSError, socket.error, AgentError):
            pass
        finally:
            if buf:
                yield buf.decode("utf-8", "replace")
            chan.close()

    def _started(self, chan: paramiko.Channel, wait_s: float = 0.3) -> bool | None:
        """Whether the command on ``chan`` began (its start marker arrived); None when
        commands carry no marker (PowerShell guests)."""
        if not self._marker:
            return None
        end = time.monotonic() + wait_s
        while time.monotonic() < end:
            if chan.recv_stderr_ready():
                return True
            if chan.closed and not chan.recv_stderr_ready():
                return False
            time.sleep(0.01)
        return chan.recv_stderr_ready()

    def _transport_dying(self, settle_s: float = 1.0) -> bool:
        """A channel that closed with no exit status: is its connection going down?
        paramiko closes the channels a moment before it marks the transport inactive."""
        end = time.monotonic() + settle_s
        while self._transport_alive():
            if time.monotonic() > end:
                return False
            time.sleep(0.01)
        return True

    def _transport_alive(self) -> bool:
        t = self._client.get_transport() if self._client else None
        return bool(t and t.is_active())

    # ---- files --------------------------------------------------------------------
    def put(self, local: Path, remote: str) -> None:
        data = Path(local).read_bytes()
        cmd = f"cat > {self.shell.quote(remote)}"
        self.run(cmd, stdin=data).check()

    def get(self, remote: str, local: Path) -> None:
        status, data, err = self._drain(self.open(self.shell.join(["cat", remote])),
                                        f"copy {remote} from the guest", seconds("guest_command"))
        if status != 0:
            raise AgentError(f"could not read {remote} in the guest: "
                             f"{err.decode(errors='replace').strip()}")
        Path(local).write_bytes(data)

    def close(self) -> None:
        self._drop()
