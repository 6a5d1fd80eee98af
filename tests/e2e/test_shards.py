"""Shards end to end: `run --shard 1/2` and shard 2/2 (from GitLab's variables), merged,
give the unsharded run's iterations, signatures and rates, on real QEMU.

The scenario is written here so it is cheap (guest commands only, one VM per run)
and has something to merge: a random parameter (the seeds must agree for its values
to) and a wait that fails at n=2 in every round, so the signature's rate is 2 of 6
and each shard holds one of the two failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from lab.image import GuestImage
from lab.shard import ENV_VARS

SCENARIO = """\
name: shard-check
description: three values of n, two rounds; the wait fails whenever n is 2
topology: default
guest: linux
parameters:
  n: [1, 2, 3]
  r: {random: [0, 1000000]}
seed: 4242
repeat: 2
reset: none
steps:
  - guest: "echo ${r}"
  - wait: {guest: "test ${n} -ne 2", timeout: 400ms, interval: 100ms}
"""


def rebalab(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    # the suite itself may run as a sharded CI job: its engine variables must not
    # shard the runs below
    base = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, timeout=600, env=base | (env or {}))


def run_dir_of(out: str) -> Path:
    line = next(ln for ln in out.splitlines() if ln.startswith("run directory: "))
    return Path(line.split(": ", 1)[1].strip())


def comparable(summary: dict[str, Any]) -> dict[str, Any]:
    """The fields an unsharded run and its merged shards must share (timing differs)."""
    def group(g: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in g.items() if k != "measurements"}
    return {
        "status": summary["status"], "exit_code": summary["exit_code"],
        "counts": summary["counts"],
        "signatures": [{k: s[k] for k in ("signature", "count", "ran", "iterations", "rate")}
                       for s in summary["signatures"]],
        "by_parameter": {k: [group(g) for g in v] for k, v in summary["by_parameter"].items()},
        "by_combination": [group(g) for g in summary["by_combination"]],
        "iterations": [(it["index"], it["parameters"], it["seed"], it["status"],
                        sorted(v["signature"] for v in it["violations"]))
                       for it in summary["iterations"]],
    }


def test_two_shards_merged_equal_the_unsharded_run(image: GuestImage, tmp_path: Path) -> None:
    scenario = tmp_path / "shard-check.yaml"
    scenario.write_text(SCENARIO)
    runs = tmp_path / "runs"

    whole = rebalab("run", str(scenario), "--runs", str(runs))
    assert whole.returncode == 1, whole.stdout[-3000:] + whole.stderr[-2000:]
    whole_dir = run_dir_of(whole.stdout)

    first = rebalab("run", str(scenario), "--shard", "1/2", "--runs", str(runs))
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-2000:]
    # shard 2/2 from the engine's own variables, as a GitLab `parallel: 2` job has them
    second = rebalab("run", str(scenario), "--runs", str(runs),
                     env={"CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "2"})
    assert second.returncode == 1, second.stdout[-3000:] + second.stderr[-2000:]
    dirs = [run_dir_of(first.stdout), run_dir_of(second.stdout)]

    for k, d in enumerate(dirs, start=1):
        summary = json.loads((d / "summary.json").read_text())
        rec = summary["run"]["shard"]
        assert (rec["index"], rec["total"], rec["sweep_size"]) == (k, 2, 6)
        assert rec["seed"] == 4242 and len(rec["scenario_sha256"]) == 64
        assert [it["index"] for it in summary["iterations"]] == list(range(k - 1, 6, 2))
        assert json.loads((d / "run.json").read_text())["shard"] == rec
        assert sorted(p.name for p in (d / "iterations").iterdir()) == \
            [str(i) for i in range(k - 1, 6, 2)]
    log2 = (dirs[1] / "lab.log").read_text()
    assert "shard 2/2 from CI_NODE_INDEX/CI_NODE_TOTAL" in log2
    assert "shard 1/2 from --shard" in (dirs[0] / "lab.log").read_text()
    assert json.loads((whole_dir / "summary.json").read_text())["run"]["shard"] is None

    out = tmp_path / "merged"
    merged = rebalab("merge", str(dirs[1]), str(dirs[0]), "--out", str(out))
    assert merged.returncode == 1, merged.stdout[-3000:] + merged.stderr[-2000:]
    want = json.loads((whole_dir / "summary.json").read_text())
    got = json.loads((out / "summary.json").read_text())
    assert comparable(got) == comparable(want)
    # the thing compared is not trivial: one signature, in both rounds, at n=2
    (sig,) = want["signatures"]
    assert sig["iterations"] == [1, 4] and sig["ran"] == 6 and sig["count"] == 2
    assert len({it["parameters"]["r"] for it in want["iterations"]}) > 1

    assert len(ET.parse(out / "junit.xml").getroot().findall(".//testcase")) == 6
    assert "shard-check" in (out / "report.html").read_text()
    for k in range(6):
        assert (out / "iterations" / str(k) / "timeline.jsonl").is_file()
    assert json.loads((out / "MERGED.json").read_text())["artifacts"] == "copied"
    # readable without the shards: the iterations' links to their VM's logs point at
    # the copies, and `inspect` re-checks every verdict from the merged files alone
    for k in range(6):
        console = out / "iterations" / str(k) / "vm" / "console.log"
        if console.is_symlink():
            assert out.resolve() in console.resolve().parents and console.read_text()
    ri = rebalab("inspect", str(out), "--json")
    assert ri.returncode == 1, ri.stdout[-2000:] + ri.stderr[-1000:]
    doc = json.loads(ri.stdout)
    assert doc["reproduced"] is True and len(doc["iterations"]) == 6

    # a shard missing, or given twice, is named, never merged
    alone = rebalab("merge", str(dirs[0]), "--out", str(tmp_path / "m2"))
    assert alone.returncode == 2 and "shard 2/2 is missing" in alone.stderr
    twice = rebalab("merge", str(dirs[0]), str(dirs[0]), str(dirs[1]),
                    "--out", str(tmp_path / "m3"))
    assert twice.returncode == 2 and "shard 1/2 is given twice" in twice.stderr
    mixed = rebalab("merge", str(whole_dir), str(dirs[1]), "--out", str(tmp_path / "m4"))
    assert mixed.returncode == 2 and "not a shard" in mixed.stderr
