"""An ``Agent`` that answers the lab's pinned PowerShell scripts with recorded outputs.

Windows cannot run here, so the Windows side of the lab is checked against outputs in
the formats Microsoft documents: a test registers, per pinned script (recognised by a
fragment of its fixed template), what the guest would print, and the code under test
runs unchanged through ``run_script``/``run_structured``. Every call is recorded with
the script's parameters read back from its ``$p = @{...}`` header
(``lab.agent.powershell.script_params``), so a test also sees what was sent.

``clock``: an optional ``FakeClock`` the responders advance, so an exchange whose
timing matters (the Windows clock exchange) is tested with delays the test chooses
instead of wall-clock sleeps.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from lab.agent.base import Agent, CommandResult
from lab.agent.powershell import JSON_MARKER, POWERSHELL, PowerShell, script_params
from lab.errors import AgentError


@dataclass
class FakeClock:
    """Host nanoseconds that move only when told to (``advance``)."""

    now_ns: int = 1_700_000_000_000_000_000

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, ns: int) -> None:
        self.now_ns += int(ns)


def structured_stdout(records: Any) -> str:
    """What ``structured_script`` prints for ``records`` (ConvertTo-Json, base64 UTF-8)."""
    payload = json.dumps(records, separators=(",", ":")).encode("utf-8")
    return JSON_MARKER + base64.b64encode(payload).decode("ascii") + "\r\n"


Reply = Union[CommandResult, tuple[int, str, str], str]
Responder = Callable[[str, dict[str, str]], Reply]


@dataclass
class Call:
    script: str
    params: dict[str, str]
    fragment: str


@dataclass
class ScriptedAgent(Agent):
    """Answers scripts by template fragment; an unknown script is an ``AgentError``."""

    clock: FakeClock | None = None
    handlers: list[tuple[str, Responder]] = field(default_factory=list)
    calls: list[Call] = field(default_factory=list)
    shell: PowerShell = POWERSHELL

    def on(self, fragment: str, reply: Responder | Reply) -> ScriptedAgent:
        """Answer scripts containing ``fragment`` with ``reply`` (or ``reply(script, params)``)."""
        if callable(reply):
            self.handlers.append((fragment, reply))
        else:
            fixed: Reply = reply
            self.handlers.append((fragment, lambda script, params: fixed))
        return self

    def run(self, command: str, timeout: float | None = None, *,
            idempotent: bool = False) -> CommandResult:
        for fragment, responder in self.handlers:
            if fragment in command:
                params = script_params(command)
                self.calls.append(Call(command, params, fragment))
                reply = responder(command, params)
                if isinstance(reply, CommandResult):
                    return reply
                if isinstance(reply, str):
                    return CommandResult(command, 0, reply, "", 0.0)
                status, out, err = reply
                return CommandResult(command, status, out, err, 0.0)
        raise AgentError("the scripted guest has no answer for this script: "
                         + command.strip().splitlines()[-1][:120])

    def wait_ready(self, timeout: float) -> None:
        return None

    def stream(self, command: str, stop: threading.Event | None = None) -> Iterator[str]:
        raise AgentError("the scripted guest does not stream")

    def put(self, local: Path, remote: str) -> None:
        raise AgentError("the scripted guest has no files")

    def get(self, remote: str, local: Path) -> None:
        raise AgentError("the scripted guest has no files")

    def close(self) -> None:
        return None
