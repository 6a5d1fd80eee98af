"""Waiting for a hot-plugged PCI device's PnP state in a Windows guest.

The Linux guest says "bound" with a bind uevent; Windows' equivalent is the device
node reaching the started state: ``Get-PnpDevice`` (PnpDevice module, Windows 8 /
Server 2012 and later) reports ``Status`` ``OK`` for a started device and ``Error``
with a problem code otherwise, and a device that left the system disappears from
``Get-PnpDevice -PresentOnly``. The device is found by its hardware id prefix
(``PCI\\VEN_8086&DEV_293E``, from the catalog), matched with ``-like`` after
``[WildcardPattern]::Escape`` so that no character of the id acts as a wildcard.

The loop runs in the guest, one agent round trip per wait (WinRM has no streaming
channel to pipeline it with the host's action), polling every 100 ms under its own
deadline; the host adds a margin for the round trip. Parameters are PowerShell
literals (``GuestScript`` -> ``build_script``), never pasted into the text.
"""

from __future__ import annotations

from lab.tracers.windows.common import GuestScript

POLL_MS = 100

STARTED = r"""
$deadline = [DateTime]::UtcNow.AddMilliseconds($p.TimeoutMs)
$pattern = [WildcardPattern]::Escape($p.HardwareId) + '*'
while ($true) {
    $devs = @(Get-PnpDevice -PresentOnly -ErrorAction SilentlyContinue |
              Where-Object { $_.InstanceId -like $pattern })
    $ok = @($devs | Where-Object { $_.Status -eq 'OK' })
    if ($ok.Count -gt 0) { 'started ' + $ok[0].InstanceId; exit 0 }
    if ([DateTime]::UtcNow -gt $deadline) {
        $seen = ($devs | ForEach-Object { $_.InstanceId + '=' + $_.Status }) -join ' '
        'not started: ' + $(if ($seen) { $seen } else { 'no device' }); exit 3
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


def started(hardware_id: str, timeout_s: float) -> GuestScript:
    """Exit 0 and print ``started <instance id>`` once a present device of that id is OK."""
    return GuestScript("pnp: wait started", STARTED,
                       {"HardwareId": hardware_id, "TimeoutMs": int(timeout_s * 1000),
                        "PollMs": POLL_MS}, timeout=timeout_s + MARGIN_S)


def gone(hardware_id: str, timeout_s: float) -> GuestScript:
    """Exit 0 and print ``gone`` once no present device has that id."""
    return GuestScript("pnp: wait gone", GONE,
                       {"HardwareId": hardware_id, "TimeoutMs": int(timeout_s * 1000),
                        "PollMs": POLL_MS}, timeout=timeout_s + MARGIN_S)
