"""The driver under test: what ``pnputil`` said at image build, and whether it is bound.

Image build (issue 10, point 4). ``rebalab image windows --driver`` runs ``pnputil
/add-driver <inf> /subdirs /install`` in the install VM, which has no virtual device
under test. PnPUtil's documented return values
(learn.microsoft.com/windows-hardware/drivers/devtest/pnputil-return-values):
0 ERROR_SUCCESS; 259 ERROR_NO_MORE_ITEMS, "no devices match the supplied driver or the
target device is already using a better or newer driver than the driver specified for
installation"; 3010 ERROR_SUCCESS_REBOOT_REQUIRED. So 259 there means *staged, no
device yet*, not failure; ``images/windows/provision.ps1`` carries the same table
(``$PnputilOutcome``; a unit test keeps the two equal).

First boot with the device (``verify_bound``). Staged is not installed: when the lab
boots the image with the virtual device present, Windows matches the staged package and
installs it. The check reads, for every present device whose hardware ids match the
device under test (for an HDA controller: its codec's ``HDAUDIO`` function devnode, where
a PortCls driver binds), the instance id, ``Status``, ``DEVPKEY_Device_ProblemCode`` and
``DEVPKEY_Device_DriverInfPath`` (the ``oemNN.inf`` the device's driver came from), and
fails with what to do when the device is missing, has a problem code, or runs another
driver than the packages the image published (``Get-WindowsDriver -Online`` at build).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lab.agent.base import Agent
from lab.errors import LabError
from lab.guest.windows.trace.common import GuestScript, run_structured
from lab.guest.windows.trace.pnp_state import problem_name
from vdevice.catalog import DeviceModel, get_model

#: pnputil exit code -> outcome; anything else is a failure (pnputil-return-values, above)
PNPUTIL_OUTCOME: dict[int, str] = {0: "installed", 259: "staged-no-device",
                                   3010: "installed-reboot-required"}
ERROR_NO_MORE_ITEMS = 259


def pnputil_outcome(code: int | None) -> str:
    """``installed``, ``staged-no-device``, ``installed-reboot-required`` or ``failed``."""
    if code is None:
        return "failed"
    return PNPUTIL_OUTCOME.get(int(code), "failed")


def describe_pnputil(code: int | None) -> str:
    """One line for the build log: what the exit code means for the user."""
    outcome = pnputil_outcome(code)
    if outcome == "staged-no-device":
        return (f"pnputil exit {code} (ERROR_NO_MORE_ITEMS): the driver package is staged in the "
                "driver store; no device in the install VM matched it (expected: the virtual "
                "device is not there). The lab's first boot with the device checks that it binds.")
    if outcome == "failed":
        return (f"pnputil exit {code}: the driver package was not added; see pnputil_output in the "
                "manifest and C:\\Windows\\INF\\setupapi.dev.log in the guest")
    return f"pnputil exit {code}: {outcome}"


class DriverNotBound(LabError):
    """The image's driver is not running on the virtual device under test."""


@dataclass(frozen=True)
class DeviceDriver:
    """One present devnode matching the device under test, as the guest reported it."""

    instance_id: str
    status: str
    problem_code: int | None
    driver_inf: str | None
    service: str | None
    hardware_ids: tuple[str, ...]

    @property
    def problem(self) -> str | None:
        return problem_name(self.problem_code)


_STATE = r"""
$patterns = @($p.HardwareIds | ForEach-Object { [WildcardPattern]::Escape([string]$_) + '*' })
foreach ($d in @(Get-PnpDevice -PresentOnly -ErrorAction SilentlyContinue)) {
    $hw = @($d.HardwareID) + @([string]$d.InstanceId)
    $hit = $false
    foreach ($h in $hw) { foreach ($q in $patterns) { if ([string]$h -like $q) { $hit = $true } } }
    if (-not $hit) { continue }
    $props = @{}
    foreach ($q in @($d | Get-PnpDeviceProperty -KeyName 'DEVPKEY_Device_ProblemCode', 'DEVPKEY_Device_DriverInfPath', 'DEVPKEY_Device_Service' -ErrorAction SilentlyContinue)) {
        $props[[string]$q.KeyName] = $q.Data
    }
    [pscustomobject]@{
        InstanceId = [string]$d.InstanceId
        Status = [string]$d.Status
        HardwareIds = @($d.HardwareID | ForEach-Object { [string]$_ })
        ProblemCode = if ($null -ne $props['DEVPKEY_Device_ProblemCode']) { [int64]$props['DEVPKEY_Device_ProblemCode'] } else { $null }
        DriverInfPath = if ($null -ne $props['DEVPKEY_Device_DriverInfPath']) { [string]$props['DEVPKEY_Device_DriverInfPath'] } else { $null }
        Service = if ($null -ne $props['DEVPKEY_Device_Service']) { [string]$props['DEVPKEY_Device_Service'] } else { $null }
    }
}
"""


