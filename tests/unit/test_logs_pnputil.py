"""``lab.logs.pnputil``: pnputil /enum-devices output as Events.

Corpus samples (tests/unit/data/logs/pnputil, see PROVENANCE.md) are asserted with the
values read from the samples by eye; the edge cases are built from those samples
(CRLF, UTF-16LE, quoting, cuts) or, where no public sample exists, inline and marked so.
"""

from __future__ import annotations

import codecs
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.events import Event, Kind, Source
from lab.logs.base import LogFormatError, LogInput, Tally
from lab.logs.pnputil import (PARSER, PARSERS, normalise_ntstatus, parse_problem_code)
from tests.unit.log_parsing import parse_checked, write_input

DATA = Path(__file__).parent / "data" / "logs" / "pnputil"


def run(path: Path) -> tuple[list[Event], Tally]:
    return parse_checked(PARSER, path, lambda ev, _: well_formed(ev), "pnputil")


def run_text(tmp: Path, text: str, name: str = "in.txt",
             encoding: str = "utf-8") -> tuple[list[Event], Tally]:
    return run(write_input(tmp, text, name, encoding))


def well_formed(ev: Event) -> None:
    assert ev.source is Source.GUEST_PNP
    assert ev.kind in (Kind.PROBLEM, Kind.BOUND, Kind.UNBOUND, Kind.DEVICE_STATE)
    assert ev.t_host_ns == 0 and ev.t_guest_ns == 0
    assert "untimed" in ev.data["flags"]
    assert ev.data["flags"] == sorted(set(ev.data["flags"]))
    assert isinstance(ev.data["at"], str) and ev.data["at"].rsplit(":", 1)[1].isdigit()
    assert isinstance(ev.data["fields"], dict)
    if ev.kind is Kind.PROBLEM:
        assert isinstance(ev.data["code"], int) and ev.data["code"] > 0
    ev.dumps()                      # serialisable


def sample(name: str) -> str:
    return (DATA / name).read_text(encoding="utf-8")


# ---- the corpus ---------------------------------------------------------------------

def test_mslearn_problem_deviceids() -> None:
    events, tally = run(DATA / "mslearn_problem_deviceids.txt")
    assert tally.clock == "none"
    assert tally.not_understood == 0 and tally.problems == []
    assert tally.skipped == 3                    # prompt, banner, blank line
    (ev,) = events
    assert ev.kind is Kind.PROBLEM
    assert ev.device is not None and ev.device.instance == r"USB\VID_0547&PID_1002\5&353525f&0&3"
    assert ev.data["code"] == 52 and ev.data["problem_code"] == 52
    assert ev.data["problem"] == "CM_PROB_UNSIGNED_DRIVER"
    assert ev.data["problem_status"] == "0xC0000428"
    assert ev.data["status"] == "Problem"
    assert ev.data["driver"] == "oem40.inf"
    assert ev.data["class"] == "Sample"
    assert ev.data["command"] == "pnputil /enum-devices /problem /deviceids"
    assert ev.data["at"].endswith("mslearn_problem_deviceids.txt:4")
    f = ev.data["fields"]
    assert f["Manufacturer Name"] == "OSR"
    assert f["Class GUID"] == "{78a1c341-4539-11d3-b88d-00c04fad5171}"
    assert f["Hardware IDs"] == [r"USB\VID_0547&PID_1002&REV_0000", r"USB\VID_0547&PID_1002"]
    assert f["Compatible IDs"] == [
        r"USB\COMPAT_VID_0547&Class_FF&SubClass_00&Prot_00",
        r"USB\COMPAT_VID_0547&Class_FF&SubClass_00",
        r"USB\COMPAT_VID_0547&Class_FF",
        r"USB\Class_FF&SubClass_00&Prot_00",
        r"USB\Class_FF&SubClass_00",
        r"USB\Class_FF",
    ]
    assert ev.data["flags"] == ["untimed"]


