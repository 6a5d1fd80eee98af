"""Snapshot reset: which mechanism, measured. Issue 11 asked for both to be measured.

A. What the lab uses (lab.snapshot): QMP ``migrate`` to a file in a private directory
   once; each reset is a new QEMU started with ``-incoming "exec:cat FILE"``, then its
   agent connects anew.
B. ``savevm`` once on a qcow2 image (the built-in guest has no disk: an empty 16 MiB
   qcow2 attached with ``if=none`` holds the vmstate); each reset is ``loadvm`` in the
   same QEMU, then a new agent connection (the guest's TCP state went back in time).

Both on the built-in Linux guest with the default topology, both timed from the host to
the agent answering its first command. B keeps the QEMU process, so a warm TCG
translation cache could have made the guest's sshd handshake cheaper: this measures
whether it does. For A the "then agent" column includes launching the QEMU and
connecting its sockets. ``make bench-snapshot-mechanism`` (about 1 min under TCG).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab import snapshot  # noqa: E402
from lab.image import GuestImage  # noqa: E402
from lab.machine import Machine  # noqa: E402
from lab.rundir import RunDir  # noqa: E402
from vdevice.presets import default_topology  # noqa: E402


def timed(f: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.monotonic()
    r = f()
    return time.monotonic() - t0, r


def fresh_qemu(run: RunDir, image: GuestImage, work: Path, n: int) -> dict[str, Any]:
    m = Machine(default_topology(), run, image=image, subdir="a-boot")
    m.start()
    try:
        save_s, point = timed(lambda: snapshot.save(m, work / "point.vmstate"))
    finally:
        m.stop(discard=True)
    resets = []
    for i in range(n):
        t0 = time.monotonic()
        r = Machine(point.topology or default_topology(), run, image=image, restore=point,
                    subdir=f"a-restore{i}")
        try:
            r.start()
            assert r.agent is not None
            to_agent = time.monotonic() - t0
            exec_s, _ = timed(lambda: r.agent.run("true").check())   # type: ignore[union-attr]
            resets.append({"reset_s": r.timings["restore_s"], "agent_s": to_agent - r.timings["restore_s"],
                           "exec_s": exec_s, "total_s": to_agent + exec_s})
        finally:
            r.stop(discard=True)
    return {"save_s": save_s, "size_mib": point.size / 2**20, "resets": resets}


def loadvm_same_qemu(run: RunDir, image: GuestImage, work: Path, n: int) -> dict[str, Any]:
    disk = work / "vmstate.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    m = Machine(default_topology(), run, image=image, subdir="b-boot",
                extra_args=["-drive", f"if=none,id=vmstate0,format=qcow2,file={disk}"])
    m.start()
    try:
        assert m.qmp is not None and m.agent is not None

        def hmp(line: str) -> str:
            assert m.qmp is not None
            out = m.qmp.execute("human-monitor-command", {"command-line": line})
            if out:
                raise RuntimeError(f"{line}: {out}")
            return str(out)

        save_s, _ = timed(lambda: hmp("savevm point"))
        resets = []
        for _ in range(n):
            m.agent.run("touch /tmp/after-the-point").check()
            m.agent.close()
            reset_s, _ = timed(lambda: hmp("loadvm point"))
            t0 = time.monotonic()
            agent = m.guest.make_agent(m)
            m.guest.wait_agent(m, agent)
            agent_s = time.monotonic() - t0
            m.agent = agent
            exec_s, r = timed(lambda: agent.run("test ! -e /tmp/after-the-point"))
            if not r.ok:
                raise RuntimeError("loadvm did not take the guest back to the point")
            resets.append({"reset_s": reset_s, "agent_s": agent_s, "exec_s": exec_s,
                           "total_s": reset_s + agent_s + exec_s})
    finally:
        m.stop(discard=True)
    return {"save_s": save_s, "size_mib": disk.stat().st_size / 2**20, "resets": resets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resets", type=int, default=5, help="resets per mechanism (default 5)")
    args = ap.parse_args()
    image = GuestImage.load()
    with tempfile.TemporaryDirectory(prefix="rebalab-bench-snap-") as tmp:
        work = Path(tmp)
        work.chmod(0o700)
        run = RunDir(work, "bench")
        try:
            rows = {"A. migrate to a file, new QEMU -incoming": fresh_qemu(run, image, work, args.resets),
                    "B. savevm/loadvm in the same QEMU (qcow2)": loadvm_same_qemu(run, image, work, args.resets)}
        finally:
            run.close()
    med = statistics.median
    print(f"{'mechanism':44} {'save s':>7} {'MiB':>6} {'reset s':>8} {'then agent s':>12} "
          f"{'1st exec s':>10} {'total s':>8}   (medians of {args.resets} resets, TCG unless KVM)")
    for name, r in rows.items():
        rs = r["resets"]
        print(f"{name:44} {r['save_s']:7.2f} {r['size_mib']:6.1f} "
              f"{med(x['reset_s'] for x in rs):8.3f} {med(x['agent_s'] for x in rs):12.3f} "
              f"{med(x['exec_s'] for x in rs):10.3f} {med(x['total_s'] for x in rs):8.3f}")
    a, b = (med(x["total_s"] for x in r["resets"]) for r in rows.values())
    print(f"reset to the first command answered: B / A = {b / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
