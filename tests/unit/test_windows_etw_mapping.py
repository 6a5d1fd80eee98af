"""Kernel-PnP mapping gaps of issue 10, point 8, checked item by item on records in the
shape the tracer's decode script emits (Get-WinEvent: Id, ProviderName, TimeCreated
as FILETIME, Data = EventData by the manifest's field names).

Field names per event are from the published manifest dumps the table cites
(repnz/etw-providers-docs, builds 10240-18990) and the message strings of
microsoft-windows-kernel-pnp-events.dll (libyal/winevt-kb); see lab/guest/windows/trace/etw.py.

1. ``Device`` is among the instance fields (803-806, 830-832, 850/851 carry it).
2. 219 "The driver %5 failed to load for the device %2" is mapped (the device is in
   ``DriverName``, the driver in ``FailureName``) and a rule reads it.
3. Removal events beyond 420 are not ignored (830-832 kept on the device, 1010/1011
   surprise removal on Windows 11).
4. 850-853 name the root of the subtree being rebalanced or assigned, not a device.
"""

from __future__ import annotations

from typing import Any

import pytest

from lab.events import DeviceId, Kind
from lab.rules import RuleContext, check_all
from lab.timeline import Timeline
from lab.guest.windows.trace import etw

DEV = "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&267A616A&0&D8"
ROOT = "PCI\\VEN_8086&DEV_29C0&SUBSYS_11001AF4&REV_00\\3&267A616A&0&00"
FT0 = 133_497_000_000_000_000


def rec(event_id: int, i: int = 0, **data: Any) -> dict[str, Any]:
    return {"Id": event_id, "ProviderName": etw.KERNEL_PNP_NAME, "ProviderId": etw.KERNEL_PNP_GUID,
            "TimeCreatedFileTime": FT0 + i * 10_000, "Properties": list(data.values()),
            "Data": {k: str(v) for k, v in data.items()}}


def parse(*records: dict[str, Any]) -> list[Any]:
    out = etw.parse_records(list(records), received_ns=1)
    return out.events


def test_device_field_names_the_device() -> None:
    assert "Device" in etw._INSTANCE_FIELDS
    events = parse(rec(803, 0, Phase="1", Device=DEV), rec(804, 1, Phase="1", Device=DEV),
                   rec(831, 2, Device=DEV), rec(832, 3, Device=DEV))
    assert all(e.device is not None and e.device.instance == DEV for e in events)
    # begin/end paired per device: the end carries the phase's duration
    assert events[1].duration_ns == 1_000_000 and events[3].duration_ns == 1_000_000


def test_positional_properties_use_the_manifest_template() -> None:
    """A record with no field names (Properties only) is named by the template."""
    r = rec(850, 0, Device=ROOT)
    del r["Data"]
    (e,) = parse(r)
    assert e.device is None and e.data["assign_root"] == ROOT


def test_219_driver_failed_to_load_is_mapped_and_judged() -> None:
    (e,) = parse(rec(219, 0, DriverNameLength=len(DEV), DriverName=DEV, Status=3221226341,
                     FailureNameLength=14, FailureName="\\Driver\\mycodec", Version=0))
    assert e.kind is Kind.PROBLEM and e.data["name"] == "DriverLoadFailed"
    assert e.device is not None and e.device.instance == DEV
    assert e.data["driver"] == "\\Driver\\mycodec" and e.data["status"] == "0xC0000365"
    assert "code" not in e.data                      # 219 carries no CM_PROB code
    dut = DeviceId(qom="snd0", instance=DEV)
    tl = Timeline.build([e], devices=[dut])
    got = check_all(tl, RuleContext.from_timeline(tl, devices=(dut,)), ["windows-pnp"])
    assert [v.rule for v in got] == ["pnp.driver-load-failed"]
    assert "\\Driver\\mycodec" in got[0].message and "0xC0000365" in got[0].message


@pytest.mark.parametrize("event_id, kind", [(420, Kind.REMOVE), (1010, Kind.SURPRISE_REMOVAL),
                                            (1011, Kind.SURPRISE_REMOVAL), (830, Kind.KERNEL_LOG),
                                            (1000, Kind.QUERY_REMOVE)])
def test_removal_events_are_kept_on_the_device(event_id: int, kind: Kind) -> None:
    field = "DeviceInstanceId" if event_id == 420 else "Device"
    (e,) = parse(rec(event_id, 0, **{field: DEV}))
    assert e.kind is kind and e.device is not None and e.device.instance == DEV
    assert "unmapped-event-id" not in e.data.get("flags", [])


def test_rebalance_and_assignment_name_the_subtree_root_not_a_device() -> None:
    events = parse(rec(852, 0, DeviceInstanceLength=len(ROOT), DeviceInstance=ROOT),
                   rec(850, 1, Device=ROOT), rec(851, 2, Device=ROOT),
                   rec(853, 3, DeviceInstanceLength=len(ROOT), DeviceInstance=ROOT, Status="0x00000000"))
    assert [e.kind for e in events] == [Kind.REBALANCE_START, Kind.CALL_ENTER, Kind.RESOURCES_ASSIGNED,
                                        Kind.REBALANCE_END]
    assert all(e.device is None for e in events)
    assert events[0].data["rebalance_root"] == ROOT and events[3].data["rebalance_root"] == ROOT
    assert events[2].data["assign_root"] == ROOT and events[3].data["status"] == "0x00000000"
    assert events[3].duration_ns == 3_000_000
