"""The wdtf trigger: WDTF's Enhanced Device Testing over the agent (lab.guest.windows.wdtf),
checked with the scripted agent against the pinned scripts, and the host's proof of a
real BAR move (lab.rebalance.wdtf)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from lab import rebalance as rb
from lab.agent.powershell import POWERSHELL
from lab.errors import ConfigError, LabError
from lab.pci_state import Change
from lab.guest.windows.trace.common import render_scripts
from lab.guest.windows import image as winimage
from lab.guest.windows import vmconfig
from lab.guest.windows import wdtf as W
from tests.unit.guest_fakes import behaviour
from lab.guest.windows.scripted_agent import ScriptedAgent, structured_stdout
from tests.unit.test_windows_image import (PASSWORD, DirMedia, SimulatedInstall, fake_caps,
                                           fake_qemu_img, iso, ovmf)
from vdevice.presets import default_topology
from vdevice.topology import HotplugMode

DATA = Path(__file__).parent / "data" / "windows"
GOLDEN = DATA / "wdtf_commands.golden"
__all__ = ["iso", "ovmf"]          # the image tests' fixtures, used by name below
AC97_ID = "PCI\\VEN_8086&DEV_2415&SUBSYS_11001AF4&REV_01\\3&267A616A&0&18"
PREPARE = "$r.RebootRequired = $false"     # a fragment only the prepare script has
ACTION = "$pnp = $target.GetInterface('PNP')"


def test_pinned_scripts_match_the_golden_file() -> None:
    text = render_scripts(W.planned_scripts())
    if os.environ.get("REBALAB_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "the WDTF scripts changed: review them against the WDTF pages cited in "
        "lab/guest/windows/wdtf.py, then regenerate with REBALAB_UPDATE_GOLDEN=1")


def test_every_script_fits_a_cmd_exe_command_line() -> None:
    for gs in W.planned_scripts():
        assert len(POWERSHELL.encode(gs.script, limit=8191)) <= 8191, gs.label


def test_the_only_sdel_is_fixed_and_the_device_travels_as_data() -> None:
    hostile = "PCI\\VEN_8086&DEV_2415' ; Remove-Item C:\\ -Recurse; '$(calc)"
    gs = W.prepare_script(W.WdtfTarget(hardware_ids=(hostile,)))
    body = gs.script.split("$__rebalab_out", 1)[1]
    assert hostile not in body and "calc" not in body     # only in the $p header, quoted
    assert "Query('IsPhantom=false')" in body and body.count(".Query(") == 1
    # the method is chosen from a fixed switch in the guest too, never invoked by name
    act = W.action_script("rebalance", AC97_ID).script
    assert ("'EDTTryStopDeviceRequestNewResources' { $r.Success = [bool]"
            "$pnp.EDTTryStopDeviceRequestNewResources() }") in act
    assert "InvokeMember" not in act and "Invoke-Expression" not in act


def test_actions_map_to_the_documented_methods() -> None:
    assert W.ACTIONS == {"restart": "EDTTryStopDevice",
                         "rebalance": "EDTTryStopDeviceRequestNewResources",
                         "cancel-stop": "EDTCancelStopDevice",
                         "fail-restart": "EDTTryStopDeviceFailRestart"}
    with pytest.raises(ConfigError, match="unknown WDTF action 'reboot'"):
        W.method_for("reboot")


def test_target_needs_an_instance_id_or_hardware_ids() -> None:
    with pytest.raises(ConfigError, match="needs an instance id"):
        W.WdtfTarget()
    with pytest.raises(ConfigError, match="not a device instance id"):
        W.WdtfTarget(instance_id="snd0")


def _prep(**rec: Any) -> dict[str, Any]:
    return {"Wdtf": "ok", "Matches": 1, "InstanceId": AC97_ID, "Edt": "ok", "WasEnabled": False,
            "Enabled": True, "RebootRequired": False} | rec


def test_prepare_enables_edt_and_names_the_instance() -> None:
    agent = ScriptedAgent().on(PREPARE, structured_stdout([_prep()]))
    got = W.prepare(agent, W.WdtfTarget(hardware_ids=("PCI\\VEN_8086&DEV_2415",)))
    assert got == W.Prepared(AC97_ID, was_enabled=False, enabled_now=True)
    assert "HardwareIds = @('PCI\\VEN_8086&DEV_2415')" in agent.calls[0].script


@pytest.mark.parametrize("rec,exc,needle", [
    ({"Wdtf": "missing", "Error": "WDTF2.WDTF: Class not registered"}, W.WdtfMissing,
     "rebalab image windows --wdtf"),
    (_prep(Edt="missing"), W.WdtfMissing, "no EDT action"),
    ({"Wdtf": "ok", "Matches": 0, "Candidates": []}, LabError, "found no present device"),
    ({"Wdtf": "ok", "Matches": 2, "Candidates": [AC97_ID, AC97_ID.replace("18", "20")]}, LabError,
     "name one with 'instance:'"),
    (_prep(RebootRequired=True), LabError, "needs a guest restart"),
    (_prep(Enabled=False), LabError, "still not enabled"),
])
def test_prepare_errors_say_what_to_do(rec: dict[str, Any], exc: type[Exception], needle: str) -> None:
    agent = ScriptedAgent().on(PREPARE, structured_stdout([rec]))
    with pytest.raises(exc, match=needle.replace("(", r"\(").replace(")", r"\)")):
        W.prepare(agent, W.WdtfTarget(hardware_ids=("PCI\\VEN_8086&DEV_2415",)))


def _done(**rec: Any) -> dict[str, Any]:
    return {"Wdtf": "ok", "Matches": 1, "InstanceId": AC97_ID, "Edt": "ok",
            "Method": "EDTTryStopDeviceRequestNewResources", "Success": True, "Error": None,
            "HResult": None, "StartedUtcFileTime": 133_000_000_000_000_000, "ElapsedMs": 812.5,
            "PresentAfter": True, "StatusAfter": "OK", "ProblemCodeAfter": None} | rec


def test_action_outcome_and_device_state_after() -> None:
    agent = ScriptedAgent().on(ACTION, structured_stdout([_done()]))
    out = W.run_action(agent, "rebalance", AC97_ID)
    assert agent.calls[0].params["Method"] == "EDTTryStopDeviceRequestNewResources"
    assert agent.calls[0].params["InstanceId"] == AC97_ID
    assert out.success is True and out.elapsed_ms == 812.5 and out.status_after == "OK"
    assert "WDTF reported success" in out.summary()


def test_failed_restart_reports_the_problem_code_and_a_com_error_is_not_raised() -> None:
    agent = ScriptedAgent().on(ACTION, structured_stdout([_done(
        Method="EDTTryStopDeviceFailRestart", Success=None,
        Error="Exception from HRESULT: 0x80070490", HResult=-2147023728,
        StatusAfter="Error", ProblemCodeAfter=10)]))
    out = W.run_action(agent, "fail-restart", AC97_ID)
    assert out.success is None and out.hresult == -2147023728
    assert "problem code 10 (CM_PROB_FAILED_START)" in out.summary()
    assert out.to_json()["expected"].startswith("QUERY_STOP, STOP, a START failed")


def test_action_without_edt_enabled_is_refused() -> None:
    agent = ScriptedAgent().on(ACTION, structured_stdout([_prep(Edt="disabled")]))
    with pytest.raises(LabError, match="prepare step must run first"):
        W.run_action(agent, "restart", AC97_ID)


# ---- the host's proof: lab.rebalance.wdtf ------------------------------------------------

@dataclass
class FakeRun:
    events: list[Any] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def record(self, ev: Any) -> None:
        self.events.append(ev)

    def log(self, line: str) -> None:
        self.lines.append(line)

    def write_json(self, name: str, data: Any) -> None:
        pass




class FakeMachine:
    def __init__(self, agent: ScriptedAgent, os_name: str = "windows") -> None:
        self.topology = default_topology(HotplugMode.NATIVE, model="AC97")
        self.present = {"snd0"}
        self.agent = agent
        self.guest = behaviour(os_name)
        self.run = FakeRun()

    def require_running(self) -> None:
        pass


def _evidence(changes: list[Change]) -> type:
    class FakeEvidence:
        def __init__(self, m: Any) -> None:
            self.m = m

        def finish(self, report: rb.RebalanceReport) -> None:
            report.changes = list(changes)
            report.audio_moved = any(c.device == report.device and c.what.startswith("BAR")
                                     and c.old_address != c.new_address for c in changes)
            report.ended_ns = report.started_ns + 1
    return FakeEvidence


BAR_MOVE = Change("snd0", "0000:01:00.0", "BAR0", "mem32 0xfe800000+0x1000",
                  "mem32 0x20000000+0x1000", 0xFE800000, 0x20000000, 0x1000, 0x1000)


def _agent(**done: Any) -> ScriptedAgent:
    return (ScriptedAgent().on(PREPARE, structured_stdout([_prep(WasEnabled=True)]))
            .on(ACTION, structured_stdout([_done(**done)])))


def test_rebalance_is_proven_by_a_bar_move(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "Evidence", _evidence([BAR_MOVE]))
    m = FakeMachine(_agent())
    rep = rb.wdtf(m, "snd0", action="rebalance")   # type: ignore[arg-type]
    assert rep.trigger == "wdtf-rebalance" and rep.audio_moved
    assert rep.details["bar_moves"][0]["new_address"] == 0x20000000
    assert any("BAR0 mem32 0xfe800000+0x1000 -> mem32 0x20000000+0x1000" in n for n in rep.notes)
    # only the two pinned scripts went to the guest: no Linux sysfs shell
    assert [c.fragment for c in m.agent.calls] == [PREPARE, ACTION]
    assert "HardwareIds = @('PCI\\VEN_8086&DEV_2415')" in m.agent.calls[0].script


def test_a_rebalance_without_a_bar_move_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "Evidence", _evidence([]))
    rep = rb.wdtf(FakeMachine(_agent()), "snd0", action="rebalance")   # type: ignore[arg-type]
    assert not rep.audio_moved
    assert any("saw no BAR of snd0 move" in n and "no rebalance onto new resources" in n
               for n in rep.notes)


def test_function_target_needs_an_hda_controller(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rb, "Evidence", _evidence([]))
    with pytest.raises(LabError, match="only an HD Audio controller"):
        rb.wdtf(FakeMachine(_agent()), "snd0", action="restart", target="function")  # type: ignore[arg-type]


def test_wdtf_on_linux_is_unsupported() -> None:
    with pytest.raises(rb.Unsupported, match="on Linux use rescan"):
        rb.wdtf(FakeMachine(_agent(), "linux"), "snd0", action="restart")  # type: ignore[arg-type]


def test_missing_wdtf_stops_before_any_evidence(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(m: Any) -> Iterator[None]:
        raise AssertionError("evidence must not start when WDTF is missing")
    monkeypatch.setattr(rb, "Evidence", boom)
    agent = ScriptedAgent().on(PREPARE, structured_stdout([{"Wdtf": "missing", "Error": "x"}]))
    with pytest.raises(W.WdtfMissing, match="rebalab image windows --wdtf"):
        rb.wdtf(FakeMachine(agent), "snd0", action="cancel-stop")   # type: ignore[arg-type]


def test_the_action_fits_cmd_exe_with_the_longest_instance_id() -> None:
    # device instance ids are at most MAX_DEVICE_ID_LEN (200) characters
    # (learn.microsoft.com/windows-hardware/drivers/install/device-instance-ids)
    longest = "PCI\\" + "X" * 95 + "\\" + "Y" * 100
    assert len(longest) == 200
    for action in W.ACTIONS:
        gs = W.action_script(action, longest)
        assert len(POWERSHELL.encode(gs.script, limit=8191)) <= 8191, action


# ---- rebalab image windows --wdtf -------------------------------------------------------

PROVISION = Path(__file__).resolve().parents[2] / "images" / "windows" / "provision.ps1"


def _wdtf_dir(tmp_path: Path) -> Path:
    d = tmp_path / "wdtf"
    d.mkdir()
    (d / "WDTF_Desktop_Kit_Product-x64_en-us.msi").write_bytes(b"msi")
    (d / "OneCoreUap_WDTF_Desktop_Kit_Content-x64_en-us.msi").write_bytes(b"msi")
    (d / "Taef-x64_en-us.msi").write_bytes(b"not wdtf")
    (d / "data1.cab").write_bytes(b"cab")
    return d


def test_wdtf_msis_in_install_order(tmp_path: Path) -> None:
    assert [p.name for p in winimage.wdtf_msis(_wdtf_dir(tmp_path))] == [
        "OneCoreUap_WDTF_Desktop_Kit_Content-x64_en-us.msi", "WDTF_Desktop_Kit_Product-x64_en-us.msi"]


def test_wdtf_dir_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--wdtf: folder not found"):
        winimage.check_wdtf_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no WDTF \.msi.*Testing\\Runtimes"):
        winimage.check_wdtf_dir(tmp_path / "empty")


class WdtfInstall(SimulatedInstall):
    """provision.ps1's wdtf step as it reports itself in manifest.json."""

    def __init__(self, com_ok: bool) -> None:
        super().__init__()
        self.com_ok = com_ok
        self.config: dict[str, Any] = {}

    def run(self, argv: Any, **kw: Any) -> None:
        super().run(argv, **kw)
        prov = Path(next(a for a in argv if "id=prov" in a).split("file=", 1)[1].split(",", 1)[0])
        self.config = json.loads((prov / "provision.json").read_text())
        assert (prov / self.config["wdtf_dir"] / "WDTF_Desktop_Kit_Product-x64_en-us.msi").is_file()
        (prov / "manifest.json").write_text(json.dumps({"schema": 1, "driver": None, "wdtf": {
            "msis": [{"msi": "WDTF_Desktop_Kit_Product-x64_en-us.msi", "exit_code": 0}],
            "com_ok": self.com_ok, "progid": "WDTF2.WDTF" if self.com_ok else None,
            "error": None if self.com_ok else "New-Object -ComObject WDTF.WDTF: Class not registered"}}))


