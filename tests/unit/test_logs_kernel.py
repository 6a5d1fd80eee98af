"""``lab.logs.kernel``: dmesg, journalctl -k, syslog kern.log, /dev/kmsg as Events.

Corpus samples (tests/unit/data/logs/kernel, see PROVENANCE.md) are asserted with values
read from the samples by eye. Forms no public PCI sample showed (/dev/kmsg, dmesg -x/-r/
iso, journalctl short-iso/-precise/-full/-monotonic and its headers) are single lines
written from the tools' documented formats, inline below. The wording tables check every
format string the parser's docstring cites.
"""

from __future__ import annotations

import calendar
import codecs
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.events import Event, Kind, Source
from lab.logs.base import LogFormatError, LogInput, Tally
from lab.logs.kernel import (PARSERS, classify_message, parse_resource, slot_event_name,
                             split_line)
from lab.tracers.kernel_log import ConsoleStats, events_from_console
from tests.unit.log_parsing import parse_checked, write_input

DATA = Path(__file__).parent / "data" / "logs" / "kernel"
PARSER = PARSERS[0]
S = 1_000_000_000
RESOURCE_KINDS = (Kind.RESOURCES_ASSIGNED, Kind.RESOURCE_UNASSIGNED, Kind.RESOURCE_RELEASED)


def run(path: Path) -> tuple[list[Event], Tally]:
    return parse_checked(PARSER, path, lambda ev, _: well_formed(ev))


def run_text(tmp: Path, text: str, name: str = "in.log",
             encoding: str = "utf-8") -> tuple[list[Event], Tally]:
    return run(write_input(tmp, text, name, encoding))


def well_formed(ev: Event) -> None:
    assert ev.source in (Source.GUEST_KERNEL, Source.GUEST_UEVENT)
    assert isinstance(ev.t_host_ns, int) and 0 <= ev.t_host_ns < 2**63
    assert ev.t_guest_ns == ev.t_host_ns
    assert isinstance(ev.data["at"], str) and ev.data["at"].rsplit(":", 1)[1].isdigit()
    if "flags" in ev.data:
        assert ev.data["flags"] == sorted(set(ev.data["flags"]))
    if ev.source is Source.GUEST_UEVENT:
        assert ev.kind is Kind.UEVENT
    else:
        assert isinstance(ev.data["text"], str)
        assert ev.kind in (Kind.KERNEL_LOG, Kind.KERNEL_OOPS, Kind.SLOT_EVENT, *RESOURCE_KINDS)
    if ev.kind in RESOURCE_KINDS:
        for key in ("resource", "space", "prefetch", "start", "end", "size", "reason"):
            assert key in ev.data
    if ev.kind is Kind.SLOT_EVENT:
        assert isinstance(ev.data["slot"], str) and ev.data["event"]
    if ev.device is not None:
        assert ev.device.bdf is not None and ev.device.bdf == ev.device.bdf.lower()
    ev.dumps()                      # serialisable


def by_line(events: list[Event]) -> dict[int, Event]:
    return {int(e.data["at"].rsplit(":", 1)[1]): e for e in events}


def bdf(ev: Event) -> str | None:
    return ev.device.bdf if ev.device else None


def wall(y: int, mo: int, d: int, h: int, mi: int, s: int) -> int:
    return calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0)) * S


# ---- the corpus ---------------------------------------------------------------------

def test_ampere_5_4_old_wording() -> None:
    events, tally = run(DATA / "dmesg_5.4_ampere_old_wording.txt")
    assert tally.clock == "boot" and tally.not_understood == 0 and tally.skipped == 0
    assert len(events) == 17
    ev = by_line(events)
    a = ev[1]
    assert a.kind is Kind.RESOURCES_ASSIGNED and bdf(a) == "0007:00:03.0"
    assert a.t_host_ns == 11_109_253_000
    assert (a.data["resource"], a.data["bar"], a.data["space"]) == ("BAR 15", 15, "mem")
    assert a.data["prefetch"] is True and a.data["mem64"] is True
    assert (a.data["start"], a.data["end"], a.data["size"]) == \
        (0x7c0000200000, 0x7c00003fffff, 0x200000)
    u = ev[2]
    assert u.kind is Kind.RESOURCE_UNASSIGNED and bdf(u) == "0007:00:01.0"
    assert (u.data["resource"], u.data["space"], u.data["size"], u.data["reason"]) == \
        ("BAR 13", "io", 0x1000, "no space")
    assert u.data["start"] is None and u.data["end"] is None and u.data["prefetch"] is False
    assert ev[3].data["reason"] == "failed to assign"
    assert [e.kind for e in events].count(Kind.RESOURCE_UNASSIGNED) == 8
    # the windows pci_setup_bridge programs are information, not (re)assignments
    assert ev[11].kind is Kind.KERNEL_LOG and bdf(ev[11]) == "0007:00:01.0"
    assert ev[16].kind is Kind.KERNEL_LOG and ev[16].device is None       # pci_bus 0007:00
    assert all("driver" not in e.data for e in events)                      # pci, pci_bus


def test_nemu_qemu_guest_firmware_assignment() -> None:
    events, tally = run(DATA / "dmesg_qemu_nemu_firmware_assignment.txt")
    assert tally.skipped == 2                    # the code fence, the blank line
    ev = by_line(events)
    assert ev[3].data["text"] == "pnp: PnP ACPI init" and ev[3].t_host_ns == 21_357_000
    assert [ev[n].kind for n in (6, 7, 8)] == \
        [Kind.RESOURCE_UNASSIGNED, Kind.KERNEL_LOG, Kind.RESOURCES_ASSIGNED]
    assert ev[6].data["size"] == 0x4000 and ev[6].data["mem64"] and ev[6].data["prefetch"]
    assert (ev[8].data["start"], ev[8].data["end"]) == (0x800000000, 0x800003fff)
    assert ev[15].kind is Kind.RESOURCE_UNASSIGNED and ev[15].data["size"] == 0x1000
    assert bdf(ev[17]) == "0000:00:02.0" and ev[17].data["bar"] == 1
    assert ev[17].kind is Kind.RESOURCES_ASSIGNED
    assert (ev[17].data["start"], ev[17].data["size"]) == (0x90000000, 0x1000)


