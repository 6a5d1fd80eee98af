"""Benchmark: the race hunt of scenarios/race-planted.yaml on the built-in guest.

For each planted bug of the guest test driver it measures
- sweep throughput: iterations per minute of one full sweep (8 delays), wall time of
  the whole run (guest restarts after an oops included);
- iterations until the first failure (``--until-fail``), median over ``--seeds``
  seeds (each seed draws other jitter), counting the failing iteration itself;
- how often a replay reproduces: the sweep's failing iteration nearest the middle of
  its failing delays, replayed ``--replay-attempts`` times (every attempt run), counting
  the attempts that show the same signature. A race is below 100 %: the lab replays its
  own inputs, not the guest's scheduling.
`none` has no first failure: its row shows the throughput only, and any failure there
is printed as a false alarm. Run with `make bench-race` (not part of the tests: tests
assert behaviour, benchmarks measure time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lab.errors import Interrupted
from lab.report.console import PLAIN_WIDTH
from lab.results import Status
from lab.runner import ScenarioRunner, load_scenario
from lab.scenario.overrides import Overrides
from lab.signals import run_interruptible

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "race-planted.yaml"
BUGS = ("none", "no-drain", "slow-remove", "stale-bar")


def run_once(overrides: Overrides, runs: Path, **kw: Any) -> tuple[Any, float]:
    scenario = overrides.apply(load_scenario(SCENARIO))
    t0 = time.monotonic()
    summary = ScenarioRunner(scenario, runs_root=runs, overrides=overrides, **kw).execute()
    if summary.status == Status.INTERRUPTED:      # the runner stopped cleanly; so do we
        raise Interrupted(summary.run.stopped_at or "interrupted")
    return summary, time.monotonic() - t0


def replay_rate(summary: Any, overrides: Overrides, runs: Path, attempts: int) -> dict[str, Any]:
    """Replay the sweep's most central failing iteration ``attempts`` times."""
    if not summary.signatures or attempts < 1:
        return {}
    sig = summary.signatures[0]
    delay = {r.index: r.parameters.get("delay_ms") for r in summary.results}
    mid = sorted(delay[i] for i in sig.iterations)[len(sig.iterations) // 2]
    k = min(sig.iterations, key=lambda i: abs(delay[i] - mid))
    s, _ = run_once(overrides, runs, only=[k], attempts=attempts, every_attempt=attempts > 1,
                    name_suffix=f"-replay-{k}")
    same = sum(1 for r in s.results if any(str(v.signature) == sig.signature
                                           for v in r.violations))
    return {"signature": sig.signature, "iteration": k, "delay_ms": delay[k],
            "attempts": len(s.results), "reproduced": same}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bugs", default=",".join(BUGS))
    ap.add_argument("--seeds", type=int, default=3, help="seeds for iterations-to-first-failure")
    ap.add_argument("--max-rounds", type=int, default=3,
                    help="rounds over the delays before giving up on a first failure")
    ap.add_argument("--replay-attempts", type=int, default=5,
                    help="replays of a failing iteration, for the reproduction rate (0: none)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    out = Console(width=None if sys.stdout.isatty() else PLAIN_WIDTH)   # CI logs: no folding
    with tempfile.TemporaryDirectory(prefix="rebalab-bench-race-") as tmp:
        runs = Path(tmp)
        for bug in args.bugs.split(","):
            summary, wall = run_once(Overrides(sets=(f"bug={bug}",)), runs)
            ran = [r for r in summary.results if r.status in (Status.PASSED, Status.FAILED)]
            failed = [r for r in ran if r.status == Status.FAILED]
            row: dict[str, Any] = {
                "bug": bug, "iterations": len(ran), "failed": len(failed),
                "wall_s": round(wall, 1),
                "iterations_per_min": round(len(ran) / wall * 60, 2) if wall else None,
                "first_failure": [],
                "lab_errors": sum(r.status == Status.ERROR for r in summary.results),
                "accelerator": summary.run.accelerator,
                "replay": replay_rate(summary, Overrides(sets=(f"bug={bug}",)), runs,
                                      args.replay_attempts)}
            if bug != "none":
                for seed in range(args.seeds):
                    o = Overrides(sets=(f"bug={bug}",), seed=1000 + seed,
                                  repeat=args.max_rounds, until_failures=1)
                    s, _ = run_once(o, runs)
                    done = [r for r in s.results if r.status in (Status.PASSED, Status.FAILED)]
                    first = next((i + 1 for i, r in enumerate(done) if r.status == Status.FAILED),
                                 None)
                    row["first_failure"].append(first)
            rows.append(row)
            out.print(f"{bug}: {row}", highlight=False)
    accel = sorted({str(r["accelerator"]) for r in rows if r.get("accelerator")})
    t = Table(title=f"race-planted ({', '.join(accel)})" if accel else "race-planted")
    for col in ("bug", "iterations", "failed", "rate", "iter/min", "first failure (median)",
                "per seed", "replay reproduced"):
        t.add_column(col, justify="left" if col == "bug" else "right")
    for r in rows:
        firsts = [f for f in r["first_failure"] if f is not None]
        med = f"{statistics.median(firsts):g}" if firsts else ("-" if r["bug"] == "none"
                                                              else "never")
        t.add_row(r["bug"], str(r["iterations"]), str(r["failed"]),
                  f"{100 * r['failed'] / r['iterations']:.0f} %" if r["iterations"] else "-",
                  f"{r['iterations_per_min']}", med,
                  ", ".join("never" if f is None else str(f) for f in r["first_failure"]) or "-",
                  (f"{r['replay']['reproduced']} of {r['replay']['attempts']} "
                   f"(#{r['replay']['iteration']}, {r['replay']['delay_ms']} ms)")
                  if r["replay"] else "-")
    out.print(t)
    false_alarms = [r for r in rows if r["bug"] == "none" and r["failed"]]
    if false_alarms:
        out.print(f"FALSE ALARM: bug=none failed {false_alarms[0]['failed']} time(s)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 1 if false_alarms else 0


if __name__ == "__main__":
    sys.exit(run_interruptible(main, "benchmark"))
