"""``lab.logs.setupapi``: setupapi.dev.log as people share it, cut into sections -> Events.

Corpus samples (tests/unit/data/logs/setupapi, see PROVENANCE.md) are asserted with the
values read from the samples by eye. The paste variants no public sample shows cleanly
(indented, ``> ``-quoted, CRLF/LF swapped, UTF-16LE) are made from the real samples
here, the way the tool that makes them would (a Markdown code block indents by four
spaces, an e-mail or GitHub "quote reply" prefixes ``> ``, PowerShell 5.1 ``>`` writes
UTF-16LE with a BOM).
"""

from __future__ import annotations

import codecs
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.events import Event, Kind, Source
from lab.logs.base import MAX_LINE_CHARS, LogFormatError, LogInput, Tally
from lab.logs.setupapi import (MAX_BODY_LINES, PARSER, PARSERS, instance_in, looks_like_instance_id,
                               package_in, parse, parse_timestamp, problem_in, split_quote)
from lab.guest.windows.trace import setupapi as tracer_setupapi
from tests.unit.log_parsing import parse_checked, write_input

DATA = Path(__file__).parent / "data" / "logs" / "setupapi"
HANDMADE = Path(__file__).parent / "data" / "windows" / "setupapi.dev.log"


def ns(text: str) -> int:
    """Local time read as UTC (the log has no zone; ``inspect`` keeps it as written)."""
    d = datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    return int(d.timestamp()) * 1_000_000_000 + d.microsecond * 1000


def well_formed(ev: Event, display: str | None = None) -> None:
    assert ev.source is Source.GUEST_SETUPAPI
    assert ev.kind in (Kind.SETUPAPI_SECTION, Kind.PROBLEM)
    assert isinstance(ev.t_host_ns, int) and ev.t_guest_ns == ev.t_host_ns
    at = ev.data["at"]
    assert isinstance(at, str) and at.rpartition(":")[2].isdigit()
    if display is not None:
        assert at.startswith(display + ":")
    if ev.device is not None:
        assert ev.device.instance is not None and looks_like_instance_id(ev.device.instance)
    if ev.kind is Kind.PROBLEM:
        assert isinstance(ev.data["code"], int) and ev.data["code"] != 0
    else:
        assert isinstance(ev.data["title"], str)
        assert ev.duration_ns is None or ev.duration_ns >= 0
    assert isinstance(ev.data.get("flags", []), list)
    ev.dumps()                                   # JSON-serialisable


def run(path: Path) -> tuple[list[Event], Tally]:
    events, tally = parse_checked(PARSER, path, well_formed, "?")
    assert tally.clock == "local" and tally.format == "setupapi"
    return events, tally


def run_text(tmp: Path, text: str, name: str = "in.log", encoding: str = "utf-8",
             bom: bytes = b"") -> tuple[list[Event], Tally]:
    return run(write_input(tmp, text, name, encoding, bom))


def sections(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind is Kind.SETUPAPI_SECTION]


def problems(events: list[Event]) -> list[Event]:
    return [e for e in events if e.kind is Kind.PROBLEM]


def sample(name: str) -> str:
    return (DATA / name).read_bytes().decode("utf-8")


# ------------------------------------------------------------------ the corpus

def test_plaso_hardware_initiated_install() -> None:
    """plaso test data: file header, boot sessions, a successful hardware-initiated
    install of SWD\\IP_TUNNEL_VBUS\\ISATAP_0 and a Sysprep section (CRLF, as written)."""
    assert b"\r\n" in (DATA / "plaso_hardware_initiated.dev.log").read_bytes()
    events, tally = run(DATA / "plaso_hardware_initiated.dev.log")
    assert not problems(events)
    isatap, sysprep = sections(events)
    d = isatap.data
    assert d["title"] == "Device Install (Hardware initiated)"
    assert isatap.device is not None and isatap.device.instance == "SWD\\IP_TUNNEL_VBUS\\ISATAP_0"
    assert isatap.t_host_ns == ns("2015-11-22T17:59:28.110")
    assert d["end"] == "2015/11/22 17:59:37.142"
    assert isatap.duration_ns == 9_032_000_000
    assert d["exit_status"] == "SUCCESS" and d["succeeded"] is True
    assert d["inf"] == "nettun.inf"
    assert d["driver_package"] == ("C:\\Windows\\System32\\DriverStore\\FileRepository\\"
                                   "nettun.inf_amd64_73be4b5cbfb3a9a0\\nettun.inf")
    assert d["boot_session"] == "2015/11/22 17:58:03.498"
    assert d["at"].endswith(":12") and d["end_line"] == 85
    assert d["errors"] == [] and d["warnings"] == [] and d["flags"] == []
    assert sysprep.data["title"] == "Sysprep Respecialize"
    assert sysprep.data["id"] == "{804b345a-ffd7-854c-a1b5-ca9598907846}"
    assert sysprep.device is None and "hardware_id" not in sysprep.data
    assert sysprep.data["boot_session"] == "2016/10/05 11:12:57.496"
    assert sysprep.duration_ns == 500_000_000
    # 8 header lines and 7 blank lines skipped; the rest is sections and 2 boot banners
    assert (tally.lines, tally.skipped, tally.not_understood) == (95, 15, 0)


