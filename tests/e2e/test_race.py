"""The race hunt on real kernel code: scenarios/race-planted.yaml with each planted bug of
the guest test driver (images/linux/testdrv/), and no false alarm with the bug off.

Each run is the shipped scenario through the CLI, as a user runs it; what is asserted
comes from the run's own summary.json and timelines.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from lab.image import GuestImage
from lab.timeline import Timeline
from tests.e2e.test_scenarios import SCENARIOS, rebalab, run_dir_of

RACE = SCENARIOS / "race-planted.yaml"
DELAYS = list(range(0, 176, 25))
# the signature that names each bug class (other rules may fire as consequences)
CLASS_SIGNATURE = {
    "no-drain": "kernel.oops@guest/rebalance:rescan",
    "slow-remove": "linux.remove-slow@edu0/rebalance:rescan",
    "stale-bar": "guest.command@guest/io-after-rebalance",
}


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def _sigs(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["signature"]: s for s in summary["signatures"]}


def _failed_run(tmp_path: Path, *args: str) -> tuple[Path, dict[str, Any], str, str]:
    """``rebalab ARGS --runs tmp_path``, which must exit 1 (something failed): its run
    directory, summary, the tail of its output (for assertion messages) and its stdout."""
    r = rebalab(*args, "--runs", str(tmp_path))
    out = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 1, out
    run = run_dir_of(r.stdout)
    return run, _summary(run), out, r.stdout


def _middle_failing(s: dict[str, Any], failing: list[int]) -> int:
    """The failing iteration nearest the middle of the failing delays: for a race, the
    most reproducible timing."""
    delay = {it["index"]: it["parameters"]["delay_ms"] for it in s["iterations"]}
    mid = sorted(delay[i] for i in failing)[len(failing) // 2]
    return min(failing, key=lambda i: abs(delay[i] - mid))


@pytest.mark.parametrize("bug", sorted(CLASS_SIGNATURE))
def test_planted_bug_is_found_per_delay_and_replays(bug: str, image: GuestImage,
                                                    tmp_path: Path) -> None:
    run, s, out, stdout = _failed_run(tmp_path, "run", str(RACE), "--set", f"bug={bug}")
    # every iteration ran to a verdict: an oops restarts the guest, the sweep goes on
    statuses = [it["status"] for it in s["iterations"]]
    assert len(statuses) == len(DELAYS) and set(statuses) <= {"passed", "failed"}, out
    want = CLASS_SIGNATURE[bug]
    sigs = _sigs(s)
    assert want in sigs, out
    if bug == "no-drain":
        # a race: it breaks only when remove() lands while a transfer is in flight
        assert 1 <= sigs[want]["count"] <= len(DELAYS), out
    else:
        # slow-remove and stale-bar break on every rebalance, whatever the timing
        assert sigs[want]["count"] == len(DELAYS), out
    # the other bug classes' signatures do not appear: each class has its own
    for other, sig in CLASS_SIGNATURE.items():
        if other != bug:
            assert sig not in sigs, (other, out)
    # the per-delay table: one group per delay, with its failures and rate
    groups = {g["values"]["delay_ms"]: g for g in s["by_parameter"]["delay_ms"]}
    assert sorted(groups) == DELAYS
    assert all(g["ran"] == 1 for g in groups.values()), groups
    assert sum(g["failed"] for g in groups.values()) == sum(
        1 for it in s["iterations"] if it["status"] == "failed")
    assert "by delay_ms" in stdout and "100.0 %" in stdout
    # the driver's own callbacks were traced (kprobes on MOD:func armed before it loaded)
    tl = Timeline.read(run / "iterations" / "0" / "timeline.jsonl")
    funcs = {e.data.get("func") for e in tl.events}
    assert "rebalab_testdrv_remove" in funcs, sorted(f for f in funcs if f)
    if bug == "no-drain":
        # the iteration's artifacts keep the oops that restarted the guest
        k0 = sigs[want]["iterations"][0]
        console = (run / "iterations" / str(k0) / "vm" / "console.log").read_text()
        assert "BUG: unable to handle page fault" in console
        oops = next(v for v in s["iterations"][k0]["violations"] if v["rule"] == "kernel.oops")
        assert "unable to handle page fault" in oops["message"]

    # the verdict follows from the run's files: `inspect RUN_DIR` re-checks every
    # iteration's timeline with the rules and context the run recorded. The final rules'
    # findings come back; a guest check's (stale-bar) is the run's own step, named so.
    ri = rebalab("inspect", str(run), "--json")
    assert ri.returncode == 1, ri.stdout[-2000:] + ri.stderr[-1000:]
    doc = json.loads(ri.stdout)
    assert doc["reproduced"] is True, doc
    rechecked = {sig for c in doc["iterations"] for sig in c["rechecked"]}
    from_steps = {sig for c in doc["iterations"] for sig in c["from_steps"]}
    assert want in (from_steps if bug == "stale-bar" else rechecked), doc
    if bug == "no-drain":
        # one file of the run on its own: the guest console as `inspect` reads any log
        k0 = sigs[want]["iterations"][0]
        rc = rebalab("inspect", str(run / "iterations" / str(k0) / "vm" / "console.log"), "--json")
        assert rc.returncode == 1, rc.stdout[-2000:] + rc.stderr[-1000:]
        cdoc = json.loads(rc.stdout)
        assert cdoc["files"][0]["format"] == "lab-console"
        assert any(v["rule"] == "kernel.oops" for v in cdoc["violations"]), cdoc["violations"]

    # replay a failing iteration: same parameters and seed, same signature. For the race,
    # the one nearest the middle of the failing delays (the most reproducible timing);
    # the guest's scheduling is not replayed, so a race gets several attempts and the
    # replay stops at the first that fails. The deterministic bugs fail at the first.
    k = _middle_failing(s, sigs[want]["iterations"])
    tries = 8
    again, rs, rout, _ = _failed_run(tmp_path, "replay", str(run), "--iteration", str(k),
                                  "--attempts", str(tries))
    got = rs["iterations"]
    n = len(got)
    assert [(it["index"], it["attempt"]) for it in got] == [(k, a) for a in range(1, n + 1)]
    assert [it["status"] for it in got] == ["passed"] * (n - 1) + ["failed"], rout
    assert want in {str(v["signature"]) for v in got[-1]["violations"]}, rout
    assert rs["run"]["stopped_at"] == f"reproduced at attempt {n} of {tries}"
    if bug != "no-drain":
        assert n == 1, rout
    for it in got:
        assert it["parameters"] == s["iterations"][k]["parameters"]
        assert it["seed"] == s["iterations"][k]["seed"]
        assert (again / "iterations" / f"{k}.{it['attempt']}" / "timeline.jsonl").is_file()


def test_no_false_alarm_with_the_bug_off(image: GuestImage, tmp_path: Path) -> None:
    """bug=none: the same sweep, 7 rounds over the same 8 delays (56 iterations), not one
    violation; and every iteration really went through remove() and a rebind."""
    rounds = 7
    r = rebalab("run", str(RACE), "--set", "bug=none", "--repeat", str(rounds),
                "--runs", str(tmp_path), timeout=1500)
    out = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, out
    run = run_dir_of(r.stdout)
    s = _summary(run)
    assert s["counts"]["passed"] == rounds * len(DELAYS), out
    assert s["signatures"] == []
    assert all(not it["violations"] for it in s["iterations"])
    for it in s["iterations"]:
        check = [t for t in it["timings"] if t["name"].startswith("guest [io-after-rebalance]")]
        assert len(check) == 1 and check[0]["ok"], it
    for k in (0, len(s["iterations"]) - 1):
        tl = Timeline.read(run / "iterations" / str(k) / "timeline.jsonl")
        kinds = [(e.kind.value, e.data.get("func")) for e in tl.events
                 if e.device is not None and e.device.qom == "edu0"]
        assert ("remove-exit", "pci_device_remove") in kinds, kinds[:40]
        assert any(e.kind.value == "resource-moved" or e.kind.value == "operation"
                   for e in tl.events)


@pytest.mark.serial
def test_no_drain_under_snapshot_reset_on_two_vms_is_found_and_replays(
        image: GuestImage, tmp_path: Path) -> None:
    """Issue 11's first "done means": the race found with the same signature as the
    plain sweep, by two VMs each restoring every iteration from its own point, and a
    replay of a failing iteration, from a restore point again, reproducing it."""
    run, s, out, _ = _failed_run(tmp_path, "run", str(RACE), "--set", "bug=no-drain",
                              "--reset", "snapshot", "--jobs", "2")
    want = CLASS_SIGNATURE["no-drain"]
    sigs = _sigs(s)
    assert want in sigs and 1 <= sigs[want]["count"] <= len(DELAYS), out
    assert sorted(it["index"] for it in s["iterations"]) == list(range(len(DELAYS)))
    log = (run / "lab.log").read_text()
    # one boot per VM, whatever oopsed: each later iteration, the one after an oops
    # included, came from the VM's restore point
    assert sorted(p.name for p in run.glob("job*-vm*")) == ["job1-vm1", "job2-vm1"], log[-3000:]
    assert log.count("restore point saved") == 2, log[-3000:]
    assert log.count("VM restored from the snapshot") == len(DELAYS) - 2, log[-3000:]
    # an oopsed VM is thrown away, not shut down politely: nothing is collected from it
    # that its console log (kept by the iteration) does not hold
    lines = log.splitlines()
    broken = [i for i, ln in enumerate(lines) if "restarting the guest (broken)" in ln]
    assert broken, log[-3000:]
    for i in broken:
        job = re.search(r"\[job\d+\]", lines[i])       # two VMs' lines interleave
        assert job is not None, lines[i]
        stopped = next(ln for ln in lines[i:] if job[0] in ln and "machine stopped" in ln)
        assert stopped.endswith("machine stopped (qmp-quit)"), stopped
    meta = json.loads((run / "run.json").read_text())
    assert meta["scenario"]["reset"] == "snapshot"

    k = _middle_failing(s, sigs[want]["iterations"])
    again, rs, rout, _ = _failed_run(tmp_path, "replay", str(run), "--iteration", str(k),
                                  "--attempts", "8")
    got = rs["iterations"]
    assert {it["index"] for it in got} == {k}
    assert got[-1]["status"] == "failed", rout
    assert want in {str(v["signature"]) for v in got[-1]["violations"]}, rout
    rlog = (again / "lab.log").read_text()
    assert "restore point saved" in rlog, rlog[-2000:]
