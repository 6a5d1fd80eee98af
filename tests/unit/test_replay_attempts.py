"""A replay with several attempts: each attempt is its own result, named ``4.2``, with its
own directory, report picture and junit case, and the summary counts them all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lab.report.console import RunConsole
from lab.report.html import choose_iterations, render_report, timeline_path
from lab.report.junit import build_junit, case_name
from lab.report.summary import RunInfo, build_summary, load_summary, write_summary
from lab.results import EventRef, IterationResult, Status, StepTiming, Violation
from lab.timeline import DeviceId, Event, Kind, Source

SIG = Violation("kernel.oops", "guest", "rebalance:rescan", "BUG: unable to handle page fault",
                (EventRef(1, 10**9, "kernel-log", "guest.kernel"),))


def attempts(failing_at: int, index: int = 4) -> list[IterationResult]:
    """Attempts 1..failing_at of iteration ``index``; the last one fails."""
    out = []
    for a in range(1, failing_at + 1):
        failed = a == failing_at
        out.append(IterationResult(
            index=index, parameters={"delay_ms": 100}, seed=80202692069390,
            status=Status.FAILED if failed else Status.PASSED,
            violations=(SIG,) if failed else (),
            timings=(StepTiming("plug", 10**9 * a, 10**6),),
            artifacts={"dir": f"iterations/{index}.{a}",
                       "timeline": f"iterations/{index}.{a}/timeline.jsonl"},
            attempt=a))
    return out


INFO = RunInfo(scenario="race-planted-replay-4", accelerator="tcg", seed=7,
               stopped_at="reproduced at attempt 3 of 5")


def test_attempt_keys_labels_and_json_round_trip(tmp_path: Path) -> None:
    rs = attempts(3)
    assert [r.key for r in rs] == ["4.1", "4.2", "4.3"]
    assert rs[2].label == "#4 attempt 3"
    plain = IterationResult(index=4, parameters={}, seed=0, status=Status.PASSED)
    assert (plain.key, plain.label) == (4, "#4")
    assert "attempt" not in plain.to_json()          # ordinary runs' summary.json unchanged
    # any order in, run order out: by index, then attempt
    s = build_summary(INFO, list(reversed(rs)))
    assert [r.attempt for r in s.results] == [1, 2, 3]
    assert s.counts["passed"] == 2 and s.counts["failed"] == 1 and s.exit_code == 1
    sig = s.signatures[0]
    assert (sig.count, sig.ran, sig.iterations) == (1, 3, (4,))
    assert s.result("4.3").status == Status.FAILED and s.result("4.1").status == Status.PASSED
    write_summary(tmp_path, INFO, rs)
    loaded = load_summary(tmp_path)
    assert [r.key for r in loaded.results] == ["4.1", "4.2", "4.3"]
    assert loaded.run.stopped_at == "reproduced at attempt 3 of 5"
    assert timeline_path(tmp_path, loaded.result("4.2")) == \
        tmp_path / "iterations" / "4.2" / "timeline.jsonl"


def test_report_pictures_the_failing_attempt() -> None:
    rs = attempts(3)
    s = build_summary(INFO, rs)
    assert choose_iterations(s) == ["4.3"]
    ev = [Event(t_host_ns=10**9, source=Source.GUEST_KERNEL, kind=Kind.KERNEL_LOG,
                device=DeviceId(qom="edu0"), data={"msg": "BUG"}, seq=1)]
    html = render_report(s, {"4.3": ev})
    assert 'id="tl-4.3"' in html and "Iteration #4, attempt 3" in html
    for k in ("4.1", "4.2", "4.3"):
        assert f'id="it-{k}"' in html
    assert 'href="#tl-4.3"' in html and 'href="#tl-4.1"' not in html
    assert 'href="iterations/4.2/"' in html


def test_junit_has_one_case_per_attempt() -> None:
    rs = attempts(2)
    assert case_name(rs[0]) == "#004 attempt 1 delay_ms=100"
    suite = next(iter(build_junit(build_summary(INFO, rs))))
    assert [c.name for c in suite] == ["#004 attempt 1 delay_ms=100", "#004 attempt 2 delay_ms=100"]
    assert [bool(c.result) for c in suite] == [False, True]    # attempt 2 carries the failure


def test_console_names_the_attempt() -> None:
    import io
    out = io.StringIO()
    with RunConsole("race-planted-replay-4", 2, file=out, plain=True) as ui:
        ui.start(4, {"delay_ms": 100}, attempt=2)
        ui.finish(attempts(2)[1])
    text = out.getvalue()
    assert "#4 attempt 2 delay_ms=100 ..." in text
    assert "#4 attempt 2 failed" in text and "kernel.oops@guest/rebalance:rescan" in text


def test_replay_attempts_below_one_are_refused_before_anything(tmp_path: Path) -> None:
    run = tmp_path / "not-a-run"
    r = subprocess.run([sys.executable, "-m", "lab.cli", "replay", str(run), "--iteration", "0",
                        "--attempts", "0", "--runs", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "--attempts 0: must be 1 or more" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_every_attempt_needs_attempts(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lab.cli", "replay", str(tmp_path), "--iteration",
                        "0", "--every-attempt", "--runs", str(tmp_path / "runs")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--every-attempt needs --attempts N" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()


def test_timeline_of_a_replay_names_its_attempts(tmp_path: Path) -> None:
    for a in (1, 2):
        d = tmp_path / "iterations" / f"4.{a}"
        d.mkdir(parents=True)
        (d / "timeline.jsonl").write_text("")
    r = subprocess.run([sys.executable, "-m", "lab.cli", "timeline", str(tmp_path),
                        "--iteration", "4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "no iterations/4/timeline.jsonl" in r.stderr and "attempts: 4.1, 4.2" in r.stderr
