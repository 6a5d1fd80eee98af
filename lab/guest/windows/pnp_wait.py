"""Waiting for a hot-plugged PCI device's PnP state in a Windows guest.

The Linux guest says "bound" with a bind uevent; Windows' equivalent is the device
node reaching the started state: ``Get-PnpDevice`` (PnpDevice module, Windows 8 /
Server 2012 and later) reports ``Status`` ``OK`` for a started device and ``Error``
with a problem code otherwise, and a device that left the system disappears from
``Get-PnpDevice -PresentOnly``. The device is found by its hardware id prefix
(``PCI\\VEN_8086&DEV_293E``, from the catalog), matched with ``-like`` after
``[WildcardPattern]::Escape`` so that no character of the id acts as a wildcard.

HD Audio controllers (issue 10, point 9): the PCI function of ``ich9-intel-hda`` /
``intel-hda`` is driven by Microsoft's HD Audio bus driver, and a PortCls function
driver binds to the codec's child devnode (``HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021...``,
learn.microsoft.com/windows-hardware/drivers/install/identifiers-for-hdaudio-devices).
"PCI node started" proves only that the bus driver started, so for a controller whose
catalog entry lists function hardware ids the wait follows the PCI devnode's children
(``DEVPKEY_Device_Children``: "a list of the device instance IDs for the devices that
are children of a device instance", learn.microsoft.com/windows-hardware/drivers/
install/devpkey-device-children) to the function devnode whose ``HardwareID`` matches,
and waits for *that* to be started; a function with a problem code is reported with it
(``DEVPKEY_Device_ProblemCode`` on the piped device).

The loop runs in the guest, one agent round trip per wait (WinRM has no streaming
channel to pipeline it with the host's action), polling every 100 ms under its own
deadline; the host adds a margin for the round trip. Parameters are PowerShell
literals (``GuestScript`` -> ``build_script``), never pasted into the text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lab.guest.windows.trace.common import GuestScript
from vdevice.catalog import MODELS

POLL_MS = 100

STARTED = r"""
$deadline = [DateTime]::UtcNow.AddMilliseconds($p.TimeoutMs)
$pattern = [WildcardPattern]::Escape($p.HardwareId) + '*'
$funcPatterns = @($p.FunctionIds | ForEach-Object { [WildcardPattern]::Escape([string]$_) + '*' })
function Get-Function($dev, $byId) {
    # the HDAUDIO function devnode among the controller's children (DEVPKEY_Device_Children),
    # looked up by exact instance id among the present devices (no -InstanceId: whether
    # it globs is not settled, and '[' in an id would then match other devices)
    $kids = @(($dev | Get-PnpDeviceProperty -KeyName 'DEVPKEY_Device_Children' -ErrorAction SilentlyContinue).Data)
    foreach ($k in $kids) {
        if (-not $k) { continue }
        $c = $byId[[string]$k]
        if ($null -eq $c) { continue }
        foreach ($hw in @($c.HardwareID)) {
            foreach ($fp in $funcPatterns) { if ([string]$hw -like $fp) { return $c } }
        }
    }
    return $null
}
while ($true) {
    $all = @(Get-PnpDevice -PresentOnly -ErrorAction SilentlyContinue)
    $byId = @{}
    foreach ($x in $all) { $byId[[string]$x.InstanceId] = $x }
    $devs = @($all | Where-Object { $_.InstanceId -like $pattern })
    $ok = @($devs | Where-Object { $_.Status -eq 'OK' })
    $seenFunc = ''
    foreach ($d in $ok) {
        if ($funcPatterns.Count -eq 0) { 'started ' + $d.InstanceId; exit 0 }
        $f = Get-Function $d $byId
        if ($null -eq $f) { $seenFunc = $d.InstanceId + ' has no HDAUDIO function child (QEMU cannot hot-plug a codec: place the controller cold with one)'; continue }
        if ($f.Status -eq 'OK') { 'started ' + $d.InstanceId + ' function ' + $f.InstanceId; exit 0 }
        $code = ($f | Get-PnpDeviceProperty -KeyName 'DEVPKEY_Device_ProblemCode' -ErrorAction SilentlyContinue).Data
        $seenFunc = 'function ' + $f.InstanceId + '=' + $f.Status + ' problem ' + [string]$code
    }
    if ([DateTime]::UtcNow -gt $deadline) {
        $seen = ($devs | ForEach-Object { $_.InstanceId + '=' + $_.Status }) -join ' '
        'not started: ' + $(if ($seen) { $seen } else { 'no device' }) + $(if ($seenFunc) { '; ' + $seenFunc } else { '' })
        exit 3
    }
    Start-Sleep -Milliseconds $p.PollMs
}
"""

GONE = r"""
$deadline = [DateTime]::UtcNow.AddMilliseconds($p.TimeoutMs)
$pattern = [WildcardPattern]::Escape($p.HardwareId) + '*'
while ($true) {
    $devs = @(Get-PnpDevice -PresentOnly -ErrorAction SilentlyContinue |
              Where-Object { $_.InstanceId -like $pattern })
    if ($devs.Count -eq 0) { 'gone'; exit 0 }
    if ([DateTime]::UtcNow -gt $deadline) {
        'still present: ' + (($devs | ForEach-Object { $_.InstanceId }) -join ' '); exit 3
    }
    Start-Sleep -Milliseconds $p.PollMs
}
"""


# the round trip and PowerShell start-up on top of the guest-side deadline
MARGIN_S = 30.0


def function_ids_for(hardware_id: str) -> tuple[str, ...]:
    """The function devnode ids a driver binds to under the device of ``hardware_id``
    (an HDA controller's codec functions, from the catalog); empty for other devices."""
    for model in MODELS.values():
        if model.windows_hwid is not None and model.windows_hwid.upper() == hardware_id.upper():
            return model.function_hwids
    return ()


def started(hardware_id: str, timeout_s: float,
            function_ids: Sequence[str] | None = None) -> GuestScript:
    """Exit 0 and print ``started <instance id>`` once a present device of that id is OK.

    With ``function_ids`` (default: the catalog's for that hardware id, so an HDA
    controller's wait follows its codec's function devnode) it prints ``started <pci
    instance> function <function instance>`` once the function devnode is started too.
    """
    funcs = list(function_ids_for(hardware_id) if function_ids is None else function_ids)
    return GuestScript("pnp: wait started", STARTED,
                       {"HardwareId": hardware_id, "FunctionIds": funcs,
                        "TimeoutMs": int(timeout_s * 1000), "PollMs": POLL_MS},
                       timeout=timeout_s + MARGIN_S)


def gone(hardware_id: str, timeout_s: float) -> GuestScript:
    """Exit 0 and print ``gone`` once no present device has that id (its child devnodes
    leave with it)."""
    return GuestScript("pnp: wait gone", GONE,
                       {"HardwareId": hardware_id, "TimeoutMs": int(timeout_s * 1000),
                        "PollMs": POLL_MS}, timeout=timeout_s + MARGIN_S)


@dataclass(frozen=True)
class Started:
    """What a successful ``started`` wait reported: the PnP identity of the device."""

    instance_id: str
    function_instance_id: str | None = None


_STARTED_RE = re.compile(r"^started (\S+)(?: function (\S+))?\s*$", re.M)


def parse_started(stdout: str) -> Started | None:
    """The instance ids from a ``started`` wait's output (None when it did not start)."""
    m = _STARTED_RE.search(stdout)
    return Started(m[1], m[2]) if m else None
