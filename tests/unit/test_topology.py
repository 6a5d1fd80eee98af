from __future__ import annotations

import pytest

from lab import qemu_caps
from vdevice.catalog import MODELS, Role, available_models, get_model
from vdevice.errors import SpecError
from vdevice.inventory import QemuInventory
from vdevice.presets import default_topology, switch_topology
from vdevice.sizes import bar_size, fmt_size, parse_size
from vdevice.topology import (Device, HotplugMode, Placement, Port, Switch, Topology,
                              device_add_payload, machine_args, qemu_opt, validate)


@pytest.fixture(scope="module")
def inventory() -> QemuInventory:
    """The real installed QEMU's inventory: topologies are checked against it."""
    return qemu_caps.probe()


def test_sizes() -> None:
    assert parse_size("64M") == 64 << 20
    assert parse_size("4KiB") == 4096
    assert parse_size("0x4000") == 0x4000
    assert parse_size(512) == 512
    assert fmt_size(64 << 20) == "64M" and fmt_size(1536 << 10) == "1536K"
    with pytest.raises(SpecError, match="cannot read size"):
        parse_size("64Q")
    with pytest.raises(SpecError, match="not a power of two.*try 64M"):
        bar_size("48M", field="size")
    with pytest.raises(SpecError, match="larger than the guest"):
        bar_size("2T")


def test_catalog_facts() -> None:
    hda = get_model("ich9-intel-hda")
    assert hda.windows_hwid == "PCI\\VEN_8086&DEV_293E"
    assert hda.linux_driver == "snd_hda_intel"
    assert not hda.emits_device_deleted
    assert get_model("AC97").emits_device_deleted
    assert not get_model("hda-duplex").hotpluggable
    with pytest.raises(SpecError, match="did you mean 'AC97'"):
        get_model("AC79")


def test_availability_is_detected(inventory: QemuInventory) -> None:
    names = {m.driver for m in available_models(inventory, Role.AUDIO)}
    assert {"ich9-intel-hda", "AC97", "ES1370"} <= names
    assert ("virtio-sound-pci" in names) == inventory.has_device("virtio-sound-pci")


def test_default_topology_renders(inventory: QemuInventory) -> None:
    topo = default_topology(HotplugMode.NATIVE)
    validate(topo, inventory)
    args = machine_args(topo, audiodev="a0")
    joined = " ".join(args)
    assert "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1" in joined
    assert "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off" in joined
    assert "ich9-intel-hda" not in joined  # hot devices are not on the command line
    acpi = " ".join(machine_args(default_topology(HotplugMode.ACPI)))
    assert "acpi-pci-hotplug-with-bridge-support" not in acpi


def test_cold_hda_gets_codec_and_switch(inventory: QemuInventory) -> None:
    topo = switch_topology()
    validate(topo, inventory)
    args = machine_args(topo, audiodev="a0")
    assert "x3130-upstream,id=sw1,bus=rp2" in args
    assert "xio3130-downstream,id=sw1p1,bus=sw1,chassis=3,slot=1" in args
    assert "ich9-intel-hda,id=snd0,bus=sw1p1" in args
    assert "hda-duplex,id=snd0-codec,bus=snd0.0,mixer=off,audiodev=a0" in args


def test_device_add_payload() -> None:
    p = device_add_payload(Device("snd1", "AC97", "rp2"), audiodev="a0")
    assert p == {"driver": "AC97", "id": "snd1", "bus": "rp2", "audiodev": "a0"}
    hda = device_add_payload(Device("snd0", "ich9-intel-hda", "rp1"), audiodev="a0")
    assert "audiodev" not in hda  # the controller has none; its codec would
    big = device_add_payload(Device("p0", "pci-testdev", "rp2", size=64 << 20))
    assert big["membar"] == 64 << 20


def test_qemu_opt_escapes_commas() -> None:
    assert qemu_opt("a,b") == "a,,b"
    assert qemu_opt(True) == "on"


