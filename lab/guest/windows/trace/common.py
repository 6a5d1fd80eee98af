"""Shared pieces of the Windows guest tracers: validated guest values, time conversion,
flagged results, and running a PowerShell script through any agent.

Validation is strict on purpose: every value here ends up as an argument of a native
program (logman, tracefmt) run from Windows PowerShell 5.1, whose argument passing
mangles double quotes and trailing backslashes (see ``PowerShell.native``). Rejecting
those up front keeps the commands correct by construction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from lab.agent.base import Agent, CommandResult
from lab.agent.powershell import POWERSHELL, PowerShell, PsValue, build_script, decode_structured, structured_script
from lab.errors import ConfigError, LabError
from lab.events import Event

# 100-ns intervals between 1601-01-01 (FILETIME epoch) and 1970-01-01 (Unix epoch)
FILETIME_UNIX_OFFSET = 116_444_736_000_000_000

_GUID_RE = re.compile(r"^\{?([0-9A-Fa-f]{8})-([0-9A-Fa-f]{4})-([0-9A-Fa-f]{4})-([0-9A-Fa-f]{4})-([0-9A-Fa-f]{12})\}?$")
_SESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_GUEST_PATH_RE = re.compile(r"^[A-Za-z]:\\[^\x00-\x1f\"<>|?*]*$")
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_]+\\[^\\\x00-\x1f]+\\[^\x00-\x1f]+$")


class TraceParseError(LabError):
    """A guest trace could not be read at all (as opposed to a flagged partial result)."""


def validate_guid(value: str) -> str:
    """``{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}`` upper-case, braces added; else ConfigError."""
    m = _GUID_RE.match(value.strip()) if isinstance(value, str) else None
    if not m or (value.strip().startswith("{") != value.strip().endswith("}")):
        raise ConfigError(f"not a provider GUID: {value!r} (expected XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX)")
    return "{" + "-".join(g.upper() for g in m.groups()) + "}"


def validate_session(name: str) -> str:
    """An ETW session name logman accepts without quoting surprises."""
    if not isinstance(name, str) or not _SESSION_RE.match(name):
        raise ConfigError(f"not a usable trace session name: {name!r} "
                          "(letters, digits, '_', '.', '-'; at most 64)")
    return name


def validate_guest_path(path: str) -> str:
    """An absolute Windows path usable as a native-program argument.

    Drive-letter paths only; no double quote, control character or wildcard, and no
    trailing backslash (Windows PowerShell 5.1 would let it escape the closing quote
    it adds around arguments containing spaces).
    """
    if not isinstance(path, str) or not _GUEST_PATH_RE.match(path) or path.endswith("\\") \
            or "\\\\" in path[2:]:
        raise ConfigError(f"not a usable guest path: {path!r} (absolute drive-letter path, "
                          "no quotes, wildcards, control characters or trailing backslash)")
    return path


def looks_like_instance_id(value: object) -> bool:
    """True for ``ENUMERATOR\\DEVICE-ID\\INSTANCE`` shaped strings (PCI\\VEN_...\\3&...)."""
    return isinstance(value, str) and bool(_INSTANCE_RE.match(value)) and len(value) < 512


def filetime_to_unix_ns(ticks: int) -> int:
    """FILETIME (100-ns ticks since 1601 UTC) as nanoseconds since the Unix epoch."""
    return (int(ticks) - FILETIME_UNIX_OFFSET) * 100


def iso_to_unix_ns(text: str) -> int:
    """An ISO-8601 timestamp with up to 7 fractional digits (.NET ``ToString('o')``).

    Python's ``fromisoformat`` keeps microseconds only, so the 100-ns digit is parsed
    separately rather than lost.
    """
    m = re.match(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})?$", text.strip())
    if not m:
        raise ValueError(f"not an ISO-8601 timestamp: {text!r}")
    base = datetime.fromisoformat(m[1] + (m[3] or "Z").replace("Z", "+00:00"))
    if base.tzinfo is None:
        base = base.replace(tzinfo=timezone.utc)
    frac = (m[2] or "").ljust(9, "0")
    return int(base.timestamp()) * 1_000_000_000 + int(frac)


def flagged(data: dict[str, Any], *flags: str) -> dict[str, Any]:
    """``data`` with ``flags`` added to ``data['flags']`` (kept sorted, unique)."""
    out = dict(data)
    out["flags"] = sorted(set(out.get("flags", [])) | set(flags))
    return out


@dataclass
class ParsedTrace:
    """Events from one guest source plus what was wrong with the input.

    Nothing is dropped silently: a record that could not be interpreted is either an
    event carrying ``data['flags']`` or an entry in ``problems`` saying what and where.
    """

    events: list[Event] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def extend(self, other: ParsedTrace) -> None:
        self.events.extend(other.events)
        self.problems.extend(other.problems)


@dataclass(frozen=True)
class GuestScript:
    """One pinned guest command: a label, a fixed template and its parameters.

    ``script`` is exactly what runs in the guest (PowerShell source, before encoding);
    the golden file under tests/unit/data/windows/ pins it.
    """

    label: str
    template: str
    params: Mapping[str, PsValue] = field(default_factory=dict)
    structured: bool = False
    depth: int = 5
    timeout: float | None = None

    @property
    def script(self) -> str:
        if self.structured:
            return structured_script(self.template, self.params, depth=self.depth)
        return build_script(self.template, self.params)


def run_script(agent: Agent, gs: GuestScript) -> CommandResult:
    """Run ``gs`` on ``agent``.

    A PowerShell agent (WinRM, or SSH wrapped with ``POWERSHELL.encode``) takes the
    source; any other agent gets the encoded command line, which is plain
    ``[A-Za-z0-9+/= -]`` text and therefore valid for cmd.exe, OpenSSH's default shell.
    """
    if isinstance(agent.shell, PowerShell):
        return agent.run(gs.script, timeout=gs.timeout)
    return agent.run(POWERSHELL.encode(gs.script), timeout=gs.timeout)


def run_structured(agent: Agent, gs: GuestScript) -> list[Any]:
    if not gs.structured:
        raise ValueError(f"{gs.label} is not a structured script")
    return decode_structured(run_script(agent, gs).check().stdout)


def render_scripts(scripts: list[GuestScript]) -> str:
    """The golden-file form: label, then the exact script, for review against the docs."""
    parts = []
    for gs in scripts:
        parts.append(f"##### {gs.label}\n{gs.script}")
    return "\n".join(parts)
