"""What the installed QEMU offers, as plain data.

``vdevice`` validates topologies against this instead of assuming a QEMU version
(virtio-sound-pci exists only from 8.2, property sets change between releases).
The lab fills it in by asking the binary (``lab.qemu_caps``); tests can build one
by hand from a real QEMU's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class QemuInventory:
    version: tuple[int, int, int]
    devices: frozenset[str]
    # device name -> {property name -> type as QEMU prints it}; filled lazily per device
    properties: dict[str, dict[str, str]] = field(default_factory=dict)
    machines: frozenset[str] = frozenset()
    # the names QEMU has migration state for (``-dump-vmstate``): a device whose type is
    # not among them is silently reset by a migration (QEMU 7.2's ``edu``); None: unknown
    migratable: frozenset[str] | None = None

    def can_migrate(self, driver: str) -> bool | None:
        """Whether a device of QEMU type ``driver`` keeps its state across a migration
        (None: not known). A virtio PCI proxy migrates as its virtio device."""
        if self.migratable is None:
            return None
        if driver in self.migratable:
            return True
        return driver.endswith("-pci") and f"{driver[:-4]}-device" in self.migratable

    def has_device(self, name: str) -> bool:
        return name in self.devices

    def props(self, device: str) -> dict[str, str] | None:
        return self.properties.get(device)

    @property
    def version_str(self) -> str:
        return ".".join(str(p) for p in self.version)