def test_mslearn_usbcon_ids_indented_markdown() -> None:
    events, tally = run(DATA / "mslearn_usbcon_ids_indented.txt")
    assert tally.not_understood == 0 and tally.problems == []
    (ev,) = events
    assert ev.kind is Kind.BOUND
    assert ev.device is not None and ev.device.instance == r"USB\VID_045E&PID_0840\0C33CG9212501N0"
    assert ev.data["status"] == "Started"
    assert ev.data["description"] == "USB Composite Device"
    assert ev.data["fields"]["Manufacturer Name"] == "(Standard USB Host Controller)"
    assert ev.data["fields"]["Hardware IDs"] == [r"USB\VID_045E&PID_0840&REV_0215",
                                                 r"USB\VID_045E&PID_0840"]
    compat = ev.data["fields"]["Compatible IDs"]
    assert len(compat) == 7 and compat[0] == r"USB\COMPAT_VID_045E&DevClass_00&SubClass_00&Prot00"
    assert compat[-1] == r"USB\COMPOSITE"
    assert ev.data["command"].endswith("/ids")
    assert "code" not in ev.data


def test_openzfs_unknown_fields_no_banner() -> None:
    inp = LogInput(DATA / "openzfs_392_unknown_problem.txt")
    assert PARSER.sniff(inp) >= 50                     # a paste without the banner
    events, tally = run(DATA / "openzfs_392_unknown_problem.txt")
    assert tally.used == 7 and tally.skipped == 0 and tally.not_understood == 0
    (ev,) = events
    assert ev.kind is Kind.PROBLEM
    assert ev.device is not None and ev.device.instance == r"ROOT\OpenZFS\0000"
    assert ev.data["code"] == 28 and ev.data["problem"] == "CM_PROB_FAILED_INSTALL"
    assert ev.data["problem_status"] is None
    assert ev.data["fields"]["Device Description"] == "Unknown"
    assert ev.data["fields"]["Class GUID"] == "Unknown"
    # "Unknown" placeholders are data, not a description or class
    assert "description" not in ev.data and "class" not in ev.data
    assert "command" not in ev.data


def test_systeminformer_four_devices_cut_at_the_end() -> None:
    events, tally = run(DATA / "systeminformer_1713_class_net_cut.txt")
    assert tally.not_understood == 0
    assert [e.device.instance for e in events if e.device] == [
        r"SWD\MSRRAS\MS_PPPOEMINIPORT", r"ROOT\VMS_VSMP\0000", r"ROOT\NET\0000", r"ROOT\NET\0001"]
    assert all(e.kind is Kind.BOUND for e in events)
    assert [e.data["driver"] for e in events[:3]] == ["netrasa.inf", "wvms_mp_windows.inf", "oem42.inf"]
    assert "driver" not in events[3].data                  # its Driver Name line was cut off
    assert events[3].data["fields"]["Manufacturer Name"] == "Windscribe.com"
    assert [e.data["at"].rsplit(":", 1)[1] for e in events] == ["4", "12", "20", "28"]
    assert all(e.data["command"] == "pnputil /enum-devices /class Net" for e in events)


def test_rust_samples_mixed_console() -> None:
    events, tally = run(DATA / "rust_driver_samples_30_deviceid.txt")
    # the devgen command, its banner and its message are someone else's output
    assert tally.not_understood == 3
    assert [n for n, _ in tally.samples] == [1, 2, 4]
    (ev,) = events
    assert ev.kind is Kind.BOUND
    assert ev.device is not None
    assert ev.device.instance == r"SWD\DEVGEN\{4379876b-fe75-2b4c-a284-dbaaa815146b}"
    assert ev.data["driver"] == "c_swdevice.inf"
    assert ev.data["class"] == "SoftwareDevice"
    assert ev.data["command"] == 'pnputil /enum-devices /deviceid "root\\ECHO_2"'


def test_pl2303_connected() -> None:
    events, tally = run(DATA / "pl2303_legacy_5_connected.txt")
    assert tally.not_understood == 0
    (ev,) = events
    assert ev.kind is Kind.BOUND
    assert ev.device is not None and ev.device.instance == r"USB\VID_067B&PID_2303\5&12c8f4c0&0&2"
    assert ev.data["description"] == "Prolific USB-to-Serial Comm Port (COM4)"
    assert ev.data["driver"] == "oem6.inf"
    assert ev.data["command"].startswith("pnputil.exe /enum-devices /class")


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.txt")))
def test_sniff_corpus(name: str) -> None:
    assert PARSER.sniff(LogInput(DATA / name)) >= 50


def test_parsers_tuple() -> None:
    assert PARSERS == (PARSER,)
    assert PARSER.name == "pnputil"


