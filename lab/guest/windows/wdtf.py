"""A Windows rebalance that really happens: WDTF's Enhanced Device Testing, driven over
the agent.

Windows does not stop a running device because the lab asks: ``pnputil`` has no
rebalance command (``/restart-device`` and ``/remove-device`` exercise removal and
start, not STOP), and hot-adding resource pressure or CPUs is no reliable trigger
(``lab.rebalance``). Microsoft's own HLK Device Fundamentals PnP tests use the Windows
Driver Test Framework's Enhanced Device Testing (EDT) filter driver for this, and so
does this module: it attaches the EDT filter to one device and asks it for one of
four documented sequences.

The object model (every name below checked against learn.microsoft.com):

* The WDTF aggregation object ``IWDTF2`` is created first; its ``DeviceDepot``
  (``IWDTFDeviceDepot2``) is queried with an SDEL string
  (windows-hardware/drivers/wdtf/creating-wdtf-scenarios, .../wdtf-architecture;
  ``IWDTFDeviceDepot2::Query``, ddi/wdtf/nf-wdtf-iwdtfdevicedepot2-query). The fixed
  query ``IsPhantom=false`` (present devices, as in the "Creating WDTF Scenarios"
  sample) is the only SDEL sent: the device is then picked in PowerShell by comparing
  ``IWDTFTarget2::GetValueString('DeviceID')`` (ddi/wdtf/nf-wdtf-iwdtftarget2-getvaluestring;
  ``DeviceID``: "Device identifier, including the instance identifier", wdtf/
  attribute-tokens-in-sdel) or the ``HardwareIDs`` attribute (``IWDTFTarget2::GetValue``,
  ddi/wdtf/nf-wdtf-iwdtftarget2-getvalue) with the lab's values, which travel as data
  (``$p``), never inside SDEL text.
* Actions come from ``IWDTFTarget2::GetInterface(ProgId)`` (ddi/wdtf/
  nf-wdtf-iwdtftarget2-getinterface; "Controlling Targets": ``GetInterface("PNP")``
  returns ``IWDTFPNPAction2``). The EDT action ``IWDTFEnhancedDeviceTestSupportAction2``
  is ProgId ``EDT`` (the WDK's WDTF sample scripts: ``GetInterfacesIfExist("EDT")`` then
  ``Enable()``; not stated on a docs page - ``HasInterface('EDT')`` is checked first and
  a guest without it is reported as such). Its ``IsEnabled()`` and ``Enable()`` (out:
  reboot required) are ddi/wdtfedtaction/nf-wdtfedtaction-iwdtfenhanceddevicetestsupportaction2-
  isenabled / -enable; ``Enable`` "attempt[s] to restart the target device by default"
  (-put_skiprestart), so it runs in its own step, before the host's evidence starts.
* ``IWDTFPNPAction2`` (ddi/wdtfpnpaction/nn-wdtfpnpaction-iwdtfpnpaction2) methods used,
  each "[out, retval] VARIANT_BOOL *pbSuccess", each needing EDT ``Enable`` first:
  ``EDTTryStopDevice`` (QUERY_STOP, STOP, restart), ``EDTTryStopDeviceRequestNewResources``
  ("attempts to force the device into a new set of hardware resources"),
  ``EDTTryStopDeviceFailRestart`` (the START after a successful query-stop and stop is
  failed, which "causes the system to surprise remove the device"), and
  ``EDTCancelStopDevice`` (the system sends QUERY_STOP and the helper driver fails it on
  purpose, so CANCEL_STOP follows; a filter above it may veto the query first). For all
  the stop variants "the Stop IRP is not guaranteed": another driver may fail
  QUERY_STOP (then CANCEL_STOP comes), and on a device that uses no hardware resources
  the system may send CANCEL_STOP instead; the docs' advice is to target a parent that
  has resources (for an HD Audio codec: the controller's PCI devnode).

The host side (``lab.rebalance.wdtf``) wraps the action in ``query-pci`` snapshots, so
"new resources" is proven by a BAR that moved, not by WDTF's success flag.

WDTF is not part of Windows: it ships with the WDK. ``rebalab image windows --wdtf
DIR`` installs its runtime MSI into the image (``images/windows/provision.ps1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.agent.base import Agent
from lab.errors import ConfigError, LabError
from lab.guest.windows.trace.common import GuestScript, looks_like_instance_id, run_structured
from lab.guest.windows.trace.pnp_state import problem_name

#: scenario action -> the IWDTFPNPAction2 method (ddi/wdtfpnpaction/nf-wdtfpnpaction-iwdtfpnpaction2-*)
ACTIONS: dict[str, str] = {
    "restart": "EDTTryStopDevice",
    "rebalance": "EDTTryStopDeviceRequestNewResources",
    "cancel-stop": "EDTCancelStopDevice",
    "fail-restart": "EDTTryStopDeviceFailRestart",
}

#: what the driver under test should see for each action, per the method's page; what
#: the run really shows comes from the driver's trace and the rules
EXPECTED: dict[str, str] = {
    "restart": "QUERY_STOP, STOP, then START with the same resources",
    "rebalance": "QUERY_STOP, STOP, then START with new resources (the host must see a BAR move)",
    "cancel-stop": "QUERY_STOP failed by the EDT helper, then CANCEL_STOP (the driver may see "
                   "CANCEL_STOP with no QUERY_STOP: allowed)",
    "fail-restart": "QUERY_STOP, STOP, a START failed by the EDT filter, then SURPRISE_REMOVAL "
                    "and REMOVE",
}

#: how a missing WDTF is fixed; named in every error that finds it missing
INSTALL_HINT = ("build the image with `rebalab image windows --wdtf DIR`, DIR holding the WDTF "
                "runtime .msi and .cab files of your WDK (%ProgramFiles(x86)%\\Windows Kits\\10\\"
                "Testing\\Runtimes, the files for the guest's architecture)")

#: the progids tried in order: the WDK samples create "WDTF2.WDTF" (IWDTF2), the docs'
#: VBScript sample "WDTF.WDTF". ``$match`` is the device test: by exact instance id when
#: one is given (the action script always has it), else by hardware id, an exact
#: element of the device's HardwareIDs (a PCI function lists ``PCI\VEN_v&DEV_d`` among
#: them, learn.microsoft.com/windows-hardware/drivers/install/identifiers-for-pci-devices;
#: an HDAUDIO function its id without REV, .../identifiers-for-hdaudio-devices).
_CREATE = r"""
$wdtf = $null; $errs = @()
foreach ($progId in @('WDTF2.WDTF', 'WDTF.WDTF')) {
    try { $wdtf = New-Object -ComObject $progId; break } catch { $errs += ('{0}: {1}' -f $progId, $_.Exception.Message) }
}
if ($null -eq $wdtf) { [pscustomobject]@{ Wdtf = 'missing'; Error = ($errs -join '; ') }; return }
"""

_FIND = r"""
$found = @()
foreach ($t in @($wdtf.DeviceDepot.Query('IsPhantom=false'))) {
    $id = [string]$t.GetValueString('DeviceID')
    if ($p.InstanceId) { if ($id -eq [string]$p.InstanceId) { $found += $t }; continue }
    $hw = @(@($t.GetValue('HardwareIDs')) | ForEach-Object { [string]$_ })
    foreach ($h in @($p.HardwareIds)) { if ($hw -contains [string]$h) { $found += $t; break } }
}
if ($found.Count -ne 1) {
    [pscustomobject]@{ Wdtf = 'ok'; Matches = $found.Count; Candidates = @($found | ForEach-Object { [string]$_.GetValueString('DeviceID') }) }
    return
}
$target = $found[0]
"""

# the action names the device by the exact instance id the prepare step found
_FIND_ID = r"""
$target = $null
foreach ($t in @($wdtf.DeviceDepot.Query('IsPhantom=false'))) {
    if ([string]$t.GetValueString('DeviceID') -eq [string]$p.InstanceId) { $target = $t; break }
}
if ($null -eq $target) { [pscustomobject]@{ Wdtf = 'ok'; Matches = 0 }; return }
"""

_EDT = r"""
$r = [ordered]@{ Wdtf = 'ok'; Matches = 1; InstanceId = [string]$target.GetValueString('DeviceID'); Edt = 'ok' }
if (-not $target.HasInterface('EDT')) { $r.Edt = 'missing'; [pscustomobject]$r; return }
$edt = $target.GetInterface('EDT')
"""

_PREPARE = _CREATE + _FIND + _EDT + r"""
$r.WasEnabled = [bool]$edt.IsEnabled()
$r.RebootRequired = $false
if (-not $r.WasEnabled) { $r.RebootRequired = [bool]$edt.Enable() }
$r.Enabled = [bool]$edt.IsEnabled()
[pscustomobject]$r
"""

# The device afterwards is found among Get-PnpDevice -PresentOnly by exact instance id
# (not -InstanceId: whether that parameter globs is not settled, and '[' in an id would
# match other devices).
_ACTION = _CREATE + _FIND_ID + _EDT + r"""
if (-not [bool]$edt.IsEnabled()) { $r.Edt = 'disabled'; [pscustomobject]$r; return }
$pnp = $target.GetInterface('PNP')
$r.Method = [string]$p.Method; $r.Success = $null; $r.Error = $null; $r.HResult = $null
$r.StartedUtcFileTime = [DateTime]::UtcNow.ToFileTimeUtc()
$sw = [Diagnostics.Stopwatch]::StartNew()
try {
    switch ($r.Method) {
        'EDTTryStopDevice' { $r.Success = [bool]$pnp.EDTTryStopDevice() }
        'EDTTryStopDeviceRequestNewResources' { $r.Success = [bool]$pnp.EDTTryStopDeviceRequestNewResources() }
        'EDTTryStopDeviceFailRestart' { $r.Success = [bool]$pnp.EDTTryStopDeviceFailRestart() }
        'EDTCancelStopDevice' { $r.Success = [bool]$pnp.EDTCancelStopDevice() }
        default { throw ('not a lab WDTF action: {0}' -f $r.Method) }
    }
} catch { $r.Error = [string]$_.Exception.Message; $r.HResult = [int64]$_.Exception.HResult }
$r.ElapsedMs = $sw.Elapsed.TotalMilliseconds
$after = @(Get-PnpDevice -PresentOnly -ErrorAction SilentlyContinue | Where-Object { [string]$_.InstanceId -eq $r.InstanceId })
$r.PresentAfter = ($after.Count -gt 0); $r.StatusAfter = $null; $r.ProblemCodeAfter = $null
if ($r.PresentAfter) {
    $r.StatusAfter = [string]$after[0].Status
    $pc = ($after[0] | Get-PnpDeviceProperty -KeyName 'DEVPKEY_Device_ProblemCode' -ErrorAction SilentlyContinue).Data
    if ($null -ne $pc) { $r.ProblemCodeAfter = [int64]$pc }
}
[pscustomobject]$r
"""


class WdtfMissing(LabError):
    """WDTF (or its EDT action) is not installed in the guest image."""


@dataclass(frozen=True)
class WdtfTarget:
    """How the device is named to WDTF: its exact instance id, or its hardware ids."""

    hardware_ids: tuple[str, ...] = ()
    instance_id: str | None = None

    def __post_init__(self) -> None:
        if self.instance_id is not None:
            if not looks_like_instance_id(self.instance_id):
                raise ConfigError(f"not a device instance id: {self.instance_id!r} "
                                  "(ENUMERATOR\\DEVICE-ID\\INSTANCE, e.g. PCI\\VEN_8086&DEV_2415&...\\3&...)")
        elif not self.hardware_ids:
            raise ConfigError("a WDTF target needs an instance id or at least one hardware id")
        for h in self.hardware_ids:
            if not h or "\n" in h or "\x00" in h:
                raise ConfigError(f"not a hardware id: {h!r}")

    def params(self) -> dict[str, Any]:
        return {"InstanceId": self.instance_id or "", "HardwareIds": list(self.hardware_ids)}

    def describe(self) -> str:
        return self.instance_id or " or ".join(self.hardware_ids)


@dataclass(frozen=True)
class Prepared:
    """The target found and the EDT filter attached (``enabled_now``: by this call)."""

    instance_id: str
    was_enabled: bool
    enabled_now: bool


@dataclass(frozen=True)
class Outcome:
    """What one WDTF action reported, and the device's PnP state right after it."""

    action: str
    method: str
    instance_id: str
    success: bool | None
    error: str | None
    hresult: int | None
    elapsed_ms: float | None
    started_filetime: int | None
    present_after: bool
    status_after: str | None
    problem_after: int | None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        said = ("WDTF reported success" if self.success else
                "WDTF reported no success" if self.success is False else
                f"WDTF failed: {self.error}")
        state = ("gone from the guest" if not self.present_after else
                 f"status {self.status_after or '?'}"
                 + (f", problem code {self.problem_after} ({problem_name(self.problem_after)})"
                    if self.problem_after else ""))
        return f"{self.method} on {self.instance_id}: {said}; afterwards {state}"

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "method": self.method, "instance_id": self.instance_id,
                "success": self.success, "error": self.error, "hresult": self.hresult,
                "elapsed_ms": self.elapsed_ms, "started_filetime": self.started_filetime,
                "present_after": self.present_after, "status_after": self.status_after,
                "problem_after": self.problem_after, "expected": EXPECTED[self.action]}