def _build(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths, runner: WdtfInstall) -> Any:
    spec = winimage.WindowsImageSpec(iso=iso, out=tmp_path / "b" / "w.qcow2", ovmf=ovmf,
                                     wdtf_dir=_wdtf_dir(tmp_path))
    return spec, winimage.build(spec, kvm_available=lambda: True, media=DirMedia(), runner=runner,
                                password=lambda: PASSWORD, qemu_img=fake_qemu_img(tmp_path),
                                which=lambda t: "/bin/" + t, log=lambda m: None, **fake_caps())


def test_build_with_wdtf_stages_it_and_records_the_install(tmp_path: Path, iso: Path,
                                                         ovmf: vmconfig.OvmfPaths) -> None:
    runner = WdtfInstall(com_ok=True)
    spec, manifest = _build(tmp_path, iso, ovmf, runner)
    assert runner.config["wdtf_dir"] == "wdtf"
    assert manifest.wdtf["progid"] == "WDTF2.WDTF"
    assert json.loads(spec.manifest_path.read_text())["wdtf"]["com_ok"] is True


def test_build_fails_when_wdtf_did_not_install(tmp_path: Path, iso: Path, ovmf: vmconfig.OvmfPaths) -> None:
    with pytest.raises(LabError, match="--wdtf: the WDTF runtime did not install.*Class not registered"):
        _build(tmp_path, iso, ovmf, WdtfInstall(com_ok=False))
    assert not (tmp_path / "b" / "w.qcow2").exists()


def test_cli_takes_wdtf(tmp_path: Path) -> None:
    import argparse

    from lab.guest.windows import cli as wincli

    p = argparse.ArgumentParser()
    wincli.add_image_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["image", "windows", "--iso", "x.iso", "--out", "o.qcow2", "--wdtf", str(tmp_path)])
    assert wincli._spec_from_args(a).wdtf_dir == tmp_path


def test_provision_installs_wdtf_as_the_lab_expects() -> None:
    text = PROVISION.read_text(encoding="utf-8")
    step = text.split("Invoke-Step 'wdtf'", 1)[1].split("# 10. ---", 1)[0]
    assert "'/i'" in step and "'/qn'" in step and "'/norestart'" in step and "'/l*v'" in step
    assert "@(0, 3010) -notcontains" in step and "-like '*WDTF*'" in step
    # the same progids, in the same order, as the trigger's scripts
    assert "@('WDTF2.WDTF', 'WDTF.WDTF')" in step and "@('WDTF2.WDTF', 'WDTF.WDTF')" in W._CREATE
