"""The Windows pipeline end to end, WITHOUT Windows: a SIMULATION of the guest side.

What is real: QEMU (TCG here) booting the built-in Linux image for the hardware side,
the audio device's ``device_add``/``device_del`` with their QMP events, ``query-pci``
and QEMU's trace, and the lab's own Windows path through them — ``ScenarioRunner``
(plug/unplug with the Windows PnP waits, the ``wdtf`` trigger and its host-side BAR
check), ``Observation`` with ``WindowsTracer`` (ETW/WPP sessions, clock exchange,
decoding, parsing), the timeline's Windows alignment, the Windows PnP rules, and
summary.json / junit.xml / report.html.

What is scripted: every answer of the "Windows guest" (``lab.guest.windows.simulated``): the
pinned PowerShell scripts are answered in Microsoft's documented formats, from a
per-case guest script (``CASES``: the driver's WPP messages in the PortCls patterns,
WDTF's outcome). The guest's clock runs 2.75 s behind the host's, so the messages land
inside the WDTF operation (the phase in each signature) only if the clock exchange and
the alignment work. Nothing here says how Windows or a real driver behaves.

The verdicts are not written anywhere in the scripts: the test asserts what the real
runner, timeline and rules made of the scripted events. One run directory per case is
kept under the e2e artifacts directory (its path is printed).
"""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from lab.image import GuestImage
from lab.runner import ScenarioRunner, load_scenario
from lab.scenario.overrides import Overrides
from lab.guest.windows.trace.config import GUEST_TMF, from_spec
from lab.guest.windows.simulated import SIMULATION_NOTE, DriverLine, SimulatedWindowsGuest, WindowsCase
from tests.e2e.conftest import ARTIFACTS

SCENARIO = Path(__file__).parent / "data" / "windows_sim" / "wdtf-simulated.yaml"
L = DriverLine

#: the guest scripts: what the simulated driver traces during the WDTF action
CASES: dict[str, WindowsCase] = {c.name: c for c in (
    WindowsCase("clean-restart-new-resources", "rebalance", (
        L(0, "PnpQueryStop enter"), L(3, "PnpQueryStop exit status=0x0"),
        L(10, "PnpStop enter"), L(16, "PnpStop exit status=STATUS_SUCCESS"),
        L(60, "StartDevice resources: {moved}"))),
    WindowsCase("stop-without-query-stop", "restart", (
        L(0, "PnpStop enter"), L(6, "PnpStop exit status=STATUS_SUCCESS"),
        L(40, "StartDevice resources: {resources}"))),
    WindowsCase("cancel-stop-without-query-stop", "cancel-stop", (
        L(0, "PnpCancelStop enter"), L(2, "PnpCancelStop exit status=0x0"))),
    WindowsCase("failed-restart-surprise-removed", "fail-restart", (
        L(0, "PnpQueryStop enter"), L(3, "PnpQueryStop exit status=0x0"),
        L(10, "PnpStop enter"), L(15, "PnpStop exit status=STATUS_SUCCESS"),
        L(40, "StartDevice enter"), L(45, "StartDevice exit status=0xC000009A"),
        L(80, "PnpHandler IRP_MN_SURPRISE_REMOVAL status=0x0"),
        L(120, "PnpHandler IRP_MN_REMOVE_DEVICE status=0x0")),
        status_after="Error", problem_after=10, present_after=False, start_problem=10),
    WindowsCase("query-stop-slower-than-the-lock-limit", "restart", (
        L(0, "PnpQueryStop enter"), L(120, "PnpQueryStop exit status=0x0"),
        L(130, "PnpStop enter"), L(135, "PnpStop exit status=STATUS_SUCCESS"),
        L(170, "StartDevice resources: {resources}"))),
)}

#: what the rules must report per case, on the device under test: (rule, phase)
EXPECTED: dict[str, list[tuple[str, str]]] = {
    "clean-restart-new-resources": [],
    "stop-without-query-stop": [("pnp.stop-without-query-stop", "rebalance:wdtf-restart")],
    "cancel-stop-without-query-stop": [],
    "failed-restart-surprise-removed": [("pnp.restart-failed", "rebalance:wdtf-fail-restart")],
    "query-stop-slower-than-the-lock-limit": [("pnp.query-stop-slow", "rebalance:wdtf-restart")],
}

ACTIONS = ["restart", "rebalance", "cancel-stop", "fail-restart"]   # the scenario's grid
RUNS = ARTIFACTS / "windows-simulated"


def _run(case: WindowsCase, image: GuestImage) -> tuple[Path, dict[str, Any], SimulatedWindowsGuest]:
    overrides = Overrides(sets=(f"action={case.action}",))
    scenario = overrides.apply(load_scenario(SCENARIO))
    trace = scenario.guest.trace
    assert trace is not None and trace.device == "snd0"
    guest = SimulatedWindowsGuest(case, "snd0", trace_config=from_spec(trace, device=trace.device),
                                  image=image)
    runner = ScenarioRunner(scenario, runs_root=RUNS, accel="tcg", name_suffix=f"-{case.name}",
                            overrides=overrides, guest=guest)
    runner.execute()
    print(f"\n{case.name}: run directory {runner.run.path}")
    return runner.run.path, json.loads((runner.run.path / "summary.json").read_text()), guest


