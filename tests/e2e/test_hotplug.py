"""Boot, hot-plug each audio model, see the driver bind in the guest, unplug, see it gone."""

from __future__ import annotations

import json
import stat

import pytest

from lab import operations as ops
from lab.image import GuestImage
from lab.machine import Machine
from vdevice.topology import Device, HotplugMode, Placement

# the module-scoped `machine` fixture boots one VM per mode for all of these: keep them on
# one xdist worker (--dist loadgroup), or each worker would boot its own
pytestmark = pytest.mark.xdist_group("test_hotplug")


def test_guest_is_ready_and_the_run_is_recorded(machine: Machine, image: GuestImage) -> None:
    assert machine.agent is not None
    r = machine.agent.run_argv(["uname", "-r"]).check()
    assert r.stdout.strip() == image.kernel_release
    assert machine.accel is not None and machine.accel.name in ("kvm", "tcg")
    run = machine.artifacts
    cmdline = (run / "qemu-cmdline.txt").read_text()
    assert f"hostfwd=tcp:127.0.0.1:{machine.ssh_port}-:22" in cmdline
    assert "restrict=on" in cmdline
    assert image.ready_marker in (run / "console.log").read_text()
    greeting = [json.loads(x) for x in (run / "qmp.jsonl").read_text().splitlines()]
    assert any(rec["dir"] == "greeting" for rec in greeting)
    assert any(rec.get("execute") == "cont" and rec["dir"] == "in" for rec in greeting)
    # the private socket directory is 0700 and holds the sockets
    mode = stat.S_IMODE(machine.private.stat().st_mode)
    assert mode == 0o700
    assert (machine.private / "qmp.sock").exists()


@pytest.mark.parametrize("model, driver", [("ich9-intel-hda", "snd_hda_intel"),
                                           ("AC97", "snd_intel8x0")])
def test_plug_binds_driver_and_unplug_removes(machine: Machine, model: str, driver: str) -> None:
    dev = Device("snd0", model, "rp1", Placement.HOT)
    r = ops.plug(machine, dev)
    bdf = r.details["bdf"]
    assert r.durations_ms["bound"] > 0
    # independent check, not the operation's own waiter
    assert machine.guest.driver_of(machine, "snd0") == driver
    assert ops.qom_has(machine, "snd0")
    u = ops.unplug(machine, "snd0")
    expected = "DEVICE_DELETED" if dev.catalog().emits_device_deleted else "qom-list"
    assert u.details["qemu_evidence"] == expected
    assert not ops.qom_has(machine, "snd0")
    assert machine.agent is not None
    gone = machine.agent.run_argv(["test", "-e", f"/sys/bus/pci/devices/{bdf}"])
    assert gone.exit_status == 1
    if machine.topology.hotplug_mode == HotplugMode.NATIVE:
        # pciehp's attention-button delay: native unplug takes seconds, ACPI milliseconds
        assert u.durations_ms["qemu_gone"] > 1000


def test_plug_twice_is_refused_and_unknown_port_too(machine: Machine) -> None:
    from lab.errors import LabError
    from vdevice.errors import SpecError

    with pytest.raises(SpecError, match="unknown port 'rp9'"):
        ops.plug(machine, Device("snd5", "AC97", "rp9"))
    with pytest.raises(LabError, match="not plugged in"):
        ops.unplug(machine, "snd0")