def test_plaso_update_driver_takes_the_instance_from_the_body() -> None:
    """The header carries the hardware id VBoxDrvInst.exe passed; the device instance is
    in ``dvi: {Update Device Driver - PCI\\VEN_80EE&DEV_CAFE&...\\3&267A616A&1&20}``."""
    events, tally = run(DATA / "plaso_update_driver.dev.log")
    upd, copy = sections(events)
    d = upd.data
    assert d["title"] == "Device Install (UpdateDriverForPlugAndPlayDevices)"
    assert d["hardware_id"] == "PCI\\VEN_80EE&DEV_CAFE&SUBSYS_00000000&REV_00"
    assert upd.device is not None
    assert upd.device.instance == "PCI\\VEN_80EE&DEV_CAFE&SUBSYS_00000000&REV_00\\3&267A616A&1&20"
    assert d["inf"] == "oem2.inf"
    assert d["driver_package"] == ("C:\\Windows\\System32\\DriverStore\\FileRepository\\"
                                   "vboxguest.inf_amd64_015c006906a48641\\vboxguest.inf")
    assert upd.t_host_ns == ns("2016-10-05T11:38:03.976")
    assert upd.duration_ns == 3_203_000_000 and d["exit_status"] == "SUCCESS"
    assert copy.data["title"] == "SetupCopyOEMInf" and copy.device is None
    assert copy.data["inf"] == "oem2.inf"           # "Published Inf Path: C:\Windows\INF\oem2.inf"
    assert "hardware_id" not in copy.data           # an INF path is not a hardware id
    assert tally.not_understood == 0


def test_mslearn_update_driver_failure() -> None:
    """Microsoft Learn's upgrade-log example: UpdateDriverForPlugAndPlayDevices for the
    hardware id PCI\\VEN_8086&DEV_8C4F, no better driver, FAILURE(0xC1900101)."""
    events, tally = run(DATA / "mslearn_upgrade_update_driver.dev.log")
    (sec,) = sections(events)
    d = sec.data
    assert d["hardware_id"] == "PCI\\VEN_8086&DEV_8C4F"
    assert sec.device is not None
    assert sec.device.instance == "PCI\\VEN_8086&DEV_8C4F&SUBSYS_05BE1028&REV_04\\3&11583659&0&F8"
    assert d["exit_status"] == "FAILURE(0xC1900101)" and d["exit_code"] == 0xC1900101
    assert d["succeeded"] is False
    assert d["warnings"] == [
        "ndv: No better matching drivers found for device "
        "'PCI\\VEN_8086&DEV_8C4F&SUBSYS_05BE1028&REV_04\\3&11583659&0&F8'.",
        "ndv: No devices were updated."]
    assert d["inf"] == "oem1.inf"                   # "Currently Installed Driver: Inf Name - oem1.inf"
    assert sec.t_host_ns == ns("2019-09-26T20:13:01.623") and sec.duration_ns == 136_000_000
    assert not problems(events)
    assert tally.used == tally.lines == 83


def test_mslearn_documented_section_format() -> None:
    """The section-body page's example, in the documented (older) header/footer form."""
    events, tally = run(DATA / "mslearn_section_body.dev.log")
    (sec,) = sections(events)
    d = sec.data
    assert d["title"] == "Device Install"
    assert sec.device is not None
    assert sec.device.instance == "PCI\\VEN_104C&DEV_8019&SUBSYS_8010104C&REV_00\\3&61aaa01&0&38"
    assert sec.t_host_ns == ns("2005-02-13T22:06:28.109")
    assert d["end"] == "2005/02/13 22:06:29.000" and sec.duration_ns == 891_000_000
    assert d["exit_status"] == "0x00000000" and d["succeeded"] is True
    assert d["errors"] == ["inf:      InfCache: Error flagging 1394.inf for match string "
                           "pci\\ven_104c&dev_8019"]
    assert d["body_lines"] == 22 and tally.used == 26


def test_markdown_mangled_paste() -> None:
    """Windows-driver-samples#26: Markdown turned ``>>>`` into ``> > >`` on every line;
    a failed DiInstallDevice of ROOT\\MEDIA\\0000 whose published INF name is on a
    continuation line, then a section cut off by the end of the paste."""
    events, tally = run(DATA / "wds26_markdown_mangled.dev.log")
    first, second = sections(events)
    d = first.data
    assert d["title"] == "Device Install (DiInstallDevice)"
    assert first.device is not None and first.device.instance == "ROOT\\MEDIA\\0000"
    assert first.t_host_ns == ns("2015-10-15T14:06:53.006") and first.duration_ns == 21_000_000
    assert d["exit_status"] == "FAILURE(0xe0000203)" and d["exit_code"] == 0xE0000203
    assert d["inf"] == "oem20.inf"
    assert d["driver_package"] == ("C:\\Windows\\System32\\DriverStore\\FileRepository\\"
                                   "tabletaudiosample.inf_x86_fe8ba9a060f09a3c\\tabletaudiosample.inf")
    assert d["boot_session"] == "2015/10/15 13:49:43.345"
    assert second.t_host_ns == ns("2015-10-15T14:06:53.030")
    assert second.data["flags"] == ["incomplete"] and second.data["exit_status"] is None
    assert tally.samples == [(1, "These are the logs from setupapi.dev.log")]
    assert any(p.startswith("line 26: section not closed") for p in tally.problems)


def test_markdown_mangled_update_driver() -> None:
    """Windows-driver-samples#46: ``> > >`` again, a devcon UpdateDriverForPlugAndPlayDevices
    titled with the hardware id, the instance from ``{Update Device Driver - ROOT\\MEDIA\\0000}``."""
    events, _ = run(DATA / "wds46_update_driver_truncated.dev.log")
    (sec,) = sections(events)
    assert sec.data["hardware_id"] == "Root\\sysvad_TabletAudioSample"
    assert sec.device is not None and sec.device.instance == "ROOT\\MEDIA\\0000"
    assert sec.t_host_ns == ns("2016-02-03T10:41:27.927")
    assert sec.data["flags"] == ["incomplete"]