def _topo(**kw: object) -> Topology:
    base = dict(ports=(Port("rp1", 1, 1), Port("rp2", 2, 2)),
                devices=(Device("snd0", "AC97", "rp1"),))
    base.update(kw)
    return Topology(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("topo, field, message", [
    (_topo(ports=(Port("rp1", 1, 1), Port("rp2", 1, 1))), "ports[1].slot", "already used"),
    (_topo(ports=(Port("rp1", 1, 1, {"pref32-reserve": 1 << 20, "pref64-reserve": 1 << 20}),)),
     "ports[0].reserve", "PREF32 and PREF64 conflict"),
    (_topo(ports=(Port("rp1", 1, 1, {"mem-reserve": 3 << 19}),)), "ports[0].reserve.mem-reserve",
     "multiple of 1M"),
    (_topo(devices=(Device("snd0", "AC97", "rp9"),)), "devices[0].port", "unknown port 'rp9'"),
    (_topo(devices=(Device("snd0", "AC97", "pcie.0"),)), "devices[0].port", "cannot be hot"),
    (_topo(devices=(Device("snd0", "AC97", "rp1"), Device("snd1", "ES1370", "rp1"))),
     "devices[1].port", "already taken"),
    (_topo(devices=(Device("rp1", "AC97", "rp2"),)), "devices[0].id", "used twice"),
    (_topo(devices=(Device("snd0", "hda-duplex", "rp1"),)), "devices[0].model", "codec"),
    (_topo(devices=(Device("snd0", "ich9-intel-hda", "rp1", Placement.HOT, codec="hda-duplex"),)),
     "devices[0].codec", "cannot be hot-plugged"),
    (_topo(devices=(Device("p0", "pci-testdev", "rp1"),)), "devices[0].size", "needs a size"),
    (_topo(devices=(Device("p0", "pci-testdev", "rp1", size=48 << 20),)), "devices[0].size",
     "not a power of two"),
    (_topo(devices=(Device("snd0", "AC97", "rp1", props={"bogus": "1"}),)),
     "devices[0].props", "not one the lab lets you set on AC97"),
    (_topo(devices=(Device("snd0", "AC97", "rp1", props={"romfile": "/etc/shadow"}),)),
     "devices[0].props", "names a host file"),
    (_topo(devices=(Device("snd0", "AC97", "rp1", props={"x,romfile": "1"}),)),
     "devices[0].props", "not one QEMU takes"),
    (_topo(devices=(Device("9bad", "AC97", "rp1"),)), "devices[0].id", "not a valid QEMU id"),
    (_topo(switches=(Switch("sw1", "rp7", (Port("d1", 5, 1),)),)), "switches[0].port",
     "unknown root port"),
    (_topo(cpus=4, max_cpus=2), "cpus", "max_cpus"),
])
def test_validation_errors(inventory: QemuInventory, topo: Topology, field: str,
                           message: str) -> None:
    with pytest.raises(SpecError) as ei:
        validate(topo, inventory)
    assert ei.value.field == field
    assert message in str(ei.value)


def test_an_allowed_property_the_installed_qemu_lacks_is_refused() -> None:
    inv = QemuInventory(version=(7, 2, 0), devices=frozenset({"AC97", "pcie-root-port"}),
                        properties={"AC97": {"addr": "int32"}})
    with pytest.raises(SpecError, match="no property 'rombar'") as ei:
        validate(_topo(devices=(Device("snd0", "AC97", "rp1", props={"rombar": "0"}),)), inv)
    assert ei.value.field == "devices[0].props.rombar"


def test_virtio_sound_refused_when_missing() -> None:
    inv = QemuInventory(version=(7, 2, 0), devices=frozenset({"AC97", "pcie-root-port"}))
    with pytest.raises(SpecError, match="needs QEMU >= 8.2.0"):
        validate(_topo(devices=(Device("snd0", "virtio-sound-pci", "rp1"),)), inv)


def test_every_catalog_model_is_known_to_qemu_or_explained(inventory: QemuInventory) -> None:
    for m in MODELS.values():
        assert inventory.has_device(m.driver) or m.min_qemu is not None, m.driver
