"""POSIX sh quoting (shlex), for Linux guests."""

from __future__ import annotations

import shlex

from lab.agent.base import Shell


class PosixShell(Shell):
    name = "sh"

    def quote(self, value: str) -> str:
        if "\x00" in value:
            raise ValueError("a NUL byte cannot be passed in a shell argument")
        return shlex.quote(value)
