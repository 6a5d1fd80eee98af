"""Which devices a restore point may hold: QEMU's ``migrate`` does not refuse a device
without migration state (7.2's ``edu`` comes back with BAR 0 and command 0 under a bound
driver), so the lab refuses it from ``-dump-vmstate``'s list, naming where it came from."""

from __future__ import annotations

from lab.snapshot import PointDevice, unmigratable
from vdevice.inventory import QemuInventory


def inv(names: set[str] | None) -> QemuInventory:
    return QemuInventory(version=(7, 2, 22), devices=frozenset(),
                         migratable=frozenset(names) if names is not None else None)


def test_a_type_is_migratable_by_its_name_or_as_the_virtio_device_behind_its_proxy() -> None:
    i = inv({"AC97", "virtio-net-device"})
    assert i.can_migrate("AC97") is True
    assert i.can_migrate("virtio-net-pci") is True
    assert i.can_migrate("edu") is False
    assert inv(None).can_migrate("edu") is None       # not known: not refused


def test_a_point_with_a_device_qemu_cannot_migrate_is_refused_naming_it_and_its_line() -> None:
    devices = [PointDevice("rp1", "pcie-root-port", "the topology"),
               PointDevice("edu0", "edu", "s.yaml:6"), PointDevice("snd1", "AC97", "s.yaml:7")]
    why = unmigratable(devices, inv({"pcie-root-port", "AC97"}))
    assert why is not None
    assert "edu0 (edu, s.yaml:6)" in why and "snd1" not in why and "rp1" not in why
    assert "QEMU 7.2.22" in why and "after the restore point" in why
    assert unmigratable(devices[::2], inv({"pcie-root-port", "AC97"})) is None
    assert unmigratable(devices, inv(None)) is None
