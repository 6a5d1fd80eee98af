"""Linux driver-model rules on hand-built probe/remove/decode sequences."""

from __future__ import annotations

from lab.clock import Alignment
from lab.events import DeviceId, Event, Kind, Source
from lab.rules import Limits, RuleContext, check_all
from lab.rules.linux_driver import ret_value
from lab.timeline import Timeline

SND = DeviceId(qom="snd0", bdf="0000:01:00.0")
MS = 1_000_000


def g(t_ms: float, kind: Kind, dev: DeviceId | None = SND, **data: object) -> Event:
    """A guest kprobe event (guest clock = host clock + 0 here)."""
    return Event(int(t_ms * MS), Source.GUEST_KPROBE, kind, dev, data=dict(data),
                 t_guest_ns=int(t_ms * MS))


QEMU_VIEW = DeviceId(bdf="01:00.0")       # how QEMU's trace names the device


def h(t_ms: float, kind: Kind, dev: DeviceId | None = QEMU_VIEW,
      src: Source = Source.HOST_TRACE, **data: object) -> Event:
    return Event(int(t_ms * MS), src, kind, dev, data=dict(data))


def op(t_ms: float, dur_ms: float, name: str = "rebalance", phase: str | None = None) -> Event:
    d: dict[str, object] = {"name": name}
    if phase:
        d["phase"] = phase
    return Event(int(t_ms * MS), Source.HOST_LAB, Kind.OPERATION, None, int(dur_ms * MS), d)


def run(*evs: Event, **ctx: object) -> list[str]:
    return [v.rule for v in violations(*evs, **ctx)]


def violations(*evs: Event, **ctx: object) -> list:
    tl = Timeline.build(list(evs), devices=[SND], alignment=Alignment.fixed(0, bound_ns=900_000))
    ctx.setdefault("devices", (SND,))
    ctx.setdefault("drivers", {"snd_hda_intel": "snd0"})
    context = RuleContext.from_timeline(tl, **ctx)   # type: ignore[arg-type]
    return check_all(tl, context, ["linux-driver"])


def clean_rebalance() -> list[Event]:
    return [op(0, 400),
            g(10, Kind.REMOVE_ENTER, func="azx_remove"), g(30, Kind.REMOVE_EXIT, func="azx_remove"),
            h(35, Kind.DECODE_OFF),
            g(100, Kind.PROBE_ENTER, func="azx_probe"), h(101, Kind.DECODE_ON),
            g(120, Kind.PROBE_EXIT, func="azx_probe", ret=0)]


def test_clean_rebalance_passes() -> None:
    assert run(*clean_rebalance(), bound_at_start=frozenset({"snd0"})) == []


def test_probe_without_exit_hung_or_cut_off() -> None:
    seq = [g(10, Kind.PROBE_ENTER, func="azx_probe"), g(20, Kind.KERNEL_LOG)]
    assert run(*seq) == ["linux.probe-unpaired"]
    assert run(*seq, complete=False) == ["linux.probe-incomplete"]


def test_remove_without_exit() -> None:
    assert run(g(10, Kind.REMOVE_ENTER)) == ["linux.remove-unpaired"]
    assert run(g(10, Kind.REMOVE_ENTER), complete=False) == ["linux.remove-incomplete"]


def test_remove_without_successful_probe() -> None:
    rm = [g(10, Kind.REMOVE_ENTER), g(11, Kind.REMOVE_EXIT)]
    assert run(*rm) == []                                        # unknown start: benefit of doubt
    assert run(*rm, bound_at_start=frozenset()) == ["linux.remove-without-probe"]
    assert run(*rm, bound_at_start=frozenset({"snd0"})) == []
    failed = [g(1, Kind.PROBE_ENTER), g(2, Kind.PROBE_EXIT, ret=-12)] + rm
    assert run(*failed) == ["linux.probe-failed", "linux.remove-without-probe"]


def test_probe_failure_but_not_deferral() -> None:
    assert run(g(1, Kind.PROBE_ENTER), g(2, Kind.PROBE_EXIT, ret="0xffffffffffffffed")) == \
        ["linux.probe-failed"]
    assert run(g(1, Kind.PROBE_ENTER), g(2, Kind.PROBE_EXIT, ret=-517)) == []


def test_nested_probe_counts_once() -> None:
    seq = [g(1, Kind.PROBE_ENTER, func="pci_device_probe"),
           g(2, Kind.PROBE_ENTER, func="azx_probe"),
           g(3, Kind.PROBE_EXIT, func="azx_probe", ret=-19),
           g(4, Kind.PROBE_EXIT, func="pci_device_probe", ret=-19)]
    assert run(*seq) == ["linux.probe-failed"]


