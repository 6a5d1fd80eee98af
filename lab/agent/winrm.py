"""A guest agent over WinRM (WS-Management, [MS-WSMV]) using pywinrm.

Why WinRM next to SSH: every Windows edition the lab supports ships the WinRM service,
so a freshly installed guest is reachable before anything else is configured; the image
builder's provisioning script enables an HTTPS listener with a self-signed certificate
whose thumbprint it records, so the lab can validate the server certificate.

How commands run
----------------
pywinrm's ``Session.run_ps`` opens and closes a remote shell per call and loops on the
WS-Management Receive operation forever. We drive ``winrm.protocol.Protocol`` directly
instead: one remote shell (``rsp:Shell``, [MS-WSMV] 3.1.4.5.2) is reused for all
commands, each command is ``powershell ... -EncodedCommand`` run with
``WINRS_SKIP_CMD_SHELL=TRUE`` (no cmd.exe, so its 8191-character limit and its
metacharacters do not apply), and every Receive ([MS-WSMV] 3.1.4.14) loop runs under
a ``Deadline``. On expiry the command is sent the ``terminate`` Signal and the error
names the command, the limit and the last output seen.

Streaming
---------
WS-Management has no push channel, but a Receive returns as soon as the command has
produced *some* output (or after the operation timeout), so ``stream()`` yields lines as
each Receive response arrives: chunked, not byte-by-byte; the latency of a line is
one HTTP round trip. ``close()`` is noticed between two Receives, so it can take up to
``operation_timeout`` seconds to stop a silent stream.

Credentials
-----------
Only from the environment (``REBALAB_WINRM_USER`` / ``REBALAB_WINRM_PASSWORD``) or from
a credentials file named in the lab configuration, which must be a regular file of
mode 0600 owned by the current user. Scenario files never carry them. The password is
registered with ``REDACTOR``, a logging filter that replaces it (and the HTTP Basic
token derived from it) in every record passing through handlers it is installed on;
``repr()`` of the credentials and of the agent never shows it.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lab.agent.base import Agent, CommandResult
from lab.agent.powershell import (
    FILE_GET_CHUNK,
    FILE_HASH_PREFIX,
    FILE_PUT_BEGIN,
    FILE_PUT_CHUNK,
    FILE_PUT_COMMIT,
    POWERSHELL,
    PowerShell,
    PsValue,
    build_script,
    decode_structured,
    structured_script,
)
from lab.deadline import Deadline, seconds
from lab.errors import AgentError, ConfigError, DeadlineExceeded, EnvironmentProblem

log = logging.getLogger(__name__)

ENV_USER = "REBALAB_WINRM_USER"
ENV_PASSWORD = "REBALAB_WINRM_PASSWORD"

CMD_LIMIT_NO_CMD_SHELL = 32_767   # CreateProcess lpCommandLine maximum
CMD_LIMIT_CMD_SHELL = 8_191       # cmd.exe maximum command line

# What this module calls in pywinrm, and the first release that has all of it. pywinrm's
# CHANGELOG.md (github.com/diyan/pywinrm), "Version 0.5.0": "Added public API
# `protocol.get_command_output_raw`" and "Added `WSManFaultError`" (with ``reason`` and
# ``wsman_fault_code``); 0.4.3 has only the private ``_raw_get_command_output`` and no
# WSManFaultError, so on 0.4.x every command failed with AttributeError. pyproject.toml
# pins ``pywinrm>=0.5.0``; tests/unit/test_winrm_agent.py checks these names against the
# installed pywinrm and this list against the calls in this file.
PYWINRM_MIN_VERSION = (0, 5, 0)
PYWINRM_PROTOCOL_METHODS = ("open_shell", "run_command", "get_command_output_raw",
                            "cleanup_command", "close_shell")
PYWINRM_EXCEPTIONS = ("WinRMError", "WSManFaultError", "InvalidCredentialsError",
                      "WinRMOperationTimeoutError")

TransportName = Literal["ntlm", "kerberos", "credssp", "basic"]


# ------------------------------------------------------------------ redaction

class SecretRedactor(logging.Filter):
    """A logging filter that replaces registered secrets with ``***``.

    Installed on *handlers* (a filter on a logger does not see records propagated from
    child loggers such as ``urllib3`` or ``requests_ntlm``). It rewrites the formatted
    message, the exception text and the stack text of each record.
    """

    MASK = "***"

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        if secret and len(secret) >= 1:
            with self._lock:
                self._secrets.add(secret)

    def add_credentials(self, username: str, password: str) -> None:
        """The password itself plus the forms HTTP auth derives from it."""
        self.add(password)
        pair = f"{username}:{password}"
        self.add(pair)
        self.add(base64.b64encode(pair.encode("utf-8")).decode("ascii"))
        self.add(base64.b64encode(pair.encode("latin-1", "replace")).decode("ascii"))

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for s in secrets:
            if s in text:
                text = text.replace(s, self.MASK)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep the raw pieces, still redacted
            message = f"{record.msg} {record.args}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


REDACTOR = SecretRedactor()


def install_redaction(*handlers: logging.Handler) -> None:
    """Attach ``REDACTOR`` to ``handlers`` (default: every handler of the root logger).

    The CLI calls this once after configuring logging; tests call it on their handler.
    """
    targets = handlers or tuple(logging.getLogger().handlers)
    for h in targets:
        if REDACTOR not in h.filters:
            h.addFilter(REDACTOR)


# ------------------------------------------------------------------ credentials

class WinRmCredentials:
    """A user name and password; ``repr`` and ``str`` never show the password."""

    __slots__ = ("username", "_password", "source")

    def __init__(self, username: str, password: str, source: str) -> None:
        if not username:
            raise ConfigError(f"WinRM user name is empty ({source})")
        if password is None or password == "":
            raise ConfigError(f"WinRM password is empty ({source})")
        self.username = username
        self._password = password
        self.source = source
        REDACTOR.add_credentials(username, password)

    @property
    def password(self) -> str:
        return self._password

    def __repr__(self) -> str:
        return f"WinRmCredentials(username={self.username!r}, password='***', source={self.source!r})"

    __str__ = __repr__

    def __reduce__(self) -> Any:  # never pickle a password into a run directory
        raise TypeError("WinRmCredentials cannot be pickled")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> WinRmCredentials | None:
        env = os.environ if environ is None else environ
        user, password = env.get(ENV_USER), env.get(ENV_PASSWORD)
        if not user and not password:
            return None
        if not user or not password:
            missing = ENV_USER if not user else ENV_PASSWORD
            raise ConfigError(f"{missing} is not set; set both {ENV_USER} and {ENV_PASSWORD}, "
                              "or name a credentials file in the lab configuration")
        return cls(user, password, source="environment")

    @classmethod
    def from_file(cls, path: str | Path) -> WinRmCredentials:
        """Read ``{"username": ..., "password": ...}`` from a 0600 file we own.

        A file readable by others is refused (like ssh refuses an open private key)
        rather than used: the password would already be exposed on this host.
        """
        p = Path(path).expanduser()
        try:
            st = p.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read WinRM credentials file {p}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"WinRM credentials file {p} is not a regular file")
        if st.st_mode & 0o077:
            raise ConfigError(
                f"WinRM credentials file {p} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0600 "
                f"(run: chmod 600 {p})")
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            raise ConfigError(f"WinRM credentials file {p} is not owned by the current user")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            # the message must not quote the file's content
            raise ConfigError(f"WinRM credentials file {p} is not valid JSON "
                              f"({type(exc).__name__})") from None
        if not isinstance(data, dict) or not isinstance(data.get("username"), str) \
                or not isinstance(data.get("password"), str):
            raise ConfigError(f'WinRM credentials file {p} must hold {{"username": "...", '
                              '"password": "..."}} (both strings)')
        return cls(data["username"], data["password"], source=str(p))

    @classmethod
    def resolve(cls, credentials_file: str | Path | None = None,
                environ: Mapping[str, str] | None = None) -> WinRmCredentials:
        """The configured file if one is named, else the environment, else a clear error."""
        if credentials_file:
            return cls.from_file(credentials_file)
        creds = cls.from_env(environ)
        if creds is None:
            raise ConfigError(
                f"no WinRM credentials: set {ENV_USER} and {ENV_PASSWORD}, or set "
                "winrm.credentials_file in the lab configuration to a 0600 JSON file "
                '{"username": ..., "password": ...}')
        return creds


# ------------------------------------------------------------------ configuration

class WinRmConfig(BaseModel):
    """Where and how to reach the guest's WinRM service. Holds no secret by design."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str
    port: int = Field(default=5986, ge=1, le=65535)
    scheme: Literal["https", "http"] = "https"
    path: str = "wsman"
    transport: TransportName = "ntlm"
    server_cert_validation: Literal["validate", "ignore"] = "validate"
    ca_bundle: str | None = None
    credentials_file: str | None = None
    operation_timeout: int = Field(default=10, ge=1, le=3600)
    read_timeout: int = Field(default=15, ge=2, le=3700)
    codepage: int = 65001
    skip_cmd_shell: bool = True

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        if not re.match(r"^[A-Za-z0-9.\-:\[\]]+$", v):
            raise ValueError("host must be a host name or an IP address")
        return v

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> WinRmConfig:
        """Validate the ``winrm:`` section of the lab configuration."""
        lowered = {str(k).lower() for k in data}
        if lowered & {"password", "pass", "passwd", "secret"}:
            raise ConfigError("WinRM passwords are not accepted in configuration files; use "
                              f"{ENV_PASSWORD} or winrm.credentials_file (a 0600 JSON file)")
        try:
            cfg = cls(**dict(data))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"winrm.{where}: {first['msg']}") from None
        if cfg.read_timeout <= cfg.operation_timeout:
            raise ConfigError("winrm.read_timeout must exceed winrm.operation_timeout "
                              "(the server may hold a Receive for the whole operation timeout)")
        if cfg.scheme == "http" and cfg.transport == "basic":
            raise ConfigError("refusing HTTP Basic authentication over plain HTTP: the password "
                              "would cross the network in clear; use scheme https")
        return cfg

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.path.lstrip('/')}"

    @property
    def command_limit(self) -> int:
        return CMD_LIMIT_NO_CMD_SHELL if self.skip_cmd_shell else CMD_LIMIT_CMD_SHELL