def method_for(action: str) -> str:
    try:
        return ACTIONS[action]
    except KeyError:
        raise ConfigError(f"unknown WDTF action {action!r}; one of {', '.join(ACTIONS)}") from None


def prepare_script(target: WdtfTarget) -> GuestScript:
    """Find the device and attach the EDT filter unless it is already attached."""
    return GuestScript("wdtf: find the device, enable EDT", _PREPARE, target.params(),
                       structured=True, depth=3, timeout=180.0)


def action_script(action: str, instance_id: str) -> GuestScript:
    """Run one EDT action on the device with exactly ``instance_id``."""
    target = WdtfTarget(instance_id=instance_id)
    return GuestScript(f"wdtf: {action} ({method_for(action)})", _ACTION,
                       {"InstanceId": target.instance_id or "", "Method": method_for(action)},
                       structured=True, depth=3, timeout=300.0)


def _one(records: Sequence[Any], what: str) -> Mapping[str, Any]:
    recs = [r for r in records if isinstance(r, Mapping)]
    if len(recs) != 1:
        raise LabError(f"{what}: the guest returned {len(recs)} records, expected one")
    return recs[0]


def _common(rec: Mapping[str, Any], target_text: str) -> str:
    """Checks both scripts share; returns the instance id."""
    if rec.get("Wdtf") == "missing":
        raise WdtfMissing(f"WDTF is not installed in the guest ({rec.get('Error') or 'no WDTF COM object'}): "
                          + INSTALL_HINT)
    matches = rec.get("Matches")
    if matches == 0:
        raise LabError(f"WDTF found no present device {target_text} (is the device plugged and "
                       "enumerated? for an HDA controller the codec function is a child devnode)")
    if matches != 1:
        cands = ", ".join(str(c) for c in rec.get("Candidates") or []) or "?"
        raise LabError(f"WDTF found {matches} devices {target_text} ({cands}); name one with "
                       "'instance:' in the step")
    instance = str(rec.get("InstanceId") or "")
    if not instance:
        raise LabError(f"WDTF's answer names no instance id: {dict(rec)!r}"[:300])
    if rec.get("Edt") == "missing":
        raise WdtfMissing(f"WDTF is installed but offers no EDT action for {instance} (the Enhanced "
                          "Device Testing filter, msdmfilt): " + INSTALL_HINT)
    return instance