def test_failure_with_problem_code_gives_a_problem_event() -> None:
    """nmap#1746: the loopback adapter is left with problem 0x38 (CM_PROB_NEED_CLASS_CONFIG)
    and the install times out; the paste ends inside the section."""
    events, tally = run(DATA / "nmap1746_problem_code_truncated.dev.log")
    (sec,) = sections(events)
    (prob,) = problems(events)
    assert sec.device is not None and sec.device.instance == "ROOT\\NET\\0001"
    assert sec.data["title"] == "Device Install (DiShowUpdateDevice)"
    assert sec.data["code"] == 0x38 and sec.data["problem"] == "CM_PROB_NEED_CLASS_CONFIG"
    assert sec.data["errors"] == [
        "dvi:           Timed out waiting for device post-install to complete. 11:42:14.705",
        "ndv:      Device install failed for device.",
        "ndv:      Error 1460: This operation returned because the timeout period expired."]
    assert sec.data["flags"] == ["incomplete"]
    assert prob.device == sec.device
    assert prob.data["code"] == 56 and prob.data["problem"] == "CM_PROB_NEED_CLASS_CONFIG"
    assert prob.data["problem_status"] == "0x00000000"
    # "Device Status: 0x01802401, Problem: 0x38" (line 35) has no time of its own: it
    # takes that of "{Configure Device - exit(0x00000000)} 11:38:29.692" before it
    assert prob.data["at"].endswith(":35") and prob.data["flags"] == ["untimed"]
    assert prob.t_host_ns == ns("2019-09-18T11:38:29.692")
    assert tally.samples[0][0] == 1 and tally.skipped == 1         # prose, and the ``` fence


def test_header_marker_lost() -> None:
    """nmap/npcap#787: the paste lost the first ``>>>``; ``[Deinstall network driver]``
    followed by ``Section start`` is still a section header."""
    events, tally = run(DATA / "npcap787_lost_marker_truncated.dev.log")
    a, b, c = sections(events)
    assert a.data["title"] == b.data["title"] == "Deinstall network driver"
    assert a.data["at"].endswith(":3") and a.t_host_ns == ns("2025-04-18T13:55:51.630")
    assert a.data["exit_status"] == "FAILURE(0x8007007e)" and a.data["exit_code"] == 0x8007007E
    assert b.t_host_ns == ns("2025-04-18T13:55:51.640") and b.duration_ns == 10_000_000
    assert c.data["title"] == "SetupCopyOEMInf" and c.data["id"] == "C:\\Program Files\\Npcap\\NPCAP.inf"
    assert c.data["flags"] == ["incomplete"]
    assert tally.samples == [(1, "<setupapi.dev.log>")]


def test_handmade_sample_problem_event() -> None:
    """The hand-made sample's failed start (code 10) becomes a PROBLEM event the Windows
    PnP rules read (``code``), at the device of the section."""
    events, tally = run(HANDMADE)
    (prob,) = problems(events)
    assert prob.device is not None
    assert prob.device.instance == "PCI\\VEN_1B36&DEV_000C&SUBSYS_11001AF4&REV_00\\3&2411e6fe&0&18"
    assert prob.data["code"] == 10 and prob.data["problem"] == "CM_PROB_FAILED_START"
    assert prob.data["problem_status"] == "0xc00000e5"
    assert prob.t_host_ns == ns("2024-01-15T10:00:02.100")
    assert len(sections(events)) == 7 and tally.not_understood == 0


def test_problem_events_feed_the_pnp_rules() -> None:
    from lab.rules.windows_pnp import problem_code
    events, _ = run(DATA / "nmap1746_problem_code_truncated.dev.log")
    (prob,) = problems(events)
    assert problem_code(prob) == 56


# ------------------------------------------------------------------ findings (each failed before)

def test_indented_paste_is_read() -> None:
    """A Markdown code block indents by four spaces: the old parser found no section."""
    text = textwrap.indent(sample("mslearn_upgrade_update_driver.dev.log"), "    ")
    log = tracer_setupapi.parse(text)
    assert len(log.sections) == 1 and log.sections[0].exit_status == "FAILURE(0xC1900101)"


def test_markdown_nested_quotes_are_read() -> None:
    log = tracer_setupapi.parse(sample("wds26_markdown_mangled.dev.log"))
    assert [s.instance for s in log.sections] == ["ROOT\\MEDIA\\0000", "ROOT\\MEDIA\\0000"]
    assert log.sections[0].exit_status == "FAILURE(0xe0000203)"


def test_quote_reply_is_read(tmp_path: Path) -> None:
    """GitHub's "Quote reply" prefixes ``> ``: ``> >>>  [Device Install ...]``."""
    quoted = "".join("> " + ln for ln in sample("plaso_update_driver.dev.log").splitlines(True))
    log = tracer_setupapi.parse(quoted)
    assert [s.title for s in log.sections] == ["Device Install (UpdateDriverForPlugAndPlayDevices)",
                                               "SetupCopyOEMInf"]
    events, tally = run_text(tmp_path, quoted)
    assert len(sections(events)) == 2 and tally.not_understood == 0


