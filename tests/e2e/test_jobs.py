"""--jobs N (issue 11): several VMs, one queue. The results of a --jobs 2 run equal a
--jobs 1 run of the same seed in content (iterations, parameters, seeds, verdicts,
signatures); each VM keeps its own logs; Ctrl-C with two VMs running leaves nothing."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lab.image import GuestImage
from tests.e2e.test_scenarios import rebalab, run_dir_of

REPO = Path(__file__).resolve().parents[2]

# serial: each test starts 2 VMs itself (--jobs 2; beside another worker's VM that is 3
# TCG VMs on 2 cores), and the Ctrl-C one bounds its clean-up to 30 s of wall time
pytestmark = pytest.mark.serial

SWEEP = """name: jobs-sweep
topology: default
guest: linux
seed: 7
parameters:
  model: [AC97, ich9-intel-hda]
  n: [0, 1]
steps:
  - plug: {device: snd0, model: "${model}", port: rp1}
  - wait: {event: bound, device: snd0, timeout: 20s}
  # n = 1 fails on purpose, with a signature of its own
  - assert: {count: {kind: probe-enter, device: snd0, eq: "${n}"}}
  - unplug: snd0
  - wait: {event: unbound, device: snd0, timeout: 20s}
"""


def _content(summary: dict[str, Any]) -> list[tuple[Any, ...]]:
    return sorted((it["index"], json.dumps(it["parameters"], sort_keys=True), it["seed"],
                   it["status"], tuple(sorted(str(v.get("rule")) + "@" + str(v.get("device"))
                                              for v in it["violations"])))
                  for it in summary["iterations"])


def test_two_vms_give_the_same_results_as_one(image: GuestImage, tmp_path: Path) -> None:
    sc = tmp_path / "sweep.yaml"
    sc.write_text(SWEEP)
    one = rebalab("run", str(sc), "--runs", str(tmp_path / "one"))
    two = rebalab("run", str(sc), "--jobs", "2", "--runs", str(tmp_path / "two"))
    assert one.returncode == two.returncode == 1, (one.stdout[-1500:], two.stdout[-1500:])
    s1 = json.loads((run_dir_of(one.stdout) / "summary.json").read_text())
    run2 = run_dir_of(two.stdout)
    s2 = json.loads((run2 / "summary.json").read_text())
    assert _content(s1) == _content(s2)
    assert [x["signature"] for x in s1["signatures"]] == [x["signature"] for x in s2["signatures"]]
    assert s1["counts"] == s2["counts"]
    # both VMs worked, each with its own directory and its lines in lab.log
    assert sorted(p.name for p in run2.glob("job*-vm*")) == ["job1-vm1", "job2-vm1"]
    log = (run2 / "lab.log").read_text()
    assert "[job1] iteration #" in log and "[job2] iteration #" in log
    for k in range(4):
        assert (run2 / "iterations" / str(k) / "timeline.jsonl").is_file(), k


LONG = """name: jobs-long
topology: default
guest: linux
repeat: 4
steps:
  - guest: {run: "sleep 20", timeout: 60s}
"""


def test_ctrl_c_with_two_vms_running_leaves_nothing(image: GuestImage, tmp_path: Path) -> None:
    sc = tmp_path / "long.yaml"
    sc.write_text(LONG)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "lab.cli", "run", str(sc), "--jobs", "2",
                             "--runs", str(runs)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            logs = list(runs.glob("*/lab.log"))
            text = logs[0].read_text() if logs else ""
            pids = [int(p) for p in re.findall(r"qemu started pid=(\d+)", text)]
            if len(pids) == 2 and text.count("kprobes on") >= 2:
                break
            time.sleep(0.2)
        assert len(pids) == 2, f"two VMs never ran: {text[-1500:]!r} {proc.poll()}"
        time.sleep(1.0)
        socks = [Path(m) for m in re.findall(
            r"path=(/[^,\s]*/rebalab-[^/,\s]+)/qmp\.sock",
            " ".join(p.read_text() for p in runs.glob("*/job*-vm*/qemu-cmdline.txt")))]
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    assert took < 30, took
    run = next(runs.iterdir())
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "interrupted"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
    assert socks and not any(p.exists() for p in socks), socks
    assert not list(run.rglob("*.tmp"))
