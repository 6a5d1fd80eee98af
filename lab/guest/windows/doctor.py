"""``rebalab doctor``, the Windows half: each assumption the lab makes about a Windows
guest, checked through the agent, one line each with the fix when it fails.

Every check is a pinned PowerShell script (``GuestScript``: a fixed template, values
as literals) and a pure function from that script's output to a ``Check``, so the
verdicts are unit-tested on recorded outputs in the formats Microsoft documents
(tests/unit/test_doctor_windows.py) and ``windows_checks`` only runs the scripts. A
script that cannot run at all (the agent fails) is a failed check naming the error,
never a crash: the doctor's job is to report every problem at once.

What each check relies on, and where it is documented:

* PowerShell: ``$PSVersionTable.PSVersion``; the lab's scripts target Windows
  PowerShell 5.1 (about_Automatic_Variables, ``$PSVersionTable``).
* Administrator: ``WindowsPrincipal.IsInRole(WindowsBuiltInRole.Administrator)``;
  ETW sessions and bcdedit need an elevated token. Over WinRM a local administrator gets
  one only with ``LocalAccountTokenFilterPolicy`` = 1 (provision.ps1 sets it).
* The device under test: ``Get-PnpDevice -PresentOnly`` and ``Get-PnpDeviceProperty``
  ``DEVPKEY_Device_ProblemCode`` / ``DEVPKEY_Device_DriverInfPath`` (the script of
  ``lab.guest.windows.driver_check``; for HD Audio the codec's HDAUDIO function devnode).
* Kernel-PnP event ids on this build: ``(Get-WinEvent -ListProvider
  Microsoft-Windows-Kernel-PnP).Events`` (ProviderMetadata.Events, each an EventMetadata
  with ``Id``: learn.microsoft.com/dotnet/api/system.diagnostics.eventing.reader.
  providermetadata.events). The ids the Windows rules read must be defined.
* An ETW session as administrator: ``logman create trace ... -ets`` then ``logman stop
  ... -ets`` (learn.microsoft.com/windows-server/administration/windows-commands/
  logman-create-trace), with the exit codes reported.
* Test signing: ``bcdedit /enum {current}`` lists ``testsigning Yes`` when on
  (learn.microsoft.com/windows-hardware/drivers/install/the-testsigning-boot-
  configuration-option; ``bcdedit /set testsigning on``, then reboot). bcdedit's values
  may be localised: an output with no ``testsigning`` line in English is reported as
  unreadable, with the output, not as off.
* WDTF: ``New-Object -ComObject WDTF.WDTF`` and its ``DeviceDepot``
  (learn.microsoft.com/windows-hardware/drivers/wdtf/creating-wdtf-scenarios:
  ``CreateObject("WDTF.WDTF")``, ``WDTF.DeviceDepot.Query(...)``); WDTF comes with the
  user's WDK.
* The clock exchange's bound (``lab.guest.windows.trace.clock_exchange``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lab.agent.base import Agent, CommandResult
from lab.agent.powershell import PsOutputError, decode_structured
from lab.doctor import Check  # noqa: F401  (one Check type for both halves; re-exported)
from lab.errors import LabError
from lab.guest.windows.trace import clock_exchange
from lab.guest.windows.trace.common import GuestScript, run_script
from lab.guest.windows.trace.etw import ALL_KEYWORDS, KERNEL_PNP_GUID, KERNEL_PNP_NAME, EventMap
from lab.guest.windows import driver_check
from vdevice.catalog import DeviceModel


# --------------------------------------------------------------- pinned scripts

PS_VERSION = GuestScript("doctor: PowerShell version", "$PSVersionTable.PSVersion.ToString()\n", {},
                         timeout=60.0)

ADMIN = GuestScript("doctor: administrator", r"""
$id = [Security.Principal.WindowsIdentity]::GetCurrent()
([Security.Principal.WindowsPrincipal]$id).IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)
""", {}, timeout=60.0)

KERNEL_PNP_IDS = GuestScript("doctor: Kernel-PnP event ids", r"""
$meta = Get-WinEvent -ListProvider $p.Provider -ErrorAction Stop
foreach ($e in @($meta.Events)) { [Console]::Out.WriteLine([string]$e.Id) }
""", {"Provider": KERNEL_PNP_NAME}, timeout=120.0)

ETW_SESSION = GuestScript("doctor: ETW session start/stop", r"""
New-Item -ItemType Directory -Force -Path (Split-Path -Parent $p.Etl) | Out-Null
$null = & { $ErrorActionPreference = 'Continue'; & logman.exe stop $p.Session -ets 2>&1 }
$out = & { $ErrorActionPreference = 'Continue'; & logman.exe create trace $p.Session -o $p.Etl -p $p.Provider $p.Keywords $p.Level -ow -ets 2>&1 }
$create = $LASTEXITCODE
[Console]::Out.WriteLine('create ' + $create + ' ' + (($out | ForEach-Object { [string]$_ }) -join ' '))
if ($create -eq 0) {
    $out = & { $ErrorActionPreference = 'Continue'; & logman.exe stop $p.Session -ets 2>&1 }
    [Console]::Out.WriteLine('stop ' + $LASTEXITCODE + ' ' + (($out | ForEach-Object { [string]$_ }) -join ' '))
    Remove-Item -LiteralPath $p.Etl -ErrorAction SilentlyContinue
}
""", {"Session": "rebalab-doctor", "Etl": "C:\\rebalab\\doctor.etl", "Provider": KERNEL_PNP_GUID,
      # strings, not bare tokens: PowerShell would read 0xFFFFFFFFFFFFFFFF as the number -1
      "Keywords": ALL_KEYWORDS, "Level": "0x5"},
    timeout=120.0)

TEST_SIGNING = GuestScript("doctor: test signing", r"""
$out = & { $ErrorActionPreference = 'Continue'; & bcdedit.exe /enum '{current}' 2>&1 }
[Console]::Out.WriteLine('exit ' + $LASTEXITCODE)
$out | ForEach-Object { [Console]::Out.WriteLine([string]$_) }
""", {}, timeout=60.0)

WDTF = GuestScript("doctor: WDTF", r"""
try {
    $w = New-Object -ComObject WDTF.WDTF
    if ($null -eq $w.DeviceDepot) { 'wdtf no-depot' } else { 'wdtf ok' }
} catch { 'wdtf missing ' + $_.Exception.Message }
""", {}, timeout=120.0)


# --------------------------------------------------------------- verdicts on outputs

def check_powershell(res: CommandResult) -> Check:
    text = res.stdout.strip()
    m = re.match(r"^(\d+)\.(\d+)", text)
    if res.exit_status != 0 or not m:
        return Check("powershell", False, f"could not read the PowerShell version: {(text or res.stderr)[-200:]!r}",
                     "make `powershell.exe` (Windows PowerShell 5.1) the agent's shell")
    ver = (int(m[1]), int(m[2]))
    if ver < (5, 1):
        return Check("powershell", False, f"PowerShell {text}: the lab's scripts need 5.1",
                     "install Windows Management Framework 5.1, or use Windows 10/Server 2016 or later")
    return Check("powershell", True, f"PowerShell {text}")


def check_admin(res: CommandResult) -> Check:
    text = res.stdout.strip()
    if res.exit_status == 0 and text.lower() == "true":
        return Check("administrator", True, "the agent's token is elevated (Administrators)")
    return Check("administrator", False, f"the agent is not an elevated administrator ({text or res.stderr.strip()[-120:]})",
                 "log in as a member of Administrators; over WinRM with a local account set "
                 "HKLM\\SOFTWARE\\Microsoft\\Windows\\CurrentVersion\\Policies\\System\\LocalAccountTokenFilterPolicy=1 "
                 "(the image's provision.ps1 does)")


#: the ids the Windows rules read (lab/rules/windows_pnp.py through the event table)
REQUIRED_EVENT_IDS = (219, 410, 411, 420)


def check_kernel_pnp_ids(res: CommandResult, event_map: EventMap | None = None,
                         required: Iterable[int] = REQUIRED_EVENT_IDS) -> Check:
    if res.exit_status != 0:
        return Check("kernel-pnp events", False,
                     f"Get-WinEvent -ListProvider {KERNEL_PNP_NAME} failed: {(res.stderr or res.stdout).strip()[-200:]}",
                     "run as administrator; the provider ships with Windows 10 and later")
    have = {int(x) for x in re.findall(r"^\s*(\d+)\s*$", res.stdout, re.M)}
    need = sorted(set(required))
    missing = [i for i in need if i not in have]
    unknown = (event_map or EventMap()).unconfirmed(have)
    if missing:
        return Check("kernel-pnp events", False,
                     f"this build's {KERNEL_PNP_NAME} defines {len(have)} events but not {missing}, which the "
                     "Windows rules read",
                     "compare with `wevtutil gp Microsoft-Windows-Kernel-PnP /ge /gm:true` and correct the "
                     "event table with an event map file (lab.guest.windows.trace.etw.EventMap.load)")
    extra = f"; table ids not on this build (ignored): {unknown}" if unknown else ""
    return Check("kernel-pnp events", True, f"{len(have)} events defined, {need} present{extra}")


_ACCESS_DENIED = {5, -2147024891, 2147942405}      # ERROR_ACCESS_DENIED, as code or HRESULT 0x80070005
_ALREADY_EXISTS = {183, -2144337737, 2150629559, -2147024713, 2147942583}   # 0x803000B7 / 0x800700B7


def check_etw_session(res: CommandResult) -> Check:
    lines = {m[1]: (int(m[2]), m[3].strip()) for m in re.finditer(r"^(create|stop) (-?\d+) ?(.*)$", res.stdout, re.M)}
    if "create" not in lines:
        return Check("etw session", False, f"the session test did not run: {(res.stderr or res.stdout).strip()[-200:]}",
                     "run the agent as an administrator")
    code, text = lines["create"]
    if code != 0:
        if code in _ACCESS_DENIED:
            fix = "ETW sessions need an elevated administrator: see the administrator check"
        elif code in _ALREADY_EXISTS:
            fix = "a session of that name is left over: `logman stop rebalab-doctor -ets`"
        else:
            fix = "read logman's message; `logman query -ets` lists running sessions (at most 64)"
        return Check("etw session", False, f"logman create trace failed with {code}: {text[-200:]}", fix)
    stop = lines.get("stop")
    if stop is None or stop[0] != 0:
        return Check("etw session", False, f"logman stop failed: {stop}",
                     "`logman query -ets`; stop the session by hand with `logman stop rebalab-doctor -ets`")
    return Check("etw session", True, "logman created and stopped a Kernel-PnP session")


def check_test_signing(res: CommandResult) -> Check:
    m = re.search(r"^exit (-?\d+)", res.stdout, re.M)
    code = int(m[1]) if m else res.exit_status
    body = res.stdout.split("\n", 1)[1] if "\n" in res.stdout else ""
    fix_on = ("`bcdedit /set testsigning on` as administrator and reboot (Secure Boot must be off: the "
              "lab's OVMF build has none); the image's provision.ps1 does this")
    if code != 0:
        return Check("test signing", False, f"bcdedit failed ({code}): {body.strip()[-200:]}",
                     "run as administrator (bcdedit needs an elevated token)")
    line = re.search(r"^testsigning\s+(\S+)\s*$", body, re.M | re.I)
    if line is None:
        if re.search(r"^identifier\s+\{current\}", body, re.M | re.I):
            return Check("test signing", False, "bcdedit lists no testsigning entry: test signing is off", fix_on)
        return Check("test signing", False, f"bcdedit's output could not be read (localised?): {body.strip()[:200]!r}",
                     "check `bcdedit /enum {current}` by hand for testsigning Yes")
    if line[1].lower() == "yes":
        return Check("test signing", True, "testsigning Yes in the current boot entry")
    return Check("test signing", False, f"testsigning {line[1]}", fix_on)


def check_wdtf(res: CommandResult) -> Check:
    text = res.stdout.strip()
    if text.startswith("wdtf ok"):
        return Check("wdtf", True, "WDTF.WDTF COM object and its DeviceDepot are available")
    return Check("wdtf", False, f"WDTF is not usable: {(text or res.stderr.strip())[-200:]}",
                 "install WDTF from your WDK (the WDTF runtime in the WDK's Testing\\Runtimes folder; WDTF "
                 "Quick Start); the rebalance trigger drives WDTF's EDT actions")


def check_device(records: Sequence[Any], hardware_ids: Sequence[str]) -> Check:
    devices = driver_check.parse_state(records)
    want = ", ".join(hardware_ids)
    if not devices:
        return Check("device under test", False, f"no present device matches {want}",
                     "plug the device (cold, with a codec for HD Audio) in the topology the doctor boots")
    bad = [d for d in devices if d.problem_code or d.status.upper() != "OK"]
    desc = "; ".join(f"{d.instance_id} status {d.status}"
                     + (f" problem {d.problem_code} ({d.problem})" if d.problem_code else "") for d in devices)
    if len(bad) == len(devices):
        return Check("device under test", False, desc,
                     "read C:\\Windows\\INF\\setupapi.dev.log in the guest; problem codes: "
                     "learn.microsoft.com/windows-hardware/drivers/install/device-manager-error-messages")
    return Check("device under test", True, desc)


def check_driver(records: Sequence[Any], driver: Mapping[str, Any] | None, hardware_ids: Sequence[str]) -> Check:
    if not driver:
        return Check("driver bound", False, "the image records no driver under test",
                     "build the image with `rebalab image windows --driver DIR`")
    try:
        d = driver_check.check_bound(driver_check.parse_state(records), driver, hardware_ids)
    except driver_check.DriverNotBound as exc:
        text = str(exc)
        detail, _, fix = text.partition(". Check that ")
        return Check("driver bound", False, detail, ("check that " + fix) if fix else "see the detail")
    return Check("driver bound", True, f"{d.instance_id} runs {d.driver_inf} (service {d.service or '-'})")


def check_clock(result: clock_exchange.ExchangeResult, limit_ns: int) -> Check:
    text = result.describe()
    if result.bound_ns <= limit_ns:
        return Check("clock exchange", True, text)
    return Check("clock exchange", False, f"{text}; over the {limit_ns / 1e6:.0f} ms the timeline needs",
                 "a slow agent round trip: check the host's load, prefer WinRM over a local port forward; "
                 "guest events are placed with this bound")


# --------------------------------------------------------------- running them

def _run(agent: Agent, gs: GuestScript) -> CommandResult:
    try:
        return run_script(agent, gs)
    except LabError as exc:
        return CommandResult(gs.label, -1, "", f"{type(exc).__name__}: {exc}", 0.0)


def _structured(agent: Agent, gs: GuestScript) -> tuple[list[Any] | None, str]:
    res = _run(agent, gs)
    if res.exit_status != 0:
        return None, (res.stderr or res.stdout).strip()[-200:]
    try:
        return decode_structured(res.stdout), ""
    except PsOutputError as exc:
        return None, str(exc)


def windows_checks(agent: Agent, device: str | DeviceModel | None = None, *,
                   driver: Mapping[str, Any] | None = None, event_map: EventMap | None = None,
                   clock_limit_ns: int = 50_000_000,
                   clock: Callable[[Agent], clock_exchange.ExchangeResult] | None = None) -> list[Check]:
    """Every Windows check, in order; ``device`` (a catalog model or a hardware id) adds
    the device and driver checks, ``driver`` is the image manifest's ``driver`` record."""
    checks = [check_powershell(_run(agent, PS_VERSION)), check_admin(_run(agent, ADMIN)),
              check_kernel_pnp_ids(_run(agent, KERNEL_PNP_IDS), event_map),
              check_etw_session(_run(agent, ETW_SESSION)), check_test_signing(_run(agent, TEST_SIGNING)),
              check_wdtf(_run(agent, WDTF))]
    if device is not None:
        hwids = driver_check.target_hwids(device)
        records, err = _structured(agent, driver_check.state_script(hwids))
        if records is None:
            checks.append(Check("device under test", False, f"Get-PnpDevice failed: {err}",
                                "run as administrator; the PnpDevice module needs Windows 8 or later"))
        else:
            checks.append(check_device(records, hwids))
            checks.append(check_driver(records, driver, hwids))
    try:
        result = (clock or (lambda a: clock_exchange.exchange(a)))(agent)
        checks.append(check_clock(result, clock_limit_ns))
    except LabError as exc:
        checks.append(Check("clock exchange", False, f"no answer: {exc}", "see the agent checks above"))
    return checks
