from __future__ import annotations

from pathlib import Path

from lab.events import Kind
from lab.tracers.qemu_trace import QemuTraceParser, QemuTraceTail


def test_mapping_lines() -> None:
    p = QemuTraceParser()
    [ev] = p.parse_line("4242@1700000000.123456:pci_update_mappings_add ich9-intel-hda "
                        "01:00.0 0,0xfe800000+0x4000")
    assert ev.kind == Kind.BAR_MAPPED
    assert ev.device is not None and ev.device.bdf == "0000:01:00.0"
    assert ev.data["addr"] == 0xFE800000 and ev.data["size"] == 0x4000 and ev.data["bar"] == 0
    assert ev.t_host_ns == 1700000000_123456000
    [ev] = p.parse_line("4242@1700000000.200000:pci_update_mappings_del ich9-intel-hda "
                        "01:00.0 0,0xfe800000+0x4000")
    assert ev.kind == Kind.BAR_UNMAPPED


def test_decode_edges_from_command_register() -> None:
    p = QemuTraceParser()
    evs = p.parse_line("1@1.000001:pci_cfg_write AC97 01:00.0 @0x4 <- 0x5")
    assert [e.kind for e in evs] == [Kind.CONFIG_WRITE, Kind.DECODE_ON]
    assert evs[1].data["io"] and not evs[1].data["mem"]
    evs = p.parse_line("1@1.000002:pci_cfg_write AC97 01:00.0 @0x4 <- 0x7")
    assert [e.kind for e in evs] == [Kind.CONFIG_WRITE]   # still on: no edge
    evs = p.parse_line("1@1.000003:pci_cfg_write AC97 01:00.0 @0x4 <- 0x400")
    assert [e.kind for e in evs] == [Kind.CONFIG_WRITE, Kind.DECODE_OFF]
    evs = p.parse_line("1@1.000004:pci_cfg_write AC97 01:00.0 @0x10 <- 0xffffffff")
    assert [e.kind for e in evs] == [Kind.CONFIG_WRITE]


def test_garbage_is_counted_not_fatal() -> None:
    p = QemuTraceParser()
    assert p.parse_line("not a trace line") == []
    assert p.parse_line("1@1.1:pci_update_mappings_add broken") == []
    assert p.unparsed == 2


def test_tail_reads_incrementally_and_waits_for_complete_lines(tmp_path: Path) -> None:
    f = tmp_path / "trace.log"
    f.write_text("1@1.000001:pci_update_mappings_add x 01:00.0 0,0x1000+0x100\n1@1.0000")
    t = QemuTraceTail(f)
    assert [e.kind for e in t.read_new()] == [Kind.BAR_MAPPED]
    with open(f, "a") as fh:
        fh.write("02:pci_update_mappings_del x 01:00.0 0,0x1000+0x100\n")
    evs = t.read_new()
    assert [e.kind for e in evs] == [Kind.BAR_UNMAPPED]
    assert evs[0].t_host_ns == 1_000_002_000
    assert t.read_new() == []


def test_hda_overrun_lines() -> None:
    # hw/audio/trace-events: hda_audio_overrun(const char *stream) "st %s"
    p = QemuTraceParser()
    [ev] = p.parse_line("1049@1796278670.092627:hda_audio_overrun st dac")
    assert ev.kind == Kind.AUDIO_OVERRUN and ev.device is None
    assert ev.data["stream"] == "dac" and ev.t_host_ns == 1796278670_092627000
    assert p.parse_line("1049@1796278670.092627:hda_audio_overrun stream dac adc") == []
    assert p.unparsed == 1


def test_audio_timer_delayed_lines() -> None:
    # audio/trace-events: audio_timer_delayed(int interval) "interval %d ms"
    p = QemuTraceParser()
    [ev] = p.parse_line("5154@1796279128.074825:audio_timer_delayed interval 42 ms")
    assert ev.kind == Kind.AUDIO_TIMER_LATE and ev.duration_ns == 42_000_000
    assert ev.data["interval_ms"] == 42 and ev.device is None
    assert p.parse_line("5154@1796279128.074825:audio_timer_delayed interval -3 ms") == []
    assert p.unparsed == 1
