"""The shipped scenarios end to end, replay, exit codes, and the pytest plugin."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab.image import GuestImage

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


def rebalab(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def run_dir_of(out: str) -> Path:
    line = next(ln for ln in out.splitlines() if ln.startswith("run directory: "))
    return Path(line.split(": ", 1)[1].strip())


@pytest.mark.parametrize("name", [
    # serial: failed once beside other VMs (load 4-5 on 2 cores): ES1370's "unbound" not seen
    # within the scenario's 10 s after device-deleted (cause not found: artifacts lost)
    pytest.param("hotplug-cycle", marks=pytest.mark.serial),
    "rebalance-rescan", "rebalance-pressure", "unplug-during-stream", "sweep-rebalance-delay"])
def test_shipped_scenario_runs_and_reports(name: str, image: GuestImage, tmp_path: Path) -> None:
    """Each shipped file as it is, one round over its parameter grid (``--repeat 1``: the
    rounds are sampling, and the suite's time goes to the race acceptance runs; several
    rounds on one VM are covered by the 7-round run in test_race.py)."""
    from lab.runner import load_scenario

    grid = load_scenario(SCENARIOS / f"{name}.yaml").sweep().grid_size
    r = rebalab("run", str(SCENARIOS / f"{name}.yaml"), "--repeat", "1", "--runs", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    run = run_dir_of(r.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "passed"
    results = summary["results"] if "results" in summary else summary["iterations"]
    assert len(results) == grid and all(x["status"] == "passed" for x in results)
    suite = ET.parse(run / "junit.xml").getroot()
    cases = suite.findall(".//testcase")
    assert len(cases) == len(results)
    html = (run / "report.html").read_text()
    assert name in html and "http://" not in html and "https://" not in html
    # every iteration has its aligned timeline
    for x in results:
        assert (run / "iterations" / str(x["index"]) / "timeline.jsonl").exists()
    # and its verdict follows from the recorded files alone: `inspect` re-checks it
    ri = rebalab("inspect", str(run), "--json")
    assert ri.returncode == 0, ri.stdout[-2000:] + ri.stderr[-1000:]
    doc = json.loads(ri.stdout)
    assert doc["reproduced"] is True
    assert [c["iteration"] for c in doc["iterations"]] == [str(x["index"]) for x in results]
    assert all(c["rules"] and not c["rechecked"] and not c["note"] for c in doc["iterations"])


def test_sweep_reports_per_delay_and_replays_an_iteration(image: GuestImage, tmp_path: Path) -> None:
    r = rebalab("run", str(SCENARIOS / "sweep-rebalance-delay.yaml"), "--iteration", "3",
                "--runs", str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:]
    first = run_dir_of(r.stdout)
    original = json.loads((first / "iterations" / "3" / "parameters.json").read_text())
    r2 = rebalab("replay", str(first), "--iteration", "3", "--runs", str(tmp_path))
    assert r2.returncode == 0, r2.stdout[-2000:]
    again = run_dir_of(r2.stdout)
    replayed = json.loads((again / "iterations" / "3" / "parameters.json").read_text())
    assert replayed == original   # same parameters and seed
    # --attempts: a passing iteration runs every attempt, each in its own directory
    r3 = rebalab("replay", str(first), "--iteration", "3", "--attempts", "2",
                 "--runs", str(tmp_path))
    assert r3.returncode == 0, r3.stdout[-2000:]
    third = run_dir_of(r3.stdout)
    for a in (1, 2):
        p = json.loads((third / "iterations" / f"3.{a}" / "parameters.json").read_text())
        assert p == original | {"attempt": a}
    s3 = json.loads((third / "summary.json").read_text())
    assert [(it["index"], it["attempt"], it["status"]) for it in s3["iterations"]] == \
        [(3, 1, "passed"), (3, 2, "passed")]
    assert "#3 attempt 2 passed" in r3.stdout + r3.stderr


def test_a_broken_expectation_exits_1_with_the_violation(image: GuestImage, tmp_path: Path) -> None:
    sc = tmp_path / "expect-too-much.yaml"
    sc.write_text(
        "name: expect-too-much\n"
        "topology: default\n"
        "steps:\n"
        "  - plug: {device: snd0, model: AC97, port: rp1}\n"
        "  - wait: {event: bound, device: snd0, timeout: 20s}\n"
        "  - assert: {count: {kind: probe-enter, device: snd0, eq: 2}}\n")
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 1, r.stdout[-2000:]
    run = run_dir_of(r.stdout)
    junit = (run / "junit.xml").read_text()
    assert "assert.count" in junit and "1 probe-enter event(s)" in junit


def test_invalid_scenario_exits_2_before_any_vm(tmp_path: Path) -> None:
    sc = tmp_path / "bad.yaml"
    sc.write_text("name: bad\ntopology: default\nsteps:\n  - plug: {device: snd0, model: AC97, port: rp1}\n"
                  "  - rebalance: {trigger: rescna, device: snd0}\n")
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2
    assert f"{sc}:5" in r.stderr and "rescan" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_pytest_plugin_fixtures(pytester: pytest.Pytester, image: GuestImage) -> None:
    pytester.makepyfile(test_user="""
        from vdevice.topology import Device

        def test_rescan_rebinds(lab, timeline):
            lab.plug(Device("snd0", "ich9-intel-hda", "rp1"))
            report = lab.rebalance("rescan", "snd0")
            assert report.audio_moved and report.rebound
            tl = timeline()
            assert tl.first("probe-exit", "snd0") is not None
            assert not lab.violations(tl, ["linux-driver", "kernel-oops"])

        def test_qmp_and_guest(qmp, guest):
            assert qmp.execute("query-status")["status"] == "running"
            assert guest.run_argv(["uname", "-s"]).stdout.strip() == "Linux"
    """)
    res = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                        f"--rebalab-runs={pytester.path / 'runs'}")
    res.assert_outcomes(passed=2)
