"""Snapshot reset (issue 11): every iteration after the first starts from the state saved
when the first VM's tracing came up, in a fresh QEMU; an iteration that panics the guest
is followed by a restore, not a reboot; the guest's own state (a file it wrote) does not
leak from one iteration into the next; a replay of the failing iteration reproduces."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from lab.image import GuestImage
from tests.e2e.test_scenarios import rebalab, run_dir_of


def run_scenario(tmp_path: Path, name: str, text: str, rc: int,
                 statuses: list[str]) -> tuple[Path, dict[str, Any]]:
    """Run a scenario written to ``name``; its exit code and iteration statuses are
    asserted (with the run's output on failure). Returns the run dir and summary."""
    sc = tmp_path / name
    sc.write_text(text)
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    out = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == rc, out
    run = run_dir_of(r.stdout)
    s = json.loads((run / "summary.json").read_text())
    assert [it["status"] for it in s["iterations"]] == statuses, out
    return run, s

SCENARIO = """name: snapshot-reset
topology: default
guest: linux
reset: snapshot
parameters:
  n: [0, 1, 2, 3]
steps:
  # a mark left by an earlier iteration would fail this: each must start from the point
  - guest: {run: "test ! -e /tmp/mark && touch /tmp/mark"}
  - guest: {run: "if [ ${n} = 1 ]; then echo c > /proc/sysrq-trigger; sleep 30; fi", timeout: 60s}
  - plug: {device: snd0, model: AC97, port: rp1}
  - wait: {event: bound, device: snd0, timeout: 20s}
  - unplug: snd0
  - wait: {event: unbound, device: snd0, timeout: 20s}
  - assert: {count: {kind: probe-enter, device: snd0, eq: 1}}
"""


def test_snapshot_reset_restores_every_iteration_and_recovers_from_a_panic(
        image: GuestImage, tmp_path: Path) -> None:
    run, s = run_scenario(tmp_path, "snap.yaml", SCENARIO, 1,
                          ["passed", "failed", "passed", "passed"])
    panic = s["iterations"][1]
    assert {v["rule"] for v in panic["violations"]} & {"kernel.panic", "kernel.oops"}, panic
    log = (run / "lab.log").read_text()
    # one boot, one restore point, a restore for each later iteration (the one after the
    # panic included): no reboot anywhere
    assert len(re.findall(r"VM \d+ ready", log)) == 1, log[-3000:]
    assert log.count("restore point saved") == 1
    assert log.count("VM restored from the snapshot") == 3
    assert [p.name for p in run.glob("vm*")] == ["vm1"]
    # every iteration saw its own plug in its own timeline
    for k in (0, 2, 3):
        tl = (run / "iterations" / str(k) / "timeline.jsonl").read_text()
        assert '"probe-enter"' in tl, k
    # qmp.jsonl logs each distinct query-pci reply once; a reply seen before is a
    # reference to its line, which holds it (across the restored VMs' sessions, which
    # append to the same file)
    lines = (run / "vm1" / "qmp.jsonl").read_text().splitlines()
    refs = [json.loads(ln) for ln in lines if '"same_as_line"' in ln]
    assert refs, "no repeated reply was referenced"
    for ref in refs:
        held = json.loads(lines[ref["same_as_line"] - 1])
        assert held["dir"] == "in" and held["execute"] == ref["execute"] and "return" in held
    meta = json.loads((run / "run.json").read_text())
    assert meta["scenario"]["reset"] == "snapshot"
    # the restore point lived in a private directory that is gone now
    # (this run's own directory: other tests' runs may hold a live point meanwhile)
    saved = re.search(r"restore point saved: (rebalab-snapshot-[^/\s]+)/restore-point.vmstate", log)
    assert saved is not None, log[-2000:]
    assert not (Path(tempfile.gettempdir()) / saved[1]).exists()

    # a replay of the failing iteration uses the recorded reset and reproduces
    rp = rebalab("replay", str(run), "--iteration", "1", "--runs", str(tmp_path / "runs"))
    assert rp.returncode == 1, rp.stdout[-2000:] + rp.stderr[-1000:]
    again = json.loads((run_dir_of(rp.stdout) / "summary.json").read_text())
    (it,) = again["iterations"]
    assert {v["rule"] for v in it["violations"]} & {"kernel.panic", "kernel.oops"}, it


LEFT_PLUGGED = """name: left-plugged
topology: default
guest: linux
reset: none
parameters:
  n: [0, 1]
steps:
  - plug: {device: snd0, model: AC97, port: rp1}
  - wait: {event: bound, device: snd0, timeout: 20s}
  # iteration 0 fails here, with snd0 still plugged
  - guest: {run: "test ${n} = 1"}
  - unplug: snd0
  - wait: {event: unbound, device: snd0, timeout: 20s}
"""


def test_reset_none_unplugs_what_a_failed_iteration_left(image: GuestImage,
                                                         tmp_path: Path) -> None:
    """A failed iteration's device is not the next iteration's lab error."""
    run, _ = run_scenario(tmp_path, "left.yaml", LEFT_PLUGGED, 1, ["failed", "passed"])
    assert "the failed iteration left snd0 plugged" in (run / "lab.log").read_text()


SETUP_POINT = """name: snapshot-after-setup
topology: default
guest: linux
reset: snapshot
parameters:
  tag: [a, b]
  n: [0, 1]
steps:
  # the VM's setup, run once per VM and per value of what it uses (tag)
  - guest: {run: "echo ${tag} > /run/setup-tag"}
  - plug: {device: snd1, model: AC97, port: rp2}
  - wait: {event: bound, device: snd1, timeout: 20s}
  - snapshot: {name: bound}
  # every iteration: restored with its own setup's state, the device plugged and bound
  - guest: {run: "grep -qx ${tag} /run/setup-tag && test ! -e /tmp/mark && touch /tmp/mark"}
  - guest: {run: "ls /sys/bus/pci/drivers/snd_intel8x0 | grep -q '^0000:'"}
  - rebalance: {trigger: rescan, device: snd1}
  - wait: {event: bound, device: snd1, timeout: 20s}
  - assert: {count: {kind: probe-enter, device: snd1, eq: 1}}
  - sleep: "${n}ms"
  - unplug: snd1
  - wait: {event: unbound, device: snd1, timeout: 20s}
"""

UNMIGRATABLE = """name: edu-at-the-point
topology: default
guest: linux
reset: snapshot
steps:
  - plug: {device: edu0, model: edu, port: rp2}
  - wait: {event: bound, device: edu0, timeout: 20s}
  - snapshot: bound
  - rebalance: {trigger: rescan, device: edu0}
"""


def test_a_device_qemu_cannot_migrate_at_the_point_is_refused_before_any_vm(
        image: GuestImage, tmp_path: Path) -> None:
    sc = tmp_path / "edu.yaml"
    sc.write_text(UNMIGRATABLE)
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "cannot restore edu0 (edu, " in r.stderr and "edu.yaml:6" in r.stderr, r.stderr
    assert "no migration state" in r.stderr
    assert not list((tmp_path / "runs").glob("*/vm*")), "a VM was started"
    # the same scenario with the device plugged after the point is fine to validate
    ok = UNMIGRATABLE.replace("  - snapshot: bound\n", "").replace(
        "steps:\n", "steps:\n  - snapshot: start\n")
    sc.write_text(ok)
    v = rebalab("validate", str(sc))
    assert v.returncode == 0, v.stdout + v.stderr


def test_a_snapshot_step_saves_the_setup_and_each_setup_gets_its_own_point(
        image: GuestImage, tmp_path: Path) -> None:
    run, _ = run_scenario(tmp_path, "setup.yaml", SETUP_POINT, 0, ["passed"] * 4)
    log = (run / "lab.log").read_text()
    # tag a (iterations 0, 1), then tag b (2, 3): a setup and a point each, and the
    # iteration after each point restored from it, the hot-plugged snd1 on the restored
    # QEMU's command line
    assert log.count("setup before the restore point 'bound'") == 2, log[-3000:]
    assert log.count("restore point bound saved") == 2
    assert log.count("differ from the point's") == 1
    assert log.count("VM restored from the snapshot") == 2
    assert len(re.findall(r"VM \d+ ready", log)) == 2
    cmdlines = [p.read_text() for p in run.glob("vm*/qemu-cmdline.txt")]
    assert any("-incoming" in c and "AC97,id=snd1" in c for c in cmdlines), cmdlines
    # the setup's events are in the setup's timeline, not an iteration's: each
    # iteration's timeline starts at the point, whether it took it or was restored
    setups = sorted(run.glob("vm*/setup-bound/timeline.jsonl"))
    assert len(setups) == 2
    assert all('"hotplug-request"' in p.read_text() for p in setups)
    for k in range(4):
        tl = (run / "iterations" / str(k) / "timeline.jsonl").read_text()
        assert '"hotplug-request"' not in tl, k
        assert '"rebalance:rescan"' in tl and '"probe-enter"' in tl, k