# ---- edge cases ---------------------------------------------------------------------

def test_crlf(tmp_path: Path) -> None:
    text = sample("mslearn_problem_deviceids.txt").replace("\n", "\r\n")
    events, tally = run_text(tmp_path, text)
    (ev,) = events
    assert ev.data["problem_status"] == "0xC0000428"
    assert ev.data["fields"]["Hardware IDs"][-1] == r"USB\VID_0547&PID_1002"
    assert tally.not_understood == 0


def test_utf16le_bom_powershell_redirect(tmp_path: Path) -> None:
    """Windows PowerShell 5.1's ``>`` writes UTF-16LE with a BOM and CRLF."""
    text = sample("systeminformer_1713_class_net_cut.txt").replace("\n", "\r\n")
    p = tmp_path / "ps51.txt"
    p.write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    assert PARSER.sniff(LogInput(p)) == 90
    events, tally = run(p)
    assert tally.encoding == "utf-16-le-bom"
    assert len(events) == 4 and events[2].device is not None
    assert events[2].device.instance == r"ROOT\NET\0000"
    assert tally.not_understood == 0


def test_quoted_with_gt(tmp_path: Path) -> None:
    text = "".join("> " + line + "\n" if line else ">\n"
                   for line in sample("mslearn_problem_deviceids.txt").splitlines())
    events, tally = run_text(tmp_path, text)
    (ev,) = events
    assert ev.data["code"] == 52
    assert len(ev.data["fields"]["Compatible IDs"]) == 6
    assert tally.not_understood == 0


def test_truncated_before_status(tmp_path: Path) -> None:
    lines = sample("mslearn_problem_deviceids.txt").splitlines()
    events, tally = run_text(tmp_path, "\n".join(lines[:6]) + "\n")   # up to Class GUID
    (ev,) = events
    assert ev.kind is Kind.DEVICE_STATE
    assert "incomplete" in ev.data["flags"] and ev.data["status"] is None
    assert tally.problems == ["line 4: device block has no Status line (output cut off?)"]


def test_truncated_between_status_and_problem_code(tmp_path: Path) -> None:
    lines = sample("mslearn_problem_deviceids.txt").splitlines()
    events, _ = run_text(tmp_path, "\n".join(lines[:9]))              # ends at Status, no EOL
    (ev,) = events
    assert ev.kind is Kind.DEVICE_STATE
    assert ev.data["status"] == "Problem"
    assert "status-problem-without-code" in ev.data["flags"]


def test_truncated_inside_a_list(tmp_path: Path) -> None:
    lines = sample("mslearn_problem_deviceids.txt").splitlines()
    events, _ = run_text(tmp_path, "\n".join(lines[:16]) + "\n")
    (ev,) = events
    assert ev.kind is Kind.PROBLEM
    assert ev.data["fields"]["Compatible IDs"] == [r"USB\COMPAT_VID_0547&Class_FF&SubClass_00&Prot_00",
                                                   r"USB\COMPAT_VID_0547&Class_FF&SubClass_00"]


def test_cut_mid_line(tmp_path: Path) -> None:
    """The systeminformer excerpt as published ends with the "D" of "Driver Name"."""
    events, tally = run_text(tmp_path, sample("systeminformer_1713_class_net_cut.txt") + "D")
    assert len(events) == 4
    assert tally.not_understood == 1 and tally.samples == [(34, "D")]


def test_excerpt_starting_mid_device(tmp_path: Path) -> None:
    lines = sample("mslearn_problem_deviceids.txt").splitlines()
    events, tally = run_text(tmp_path, "\n".join(lines[8:]) + "\n")    # from Status on
    assert events == []
    assert tally.not_understood == 0 and tally.skipped == len(lines[8:])
    assert len(tally.problems) == 1 and tally.problems[0].startswith("line 1:")


def test_empty_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.txt"
    p.write_bytes(b"")
    assert PARSER.sniff(LogInput(p)) == 0
    events, tally = run(p)
    assert events == [] and tally.lines == 0


def test_no_devices_message(tmp_path: Path) -> None:
    events, tally = run_text(tmp_path, "Microsoft PnP Utility\n\nNo devices were found on the system.\n")
    assert events == [] and tally.skipped == 3 and tally.not_understood == 0