def test_update_driver_section_keeps_the_hardware_id_apart() -> None:
    log = tracer_setupapi.parse(sample("mslearn_upgrade_update_driver.dev.log"))
    (sec,) = log.sections
    assert sec.instance == "PCI\\VEN_8086&DEV_8C4F&SUBSYS_05BE1028&REV_04\\3&11583659&0&F8"
    assert sec.hardware_id == "PCI\\VEN_8086&DEV_8C4F" and sec.ident == "PCI\\VEN_8086&DEV_8C4F"
    out = tracer_setupapi.to_events(log, received_ns=5)
    assert out.events[0].device is not None
    assert out.events[0].device.instance == sec.instance


@pytest.mark.parametrize("line", [
    ">>>  Section start a" + " " * 200_000 + "x",      # old patterns: 3 s at 32k characters
    "<<<  Section end a" + " " * 200_000 + "x",        # likewise
    ">>>  a" + " " * 200_000 + "x",
    ">>>  Section start " + "9" * 200_000,
    "<<<  [" + "x" * 200_000 + ": Section end]",
    ">>>  [" + "a - " * 50_000 + "]",
    "> " * 100_000 + "x",
    "<<<  [Exit status: " + "(" * 200_000 + "]",
    ">>>  " + "1" * 200_000 + ": Section start",
    "     dvi: Device has problem: 0x" + "f" * 200_000,
    "     dvi: Device Status: 0x" + "1" * 100_000 + ", Problem: 0x" + "2" * 100_000,
    "     ndv: Driver package '" + "'" * 200_000 + " exists under",
])
def test_long_lines_take_linear_time(line: str) -> None:
    """The old start/end patterns were quadratic (a lazy ``.*?`` followed by ``\\s+`` /
    ``\\s*$``: 3 s for the first lines below cut to 32k characters); every check here is a
    prefix test or a fixed-length match. Measured by hand: each of these 200k-character
    lines parses in under 10 ms (the first three in about 1 ms)."""
    log = parse(">>>  [x - ROOT\\X\\0]\n>>>  Section start 2024/01/01 00:00:00.000\n" + line + "\n")
    assert log.sections
    assert log.sections[0].line == 1


def test_100k_character_line_through_loginput(tmp_path: Path) -> None:
    body = ">>>  [Device Install (Hardware initiated) - ROOT\\X\\0000]\n" \
           ">>>  Section start 2024/01/01 00:00:00.000\n" \
           "     dvi: " + "x" * 100_000 + "\n" \
           ">>>  Section start " + "9" * 200_000 + "\n"
    events, tally = run_text(tmp_path, body)
    assert tally.cut_lines == 2 and tally.lines == 4
    first, second = sections(events)
    assert first.data["flags"] == ["truncated"] and first.data["body_lines"] == 1
    assert len(first.data["errors"]) == 0
    assert second.data["title"] == "(untitled)" and "bad-timestamp" in second.data["flags"]


@pytest.mark.parametrize("header,instance", [
    ("Device Install (Hardware initiated) - PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&2411e6fe&0&10",
     "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&2411e6fe&0&10"),
    ("Device Install (DiInstallDevice) - ROOT\\MEDIA\\0000", "ROOT\\MEDIA\\0000"),
    ("Device Install (UpdateDriverForPlugAndPlayDevices) - PCI\\VEN_8086&DEV_293E", None),
    ("Delete Device - SWD\\MMDEVAPI\\{0.0.0.00000000}.{8a3e3ad4-0b9b-4d2e-9d8f-7e3a1c2b5a6f}",
     "SWD\\MMDEVAPI\\{0.0.0.00000000}.{8a3e3ad4-0b9b-4d2e-9d8f-7e3a1c2b5a6f}"),
    ("Setup Plug and Play Device Install", None),
    ("SetupCopyOEMInf - C:\\Windows\\System32\\DriverStore\\FileRepository\\x.inf_amd64_1\\x.inf", None),
    ("Import Driver Package - C:\\drv\\x.inf", None),
    ("Setup Import Driver Package - C:\\drv\\x.inf", None),
    ("Install Device - ROOT\\NET\\0001", "ROOT\\NET\\0001"),
    ("Device Install (Hardware initiated) - SWD\\DRIVERENUM\\CUI&4&BEA98B6&0", "SWD\\DRIVERENUM\\CUI&4&BEA98B6&0"),
    ("Device Removal - USB\\VID_0951&PID_1666\\001", "USB\\VID_0951&PID_1666\\001"),
    ("Restart Device - HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0022\\4&1b0f4c8d&0&0001",
     "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0022\\4&1b0f4c8d&0&0001"),
    ("Sysprep Respecialize - {804b345a-ffd7-854c-a1b5-ca9598907846}", None),
    ("Unstage Driver Updates", None),
])
def test_every_header_kind_is_a_section(tmp_path: Path, header: str, instance: str | None) -> None:
    """Section titles seen in real logs (plaso, the issues in PROVENANCE.md) and the ones
    the task names: each is a section, none is dropped or counted as not understood."""
    text = ("[Device Install Log]\n     OS Version = 10.0.19045\n     Service Pack = 0.0\n"
            "     Suite = 0x0100\n     ProductType = 1\n     Architecture = amd64\n\n[BeginLog]\n\n"
            "[Boot Session: 2024/01/15 09:58:30.500]\n\n"
            f">>>  [{header}]\n>>>  Section start 2024/01/15 10:00:00.000\n"
            "     dvi: Something happened.\n"
            "<<<  Section end 2024/01/15 10:00:01.000\n<<<  [Exit status: SUCCESS]\n")
    events, tally = run_text(tmp_path, text)
    (sec,) = sections(events)
    assert sec.data["title"] == header.partition(" - ")[0]
    assert (sec.device.instance if sec.device else None) == instance
    assert sec.data["boot_session"] == "2024/01/15 09:58:30.500"
    assert tally.not_understood == 0 and tally.skipped == 10 and tally.used == 6