@pytest.mark.parametrize("name", list(CASES))
def test_windows_case_through_the_real_pipeline(name: str, image: GuestImage) -> None:
    """SIMULATED guest side (see the module docstring): one case through ScenarioRunner
    with real QEMU; its violations on snd0 are the rules' verdict on the scripted trace."""
    case = CASES[name]
    run, summary, guest = _run(case, image)
    results = summary["results"] if "results" in summary else summary["iterations"]
    assert len(results) == 1, results
    res = results[0]
    assert res["status"] in ("passed", "failed"), (res.get("error"), res.get("stopped_at"))
    got = sorted((v["rule"], v["device"], v["phase"]) for v in res["violations"])
    want = sorted((rule, "snd0", phase) for rule, phase in EXPECTED[name])
    assert got == want, json.dumps(res["violations"], indent=1)[:3000]
    assert res["status"] == ("failed" if want else "passed")

    # the guest side really was asked: the pinned scripts, in the pipeline's order
    agent = guest.agents[-1]
    assert agent.actions == [case.action]
    assert agent.uploads == [(str(SCENARIO.parent / "simdrv.tmf"), "C:\\rebalab\\trace\\" + GUEST_TMF)]
    # the driver's messages came through the tracer, attributed to the device under test
    it = run / "iterations" / "0"
    timeline = [json.loads(line) for line in (it / "timeline.jsonl").read_text().splitlines()]
    header, events = timeline[0], timeline[1:]
    wpp = [e for e in events if e.get("source") == "guest.wpp"]
    assert wpp and all((e.get("device") or {}).get("qom") == "snd0" for e in wpp), wpp[:3]
    # the clock exchange found the guest's 2.75 s lag: the action's messages fall inside
    # the host's WDTF operation span
    span = next(e for e in events if e.get("kind") == "operation"
                and str((e.get("data") or {}).get("name", "")).startswith("rebalance:wdtf-"))
    lo, hi = span["t_host_ns"], span["t_host_ns"] + span["duration_ns"]
    # wpp.txt: the start traced at plug (line 1), the action's messages, the removal's
    by_line = sorted(wpp, key=lambda e: e["data"]["line"])
    action = by_line[1:1 + len(case.driver)]
    assert [e["data"]["message"].split()[0] for e in action] == \
        [ln.message.split()[0] for ln in sorted(case.driver, key=lambda ln: ln.at_ms)]
    assert all(lo <= e["t_host_ns"] <= hi for e in action), \
        (lo, hi, [e["t_host_ns"] for e in action])

    # the reports name the violations, and the run says it was simulated
    run_json = json.loads((run / "run.json").read_text())
    assert run_json["guest"]["simulated"] is True and run_json["guest"]["note"] == SIMULATION_NOTE
    suite = ET.parse(run / "junit.xml").getroot()
    junit = ET.tostring(suite, encoding="unicode")
    html = (run / "report.html").read_text()
    for rule, _phase in EXPECTED[name]:
        assert rule in junit and rule in html
    assert "SIMULATED" in html
    assert header.get("type") == "header"


def test_without_the_clock_exchange_the_violation_lands_elsewhere(
        image: GuestImage, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIMULATED guest side. The phases above come from the timeline, not from the
    script: when the guest's clock exchange lies (it claims the guest is not behind the
    host), the same slow QUERY_STOP is still found, but 2.75 s early, outside the WDTF
    operation. So the phase asserted above is what the alignment earned."""
    from lab.guest.windows import simulated

    def lying_clock(self: simulated.SimulatedWindowsAgent, script: str, params: dict[str, str]) -> str:
        now = self.filetime(time.time_ns())               # the host's clock, not the guest's
        return f"rebalab-clock {now} {now}\r\n"

    monkeypatch.setattr(simulated.SimulatedWindowsAgent, "_clock", lying_clock)
    _, summary, _ = _run(CASES["query-stop-slower-than-the-lock-limit"], image)
    res = (summary["results"] if "results" in summary else summary["iterations"])[0]
    found = [(v["rule"], v["device"], v["phase"]) for v in res["violations"]]
    assert [r for r, _, _ in found] == ["pnp.query-stop-slow"], found
    assert found[0][1] == "snd0" and found[0][2] != "rebalance:wdtf-restart", found


def test_the_runner_refuses_a_guest_of_another_os(image: GuestImage, tmp_path: Path) -> None:
    """The runner's ``guest=`` hook: a Linux scenario was validated for Linux steps and
    rules, so a (simulated) Windows guest is refused before any run directory exists."""
    from lab.errors import LabError
    from lab.scenario import validate_text
    from lab.runner import resolve_topology

    linux = validate_text("name: t\nsteps:\n  - plug: {device: snd0, model: AC97, port: rp1}\n",
                          str(tmp_path / "t.yaml"), resolve_topology, base_dir=tmp_path)
    guest = SimulatedWindowsGuest(CASES["stop-without-query-stop"], "snd0", image=image)
    with pytest.raises(LabError, match="the scenario is for a linux guest; the guest given to "
                                       "the runner is windows"):
        ScenarioRunner(linux, runs_root=tmp_path / "runs", guest=guest)
    assert not (tmp_path / "runs").exists()
