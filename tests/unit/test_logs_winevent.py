"""Windows event logs as people export them (lab.logs.winevent) and the Kernel-PnP table
(lab.guest.windows.trace.etw) they are mapped through.

The samples are real public ones (tests/unit/data/logs/winevent/PROVENANCE.md says where
each comes from and what was changed); the values asserted here were read from the samples
themselves.
"""

from __future__ import annotations

import codecs
import json
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.events import Event, Kind, Source
from lab.logs.base import LogFormatError, LogInput, Tally
from lab.logs.winevent import (
    EVTX_PARSER,
    JSON_PARSER,
    PARSERS,
    TEXT_PARSER,
    XML_PARSER,
    parse_header_date,
    parse_iso,
)
from lab.guest.windows.trace import etw
from lab.logs.base import LogParser
from tests.unit.log_parsing import parse_checked

DATA = Path(__file__).parent / "data" / "logs" / "winevent"
LAB_DATA = Path(__file__).parent / "data" / "windows"
NS = "http://schemas.microsoft.com/win/2004/08/events/event"
HID = "HID\\VID_0E0F&PID_000A&Col01\\7&1e4bfc40&0&0000"
USBSTOR = "USBSTOR\\Disk&Ven_Hitachi&Prod_HTS545050A7E380&Rev_\\20211118&0"


def ns(text: str, frac: str = "") -> int:
    """``2017-07-12T17:16:29`` (UTC) plus a fraction of a second given as digits."""
    d = datetime.fromisoformat(text).replace(tzinfo=timezone.utc)
    return int(d.timestamp()) * 1_000_000_000 + int(frac.ljust(9, "0") or "0")


def run(parser: LogParser, path: Path) -> tuple[list[Event], Tally]:
    return parse_checked(parser, path, well_formed)


def well_formed(ev: Event, display: str) -> None:
    assert ev.source is Source.GUEST_ETW
    assert isinstance(ev.kind, Kind)
    assert isinstance(ev.t_host_ns, int) and ev.t_guest_ns == ev.t_host_ns
    assert str(ev.data["at"]).startswith(display + ":")
    json.loads(ev.dumps())                  # survives the run directory's JSON


