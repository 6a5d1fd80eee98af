"""The QEMU PCI devices the lab knows, with the facts a driver engineer needs.

Each entry says how QEMU names the device, what the guest sees (PCI ids, the
Windows hardware id an INF matches, the Linux driver that binds), and the QEMU 7.2
quirks the lab must work around (PLATFORM.md): ``ich9-intel-hda`` never emits
DEVICE_DELETED, HDA codecs cannot be hot-plugged. Availability is not assumed:
``available_models`` filters by what the installed QEMU lists.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from vdevice.errors import SpecError
from vdevice.inventory import QemuInventory


class Role(str, Enum):
    AUDIO = "audio"          # a device under test
    CODEC = "codec"          # an HDA codec, a child of an HDA controller
    PRESSURE = "pressure"    # exists only to need resources
    TEST = "test"            # a device for the lab's own test driver


@dataclass(frozen=True)
class Bar:
    index: int
    kind: str          # "mem32", "mem64-pref", "io"
    size: int | None   # None: set by a property (membar, memdev)


@dataclass(frozen=True)
class DeviceModel:
    driver: str                       # QEMU's -device name
    role: Role
    title: str
    vendor_id: int | None = None
    device_id: int | None = None
    linux_driver: str | None = None   # the driver whose link appears in sysfs
    linux_module: str | None = None
    hotpluggable: bool = True
    emits_device_deleted: bool = True
    bus_kind: str = "pci"             # "pci" or "hda"
    bars: tuple[Bar, ...] = ()
    min_qemu: tuple[int, int, int] | None = None
    audio_backend: bool = False       # takes audiodev=
    quirks: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()      # codec models this controller can carry
    defaults: dict[str, str] = field(default_factory=dict)
    # an HDA codec's own ids (QEMU hw/audio/hda-codec-common.h: vendor QEMU_HDA_ID_VENDOR
    # 0x1af4; device 0x11/0x21/0x31 for output/duplex/micro with mixer=off and
    # 0x12/0x22/0x32 with mixer=on, QEMU's default; the subsystem id repeats vendor:device)
    hda_vendor_id: int | None = None
    hda_device_id: int | None = None          # with mixer=off (the lab's default)
    hda_device_id_mixer: int | None = None    # with mixer=on (QEMU's default)

    @property
    def pci_id(self) -> str | None:
        if self.vendor_id is None or self.device_id is None:
            return None
        return f"{self.vendor_id:04x}:{self.device_id:04x}"

    @property
    def windows_hwid(self) -> str | None:
        """The hardware id Windows builds for it; an INF's models section matches this."""
        if self.vendor_id is None or self.device_id is None:
            return None
        return f"PCI\\VEN_{self.vendor_id:04X}&DEV_{self.device_id:04X}"

    def windows_function_hwid(self, *, mixer: bool = False) -> str | None:
        """An HDA codec's audio function devnode as Windows' HD Audio bus driver names it.

        learn.microsoft.com/windows-hardware/drivers/install/identifiers-for-hdaudio-devices:
        ``HDAUDIO\\FUNC_01&VEN_vvvv&DEV_dddd&SUBSYS_ssssssss&REV_rrrr``, FUNC_01 being the
        audio function group; the bus driver reports the full id first and, second, "a
        more generic reference without the revision number", which is what this returns
        (so it is also a prefix of the full id and of the instance id). A PortCls
        function driver's INF matches this id, not the controller's PCI id.
        """
        if self.hda_vendor_id is None or self.hda_device_id is None:
            return None
        dev = self.hda_device_id_mixer if mixer and self.hda_device_id_mixer is not None \
            else self.hda_device_id
        return (f"HDAUDIO\\FUNC_01&VEN_{self.hda_vendor_id:04X}&DEV_{dev:04X}"
                f"&SUBSYS_{self.hda_vendor_id:04X}{dev:04X}")

    @property
    def function_hwids(self) -> tuple[str, ...]:
        """For an HDA controller: the function devnode ids of every codec it can carry
        (both mixer settings), where a Windows audio driver binds; empty otherwise."""
        out: list[str] = []
        for name in self.codecs:
            codec = MODELS.get(name)
            if codec is None:
                continue
            for mixer in (False, True):
                hwid = codec.windows_function_hwid(mixer=mixer)
                if hwid is not None and hwid not in out:
                    out.append(hwid)
        return tuple(out)

    def to_json(self) -> dict[str, object]:
        return {
            "driver": self.driver, "role": self.role.value, "title": self.title,
            "pci_id": self.pci_id, "windows_hwid": self.windows_hwid,
            "windows_function_hwid": self.windows_function_hwid(),
            "windows_function_hwids": list(self.function_hwids),
            "linux_driver": self.linux_driver, "hotpluggable": self.hotpluggable,
            "emits_device_deleted": self.emits_device_deleted, "quirks": list(self.quirks),
        }