def test_file_header_and_banners_only() -> None:
    text = "[Device Install Log]\n     OS Version = 10.0.22621\n[BeginLog]\n\n[Boot Session: 2024/01/15 09:58:30.500]\n"
    log = parse(text)
    assert log.sections == [] and log.boot_sessions == ["2024/01/15 09:58:30.500"]


# ------------------------------------------------------------------ per-section fields

@pytest.mark.parametrize("line,code,name,status", [
    # graphics-driver-samples#66
    ("Device not started: Device has problem: 0x1f (CM_PROB_FAILED_ADD), problem status: 0xc00000bb.",
     0x1F, "CM_PROB_FAILED_ADD", "0xc00000bb"),
    # MS Learn "Troubleshooting Driver Signing Installation" (older builds)
    ("Device not started: Device has problem: 0x34: CM_PROB_UNSIGNED_DRIVER.", 0x34,
     "CM_PROB_UNSIGNED_DRIVER", None),
    # ovpn-dco-win#60, nmap#1746
    ("Device pending start: Device has problem: 0x38 (CM_PROB_NEED_CLASS_CONFIG), problem status: 0x00000000.",
     0x38, "CM_PROB_NEED_CLASS_CONFIG", "0x00000000"),
    # libwdi#171, nmap#1746, libwdi#310
    ("Device Status: 0x01802401, Problem: 0x1c (0x00000000)", 0x1C, None, "0x00000000"),
    ("Device Status: 0x01802401, Problem: 0x38", 0x38, None, None),
    ("Device Status: 0x01806400 [0x01 - 0xc0000493]", 0x01, None, "0xc0000493"),
    ("Device Status: 0x0180200b", 0, None, None),
])
def test_problem_forms(line: str, code: int, name: str | None, status: str | None) -> None:
    rep = problem_in(line)
    assert rep is not None and (rep.code, rep.name, rep.status) == (code, name, status)


def test_problem_entry_naming_its_device() -> None:
    rep = problem_in("Device 'ROOT\\DISPLAY\\0000' not started: Device has problem: 0x1f "
                     "(CM_PROB_FAILED_ADD), problem status: 0xc0000001")  # roshkins/IddSampleDriver#11
    assert rep is not None and rep.device == "ROOT\\DISPLAY\\0000" and rep.code == 0x1F
    flagged_only = problem_in("Device Status: 0x01802400")      # DN_HAS_PROBLEM, no code
    assert flagged_only is not None and flagged_only.code is None
    assert problem_in("No problem here") is None


@pytest.mark.parametrize("msg,inst", [
    ("{Update Device Driver - PCI\\VEN_80EE&DEV_CAFE&SUBSYS_00000000&REV_00\\3&267A616A&1&20}",
     "PCI\\VEN_80EE&DEV_CAFE&SUBSYS_00000000&REV_00\\3&267A616A&1&20"),
    ("{Installing device - SWD\\IP_TUNNEL_VBUS\\ISATAP_0} 17:59:30.922", "SWD\\IP_TUNNEL_VBUS\\ISATAP_0"),
    ("{Update Driver Software Wizard - ROOT\\NET\\0001}", "ROOT\\NET\\0001"),
    ("{Install Device - ROOT\\NET\\0001} 14:13:59.316", "ROOT\\NET\\0001"),
    ("Install Device: Starting device 'ROOT\\MEDIA\\0000'. 16:40:38.718", "ROOT\\MEDIA\\0000"),
    ("Failed to install device instance 'ROOT\\HIDCLASS\\0000'. Error = 0x0000ffff", "ROOT\\HIDCLASS\\0000"),
    ("Restart: PCI\\VEN_80EE&DEV_CAFE&SUBSYS_00000000&REV_00\\3&267A616A&1&20",
     "PCI\\VEN_80EE&DEV_CAFE&SUBSYS_00000000&REV_00\\3&267A616A&1&20"),
    ("Device Instance Id = ROOT\\sysvad_TabletAudioSample\\0000", "ROOT\\sysvad_TabletAudioSample\\0000"),
    ("{Update Device Driver - exit(00000000)}", None),
    ("{Build Driver List} 17:59:28.176", None),
    ("{Install Device - Zscaler Network Adapter}", None),
    ("HardwareID   - PCI\\VEN_80ee&DEV_cafe", None),
])
def test_instance_forms(msg: str, inst: str | None) -> None:
    assert instance_in(msg) == inst


def test_package_forms() -> None:
    ref = package_in("Driver package 'C:\\Windows\\INF\\oem2.inf' exists under 'C:\\Windows\\System32\\"
                     "DriverStore\\FileRepository\\vboxguest.inf_amd64_015c006906a48641\\vboxguest.inf' (oem2.inf).")
    assert ref.inf == "oem2.inf" and ref.store and ref.package is not None
    assert package_in("Inf Name       - oem1.inf").inf == "oem1.inf"
    assert package_in("Published Inf Path: C:\\Windows\\INF\\oem3.inf").inf == "oem3.inf"
    assert package_in("Configuration: oem1.inf:root\\sysvad_tabletaudiosample,SYSVAD_SA").inf == "oem1.inf"
    assert package_in("Driver package 'c:\\x\\a.inf' exists under").continues
    assert package_in("{Configure Driver Package: exit(0x00000000)}").package is None