def test_prose_mentioning_pnputil_is_not_a_command(tmp_path: Path) -> None:
    text = "OK so pnputil says:\n" + sample("openzfs_392_unknown_problem.txt")
    events, tally = run_text(tmp_path, text)
    assert tally.not_understood == 1 and "command" not in events[0].data


# Constructed (no public sample found): see PROVENANCE.md, "Variants we made ourselves".
_STARTED_BLOCK = sample("pl2303_legacy_5_connected.txt").split("\n\n", 1)[1]


@pytest.mark.parametrize("status, kind", [
    ("Disconnected", Kind.UNBOUND), ("Stopped", Kind.DEVICE_STATE),
    ("Disabled", Kind.DEVICE_STATE), ("Started", Kind.BOUND)])
def test_status_kinds(tmp_path: Path, status: str, kind: Kind) -> None:
    text = _STARTED_BLOCK.replace("Started", status)
    (ev,), _ = run_text(tmp_path, text)
    assert ev.kind is kind and ev.data["status"] == status


def test_several_devices_and_problem_without_name(tmp_path: Path) -> None:
    """Older builds print the number only: the name comes from the lab's CM_PROB table."""
    second = _STARTED_BLOCK.replace("Started", "Problem").replace(
        "Driver Name:", "Problem Code:               10\nDriver Name:").replace(
        r"5&12c8f4c0&0&2", r"5&12c8f4c0&0&3")
    (a, b), tally = run_text(tmp_path, "Microsoft PnP Utility\n\n" + _STARTED_BLOCK + "\n" + second)
    assert a.kind is Kind.BOUND and b.kind is Kind.PROBLEM
    assert b.data["code"] == 10 and b.data["problem"] == "CM_PROB_FAILED_START"
    assert "problem-name-from-table" in b.data["flags"]
    assert b.device is not None and (b.device.instance or "").endswith("&3")


def test_problem_code_hex_mismatch_is_a_problem(tmp_path: Path) -> None:
    text = sample("openzfs_392_unknown_problem.txt").replace("(0x1C)", "(0x1D)")
    (ev,), tally = run_text(tmp_path, text)
    assert ev.data["code"] == 28 and "problem-code-inconsistent" in ev.data["flags"]
    assert tally.problems == ["line 1: problem code and its hex form disagree"]


def test_relations_children(tmp_path: Path) -> None:
    """/relations layout as the public dchu-uninstall parser reads it (constructed)."""
    text = (
        "Microsoft PnP Utility\n\n"
        "Instance ID:                PCI\\VEN_8086&DEV_A0C8&SUBSYS_00000000&REV_20\\3&11583659&0&FB\n"
        "Device Description:         High Definition Audio Controller\n"
        "Class Name:                 System\n"
        "Class GUID:                 {4d36e97d-e325-11ce-bfc1-08002be10318}\n"
        "Manufacturer Name:          Microsoft\n"
        "Status:                     Started\n"
        "Driver Name:                hdaudbus.inf\n"
        "Parent:                     PCI\\VEN_8086&DEV_9A14&SUBSYS_00000000&REV_01\\3&11583659&0&00\n"
        "Children:                   HDAUDIO\\FUNC_01&VEN_10EC&DEV_0256\\4&2bd5a24&0&0001\n"
        "                            HDAUDIO\\FUNC_01&VEN_8086&DEV_2812\\4&2bd5a24&0&0201\n"
        "\n"
        "Instance ID:                ROOT\\SYSTEM\\0000\n"
        "Device Description:         Plug and Play Software Device Enumerator\n"
        "Status:                     Started\n"
        "Parent:                     HTREE\\ROOT\\0\n"
    )
    (a, b), tally = run_text(tmp_path, text)
    assert tally.not_understood == 0 and tally.problems == []
    assert a.data["fields"]["Parent"] == r"PCI\VEN_8086&DEV_9A14&SUBSYS_00000000&REV_01\3&11583659&0&00"
    assert a.data["fields"]["Children"] == [r"HDAUDIO\FUNC_01&VEN_10EC&DEV_0256\4&2bd5a24&0&0001",
                                            r"HDAUDIO\FUNC_01&VEN_8086&DEV_2812\4&2bd5a24&0&0201"]
    assert b.device is not None and b.device.instance == r"ROOT\SYSTEM\0000"
    assert "by-position" not in " ".join(b.data["flags"])


