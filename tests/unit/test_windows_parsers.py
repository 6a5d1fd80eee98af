"""Parsers of the Windows guest traces, on samples in Microsoft's documented formats
(tests/unit/data/windows/README.md says what each sample contains and why)."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lab.errors import ConfigError
from lab.events import Event, Kind, Source
from lab.guest.windows.trace import etw, pnp_state, setupapi, wpp
from lab.guest.windows.trace.common import (
    TraceParseError,
    filetime_to_unix_ns,
    iso_to_unix_ns,
    validate_guest_path,
    validate_guid,
)

DATA = Path(__file__).parent / "data" / "windows"
HDA = "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&2411E6FE&0&10"


def ns(text: str) -> int:
    d = datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    return int(d.timestamp()) * 1_000_000_000 + d.microsecond * 1000


# ------------------------------------------------------------------ common

def test_guid_validation() -> None:
    assert validate_guid("9c205a39-1250-487d-abd7-e831c6290539") == "{9C205A39-1250-487D-ABD7-E831C6290539}"
    assert validate_guid("{9C205A39-1250-487D-ABD7-E831C6290539}") == etw.KERNEL_PNP_GUID
    for bad in ("9C205A39-1250-487D-ABD7", "{9C205A39-1250-487D-ABD7-E831C6290539", "x" * 36,
                "9C205A39-1250-487D-ABD7-E831C629053Z", "'; calc; '"):
        with pytest.raises(ConfigError):
            validate_guid(bad)


@pytest.mark.parametrize("bad", ["relative\\path", "C:\\a\"b", "C:\\dir\\", "C:\\a*b", "C:\\x\ny", "\\\\server\\share"])
def test_guest_path_validation(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_guest_path(bad)


def test_times() -> None:
    assert filetime_to_unix_ns(116444736000000000) == 0
    assert filetime_to_unix_ns(116444736000000001) == 100
    assert iso_to_unix_ns("2024-01-15T10:00:00.1234567Z") == ns("2024-01-15T10:00:00") + 123_456_700
    assert iso_to_unix_ns("2024-01-15T11:00:00.5+01:00") == ns("2024-01-15T10:00:00") + 500_000_000


# ------------------------------------------------------------------ ETW

def test_etw_sample_maps_documented_and_configured_ids() -> None:
    out = etw.parse_etw_json((DATA / "kernel_pnp_events.json").read_text(), received_ns=42)
    kinds = [e.kind for e in out.events]
    # begins are CALL_ENTER (one event of the IRP kind per operation: its end). 803/804
    # ("Begin/End processing phase %1 of starting device %2") carry no status: they are
    # spans in the log, not a START the rules would count as a successful start
    assert kinds == [Kind.REBALANCE_START, Kind.CALL_ENTER, Kind.RESOURCES_ASSIGNED, Kind.CALL_ENTER,
                     Kind.KERNEL_LOG, Kind.START, Kind.REBALANCE_END, Kind.PROBLEM, Kind.KERNEL_LOG, Kind.REMOVE,
                     Kind.KERNEL_LOG, Kind.START]
    assert out.events[1].data["for_kind"] == "resources-assigned" and out.events[3].data["for_kind"] == "kernel-log"
    # the fields lab.rules.windows_pnp reads
    assert out.events[7].data["code"] == 10 and out.events[7].data["status"] == "0xC00000E5"
    assert out.events[5].data["code"] == 0 and out.events[5].data["status"] == "0x0"
    assert all(e.source is Source.GUEST_ETW and e.t_host_ns == 42 for e in out.events)
    started = out.events[5]
    assert started.data["event_id"] == 410 and started.data["name"] == "DeviceStarted"
    assert started.device is not None and started.device.instance == HDA
    assert started.t_guest_ns == ns("2024-01-15T10:00:00.351")
    # 100-ns precision survives: the first record is 3 ticks past the millisecond
    assert out.events[0].t_guest_ns == ns("2024-01-15T10:00:00.1") + 300
    # begin/end pairs get durations (device pairing and ActivityId pairing)
    assert out.events[2].duration_ns == 5_000_000 and out.events[2].data["phase"] == "end"
    assert out.events[4].duration_ns == 50_000_000
    assert out.events[6].duration_ns == 300_000_000 - 300
    # the raw record is kept
    assert out.events[5].data["raw"]["Data"]["DriverName"] == "oem7.inf"


def test_etw_unknown_ids_and_bad_times_are_flagged_not_dropped() -> None:
    out = etw.parse_etw_json((DATA / "kernel_pnp_events.json").read_text(), received_ns=1)
    unknown = out.events[8]
    assert unknown.kind is Kind.KERNEL_LOG and unknown.data["event_id"] == 999
    assert "unmapped-event-id" in unknown.data["flags"]
    bad = out.events[10]
    assert bad.t_guest_ns is None and "bad-timestamp" in bad.data["flags"]
    assert bad.data["event_id"] == 430
    assert any("bad or missing TimeCreated" in p for p in out.problems)
    # instance id found in Properties when the record has no field names
    assert out.events[11].device is not None and out.events[11].device.instance.startswith("PCI\\VEN_1B36&DEV_0011")
    # events survive the run directory's JSON round trip
    for e in out.events:
        assert Event.from_json(json.loads(e.dumps())).kind is e.kind


def test_etw_malformed_json_is_a_clear_error() -> None:
    with pytest.raises(TraceParseError, match="line 1 column"):
        etw.parse_etw_json((DATA / "kernel_pnp_truncated.json").read_text(), received_ns=1)


def test_etw_malformed_records_are_kept() -> None:
    out = etw.parse_records([17, {"Id": "x"}, {"Id": 410}], received_ns=5)
    assert len(out.events) == 3
    assert "malformed-record" in out.events[0].data["flags"]
    assert {"missing-event-id", "bad-timestamp"} <= set(out.events[1].data["flags"])
    assert out.events[2].kind is Kind.START and out.events[2].t_guest_ns is None
    assert len(out.problems) == 4


def test_event_map_override(tmp_path: Path) -> None:
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"events": {"999": {"kind": "rebalance-start", "name": "NewRebalance"},
                                        "420": None}}))
    emap = etw.EventMap.load(f)
    out = etw.parse_etw_json((DATA / "kernel_pnp_events.json").read_text(), received_ns=1, event_map=emap)
    assert out.events[8].kind is Kind.REBALANCE_START
    assert out.events[9].kind is Kind.KERNEL_LOG and "unmapped-event-id" in out.events[9].data["flags"]
    f.write_text(json.dumps({"events": {"1": {"kind": "nonsense"}}}))
    with pytest.raises(ConfigError, match="unknown kind"):
        etw.EventMap.load(f)
    assert etw.EventMap().to_json()["events"]["410"]["kind"] == "start"


def test_manifest_ids_check_the_table() -> None:
    ids = etw.manifest_event_ids((DATA / "wevtutil_gp_kernel_pnp.txt").read_text())
    assert ids == {400, 410, 411, 420, 430}
    unconfirmed = etw.EventMap().unconfirmed(ids)
    # every table id the (abridged) sample manifest does not list, in order
    assert unconfirmed == [219, 223, 224, 225, 421, 440, 441, 442, 704, 705, 803, 804, 805, 806,
                           830, 831, 832, 840, 841, 850, 851, 852, 853, 1000, 1010, 1011, 1020, 1021]
    assert set(unconfirmed) == set(etw.EventMap().rules) - ids


def test_logman_commands() -> None:
    sess = etw.EtwSession("rebalab-pnp", "C:\\t\\k.etl",
                          (etw.KERNEL_PNP, etw.EtwProvider("11111111-2222-3333-4444-555555555555", "0xFF", 4)))
    scripts = etw.start_scripts(sess)
    assert [s.label.split(":")[0] for s in scripts] == ["etw", "etw", "etw"]
    create = scripts[1].script
    assert "& logman.exe create trace $p.Session -o $p.Etl -p $p.Provider $p.Keywords $p.Level -ow -ets" in create
    assert "Provider = '{9C205A39-1250-487D-ABD7-E831C6290539}'" in create
    assert "Keywords = '0xFFFFFFFFFFFFFFFF'" in create and "Level = '0x5'" in create
    assert "logman.exe update trace" in scripts[2].script and "Level = '0x4'" in scripts[2].script
    with pytest.raises(ConfigError):
        etw.EtwProvider("{9C205A39-1250-487D-ABD7-E831C6290539}", keywords="all")
    with pytest.raises(ConfigError):
        etw.EtwSession("bad name; x", "C:\\t\\k.etl", (etw.KERNEL_PNP,))


# ------------------------------------------------------------------ setupapi

def test_setupapi_sections() -> None:
    log = setupapi.parse((DATA / "setupapi.dev.log").read_text())
    titles = [(s.title, s.exit_status, sorted(s.flags)) for s in log.sections]
    assert titles == [
        ("Device Install (Hardware initiated)", "SUCCESS", []),
        ("Device Install (Hardware initiated)", "SUCCESS", []),
        ("Device Install (Hardware initiated)", "FAILURE(0xe0000219)", []),
        ("Setup Import Driver Package", None, ["truncated"]),
        ("Device Install (DiInstallDriver)", "SUCCESS", ["bad-timestamp"]),
        ("Old style", "0x00000000", []),
        ("Device Install (Hardware initiated)", None, ["incomplete"]),
    ]
    assert log.boot_sessions == ["2024/01/15 09:58:30.500"]
    failed = log.sections[2]
    assert failed.succeeded is False
    assert failed.errors == ["dvi: Default installer: failed!",
                             "dvi: Error 0xe0000219: The INF specified a driver that could not be started."]
    assert failed.warnings[0].startswith("dvi: Device not started")
    assert failed.instance == "PCI\\VEN_1B36&DEV_000C&SUBSYS_11001AF4&REV_00\\3&2411e6fe&0&18"
    assert failed.start_ns == ns("2024-01-15T10:00:02")
    assert log.sections[5].start_ns == ns("2024-01-15T10:00:05")
    assert any("bad section start time" in p for p in log.problems)


def test_setupapi_since_run_start_keeps_unreadable_times() -> None:
    log = setupapi.parse((DATA / "setupapi.dev.log").read_text(), since_ns=ns("2024-01-15T10:00:00"))
    assert len(log.sections) == 6  # the 09:59 section is gone, the bad-timestamp one is kept
    assert "bad-timestamp" in log.sections[3].flags


def test_setupapi_utc_offset() -> None:
    log = setupapi.parse((DATA / "setupapi.dev.log").read_text(), utc_offset=timedelta(hours=2))
    assert log.sections[1].start_ns == ns("2024-01-15T08:00:00.123")


def test_setupapi_events() -> None:
    log = setupapi.parse((DATA / "setupapi.dev.log").read_text())
    out = setupapi.to_events(log, received_ns=9)
    assert all(e.kind is Kind.SETUPAPI_SECTION and e.source is Source.GUEST_SETUPAPI for e in out.events)
    assert out.events[1].duration_ns == 1_333_000_000
    assert out.events[1].device is not None
    assert out.events[3].device is None  # an INF path is not a device instance id
    assert out.events[6].data["flags"] == ["incomplete"]


def test_setupapi_tail_starting_mid_section() -> None:
    text = "     dvi: still writing\n<<<  Section end 2024/01/15 10:00:01.000\n<<<  [Exit status: SUCCESS]\n"
    log = setupapi.parse(text)
    assert log.sections == [] and len(log.problems) == 2


def test_setupapi_tail_decoding() -> None:
    raw = "\ufeff>>>  [x]\n".encode("utf-8")
    t = setupapi.decode_tail([{"Offset": 10, "Length": 30, "Rotated": False, "Missing": False,
                               "Truncated": False, "Data": base64.b64encode(raw).decode()}])
    assert t.text == ">>>  [x]\n" and t.offset == 10
    cp = setupapi.decode_tail([{"Data": base64.b64encode("Gr\xfc\xdfe".encode("cp1252")).decode()}])
    assert cp.text == "Grüße"
    s = setupapi.tail_script(1234)
    assert "Offset = 1234" in s.script and "[IO.FileShare]::ReadWrite" in s.script


# ------------------------------------------------------------------ PnP state

def test_pnp_state_sample() -> None:
    states, problems = pnp_state.parse_pnp_json((DATA / "pnp_state.json").read_text())
    assert [s.problem for s in states] == [None, "CM_PROB_FAILED_START", "CM_PROB_PHANTOM", "CM_PROB_FAILED_INSTALL"]
    assert states[1].problem_status == "0xC00000E5"
    assert len(problems) == 1 and "no InstanceId" in problems[0]
    out = pnp_state.to_events(states, received_ns=3)
    assert [e.kind for e in out.events] == [Kind.BOUND, Kind.PROBLEM, Kind.PROBLEM, Kind.PROBLEM]
    assert out.events[1].data["problem_code"] == 10
    assert all(e.source is Source.GUEST_PNP for e in out.events)


def test_cm_prob_table_matches_the_documented_codes() -> None:
    documented = {1: "NOT_CONFIGURED", 10: "FAILED_START", 12: "NORMAL_CONFLICT", 22: "DISABLED",
                  24: "DEVICE_NOT_THERE", 28: "FAILED_INSTALL", 31: "FAILED_ADD", 43: "FAILED_POST_START",
                  45: "PHANTOM", 47: "HELD_FOR_EJECT", 52: "UNSIGNED_DRIVER", 57: "GUEST_ASSIGNMENT_FAILED"}
    for code, name in documented.items():
        assert pnp_state.problem_name(code) == "CM_PROB_" + name
    assert pnp_state.problem_name(0) is None and pnp_state.problem_name(200) == "CM_PROB_UNKNOWN_200"
    assert sorted(pnp_state.CM_PROB) == list(range(1, 0x3A))


def test_pnp_query_script_uses_exact_matching() -> None:
    s = pnp_state.query_script(["PCI\\VEN_8086&DEV_293E\\[odd]*"]).script
    assert "$want -contains $_.InstanceId" in s and "Get-PnpDevice -InstanceId" not in s
    assert "'DEVPKEY_Device_ProblemCode', 'DEVPKEY_Device_ProblemStatus'" in s
    assert "PCI\\VEN_8086&DEV_293E\\[odd]*" in s


# ------------------------------------------------------------------ WPP

def test_wpp_sample() -> None:
    out = wpp.parse_lines((DATA / "wpp_tracefmt.txt").read_text(), received_ns=1)
    got = [(e.kind, e.data["phase"], e.duration_ns) for e in out.events]
    assert got == [(Kind.CALL_ENTER, "begin", None), (Kind.QUERY_STOP, "end", 10_000_000),
                   (Kind.CALL_ENTER, "begin", None), (Kind.STOP, "end", 500_000_000),
                   (Kind.CANCEL_STOP, "point", None), (Kind.CANCEL_STOP, "point", 3_500)]
    assert out.events[1].data["status"] == "0x0" and out.events[1].data["duration_source"] == "message"
    assert out.events[3].data["duration_source"] == "paired" and out.events[3].data["status"] == "STATUS_SUCCESS"
    assert "bad-timestamp" in out.events[4].data["flags"]
    assert out.events[0].data["for_kind"] == "query-stop"
    assert all(e.data["layer"] == "portcls" and "callback" in e.data for e in out.events)
    assert any("unrecognised format" in p for p in out.problems)
    assert all(e.source is Source.GUEST_WPP for e in out.events)


def test_wpp_custom_patterns_and_unmatched() -> None:
    pat = wpp.WppPattern.from_json({"regex": r"StreamPause: stream (?P<n>\d+)", "kind": "stop", "name": "pause"})
    out = wpp.parse_lines((DATA / "wpp_tracefmt.txt").read_text(), received_ns=1, patterns=[pat],
                          keep_unmatched=True)
    assert [e.kind for e in out.events].count(Kind.STOP) == 1
    assert any("unmatched" in e.data.get("flags", []) for e in out.events)
    with pytest.raises(ConfigError):
        wpp.WppPattern.from_json({"regex": "(", "kind": "stop"})


def test_tracefmt_commands() -> None:
    fmt = wpp.WppFormatting(tracefmt="C:\\tools\\tracefmt.exe", pdb="C:\\drv\\mydrv.pdb",
                            tracepdb="C:\\tools\\tracepdb.exe")
    scripts = wpp.format_scripts(fmt, "C:\\t\\wpp.etl", "C:\\t\\wpp.txt", "C:\\t\\tmf")
    assert "& $p.Tracepdb -f $p.Pdb -p $p.TmfDir" in scripts[0].script
    assert "& $p.Tracefmt $p.Etl -p $p.TmfDir -o $p.Out -nosummary" in scripts[1].script
    assert "$env:TRACE_FORMAT_PREFIX = $p.Prefix" in scripts[1].script
    fmt2 = wpp.WppFormatting(tracefmt="C:\\tools\\tracefmt.exe", tmf_file="C:\\drv\\x.tmf")
    assert "-tmf $p.Tmf" in wpp.format_scripts(fmt2, "C:\\t\\w.etl", "C:\\t\\w.txt", "C:\\t\\tmf")[0].script
    with pytest.raises(ConfigError):
        wpp.WppFormatting(tracefmt="C:\\tools\\tracefmt.exe")
    with pytest.raises(ConfigError):
        wpp.WppFormatting(tracefmt="C:\\tools\\tracefmt.exe", pdb="C:\\a.pdb")