# ------------------------------------------------------------------ helpers

_CLIXML_ESC = re.compile(r"_x([0-9A-Fa-f]{4})_")


def clean_clixml(stderr: str) -> str:
    """PowerShell's CLIXML error stream (``#< CLIXML``) as plain text.

    Windows PowerShell serialises error records as CLIXML when its output is
    redirected; only the ``<S S="Error">`` strings carry the message. Characters
    such as CR LF are escaped as ``_x000D__x000A_`` (XML-encoded names).
    """
    if not stderr.startswith("#< CLIXML"):
        return stderr
    import xml.etree.ElementTree as ET

    body = stderr.split("\n", 1)[1] if "\n" in stderr else ""
    try:
        root = ET.fromstring(body)
    except ET.ParseError:
        return stderr
    parts = [el.text or "" for el in root.iter() if el.tag.endswith("S") and el.get("S") == "Error"]
    text = "".join(parts)
    text = _CLIXML_ESC.sub(lambda m: chr(int(m[1], 16)), text)
    return text.strip() or stderr


def _short(script: str, limit: int = 120) -> str:
    """A one-line label for a script in error messages (the last meaningful line)."""
    lines = [ln.strip() for ln in script.strip().splitlines()
             if ln.strip() and not ln.strip().startswith(("$ErrorActionPreference", "$ProgressPreference"))]
    label = lines[-1] if lines else script.strip()
    return label if len(label) <= limit else label[: limit - 3] + "..."