def test_nvmevirt_6x_new_wording() -> None:
    events, tally = run(DATA / "dmesg_6x_new_wording_nvmevirt.txt")
    assert tally.clock == "boot" and tally.skipped == 1
    ev = by_line(events)
    assert ev[2].kind is Kind.KERNEL_LOG                     # "... to [bus 01] add_size 1000"
    w = [ev[n] for n in (5, 6, 7)]
    assert all(e.kind is Kind.RESOURCES_ASSIGNED and e.data["resource"] == "bridge window"
               and bdf(e) == "0000:00:1c.0" and "bar" not in e.data for e in w)
    assert (w[0].data["space"], w[0].data["start"], w[0].data["end"], w[0].data["prefetch"]) \
        == ("mem", 0x90400000, 0x905fffff, False)
    assert (w[1].data["start"], w[1].data["prefetch"], w[1].data["mem64"]) == \
        (0x380000000000, True, True)
    assert (w[2].data["space"], w[2].data["start"], w[2].data["end"]) == ("io", 0x3000, 0x3fff)
    assert ev[9].kind is Kind.KERNEL_LOG                     # "  bridge window [io ...]"
    rom = ev[12]
    assert rom.kind is Kind.RESOURCE_UNASSIGNED and rom.data["resource"] == "ROM"
    assert (rom.data["size"], rom.data["prefetch"], rom.data["reason"]) == \
        (0x100000, True, "no space")
    assert ev[13].data["reason"] == "failed to assign"
    assert ev[16].data["resource"] == "bridge window" and bdf(ev[16]) == "0000:03:03.0"
    assert ev[16].t_host_ns == 1_449_319_000


def test_litepcie_cut_stamp_and_probe_failure() -> None:
    events, tally = run(DATA / "dmesg_6x_litepcie_probe_failed.txt")
    ev = by_line(events)
    first = ev[2]                                # " 240.420747] pcieport ..." lost its "["
    assert first.t_host_ns == 240_420_747_000 and "stamp-cut" in first.data["flags"]
    assert first.kind is Kind.KERNEL_LOG and bdf(first) == "0000:02:00.2"
    assert ev[3].kind is Kind.KERNEL_LOG                     # "requires relaxed alignment"
    bar = ev[6]
    assert bar.kind is Kind.RESOURCE_UNASSIGNED and bdf(bar) == "0000:04:00.0"
    assert (bar.data["resource"], bar.data["bar"], bar.data["size"]) == ("BAR 0", 0, 0x1000000)
    probe = ev[11]
    assert probe.kind is Kind.KERNEL_LOG and bdf(probe) == "0000:04:00.0"
    assert probe.data["driver"] == "litepcie" and probe.data["probe_error"] == -5
    assert ev[10].data["driver"] == "litepcie" and "probe_error" not in ev[10].data
    assert ev[12].t_host_ns == 260_271_176_000


def test_haos_thunderbolt_pciehp_slot_events() -> None:
    events, tally = run(DATA / "dmesg_pciehp_thunderbolt_haos.txt")
    ev = by_line(events)
    cp, lu = ev[4], ev[5]
    assert cp.kind is Kind.SLOT_EVENT and cp.data["event"] == "card-present"
    assert cp.data["slot"] == "1" and bdf(cp) == "0000:03:01.0"
    assert cp.t_host_ns == 187673_440677_000
    assert lu.kind is Kind.SLOT_EVENT and lu.data["event"] == "link-up"
    assert "driver" not in cp.data                            # pcieport is the port's
    assert ev[2].device is None and ev[2].kind is Kind.KERNEL_LOG   # thunderbolt 0-1
    assert bdf(ev[6]) == "0000:05:00.0"


def test_dmesg_T_localised_pciehp() -> None:
    events, tally = run(DATA / "dmesg_T_ptBR_pciehp.txt")
    assert tally.clock == "local"
    ev = by_line(events)
    assert ev[2].t_host_ns == wall(2017, 9, 19, 6, 1, 41)            # "Ter Set 19" = Tue Sep 19
    slot = ev[3]
    assert slot.kind is Kind.SLOT_EVENT and slot.data == {**slot.data, "slot": "6",
                                                          "event": "link-down"}
    assert bdf(slot) == "0000:02:05.0"                       # the service device names the port
    assert bdf(ev[9]) == "0000:08:00.0"                      # a BDF inside the message
    assert ev[10].t_host_ns == wall(2017, 9, 19, 6, 1, 42)
    assert all("flags" not in e.data for e in events)


def test_journalctl_short_fcos() -> None:
    events, tally = run(DATA / "journalctl_k_fcos.txt")
    assert tally.clock == "local" and len(events) == 16
    assert any("without a year" in p for p in tally.problems)
    ev = by_line(events)
    assert ev[2].t_host_ns == wall(1970, 9, 23, 1, 40, 2)
    assert ev[2].data["flags"] == ["no-year"]
    assert ev[2].data["text"] == "pcieport 0000:00:02.5: PME: Signaling with IRQ 37"
    assert bdf(ev[12]) == "0000:00:1f.2" and ev[12].data["driver"] == "ahci"
    assert ev[15].data["text"] == "ahci 0000:00:1f.2: flags: 64bit ncq only "
    assert ev[16].device is None and ev[16].data["text"] == "scsi host0: ahci"


def test_journalctl_short_proxmox_aer() -> None:
    events, tally = run(DATA / "journalctl_k_pve_aer.txt")
    assert tally.skipped == 0 and len(events) == 12
    ev = by_line(events)
    assert ev[1].data["driver"] == "xhci_hcd" and bdf(ev[1]) == "0000:97:00.0"
    assert ev[7].data["text"] == "pcieport 0000:80:1b.4:    [21] ACSViol                (First)"
    assert ev[9].data["driver"] == "thunderbolt" and bdf(ev[9]) == "0000:84:00.0"
    assert {e.t_host_ns for e in events} == {wall(1970, 9, 22, 9, 59, 9)}


