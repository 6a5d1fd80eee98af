"""The PnP waits a Windows guest gets for plug/unplug (lab/windows/pnp_wait.py).

Checked without Windows: the exact script (against the documented PnpDevice module:
``Get-PnpDevice -PresentOnly``, ``Status`` OK for a started device), that the hardware
id travels as a literal and is matched without wildcards, and that the deadline is
the caller's.
"""

from __future__ import annotations

import pytest

from lab.agent.powershell import script_params
from lab.windows import pnp_wait
from vdevice.catalog import MODELS

HDA = MODELS["ich9-intel-hda"].windows_hwid


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
    assert "'started ' + $ok[0].InstanceId; exit 0" in s
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
