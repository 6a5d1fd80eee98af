"""Benchmark: boot -> agent ready, hot-plug -> driver bound, unplug -> gone.

Prints min/median/max per hot-plug mode and device model over N cycles, and the ratio
of each median to its target (TCG, 2 cores): boot to agent-ready <= 5 s; ACPI hot-plug
to bound <= 100 ms. Run with `make bench` (not part of the tests: tests assert
behaviour, benchmarks measure time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lab import operations as ops
from lab.image import GuestImage
from lab.machine import Machine
from lab.rundir import RunDir
from lab.signals import run_interruptible
from vdevice.presets import default_topology
from vdevice.topology import Device, HotplugMode, Placement

TARGETS_MS = {("boot", None): 5000.0, ("bound", "acpi"): 100.0}


def stats(xs: list[float]) -> tuple[float, float, float]:
    return min(xs), statistics.median(xs), max(xs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cycles", type=int, default=10)
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--models", default="ich9-intel-hda,AC97,ES1370")
    ap.add_argument("--modes", default="acpi,native")
    ap.add_argument("--native-cycles", type=int, default=3,
                    help="cycles in native mode (each unplug waits ~6 s for pciehp)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    image = GuestImage.load()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="rebalab-bench-") as tmp:
        run = RunDir(Path(tmp), "bench")
        boots: list[float] = []
        accel = "?"
        try:
            for mode_name in args.modes.split(","):
                mode = HotplugMode(mode_name)
                cycles = args.cycles if mode == HotplugMode.ACPI else args.native_cycles
                for b in range(args.boots if mode == HotplugMode.ACPI else 1):
                    m = Machine(default_topology(mode), run, image=image,
                                subdir=f"{mode_name}-{b}")
                    try:
                        m.start()
                        accel = m.accel.name if m.accel else "?"
                        boots.append(m.timings["launch_to_agent_s"] * 1e3)
                        if b:
                            continue
                        for model in args.models.split(","):
                            bound, q_gone, g_gone, dev_add = [], [], [], []
                            for _ in range(cycles):
                                r = ops.plug(m, Device("snd0", model, "rp1", Placement.HOT))
                                bound.append(r.durations_ms["bound"])
                                dev_add.append(r.durations_ms["device_add"])
                                u = ops.unplug(m, "snd0")
                                q_gone.append(u.durations_ms["qemu_gone"])
                                g_gone.append(u.durations_ms.get("guest_gone",
                                                                 u.durations_ms["qemu_gone"]))
                            for what, xs in (("device_add", dev_add), ("bound", bound),
                                             ("qemu_gone", q_gone), ("guest_gone", g_gone)):
                                lo, med, hi = stats(xs)
                                rows.append({"mode": mode_name, "model": model, "what": what,
                                             "n": len(xs), "min": lo, "median": med, "max": hi,
                                             "first": xs[0]})
                    finally:
                        m.stop()
        finally:
            run.close()      # the private socket directory too
    lo, med, hi = stats(boots)
    rows.insert(0, {"mode": "-", "model": "-", "what": "boot", "n": len(boots), "min": lo,
                    "median": med, "max": hi, "first": boots[0]})
    print(f"rebalab hot-plug benchmark (accelerator: {accel}; times in ms, host-timed)")
    print(f"{'mode':7} {'model':15} {'measure':11} {'n':>3} {'min':>9} {'median':>9} {'max':>9} "
          f"{'1st':>9} {'target':>8} {'ratio':>6}")
    for r in rows:
        target = TARGETS_MS.get((str(r["what"]), None if r["what"] == "boot" else str(r["mode"])))
        ratio = f"{float(r['median']) / target:.2f}" if target else ""
        print(f"{r['mode']:7} {r['model']:15} {r['what']:11} {r['n']:>3} {r['min']:>9.1f} "
              f"{r['median']:>9.1f} {r['max']:>9.1f} {r['first']:>9.1f} "
              f"{(f'{target:.0f}' if target else ''):>8} {ratio:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"accel": accel, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "benchmark"))