def test_untimed_pciehp_surface() -> None:
    events, tally = run(DATA / "untimed_pciehp_surface.txt")
    assert tally.clock == "none"
    assert [(e.kind, e.data.get("event")) for e in events] == [
        (Kind.SLOT_EVENT, "card-not-present"), (Kind.SLOT_EVENT, "card-present"),
        (Kind.KERNEL_LOG, None)]
    assert all(bdf(e) == "0000:00:1c.4" and e.t_host_ns == 0 and e.data["flags"] == ["untimed"]
               for e in events)
    assert events[0].data["slot"] == ""


def test_untimed_indented_notime_new_wording() -> None:
    events, tally = run(DATA / "untimed_notime_new_wording_rhel_edge.txt")
    assert tally.clock == "none" and len(events) == 11          # no line folded into another
    assert events[0].kind is Kind.KERNEL_LOG and events[0].device is None
    rest = events[1:]
    assert all(e.kind is Kind.RESOURCE_UNASSIGNED and e.data["resource"] == "bridge window"
               and e.data["space"] == "io" and e.data["size"] == 0x1000
               and e.data["reason"] == "failed to assign" for e in rest)
    assert [bdf(e) for e in rest][:2] == ["0000:00:16.4", "0000:00:16.5"]
    assert bdf(rest[-1]) == "0000:00:17.5"


def test_openwrt_logread_prefers_boot_stamp() -> None:
    events, tally = run(DATA / "openwrt_logread_lede.txt")
    assert tally.clock == "boot" and len(events) == 11
    e = events[0]
    assert e.t_host_ns == 186_275_000 and e.data["wall"] == "2020-03-12T20:49:18"
    assert (e.data["level"], e.data["facility"]) == (6, "kern")
    assert (e.data["resource"], e.data["space"], e.data["size"], e.data["reason"]) == \
        ("BAR 7", "io", 0x1000, "no space")
    assert [x.data["reason"] for x in events[:4]] == \
        ["no space", "failed to assign", "no space", "failed to assign"]
    assert bdf(events[-1]) == "0000:00:16.3"


def test_logread_quoted_probe_non_pci_device() -> None:
    events, tally = run(DATA / "logread_quoted_probe_libwrt.txt")
    ev = by_line(events)
    first = ev[1]                                 # quoted with "> "
    assert first.t_host_ns == 1_060_511_000 and first.data["level"] == 3
    assert first.data["driver"] == "Qualcomm QCA8075" and first.data["probe_error"] == -22
    assert first.device is None                   # 90000.mdio-1:18 is no PCI function
    assert ev[2].kind is Kind.KERNEL_LOG and bdf(ev[2]) == "0000:00:00.0"
    assert ev[2].data["level"] == 6


def test_socklog_tab_indented_collector_prefix() -> None:
    events, tally = run(DATA / "socklog_svlogd_zfs.txt")
    assert tally.clock == "boot" and len(events) == 13
    e = events[0]
    assert e.t_host_ns == 520_776_000 and e.data["wall"] == "2015-10-01T18:25:37.34135"
    assert e.data["level"] == 7 and bdf(e) == "0000:00:11.4"
    assert events[10].data["level"] == 6                      # kern.info
    assert events[10].data["text"] == "pci 0000:00:14.0: System wakeup disabled by ACPI"


def test_prompt_line_and_fences_skipped() -> None:
    events, tally = run(DATA / "dmesg_grep_prompt_nanopi.txt")
    assert tally.skipped == 3 and tally.used == 4 and len(events) == 4
    bars = [e for e in events if e.kind is Kind.RESOURCE_UNASSIGNED]
    assert [(bdf(e), e.data["bar"], e.data["size"], e.data["reason"]) for e in bars] == [
        ("0002:00:00.0", 0, 0x40000000, "failed to assign"),
        ("0002:00:00.0", 1, 0x40000000, "failed to assign")]


def test_printk_caller_id() -> None:
    events, tally = run(DATA / "dmesg_caller_id_qcom.txt")
    ev = by_line(events)
    p = ev[6]
    assert p.data["caller"] == "T186" and p.t_host_ns == 9_395_839_000
    assert p.data["driver"] == "ath11k_pci" and p.data["probe_error"] == -110
    assert bdf(p) == "0000:01:00.0"
    assert ev[2].data["text"] == "hub 1-1:1.0: USB hub found"


def test_pciehp_slot_names_with_dash() -> None:
    events, tally = run(DATA / "dmesg_pciehp_talos.txt")
    slots = [e for e in events if e.kind is Kind.SLOT_EVENT]
    assert [(e.data["slot"], e.data["event"], bdf(e)) for e in slots] == [
        ("0-11", "link-up", "0000:00:11.3"), ("0-12", "link-up", "0000:00:11.4"),
        ("0-13", "link-up", "0000:00:11.5")]
    assert by_line(events)[2].kind is Kind.KERNEL_LOG          # "Slot #0 AttnBtn+ ..."


def test_syslog_facility_boot_stamp_no_year() -> None:
    events, tally = run(DATA / "syslog_busybox_openccu.txt")
    assert tally.clock == "boot" and tally.problems == []
    ev = by_line(events)
    assert ev[1].t_host_ns == 549_948_000 and ev[1].data["wall"] == "--09-23T17:48:53"
    a = ev[9]
    assert a.kind is Kind.RESOURCES_ASSIGNED and bdf(a) == "0000:00:00.0" and a.data["bar"] == 8
    assert (a.data["start"], a.data["end"], a.data["size"]) == \
        (0x1f00000000, 0x1f005fffff, 0x600000)
    assert ev[8].device is None                                # pci_bus 0000:01


def test_cant_claim_no_compatible_window() -> None:
    events, tally = run(DATA / "dmesg_cant_claim_surface.txt")
    (claim,) = [e for e in events if e.kind is Kind.RESOURCE_UNASSIGNED]
    assert bdf(claim) == "0000:00:1f.5" and claim.t_host_ns == 456_719_000
    assert (claim.data["bar"], claim.data["start"], claim.data["end"]) == \
        (0, 0xfe010000, 0xfe010fff)
    assert claim.data["reason"] == "can't claim"
    assert claim.data["detail"] == "no compatible bridge window"
    assert by_line(events)[2].data["text"] == "pci 0000:00:02.0: vgaarb: bridge control possible"


