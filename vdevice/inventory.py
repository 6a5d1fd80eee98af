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

    def has_device(self, name: str) -> bool:
        return name in self.devices

    def props(self, device: str) -> dict[str, str] | None:
        return self.properties.get(device)

    @property
    def version_str(self) -> str:
        return ".".join(str(p) for p in self.version)