def test_drivers_sections(tmp_path: Path) -> None:
    """/drivers layout after a public PowerShell converter's example (constructed)."""
    text = (
        "Instance ID:                PCI\\VEN_1250&DEV_8896\\3&11583659&0&10\n"
        "Device Description:         Net device\n"
        "Status:                     Started\n"
        "Driver Name:                oem69.inf\n"
        "Matching Drivers:\n"
        "    Driver Name:            oem69.inf\n"
        "    Original Name:          netstrUMac.inf\n"
        "    Provider Name:          Microsoft\n"
        "    Driver Version:         06/21/2006 10.0.26100.1\n"
        "    Matching Device ID:     PCI\\VEN_1250&DEV8896\n"
        "    Driver Rank:            00FF0420\n"
        "    Driver Status:          Best Ranked / Installed\n"
        "\n"
        "    Driver Name:            net1.inf\n"
        "    Driver Rank:            00FF2000\n"
        "    Driver Status:          Outranked\n"
        "\n"
        "Instance ID:                ROOT\\SYSTEM\\0001\n"
        "Status:                     Started\n"
    )
    (a, b), tally = run_text(tmp_path, text)
    assert tally.not_understood == 0 and tally.problems == [] and tally.skipped == 2
    recs = a.data["fields"]["Matching Drivers"]
    assert [r["Driver Name"] for r in recs] == ["oem69.inf", "net1.inf"]
    assert recs[0]["Driver Status"] == "Best Ranked / Installed"
    assert recs[0]["Original Name"] == "netstrUMac.inf"
    assert recs[1] == {"Driver Name": "net1.inf", "Driver Rank": "00FF2000", "Driver Status": "Outranked"}
    assert a.data["driver"] == "oem69.inf"
    assert b.device is not None and b.device.instance == r"ROOT\SYSTEM\0001"


def test_unknown_labels_are_data(tmp_path: Path) -> None:
    text = (sample("pl2303_legacy_5_connected.txt")
            + "Bus Type GUID:              {9d7debbc-c85d-11d1-9eb4-006008c3a19a}\n"
            + "Some Future Field:\n"
            + "                            one\n"
            + "                            two\n")
    (ev,), tally = run_text(tmp_path, text)
    assert tally.not_understood == 0
    assert ev.data["fields"]["Bus Type GUID"] == "{9d7debbc-c85d-11d1-9eb4-006008c3a19a}"
    assert ev.data["fields"]["Some Future Field"] == ["one", "two"]


def test_localised_labels_by_position(tmp_path: Path) -> None:
    """Hypothetical translated labels (no localised sample found): the block is found by
    its instance-id-shaped first value and the problem code by its value's shape."""
    text = (
        "Instanz-ID:                 ROOT\\OpenZFS\\0000\n"
        "Gerätebeschreibung:         Unknown\n"
        "Zustand:                    Problem\n"
        "Problemcode:                28 (0x1C) [CM_PROB_FAILED_INSTALL]\n"
        "\n"
        "Instanz-ID:                 USB\\VID_067B&PID_2303\\5&12c8f4c0&0&2\n"
        "Zustand:                    Gestartet\n"
    )
    (a, b), tally = run_text(tmp_path, text)
    assert tally.not_understood == 0 and tally.problems == []
    assert a.device is not None and a.device.instance == r"ROOT\OpenZFS\0000"
    assert a.kind is Kind.PROBLEM and a.data["code"] == 28
    assert {"instance-id-by-position", "problem-code-by-shape"} <= set(a.data["flags"])
    assert b.kind is Kind.DEVICE_STATE and b.data["fields"]["Zustand"] == "Gestartet"


def test_other_command_output_is_not_a_device(tmp_path: Path) -> None:
    """/enum-interfaces output (MS Learn usbcon page) opens no device block."""
    text = ("Interface Path:         \\\\?\\USB#VID_045E&PID_0840#0C33CG9212501N0"
            "#{a5dcbf10-6530-11d2-901f-00c04fb951ed}\n"
            "Interface Description:  Unknown\n"
            "Device Instance ID:     USB\\VID_045E&PID_0840\\0C33CG9212501N0\n"
            "Interface Status:       Enabled\n")
    events, tally = run_text(tmp_path, text)
    assert events == [] and tally.skipped == 4 and len(tally.problems) == 1


