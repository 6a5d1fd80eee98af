"""`rebalab inspect`: logs from real machines through parsers, timeline, rules, reports.

The inputs are the real public samples of tests/unit/data/logs/ (their provenance is
next to them); the expectations are read from those samples, not from the parsers.
"""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab import logs
from lab.cli import main
from lab.errors import ConfigError
from lab.events import DeviceId, Event, Kind, Source
from lab.inspect import DeviceSpec, inspect_files, inspect_run, is_run_dir
from lab.logs.base import LogFormatError, LogInput, Tally
from lab.report.summary import RunInfo, write_summary
from lab.results import IterationResult, Status
from lab.rules import check_all
from lab.rules.base import RuleContext
from lab.timeline import Timeline

DATA = Path(__file__).parent / "data" / "logs"
SETUPAPI_PROBLEM = DATA / "setupapi" / "nmap1746_problem_code_truncated.dev.log"
EVTX_219 = DATA / "winevent" / "system_chunk0_kernel_pnp_219.evtx"
PNPUTIL_28 = DATA / "pnputil" / "openzfs_392_unknown_problem.txt"
DMESG_NO_SPACE = DATA / "kernel" / "dmesg_grep_prompt_nanopi.txt"
XML_410 = DATA / "winevent" / "kernel_pnp_410_event_viewer_xml_view.xml"
LAB_ETW_JSON = Path(__file__).parent / "data" / "windows" / "kernel_pnp_events.json"


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["inspect", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# ---- formats are detected, every line is accounted for ------------------------------

@pytest.mark.parametrize("path, fmt", [
    (SETUPAPI_PROBLEM, "setupapi"), (EVTX_219, "evtx"), (PNPUTIL_28, "pnputil"),
    (DMESG_NO_SPACE, "kernel-log"), (XML_410, "event-xml"), (LAB_ETW_JSON, "event-json"),
])
def test_format_detected_and_lines_accounted(path: Path, fmt: str) -> None:
    insp = inspect_files([path])
    f = insp.files[0]
    assert f.tally.format == fmt
    assert f.tally.balanced and f.tally.events == f.kept > 0
    # the counts reach the timeline header, so a report says what was not understood
    meta = insp.timeline.meta["inspect"]["files"][0]
    assert meta["format"] == fmt and meta["not_understood"] == f.tally.not_understood


def test_every_corpus_file_is_detected_as_its_folders_format() -> None:
    folder_formats = {"setupapi": {"setupapi"}, "pnputil": {"pnputil"}, "kernel": {"kernel-log"},
                      "winevent": {"event-xml", "event-json", "event-text", "evtx"}}
    seen = 0
    for folder, allowed in folder_formats.items():
        for p in sorted((DATA / folder).iterdir()):
            if p.name == "PROVENANCE.md":
                continue
            assert logs.detect(LogInput(p)).name in allowed, p.name
            seen += 1
    assert seen >= 30


# ---- verdicts per device ------------------------------------------------------------

def test_setupapi_problem_code_is_a_violation_on_that_device(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(SETUPAPI_PROBLEM), "--json")
    assert rc == 1
    doc = json.loads(out)
    (dev,) = [d for d in doc["devices"] if d["verdict"] == "violations"]
    assert dev["device"] == "ROOT\\NET\\0001"
    assert [v["rule"] for v in dev["violations"]] == ["pnp.problem-at-end"]
    assert "problem code 56" in dev["violations"][0]["message"]
    # the prose line in front of the paste was not understood, and said so
    f = doc["files"][0]
    assert f["not_understood"] == 1 and f["samples"][0]["line"] == 1


def test_evtx_driver_load_failure_is_judged(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(EVTX_219), "--json")
    assert rc == 1
    doc = json.loads(out)
    viol = doc["violations"]
    assert [v["rule"] for v in viol] == ["pnp.driver-load-failed"]
    assert viol[0]["device"] == "HID\\VID_0E0F&PID_000A&Col01\\7&1e4bfc40&0&0000"
    assert "\\Driver\\WudfRd" in viol[0]["message"] and "0xC0000365" in viol[0]["message"]


def test_named_device_by_glob_gets_the_name_and_others_are_not_judged(
        capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(LAB_ETW_JSON), str(PNPUTIL_28), "--json",
                         "--device", "bridge=PCI\\VEN_1B36&DEV_000C*",
                         "--device", "absent=PCI\\VEN_FFFF*")
    assert rc == 1
    doc = json.loads(out)
    labels = {d["device"]: d for d in doc["devices"]}
    assert set(labels) == {"bridge", "absent"}
    assert [v["signature"] for v in labels["bridge"]["violations"]] == \
        ["pnp.problem-at-end@bridge/setup"]
    assert labels["bridge"]["identities"] == ["PCI\\VEN_1B36&DEV_000C&SUBSYS_11001AF4&REV_00\\3&2411E6FE&0&18"]
    assert labels["absent"]["events"] == 0 and doc["unmatched_devices"] == ["absent"]
    # the pnputil device with problem 28 is not under test: not judged
    assert all("OpenZFS" not in v["device"] for v in doc["violations"])


def test_linux_bar_left_unassigned_is_a_violation_and_a_later_assignment_clears_it(
        tmp_path: Path) -> None:
    insp = inspect_files([DMESG_NO_SPACE])
    assert sorted(v.signature.rule for v in insp.violations) == ["pci.resource-unassigned"] * 2
    assert {v.device for v in insp.violations} == {"0002:00:00.0"}
    # the same log where the kernel's second pass assigned BAR 0 and 1 afterwards
    fixed = tmp_path / "dmesg.txt"
    fixed.write_text(DMESG_NO_SPACE.read_text() +
                     "[    8.000001] pci 0002:00:00.0: BAR 0: assigned [mem 0x300000000-0x33fffffff 64bit pref]\n"
                     "[    8.000002] pci 0002:00:00.0: BAR 1: assigned [mem 0x340000000-0x37fffffff 64bit pref]\n")
    assert inspect_files([fixed]).violations == []


def test_untimed_snapshot_comes_after_timed_evidence() -> None:
    insp = inspect_files([PNPUTIL_28, SETUPAPI_PROBLEM])
    kinds = [(e.source, e.kind) for e in insp.timeline]
    # pnputil (no time) is the state when it was taken: after the setupapi sections
    assert kinds[-1] == (Source.GUEST_PNP, Kind.PROBLEM)
    assert [e.source for e in insp.timeline][:-1] == [Source.GUEST_SETUPAPI] * (len(kinds) - 1)


def test_rules_selection_limits_the_checks(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(DMESG_NO_SPACE), "--rules", "windows-pnp", "--json")
    assert rc == 0 and json.loads(out)["violations"] == []
    rc, _, err = run_cli(capsys, str(DMESG_NO_SPACE), "--rules", "no-such-rule")
    assert rc == 2 and "unknown rule 'no-such-rule'" in err


def test_text_output_names_files_events_and_verdicts(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, str(DMESG_NO_SPACE), str(SETUPAPI_PROBLEM))
    assert rc == 1
    assert f"{DMESG_NO_SPACE}: kernel-log, 7 line(s)" in out
    assert "not understood, line 1:" in out            # setupapi's prose line, shown
    assert "[    7.907999] boot" in out                  # boot-relative stamps as such
    assert "2019-09-18 11:38:27.291 L" in out                # setupapi's local time, said so
    assert "pci.resource-unassigned@0002:00:00.0/setup" in out
    assert "pnp.problem-at-end@ROOT\\NET\\0001/setup" in out


def test_format_list_and_unknown_format(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "--format", "list", "x")
    assert rc == 0
    for name in ("setupapi", "event-xml", "event-json", "event-text", "evtx", "pnputil",
                 "kernel-log", "qmp-log", "lab-console", "timeline"):
        assert name in out
    rc, _, err = run_cli(capsys, "--format", "nope", str(DMESG_NO_SPACE))
    assert rc == 2 and "unknown log format 'nope'" in err


# ---- unreadable input: exit 2, file named, content never echoed ----------------------

SECRET = "hunter2-SECRET-TOKEN"


def test_nothing_understood_is_an_error_not_an_empty_success(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "notes.txt"
    f.write_text(f"password={SECRET}\nsome notes {SECRET}\n")
    rc, out, err = run_cli(capsys, str(f), "--format", "setupapi")
    assert rc == 2 and str(f) in err and "nothing in it was understood as setupapi" in err
    assert SECRET not in out + err
    rc, out, err = run_cli(capsys, str(f))
    assert rc == 2 and "format was not recognised" in err and SECRET not in out + err


def test_not_a_regular_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    rc, _, err = run_cli(capsys, str(fifo))
    assert rc == 2 and "not a regular file" in err
    rc, _, err = run_cli(capsys, "/dev/zero")
    assert rc == 2 and "not a regular file" in err
    rc, _, err = run_cli(capsys, str(tmp_path))
    assert rc == 2 and "a directory" in err
    rc, _, err = run_cli(capsys, str(tmp_path / "missing.log"))
    assert rc == 2 and "cannot read" in err


@pytest.mark.parametrize("spec, why", [
    ("snd0", "expected NAME=IDENTITY"), ("=PCI\\X", "expected NAME=IDENTITY"),
    ("bad name=0000:01:00.0", "not a usable device name"),
    ("x=PCI\\\x01", "not a PCI address or an instance id"),
])
def test_bad_device_spec(spec: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        DeviceSpec.parse(spec)


def test_bad_limits_and_counts(capsys: pytest.CaptureFixture[str]) -> None:
    for args, why in ((["--limit", "query_stop_max_ms"], "expected NAME=MS"),
                      (["--limit", "query_stop_max_ms=nan"], "not a positive number"),
                      (["--limit", "nope_ms=5"], "unknown rule limit"),
                      (["--max-events", "-1"], "--max-events must be >= 0")):
        rc, _, err = run_cli(capsys, str(DMESG_NO_SPACE), *args)
        assert rc == 2 and why in err, (args, err)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000))
def test_any_bytes_give_a_verdict_or_a_clean_error(tmp_path_factory: pytest.TempPathFactory,
                                                   data: bytes) -> None:
    p = tmp_path_factory.mktemp("any") / "input.log"
    p.write_bytes(data)
    try:
        insp = inspect_files([p])
    except LogFormatError as exc:
        assert str(p) in str(exc)
        return
    f = insp.files[0]
    assert f.tally.balanced and (f.tally.events or f.tally.used)


# ---- reports -------------------------------------------------------------------------

def test_report_dir_has_the_runs_artifacts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "rep"
    rc, out, _ = run_cli(capsys, str(SETUPAPI_PROBLEM), str(EVTX_219), "--report", str(out_dir))
    assert rc == 1 and "report: " in out
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o700
    tl = Timeline.read(out_dir / "timeline.jsonl")
    files = tl.meta["inspect"]["files"]
    assert [Path(f["path"]).name for f in files] == [SETUPAPI_PROBLEM.name, EVTX_219.name]
    assert files[0]["not_understood"] == 1
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    sigs = {s["signature"] for s in summary["signatures"]}
    assert "pnp.problem-at-end@ROOT\\NET\\0001/setup" in sigs
    assert any(s.startswith("pnp.driver-load-failed@HID\\") for s in sigs)
    cases = ET.parse(out_dir / "junit.xml").getroot().findall(".//testcase")
    assert len(cases) == 1 and cases[0].find("failure") is not None
    html = (out_dir / "report.html").read_text()
    assert "pnp.driver-load-failed" in html and "https://" not in html


# ---- a run directory: the recorded verdict, re-checked ------------------------------

def _windows_run(tmp_path: Path) -> Path:
    """A run whose one iteration recorded a STOP without QUERY_STOP (Windows PnP)."""
    dev = DeviceId(qom="snd0", instance="PCI\\VEN_8086&DEV_293E\\3&1&0&20")
    evs = [Event(1_000_000_000, Source.HOST_LAB, Kind.OPERATION, data={"name": "rebalance"},
                 duration_ns=500_000_000),
           Event(1_050_000_000, Source.GUEST_WPP, Kind.START, dev, data={"status": "0x0"}),
           Event(1_100_000_000, Source.GUEST_WPP, Kind.STOP, dev, data={"status": "0x0"}),
           Event(1_200_000_000, Source.GUEST_WPP, Kind.START, dev, data={"status": "0x0"})]
    tl = Timeline.build(evs, devices=[dev])
    run = tmp_path / "run"
    it = run / "iterations" / "0"
    it.mkdir(parents=True)
    tl.write(it / "timeline.jsonl")
    ctx = RuleContext.from_timeline(tl, devices=(DeviceId(qom="snd0"),), bound_at_start=frozenset())
    (it / "rules.json").write_text(json.dumps({"rules": ["windows-pnp"], "context": ctx.recorded()}))
    found = check_all(tl, ctx, ["windows-pnp"])
    assert [v.rule for v in found] == ["pnp.stop-without-query-stop"]
    write_summary(run, RunInfo(scenario="t"), [IterationResult(
        index=0, parameters={}, seed=1, status=Status.FAILED, violations=tuple(found),
        artifacts={"timeline": "iterations/0/timeline.jsonl"})])
    return run


def test_run_dir_recheck_reproduces_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _windows_run(tmp_path)
    assert is_run_dir(run)
    (check,) = inspect_run(run)
    assert check.reproduced and [v.rule for v in check.rechecked] == ["pnp.stop-without-query-stop"]
    rc, out, _ = run_cli(capsys, str(run))
    assert rc == 1 and "iteration 0: recorded 1 violation(s), re-checked 1 from the timeline: same verdict" in out


def test_run_dir_recheck_sees_an_edited_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _windows_run(tmp_path)
    tp = run / "iterations" / "0" / "timeline.jsonl"
    lines = tp.read_text().splitlines()
    tp.write_text("\n".join(ln for ln in lines if '"kind": "stop"' not in ln) + "\n")
    (check,) = inspect_run(run)
    assert not check.reproduced and check.rechecked == []
    rc, out, _ = run_cli(capsys, str(run), "--json")
    assert rc == 1 and json.loads(out)["reproduced"] is False


def test_run_dir_takes_no_file_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _windows_run(tmp_path)
    rc, _, err = run_cli(capsys, str(run), "--device", "a=0000:01:00.0")
    assert rc == 2 and "re-checked as the run recorded it" in err


# ---- the lab's own files --------------------------------------------------------------

def test_lab_console_and_qmp_log(tmp_path: Path) -> None:
    console = tmp_path / "console.log"
    console.write_text(
        "2026-12-02T04:48:51.989Z [   12.000001] pci 0000:01:00.0: BAR 0 [io  0x0000-0x03ff]\n"
        "2026-12-02T04:48:52.100Z [   12.100000] BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
        "2026-12-02T04:48:52.200Z rebalab login:\n"
        "2026-12-02T04:48:52.300Z \n")
    qmp = tmp_path / "qmp.jsonl"
    qmp.write_text("\n".join(json.dumps(r) for r in (
        {"dir": "greeting", "greeting": {}, "t_host_ns": 1},
        {"dir": "out", "execute": "device_add", "arguments": {"driver": "AC97", "id": "snd0", "bus": "rp1"},
         "t_host_ns": 1_764_650_931_000_000_000},
        {"dir": "in", "execute": "device_add", "return": {}, "t_host_ns": 1_764_650_931_002_000_000},
        {"dir": "event", "event": {"event": "DEVICE_DELETED", "data": {"device": "snd0"},
                                   "t_host_ns": 1_764_650_932_000_000_000}, "t_host_ns": 1_764_650_932_000_000_001},
        {"nonsense": True})) + "\n")
    insp = inspect_files([console, qmp])
    c, q = insp.files
    assert (c.tally.format, c.tally.used, c.tally.skipped, c.tally.not_understood) == ("lab-console", 2, 1, 1)
    assert (q.tally.format, q.tally.used, q.tally.skipped, q.tally.not_understood) == ("qmp-log", 2, 2, 1)
    kinds = [e.kind for e in insp.timeline]
    assert Kind.HOTPLUG_REQUEST in kinds and Kind.DEVICE_DELETED in kinds and Kind.KERNEL_OOPS in kinds
    assert [v.rule for v in insp.violations] == ["kernel.oops"]


def test_a_timeline_file_is_rejudged(tmp_path: Path) -> None:
    run = _windows_run(tmp_path)
    insp = inspect_files([run / "iterations" / "0" / "timeline.jsonl"], rules=["windows-pnp"])
    assert insp.files[0].tally.format == "timeline"
    assert [v.rule for v in insp.violations] == ["pnp.stop-without-query-stop"]


def test_tally_counts_cut_lines_and_decode_errors(tmp_path: Path) -> None:
    p = tmp_path / "k.log"
    p.write_bytes(b"[    1.000000] pci 0000:00:01.0: caf\xe9 \x80\n" + b"[    2.000000] " + b"x" * 40_000 + b"\n")
    t = Tally(path=str(p), format="kernel-log")
    list(logs.get("kernel-log").parse(LogInput(p), t))
    assert t.decode_errors == 1 and t.cut_lines == 1 and t.lines == 2 and t.balanced


def test_caps_keep_memory_bounded_and_say_what_was_left_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import lab.inspect as insp_mod
    monkeypatch.setattr(insp_mod, "MAX_LOG_LINES", 10)
    monkeypatch.setattr(insp_mod, "MAX_RULE_EVENTS", 3)
    p = tmp_path / "dmesg.txt"
    lines = [f"[{i:5d}.000000] plain line {i}" for i in range(1, 31)]
    lines += [f"[{i:5d}.000000] pci 0000:0{i % 5}:00.0: BAR 0: no space for [mem size 0x00100000]"
              for i in range(31, 36)]
    p.write_text("\n".join(lines) + "\n")
    insp = insp_mod.inspect_files([p])
    f = insp.files[0]
    assert (f.kept, f.left_out, f.left_out_rule) == (13, 20, 2)
    assert any("2 event(s) the rules read were past the 3" in x for x in f.tally.problems)
    assert f.tally.balanced and f.tally.events == 35
    rc = main(["inspect", str(p)])
    out = capsys.readouterr().out
    assert rc == 1 and "(20 plain log lines left out of the timeline)" in out
    assert "(2 events past the cap: NOT judged)" in out
