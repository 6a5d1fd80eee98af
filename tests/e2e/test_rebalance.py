"""Rebalance triggers against the built-in guest, judged from the host's view."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from lab import operations as ops
from lab import rebalance as rb
from lab.events import Kind
from lab.image import GuestImage
from lab.machine import Machine
from lab.rundir import RunDir
from tests.e2e.conftest import ARTIFACTS, _safe
from vdevice.presets import default_topology
from vdevice.topology import Device, HotplugMode, Placement

# the module-scoped `vm` fixture boots one VM per mode for all of these: keep them on one
# xdist worker (--dist loadgroup), or each worker would boot its own
pytestmark = pytest.mark.xdist_group("test_rebalance")


@pytest.fixture(scope="module", params=[HotplugMode.ACPI, HotplugMode.NATIVE],
                ids=lambda m: m.value)
def vm(request: pytest.FixtureRequest, image: GuestImage) -> Iterator[Machine]:
    run = RunDir(ARTIFACTS, f"{_safe(request.module.__name__)}-{request.param.value}")
    topo = replace(default_topology(request.param), max_cpus=2)
    m = Machine(topo, run, image=image)
    try:
        m.start()
        ops.plug(m, Device("snd0", "ich9-intel-hda", "rp1", Placement.HOT))
        yield m
    finally:
        m.stop()
        run.close()


def test_rescan_moves_the_audio_bar_and_rebinds(vm: Machine) -> None:
    rep = rb.rescan(vm, "snd0")
    bar = [c for c in rep.changes if c.device == "snd0" and c.what == "BAR0"]
    assert bar, f"no BAR0 change for snd0 in {[c.describe() for c in rep.changes]}"
    assert bar[0].old_address != bar[0].new_address
    assert bar[0].new_address is not None
    # the hardware trace shows the old mapping removed and one at the new address added
    unmapped = [e for e in rep.trace if e.kind == Kind.BAR_UNMAPPED
                and e.data["addr"] == bar[0].old_address and e.data["qemu_name"] == "ich9-intel-hda"]
    mapped = [e for e in rep.trace if e.kind == Kind.BAR_MAPPED
              and e.data["addr"] == bar[0].new_address and e.data["qemu_name"] == "ich9-intel-hda"]
    assert unmapped and mapped and unmapped[0].t_host_ns < mapped[-1].t_host_ns
    assert rep.audio_moved and rep.rebound
    assert rep.driver_after == "snd_hda_intel"
    assert rep.unmapped_ms is not None and rep.unmapped_ms > 0


def test_pressure_grows_the_window_in_native_mode_only(vm: Machine) -> None:
    rep = rb.pressure(vm, "snd0")
    native = vm.topology.hotplug_mode == HotplugMode.NATIVE
    port = rep.details["pressure_port"]
    window = [c for c in rep.changes if c.device == port and c.what == "window.prefetchable"]
    if native:
        assert rep.details["pressure_bar_assigned"] is True
        assert window and window[0].new_size is not None and window[0].new_size >= rep.details["pressure_size"]
    else:
        # ACPI: the BAR stays unassigned and the lab says so instead of claiming a rebalance
        assert rep.details["pressure_bar_assigned"] is False
        assert not window
        assert any("stayed unassigned" in n for n in rep.notes)
    assert not rep.audio_moved
    ops.unplug(vm, "snd0-pressure")     # the default id, as the scenario model names it


def test_reconfigure_replaces_the_model_with_both_halves_timed(vm: Machine) -> None:
    rep = rb.reconfigure(vm, "snd0", model="AC97")
    assert rep.durations_ms["unplug"] > 0 and rep.durations_ms["plug"] > 0
    assert rep.driver_after == "snd_intel8x0" and rep.rebound
    assert any(c.device == "snd0" and c.what == "BAR0" for c in rep.changes)
    back = rb.reconfigure(vm, "snd0", model="ich9-intel-hda", props={"msi": "off"})
    assert back.driver_after == "snd_hda_intel"


def test_cpu_hotplug_reports_nothing_moved(vm: Machine) -> None:
    rep = rb.cpu_hotplug(vm)
    assert rep.details["guest_cpus"] == 2
    assert not [c for c in rep.changes if c.what != "device"]
    assert any("no PCI resource moved" in n for n in rep.notes)


def test_resize_is_detected_unsupported(vm: Machine) -> None:
    with pytest.raises(rb.Unsupported, match="no Resizable BAR capability"):
        rb.resize(vm, "snd0")
