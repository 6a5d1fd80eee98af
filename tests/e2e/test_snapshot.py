"""Snapshot reset (issue 11): every iteration after the first starts from the state saved
when the first VM's tracing came up, in a fresh QEMU; an iteration that panics the guest
is followed by a restore, not a reboot; the guest's own state (a file it wrote) does not
leak from one iteration into the next; a replay of the failing iteration reproduces."""

from __future__ import annotations

import json
import re
from pathlib import Path

from lab.image import GuestImage
from tests.e2e.test_scenarios import rebalab, run_dir_of

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
    sc = tmp_path / "snap.yaml"
    sc.write_text(SCENARIO)
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    out = r.stdout[-3000:] + r.stderr[-2000:]
    assert r.returncode == 1, out
    run = run_dir_of(r.stdout)
    s = json.loads((run / "summary.json").read_text())
    assert [it["status"] for it in s["iterations"]] == ["passed", "failed", "passed", "passed"], out
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
    saved = re.search(r"restore point saved: (\S+)", log)
    assert saved is not None
    assert not list(Path("/tmp").glob("rebalab-snapshot-*/" + saved[1]))

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
    sc = tmp_path / "left.yaml"
    sc.write_text(LEFT_PLUGGED)
    r = rebalab("run", str(sc), "--runs", str(tmp_path / "runs"))
    run = run_dir_of(r.stdout)
    s = json.loads((run / "summary.json").read_text())
    assert [it["status"] for it in s["iterations"]] == ["failed", "passed"], r.stdout[-2000:]
    assert r.returncode == 1
    assert "the failed iteration left snd0 plugged" in (run / "lab.log").read_text()
