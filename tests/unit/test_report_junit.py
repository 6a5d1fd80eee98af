"""junit.xml: parses back, one case per iteration, failures carry the violations."""

from __future__ import annotations

from pathlib import Path

from junitparser import Error, Failure, JUnitXml, Skipped

from lab.report.junit import build_junit, case_name, fmt_violation, write_junit
from lab.report.sample import sample_run
from lab.report.summary import RunInfo, build_summary, write_summary
from lab.results import EventRef, IterationResult, Status, StepTiming, Violation


def _parse(path: Path) -> JUnitXml:
    return JUnitXml.fromfile(str(path))


def test_sample_run_junit(tmp_path: Path) -> None:
    info, results = sample_run(tmp_path)
    results.append(IterationResult(index=10, parameters={"delay_ms": 0, "model": "AC97"},
                                   seed=1, status=Status.SKIPPED,
                                   stopped_at="until: fail reached at iteration 2"))
    summary = write_summary(tmp_path, info, results)
    out = write_junit(tmp_path, summary)
    assert out == tmp_path / "junit.xml"
    doc = _parse(out)
    suites = list(doc)
    assert len(suites) == 1
    suite = suites[0]
    assert suite.name == "rebalab.sweep-rebalance-delay"
    props = {p.name: p.value for p in suite.properties()}
    assert props["scenario"] == "sweep-rebalance-delay"
    assert props["accelerator"] == "tcg"
    assert props["qemu_version"] == "7.2.15"
    assert props["seed"] == "1234"
    assert props["guest_image_sha256"].startswith("9f2c1e0b")
    assert props["exit_code"] == "1"
    cases = list(suite)
    assert len(cases) == 11
    assert suite.tests == 11 and suite.failures == 3 and suite.errors == 1 and suite.skipped == 1
    by_name = {c.name: c for c in cases}
    assert "#002 delay_ms=200 model=AC97" in by_name
    failed = by_name["#002 delay_ms=200 model=AC97"]
    (fail,) = failed.result
    assert isinstance(fail, Failure)
    assert fail.type == "linux.callback-after-remove"
    assert "linux.callback-after-remove on snd0 (rebalance)" in fail.message
    body = fail.text
    assert "[linux.callback-after-remove] device snd0, phase rebalance:" in body
    assert "guest.kprobe remove-exit #16: snd_intel8x0_remove returned" in body
    assert "+253.900 ms guest.kprobe driver-io #17" in body   # times relative to the iteration
    assert "gap_ms: 1.9" in body
    assert failed.time > 0
    assert "artifact timeline: iterations/2/timeline.jsonl" in failed.system_out
    assert f"run directory: {tmp_path}" in failed.system_out
    two = by_name["#008 delay_ms=300 model=AC97"].result[0]
    assert "(+1 more)" in two.message and "audio.max-gap" in two.text
    err = by_name["#009 delay_ms=400 model=AC97"].result[0]
    assert isinstance(err, Error) and err.type == "lab-error"
    assert "guest agent: timed out" in err.message
    skip = by_name["#010 delay_ms=0 model=AC97"].result[0]
    assert isinstance(skip, Skipped) and "until: fail reached" in skip.message
    assert by_name["#000 delay_ms=0 model=AC97"].is_passed


def test_control_characters_and_run_error(tmp_path: Path) -> None:
    v = Violation("kernel-oops", "snd0", "remove", "BUG: \x1b[31munable\x00 to handle",
                  events=(EventRef(3, 5, "kernel-oops", "guest.kernel", "Oops\x07"),))
    r = IterationResult(index=0, parameters={}, seed=1, status=Status.FAILED, violations=(v,),
                        timings=(StepTiming("plug", 0, 10),))
    info = RunInfo(scenario="x", error="QEMU died: \x1bsegfault\nfull log in console.log")
    s = build_summary(info, [r])
    out = write_junit(tmp_path, s, tmp_path / "sub" / "j.xml")
    suite = next(iter(_parse(out)))
    cases = {c.name: c for c in suite}
    assert "\\x1b" in cases["#000"].result[0].message
    run_case = cases["run"]
    assert isinstance(run_case.result[0], Error)
    assert run_case.result[0].message == "QEMU died: \\x1bsegfault"


def test_build_in_memory_and_helpers() -> None:
    r = IterationResult(index=7, parameters={"d": 1}, seed=2, status=Status.PASSED)
    doc = build_junit(build_summary(RunInfo(scenario="y"), [r]))
    suite = next(iter(doc))
    assert [c.name for c in suite] == ["#007 d=1"]
    assert case_name(IterationResult(index=3, parameters={}, seed=0, status=Status.PASSED)) == "#003"
    v = Violation("r", "d", "p", "m", (EventRef(1, 1_002_000_000, "k", "s"),), {"x": 1})
    assert fmt_violation(v, 1_000_000_000) == "[r] device d, phase p: m\n    +2.000 ms s k #1\n    x: 1"
