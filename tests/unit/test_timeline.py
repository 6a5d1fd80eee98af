"""Timeline: merge, alignment, device identity, ordering, files, text view, queries."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.clock import Alignment
from lab.events import DeviceId, Event, Kind, Source
from lab.timeline import (RECV_KEY, ROW_COLUMNS, DeviceBinding, DeviceTable, Timeline,
                          TimelineFormatError, device_matches, normalize_bdf, render_text, rows,
                          summarize)

DATA = Path(__file__).parent / "data" / "timeline"
OFF = 1_700_000_000_000_000_000
SND = DeviceId(qom="snd0", bdf="0000:01:00.0", instance="PCI\\VEN_8086&DEV_2668\\3&11583659&0&18")


def host(t: int, kind: Kind, dev: DeviceId | None = None, src: Source = Source.HOST_LAB,
         **data: object) -> Event:
    return Event(OFF + t, src, kind, dev, data=dict(data))


def guest(g: int, recv: int, kind: Kind, dev: DeviceId | None = None,
          src: Source = Source.GUEST_KPROBE, **data: object) -> Event:
    return Event(OFF + recv, src, kind, dev, data=dict(data), t_guest_ns=g)


def test_guest_events_are_aligned_and_keep_their_receive_time() -> None:
    tl = Timeline.build(
        {"kprobe": [guest(100, 2_100, Kind.PROBE_ENTER, DeviceId(bdf="0000:01:00.0"))],
         "lab": [host(50, Kind.HOTPLUG_REQUEST, DeviceId(qom="snd0"))]},
        alignment=Alignment.fixed(OFF, bound_ns=900_000))
    probe = tl.first(Kind.PROBE_ENTER)
    assert probe is not None
    assert probe.t_host_ns == OFF + 100 and probe.data[RECV_KEY] == OFF + 2_100
    assert [e.seq for e in tl] == [1, 2]
    assert [e.kind for e in tl] == [Kind.HOTPLUG_REQUEST, Kind.PROBE_ENTER]
    assert tl.bound_ns == 900_000


def test_without_alignment_guest_events_stay_at_receive_time() -> None:
    tl = Timeline.build([guest(100, 2_100, Kind.PROBE_ENTER)])
    assert tl[0].t_host_ns == OFF + 2_100 and RECV_KEY not in tl[0].data
    assert not tl.alignment.known
    assert "NOT aligned" in render_text(tl)


def test_per_source_alignment_overrides() -> None:
    tl = Timeline.build([guest(10, 99, Kind.START, src=Source.GUEST_ETW),
                         guest(10, 99, Kind.PROBE_ENTER)],
                        alignment=Alignment.fixed(OFF),
                        source_alignment={Source.GUEST_ETW: Alignment.fixed(OFF + 5)})
    assert {e.kind: e.t_host_ns for e in tl} == {Kind.PROBE_ENTER: OFF + 10, Kind.START: OFF + 15}


def test_order_is_time_then_source_priority_then_input_order() -> None:
    evs = [guest(0, 10, Kind.KERNEL_LOG, src=Source.GUEST_KERNEL, message="a"),
           host(10, Kind.DECODE_ON, src=Source.HOST_TRACE),
           host(10, Kind.OPERATION, name="plug"),
           guest(0, 10, Kind.KERNEL_LOG, src=Source.GUEST_KERNEL, message="b"),
           host(5, Kind.QMP_EVENT, src=Source.HOST_QMP)]
    tl = Timeline.build(evs)
    assert [(e.kind, e.data.get("message")) for e in tl] == [
        (Kind.QMP_EVENT, None), (Kind.OPERATION, None), (Kind.DECODE_ON, None),
        (Kind.KERNEL_LOG, "a"), (Kind.KERNEL_LOG, "b")]
    assert Timeline.build(evs)[3].seq == tl[3].seq == 4      # stable across rebuilds


def test_device_identity_is_completed_from_the_table() -> None:
    evs = [host(1, Kind.BAR_MAPPED, DeviceId(bdf="01:00.0"), Source.HOST_TRACE),
           guest(2, 2, Kind.PROBE_ENTER, DeviceId(bdf="0000:01:00.0")),
           guest(3, 3, Kind.START, DeviceId(instance=SND.instance.lower()),  # type: ignore[union-attr]
                 src=Source.GUEST_PNP),
           host(4, Kind.DEVICE_DELETED, DeviceId(qom="snd0"), Source.HOST_QMP),
           host(5, Kind.BAR_MAPPED, DeviceId(bdf="0000:02:00.0"), Source.HOST_TRACE)]
    tl = Timeline.build(evs, devices=[SND])
    for e in tl[:4]:
        assert e.device is not None and e.device.qom == "snd0" and e.device.bdf == SND.bdf
        assert e.device.instance == SND.instance
    assert tl[4].device == DeviceId(bdf="0000:02:00.0")
    assert len(tl.select(device="snd0")) == 4
    assert len(tl.select(device="01:00.0")) == 4


def test_time_limited_bindings_follow_bdf_reuse() -> None:
    bdf = "0000:01:00.0"
    table = DeviceTable((DeviceBinding(DeviceId(qom="snd0", bdf=bdf), until_ns=OFF + 100),
                         DeviceBinding(DeviceId(qom="snd1", bdf=bdf), since_ns=OFF + 100)))
    tl = Timeline.build([host(50, Kind.BAR_MAPPED, DeviceId(bdf="01:00.0")),
                         host(150, Kind.BAR_MAPPED, DeviceId(bdf="01:00.0"))], devices=table)
    assert [e.device.qom for e in tl if e.device] == ["snd0", "snd1"]


def test_device_matching_helpers() -> None:
    assert normalize_bdf("01:00.0") == "0000:01:00.0"
    assert device_matches(SND, "0000:01:00.0") and device_matches(SND, "01:00.0")
    assert device_matches(SND, DeviceId(instance=SND.instance.lower()))  # type: ignore[union-attr]
    assert not device_matches(None, "snd0") and device_matches(None, None)


def test_write_read_round_trip(tmp_path: Path) -> None:
    tl = Timeline.build([host(1, Kind.OPERATION, name="rebalance"),
                         guest(5, 9, Kind.REMOVE_ENTER, SND, func="azx_remove")],
                        alignment=Alignment.fixed(OFF, bound_ns=800_000), devices=[SND],
                        meta={"scenario": "rebalance"})
    path = tl.write(tmp_path / "timeline.jsonl")
    first = path.read_text().splitlines()[0]
    assert '"type": "header"' in first and '"version": 1' in first
    back = Timeline.read(path)
    assert back.events == tl.events and not back.truncated
    assert back.alignment == tl.alignment and back.devices == tl.devices
    assert back.meta == {"scenario": "rebalance"}
    assert back.header()["sources"] == {"guest.kprobe": 1, "host.lab": 1}


def test_read_fixture_and_truncated_tail() -> None:
    full = Timeline.read(DATA / "sample.jsonl")
    assert len(full) == 3 and not full.truncated and full.bound_ns == 800_000
    assert full.alignment.to_host(5) == 1_700_000_000_000_000_005
    torn = Timeline.read(DATA / "truncated.jsonl")
    assert torn.truncated and len(torn) == 2
    assert "TRUNCATED" in render_text(torn)
    short = Timeline.read(DATA / "short.jsonl")          # header promised more events
    assert short.truncated and len(short) == 3


def test_damage_in_the_middle_is_an_error(tmp_path: Path) -> None:
    lines = (DATA / "sample.jsonl").read_text().splitlines()
    lines[2] = "{garbage"
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TimelineFormatError, match=":3:"):
        Timeline.read(p)
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"type": "header", "version": 99}\n')
    with pytest.raises(TimelineFormatError, match="newer"):
        Timeline.read(newer)


def test_render_text_and_rows() -> None:
    tl = Timeline.build([
        host(0, Kind.OPERATION, name="rebalance", phase="remove"),
        guest(1_500_000, 1_600_000, Kind.REMOVE_ENTER, SND, func="azx_remove"),
        Event(OFF + 2_000_000, Source.HOST_TRACE, Kind.BAR_UNMAPPED, SND,
              data={"bar": 0, "addr": 0xFE800000, "size": 0x4000}),
        Event(OFF + 3_250_000, Source.GUEST_KPROBE, Kind.REMOVE_EXIT, SND, duration_ns=1_750_000,
              data={"func": "azx_remove", "ret": 0}),
        guest(4_000_000, 4_000_000, Kind.KERNEL_LOG, src=Source.GUEST_KERNEL,
              message="snd_hda_intel 0000:01:00.0: removed"),
    ], alignment=Alignment.fixed(OFF, bound_ns=700_000))
    text = render_text(tl)
    lines = text.splitlines()
    assert "bound ±0.700 ms" in lines[0]
    assert len(lines) == 6
    assert "+1.500" in lines[2] and "guest.kprobe" in lines[2] and "snd0" in lines[2]
    assert "bar0=0xfe800000+0x4000" in lines[3]
    assert "1.750ms" in lines[4] and "ret=0" in lines[4]
    assert lines[1].lstrip().startswith("1") and "name=rebalance phase=remove" in lines[1]
    r = rows(tl, sources=[Source.GUEST_KPROBE], origin_ns=OFF + 1_000_000)
    assert len(r) == 2 and all(len(x) == len(ROW_COLUMNS) for x in r)
    assert r[0][1] == "+0.500"
    assert len(rows(tl, kinds=Kind.KERNEL_LOG)) == 1
    assert len(rows(tl, device="snd0", start_ns=OFF + 2_000_000, end_ns=OFF + 3_500_000)) == 2
    assert rows(tl, kinds=[Kind.PROBE_ENTER]) == []
    assert "0 of 5 events" in render_text(tl, kinds=[Kind.PROBE_ENTER])


def test_first_last_select() -> None:
    evs = [host(t, k, SND, n=t) for t, k in
           [(0, Kind.OPERATION), (10, Kind.BOUND), (20, Kind.UNBOUND), (20, Kind.BOUND),
            (30, Kind.BOUND)]]
    tl = Timeline.build(evs)
    op = tl.first(Kind.OPERATION)
    assert op is not None
    assert tl.first(Kind.BOUND, "snd0", after=op).data["n"] == 10      # type: ignore[union-attr]
    unb = tl.first(Kind.UNBOUND)
    assert tl.first(Kind.BOUND, after=unb).seq == 4                     # type: ignore[union-attr]
    assert tl.first(Kind.BOUND, after=OFF + 21) .data["n"] == 30        # type: ignore[union-attr]
    assert tl.first(Kind.BOUND, before=OFF + 10) is None
    assert tl.last(Kind.BOUND).data["n"] == 30                           # type: ignore[union-attr]
    assert tl.first(Kind.BOUND, "snd9") is None
    assert len(tl.select(kinds=[Kind.BOUND, Kind.UNBOUND], where=lambda e: e.data["n"] >= 20)) == 3


def test_spans_pair_by_device_function_and_task() -> None:
    d2 = DeviceId(qom="snd1", bdf="0000:02:00.0")
    evs = [guest(1, 1, Kind.PROBE_ENTER, SND, func="pci_device_probe", pid=7),
           guest(2, 2, Kind.PROBE_ENTER, SND, func="azx_probe", pid=7),
           guest(3, 3, Kind.PROBE_ENTER, d2, func="azx_probe", pid=9),
           guest(4, 4, Kind.PROBE_EXIT, SND, func="azx_probe", pid=7, ret=0),
           guest(5, 5, Kind.PROBE_EXIT, SND, func="pci_device_probe", pid=7, ret=0),
           guest(6, 6, Kind.PROBE_EXIT, d2, func="azx_remove", pid=9)]
    tl = Timeline.build(evs, alignment=Alignment.fixed(OFF))
    spans = tl.spans(Kind.PROBE_ENTER, Kind.PROBE_EXIT)
    assert [(s.enter is not None, s.exit is not None, s.duration_ns) for s in spans] == [
        (True, True, 4), (True, True, 2), (True, False, None), (False, True, None)]
    assert spans[0].enter.data["func"] == "pci_device_probe"            # type: ignore[union-attr]
    assert len(tl.spans(Kind.PROBE_ENTER, Kind.PROBE_EXIT, device="snd1")) == 2


def test_summarize_prefers_meaningful_fields() -> None:
    e = Event(0, Source.GUEST_KERNEL, Kind.KERNEL_LOG, data={"message": "x" * 200})
    assert len(summarize(e, 50)) == 50
    e = Event(0, Source.GUEST_PNP, Kind.QUERY_STOP, data={"status": "0xC0000001", "irp": "QS"})
    assert summarize(e) == "irp=QS status=0xC0000001"
    e = Event(0, Source.HOST_QMP, Kind.QMP_EVENT, data={"foo": 1, "t_recv_ns": 5})
    assert summarize(e) == "foo=1"
