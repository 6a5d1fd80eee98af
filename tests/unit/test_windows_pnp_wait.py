"""The PnP waits a Windows guest gets for plug/unplug (lab/guest/windows/pnp_wait.py).

Checked without Windows: the exact script (against the documented PnpDevice module:
``Get-PnpDevice -PresentOnly``, ``Status`` OK for a started device), that the hardware
id travels as a literal and is matched without wildcards, and that the deadline is
the caller's.
"""

from __future__ import annotations

import pytest

from lab.agent.powershell import script_params
from lab.guest.windows import pnp_wait
from vdevice.catalog import MODELS

HDA = MODELS["ich9-intel-hda"].windows_hwid or ""


def test_catalog_hardware_ids_are_what_the_waits_match() -> None:
    assert HDA == "PCI\\VEN_8086&DEV_293E"
    assert MODELS["AC97"].windows_hwid == "PCI\\VEN_8086&DEV_2415"


def test_started_script_is_pinned() -> None:
    gs = pnp_wait.started(HDA, 20)
    s = gs.script
    assert s.startswith("$ErrorActionPreference = 'Stop'\n")
    assert script_params(s) == {"HardwareId": HDA}
    assert "    TimeoutMs = 20000\n" in s and "    PollMs = 100\n" in s
    assert "[WildcardPattern]::Escape($p.HardwareId) + '*'" in s
    assert "Get-PnpDevice -PresentOnly" in s and "$_.Status -eq 'OK'" in s
    assert "$f = Get-Function $d $byId" in s
    assert "'started ' + $d.InstanceId; exit 0" in s
    assert gs.timeout == 20 + pnp_wait.MARGIN_S


def test_gone_script_waits_for_absence() -> None:
    s = pnp_wait.gone(HDA, 5.5).script
    assert "    TimeoutMs = 5500\n" in s
    assert "if ($devs.Count -eq 0) { 'gone'; exit 0 }" in s


@pytest.mark.parametrize("hostile", ["PCI\\VEN_1'; Remove-Item C:\\ -Recurse; '",
                                     "$(calc)", "`n`r", "a\u2019b", "[x]*?"])
def test_hostile_ids_arrive_as_data(hostile: str) -> None:
    s = pnp_wait.started(hostile, 1).script
    assert script_params(s) == {"HardwareId": hostile}
    # the id appears only inside the literal: no line of the template carries it
    body = s.split("}\n", 1)[1]
    assert hostile not in body


# ------------------------------------------------------------------ HDA: the function devnode (issue 10, point 9)

def test_catalog_carries_the_codec_function_ids_from_qemu_source() -> None:
    """QEMU hw/audio/hda-codec-common.h: vendor 0x1af4, device 0x21/0x11/0x31 (mixer off,
    the lab's default) or 0x22/0x12/0x32 (mixer on); subsystem = vendor:device. Format:
    HDAUDIO\\FUNC_01&VEN_vvvv&DEV_dddd&SUBSYS_ssssssss (Microsoft's HDAUDIO identifiers)."""
    assert MODELS["hda-duplex"].windows_function_hwid() == "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021"
    assert MODELS["hda-duplex"].windows_function_hwid(mixer=True) == \
        "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0022&SUBSYS_1AF40022"
    assert MODELS["hda-output"].windows_function_hwid() == "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0011&SUBSYS_1AF40011"
    assert MODELS["hda-micro"].windows_function_hwid() == "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0031&SUBSYS_1AF40031"
    for ctrl in ("ich9-intel-hda", "intel-hda"):
        ids = MODELS[ctrl].function_hwids
        assert len(ids) == 6 and all(i.startswith("HDAUDIO\\FUNC_01&VEN_1AF4&") for i in ids)
        assert MODELS[ctrl].to_json()["windows_function_hwids"] == list(ids)
    assert MODELS["AC97"].function_hwids == () and MODELS["AC97"].windows_function_hwid() is None


def test_hda_controller_wait_follows_the_function_devnode() -> None:
    """A started PCI devnode of an HDA controller is only the bus driver: the wait must
    look at its HDAUDIO child (DEVPKEY_Device_Children) and that child's status."""
    gs = pnp_wait.started(HDA, 20)
    assert gs.params["FunctionIds"] == list(MODELS["ich9-intel-hda"].function_hwids)
    s = gs.script
    assert "Get-PnpDeviceProperty -KeyName 'DEVPKEY_Device_Children'" in s
    assert "$c = $byId[[string]$k]" in s and "@($c.HardwareID)" in s and "Get-PnpDevice -InstanceId" not in s
    assert "'started ' + $d.InstanceId + ' function ' + $f.InstanceId; exit 0" in s
    assert "DEVPKEY_Device_ProblemCode" in s
    # every function id travels as a literal inside $p, never in the template body
    body = s.split("}\n", 1)[1]
    for fid in MODELS["ich9-intel-hda"].function_hwids:
        assert "'" + fid + "'" in s.split("}\n", 1)[0] and fid not in body


def test_non_hda_devices_and_explicit_ids() -> None:
    assert pnp_wait.started(MODELS["AC97"].windows_hwid or "", 5).params["FunctionIds"] == []
    one = MODELS["hda-duplex"].windows_function_hwid() or ""
    assert pnp_wait.started(HDA, 5, function_ids=[one]).params["FunctionIds"] == [one]
    assert pnp_wait.started(HDA, 5, function_ids=()).params["FunctionIds"] == []


def test_parse_started_gives_the_instance_ids() -> None:
    pci = "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&267A616A&0&D8"
    func = "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021&REV_1001\\4&2F8B1D8E&0&0001"
    got = pnp_wait.parse_started(f"started {pci} function {func}\r\n")
    assert got == pnp_wait.Started(pci, func)
    assert pnp_wait.parse_started(f"started {pci}\n") == pnp_wait.Started(pci, None)
    assert pnp_wait.parse_started("not started: no device") is None
