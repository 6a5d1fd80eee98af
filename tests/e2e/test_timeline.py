"""One aligned timeline of a hot-plug/unplug cycle: host and guest events in causal order."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from lab import operations as ops
from lab.events import Kind, Source
from lab.image import GuestImage
from lab.observe import Observation
from lab.rundir import RunDir
from lab.timeline import Timeline
from tests.e2e.conftest import boot
from vdevice.topology import Device

ALIGN_TARGET_NS = 1_000_000


# serial: asserts the host/guest clock alignment bound (1 ms), which a loaded host widens
@pytest.mark.serial
def test_hotplug_cycle_timeline_is_causally_ordered(image: GuestImage, run_dir: RunDir) -> None:
    with boot(image, run_dir) as m:
        obs = Observation(m).start()
        plug = ops.plug(m, Device("snd0", "ich9-intel-hda", "rp1"))
        ops.unplug(m, "snd0")
        tl = obs.finish()
    bdf = plug.details["bdf"]
    # written, and readable back without the tool's state
    back = Timeline.read(m.artifacts / "timeline.jsonl")
    assert len(back) == len(tl) and not back.truncated

    def t(kind: Kind, source: Source | None = None, **where: object) -> int:
        evs = [e for e in tl.select(kinds=kind, device="snd0")
               if (source is None or e.source == source)
               and all(e.data.get(k) == v for k, v in where.items())]
        assert evs, f"no {kind.value} {where} for snd0 in the timeline"
        return evs[0].t_host_ns

    hotplug = t(Kind.HOTPLUG_REQUEST)
    probe_enter = t(Kind.PROBE_ENTER, func="pci_device_probe")
    probe_exit = t(Kind.PROBE_EXIT, func="pci_device_probe")
    azx_enter = t(Kind.CALL_ENTER, func="azx_probe")
    bound = t(Kind.BOUND)
    remove_enter = t(Kind.REMOVE_ENTER, func="pci_device_remove")
    deleted = t(Kind.DEVICE_DELETED)
    # the guest wrote the BAR address (config space @0x10) before the driver probed...
    bar_writes = [e for e in tl.select(kinds=Kind.CONFIG_WRITE)
                  if e.device and e.device.bdf == bdf and e.data.get("offset") == 0x10
                  and e.data.get("value") not in (0xFFFFFFFF,)]
    assert bar_writes and bar_writes[-1].t_host_ns < probe_enter
    # ...and QEMU mapped the BAR when the driver's pci_enable_device() turned decode on,
    # inside probe: the hardware view and the guest's callbacks agree within the bound
    mapped = t(Kind.BAR_MAPPED, Source.HOST_TRACE)
    assert azx_enter - tl.bound_ns <= mapped <= probe_exit + tl.bound_ns  # type: ignore[operator]
    assert hotplug < probe_enter < probe_exit < bound
    assert remove_enter < deleted
    assert tl.alignment.known and tl.bound_ns is not None
    assert tl.bound_ns <= ALIGN_TARGET_NS, f"alignment bound {tl.bound_ns} ns over target"
    # durations of guest callbacks are measured from entry/return pairs
    probe_exit_ev = tl.first(Kind.PROBE_EXIT, "snd0")
    assert probe_exit_ev is not None and probe_exit_ev.duration_ns and probe_exit_ev.duration_ns > 0


def test_guest_killed_mid_trace_keeps_the_timeline(image: GuestImage, run_dir: RunDir) -> None:
    m = boot(image, run_dir)
    try:
        obs = Observation(m).start()
        ops.plug(m, Device("snd0", "AC97", "rp1"))
        assert m.process is not None and m.process.pid
        os.kill(m.process.pid, signal.SIGKILL)
        m.process.wait(10)
        tl = obs.finish()
    finally:
        m.stop()
    path = Path(m.artifacts / "timeline.jsonl")
    back = Timeline.read(path)
    kinds = {e.kind for e in back}
    assert Kind.PROBE_ENTER in kinds and Kind.PROBE_EXIT in kinds and Kind.BOUND in kinds
    assert back.meta.get("guest_alive_at_end") is False
    assert len(back) == len(tl)
    assert (m.artifacts / "guest-trace.txt").stat().st_size > 0