def test_multi_device_update_section(tmp_path: Path) -> None:
    """One UpdateDriverForPlugAndPlayDevices call updates every matching device
    (ovpn-dco-win#60: ROOT\\NET\\0002, then ROOT\\NET\\0003): each device's last report
    counts, and only a device left with a problem gets a PROBLEM event."""
    text = (">>>  [Device Install (UpdateDriverForPlugAndPlayDevices) - ovpn-dco]\n"
            ">>>  Section start 2023/05/02 16:47:53.000\n"
            "     ndv: {Update Device Driver - ROOT\\NET\\0002}\n"
            "!    dvi:                     Device pending start: Device has problem: 0x38 (CM_PROB_NEED_CLASS_CONFIG), problem status: 0x00000000.\n"
            "     dvi:           Device Status: 0x0180200b\n"
            "     ndv: {Update Device Driver - exit(00000000)}\n"
            "     ndv: {Update Device Driver - ROOT\\NET\\0003}\n"
            "     dvi:                     Install Device: Starting device completed. 16:47:54.178\n"
            "!!!  dvi:                     Device not started: Device has problem: 0x0a (CM_PROB_FAILED_START), problem status: 0xc0000001.\n"
            "<<<  Section end 2023/05/02 16:47:54.400\n<<<  [Exit status: FAILURE(0xe0000219)]\n")
    events, _ = run_text(tmp_path, text)
    (sec,) = sections(events)
    (prob,) = problems(events)
    assert sec.data["hardware_id"] == "ovpn-dco"
    assert sec.data["instances"] == ["ROOT\\NET\\0002", "ROOT\\NET\\0003"]
    assert sec.device is not None and sec.device.instance == "ROOT\\NET\\0002"
    assert "code" not in sec.data                     # its own device ended without a problem
    assert prob.device is not None and prob.device.instance == "ROOT\\NET\\0003"
    assert prob.data["code"] == 10 and prob.t_host_ns == ns("2023-05-02T16:47:54.178")


def test_body_time_of_day_past_midnight(tmp_path: Path) -> None:
    text = (">>>  [Device Install (Hardware initiated) - ROOT\\X\\0000]\n"
            ">>>  Section start 2024/01/15 23:59:59.500\n"
            "     dvi: Install Device: Starting device 'ROOT\\X\\0000'. 00:00:01.000\n"
            "!!!  dvi: Device not started: Device has problem: 0x0a (CM_PROB_FAILED_START), problem status: 0xc0000001.\n"
            "<<<  Section end 2024/01/16 00:00:02.000\n<<<  [Exit status: FAILURE(0xe0000219)]\n")
    events, _ = run_text(tmp_path, text)
    (prob,) = problems(events)
    assert prob.t_host_ns == ns("2024-01-16T00:00:01")
    assert sections(events)[0].duration_ns == 2_500_000_000


def test_body_is_bounded(tmp_path: Path) -> None:
    lines = [">>>  [Device Install (Hardware initiated) - ROOT\\X\\0000]",
             ">>>  Section start 2024/01/15 10:00:00.000"]
    lines += [f"!!!  dvi: error {i}" for i in range(5000)]
    lines += ["<<<  Section end 2024/01/15 10:00:01.000", "<<<  [Exit status: SUCCESS]"]
    log = parse("\n".join(lines))
    (sec,) = log.sections
    assert len(sec.body) == MAX_BODY_LINES and sec.body_count == 5000
    assert sec.errors_count == 5000 and len(sec.errors) < 100
    assert sec.to_json()["errors_count"] == 5000


def test_exit_status_forms() -> None:
    text = "".join(
        f">>>  [T{i}]\n>>>  Section start 2024/01/15 10:00:0{i}.000\n"
        f"<<<  Section end 2024/01/15 10:00:0{i}.500\n<<<  [{footer}]\n"
        for i, footer in enumerate(["Exit status: SUCCESS", "Exit status: FAILURE(0xe0000219)",
                                    "Exit Status(0x00000000)", "Exit",
                                    "Exit status: SUCCESS (REBOOT_REQUIRED)"]))
    log = parse(text)
    assert [(s.exit_status, s.succeeded, s.exit_code) for s in log.sections] == [
        ("SUCCESS", True, None), ("FAILURE(0xe0000219)", False, 0xE0000219),
        ("0x00000000", True, 0), ("EXIT", False, None), ("SUCCESS (REBOOT_REQUIRED)", True, None)]


def test_end_before_start_has_no_duration(tmp_path: Path) -> None:
    text = (">>>  [T - ROOT\\X\\0]\n>>>  Section start 2023/09/26 20:13:01.623\n"
            "<<<  Section end 2019/09/26 20:13:01.759\n<<<  [Exit status: SUCCESS]\n")
    events, _ = run_text(tmp_path, text)
    (sec,) = sections(events)
    assert sec.duration_ns is None and "end-before-start" in sec.data["flags"]


def test_boot_banner_cuts_an_open_section(tmp_path: Path) -> None:
    """A section left open when the machine restarted: the next boot's banner ends it."""
    text = (">>>  [Device Install (Hardware initiated) - PCI\\VEN_1AF4&DEV_1041\\3&1&0&18]\n"
            ">>>  Section start 2024/01/15 10:00:00.000\n     dvi: {Build Driver List} 10:00:00.100\n"
            "[Boot Session: 2024/01/15 10:05:00.000]\n")
    events, tally = run_text(tmp_path, text)
    (sec,) = sections(events)
    assert sec.data["flags"] == ["cut-by-boot", "truncated"]
    assert any("boot session" in p for p in tally.problems)