@pytest.mark.parametrize("path", sorted(DATA.glob("*.txt")), ids=lambda p: p.name)
def test_every_sample_sniffed_and_understood(path: Path) -> None:
    events, tally = run(path)
    assert PARSER.sniff(LogInput(path)) >= 30
    assert tally.not_understood == 0 and events


def test_other_formats_not_claimed() -> None:
    others = [p for d in ("pnputil", "setupapi", "winevent")
              for p in (DATA.parent / d).glob("*") if p.suffix != ".md"]
    for p in others:
        assert PARSER.sniff(LogInput(p)) < 30, p.name


# ---- the kernel's wordings ----------------------------------------------------------

@pytest.mark.parametrize("body,kind,reason,resource", [
    # drivers/pci/setup-res.c, 4.x .. 6.7
    ("BAR 14: no space for [mem size 0x04000000]", Kind.RESOURCE_UNASSIGNED, "no space", "BAR 14"),
    ("BAR 14: failed to assign [mem size 0x04000000]", Kind.RESOURCE_UNASSIGNED,
     "failed to assign", "BAR 14"),
    ("BAR 0: assigned [mem 0xfe800000-0xfe803fff]", Kind.RESOURCES_ASSIGNED, "assigned", "BAR 0"),
    ("BAR 7: releasing [io  0x1000-0x1fff]", Kind.RESOURCE_RELEASED, "releasing", "BAR 7"),
    ("BAR 13: assigned [io  0x1000-0x1fff]", Kind.RESOURCES_ASSIGNED, "assigned", "BAR 13"),
    ("BAR 6: can't assign [mem size 0x00040000 pref] (bogus alignment)",
     Kind.RESOURCE_UNASSIGNED, "bogus alignment", "BAR 6"),
    ("BAR 15: reassigned [mem 0x80000000-0x8fffffff 64bit pref] (expanded by 0x8000000)",
     Kind.RESOURCES_ASSIGNED, "reassigned", "BAR 15"),
    ("BAR 15: [mem 0x80000000-0x87ffffff 64bit pref] (failed to expand by 0x8000000)",
     Kind.RESOURCE_UNASSIGNED, "failed to expand", "BAR 15"),
    ("BAR 2: [mem 0x00000000-0x0000ffff] has bogus alignment", Kind.RESOURCE_UNASSIGNED,
     "bogus alignment", "BAR 2"),
    ("can't claim BAR 0 [mem 0xfe800000-0xfe803fff]: address conflict with PCI Bus 0000:00 "
     "[mem 0xfe000000-0xfe7fffff]", Kind.RESOURCE_UNASSIGNED, "can't claim", "BAR 0"),
    ("can't enable device: BAR 0 [mem 0xfe800000-0xfe803fff] not claimed",
     Kind.RESOURCE_UNASSIGNED, "not claimed", "BAR 0"),
    ("disabling BAR 9: [mem 0x00000000-0x3fffffffff 64bit pref] (bad alignment 0x4000000000)",
     Kind.RESOURCE_UNASSIGNED, "bad alignment", "BAR 9"),
    # drivers/pci/setup-bus.c
    ("resource 14 [mem 0xfe800000-0xfe8fffff] released", Kind.RESOURCE_RELEASED, "released",
     "BAR 14"),
    # 6.8+ (pci_resource_name)
    ("bridge window [mem size 0x04000000]: can't assign; no space", Kind.RESOURCE_UNASSIGNED,
     "no space", "bridge window"),
    ("bridge window [mem size 0x04000000]: failed to assign", Kind.RESOURCE_UNASSIGNED,
     "failed to assign", "bridge window"),
    ("BAR 0 [mem size 0x00004000]: can't assign; no space", Kind.RESOURCE_UNASSIGNED,
     "no space", "BAR 0"),
    ("BAR 0 [mem 0xfe800000-0xfe803fff]: assigned", Kind.RESOURCES_ASSIGNED, "assigned", "BAR 0"),
    ("bridge window [mem 0xfe800000-0xfe8fffff]: assigned", Kind.RESOURCES_ASSIGNED, "assigned",
     "bridge window"),
    ("bridge window [io  0x1000-0x1fff]: releasing", Kind.RESOURCE_RELEASED, "releasing",
     "bridge window"),
    ("VF BAR 2 [mem size 0x00200000 64bit pref]: can't assign; no space",
     Kind.RESOURCE_UNASSIGNED, "no space", "VF BAR 2"),
    ("ROM [mem size 0x00100000 pref]: failed to assign", Kind.RESOURCE_UNASSIGNED,
     "failed to assign", "ROM"),
    ("BAR 0 [mem 0xfe800000-0xfe803fff]: reassigned; expanded by 0x100000",
     Kind.RESOURCES_ASSIGNED, "reassigned", "BAR 0"),
    ("BAR 0 [mem size 0x00004000]: can't assign; bogus alignment", Kind.RESOURCE_UNASSIGNED,
     "bogus alignment", "BAR 0"),
    ("BAR 0 [mem 0xfe800000-0xfe803fff]: can't claim; no compatible bridge window",
     Kind.RESOURCE_UNASSIGNED, "can't claim", "BAR 0"),
    ("BAR 0 [mem 0xfe800000-0xfe803fff]: not assigned; can't enable device",
     Kind.RESOURCE_UNASSIGNED, "not assigned", "BAR 0"),
    ("bridge window [mem 0xfe800000-0xfe8fffff]: failed to add optional 200000",
     Kind.RESOURCE_UNASSIGNED, "failed to add optional", "bridge window"),
    ("CardBus bridge window 0 [io  0x1000-0x10ff]: assigned", Kind.RESOURCES_ASSIGNED,
     "assigned", "CardBus bridge window 0"),
])
def test_resource_wordings(body: str, kind: Kind, reason: str, resource: str) -> None:
    info = classify_message(f"pcieport 0000:00:1c.0: {body}")
    assert info is not None and info.kind is kind
    assert info.data["reason"] == reason and info.data["resource"] == resource
    assert info.device is not None and info.device.bdf == "0000:00:1c.0"
    if resource.startswith(("BAR", "VF BAR")):
        assert info.data["bar"] == int(resource.rsplit(" ", 1)[1])
    else:
        assert "bar" not in info.data


