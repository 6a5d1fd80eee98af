"""The agent interface every guest transport implements.

A command is always built by the agent's ``Shell`` from an argument list (or, for
PowerShell, a script plus named parameters), never by pasting user values into a
string, so a hostile device name or path arrives in the guest as data.
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.errors import AgentError


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_status: int
    stdout: str
    stderr: str
    duration_s: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0

    def check(self) -> CommandResult:
        from lab.errors import AgentError

        if not self.ok:
            tail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            raise AgentError(
                f"guest command failed with status {self.exit_status}: {self.command!r}"
                + (f": {' | '.join(tail)}" if tail else "")
            )
        return self


class Shell(abc.ABC):
    """Quoting rules of the guest's shell."""

    name: str

    @abc.abstractmethod
    def quote(self, value: str) -> str:
        """One value as a literal of this shell."""

    def join(self, argv: Sequence[str]) -> str:
        return " ".join(self.quote(a) for a in argv)


class Agent(abc.ABC):
    """A connection to a guest."""

    shell: Shell

    @abc.abstractmethod
    def wait_ready(self, timeout: float) -> None:
        """Block until the guest answers a trivial command, or raise DeadlineExceeded."""

    @abc.abstractmethod
    def run(self, command: str, timeout: float | None = None, *,
            idempotent: bool = False) -> CommandResult:
        """Run a command line already built with ``self.shell``. ``idempotent`` (a query,
        a wait on a state) lets an agent that lost its connection mid-way run it once
        more; an agent that cannot tell may ignore it."""

    #: whether ``open``/``collect`` work: a command started now and read later (the
    #: waits the lab pipelines with a host action, background jobs). WinRM has no
    #: channel to leave running; SSH has.
    can_start: bool = False

    def open(self, command: str) -> Any:
        """Start ``command`` and return a handle for ``collect``."""
        raise AgentError(f"{type(self).__name__} cannot start a command and read it later; "
                         "use an SSH agent for background commands and pipelined waits")

    def collect(self, handle: Any, command: str, timeout: float, t0: float | None = None,
                stdin: bytes | None = None) -> CommandResult:
        """Read a command started with ``open`` to its end under a deadline."""
        raise AgentError(f"{type(self).__name__} cannot read a started command")

    def finished(self, handle: Any) -> bool:
        """Whether a command started with ``open`` has ended (its exit status is there):
        never blocks, so a caller waiting for its effect can tell "not yet" from "never"."""
        return False

    def run_argv(self, argv: Sequence[str], timeout: float | None = None, *,
                 idempotent: bool = False) -> CommandResult:
        """``argv`` quoted for the guest's shell. ``idempotent`` marks a query an agent
        may run again after losing its connection (the SSH agent does)."""
        return self.run(self.shell.join(argv), timeout=timeout, idempotent=idempotent)

    @abc.abstractmethod
    def stream(self, command: str, stop: threading.Event | None = None) -> Iterator[str]:
        """Run a long-lived command and yield its stdout line by line until it ends,
        ``stop`` is set, or ``close()`` is called."""

    @abc.abstractmethod
    def put(self, local: Path, remote: str) -> None: ...

    @abc.abstractmethod
    def get(self, remote: str, local: Path) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