def target_hwids(device: str | DeviceModel) -> tuple[str, ...]:
    """Where the driver under test binds: an HDA controller's codec functions, else the
    device's PCI hardware id; a string that is no catalog model is taken as a hardware id."""
    model: DeviceModel | None
    if isinstance(device, DeviceModel):
        model = device
    elif "\\" in device:
        return (device,)
    else:
        model = get_model(device)
    if model.function_hwids:
        return model.function_hwids
    if model.windows_function_hwid() is not None:          # a codec named directly
        return (model.windows_function_hwid() or "", model.windows_function_hwid(mixer=True) or "")
    if model.windows_hwid is None:
        raise LabError(f"{model.driver} has no Windows hardware id in the catalog")
    return (model.windows_hwid,)


def state_script(hardware_ids: Sequence[str]) -> GuestScript:
    """Present devnodes whose hardware ids start with one of ``hardware_ids``."""
    return GuestScript("driver: bound to the device under test", _STATE,
                       {"HardwareIds": [str(h) for h in hardware_ids]},
                       structured=True, depth=3, timeout=120.0)


def parse_state(records: Sequence[Any]) -> list[DeviceDriver]:
    out: list[DeviceDriver] = []
    for rec in records:
        if not isinstance(rec, Mapping) or not rec.get("InstanceId"):
            continue
        code = rec.get("ProblemCode")
        hw = rec.get("HardwareIds") or []
        out.append(DeviceDriver(
            instance_id=str(rec["InstanceId"]), status=str(rec.get("Status") or ""),
            problem_code=int(code) if isinstance(code, (int, str)) and str(code).strip().lstrip("-").isdigit() else None,
            driver_inf=str(rec["DriverInfPath"]) if rec.get("DriverInfPath") else None,
            service=str(rec["Service"]) if rec.get("Service") else None,
            hardware_ids=tuple(str(h) for h in (hw if isinstance(hw, list) else [hw]))))
    return out


def published_infs(driver: Mapping[str, Any] | None) -> set[str]:
    """The ``oemNN.inf`` names the image build recorded for the driver package(s)."""
    if not driver:
        return set()
    return {str(p.get("published_name", "")).lower() for p in driver.get("published") or []
            if isinstance(p, Mapping) and p.get("published_name")}


def check_bound(devices: Sequence[DeviceDriver], driver: Mapping[str, Any] | None,
                hardware_ids: Sequence[str]) -> DeviceDriver:
    """The devnode running the image's driver; ``DriverNotBound`` saying what to do otherwise."""
    want = ", ".join(hardware_ids)
    if not devices:
        raise DriverNotBound(
            f"no present device matches {want}: the virtual device under test is not in the guest "
            "(for an HDA controller: no codec function devnode; QEMU cannot hot-plug a codec, so "
            "place the controller cold with a codec in the topology)")
    published = published_infs(driver)
    lines = []
    for d in devices:
        if d.problem_code:
            lines.append(f"{d.instance_id}: problem code {d.problem_code} ({d.problem}), status {d.status}")
            continue
        if published and (d.driver_inf or "").lower() not in published:
            lines.append(f"{d.instance_id}: runs {d.driver_inf or 'no driver'} "
                         f"(service {d.service or '-'}), not the image's {', '.join(sorted(published))}")
            continue
        if d.status.upper() != "OK":
            lines.append(f"{d.instance_id}: status {d.status}")
            continue
        return d
    raise DriverNotBound(
        "the driver under test is not bound to the virtual device: " + "; ".join(lines)
        + ". Check that the INF's models section names " + want
        + " (for HD Audio the codec's HDAUDIO function id, not the controller's PCI id), that "
          "the test certificate is trusted and test signing is on, and read "
          "C:\\Windows\\INF\\setupapi.dev.log in the guest")


def verify_bound(agent: Agent, driver: Mapping[str, Any] | None,
                 device: str | DeviceModel) -> DeviceDriver | None:
    """At the lab's first boot of an image built with ``--driver``: the driver is bound to
    the device under test (None when the image has no driver to check)."""
    if not driver:
        return None
    hwids = target_hwids(device)
    return check_bound(parse_state(run_structured(agent, state_script(hwids))), driver, hwids)
