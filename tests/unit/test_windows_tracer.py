"""WindowsTracer: the pinned guest scripts (golden file) and a full start/stop cycle
against an agent that answers with the documented-format samples."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.agent.base import Agent, CommandResult
from lab.agent.powershell import JSON_MARKER, POWERSHELL, PowerShell, script_params
from lab.errors import AgentError, ConfigError
from lab.events import Kind, Source
from lab.guest.windows.trace import wpp
from lab.guest.windows.trace.tracer import WindowsTraceConfig, WindowsTracer, render_planned

DATA = Path(__file__).parent / "data" / "windows"
GOLDEN = DATA / "tracer_commands.golden"

GOLDEN_CONFIG = WindowsTraceConfig(
    tracelogging_providers=("{11111111-2222-3333-4444-555555555555}",),
    wpp_providers=("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",),
    wpp_format=wpp.WppFormatting(tracefmt="C:\\rebalab\\tools\\tracefmt.exe", pdb="C:\\rebalab\\driver\\mydrv.pdb",
                                 tracepdb="C:\\rebalab\\tools\\tracepdb.exe"),
    instance_ids=("PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&2411E6FE&0&10",),
)


def test_planned_commands_match_the_golden_file() -> None:
    text = render_planned(WindowsTracer(GOLDEN_CONFIG))
    if os.environ.get("REBALAB_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.exists(), "run with REBALAB_UPDATE_GOLDEN=1 once to create the golden file"
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "the guest commands changed: review the diff against the Microsoft docs cited in "
        "lab/guest/windows/trace/*.py, then regenerate with REBALAB_UPDATE_GOLDEN=1")


def test_every_planned_script_fits_a_cmd_exe_command_line() -> None:
    # an SSH agent whose default shell is cmd.exe has 8191 characters
    for gs in WindowsTracer(GOLDEN_CONFIG).planned_scripts():
        assert len(POWERSHELL.encode(gs.script, limit=8191)) <= 8191, gs.label


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="no TMF"):
        WindowsTraceConfig(wpp_providers=("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",))
    with pytest.raises(ConfigError):
        WindowsTraceConfig(tracelogging_providers=("not-a-guid",))
    with pytest.raises(ConfigError):
        WindowsTraceConfig(workdir="C:\\trace dir\\")
    with pytest.raises(ConfigError, match="different names"):
        WindowsTraceConfig(session="x", wpp_session="x")


def _structured(objs: object) -> str:
    return JSON_MARKER + base64.b64encode(json.dumps(objs).encode()).decode() + "\r\n"


class SampleGuest(Agent):
    """Answers the tracer's scripts with the samples in tests/unit/data/windows."""

    shell = PowerShell()

    def __init__(self, setupapi_size: int = 0) -> None:
        self.scripts: list[str] = []
        self.setupapi_size = setupapi_size
        self.fail_on: str | None = None

    def run(self, command: str, timeout: float | None = None) -> CommandResult:
        self.scripts.append(command)
        p = script_params(command)
        out, code = "", 0
        if self.fail_on and self.fail_on in command:
            return CommandResult(command, 1, "", "logman: access denied", 0.0)
        if "rebalab-clock" in command:
            # the clock exchange: process start 40 ms before the read (FILETIME, 100 ns)
            out = "rebalab-clock 133497000000000000 133497000000400000\r\n"
        elif "UtcOffsetMinutes" in command:
            out = _structured([{"Length": self.setupapi_size, "GuestUtcFileTime": 133497000000000000,
                                "UtcOffsetMinutes": 0}])
        elif "Get-WinEvent" in command:
            out = _structured(json.loads((DATA / "kernel_pnp_events.json").read_text()))
        elif "Get-PnpDevice" in command:
            out = _structured(json.loads((DATA / "pnp_state.json").read_text()))
        elif "[IO.FileShare]::ReadWrite" in command and "MaxBytes" in command:
            raw = (DATA / "setupapi.dev.log").read_bytes()
            off = int(command.split("Offset = ", 1)[1].split("\n", 1)[0])
            out = _structured([{"Offset": off, "Length": len(raw), "Rotated": False, "Missing": False,
                                "Truncated": False, "Data": base64.b64encode(raw[off:]).decode()}])
        elif "ReadAllBytes($p.Path)" in command:
            assert p["Path"].endswith("wpp.txt")
            out = _structured([{"Missing": False,
                                "Data": base64.b64encode((DATA / "wpp_tracefmt.txt").read_bytes()).decode()}])
        return CommandResult(command, code, out, "", 0.01)

    def wait_ready(self, timeout: float) -> None:
        pass

    def stream(self, command: str, stop: object = None) -> Iterator[str]:
        return iter(())

    def put(self, local: Path, remote: str) -> None:
        raise NotImplementedError

    def get(self, remote: str, local: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def test_start_stop_cycle(tmp_path: Path) -> None:
    guest = SampleGuest(setupapi_size=0)
    tracer = WindowsTracer(GOLDEN_CONFIG, out_dir=tmp_path)
    tracer.start(guest)
    assert any("logman.exe create trace" in s for s in guest.scripts)
    events = tracer.stop(guest)
    by_source: dict[Source, int] = {}
    for e in events:
        by_source[e.source] = by_source.get(e.source, 0) + 1
    assert by_source == {Source.GUEST_ETW: 12, Source.GUEST_PNP: 4, Source.GUEST_SETUPAPI: 8, Source.GUEST_WPP: 6}
    # the exact commands sent are the planned ones (with the recorded setupapi offset)
    sent_labels = len(guest.scripts)
    assert tracer.clock is not None
    rounds = len(tracer.clock.samples)
    assert rounds >= 1 and sum("rebalab-clock" in s for s in guest.scripts) == rounds
    assert sent_labels == len(tracer.start_scripts()) + rounds + len(tracer.stop_scripts(0))
    for name in ("kernel-pnp.json", "pnp-state.json", "setupapi.dev.log.tail", "wpp.txt",
                 "windows-events.jsonl", "windows-trace-problems.txt", "windows-trace-start.json",
                 "clock-exchange.json"):
        assert (tmp_path / name).is_file(), name
    problems = (tmp_path / "windows-trace-problems.txt").read_text()
    assert "bad or missing TimeCreated" in problems and "no InstanceId" in problems
    assert sum(1 for _ in (tmp_path / "windows-events.jsonl").open()) == len(events)
    assert any(e.kind is Kind.REBALANCE_START for e in events)


def test_setupapi_offset_is_used(tmp_path: Path) -> None:
    raw = (DATA / "setupapi.dev.log").read_bytes()
    offset = raw.index(b">>>  [Device Install (Hardware initiated) - PCI\\VEN_1B36")
    guest = SampleGuest(setupapi_size=offset)
    tracer = WindowsTracer(WindowsTraceConfig(), out_dir=tmp_path)
    tracer.start(guest)
    events = tracer.stop(guest)
    sections = [e for e in events if e.kind is Kind.SETUPAPI_SECTION]
    assert len(sections) == 5
    assert f"Offset = {offset}" in guest.scripts[-1]


def test_failing_guest_command_is_an_agent_error(tmp_path: Path) -> None:
    guest = SampleGuest()
    guest.fail_on = "logman.exe create trace"
    with pytest.raises(AgentError, match="status 1"):
        WindowsTracer(WindowsTraceConfig(), out_dir=tmp_path).start(guest)
    with pytest.raises(AgentError, match="before start"):
        WindowsTracer().stop(guest)


def test_encoded_route_for_non_powershell_agents(tmp_path: Path) -> None:
    class CmdGuest(SampleGuest):
        shell = __import__("lab.agent.posix", fromlist=["PosixShell"]).PosixShell()

        def run(self, command: str, timeout: float | None = None) -> CommandResult:
            assert command.startswith("powershell -NoProfile -NonInteractive -EncodedCommand ")
            from lab.agent.powershell import decode_encoded_command

            return super().run(decode_encoded_command(command), timeout)

    guest = CmdGuest()
    tracer = WindowsTracer(WindowsTraceConfig(), out_dir=tmp_path)
    tracer.start(guest)
    assert tracer.stop(guest)


def test_record_event_manifest(tmp_path: Path) -> None:
    class ManifestGuest(SampleGuest):
        def run(self, command: str, timeout: float | None = None) -> CommandResult:
            assert "wevtutil.exe gp $p.Provider /ge /gm:true" in command
            return CommandResult(command, 0, (DATA / "wevtutil_gp_kernel_pnp.txt").read_text(), "", 0.1)

    tracer = WindowsTracer(out_dir=tmp_path)
    missing = tracer.record_event_manifest(ManifestGuest())
    assert 852 in missing and 410 not in missing
    assert (tmp_path / "kernel-pnp-manifest.txt").is_file()
    assert tracer.problems