@pytest.mark.parametrize("body", [
    "BAR 4: trying firmware assignment [mem 0x800000000-0x800003fff 64bit pref]",
    "BAR 0: trying firmware assignment [mem 0xfe800000-0xfe803fff]",
    "BAR 0 [mem 0xfe800000-0xfe803fff]: conflicts with PCI mem [mem 0xfe000000-0xfeffffff]",
    "BAR 0 [mem 0xfe800000-0xfe803fff]",                       # 6.x enumeration
    "reg 0x10: [mem 0xfe800000-0xfe803fff]",                   # 4.x/5.x enumeration
    "  bridge window [mem 0xfe800000-0xfe8fffff]",              # pci_setup_bridge
    "bridge window [io  0x1000-0x0fff] to [bus 01] add_size 1000",
    "BAR 2: assigned to efifb",
])
def test_resource_lookalikes_stay_log(body: str) -> None:
    info = classify_message(f"pci 0000:00:02.0: {body}")
    assert info is not None and info.kind is Kind.KERNEL_LOG


def test_resource_fields() -> None:
    assert parse_resource("[mem 0xfe800000-0xfe803fff 64bit pref]") == {
        "space": "mem", "prefetch": True, "mem64": True, "start": 0xfe800000,
        "end": 0xfe803fff, "size": 0x4000, "range": "[mem 0xfe800000-0xfe803fff 64bit pref]"}
    assert parse_resource("[io  size 0x1000]")["size"] == 0x1000
    assert parse_resource("[io  0x1000-0x0fff]")["size"] == 0          # an empty window
    assert parse_resource("[bus 01-02]")["start"] == 1
    assert parse_resource("[mem 0x00000000]")["size"] == 1
    assert parse_resource("no resource") == {}


def test_assign_retry() -> None:
    for msg in ("PCI: No. 2 try to assign unassigned res",
                "pci_bus 0000:00: No. 3 try to assign unassigned res"):
        info = classify_message(msg)
        assert info is not None and info.kind is Kind.KERNEL_LOG
        assert info.data["assign_try"] == int(msg.split("No. ")[1][0])


@pytest.mark.parametrize("msg,slot,event", [
    ("pciehp 0000:00:1c.0:pcie004: Slot(1): Card present", "1", "card-present"),
    ("pciehp 0000:00:1c.0:pcie004: Slot(1): Card not present", "1", "card-not-present"),
    ("pcieport 0000:00:1c.0: pciehp: Slot(1): Link Up", "1", "link-up"),
    ("pcieport 0000:00:1c.0: pciehp: Slot(1): Link Down", "1", "link-down"),
    ("pciehp 0000:00:1c.0:pcie004: Slot(1): Attention button pressed", "1",
     "attention-button-pressed"),
    ("pciehp 0000:00:1c.0:pcie004: Slot(1): Powering off due to button press", "1",
     "powering-off-due-to-button-press"),
    ("pciehp 0000:00:1c.0:pcie004: Slot(1) Powering on due to button press", "1",
     "powering-on-due-to-button-press"),
    ("pcieport 0000:00:1c.0: pciehp: Slot(1): Button press: will power off in 5 sec", "1",
     "powering-off-due-to-button-press"),
    ("pciehp 0000:00:1c.0:pcie004: Slot(1): Button cancel", "1", "button-cancel"),
    ("pcieport 0000:00:1c.0: pciehp: Slot(1): Button press: canceling request to power on",
     "1", "button-cancel"),
    ("pciehp 0000:02:05.0:pcie24: slot(6): Link Down event", "6", "link-down"),
    ("pciehp 0000:00:1c.0:pcie04: Card present on Slot(2)", "2", "card-present"),
    ("pcieport 0000:00:1c.0: pciehp: Slot(1): Power fault", "1", "power-fault"),
])
def test_pciehp_wordings(msg: str, slot: str, event: str) -> None:
    info = classify_message(msg)
    assert info is not None and info.kind is Kind.SLOT_EVENT
    assert info.data["slot"] == slot and info.data["event"] == event
    assert info.device is not None and info.device.bdf == "0000:" + msg.split(" 0000:")[1][:7]
    assert "driver" not in info.data


def test_slot_event_name_bounded() -> None:
    assert slot_event_name("x" * 500) == "x" * 48
    assert slot_event_name("!!!") == "unknown"


@pytest.mark.parametrize("msg,driver,err,dev", [
    ("snd_hda_intel: probe of 0000:01:00.1 failed with error -22", "snd_hda_intel", -22,
     "0000:01:00.1"),
    ("snd_hda_intel 0000:01:00.1: probe with driver snd_hda_intel failed with error -22",
     "snd_hda_intel", -22, "0000:01:00.1"),
    ("amd_hsmp: probe of amd_hsmp failed with error -16", "amd_hsmp", -16, None),
])
def test_probe_failures(msg: str, driver: str, err: int, dev: str | None) -> None:
    info = classify_message(msg)
    assert info is not None and info.kind is Kind.KERNEL_LOG
    assert info.data["driver"] == driver and info.data["probe_error"] == err
    assert (info.device.bdf if info.device else None) == dev


def test_driver_only_for_drivers() -> None:
    for prefix, driver in (("pci", None), ("pcieport", None), ("snd_hda_intel", "snd_hda_intel"),
                           ("vfio-pci", "vfio-pci")):
        info = classify_message(f"{prefix} 0000:01:00.0: enabling device (0000 -> 0002)")
        assert info is not None and info.data.get("driver") == driver


def test_oops_and_uevent_and_sync() -> None:
    oops = classify_message("BUG: kernel NULL pointer dereference, address: 0000000000000008")
    assert oops is not None and oops.kind is Kind.KERNEL_OOPS
    ue = classify_message("rebalab-uevent ACTION=unbind DEVPATH=/devices/pci0000:00/0000:00:1c.0/"
                          "0000:01:00.0 SUBSYSTEM=pci DRIVER=snd_hda_intel")
    assert ue is not None and ue.source is Source.GUEST_UEVENT and ue.kind is Kind.UEVENT
    assert ue.data["action"] == "unbind" and ue.device is not None
    assert ue.device.bdf == "0000:01:00.0"
    assert classify_message("rebalab-sync 7f3a") is None


