"""Built-in topologies, so the demo and the shipped scenarios need no topology file."""

from __future__ import annotations

from vdevice.topology import Device, HotplugMode, Placement, Port, Switch, Topology


def default_topology(mode: HotplugMode = HotplugMode.ACPI, *, model: str = "ich9-intel-hda"
                     ) -> Topology:
    """Four root ports; the audio device ``snd0`` planned for hot-plug into ``rp1``."""
    return Topology(
        hotplug_mode=mode,
        ports=tuple(Port(f"rp{i}", chassis=i, slot=i) for i in range(1, 5)),
        devices=(Device("snd0", model, "rp1", Placement.HOT),),
        max_cpus=2,   # one free vCPU slot for the cpu-hotplug trigger
    )


def switch_topology(mode: HotplugMode = HotplugMode.NATIVE) -> Topology:
    """The audio device and a pressure slot behind one PCIe switch, sharing its window."""
    return Topology(
        hotplug_mode=mode,
        ports=(Port("rp1", 1, 1), Port("rp2", 2, 2)),
        switches=(Switch("sw1", "rp2", (Port("sw1p1", 3, 1), Port("sw1p2", 3, 2))),),
        devices=(Device("snd0", "ich9-intel-hda", "sw1p1", Placement.COLD, codec="hda-duplex"),),
    )


PRESETS = {"default": default_topology, "switch": switch_topology}