def test_tail_starting_inside_a_section(tmp_path: Path) -> None:
    """A tail fetched mid-section: its body lines are not understood, its footers are
    problems (by line number, never quoting the text)."""
    text = ("     dvi: still writing\n<<<  Section end 2024/01/15 10:00:01.000\n"
            "<<<  [Exit status: SUCCESS]\n")
    events, tally = run_text(tmp_path, text)
    assert events == []
    assert (tally.not_understood, tally.skipped) == (1, 2)
    assert tally.problems == [
        "line 2: section end without a section start (the input began inside a section)",
        "line 3: exit status without a section start (the input began inside a section)"]


def test_new_log_header_cuts_an_open_section() -> None:
    """Two logs concatenated (``type a.log b.log``): the second header ends the first
    log's open section."""
    text = sample("wds46_update_driver_truncated.dev.log") + sample("plaso_hardware_initiated.dev.log")
    log = parse(text)
    assert [s.flags for s in log.sections][:1] == [{"truncated"}]
    assert [s.title for s in log.sections][1:] == ["Device Install (Hardware initiated)",
                                                  "Sysprep Respecialize"]


def test_tracer_events_optionally_carry_problems() -> None:
    """The live tracer keeps one event per section unless asked for PROBLEM events too."""
    log = tracer_setupapi.parse(HANDMADE.read_text(), at_eof_open=False)
    plain = tracer_setupapi.to_events(log, received_ns=9)
    assert [e.kind for e in plain.events] == [Kind.SETUPAPI_SECTION] * 7
    full = tracer_setupapi.to_events(log, received_ns=9, with_problems=True)
    (prob,) = [e for e in full.events if e.kind is Kind.PROBLEM]
    assert prob.t_host_ns == 9 and prob.t_guest_ns == ns("2024-01-15T10:00:02.100")
    assert prob.data["code"] == 10 and full.problems == plain.problems
    assert log.sections[-1].flags == {"truncated"}


def test_problem_messages_never_quote_the_log(tmp_path: Path) -> None:
    secret = "hunter2-SECRET"
    text = (f">>>  [{secret} - ROOT\\X\\0]\n>>>  Section start {secret}\n"
            f"<<<  Section end {secret}\n[Boot Session: {secret}]\n<<<  [Exit status: {secret}]\n")
    _, tally = run_text(tmp_path, text)
    assert tally.problems and not any(secret in p for p in tally.problems)


def test_utc_offset_for_the_live_tracer() -> None:
    log = parse(sample("mslearn_section_body.dev.log"), utc_offset=timedelta(hours=-8))
    assert log.sections[0].start_ns == ns("2005-02-14T06:06:28.109")
    with pytest.raises(ValueError):
        parse_timestamp("2024/13/45 99:00:00.000")


# ------------------------------------------------------------------ encodings and edges

def test_crlf_and_lf_give_the_same_events(tmp_path: Path) -> None:
    crlf = sample("plaso_hardware_initiated.dev.log")
    lf = crlf.replace("\r\n", "\n")
    a, _ = run_text(tmp_path, crlf, "a.log")
    b, _ = run_text(tmp_path, lf, "b.log")
    strip = [(e.kind, e.t_host_ns, e.device, {k: v for k, v in e.data.items() if k != "at"}) for e in a]
    assert strip == [(e.kind, e.t_host_ns, e.device, {k: v for k, v in e.data.items() if k != "at"})
                     for e in b]


def test_utf16le_with_bom(tmp_path: Path) -> None:
    """What ``Get-Content setupapi.dev.log > copy.log`` writes in Windows PowerShell 5.1."""
    text = sample("wds26_markdown_mangled.dev.log").replace("\n", "\r\n")
    events, tally = run_text(tmp_path, text, encoding="utf-16-le", bom=codecs.BOM_UTF16_LE)
    assert tally.encoding == "utf-16-le-bom"
    assert [e.data["title"] for e in sections(events)] == ["Device Install (DiInstallDevice)"] * 2
    assert PARSER.sniff(LogInput(tmp_path / "in.log")) == 100


def test_cp1252_bytes_are_read(tmp_path: Path) -> None:
    raw = (">>>  [Device Install (Hardware initiated) - ROOT\\X\\0000]\r\n"
           ">>>  Section start 2024/01/15 10:00:00.000\r\n").encode() + \
        "     dvi:           DevDesc      - Gerät für Audio\r\n".encode("cp1252") + \
        b"<<<  Section end 2024/01/15 10:00:01.000\r\n<<<  [Exit status: SUCCESS]\r\n"
    (tmp_path / "x.log").write_bytes(raw)
    events, tally = run(tmp_path / "x.log")
    assert tally.decode_errors == 1 and len(sections(events)) == 1


def test_empty_file(tmp_path: Path) -> None:
    events, tally = run_text(tmp_path, "")
    assert events == [] and tally.lines == 0
    assert PARSER.sniff(LogInput(tmp_path / "in.log")) == 0


def test_truncated_mid_line(tmp_path: Path) -> None:
    text = sample("mslearn_section_body.dev.log")
    cut = text[:text.index("<<<  [2005") + 12]
    events, tally = run_text(tmp_path, cut)
    (sec,) = sections(events)
    assert sec.data["flags"] == ["incomplete"] and sec.data["end"] is None


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError):
        LogInput(tmp_path)


# ------------------------------------------------------------------ sniffing

@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.log")))
def test_sniff_recognises_every_sample(name: str) -> None:
    assert PARSER.sniff(LogInput(DATA / name)) >= 80


