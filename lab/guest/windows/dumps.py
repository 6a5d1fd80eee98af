"""Fetch Windows crash dumps (MEMORY.DMP, Minidump\\*.dmp) into RUN_DIR/dumps.

Where Windows writes them is read from the guest, not assumed: the CrashControl values
DumpFile and MinidumpDir (HKLM\\SYSTEM\\CurrentControlSet\\Control\\CrashControl,
documented through Win32_OSRecoveryConfiguration's DebugFilePath / MiniDumpDirectory
mappings), expanded with the guest's environment. The listing is a pinned script;
each file is copied with the agent's ``get`` (SHA-256 verified for WinRM).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.agent.base import Agent
from lab.errors import AgentError
from lab.guest.windows.trace.common import GuestScript, run_structured

_LIST = r"""
$cc = Get-ItemProperty -Path 'HKLM:\SYSTEM\CurrentControlSet\Control\CrashControl' -ErrorAction SilentlyContinue
$dump = if ($cc -and $cc.DumpFile) { [Environment]::ExpandEnvironmentVariables([string]$cc.DumpFile) } else { Join-Path $env:SystemRoot 'MEMORY.DMP' }
$mini = if ($cc -and $cc.MinidumpDir) { [Environment]::ExpandEnvironmentVariables([string]$cc.MinidumpDir) } else { Join-Path $env:SystemRoot 'Minidump' }
$files = @()
if (-not $p.MinidumpOnly -and (Test-Path -LiteralPath $dump -PathType Leaf)) { $files += Get-Item -LiteralPath $dump }
if (Test-Path -LiteralPath $mini -PathType Container) { $files += @(Get-ChildItem -LiteralPath $mini -Filter '*.dmp' -File) }
foreach ($f in $files) {
    [pscustomobject]@{
        Path = $f.FullName
        Name = $f.Name
        Kind = if ($f.FullName -eq $dump) { 'memory' } else { 'minidump' }
        Length = [int64]$f.Length
        LastWriteUtc = $f.LastWriteTimeUtc.ToString('o')
    }
}
"""


def list_script(minidump_only: bool = False) -> GuestScript:
    return GuestScript("dumps: list crash dumps", _LIST, {"MinidumpOnly": bool(minidump_only)},
                       structured=True, depth=2, timeout=60.0)


@dataclass(frozen=True)
class DumpFile:
    remote: str
    local: str
    kind: str
    length: int
    last_write_utc: str


_SAFE_NAME = re.compile(r"^[A-Za-z0-9._\-]{1,128}$")


def collect_dumps(agent: Agent, run_dir: Path, *, minidump_only: bool = False) -> list[DumpFile]:
    """Copy the guest's crash dumps into ``run_dir/dumps``; writes ``dumps/index.json``."""
    records = run_structured(agent, list_script(minidump_only))
    out_dir = run_dir / "dumps"
    got: list[DumpFile] = []
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("Path"), str):
            continue
        name = str(rec.get("Name") or "")
        if not _SAFE_NAME.match(name):
            raise AgentError(f"refusing a dump file name from the guest: {name!r}")
        kind = "minidump" if rec.get("Kind") == "minidump" else "memory"
        local = out_dir / ("Minidump" if kind == "minidump" else "") / name
        local.parent.mkdir(parents=True, exist_ok=True)
        agent.get(rec["Path"], local)
        got.append(DumpFile(remote=rec["Path"], local=str(local.relative_to(run_dir)), kind=kind,
                            length=int(rec.get("Length") or 0), last_write_utc=str(rec.get("LastWriteUtc") or "")))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "index.json").write_text(json.dumps([asdict(d) for d in got], indent=2) + "\n", encoding="utf-8")
    return got
