"""``junit.xml`` for CI: one test suite per run, one test case per iteration.

CI systems show JUnit natively, so a failed race hunt shows up as failed test cases
named by iteration and parameters (``#007 delay_ms=300 model=AC97``), each failure
carrying the violations (rule, device, phase, message, event times). Lab errors are
``<error>``, iterations that did not run (``until: fail``, interrupt) are
``<skipped>`` with the reason, and the suite's properties record provenance
(scenario, accelerator, QEMU version, seed, guest image hash), the way labgrid's
pytest plugin records image versions.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite

from lab.atomic import atomic_path
from lab.report.summary import Summary, fmt_params, iteration_duration_s
from lab.results import EventRef, IterationResult, Status, Violation

JUNIT_FILE = "junit.xml"
# Characters XML 1.0 cannot carry at all (kernel logs do contain escape codes).
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group(0)):02x}", text)


def case_name(r: IterationResult) -> str:
    """``#007 delay_ms=300 model=AC97``: sortable index, then parameters."""
    params = fmt_params(r.parameters)
    att = f" attempt {r.attempt}" if r.attempt is not None else ""
    return f"#{r.index:03d}{att}" + (f" {params}" if params else "")


def _t0(r: IterationResult) -> int | None:
    return min((t.started_ns for t in r.timings), default=None)


def fmt_event(e: EventRef, t0: int | None) -> str:
    """``+12.345 ms guest.kprobe remove-enter #812: summary`` (absolute UTC without t0)."""
    if t0 is not None:
        when = f"+{(e.t_host_ns - t0) / 1e6:.3f} ms"
    else:
        when = datetime.fromtimestamp(e.t_host_ns / 1e9, timezone.utc).strftime(
            "%H:%M:%S.%f")
    s = f"{when} {e.source} {e.kind} #{e.seq}"
    return s + (f": {e.summary}" if e.summary else "")


def fmt_violation(v: Violation, t0: int | None = None) -> str:
    """A violation as plain text for CI logs and JUnit failure bodies."""
    lines = [f"[{v.rule}] device {v.device}, phase {v.phase}: {v.message}"]
    for e in v.events:
        lines.append("    " + fmt_event(e, t0))
    for k, val in v.details.items():
        lines.append(f"    {k}: {val}")
    return "\n".join(lines)


def build_junit(summary: Summary, *, run_dir: str | Path | None = None) -> JUnitXml:
    """The JUnit document for ``summary``; ``run_dir`` is named in system-out."""
    run = summary.run
    suite = TestSuite(f"rebalab.{run.scenario}")
    props: dict[str, Any] = {
        "scenario": run.scenario, "accelerator": run.accelerator,
        "qemu_version": run.versions.get("qemu", "unknown"), "seed": run.seed,
        "guest_image_sha256": run.guest_image_sha256 or "unknown",
        "status": summary.status.value, "exit_code": summary.exit_code,
    }
    if run.guest:
        props["guest"] = run.guest
    if run.alignment_bound_ns is not None:
        props["alignment_bound_ms"] = f"{run.alignment_bound_ns / 1e6:.3f}"
    if run.stopped_at:
        props["stopped_at"] = run.stopped_at
    for k, v in sorted(run.versions.items()):
        if k != "qemu":
            props[f"version.{k}"] = v
    for k, v in props.items():
        suite.add_property(k, _clean(str(v)))
    if run.started_at:
        suite.timestamp = run.started_at
    for r in summary.results:
        suite.add_testcase(_case(r, run.scenario, run_dir))
    if run.error:
        suite.add_testcase(_run_error_case(run.scenario, run.error))
    suite.update_statistics()  # type: ignore[no-untyped-call]
    doc = JUnitXml(f"rebalab {run.scenario}")
    doc.add_testsuite(suite)
    doc.update_statistics()  # type: ignore[no-untyped-call]
    return doc


def _case(r: IterationResult, scenario: str, run_dir: str | Path | None) -> TestCase:
    case = TestCase(_clean(case_name(r)), f"rebalab.{scenario}", iteration_duration_s(r) or 0.0)
    t0 = _t0(r)
    if r.status == Status.FAILED:
        sigs = sorted({str(v.signature) for v in r.violations})
        msg = "; ".join(sigs) if sigs else (r.error or "failed")
        if r.violations:
            first = r.violations[0]
            msg = f"{first.rule} on {first.device} ({first.phase}): {first.message}"
            if len(r.violations) > 1:
                msg += f" (+{len(r.violations) - 1} more)"
        fail = Failure(_clean(msg), _clean(r.violations[0].rule if r.violations else "assert"))
        body = "\n\n".join(fmt_violation(v, t0) for v in r.violations) or (r.error or "")
        fail.text = _clean(body)
        case.result = [fail]
    elif r.status in (Status.ERROR, Status.INTERRUPTED):
        err = Error(_clean(r.error or r.status.value), "lab-error"
                    if r.status == Status.ERROR else "interrupted")
        text = r.error or ""
        if r.violations:
            text += "\n\nviolations seen before the error:\n" + \
                "\n\n".join(fmt_violation(v, t0) for v in r.violations)
        err.text = _clean(text)
        case.result = [err]
    elif r.status == Status.SKIPPED:
        case.result = [Skipped(_clean(f"not run: {r.stopped_at}" if r.stopped_at
                                      else "not run"))]
    out = [f"seed: {r.seed}"]
    if run_dir is not None:
        out.append(f"run directory: {run_dir}")
        out.append(f"iteration directory: {Path(run_dir) / 'iterations' / str(r.key)}")
    for name, rel in sorted(r.artifacts.items()):
        out.append(f"artifact {name}: {rel}")
    if r.timings:
        out.append("steps:")
        for t in r.timings:
            ok = "ok" if t.ok else "FAILED"
            out.append(f"  {(t.started_ns - (t0 or t.started_ns)) / 1e6:10.3f} ms "
                       f"{t.duration_ns / 1e6:9.3f} ms {ok:6} {t.name}"
                       + (f" ({t.detail})" if t.detail else ""))
    case.system_out = _clean("\n".join(out))
    return case


def _run_error_case(scenario: str, error: str) -> TestCase:
    case = TestCase("run", f"rebalab.{scenario}", 0.0)
    e = Error(_clean(error.splitlines()[0] if error else "lab error"), "lab-error")
    e.text = _clean(error)
    case.result = [e]
    return case


def write_junit(run_dir: str | Path, summary: Summary, path: str | Path | None = None) -> Path:
    """Write ``junit.xml`` (default: into ``run_dir``) and check that it parses back."""
    out = Path(path) if path is not None else Path(run_dir) / JUNIT_FILE
    doc = build_junit(summary, run_dir=run_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # whole or nothing (a full disk must not leave half a file for CI to choke on)
    with atomic_path(out) as tmp:
        doc.write(str(tmp), pretty=True)
        JUnitXml.fromfile(str(tmp))  # a CI that cannot read it would silently show nothing
    return out