# ---- line forms (documented formats, inline) ----------------------------------------

@pytest.mark.parametrize("line,boot_ns,text", [
    ("[    1.234567] pci 0000:00:1c.0: x", 1_234_567_000, "pci 0000:00:1c.0: x"),
    ("<6>[    1.234567] msg", 1_234_567_000, "msg"),                              # dmesg -r
    ("kern  :info  : [    1.234567] msg", 1_234_567_000, "msg"),                  # dmesg -x
    ("[    1.234567 <    0.000123>] msg", 1_234_567_000, "msg"),                  # dmesg -d
    ("[    1.234567][    T1] msg", 1_234_567_000, "msg"),                         # caller id
    ("[    1.234567] myhost kernel: msg", 1_234_567_000, "msg"),       # short-monotonic
    ("6,1234,5678901,-;msg", 5_678_901_000, "msg"),                               # /dev/kmsg
    ("6,1234,5678901,-,caller=T1;a\\x5cb", 5_678_901_000, "a\\b"),
    ("kernel: [    1.234567] msg", 1_234_567_000, "msg"),
    ("$ [    1.234567] msg", 1_234_567_000, "msg"),
    ("node1 | 2026-01-01 [    1.234567] msg", 1_234_567_000, "msg"),          # collector
])
def test_boot_stamped_forms(line: str, boot_ns: int, text: str) -> None:
    p = split_line(line)
    assert p.form == "record" and p.boot_ns == boot_ns and p.text == text


def test_levels_and_facilities() -> None:
    assert (split_line("<6>[    1.0] x").level, split_line("<6>[    1.0] x").facility) == \
        (6, "kern")
    assert split_line("<14>[    1.0] x").facility == "user"
    p = split_line("kern  :err   : [    1.0] x")
    assert (p.level, p.facility) == (3, "kern")
    assert split_line("3,1,2,-;x").level == 3


@pytest.mark.parametrize("line,expect_ns,clock", [
    ("2026-12-02T04:23:38+0000 host kernel: msg", (2026, 12, 2, 4, 23, 38), "utc"),
    ("2026-12-02T05:23:38+01:00 host kernel: msg", (2026, 12, 2, 4, 23, 38), "utc"),
    ("2026-12-02T04:23:38,123456+00:00 msg", (2026, 12, 2, 4, 23, 38), "utc"),  # dmesg iso
    ("Mon 2026-12-02 04:23:38 UTC host kernel: msg", (2026, 12, 2, 4, 23, 38), "utc"),
    ("Mon 2026-12-02 04:23:38 CET host kernel: msg", (2026, 12, 2, 4, 23, 38), "local"),
    ("[Mon Dec  2 04:23:38 2026] msg", (2026, 12, 2, 4, 23, 38), "local"),
    ("[Mi Dez  2 04:23:38 2026] msg", (2026, 12, 2, 4, 23, 38), "local"),
])
def test_wall_clock_forms(line: str, expect_ns: tuple[int, ...], clock: str) -> None:
    p = split_line(line)
    assert p.form == "record" and p.text == "msg" and p.boot_ns is None
    assert p.wall is not None and p.wall.clock == clock
    ns = p.wall.to_ns()
    assert ns is not None and ns // S == calendar.timegm(expect_ns + (0, 0, 0))


@pytest.mark.parametrize("line,form", [
    ("", "blank"), ("   ", "blank"),
    ("-- Boot 7fb3d7b0f7f5475fa7b1c0c5a1f1b0a7 --", "marker"),
    ("-- No entries --", "marker"),
    ("-- Logs begin at Wed 2019-12-04 08:28:49 CET, end at Thu 2019-12-05 15:08:58 CET. --",
     "marker"),
    ("```", "fence"), ("```text", "fence"),
    ("$ dmesg -T | grep -i pci", "prompt"),
    ("root@pve:~# journalctl -k -b -1", "prompt"),
    ("[user@host ~]$ sudo dmesg", "prompt"),
    ("...", "elision"), ("[...]", "elision"),
    ("Dec  2 04:23:38 host systemd[1]: Started Session 2.", "nonkernel"),
    ("Mar 12 20:49:18 host daemon.info dnsmasq[1234]: started", "nonkernel"),
    ("Dec  2 04:23:38 !!!", "garbled"),
])
def test_non_kernel_lines(line: str, form: str) -> None:
    assert split_line(line).form == form


def test_reltime_stamps_are_untimed() -> None:
    p = split_line("[  +0,000235] pci 0000:07:00.0: supports D1 D2")
    assert p.boot_ns is None and p.wall is None and "reltime" in p.flags
    assert p.text == "pci 0000:07:00.0: supports D1 D2"


# ---- files: clocks, headers, continuations ------------------------------------------

@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


def test_journal_header_year_and_rollover(tmp: Path) -> None:
    events, tally = run_text(tmp, (
        "-- Logs begin at Sun 2019-12-29 08:28:49 CET, end at Thu 2020-01-02 15:08:58 CET. --\n"
        "Dec 31 23:59:59 host kernel: pci 0000:00:1c.0: BAR 0: assigned [mem 0xfe800000-0xfe803fff]\n"
        "Jan 01 00:00:01 host kernel: pcieport 0000:00:1c.0: pciehp: Slot(1): Link Down\n"))
    assert tally.clock == "local" and tally.problems == []
    assert [e.t_host_ns for e in events] == [wall(2019, 12, 31, 23, 59, 59),
                                             wall(2020, 1, 1, 0, 0, 1)]
    assert all("flags" not in e.data for e in events)