def test_callbacks_after_remove() -> None:
    seq = [g(1, Kind.PROBE_ENTER), g(2, Kind.PROBE_EXIT, ret=0),
           g(10, Kind.REMOVE_ENTER), g(12, Kind.CALL_ENTER, func="azx_stop_chip"),
           g(20, Kind.REMOVE_EXIT),
           g(25, Kind.CALL_ENTER, func="azx_interrupt"), g(26, Kind.DRIVER_IO),
           g(27, Kind.CALL_ENTER, func="azx_interrupt"),
           g(30, Kind.PROBE_ENTER), g(31, Kind.CALL_ENTER, func="azx_probe_work"),
           g(40, Kind.PROBE_EXIT, ret=0)]
    vs = violations(*seq)
    assert [v.rule for v in vs] == ["linux.callback-after-remove"]
    assert vs[0].details["count"] == 3 and vs[0].details["first_call"] == "azx_interrupt"
    assert len(vs[0].events) == 3


def test_driver_events_without_device_are_attributed_by_driver_name() -> None:
    seq = [g(1, Kind.PROBE_ENTER), g(2, Kind.PROBE_EXIT, ret=0),
           g(10, Kind.REMOVE_ENTER), g(20, Kind.REMOVE_EXIT),
           g(25, Kind.CALL_ENTER, dev=None, driver="snd-hda-intel", func="azx_interrupt")]
    assert run(*seq) == ["linux.callback-after-remove"]


def test_not_rebound_after_rebalance() -> None:
    seq = clean_rebalance()[:4]
    assert run(*seq) == ["linux.not-rebound"]
    failed = seq + [g(100, Kind.PROBE_ENTER), g(120, Kind.PROBE_EXIT, ret=-16)]
    vs = violations(*failed)
    assert [v.rule for v in vs] == ["linux.not-rebound", "linux.probe-failed"]
    assert "-16" in vs[0].message and vs[0].phase == "rebalance"
    assert run(*seq, complete=False) == ["linux.rebind-incomplete"]


def test_bound_event_is_rebind_evidence() -> None:
    seq = clean_rebalance()[:4] + [h(500, Kind.BOUND, dev=DeviceId(qom="snd0"),
                                     src=Source.HOST_LAB)]
    assert run(*seq) == []


def test_bind_uevent_is_rebind_evidence() -> None:
    """A guest that oopsed may stop streaming kprobes; its bind uevent still arrives on
    the console, and the kernel sends it only after probe() returned 0."""
    bind = Event(500 * MS, Source.GUEST_UEVENT, Kind.UEVENT, DeviceId(bdf="0000:01:00.0"),
                 data={"action": "bind", "SUBSYSTEM": "pci", "DRIVER": "snd_hda_intel"},
                 t_guest_ns=500 * MS)
    seq = clean_rebalance()[:4]
    assert run(*seq) == ["linux.not-rebound"]
    assert run(*seq, bind) == []
    other = Event(500 * MS, Source.GUEST_UEVENT, Kind.UEVENT, DeviceId(bdf="0000:01:00.0"),
                  data={"action": "add", "SUBSYSTEM": "pci"}, t_guest_ns=500 * MS)
    assert run(*seq, other) == ["linux.not-rebound"]


def test_decode_on_while_unbound_for_too_long() -> None:
    seq = [op(0, 2000),
           g(10, Kind.REMOVE_ENTER), g(30, Kind.REMOVE_EXIT),
           h(200, Kind.DECODE_ON),                          # rescan re-enabled decode
           g(1000, Kind.PROBE_ENTER), g(1020, Kind.PROBE_EXIT, ret=0)]
    vs = violations(*seq)
    assert [v.rule for v in vs] == ["linux.decode-unbound"]
    assert vs[0].details["duration_ns"] == 800 * MS
    assert "800.000 ms" in vs[0].message and "±0.900 ms" in vs[0].message
    assert run(*seq, limits=Limits(unbound_decode_max_ms=1000)) == []


def test_decode_left_on_after_remove_until_the_end() -> None:
    seq = [g(1, Kind.PROBE_ENTER), h(2, Kind.DECODE_ON), g(3, Kind.PROBE_EXIT, ret=0),
           g(10, Kind.REMOVE_ENTER), g(30, Kind.REMOVE_EXIT), g(900, Kind.KERNEL_LOG)]
    assert run(*seq) == ["linux.decode-unbound"]
    # the device was deleted 100 ms after the remove: decode ends with it
    seq2 = seq[:-1] + [h(130, Kind.DEVICE_DELETED, dev=DeviceId(qom="snd0"), src=Source.HOST_QMP),
                       g(900, Kind.KERNEL_LOG)]
    assert run(*seq2) == []


