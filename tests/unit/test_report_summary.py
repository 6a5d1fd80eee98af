"""summary.json: aggregation, reproduction rates, status and exit codes, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.report.summary import (SCHEMA, RunInfo, build_summary, exit_code, fmt_params, fmt_rate,
                                iteration_duration_s, load_summary, overall_status,
                                write_summary)
from lab.results import EventRef, IterationResult, Status, StepTiming, Violation


def viol(rule: str = "linux-driver.remove-order", device: str = "snd0",
         phase: str = "rebalance", msg: str = "remove() ran after the BAR was unmapped") -> Violation:
    return Violation(rule, device, phase, msg,
                     events=(EventRef(12, 1_000_000_000, "bar-unmapped", "host.qemu-trace"),))


def res(k: int, status: Status, params: dict[str, object] | None = None,
        violations: tuple[Violation, ...] = (), **kw: object) -> IterationResult:
    return IterationResult(index=k, parameters=params or {}, seed=100 + k, status=status,
                           violations=violations, **kw)  # type: ignore[arg-type]


def twenty() -> list[IterationResult]:
    """20 iterations at delays 0/100 (10 each); signature A in 3, B in 1 (together with A)."""
    out = []
    for k in range(20):
        delay = 0 if k % 2 == 0 else 100
        v: tuple[Violation, ...] = ()
        if k in (1, 5, 9):
            v = (viol(), viol())                    # the same signature twice: counts once
        if k == 9:
            v += (viol("audio.max-gap", msg="48 ms gap"),)
        out.append(res(k, Status.FAILED if v else Status.PASSED,
                       {"delay_ms": delay, "jitter_ms": k * 1.5}, v))
    return out


INFO = RunInfo(scenario="sweep", accelerator="tcg", versions={"qemu": "7.2.15"}, seed=1,
               parameters={"delay_ms": {"range": [0, 100, 100]}, "jitter_ms": {"random": [0, 30]}})


def test_reproduction_rates() -> None:
    s = build_summary(INFO, twenty())
    assert s.status == Status.FAILED and s.exit_code == 1
    assert s.counts["total"] == 20 and s.counts["ran"] == 20
    assert s.counts["failed"] == 3 and s.counts["passed"] == 17
    a, b = s.signatures
    assert a.signature == "linux-driver.remove-order@snd0/rebalance"
    assert (a.count, a.ran, a.iterations) == (3, 20, (1, 5, 9))
    assert a.rate == pytest.approx(0.15)
    assert a.to_json()["rate_text"] == "3 of 20 (15.0 %)"
    assert (b.signature, b.count, b.example) == ("audio.max-gap@snd0/rebalance", 1, "48 ms gap")


def test_by_parameter_value() -> None:
    s = build_summary(INFO, twenty())
    assert list(s.by_parameter) == ["delay_ms"]          # random parameters are not grouped
    zero, hundred = s.by_parameter["delay_ms"]
    assert zero.values == {"delay_ms": 0} and (zero.iterations, zero.failed) == (10, 0)
    assert hundred.values == {"delay_ms": 100} and (hundred.ran, hundred.failed) == (10, 3)
    assert hundred.failure_rate == pytest.approx(0.3)
    assert hundred.signatures == {"linux-driver.remove-order@snd0/rebalance": 3,
                                  "audio.max-gap@snd0/rebalance": 1}
    assert s.by_combination == ()                        # one grouped parameter only


def test_grouping_without_specs_and_combinations() -> None:
    rs = [res(k, Status.FAILED if k == 3 else Status.PASSED,
              {"delay_ms": [0, 100][k % 2], "model": ["AC97", "ES1370"][k // 2 % 2],
               "noise": k * 0.1}, (viol(),) if k == 3 else ()) for k in range(40)]
    s = build_summary(RunInfo(scenario="x"), rs)
    assert list(s.by_parameter) == ["delay_ms", "model"]  # 40 distinct 'noise' values: not grouped
    assert len(s.by_combination) == 4
    combo = next(g for g in s.by_combination if g.failed)
    assert combo.values == {"delay_ms": 100, "model": "ES1370"} and combo.iterations == 10


def test_skipped_not_in_denominator() -> None:
    rs = [res(0, Status.FAILED, {}, (viol(),)), res(1, Status.PASSED),
          res(2, Status.SKIPPED, stopped_at="until: fail"), res(3, Status.SKIPPED)]
    s = build_summary(RunInfo(scenario="x"), rs)
    assert s.signatures[0].ran == 2 and s.signatures[0].rate == 0.5
    assert s.counts["skipped"] == 2 and s.ran == 2


@pytest.mark.parametrize("statuses,run_status,expected,code", [
    ([Status.PASSED, Status.PASSED], None, Status.PASSED, 0),
    ([Status.PASSED, Status.FAILED], None, Status.FAILED, 1),
    ([Status.PASSED, Status.ERROR], None, Status.ERROR, 2),
    ([Status.FAILED, Status.ERROR], None, Status.FAILED, 1),     # a finding outranks a lab error
    ([Status.FAILED, Status.INTERRUPTED], None, Status.INTERRUPTED, 130),
    ([Status.PASSED], Status.INTERRUPTED, Status.INTERRUPTED, 130),
    ([Status.PASSED], Status.ERROR, Status.ERROR, 2),
    ([Status.SKIPPED, Status.SKIPPED], None, Status.ERROR, 2),  # nothing ran
    ([], None, Status.ERROR, 2),
    ([Status.FAILED, Status.SKIPPED], None, Status.FAILED, 1),
])
def test_status_and_exit_code(statuses: list[Status], run_status: Status | None,
                              expected: Status, code: int) -> None:
    rs = [res(k, st) for k, st in enumerate(statuses)]
    assert overall_status(rs, run_status) == expected
    assert exit_code(expected) == code
    info = RunInfo(scenario="x", status=run_status)
    s = build_summary(info, rs)
    assert (s.status, s.exit_code) == (expected, code)


def test_write_and_load_round_trip(tmp_path: Path) -> None:
    rs = twenty()
    rs[0] = res(0, Status.ERROR, {"delay_ms": 0, "jitter_ms": 0.0}, error="agent timed out",
                timings=(StepTiming("plug snd0", 10**9, 5 * 10**6),
                         StepTiming("wait", 10**9 + 5 * 10**6, 2_500_000_000, ok=False)),
                artifacts={"timeline": "iterations/0/timeline.jsonl"})
    info = RunInfo(scenario="sweep", accelerator="kvm", versions={"qemu": "7.2.15"}, seed=5,
                   started_at="2024-11-22T05:40:00+00:00", ended_at="2024-11-22T05:41:00+00:00",
                   stopped_at=None, guest_image_sha256="ab" * 32, alignment_bound_ns=1_200_000,
                   parameters=INFO.parameters, topology={"ports": ["rp1"]})
    written = write_summary(tmp_path, info, reversed(rs))     # any order in, sorted out
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["schema"] == SCHEMA and data["exit_code"] == 1
    assert data["iterations"][0]["duration_s"] == pytest.approx(2.505)
    assert [it["index"] for it in data["iterations"]] == list(range(20))
    # a lab-error iteration ran, so it counts in the denominator
    assert data["signatures"][0]["rate_text"] == "3 of 20 (15.0 %)"
    loaded = load_summary(tmp_path)
    assert loaded == written
    assert load_summary(tmp_path / "summary.json") == written
    assert loaded.run.guest_image_sha256 == "ab" * 32
    assert loaded.result(0).error == "agent timed out"
    assert not list(tmp_path.glob(".summary-*"))              # no temp file left behind


def test_load_rejects_other_json(tmp_path: Path) -> None:
    (tmp_path / "summary.json").write_text('{"schema": "other"}')
    with pytest.raises(ValueError, match="not a rebalab summary"):
        load_summary(tmp_path)


def test_helpers() -> None:
    assert fmt_rate(3, 20) == "3 of 20 (15.0 %)"
    assert fmt_rate(0, 0) == "0 of 0 (0.0 %)"
    assert fmt_params({"delay_ms": 100, "on": True, "f": 0.25, "g": 2.0}) == \
        "delay_ms=100 on=true f=0.25 g=2"
    assert iteration_duration_s(res(0, Status.PASSED)) is None