def test_boot_markers_and_clock_restart(tmp: Path) -> None:
    events, tally = run_text(tmp, (
        "-- Boot aaaa --\n"
        "[    5.000000] host kernel: a\n"
        "-- Boot bbbb --\n"
        "[    1.000000] host kernel: b\n"
        "[    0.500000] host kernel: c\n"              # no marker: only a restart
        "[  100.000000] host kernel: d\n"))
    assert [e.data["boot"] for e in events] == [0, 1, 1, 1]
    events, _ = run_text(tmp, "[  100.0] a\n[    0.1] b\n[    0.2] c\n", "b.log")
    assert [e.data["boot"] for e in events] == [0, 1, 1]


def test_mixed_clocks_use_boot(tmp: Path) -> None:
    events, tally = run_text(tmp, (
        "Dec  2 04:23:38 host kernel: pci 0000:00:1c.0: early, no printk stamp\n"
        "[    1.500000] pci 0000:00:1c.0: BAR 0: assigned [mem 0xfe800000-0xfe803fff]\n"
        "Dec  2 04:23:39 host kernel: [    2.000000] late\n"))
    assert tally.clock == "boot"
    first, second, third = events
    assert first.t_host_ns == 0 and "untimed" in first.data["flags"]
    assert first.data["wall"] == "--12-02T04:23:38"
    assert second.t_host_ns == 1_500_000_000 and third.t_host_ns == 2 * S
    assert third.data["wall"] == "--12-02T04:23:39"
    assert len(tally.problems) == 1 and "line 1" in tally.problems[0]
    assert "early" not in tally.problems[0]                      # no content in problems


def test_continuation_lines_join_their_message(tmp: Path) -> None:
    events, tally = run_text(tmp, (
        "[   10.000000] WARNING: CPU: 0 PID: 1 at drivers/pci/setup-res.c:123\n"
        "               Modules linked in: snd_hda_intel\n"
        "               Call Trace:\n"
        "[   10.100000] pci 0000:01:00.0: new\n"
        "    pci 0000:01:00.1: an indented device message is its own record\n"))
    assert len(events) == 3 and tally.used == 5
    w = events[0]
    assert w.kind is Kind.KERNEL_OOPS
    assert w.data["lines"] == ["WARNING: CPU: 0 PID: 1 at drivers/pci/setup-res.c:123",
                               "Modules linked in: snd_hda_intel", "Call Trace:"]
    assert w.data["text"] == "\n".join(w.data["lines"])
    assert bdf(events[2]) == "0000:01:00.1" and "untimed" in events[2].data["flags"]
    assert events[2].t_host_ns == 10_100_000_000


def test_untimed_continuation_turns_log_into_oops(tmp: Path) -> None:
    events, _ = run_text(tmp, "kernel message\n  Call Trace:\n   dump_stack+0x5c/0x80\n")
    (ev,) = events
    assert ev.kind is Kind.KERNEL_OOPS and len(ev.data["lines"]) == 3


def test_continuation_lines_are_bounded(tmp: Path) -> None:
    events, tally = run_text(tmp, "[    1.0] head\n" + " cont\n" * 500)
    (ev,) = events
    assert len(ev.data["lines"]) == 201 and ev.data["lines_dropped"] == 300
    assert "truncated" in ev.data["flags"] and tally.used == 501


def test_kmsg_records_with_dictionary(tmp: Path) -> None:
    events, tally = run_text(tmp, (
        "6,339,5140900,-;pcieport 0000:00:1c.0: BAR 14: assigned [mem 0xfe800000-0xfe8fffff]\n"
        " SUBSYSTEM=pci\n"
        " DEVICE=+pci:0000:00:1c.0\n"
        "3,340,5140950,-;snd_hda_intel: probe of 0000:01:00.1 failed with error -22\n"))
    assert tally.clock == "boot" and tally.used == 4
    a, p = events
    assert a.kind is Kind.RESOURCES_ASSIGNED and a.t_host_ns == 5_140_900_000
    assert a.data["kmsg"] == {"SUBSYSTEM": "pci", "DEVICE": "+pci:0000:00:1c.0"}
    assert a.data["level"] == 6
    assert p.data["probe_error"] == -22 and p.data["level"] == 3 and bdf(p) == "0000:01:00.1"


def test_uevent_and_sync_lines_in_a_file(tmp: Path) -> None:
    events, tally = run_text(tmp, (
        "[   12.000000] rebalab-sync 41\n"
        "[   12.100000] rebalab-uevent ACTION=bind DEVPATH=/devices/pci0000:00/0000:00:1c.0/"
        "0000:01:00.0 SUBSYSTEM=pci DRIVER=snd_hda_intel\n"))
    assert tally.skipped == 1
    (ev,) = events
    assert ev.source is Source.GUEST_UEVENT and ev.data["DRIVER"] == "snd_hda_intel"
    assert ev.t_host_ns == 12_100_000_000 and bdf(ev) == "0000:01:00.0"


def test_garbled_and_control_lines_not_understood(tmp: Path) -> None:
    events, tally = run_text(tmp, "[    1.0] ok\nDec  2 04:23:38 !!!\nbad\x01line\n-----\n")
    assert tally.not_understood == 2 and tally.skipped == 1 and len(events) == 1
    assert [n for n, _ in tally.samples] == [2, 3]


# ---- edge cases built from a sample --------------------------------------------------

def _kinds_times(events: list[Event]) -> list[tuple[Kind, int, str | None]]:
    return [(e.kind, e.t_host_ns, bdf(e)) for e in events]


def test_crlf_utf16_quoting_indentation_same_events(tmp: Path) -> None:
    text = (DATA / "dmesg_6x_new_wording_nvmevirt.txt").read_text()
    base, _ = run(DATA / "dmesg_6x_new_wording_nvmevirt.txt")
    want = _kinds_times(base)
    crlf, _ = run_text(tmp, text.replace("\n", "\r\n"), "crlf.log")
    utf16, t16 = run_text(tmp, "\ufeff" + text, "u16.log", "utf-16-le")
    quoted, _ = run_text(tmp, "".join("> " + ln for ln in text.splitlines(True)), "q.log")
    nested, _ = run_text(tmp, "".join("> > " + ln for ln in text.splitlines(True)), "qq.log")
    indented, _ = run_text(tmp, "".join("    " + ln for ln in text.splitlines(True)), "i.log")
    assert t16.encoding == "utf-16-le-bom"
    for got in (crlf, utf16, quoted, nested, indented):
        assert _kinds_times(got) == want


