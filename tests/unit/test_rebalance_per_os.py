"""Triggers honest per guest OS: what the validator refuses before any VM starts, what
the Windows halves send to the guest (no Linux shell through PowerShell), and the one
table the help and the README show."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab import operations as ops
from lab import rebalance as rb
from lab.cli import build_parser
from lab.scenario import validate_text
from lab.scenario.steps import REBALANCE_TRIGGERS, TRIGGER_EXERCISES
from lab.guest.windows.scripted_agent import ScriptedAgent, structured_stdout
from tests.unit.guest_fakes import behaviour
from vdevice.errors import SpecError
from vdevice.presets import default_topology
from vdevice.topology import HotplugMode

README = Path(__file__).resolve().parents[2] / "README.md"


class Resolver:
    def __call__(self, ref: Any, located: Any) -> Any:
        return default_topology(HotplugMode.NATIVE, model="AC97")


def _scenario(tmp_path: Path, step: str, *, os_name: str = "windows",
              edition: str | None = "win11") -> str:
    (tmp_path / "win.qcow2").write_bytes(b"")
    if edition is not None:
        (tmp_path / "win.qcow2.json").write_text(json.dumps({"edition": edition}))
    guest = "guest: {os: windows, image: win.qcow2}\n" if os_name == "windows" else ""
    return (f"name: t\n{guest}steps:\n  - plug: {{device: snd0, model: AC97, port: rp1}}\n"
            f"  - {step}\n")


def _refused(tmp_path: Path, text: str) -> SpecError:
    with pytest.raises(SpecError) as ei:
        validate_text(text, str(tmp_path / "t.yaml"), Resolver(), base_dir=tmp_path)
    return ei.value


@pytest.mark.parametrize("edition", ["win10", "win11"])
def test_cpu_hotplug_on_a_windows_client_is_refused_with_the_documented_reason(
        tmp_path: Path, edition: str) -> None:
    text = _scenario(tmp_path, "rebalance: {trigger: cpu-hotplug}", edition=edition)
    e = _refused(tmp_path, text)
    line = 2 + text.split("\n")[2:].index("  - rebalance: {trigger: cpu-hotplug}") + 1
    assert (e.line, e.field) == (line, "steps[1]"), str(e)
    assert str(e).startswith(f"{tmp_path / 't.yaml'}:{line}: steps[1]: not for a windows guest")
    assert "dynamically partitionable server running Windows Server" in str(e)
    assert "DEVPKEY_Device_DHP_Rebalance_Policy" in str(e) and edition in str(e)
    assert "trigger: wdtf" in str(e)


def test_cpu_hotplug_on_an_image_of_unknown_edition_is_refused(tmp_path: Path) -> None:
    e = _refused(tmp_path, _scenario(tmp_path, "rebalance: {trigger: cpu-hotplug}", edition=None))
    assert "edition is unknown" in str(e)


def test_cpu_hotplug_on_windows_server_is_allowed(tmp_path: Path) -> None:
    sc = validate_text(_scenario(tmp_path, "rebalance: {trigger: cpu-hotplug}", edition="server2022"),
                       str(tmp_path / "t.yaml"), Resolver(), base_dir=tmp_path)
    assert sc.guest.os == "windows"


def test_wdtf_on_linux_is_refused_at_its_line(tmp_path: Path) -> None:
    e = _refused(tmp_path, _scenario(tmp_path, "rebalance: {trigger: wdtf, device: snd0, "
                                               "action: rebalance}", os_name="linux"))
    assert (e.line, e.field) == (4, "steps[1]")
    assert "not for a linux guest" in str(e) and "WDTF" in str(e)


@pytest.mark.parametrize("step,field,needle", [
    ("rebalance: {trigger: wdtf, device: snd0, action: reboot}", "steps[1].rebalance.action",
     "restart"),
    ("rebalance: {trigger: wdtf, device: snd0, action: restart, instance: snd0}",
     "steps[1].rebalance.instance", "not a device instance id"),
    ("rebalance: {trigger: wdtf, device: snd0, action: restart, target: codec}",
     "steps[1].rebalance.target", "function"),
])
def test_bad_wdtf_steps_name_file_line_and_field(tmp_path: Path, step: str, field: str,
                                                 needle: str) -> None:
    e = _refused(tmp_path, _scenario(tmp_path, step))
    assert (e.line, e.field) == (5, field), str(e)
    assert needle in str(e)


def test_a_valid_wdtf_step(tmp_path: Path) -> None:
    sc = validate_text(_scenario(tmp_path, "rebalance: {trigger: wdtf, device: snd0, action: "
                                           "fail-restart}"),
                       str(tmp_path / "t.yaml"), Resolver(), base_dir=tmp_path)
    step = sc.sweep().iteration(0).steps[1]
    assert step.describe() == "rebalance wdtf fail-restart snd0"


def test_the_validator_no_longer_recommends_pressure_or_cpu_hotplug_to_windows(tmp_path: Path) -> None:
    e = _refused(tmp_path, _scenario(tmp_path, "rebalance: {trigger: rescan, device: snd0}"))
    assert "trigger: wdtf" in str(e)
    assert "pressure" not in str(e) and "cpu-hotplug" not in str(e)
    from lab.guest.windows.boot import _refusals
    for why in _refusals().values():
        assert "pressure or cpu-hotplug" not in why and "rebalances on its own" not in why


def test_every_trigger_says_what_it_exercises_per_os() -> None:
    assert set(TRIGGER_EXERCISES) == set(REBALANCE_TRIGGERS)
    for trig, per_os in TRIGGER_EXERCISES.items():
        assert set(per_os) == {"linux", "windows"} and all(per_os.values()), trig


def test_rebalance_help_shows_the_per_os_table() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["rebalance"].format_help()      # type: ignore[attr-defined]
    for trig in TRIGGER_EXERCISES:
        assert re.search(rf"^{re.escape(trig)}$", text, re.M), trig
    assert "windows refused: Linux sysfs; use wdtf" in text
    assert "QUERY_STOP/STOP/START" in text


def test_readme_triggers_table_has_both_oses_for_every_trigger() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Rebalance triggers", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in section.splitlines() if line.startswith("| trigger"))
    assert "Linux guest" in header and "Windows guest" in header
    for trig in TRIGGER_EXERCISES:
        assert re.search(rf"^\| `{re.escape(trig)}` \|", section, re.M), trig


# ---- the Windows halves send no Linux shell ---------------------------------------------

@dataclass
class FakeRun:
    events: list[Any] = field(default_factory=list)

    def record(self, ev: Any) -> None:
        self.events.append(ev)

    def log(self, line: str) -> None:
        pass

    def write_json(self, name: str, data: Any) -> None:
        pass




class FakeQmp:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def execute(self, cmd: str, args: Any = None) -> Any:
        self.calls.append((cmd, args))
        if cmd == "query-hotpluggable-cpus":
            return [{"type": "qemu64-x86_64-cpu", "props": {"socket-id": 0}, "qom-path": "/x"},
                    {"type": "qemu64-x86_64-cpu", "props": {"socket-id": 1}}]
        return {}


class FakeMachine:
    def __init__(self, agent: ScriptedAgent) -> None:
        self.topology = default_topology(HotplugMode.NATIVE, model="AC97")
        self.present = {"snd0"}
        self.agent = agent
        self.guest = behaviour("windows")
        self.run = FakeRun()
        self.qmp = FakeQmp()

    def require_running(self) -> None:
        pass


class NoSnapshot:
    def find(self, name: str) -> None:
        return None


class NoEvidence:
    def __init__(self, m: Any) -> None:
        self.before = NoSnapshot()

    def finish(self, report: rb.RebalanceReport) -> None:
        report.ended_ns = report.started_ns + 1


STATE = "'DEVPKEY_Device_DriverInfPath', 'DEVPKEY_Device_Service'"   # driver_check's state script


def _state(script: str, params: dict[str, str]) -> str:
    if "VEN_1B36&DEV_0005" in script:           # the pressure device: no in-box driver
        return structured_stdout([{"InstanceId": "PCI\\VEN_1B36&DEV_0005&SUBSYS_11001AF4&REV_00\\3&1&0&20",
                                   "Status": "Error", "ProblemCode": 28,
                                   "HardwareIds": ["PCI\\VEN_1B36&DEV_0005"]}])
    return structured_stdout([{"InstanceId": "PCI\\VEN_8086&DEV_2415&SUBSYS_11001AF4&REV_01\\3&1&0&18",
                               "Status": "OK", "ProblemCode": 0, "HardwareIds": ["PCI\\VEN_8086&DEV_2415"]}])


def test_pressure_on_windows_uses_host_truth_and_get_pnpdevice_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "Evidence", NoEvidence)
    monkeypatch.setattr(ops, "plug", lambda m, dev, **kw: None)
    monkeypatch.setattr(ops, "device_bdf_from_qemu", lambda m, qid: "0000:02:00.0")
    agent = ScriptedAgent().on(STATE, _state)      # anything else (test -e, cat) would raise
    rep = rb.pressure(FakeMachine(agent), "snd0", size=64 << 20)   # type: ignore[arg-type]
    assert [c.fragment for c in agent.calls] == [STATE, STATE]
    assert not any("/sys/" in c.script for c in agent.calls)
    assert "pressure_bar_assigned" not in rep.details
    assert rep.details["pressure_guest_state"][0]["problem_code"] == 28
    assert any("problem code 28 (CM_PROB_FAILED_INSTALL)" in n and "takes no resources" in n
               for n in rep.notes), rep.notes


def test_cpu_hotplug_on_windows_server_sends_no_linux_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "Evidence", NoEvidence)
    agent = ScriptedAgent()                      # answers nothing: any guest command fails
    m = FakeMachine(agent)
    rep = rb.cpu_hotplug(m)   # type: ignore[arg-type]
    assert agent.calls == []
    assert ("device_add", {"driver": "qemu64-x86_64-cpu", "id": "cpu1", "socket-id": 1}) in m.qmp.calls
    assert any("no PCI resource moved" in n for n in rep.notes)