def test_sniff_indented_and_quoted(tmp_path: Path) -> None:
    text = sample("mslearn_upgrade_update_driver.dev.log")
    (tmp_path / "i.log").write_text(textwrap.indent(text, "    "))
    (tmp_path / "q.log").write_text(textwrap.indent(text, "> ", lambda _: True))
    assert PARSER.sniff(LogInput(tmp_path / "i.log")) >= 80
    assert PARSER.sniff(LogInput(tmp_path / "q.log")) >= 80


def test_sniff_headers_alone(tmp_path: Path) -> None:
    (tmp_path / "h.txt").write_text("see below\n>>>  [Device Install (Hardware initiated) - ROOT\\X\\0]\n")
    (tmp_path / "n.md").write_text("> [!NOTE]\n> Some documentation.\n")
    assert PARSER.sniff(LogInput(tmp_path / "h.txt")) == 60
    assert PARSER.sniff(LogInput(tmp_path / "n.md")) == 0


def test_sniff_rejects_other_text(tmp_path: Path) -> None:
    (tmp_path / "o.txt").write_text("Microsoft PnP Utility\n\nInstance ID: ROOT\\X\\0000\n"
                                    "[    0.000000] Linux version 6.8.0\n")
    (tmp_path / "b.bin").write_bytes(b"\x00\x01\x02" * 100)
    assert PARSER.sniff(LogInput(tmp_path / "o.txt")) == 0
    assert PARSER.sniff(LogInput(tmp_path / "b.bin")) == 0


def test_registry_entry() -> None:
    assert PARSERS == (PARSER,) and PARSER.name == "setupapi" and PARSER.description


def test_split_quote() -> None:
    assert split_quote(">>>  [x]") == ("[x]", 3)
    assert split_quote("> >>>  [x]") == ("[x]", 4)
    assert split_quote("> > >  Section start 2015/10/15 14:06:53.006") == \
        ("Section start 2015/10/15 14:06:53.006", 3)
    assert split_quote("     dvi: x") == ("dvi: x", 0)
    assert split_quote("\t> > > ") == ("", 3)


# ------------------------------------------------------------------ properties

_FRAGMENTS = st.sampled_from([
    ">>>  [Device Install (Hardware initiated) - ROOT\\X\\0000]", ">>>  [T]", "> > >  [T - a\\b]",
    ">>>  Section start 2024/01/15 10:00:00.000", "Section start 2024/99/15 10:00:00.000",
    ">>>  2005/02/13 22:06:28.109: Section start", "<<<  Section end 2024/01/15 10:00:01.000",
    "<<<  [2005/02/13 22:06:29.000: Section end]", "<<<  [Exit status: FAILURE(0xe0000219)]",
    "<<<  [Exit]", "<<<", "[Boot Session: 2024/01/15 09:58:30.500]", "[Boot Session: x]",
    "[Device Install Log]", "     OS Version = 10", "[BeginLog]", "", "```", " [Lost marker]",
    "!!!  dvi: Device not started: Device has problem: 0x0a (CM_PROB_FAILED_START), problem status: 0x1.",
    "     dvi: Device Status: 0x01802401, Problem: 0x38", "     dvi: Device Status: 0x01802400",
    "     ndv: {Update Device Driver - ROOT\\NET\\0001}", "     dvi: {x} 23:59:59.999",
    "     ndv: Driver package 'a.inf' exists under ", "'C:\\x\\a.inf' (oem1.inf).",
    "     dvi: Device 'ROOT\\Y\\0' not started: Device has problem: 0x1f",
    "2024/01/15 10:00:00.000 dvi: stamped", "\t> ", "> >>>  [Q - ROOT\\Q\\0]",
    ">>>  Section start 0001/01/01 00:00:00.000", "<<<  Section end 9999/12/31 23:59:59.999",
    "     dvi: {x} 99:99:99.999", "<<<  [Exit status: FAILURE(0x" + "f" * 40 + ")]",
])

_counter = iter(range(10**9))


@pytest.fixture(scope="module")
def prop_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every example (hypothesis runs a test body many times per call)."""
    return tmp_path_factory.mktemp("setupapi-prop")


def _write(folder: Path, data: bytes) -> Path:
    p = folder / f"p{next(_counter)}.log"
    p.write_bytes(data)
    return p


def _parse_any(p: Path) -> None:
    try:
        inp = LogInput(p)
        PARSER.sniff(inp)
        tally = Tally(str(p), "setupapi")
        events = list(PARSER.parse(inp, tally))
    except LogFormatError:
        return
    assert tally.balanced, tally.to_json()
    assert tally.events == len(events)
    for ev in events:
        well_formed(ev, str(p))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_FRAGMENTS, st.text(max_size=30)), max_size=50),
       st.sampled_from(["\n", "\r\n"]))
def test_property_setupapi_like_text(prop_dir: Path, parts: list[str], eol: str) -> None:
    _parse_any(_write(prop_dir, eol.join(parts).encode("utf-8", "surrogatepass")))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=2000))
def test_property_arbitrary_text(prop_dir: Path, text: str) -> None:
    _parse_any(_write(prop_dir, text.encode("utf-8", "surrogatepass")))
    log = parse(text)                            # the tracer's path never raises either
    assert all(s.title for s in log.sections)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_property_arbitrary_bytes(prop_dir: Path, data: bytes) -> None:
    _parse_any(_write(prop_dir, data))


def test_long_line_cap_is_the_base_one() -> None:
    assert MAX_LINE_CHARS >= 336                  # an entry's documented maximum length