def test_bar_mappings_stand_in_for_decode_edges() -> None:
    seq = [g(10, Kind.REMOVE_ENTER), g(30, Kind.REMOVE_EXIT),
           h(40, Kind.BAR_MAPPED, bar=0, addr=0x20000000, size=0x4000),
           h(700, Kind.BAR_UNMAPPED, bar=0, addr=0x20000000, size=0x4000)]
    assert run(*seq) == ["linux.decode-unbound"]
    assert run(*seq[:3] + [h(100, Kind.BAR_UNMAPPED, bar=0)]) == []


def test_slot_power_off_unmaps_the_bars_without_a_command_write() -> None:
    """Native unplug as QEMU 7.2 traces it: the guest removes the driver, powers the slot
    off (QEMU unmaps the BARs at once, the command register still says decode on), and
    QEMU deletes the device about a second later, when the power indicator goes off."""
    plug = [g(1, Kind.PROBE_ENTER), h(2, Kind.DECODE_ON),
            h(2.1, Kind.BAR_MAPPED, bar=0, addr=0x1000, size=0x400),
            h(2.2, Kind.BAR_MAPPED, bar=1, addr=0x1400, size=0x100),
            g(3, Kind.PROBE_EXIT, ret=0)]
    unplug = [g(5000, Kind.REMOVE_ENTER), g(5000.2, Kind.REMOVE_EXIT),
              h(5006, Kind.BAR_UNMAPPED, bar=0, addr=0x1000, size=0x400),
              h(5006.5, Kind.BAR_UNMAPPED, bar=1, addr=0x1400, size=0x100),
              h(6100, Kind.DEVICE_DELETED, dev=DeviceId(qom="snd0"), src=Source.HOST_QMP)]
    assert run(*plug, *unplug) == []
    # one BAR left mapped is still exposure: flagged, from the remove to the deletion
    vs = violations(*plug, *[e for e in unplug if e.data.get("bar") != 1])
    assert [v.rule for v in vs] == ["linux.decode-unbound"]
    assert vs[0].details["duration_ns"] == int(6100 * MS) - int(5000.2 * MS)


def test_decode_before_first_probe_only_when_start_state_known() -> None:
    seq = [h(0, Kind.DECODE_ON), g(900, Kind.PROBE_ENTER), g(901, Kind.PROBE_EXIT, ret=0)]
    assert run(*seq) == []
    assert run(*seq, bound_at_start=frozenset()) == ["linux.decode-unbound"]


def test_slow_remove() -> None:
    seq = [g(0, Kind.REMOVE_ENTER, func="azx_remove"), g(2500, Kind.REMOVE_EXIT, func="azx_remove")]
    vs = violations(*seq)
    assert [v.rule for v in vs] == ["linux.remove-slow"]
    assert "azx_remove took 2500.000 ms" in vs[0].message
    assert run(*seq, limits=Limits(remove_max_ms=3000)) == []


def test_ret_value_forms() -> None:
    def e(v: object) -> Event:
        return Event(0, Source.GUEST_KPROBE, Kind.PROBE_EXIT, data={"ret": v})
    assert ret_value(e(0)) == 0 and ret_value(e("0x0")) == 0
    assert ret_value(e("0xffffffffffffffea")) == -22 and ret_value(e("0xffffffea")) == -22
    assert ret_value(e("-19")) == -19 and ret_value(e("garbage")) is None


def test_decode_left_on_while_the_kernel_removes_the_device_is_not_the_drivers() -> None:
    """A sysfs remove of the port (a rescan rebalance): the driver's remove() runs inside
    the kernel's bus removal, and the command register keeps decode on until the rescan
    finds the device again. On a slow guest that lasted 1 s: a false alarm on a correct
    driver. Once the device is found again (its add uevent), exposure counts again."""
    bus_in = g(5, Kind.CALL_ENTER, func="pci_stop_and_remove_bus_device_locked", dev=None)
    bus_out = g(700, Kind.CALL_EXIT, func="pci_stop_and_remove_bus_device_locked", dev=None)
    seq = [g(1, Kind.PROBE_ENTER), h(2, Kind.DECODE_ON), g(3, Kind.PROBE_EXIT, ret=0),
           bus_in, g(10, Kind.REMOVE_ENTER), g(30, Kind.REMOVE_EXIT), bus_out,
           h(1100, Kind.DECODE_OFF)]
    assert run(*seq) == []
    # without the bus removal around it, the same remove leaves the device exposed
    assert run(*[e for e in seq if e not in (bus_in, bus_out)]) == ["linux.decode-unbound"]
    # found again by the rescan with decode on, and no driver for 800 ms: flagged
    add = g(1200, Kind.UEVENT, action="add", SUBSYSTEM="pci")
    again = [add, h(1210, Kind.DECODE_ON), g(2010, Kind.PROBE_ENTER),
             g(2020, Kind.PROBE_EXIT, ret=0)]
    assert run(*seq, *again) == ["linux.decode-unbound"]