def parse_prepare(records: Sequence[Any], target: WdtfTarget) -> Prepared:
    rec = _one(records, "wdtf prepare")
    instance = _common(rec, f"with {target.describe()}")
    if rec.get("RebootRequired"):
        raise LabError(f"enabling WDTF's EDT filter on {instance} needs a guest restart, which the "
                       "lab does not do in the middle of a run: boot the image once with the "
                       "device present, enable EDT there (WDTF's EnableEDT sample), and start again")
    if not rec.get("Enabled"):
        raise LabError(f"WDTF's EDT filter is still not enabled on {instance} after Enable()")
    was = bool(rec.get("WasEnabled"))
    return Prepared(instance, was_enabled=was, enabled_now=not was)


def _int(v: Any) -> int | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def parse_action(records: Sequence[Any], action: str, instance_id: str) -> Outcome:
    rec = _one(records, f"wdtf {action}")
    instance = _common(rec, f"with instance id {instance_id}")
    if rec.get("Edt") == "disabled":
        raise LabError(f"WDTF's EDT filter is not enabled on {instance}: the prepare step must "
                       "run first (it did not, or the device was re-installed in between)")
    success = rec.get("Success")
    elapsed = rec.get("ElapsedMs")
    return Outcome(
        action=action, method=str(rec.get("Method") or method_for(action)), instance_id=instance,
        success=bool(success) if isinstance(success, bool) else None,
        error=str(rec["Error"]) if rec.get("Error") else None, hresult=_int(rec.get("HResult")),
        elapsed_ms=float(elapsed) if isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool)
        else None,
        started_filetime=_int(rec.get("StartedUtcFileTime")),
        present_after=bool(rec.get("PresentAfter")),
        status_after=str(rec["StatusAfter"]) if rec.get("StatusAfter") else None,
        problem_after=_int(rec.get("ProblemCodeAfter")), raw=dict(rec))


