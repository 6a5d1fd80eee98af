"""SSH agent on paramiko, for the built-in Linux guest and Windows guests (both OpenSSH).

The guest's host key is pinned from the image (no auto-accept: RejectPolicy), the
client key comes from the image directory, and passwords are never used. On POSIX
guests files move through ``cat`` on an exec channel (no SFTP needed); Windows
guests: see ``put``/``get``.
"""

from __future__ import annotations

import io
import logging
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


# paramiko logs a failed handshake (a guest whose sshd is not up yet: "Error reading
# SSH protocol banner") with its traceback before our per-connection channel exists;
# with no handler anywhere, Python printed it on the user's terminal. The connect loop
# keeps the reason itself (wait_ready's "last seen").
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class _ForwardHandler(logging.Handler):
    """paramiko WARNING and worse, and the server's disconnect message, as "ssh: ..."
    lines in the run log (``_KeepDisconnect`` lets only those through)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        super().__init__(level=logging.INFO)
        self._forward = log

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._forward(f"ssh: {record.getMessage()}")
        except Exception:
            pass


class _KeepDisconnect(logging.Filter):
    """paramiko logs a server's SSH_MSG_DISCONNECT (code and reason) at INFO only, as
    "Disconnect (code N): ...": keep that one INFO line, drop the others before they
    reach any handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or (
            record.levelno == logging.INFO and record.getMessage().startswith("Disconnect (code"))


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
        # what a lost connection was doing, for the log line that reports the loss:
        # when it was made, and the commands started on it and not read to their end
        # (id(channel) -> command, start, channel; purged when its connection is replaced)
        self._connected_at: float | None = None
        self._inflight: dict[int, tuple[str, float, paramiko.Channel]] = {}
        self._inflight_lock = threading.Lock()

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
                plog.setLevel(logging.INFO)  # the disconnect message is INFO
                plog.addFilter(_KeepDisconnect())
                plog.addHandler(_ForwardHandler(self._log))
        self._connected_at = time.monotonic()
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

    def _loss_reason(self, t: paramiko.Transport | None) -> str:
        """Why ``t`` went down and what it was doing, for the log line that reports it.

        paramiko keeps the exception that ended its transport thread; when the server
        closes the TCP connection that is ``EOFError()``, whose str() is empty (the lab
        used to log "()"). So: its type and message, what that means, then the
        connection's age and the commands that were running on it. The server's side
        of the story is in its log (the Linux guest's /run/sshd.log, kept as sshd.log
        when a connection was lost)."""
        if t is None:
            return "no transport"
        # read, not get_exception(): that clears it, and both the reader that saw the
        # channel die and the reconnect report it
        exc = getattr(t, "saved_exception", None)
        if exc is None:
            what = "no error recorded (closed locally, or the server sent a disconnect: see above)"
        elif isinstance(exc, EOFError):
            what = f"EOFError{': ' + str(exc) if str(exc) else ''}: the server closed the TCP connection"
        elif isinstance(exc, ConnectionResetError):
            what = f"ConnectionResetError: {exc}: the TCP connection was reset"
        else:
            what = f"{type(exc).__name__}: {exc or 'no message'}"
        parts = [what]
        if self._connected_at is not None:
            parts.append(f"connection {time.monotonic() - self._connected_at:.1f} s old")
        if getattr(t, "remote_version", None):
            parts.append(f"server {t.remote_version}")
        now = time.monotonic()
        with self._inflight_lock:
            running = sorted((c for c in self._inflight.values() if c[2].get_transport() is t),
                             key=lambda c: c[1])
        if running:
            shown = ", ".join(f"{cmd!r} (running {now - t0:.1f} s)" for cmd, t0, _ in running[:4])
            more = f" and {len(running) - 4} more" if len(running) > 4 else ""
            parts.append(f"{len(running)} command(s) not finished on it: {shown}{more}")
        else:
            parts.append("no command running on it")
        return "; ".join(parts)

    def _forget(self, chan: paramiko.Channel) -> None:
        """``chan``'s command is over. One cut off by a lost connection stays listed until
        the reconnect has logged it (and purges the old connection's channels)."""
        t = chan.get_transport()
        if t is not None and not t.is_active():
            return
        with self._inflight_lock:
            self._inflight.pop(id(chan), None)

    def _reconnect(self, old: paramiko.Transport | None) -> paramiko.Transport:
        why = self._loss_reason(old) if old is not None else "closed by the peer"
        with self._inflight_lock:  # its channels are dead: none will be read to the end
            self._inflight = {k: c for k, c in self._inflight.items() if c[2].get_transport() is not old}
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
    can_start = True

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
            with self._inflight_lock:
                # channels a caller closed itself (a cancelled background job) leave too
                self._inflight = {k: c for k, c in self._inflight.items()
                                  if not (c[2].closed and c[2].get_transport() is chan.get_transport())}
                self._inflight[id(chan)] = (_label(command, 60), time.monotonic(), chan)
            try:
                chan.exec_command(wire)
                return chan
            except (paramiko.SSHException, OSError, EOFError) as exc:
                last = exc
                self._forget(chan)
                # paramiko says "Channel closed." when a fast command's close beat the
                # reply to the exec request: it ran, and its exit status is here
                if chan.exit_status_ready() and chan.recv_exit_status() != -1:
                    return chan
                started = self._started(chan)
                chan.close()
                if started is False and self._transport_alive():
                    # the server closed the new channel before the command began (the
                    # old dropbear guest did, right after a sysfs remove): nothing ran,
                    # so it is sent again
                    self._log(f"ssh: {command[:60]!r} did not start "
                              f"({type(exc).__name__}: {exc}); sending it again")
                    continue
                # it started, or nobody can tell: never sent twice here (a blind retry
                # once ran `echo 1 > .../remove` twice); run(idempotent=True) may retry
                raise ConnectionLost(f"starting {command!r} failed after the request was sent "
                                     f"({type(exc).__name__}: {exc or 'no message'}): it may or "
                                     "may not have run") from exc
        raise AgentError(f"could not start guest command {_label(command)!r}: "
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
                # OpenSSH sends exit-status when it reaps the command, possibly before
                # the last of its output: the output is complete at EOF (or close)
                if chan.exit_status_ready() and (chan.eof_received or chan.closed) \
                        and not chan.recv_ready() and not chan.recv_stderr_ready():
                    break
                if chan.closed and not chan.recv_ready():
                    break
                if dl.expired():
                    raise DeadlineExceeded(dl.what, timeout,
                                           (out.getvalue() or err.getvalue())[-200:].decode(
                                               "utf-8", "replace") or None)
                # not select() on the channel: that makes paramiko create a pipe for it,
                # and Channel.close() closes the pipe while the transport thread may be
                # writing its wake-up byte to it - EBADF there killed the whole
                # connection (1 in ~120 soak iterations: "Socket exception: Bad file
                # descriptor"). The exit status wakes this at once; output is read
                # within 5 ms.
                if chan.exit_status_ready():
                    time.sleep(0.001)        # the status is in; its output and EOF follow
                else:
                    chan.status_event.wait(min(0.005, max(0.001, dl.remaining())))
            status = chan.recv_exit_status() if chan.exit_status_ready() else -1
            if self._marker and err.getvalue()[:1] == START_MARKER:
                err = io.BytesIO(err.getvalue()[1:])
            # -1: no exit status came (paramiko's value for a channel closed without one)
            if status == -1 and self._transport_dying():
                raise ConnectionLost(f"the SSH connection went down while {what} ran "
                                     f"({self._loss_reason(chan.get_transport())})")
        finally:
            chan.close()
            self._forget(chan)
        return status, out.getvalue(), err.getvalue()

    def finished(self, chan: paramiko.Channel) -> bool:
        return bool(chan.exit_status_ready())

    def collect(self, chan: paramiko.Channel, command: str, timeout: float,
                t0: float | None = None, stdin: bytes | None = None) -> CommandResult:
        """Read a started command to its end under a deadline."""
        t0 = time.monotonic() if t0 is None else t0
        status, out, err = self._drain(chan, f"guest command {_label(command)!r}", timeout,
                                       stdin)
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
            chan.settimeout(0.1)       # a blocking read, not select(): see _drain
            while stop is None or not stop.is_set():
                try:
                    data = chan.recv(65536)
                except socket.timeout:
                    data = None
                if data is not None:
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
            self._forget(chan)
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
    def _windows(self) -> bool:
        from lab.agent.powershell import PowerShell

        return isinstance(self.shell, PowerShell)

    def put(self, local: Path, remote: str) -> None:
        if self._windows():
            # Windows OpenSSH runs PowerShell, where `cat` is Get-Content (text, not
            # bytes): SFTP, or base64 chunks through PowerShell (lab/guest/windows/ssh_copy.py)
            from lab.guest.windows.ssh_copy import windows_put

            windows_put(self._transport, self, local, remote,
                        timeout=seconds("guest_command"), log=self._log)
            return
        data = Path(local).read_bytes()
        cmd = f"cat > {self.shell.quote(remote)}"
        self.run(cmd, stdin=data).check()

    def get(self, remote: str, local: Path) -> None:
        if self._windows():
            from lab.guest.windows.ssh_copy import windows_get

            windows_get(self._transport, self, remote, local,
                        timeout=seconds("guest_command"), log=self._log)
            return
        status, data, err = self._drain(self.open(self.shell.join(["cat", remote])),
                                        f"copy {remote} from the guest", seconds("guest_command"))
        if status != 0:
            raise AgentError(f"could not read {remote} in the guest: "
                             f"{err.decode(errors='replace').strip()}")
        Path(local).write_bytes(data)

    def close(self) -> None:
        self._drop()


def _label(command: str, limit: int = 100) -> str:
    """A command as an error message names it: its first line, cut (a tracer's setup
    script is 60 lines; the message must stay one readable line)."""
    lines = command.strip().splitlines() or [""]
    label = lines[0] + (" ..." if len(lines) > 1 else "")
    return label if len(label) <= limit else label[: limit - 4] + " ..."