def test_long_line(tmp_path: Path) -> None:
    text = (sample("openzfs_392_unknown_problem.txt") + "\n" + "Instance ID: " + "A" * 200_000 + "\n"
            + "x" * 200_000 + "\n" + "> " * 100_000 + "\n")
    events, tally = run_text(tmp_path, text)
    assert tally.cut_lines >= 2
    assert len(events) == 2 and events[0].data["code"] == 28
    assert tally.lines == 11


def test_value_cap(tmp_path: Path) -> None:
    body = "".join(f"                            USB\\ID_{i}\n" for i in range(5000))
    text = ("Instance ID:                ROOT\\X\\0\n"
            "Status:                     Started\n"
            "Hardware IDs:               first\n" + body)
    (ev,), tally = run_text(tmp_path, text)
    assert "values-capped" in ev.data["flags"] and tally.used == 5003
    assert len(ev.data["fields"]["Hardware IDs"]) < 4096


def test_repeated_labels_are_numbered_and_bounded(tmp_path: Path) -> None:
    text = "Instance ID:                ROOT\\X\\0\n" + "Status:                     Started\n" * 50_000
    (ev,), tally = run_text(tmp_path, text)
    assert ev.data["fields"]["Status"] == "Started" and ev.data["fields"]["Status#2"] == "Started"
    assert ev.kind is Kind.BOUND and "values-capped" in ev.data["flags"]
    assert tally.used == 50_001


def test_not_pnputil_sniffs_zero(tmp_path: Path) -> None:
    p = tmp_path / "dmesg.txt"
    p.write_text("[    0.000000] Linux version 6.1.0\n[    0.000001] Command line: ro quiet\n")
    assert PARSER.sniff(LogInput(p)) == 0


def test_problem_code_and_ntstatus_helpers() -> None:
    pc = parse_problem_code("52 (0x34) [CM_PROB_UNSIGNED_DRIVER]")
    assert pc is not None and (pc.code, pc.name, pc.consistent) == (52, "CM_PROB_UNSIGNED_DRIVER", True)
    pc = parse_problem_code("10 (CM_PROB_FAILED_START)")
    assert pc is not None and (pc.code, pc.name) == (10, "CM_PROB_FAILED_START")
    pc = parse_problem_code("028")
    assert pc is not None and pc.code == 28
    assert parse_problem_code("Unknown") is None
    assert normalise_ntstatus("0xc0000490") == "0xC0000490"
    assert normalise_ntstatus("0x0") == "0x00000000"
    assert normalise_ntstatus("STATUS_IO_TIMEOUT") == "STATUS_IO_TIMEOUT"


def test_missing_file_is_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(LogFormatError):
        LogInput(tmp_path / "nope.txt")


# ---- properties ---------------------------------------------------------------------

_TMP = Path(tempfile.mkdtemp(prefix="pnputil-hyp-"))


def _check_any(data: bytes) -> None:
    p = _TMP / "h.txt"
    p.write_bytes(data)
    inp = LogInput(p)
    score = PARSER.sniff(inp)
    assert 0 <= score <= 100
    tally = Tally(str(p), "pnputil")
    events = list(PARSER.parse(inp, tally))
    assert tally.balanced
    assert tally.events == len(events)
    for ev in events:
        well_formed(ev)


_ALPHABET = st.sampled_from(["Instance ID:", "Status:", "Problem Code:", "Hardware IDs:",
                             "Matching Drivers:", "Microsoft PnP Utility", "ROOT\\X\\0",
                             "28 (0x1C) [CM_PROB_FAILED_INSTALL]", "Started", "Problem",
                             "Disconnected", "Unknown", "    ", "                            ",
                             "\n", "\r\n", "> ", ">", ":", "\\", "pnputil ", "C:\\>", "\t",
                             "No devices", "0xC0000428", "é", "\x00"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(_ALPHABET, st.text(max_size=20)), max_size=60))
def test_property_arbitrary_text(parts: list[str]) -> None:
    _check_any("".join(parts).encode("utf-8", "surrogatepass"))


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_property_arbitrary_bytes(data: bytes) -> None:
    _check_any(data)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=600))
def test_property_utf16_bytes(data: bytes) -> None:
    _check_any(codecs.BOM_UTF16_LE + data)