# ------------------------------------------------------------------ the agent

class WinRmAgent(Agent):
    """Runs PowerShell in a Windows guest over WinRM (HTTPS by default)."""

    shell: PowerShell = POWERSHELL

    def __init__(self, config: WinRmConfig, credentials: WinRmCredentials | None = None) -> None:
        self.config = config
        self._credentials = credentials or WinRmCredentials.resolve(config.credentials_file)
        self._lock = threading.RLock()
        self._protocol: Any = None
        self._shell_id: str | None = None
        self._closing = threading.Event()
        if config.server_cert_validation == "ignore":
            log.warning("WinRM server certificate validation is OFF for %s (explicitly requested)",
                        config.endpoint)

    def __repr__(self) -> str:
        return (f"WinRmAgent(endpoint={self.config.endpoint!r}, user={self._credentials.username!r}, "
                f"transport={self.config.transport!r}, "
                f"server_cert_validation={self.config.server_cert_validation!r})")

    # -- connection ------------------------------------------------------------

    def _new_protocol(self) -> Any:
        try:
            from winrm.exceptions import WinRMError
            from winrm.protocol import Protocol
        except ImportError:  # pragma: no cover - pywinrm is a declared dependency
            raise EnvironmentProblem("pywinrm is not installed: pip install pywinrm") from None
        cfg = self.config
        if cfg.transport == "kerberos":
            from winrm import transport as _t
            if not _t.HAVE_KERBEROS:
                raise EnvironmentProblem("WinRM transport 'kerberos' needs: pip install 'pywinrm[kerberos]'")
        if cfg.transport == "credssp":
            from winrm import transport as _t
            if not _t.HAVE_CREDSSP:
                raise EnvironmentProblem("WinRM transport 'credssp' needs: pip install 'pywinrm[credssp]'")
        try:
            return Protocol(
                endpoint=cfg.endpoint,
                transport=cfg.transport,
                username=self._credentials.username,
                password=self._credentials.password,
                server_cert_validation=cfg.server_cert_validation,
                # an explicit CA bundle, or None: never pick one up from the environment
                ca_trust_path=cfg.ca_bundle if cfg.ca_bundle else None,  # type: ignore[arg-type]
                read_timeout_sec=cfg.read_timeout,
                operation_timeout_sec=cfg.operation_timeout,
                message_encryption="auto",
                proxy=None,  # the guest is reached through a local port forward
            )
        except WinRMError as exc:
            raise AgentError(f"cannot set up WinRM to {cfg.endpoint}: {REDACTOR.redact(str(exc))}") from None

    def _translate(self, exc: BaseException, what: str) -> AgentError:
        """A pywinrm/requests failure as an AgentError that says what to do."""
        from winrm.exceptions import InvalidCredentialsError, WinRMError, WSManFaultError

        text = REDACTOR.redact(str(exc))
        name = type(exc).__name__
        if isinstance(exc, InvalidCredentialsError):
            return AgentError(f"WinRM at {self.config.endpoint} rejected the credentials of user "
                              f"{self._credentials.username!r} ({self._credentials.source}) while {what}")
        if "SSLError" in name or "CERTIFICATE_VERIFY_FAILED" in text:
            return AgentError(
                f"the WinRM server certificate of {self.config.endpoint} is not trusted while {what}: "
                "set winrm.ca_bundle to the certificate the image builder exported "
                "(images/build/*.winrm.pem), or, knowingly, winrm.server_cert_validation: ignore")
        if isinstance(exc, WSManFaultError):
            return AgentError(f"WinRM fault while {what}: {REDACTOR.redact(exc.reason or text)} "
                              f"(wsman code {exc.wsman_fault_code})")
        if isinstance(exc, WinRMError):
            return AgentError(f"WinRM error while {what}: {text}")
        return AgentError(f"WinRM connection to {self.config.endpoint} failed while {what}: {name}: {text}")

    def _ensure_shell(self) -> tuple[Any, str]:
        with self._lock:
            if self._protocol is None:
                self._protocol = self._new_protocol()
            if self._shell_id is None:
                try:
                    self._shell_id = self._protocol.open_shell(codepage=self.config.codepage,
                                                               noprofile=True)
                except AgentError:
                    raise
                except Exception as exc:
                    self._protocol = None
                    raise self._translate(exc, "opening a remote shell") from None
            return self._protocol, self._shell_id

    def _drop_shell(self) -> None:
        with self._lock:
            proto, shell_id = self._protocol, self._shell_id
            self._shell_id = None
            self._protocol = None
        if proto is not None and shell_id is not None:
            try:
                proto.close_shell(shell_id)
            except Exception as exc:  # the shell may be gone with the connection
                log.debug("closing WinRM shell failed: %s", REDACTOR.redact(str(exc)))

    # -- running ---------------------------------------------------------------

    def _cmdline(self, script: str) -> str:
        try:
            return self.shell.encode(script, limit=self.config.command_limit)
        except ValueError as exc:
            raise AgentError(f"cannot send this script over WinRM: {exc}") from None

    def run(self, command: str, timeout: float | None = None, *,
            idempotent: bool = False) -> CommandResult:
        """Run PowerShell source ``command`` (built with ``build_script``/``self.shell``)."""
        return self._execute(self._cmdline(command), label=command, timeout=timeout)

    def run_ps(self, template: str, params: Mapping[str, PsValue] | None = None,
               timeout: float | None = None) -> CommandResult:
        """Run a fixed template with its parameters passed as literals."""
        return self.run(build_script(template, params), timeout=timeout)

    def run_json(self, template: str, params: Mapping[str, PsValue] | None = None,
                 timeout: float | None = None, depth: int = 5) -> list[Any]:
        """Run a template and return its output objects, parsed from JSON."""
        result = self.run(structured_script(template, params, depth=depth), timeout=timeout).check()
        return decode_structured(result.stdout)

    def run_cmdline(self, cmdline: str, timeout: float | None = None) -> CommandResult:
        """A raw WinRS command line, for the rare program that must not run under PowerShell."""
        return self._execute(cmdline, label=cmdline, timeout=timeout)

    def _execute(self, cmdline: str, label: str, timeout: float | None) -> CommandResult:
        from winrm.exceptions import WinRMOperationTimeoutError

        limit = seconds("guest_command") if timeout is None else timeout
        dl = Deadline(f"guest command {_short(label)!r} over WinRM", limit)
        started = time.monotonic()
        with self._lock:
            protocol, shell_id = self._ensure_shell()
            try:
                command_id = protocol.run_command(shell_id, cmdline, skip_cmd_shell=self.config.skip_cmd_shell)
            except Exception as exc:
                self._drop_shell()
                raise self._translate(exc, f"starting {_short(label)!r}") from None
            out: list[bytes] = []
            err: list[bytes] = []
            code = -1
            done = False
            try:
                while not done:
                    if dl.expired():
                        tail = b"".join(out)[-200:].decode("utf-8", "replace")
                        self._terminate(protocol, shell_id, command_id)
                        raise DeadlineExceeded(dl.what, limit, REDACTOR.redact(tail) or None)
                    try:
                        o, e, code, done = protocol.get_command_output_raw(shell_id, command_id)
                    except WinRMOperationTimeoutError:
                        continue  # the server held the Receive for operation_timeout; ask again
                    out.append(o)
                    err.append(e)
            except DeadlineExceeded:
                raise
            except Exception as exc:
                self._drop_shell()
                raise self._translate(exc, f"reading the output of {_short(label)!r}") from None
            try:
                protocol.cleanup_command(shell_id, command_id)
            except Exception as exc:
                log.debug("WinRM cleanup_command failed: %s", REDACTOR.redact(str(exc)))
        stdout = b"".join(out).decode("utf-8", "replace")
        stderr = clean_clixml(b"".join(err).decode("utf-8", "replace"))
        return CommandResult(command=label, exit_status=code, stdout=stdout, stderr=stderr,
                             duration_s=time.monotonic() - started)

    @staticmethod
    def _terminate(protocol: Any, shell_id: str, command_id: str) -> None:
        try:
            protocol.cleanup_command(shell_id, command_id)  # Signal .../signal/terminate
        except Exception as exc:
            log.debug("terminating a timed-out WinRM command failed: %s", REDACTOR.redact(str(exc)))

    def stream(self, command: str, stop: threading.Event | None = None) -> Iterator[str]:
        """Yield stdout lines of PowerShell ``command`` as Receive responses arrive.

        Uses its own connection and remote shell so that ``run()`` can be called while a
        stream is open. Raises ``AgentError`` after the last line if the command failed.
        ``stop`` (like ``close()``) is noticed between two Receives.
        """
        from winrm.exceptions import WinRMOperationTimeoutError

        cmdline = self._cmdline(command)
        protocol = self._new_protocol()
        try:
            shell_id = protocol.open_shell(codepage=self.config.codepage, noprofile=True)
            command_id = protocol.run_command(shell_id, cmdline, skip_cmd_shell=self.config.skip_cmd_shell)
        except AgentError:
            raise
        except Exception as exc:
            raise self._translate(exc, f"starting stream {_short(command)!r}") from None
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        err: list[bytes] = []
        code, done = -1, False
        try:
            while not done and not self._closing.is_set() and not (stop is not None and stop.is_set()):
                try:
                    o, e, code, done = protocol.get_command_output_raw(shell_id, command_id)
                except WinRMOperationTimeoutError:
                    continue
                except Exception as exc:
                    raise self._translate(exc, f"streaming {_short(command)!r}") from None
                err.append(e)
                pending += decoder.decode(o)
                *lines, pending = re.split(r"\r?\n", pending)
                yield from lines
            pending += decoder.decode(b"", final=True)
            if pending:
                yield pending.rstrip("\r")
        finally:
            try:
                if not done:
                    protocol.cleanup_command(shell_id, command_id)
                protocol.close_shell(shell_id)
            except Exception as exc:
                log.debug("closing WinRM stream failed: %s", REDACTOR.redact(str(exc)))
        if done and code != 0:
            stderr = clean_clixml(b"".join(err).decode("utf-8", "replace")).strip()
            raise AgentError(f"guest stream {_short(command)!r} ended with status {code}"
                             + (f": {stderr.splitlines()[-1]}" if stderr else ""))

    # -- readiness ---------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Retry a trivial command until WinRM answers, under one deadline.

        Wrong credentials end the wait at once (retrying cannot fix them); everything
        else (connection refused while Windows boots, 503 while WinRM starts) is retried
        with a capped backoff.
        """
        dl = Deadline(f"WinRM at {self.config.endpoint} to answer", timeout)
        probe = build_script("[Environment]::OSVersion.Version.ToString()")
        delay, last = 0.5, "no attempt yet"
        while True:
            try:
                self.run(probe, timeout=max(1.0, min(dl.remaining(), 30.0))).check()
                return
            except AgentError as exc:
                last = REDACTOR.redact(str(exc))
                if "rejected the credentials" in last or "not trusted" in last:
                    raise
                self._drop_shell()
            if dl.expired():
                raise DeadlineExceeded(dl.what, timeout, last)
            time.sleep(min(delay, dl.remaining()))
            delay = min(delay * 2, 5.0)

    # -- files -------------------------------------------------------------------

    _PUT_BEGIN = FILE_PUT_BEGIN
    _PUT_CHUNK = FILE_PUT_CHUNK
    _HASH_PREFIX = FILE_HASH_PREFIX
    _PUT_COMMIT = FILE_PUT_COMMIT
    _GET_CHUNK = FILE_GET_CHUNK

    def put_chunk_size(self, part: str = "C:\\" + "x" * 260) -> int:
        """Raw bytes per put() chunk that keep each command inside the command-line limit.

        The chunk travels base64-encoded inside the script (x4/3) which is encoded as
        UTF-16LE and base64 again (x8/3): about 3.6 command-line characters per byte.
        ``part`` is the guest path the chunks go to (its length counts too).
        """
        script = build_script(self._PUT_CHUNK, {"Data": "", "Part": part})
        overhead = len(script.encode("utf-16-le")) // 2
        budget_script_chars = (self.config.command_limit - 64) * 3 // 8 - overhead - 16
        return max(3, (budget_script_chars // 4) * 3)

    def put(self, local: Path, remote: str) -> None:
        """Copy ``local`` to ``remote`` in base64 chunks, verified by SHA-256.

        Written to ``remote + '.rebalab-part'`` and moved into place only after the
        guest's hash matches ours, so a broken transfer never leaves a plausible file.
        """
        data = Path(local).read_bytes()
        want = hashlib.sha256(data).hexdigest().upper()
        part = remote + ".rebalab-part"
        self.run_ps(self._PUT_BEGIN, {"Path": remote, "Part": part}).check()
        size = self.put_chunk_size(part)
        if size < 48:
            raise AgentError(f"guest path too long to upload to over WinRM: {remote!r}")
        for off in range(0, len(data), size):
            chunk = base64.b64encode(data[off:off + size]).decode("ascii")
            self.run_ps(self._PUT_CHUNK, {"Part": part, "Data": chunk}).check()
        got = self.run_json(self._HASH_PREFIX, {"Path": part, "Length": -1})
        if not got or str(got[0].get("Sha256", "")).upper() != want or int(got[0].get("Length", -1)) != len(data):
            raise AgentError(f"upload of {local} to {remote} failed verification: guest has "
                             f"{got[0] if got else 'nothing'}, expected {len(data)} bytes sha256 {want}")
        self.run_ps(self._PUT_COMMIT, {"Part": part, "Path": remote}).check()

    def get(self, remote: str, local: Path, chunk: int = 512 * 1024) -> None:
        """Copy the first N bytes of ``remote`` (N = its size when we start) to ``local``.

        Growing files (logs) are read as a snapshot of that prefix; the SHA-256 the
        guest computes over the same prefix must match what arrived.
        """
        info = self.run_json(self._HASH_PREFIX, {"Path": remote, "Length": -1})
        if not info:
            raise AgentError(f"guest returned no size for {remote}")
        length = int(info[0]["Length"])
        want = str(info[0]["Sha256"]).upper()
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        h = hashlib.sha256()
        with open(tmp, "wb") as fh:
            off = 0
            while off < length:
                n = min(chunk, length - off)
                res = self.run_ps(self._GET_CHUNK, {"Path": remote, "Offset": off, "Count": n}).check()
                try:
                    piece = base64.b64decode(res.stdout.strip(), validate=True)
                except ValueError:
                    tmp.unlink(missing_ok=True)
                    raise AgentError(f"download of {remote}: chunk at {off} is not valid base64") from None
                if not piece:
                    tmp.unlink(missing_ok=True)
                    raise AgentError(f"download of {remote}: file shrank below {length} bytes at {off}")
                fh.write(piece)
                h.update(piece)
                off += len(piece)
        if h.hexdigest().upper() != want:
            tmp.unlink(missing_ok=True)
            raise AgentError(f"download of {remote} failed verification: sha256 {h.hexdigest()} "
                             f"!= guest's {want.lower()}")
        tmp.replace(local)

    # -- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        self._closing.set()
        self._drop_shell()