_HDA_QUIRKS = (
    "QEMU 7.2 emits no DEVICE_DELETED for the controller (only for its codec); "
    "removal is detected from QOM",
    "HDA codecs cannot be hot-plugged: a hot-plugged controller has no codec and the "
    "Linux driver logs 'no codecs found!'; place it cold with a codec for audio",
)

MODELS: dict[str, DeviceModel] = {m.driver: m for m in (
    DeviceModel("ich9-intel-hda", Role.AUDIO, "Intel ICH9 HD Audio controller", 0x8086, 0x293E,
                "snd_hda_intel", "snd_hda_intel", emits_device_deleted=False,
                bars=(Bar(0, "mem32", 0x4000),), quirks=_HDA_QUIRKS,
                codecs=("hda-duplex", "hda-output", "hda-micro")),
    DeviceModel("intel-hda", Role.AUDIO, "Intel ICH6 HD Audio controller", 0x8086, 0x2668,
                "snd_hda_intel", "snd_hda_intel", emits_device_deleted=False,
                bars=(Bar(0, "mem32", 0x4000),), quirks=_HDA_QUIRKS,
                codecs=("hda-duplex", "hda-output", "hda-micro")),
    DeviceModel("AC97", Role.AUDIO, "Intel 82801AA AC'97 audio", 0x8086, 0x2415,
                "snd_intel8x0", "snd_intel8x0", audio_backend=True,
                bars=(Bar(0, "io", 0x100), Bar(1, "io", 0x40))),
    DeviceModel("ES1370", Role.AUDIO, "Ensoniq AudioPCI ES1370", 0x1274, 0x5000,
                "snd_ens1370", "snd_ens1370", audio_backend=True, bars=(Bar(0, "io", 0x40),)),
    DeviceModel("virtio-sound-pci", Role.AUDIO, "virtio sound", 0x1AF4, 0x1059,
                "virtio-pci", "virtio_snd", audio_backend=True, min_qemu=(8, 2, 0),
                bars=(Bar(4, "mem64-pref", 0x4000),)),
    DeviceModel("hda-duplex", Role.CODEC, "HDA codec: line out + line in", bus_kind="hda",
                hotpluggable=False, audio_backend=True, defaults={"mixer": "off"},
                hda_vendor_id=0x1AF4, hda_device_id=0x0021, hda_device_id_mixer=0x0022),
    DeviceModel("hda-output", Role.CODEC, "HDA codec: line out", bus_kind="hda",
                hotpluggable=False, audio_backend=True, defaults={"mixer": "off"},
                hda_vendor_id=0x1AF4, hda_device_id=0x0011, hda_device_id_mixer=0x0012),
    DeviceModel("hda-micro", Role.CODEC, "HDA codec: speaker + microphone", bus_kind="hda",
                hotpluggable=False, audio_backend=True, defaults={"mixer": "off"},
                hda_vendor_id=0x1AF4, hda_device_id=0x0031, hda_device_id_mixer=0x0032),
    DeviceModel("pci-testdev", Role.PRESSURE, "QEMU PCI test device (membar= sets a 64-bit "
                "prefetchable BAR)", 0x1B36, 0x0005, None, None,
                bars=(Bar(0, "mem32", 0x1000), Bar(1, "io", 0x100), Bar(2, "mem64-pref", None))),
    DeviceModel("ivshmem-plain", Role.PRESSURE, "Inter-VM shared memory (BAR2 = memdev size)",
                0x1AF4, 0x1110, None, None,
                bars=(Bar(0, "mem32", 0x100), Bar(2, "mem64-pref", None))),
    DeviceModel("edu", Role.TEST, "QEMU educational device (DMA engine, interrupts)", 0x1234,
                0x11E8, "rebalab_testdrv", "rebalab_testdrv", bars=(Bar(0, "mem32", 0x100000),)),
)}