def test_truncated_last_record(tmp: Path) -> None:
    text = (DATA / "dmesg_5.4_ampere_old_wording.txt").read_text()
    cut = text[:text.index("no space for", 200) + 5]          # ends "BAR 13: no sp", no newline
    events, tally = run_text(tmp, cut)
    last = events[-1]
    assert last.kind is Kind.KERNEL_LOG and last.data["text"].endswith("BAR 13: no sp")
    assert tally.not_understood == 0


def test_empty_file(tmp: Path) -> None:
    events, tally = run_text(tmp, "")
    assert events == [] and tally.lines == 0 and tally.clock == "none"
    assert PARSER.sniff(LogInput(tmp / "in.log")) == 0


def test_binary_input_is_not_this_format(tmp: Path) -> None:
    p = tmp / "bin.log"
    p.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    assert PARSER.sniff(LogInput(p)) == 0
    with pytest.raises(LogFormatError) as err:
        list(PARSER.parse(LogInput(p), Tally(str(p), PARSER.name)))
    assert "bin.log" in str(err.value)


def test_very_long_line_is_cut_and_fast(tmp: Path) -> None:
    # 200k characters without a line end: the reader cuts it, the parser sees 16k at most
    body = "pci 0000:00:1c.0: BAR 0: assigned [mem " + "0" * 200_000
    events, tally = run_text(tmp, "[    1.000000] " + body + "\n[    2.000000] next\n")
    assert tally.cut_lines == 1 and tally.lines == 2 and len(events) == 2
    assert events[0].kind is Kind.KERNEL_LOG and events[1].t_host_ns == 2 * S
    many, tally2 = run_text(tmp, "x" * 200_000, "plain.log")           # no stamp at all
    assert tally2.balanced and len(many) == 1


# ---- the live console ----------------------------------------------------------------

def test_console_events_and_stats() -> None:
    lines = [
        (1_000, "[    5.100000] pci 0000:01:00.0: BAR 0: assigned [mem 0xfe800000-0xfe803fff]"),
        (2_000, "[    5.200000] rebalab-sync tok"),
        (3_000, "[  OK  ] Started Journal Service."),
        (4_000, ""),
        (5_000, "<4>[    5.300000] pcieport 0000:00:1c.0: pciehp: Slot(1): Link Down"),
        (6_000, "[    5.400000] rebalab-uevent ACTION=bind DEVPATH=/devices/pci0000:00/0000:00:1c.0/"
                "0000:01:00.0 SUBSYSTEM=pci"),
        (7_000, "login: root"),
        (8_000, "[    5.500000] Oops: 0002 [#1] PREEMPT SMP"),
    ]
    stats = ConsoleStats()
    out = events_from_console(lines, stats)
    assert (stats.lines, stats.events, stats.unstamped, stats.blank, stats.sync) == (8, 4, 2, 1, 1)
    assert [e.kind for e in out] == [Kind.RESOURCES_ASSIGNED, Kind.SLOT_EVENT, Kind.UEVENT,
                                     Kind.KERNEL_OOPS]
    assert [(e.t_host_ns, e.t_guest_ns, e.data["h_recv_ns"]) for e in out] == [
        (1_000, 5_100_000_000, 1_000), (5_000, 5_300_000_000, 5_000),
        (6_000, 5_400_000_000, 6_000), (8_000, 5_500_000_000, 8_000)]
    assert out[0].data["text"] == "pci 0000:01:00.0: BAR 0: assigned [mem 0xfe800000-0xfe803fff]"
    assert out[1].data["level"] == 4 and out[1].data["event"] == "link-down"
    assert out[2].data["action"] == "bind" and out[2].source is Source.GUEST_UEVENT
    assert events_from_console(lines) == out                     # stats are optional


# ---- properties ---------------------------------------------------------------------

def _check_any(data: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="klog-prop-") as d:
        p = Path(d) / "in.log"
        p.write_bytes(data)
        try:
            inp = LogInput(p)
            score = PARSER.sniff(inp)
            assert 0 <= score <= 100
            tally = Tally(str(p), PARSER.name)
            events = list(PARSER.parse(inp, tally))
        except LogFormatError:
            return
        assert tally.balanced
        assert tally.events == len(events)
        assert tally.clock in ("boot", "utc", "local", "none")
        for ev in events:
            well_formed(ev)


_ALPHABET = st.sampled_from([
    "[    1.234567] ", "[", "]", " ", "  ", "\t", "\n", "\r\n", "> ", "<6>", "6,1,2,-;",
    "kern  :info  : ", "Dec  2 04:23:38 host kernel: ", "Jan 01 00:00:00 h systemd[1]: ",
    "2026-12-02T04:23:38+0000 h kernel: ", "[Mon Dec  2 04:23:38 2026] ", "-- Boot x --",
    "-- Logs begin at Mon 2019-12-02 --", "pci 0000:00:1c.0: ", "BAR 14: ", "bridge window ",
    "[mem size 0x04000000]", "[io  0x1000-0x1fff]", ": can't assign; no space", "no space for ",
    "failed to assign ", "assigned ", "releasing", "Slot(1): ", "Card present", "pciehp: ",
    "probe with driver x failed with error -19", ": probe of 0000:01:00.0 failed with error -5",
    "rebalab-uevent ACTION=bind DEVPATH=/x/0000:01:00.0 SUBSYSTEM=pci", "rebalab-sync 1",
    "BUG: ", "Call Trace:", " SUBSYSTEM=pci", "$ dmesg", "```", "é", "\x00", "\x1b[1m",
    "99999999999.999999", "9999-99-99T99:99:99+9999 ", "[  +0,000001] "])


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


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=300))
def test_property_console_lines(text: str) -> None:
    stats = ConsoleStats()
    lines = [(i, t) for i, t in enumerate(text.split("\n"))]
    out = events_from_console(lines, stats)
    assert stats.lines == len(lines)
    assert stats.events + stats.unstamped + stats.blank + stats.sync == stats.lines
    for ev in out:
        assert ev.t_guest_ns is not None and ev.data["h_recv_ns"] == ev.t_host_ns