def write(tmp: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    p = tmp / name
    p.write_bytes(text.encode(encoding))
    return p


def kpnp(events: list[Event]) -> list[Event]:
    return [e for e in events if "other-provider" not in e.data.get("flags", ())]


# ------------------------------------------------------------------ corpus

def test_xml_view_paste_410_matches_kernel_pnp_by_guid() -> None:
    """microsoft/language-server-protocol#1434: the XML view pasted into an issue, with
    Markdown link debris in the tags' text and in the provider *name*, and bare ``&``."""
    path = DATA / "kernel_pnp_410_event_viewer_xml_view.xml"
    assert XML_PARSER.sniff(LogInput(path)) == 90 and TEXT_PARSER.sniff(LogInput(path)) == 0
    events, tally = run(XML_PARSER, path)
    assert len(events) == 1 and (tally.used, tally.skipped, tally.not_understood) == (28, 0, 0)
    ev = events[0]
    assert ev.kind is Kind.START and ev.data["event_id"] == 410 and ev.data["name"] == "DeviceStarted"
    assert ev.device is not None and ev.device.instance == USBSTOR
    assert ev.data["status"] == "0x0" and ev.data["code"] == 0
    assert ev.t_host_ns == ns("2022-04-01T20:34:03", "9208426")
    # the provider name is mangled by the paste; the GUID still says Kernel-PnP
    assert "other-provider" not in ev.data["flags"] and "xml-repaired" in ev.data["flags"]
    raw = ev.data["raw"]
    assert raw["RecordId"] == 291 and raw["ProcessId"] == 4 and raw["ThreadId"] == 5428
    assert raw["Data"]["DriverName"] == "disk.inf" and raw["Data"]["LowerFilters"] == ""
    assert ev.data["at"].endswith("kernel_pnp_410_event_viewer_xml_view.xml:1")
    assert tally.clock == "utc"


def test_copy_details_219_driver_failed_to_load() -> None:
    """Event 219 (omerbenamram/evtx system.evtx record 47) as "Copy details as text"."""
    path = DATA / "kernel_pnp_219_copy_details.txt"
    assert TEXT_PARSER.sniff(LogInput(path)) > XML_PARSER.sniff(LogInput(path))
    events, tally = run(TEXT_PARSER, path)
    assert len(events) == 1 and tally.used == tally.lines == 38      # CRLF file, all used
    ev = events[0]
    assert ev.kind is Kind.PROBLEM and ev.data["event_id"] == 219
    assert ev.data["name"] == "DriverLoadFailed" and ev.data["verified"] is True
    assert ev.device is not None and ev.device.instance == HID
    assert ev.data["status"] == "0xC0000365"            # 3221226341
    assert ev.data["driver"] == "\\Driver\\WudfRd"
    assert "code" not in ev.data                        # 219 carries no problem code
    assert ev.t_host_ns == ns("2017-07-12T17:16:29", "6905846")
    assert ev.data["description"].startswith("The driver \\Driver\\WudfRd failed to load")
    assert ev.data["header"]["date"] == "7/12/2017 5:16:29 PM"
    assert ev.data["at"].endswith(":1") and ev.data.get("flags", []) == []


def test_copy_details_html_escaped_411_truncated_falls_back_to_header() -> None:
    """MicrosoftDocs/windows-driver-docs#2168: the XML part HTML-escaped, cut after
    <Computer> (as stored), the date in a locale we do not guess (13/04/2020 02.46.10)."""
    path = DATA / "kernel_pnp_411_copy_details_html_escaped.txt"
    assert TEXT_PARSER.sniff(LogInput(path)) == 95 and XML_PARSER.sniff(LogInput(path)) == 0
    events, tally = run(TEXT_PARSER, path)
    assert len(events) == 1
    ev = events[0]
    assert ev.kind is Kind.PROBLEM and ev.data["event_id"] == 411
    assert ev.data["provider"] == "Microsoft-Windows-Kernel-PnP"
    assert {"header-only", "bad-timestamp", "untimed"} <= set(ev.data["flags"])
    assert ev.t_host_ns == 0 and ev.device is None
    assert "code" not in ev.data                        # never read from the description
    assert "Problem: 0x15" in ev.data["description"]
    assert ev.data["header"]["computer"] == "DESKTOP-679BUMT"
    # header + description used, the 15 lines of cut XML not understood
    assert (tally.used, tally.not_understood) == (20, 15)
    assert any(p.startswith("line 21:") and "truncated" in p for p in tally.problems)
    assert all("DESKTOP" not in p and "VEN_" not in p for p in tally.problems)


def test_copy_details_german_411_local_date() -> None:
    """openzfsonwindows/openzfs#478: German labels, D.M.YYYY date, XML cut mid-tag."""
    path = DATA / "kernel_pnp_411_copy_details_de.txt"
    events, tally = run(TEXT_PARSER, path)
    assert len(events) == 1
    ev = events[0]
    assert ev.kind is Kind.PROBLEM and ev.data["event_id"] == 411
    assert ev.t_host_ns == ns("2025-06-13T09:50:03")        # local wall time, zone unknown
    assert {"header-only", "local-time"} <= set(ev.data["flags"])
    assert tally.clock == "local"
    assert (tally.used, tally.skipped, tally.not_understood) == (20, 1, 19)   # ``` fence skipped
    assert ev.data["header"]["source"] == "Microsoft-Windows-Kernel-PnP"


def test_evtx_chunk_with_kernel_pnp_219() -> None:
    """One 64 KiB chunk of omerbenamram/evtx samples/system.evtx: 108 records."""
    path = DATA / "system_chunk0_kernel_pnp_219.evtx"
    assert EVTX_PARSER.sniff(LogInput(path)) == 100
    assert all(p.sniff(LogInput(path)) == 0 for p in PARSERS if p is not EVTX_PARSER)
    events, tally = run(EVTX_PARSER, path)
    assert len(events) == tally.lines == tally.used == 108 and tally.problems == []
    ours = kpnp(events)
    assert len(ours) == 1
    ev = ours[0]
    assert ev.kind is Kind.PROBLEM and ev.data["event_id"] == 219
    assert ev.device is not None and ev.device.instance == HID
    assert ev.data["status"] == "0xC0000365" and ev.data["driver"] == "\\Driver\\WudfRd"
    assert ev.data["at"].endswith("system_chunk0_kernel_pnp_219.evtx:record 47")
    assert ev.t_host_ns == ns("2017-07-12T17:16:29", "6905846")    # all 7 digits kept
    # other providers' events are kept as log lines and never looked up in the table
    scm = [e for e in events if e.data["event_id"] == 7045]
    assert scm and all(e.kind is Kind.KERNEL_LOG and "other-provider" in e.data["flags"] for e in scm)
    assert scm[0].device is None and "name" not in scm[0].data
    # UserData payloads are read too (UserPnp 20001, record 48)
    upnp = next(e for e in events if e.data["raw"].get("RecordId") == 48)
    assert upnp.data["raw"]["Data"]["DriverVersion"] == "10.0.15063.0"
    assert upnp.data["raw"]["Data"]["DeviceInstanceID"] == "HID\\VID_0E0F&PID_000A&COL01\\7&1E4BFC40&0&0000"
    assert [e.data["raw"]["RecordId"] for e in events] == list(range(1, 109))   # file order


def test_powershell51_json_default_depth() -> None:
    """lorenzoni10/Cyber-Bootcamp: Get-WinEvent | ConvertTo-Json at its default depth."""
    path = DATA / "get_winevent_convertto_json_ps51.json"
    assert JSON_PARSER.sniff(LogInput(path)) == 90
    events, tally = run(JSON_PARSER, path)
    assert len(events) == 1 and (tally.used, tally.skipped) == (35, 1)     # the prompt line
    ev = events[0]
    assert ev.kind is Kind.KERNEL_LOG and ev.data["event_id"] == 13
    assert {"other-provider", "properties-not-serialised"} <= set(ev.data["flags"])
    assert ev.t_host_ns == 1595374458918 * 1_000_000
    assert ev.data["raw"]["Keywords"] == "0x8000000000000000"
    assert ev.data["raw"]["MachineName"] == "DESKTOP-U3FCUKI"
    assert ev.data["at"].endswith(":2")


@pytest.mark.parametrize("name,t", [
    ("kernel_pnp_410_convertto_json_depth3_ps51.json", 1648845243920 * 1_000_000),
    ("kernel_pnp_410_convertto_json_depth3_ps7.json", None),
])
def test_powershell_json_depth3_names_properties_by_template(name: str, t: int | None) -> None:
    events, tally = run(JSON_PARSER, DATA / name)
    assert len(events) == 1 and tally.not_understood == 0
    ev = events[0]
    assert ev.kind is Kind.START and ev.data["event_id"] == 410
    assert ev.device is not None and ev.device.instance == USBSTOR
    # Problem/Status named from the 410 template (8 positional values)
    assert ev.data["code"] == 0 and ev.data["status"] == "0x0"
    assert ev.t_host_ns == (t if t is not None else ns("2022-04-01T20:34:03", "9208426"))
    assert ev.data["raw"]["Keywords"] == "0x4000000000000000"


# ------------------------------------------------------------------ variants and edge cases

def test_indented_quoted_escaped_and_utf16(tmp_path: Path) -> None:
    text = (DATA / "kernel_pnp_219_copy_details.txt").read_text(encoding="utf-8")
    lines = text.splitlines()
    quoted = "\n".join("> " + x for x in lines) + "\n"
    indented = "\n".join("    " + x for x in lines) + "\n"
    xml_at = lines.index("Event Xml:") + 1
    escaped = "\n".join(lines[:xml_at] + [x.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                                          for x in lines[xml_at:]]) + "\n"
    for i, (variant, enc) in enumerate([(quoted, "utf-8"), (indented, "utf-8"), (escaped, "utf-8"),
                                        (text, "utf-16")]):
        events, tally = run(TEXT_PARSER, write(tmp_path, f"v{i}.txt", text=variant, encoding=enc))
        assert len(events) == 1 and tally.not_understood == 0, i
        ev = events[0]
        assert ev.data["event_id"] == 219 and ev.device is not None and ev.device.instance == HID, i
        assert ev.t_host_ns == ns("2017-07-12T17:16:29", "6905846"), i
    assert codecs.BOM_UTF16_LE == (tmp_path / "v3.txt").read_bytes()[:2]


def test_several_pasted_events_one_after_another(tmp_path: Path) -> None:
    parts = [(DATA / n).read_text(encoding="utf-8") for n in (
        "kernel_pnp_219_copy_details.txt", "kernel_pnp_411_copy_details_html_escaped.txt")]
    text = parts[0] + "\nsome words between the pastes\n\n" + parts[1]
    events, tally = run(TEXT_PARSER, write(tmp_path, "many.txt", text))
    assert [e.data["event_id"] for e in events] == [219, 411]
    assert tally.not_understood == 1 + 15          # the prose line, the cut XML
    # the second event has no time of its own: it keeps the first one's, flagged
    assert events[1].t_host_ns == events[0].t_host_ns and "untimed" in events[1].data["flags"]
    # a paste whose XML was cut short by the next paste: each keeps its own header
    text = parts[1] + parts[0]
    events, tally = run(TEXT_PARSER, write(tmp_path, "cut.txt", text))
    assert [e.data["event_id"] for e in events] == [411, 219]
    assert "header-only" in events[0].data["flags"] and events[1].device is not None
    assert tally.not_understood == 15 and any("not closed before" in p for p in tally.problems)
    # and one cut short by the next bare event XML
    xml_only = parts[0][parts[0].index("<Event"):]
    events, tally = run(TEXT_PARSER, write(tmp_path, "cut2.txt", parts[1] + xml_only))
    assert [e.data["event_id"] for e in events] == [411, 219] and tally.not_understood == 15


def _event_xml(eid: int, data: dict[str, str], *, provider: str = etw.KERNEL_PNP_NAME,
               guid: str = "{9c205a39-1250-487d-abd7-e831c6290539}", t: str = "2024-01-15T10:00:00.1000000Z",
               quote: str = '"') -> str:
    q = quote
    items = "".join(f"<Data Name={q}{k}{q}>{v}</Data>" for k, v in data.items())
    return (f"<Event xmlns={q}{NS}{q}><System><Provider Name={q}{provider}{q} Guid={q}{guid}{q}/>"
            f"<EventID>{eid}</EventID><Version>0</Version><Level>4</Level><Task>0</Task>"
            f"<Opcode>0</Opcode><Keywords>0x4000000000000000</Keywords>"
            f"<TimeCreated SystemTime={q}{t}{q}/><EventRecordID>{eid}</EventRecordID>"
            f"<Correlation/><Execution ProcessID={q}4{q} ThreadID={q}8{q}/>"
            f"<Channel>System</Channel><Computer>c</Computer></System>"
            f"<EventData>{items}</EventData></Event>")


HDA = "PCI\\VEN_8086&amp;DEV_293E&amp;SUBSYS_11001AF4&amp;REV_03\\3&amp;2411E6FE&amp;0&amp;10"
ROOT = "PCI\\VEN_1B36&amp;DEV_000C&amp;SUBSYS_11001AF4&amp;REV_00\\3&amp;2411E6FE&amp;0&amp;18"


def test_stream_without_root_events_root_and_one_line(tmp_path: Path) -> None:
    e1 = _event_xml(852, {"DeviceInstanceLength": "60", "DeviceInstance": ROOT}, quote="'")
    e2 = _event_xml(803, {"Phase": "0x0", "Device": HDA}, t="2024-01-15T10:00:00.2000000Z")
    e3 = _event_xml(804, {"Phase": "0x0", "Device": HDA}, t="2024-01-15T10:00:00.2500000Z")
    e4 = _event_xml(853, {"DeviceInstanceLength": "60", "DeviceInstance": ROOT, "Status": "0"},
                    t="2024-01-15T10:00:01.1000000Z")
    stream = "\n".join([e1, e2, e3, e4]) + "\n"               # Get-WinEvent | % ToXml()
    wrapped = '<?xml version="1.0" encoding="UTF-16"?>\n<Events>\n' + stream + "</Events>\n"
    one_line = e1 + e2 + e3 + e4 + "\n"
    for name, text in (("s.xml", stream), ("w.xml", wrapped), ("o.xml", one_line)):
        events, tally = run(XML_PARSER, write(tmp_path, name, text))
        assert [e.data["event_id"] for e in events] == [852, 803, 804, 853], name
        assert tally.not_understood == 0 and tally.problems == [], name
        start, begin, end, stop = events
        # 852/853 name the rebalance root, not a device the rules should track
        assert start.kind is Kind.REBALANCE_START and start.device is None
        assert start.data["rebalance_root"].startswith("PCI\\VEN_1B36&DEV_000C")
        assert stop.kind is Kind.REBALANCE_END and stop.device is None
        assert stop.duration_ns == 1_000_000_000 and stop.data["status"] == "0x0"
        # 803/804: the device is in the field ``Device``; the pair is a span, not a START
        assert begin.kind is Kind.CALL_ENTER and begin.data["for_kind"] == "kernel-log"
        assert end.kind is Kind.KERNEL_LOG and end.device is not None
        assert str(end.device.instance).startswith("PCI\\VEN_8086&DEV_293E") and end.duration_ns == 50_000_000
    _, tally = run(XML_PARSER, write(tmp_path, "w.xml", wrapped))
    assert tally.skipped == 3                                      # <?xml>, <Events>, </Events>


def test_other_providers_ids_are_not_kernel_pnp_ids(tmp_path: Path) -> None:
    other = _event_xml(410, {"DeviceInstanceId": HDA}, provider="Microsoft-Windows-Something",
                       guid="{11111111-2222-3333-4444-555555555555}")
    by_guid = _event_xml(411, {"DeviceInstanceId": HDA, "Problem": "0xA", "Status": "0xC00000E5"},
                         provider="Renamed", guid="{9C205A39-1250-487D-ABD7-E831C6290539}")
    events, _ = run(XML_PARSER, write(tmp_path, "o.xml", other + "\n" + by_guid + "\n"))
    assert events[0].kind is Kind.KERNEL_LOG and "other-provider" in events[0].data["flags"]
    assert events[0].device is None and "status" not in events[0].data
    assert events[1].kind is Kind.PROBLEM and events[1].data["code"] == 10
    assert events[1].data["status"] == "0xC00000E5"


def test_rendered_xml_userdata_and_unnamed_data(tmp_path: Path) -> None:
    ev_xml = (f"<Event xmlns='{NS}'><System><Provider Name='Microsoft-Windows-Kernel-PnP'/>"
              "<EventID>1010</EventID><TimeCreated SystemTime='2025-04-16T12:12:39.0000000Z'/></System>"
              "<UserData><X xmlns='urn:x'><DeviceInstanceId>DISPLAY\\Default_Monitor\\1&amp;8713bca&amp;0&amp;UID0"
              "</DeviceInstanceId><DeviceCount>1</DeviceCount></X></UserData>"
              "<RenderingInfo Culture='en-US'><Message>Device ... removed</Message></RenderingInfo></Event>")
    events, _ = run(XML_PARSER, write(tmp_path, "r.xml", ev_xml + "\n"))
    ev = events[0]
    assert ev.kind is Kind.SURPRISE_REMOVAL and ev.data["verified"] is False
    assert ev.device is not None and ev.device.instance == "DISPLAY\\Default_Monitor\\1&8713bca&0&UID0"
    assert ev.data["raw"]["Message"] == "Device ... removed"


def test_truncated_and_garbage(tmp_path: Path) -> None:
    full = (DATA / "kernel_pnp_410_event_viewer_xml_view.xml").read_text(encoding="utf-8")
    cut = "\n".join(full.splitlines()[:12]) + "\n"
    events, tally = run(XML_PARSER, write(tmp_path, "cut.xml", cut))
    assert events == [] and tally.not_understood == 12
    assert any("truncated" in p for p in tally.problems)
    events, tally = run(XML_PARSER, write(tmp_path, "g.xml", "hello\n" + full + "world\n"))
    assert len(events) == 1 and tally.not_understood == 2


def test_json_truncated_and_broken(tmp_path: Path) -> None:
    # the lab's own decode output cut mid-record: the records before the cut survive
    events, tally = run(JSON_PARSER, LAB_DATA / "kernel_pnp_truncated.json")
    assert [e.data["event_id"] for e in events] == [852, 850]
    assert any("truncated" in p for p in tally.problems)
    # a document with no complete record at all is not this format; position, no content
    text = (DATA / "kernel_pnp_410_convertto_json_depth3_ps7.json").read_text(encoding="utf-8")
    cut = write(tmp_path, "cut.json", "\n".join(text.splitlines()[:20]) + "\n")
    with pytest.raises(LogFormatError, match=r"line \d+ column \d+") as exc:
        run(JSON_PARSER, cut)
    assert "USBSTOR" not in str(exc.value)
    bad = write(tmp_path, "bad.json", '[\n  {"Id": 410, "TimeCreated": "2022-04-01T20:34:03Z",,}\n]\n')
    with pytest.raises(LogFormatError, match="line 2 column"):
        run(JSON_PARSER, bad)


def test_lab_decode_json_through_the_same_mapping() -> None:
    events, tally = run(JSON_PARSER, LAB_DATA / "kernel_pnp_events.json")
    live = etw.parse_etw_json((LAB_DATA / "kernel_pnp_events.json").read_text(), received_ns=7)
    assert [e.kind for e in events] == [e.kind for e in live.events]
    assert [e.t_host_ns for e in events if "untimed" not in e.data.get("flags", ())] == \
        [e.t_guest_ns for e in live.events if e.t_guest_ns is not None]
    assert tally.lines == 1 and tally.used == 1


def test_empty_files(tmp_path: Path) -> None:
    empty = write(tmp_path, "e.txt", "")
    for parser in (XML_PARSER, TEXT_PARSER, JSON_PARSER):
        events, tally = run(parser, empty)
        assert events == [] and tally.lines == 0
    with pytest.raises(LogFormatError):
        run(EVTX_PARSER, empty)


@pytest.mark.parametrize("parser", [XML_PARSER, TEXT_PARSER, JSON_PARSER])
def test_one_very_long_line(tmp_path: Path, parser: object) -> None:
    body = "<Event " + "x" * 200_000 + "\n" if parser is not JSON_PARSER else '[{"Id": "' + "7" * 200_000 + '"}]\n'
    p = write(tmp_path, "long.txt", body)
    inp = LogInput(p)
    tally = Tally(str(p), "x")
    try:
        events = list(getattr(parser, "parse")(inp, tally))
    except LogFormatError:
        events = []
    assert tally.balanced and tally.lines == 1 and tally.cut_lines >= 1 and events == []


def test_hostile_xml_fails_safely(tmp_path: Path) -> None:
    lol = "".join(f'<!ENTITY lol{i} "' + f"&lol{i - 1};" * 10 + '">' for i in range(1, 10))
    bomb = (f'<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol0 "lol">{lol}]>\n'
            f'<Event xmlns="{NS}"><System><EventID>&lol9;</EventID></System></Event>\n')
    xxe = (f'<!DOCTYPE e [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>\n'
           f'<Event xmlns="{NS}"><System><EventID>1</EventID><Computer>&xxe;</Computer></System></Event>\n')
    inline_dtd = f'<Event xmlns="{NS}"><!DOCTYPE x [<!ENTITY a "b">]><System/></Event>\n'
    for name, text in (("bomb.xml", bomb), ("xxe.xml", xxe), ("dtd.xml", inline_dtd)):
        events, tally = run(XML_PARSER, write(tmp_path, name, text))
        assert events == [] and tally.not_understood >= 1 and tally.problems, name


def test_header_dates() -> None:
    assert parse_header_date("7/12/2017 5:16:29 PM") is not None
    assert parse_header_date("7/12/2017 5:16:29 PM").ns == ns("2017-07-12T17:16:29")   # type: ignore[union-attr]
    assert parse_header_date("1/2/2024 12:00:00 AM").ns == ns("2024-01-02T00:00:00")  # type: ignore[union-attr]
    assert parse_header_date("2021-01-20 14:56:58").local                              # type: ignore[union-attr]
    assert parse_header_date("13.06.2025 09:50:03").ns == ns("2025-06-13T09:50:03")   # type: ignore[union-attr]
    for bad in ("13/04/2020 02.46.10", "13/04/2020 02:46:10", "yesterday", "", "2/30/2024 1:00:00 PM"):
        assert parse_header_date(bad) is None, bad
    when = parse_iso("2020-04-12T19:46:10.628204800Z")
    assert when is not None and not when.local and when.ns == ns("2020-04-12T19:46:10", "6282048")
    assert parse_iso("2022-04-01T22:34:03.9208426+02:00").ns == ns("2022-04-01T20:34:03", "9208426")  # type: ignore[union-attr]


# ------------------------------------------------------------------ the Kernel-PnP table

def test_table_rows_checked_against_manifest_dumps() -> None:
    table = etw.DEFAULT_EVENT_TABLE
    r219 = table[219]
    assert r219.kind is Kind.PROBLEM and r219.name == "DriverLoadFailed" and r219.verified
    assert ("FailureName", "driver") in r219.fields
    assert table[852].root == "rebalance_root" and table[853].root == "rebalance_root"
    assert table[850].root == "assign_root"
    for eid in (421, 441, 442, 830, 831, 832):
        assert eid in table and table[eid].verified
    assert table[225].kind is Kind.QUERY_REMOVE and table[225].ok is False
    assert table[1010].kind is Kind.SURPRISE_REMOVAL and not table[1010].verified
    assert all(not table[e].verified for e in (1000, 1010, 1011, 1020, 1021))
    assert all(r.kind is not Kind.START for e, r in table.items() if 803 <= e <= 806)
    assert etw.TEMPLATES[410] == (("DeviceInstanceId", "DriverName", "ClassGuid", "ServiceName",
                                   "LowerFilters", "UpperFilters", "Problem", "Status"),)


def test_mapper_device_field_veto_and_positional_payload() -> None:
    t = "2024-01-15T10:00:00.0000000Z"
    recs = [
        {"Id": 831, "TimeCreatedUtc": t, "Data": {"Device": "PCI\\VEN_1\\3&0"}},
        {"Id": 225, "TimeCreatedUtc": t, "Properties": [4, 12, "explorer.exe", 14, "USB\\VID_1\\5&1"]},
        {"Id": 411, "TimeCreatedUtc": t,
         "Properties": ["PCI\\VEN_2\\3&0", "x.inf", "g", "svc", "", "", 10, 3221225701]},
        {"Id": 219, "TimeCreatedUtc": t, "ProviderId": "9c205a39-1250-487d-abd7-e831c6290539",
         "Data": {"DriverName": "ROOT\\VMBus\\0000", "Status": "3221226341",
                  "FailureName": "\\Driver\\vmbusr"}},
    ]
    out = etw.parse_records(recs, received_ns=1)
    removal, veto, problem, driver = out.events
    assert removal.device is not None and removal.device.instance == "PCI\\VEN_1\\3&0"
    assert veto.kind is Kind.QUERY_REMOVE and veto.data["ok"] is False
    assert veto.data["process"] == "explorer.exe" and veto.device.instance == "USB\\VID_1\\5&1"  # type: ignore[union-attr]
    assert problem.data["code"] == 10 and problem.data["status"] == "0xC00000E5"
    assert driver.kind is Kind.PROBLEM and "code" not in driver.data
    assert driver.data["status"] == "0xC0000365" and driver.device.instance == "ROOT\\VMBus\\0000"  # type: ignore[union-attr]
    assert any("DeviceRemoval begin" in p for p in out.problems)


def test_event_map_json_round_trip_keeps_root_ok_fields() -> None:
    emap = etw.EventMap()
    again = etw.EventMap.from_json(json.loads(json.dumps(emap.to_json())))
    assert again.rules == emap.rules and again.provider_guid == emap.provider_guid
    assert again.is_provider(None, "{9C205A39-1250-487D-ABD7-E831C6290539}")
    assert again.is_provider("microsoft-windows-kernel-pnp", None) and again.is_provider(None, "")
    assert not again.is_provider("Service Control Manager", "{555908d1-a6d7-4695-8e1e-26931d2012f4}")


# ------------------------------------------------------------------ properties

_FRAGMENTS = [
    "<Event xmlns='" + NS + "'>", "</Event>", "<System>", "</System>", "<EventID>411</EventID>",
    "<EventData>", "<Data Name='DeviceInstanceId'>", "</Data>", "PCI\\VEN_1&DEV_2\\3&0",
    "&lt;Event ", "&gt;", "&amp;", "Log Name: System", "Event ID: 219", "Date: 1/2/2024 1:00:00 PM",
    "Description:", "Event Xml:", "{", "}", "[", "]", '"Id": 410,', '"TimeCreated": "\\/Date(1)\\/"',
    '"Properties": [{"Value": "x"}]', "\n", "\r\n", "> ", "    ", '"', "\\", ",",
    "<TimeCreated SystemTime='2024-01-01T00:00:00Z'/>", "<!DOCTYPE x>", "&x;",
]

_texts = st.one_of(
    st.text(max_size=400),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map("".join),
)


def _check_any(parser: object, path: Path) -> None:
    inp = LogInput(path)
    tally = Tally(str(path), getattr(parser, "name"))
    try:
        getattr(parser, "sniff")(inp)
        events = list(getattr(parser, "parse")(inp, tally))
    except LogFormatError:
        return
    assert tally.balanced, tally.to_json()
    for ev in events:
        well_formed(ev, inp.display)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_texts)
def test_any_text_is_accounted_for(scratch: Path, text: str) -> None:
    p = scratch / "t.txt"
    p.write_text(text, encoding="utf-8", errors="surrogatepass")
    for parser in (XML_PARSER, TEXT_PARSER, JSON_PARSER):
        _check_any(parser, p)


_evtx_head = (DATA / "system_chunk0_kernel_pnp_219.evtx").read_bytes()[:8192]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=600), evtx_prefix=st.booleans(), cut=st.integers(0, 8192))
def test_any_bytes_are_accounted_for(scratch: Path, data: bytes, evtx_prefix: bool, cut: int) -> None:
    p = scratch / "b.bin"
    p.write_bytes((_evtx_head[:cut] if evtx_prefix else b"") + data)
    for parser in PARSERS:
        _check_any(parser, p)