# ---- what a scenario may set on a device -------------------------------------------------

#: properties a user legitimately varies, per model (besides what the lab derives from
#: the scenario itself: id, bus, audiodev, membar from ``size``, memdev, the codec)
USER_PROPS: dict[str, frozenset[str]] = {
    "ich9-intel-hda": frozenset({"msi", "old_msi_addr"}),
    "intel-hda": frozenset({"msi", "old_msi_addr"}),
    "AC97": frozenset(), "ES1370": frozenset(), "virtio-sound-pci": frozenset({"vectors"}),
    "hda-duplex": frozenset({"mixer", "use-timer"}),
    "hda-output": frozenset({"mixer", "use-timer"}),
    "hda-micro": frozenset({"mixer", "use-timer"}),
    "pci-testdev": frozenset(), "ivshmem-plain": frozenset({"master"}),
    "edu": frozenset({"dma_mask"}),
}
#: any PCI function: where it sits and whether it has a ROM BAR at all
COMMON_PROPS = frozenset({"addr", "multifunction", "rombar", "x-pcie-lnksta-dllla"})
#: never from a scenario, with the reason (file-typed properties make QEMU open a host
#: file the guest can then read; the others are the lab's to set)
REFUSED_PROPS: dict[str, str] = {
    "romfile": "it names a host file QEMU would load as the device's option ROM, which the "
               "guest can read",
    "drive": "it attaches a host block device or file", "chardev": "it attaches a host "
             "character device", "netdev": "it attaches a host network backend",
    "memdev": "the lab sets it from the device's size", "audiodev": "the lab wires audio "
              "to its own capture", "id": "it is the device's name in the scenario",
    "bus": "it is the device's port in the scenario",
}
_PROP_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def check_prop_name(key: object, *, field: str | None = None) -> None:
    """A name QEMU's option syntax takes as one key (no ',' or '=', no leading '-')."""
    if not isinstance(key, str) or not _PROP_KEY.match(key):
        raise SpecError(f"property name {key!r} is not one QEMU takes (letters, digits, "
                        "'_', '.', '-')", field=field)


def check_user_props(model: str, props: Iterable[str], *, field: str | None = None) -> None:
    """Refuse a property a scenario may not set on ``model`` (SpecError naming it and why)."""
    allowed = USER_PROPS.get(model, frozenset()) | COMMON_PROPS
    for key in props:
        check_prop_name(key, field=field)
        if key in REFUSED_PROPS:
            raise SpecError(f"property {key!r} is refused: {REFUSED_PROPS[key]}", field=field)
        if key not in allowed:
            raise SpecError(f"property {key!r} is not one the lab lets you set on {model}; "
                            f"allowed: {', '.join(sorted(allowed))}", field=field)


def get_model(name: str, *, field: str | None = None) -> DeviceModel:
    try:
        return MODELS[name]
    except KeyError:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpecError(f"unknown device model {name!r}{hint}; known: {', '.join(sorted(MODELS))}",
                        field=field) from None


def unavailable_reason(model: DeviceModel, inventory: QemuInventory) -> str | None:
    """Why the installed QEMU can't provide ``model``, or None when it can."""
    if not inventory.has_device(model.driver):
        need = f" (needs QEMU >= {'.'.join(map(str, model.min_qemu))})" if model.min_qemu else ""
        return (f"the installed QEMU {inventory.version_str} has no device {model.driver!r}{need}")
    return None


def available_models(inventory: QemuInventory, role: Role | None = None) -> list[DeviceModel]:
    return [m for m in MODELS.values()
            if (role is None or m.role == role) and unavailable_reason(m, inventory) is None]