def prepare(agent: Agent, target: WdtfTarget) -> Prepared:
    """Find the device and attach the EDT filter (``WdtfMissing`` names the fix)."""
    return parse_prepare(run_structured(agent, prepare_script(target)), target)


def run_action(agent: Agent, action: str, instance_id: str) -> Outcome:
    """Run ``action`` on the prepared device and report it; a COM failure of the method
    itself is reported in the outcome (``error``), not raised: the driver may be why."""
    return parse_action(run_structured(agent, action_script(action, instance_id)), action,
                        instance_id)


def planned_scripts() -> list[GuestScript]:
    """Every script this module sends, with sample parameters: the golden file's input."""
    target = WdtfTarget(hardware_ids=("PCI\\VEN_8086&DEV_2415",))
    out = [prepare_script(target)]
    out += [action_script(a, "PCI\\VEN_8086&DEV_2415&SUBSYS_11001AF4&REV_01\\3&267A616A&0&18")
            for a in ACTIONS]
    return out


__all__ = ["ACTIONS", "EXPECTED", "INSTALL_HINT", "Outcome", "Prepared", "WdtfMissing",
           "WdtfTarget", "action_script", "method_for", "parse_action", "parse_prepare",
           "planned_scripts", "prepare", "prepare_script", "run_action"]
