"""The Windows half of `rebalab doctor` on recorded outputs (issue 10).

The outputs are in the formats the documented commands print: ``$PSVersionTable.
PSVersion.ToString()`` ("5.1.22621.2506"), ``bcdedit /enum {current}`` (the "Windows
Boot Loader" block, one ``name value`` pair a line), logman's exit codes (0, or the
HRESULT 0x80070005 for access denied), the event ids of ``(Get-WinEvent
-ListProvider ...).Events`` one a line, and the device state script's records. Each
check must pass on the good output and fail, with a fix, on the bad one.
"""

from __future__ import annotations

import pytest

from lab.agent.base import CommandResult
from lab.guest.windows.doctor import (
    ADMIN,
    ETW_SESSION,
    KERNEL_PNP_IDS,
    PS_VERSION,
    TEST_SIGNING,
    WDTF,
    Check,
    check_admin,
    check_clock,
    check_device,
    check_driver,
    check_etw_session,
    check_kernel_pnp_ids,
    check_powershell,
    check_test_signing,
    check_wdtf,
    windows_checks,
)
from lab.guest.windows.trace import clock_exchange
from lab.guest.windows.trace.etw import EventMap
from lab.guest.windows.scripted_agent import FakeClock, ScriptedAgent, structured_stdout
from lab import clock
from vdevice.catalog import MODELS

FUNC = "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021&REV_1001\\4&2F8B1D8E&0&0001"
HWIDS = MODELS["ich9-intel-hda"].function_hwids
DRIVER = {"pnputil_exit_code": 259, "published": [{"inf": "mycodec.inf", "published_name": "oem7.inf"}]}

BCDEDIT_ON = """exit 0

Windows Boot Loader
-------------------
identifier              {current}
device                  partition=C:
path                    \\Windows\\system32\\winload.efi
description             Windows 11 Pro
locale                  en-US
inherit                 {bootloadersettings}
recoverysequence        {0c1b6f73-2a2d-11ee-9f1a-d9b0a7e6f2a1}
displaymessageoverride  Recovery
recoveryenabled         Yes
testsigning             Yes
isolatedcontext         Yes
allowedinmemorysettings 0x15000075
osdevice                partition=C:
systemroot              \\Windows
resumeobject            {0c1b6f71-2a2d-11ee-9f1a-d9b0a7e6f2a1}
nx                      OptIn
bootmenupolicy          Standard
"""
BCDEDIT_OFF = BCDEDIT_ON.replace("testsigning             Yes\n", "")
BCDEDIT_DENIED = ("exit 1\nThe boot configuration data store could not be opened.\n"
                  "Access is denied.\n")
# event ids of Microsoft-Windows-Kernel-PnP on a Windows 10 build (subset, one a line)
IDS_OK = "\r\n".join(str(i) for i in (219, 223, 224, 225, 400, 410, 411, 420, 421, 430, 800, 803, 804,
                                      850, 851, 852, 853)) + "\r\n"


def r(stdout: str, status: int = 0, stderr: str = "") -> CommandResult:
    return CommandResult("x", status, stdout, stderr, 0.1)


def test_check_line_format() -> None:
    assert Check("a", True, "fine").line() == "ok    a: fine"
    assert Check("b", False, "broken", "do this").line() == "FAIL  b: broken -> fix: do this"


@pytest.mark.parametrize("out, ok", [("5.1.22621.2506\r\n", True), ("7.4.6\r\n", True),
                                     ("4.0\r\n", False), ("", False)])
def test_powershell_version(out: str, ok: bool) -> None:
    c = check_powershell(r(out))
    assert c.ok is ok and (ok or c.fix)


def test_admin() -> None:
    assert check_admin(r("True\r\n")).ok
    c = check_admin(r("False\r\n"))
    assert not c.ok and "LocalAccountTokenFilterPolicy" in c.fix


def test_kernel_pnp_ids() -> None:
    c = check_kernel_pnp_ids(r(IDS_OK))
    assert c.ok and "[219, 410, 411, 420] present" in c.detail
    # table ids this build lacks (Windows 11's 1000-1021) are reported, not failed
    assert "1010" in c.detail
    c = check_kernel_pnp_ids(r(IDS_OK.replace("410\r\n", "")))
    assert not c.ok and "[410]" in c.detail and "event map" in c.fix
    c = check_kernel_pnp_ids(r("", 1, "Get-WinEvent : There is not an event provider on the localhost computer"))
    assert not c.ok
    # a corrected table is used for the "not on this build" note
    emap = EventMap.from_json({"events": {"1010": None, "1011": None, "1000": None, "1020": None, "1021": None}})
    assert "not on this build" not in check_kernel_pnp_ids(r(IDS_OK + "704\r\n705\r\n805\r\n806\r\n830\r\n"
                                                              "831\r\n832\r\n840\r\n841\r\n440\r\n441\r\n"
                                                              "442\r\n"), emap).detail


def test_etw_session() -> None:
    ok = r("create 0 The command completed successfully.\r\nstop 0 The command completed successfully.\r\n")
    assert check_etw_session(ok).ok
    denied = check_etw_session(r("create -2147024891 Error: Access is denied.\r\n"))
    assert not denied.ok and "elevated administrator" in denied.fix
    exists = check_etw_session(r("create -2144337737 Error: Data Collector Set already exists.\r\n"))
    assert not exists.ok and "logman stop rebalab-doctor -ets" in exists.fix
    assert not check_etw_session(r("create 0 ok\r\nstop 1 Error\r\n")).ok


def test_test_signing() -> None:
    assert check_test_signing(r(BCDEDIT_ON)).ok
    off = check_test_signing(r(BCDEDIT_OFF))
    assert not off.ok and "bcdedit /set testsigning on" in off.fix
    denied = check_test_signing(r(BCDEDIT_DENIED))
    assert not denied.ok and "administrator" in denied.fix
    german = check_test_signing(r("exit 0\nWindows-Startladeprogramm\nBezeichner  {current}\n"))
    assert not german.ok and "could not be read" in german.detail


def test_wdtf() -> None:
    assert check_wdtf(r("wdtf ok\r\n")).ok
    c = check_wdtf(r("wdtf missing Retrieving the COM class factory for component with CLSID {...} failed "
                     "due to the following error: 80040154 Class not registered\r\n"))
    assert not c.ok and "WDK" in c.fix and "80040154" in c.detail


def rec(status: str = "OK", code: int = 0, inf: str = "oem7.inf") -> dict[str, object]:
    return {"InstanceId": FUNC, "Status": status, "HardwareIds": [HWIDS[0]], "ProblemCode": code,
            "DriverInfPath": inf, "Service": "mycodec"}


def test_device_and_driver() -> None:
    assert check_device([rec()], HWIDS).ok
    bad = check_device([rec("Error", 10)], HWIDS)
    assert not bad.ok and "problem 10 (CM_PROB_FAILED_START)" in bad.detail
    assert not check_device([], HWIDS).ok
    assert check_driver([rec()], DRIVER, HWIDS).ok
    other = check_driver([rec(inf="hdaudio.inf")], DRIVER, HWIDS)
    assert not other.ok and "hdaudio.inf" in other.detail and "INF's models section" in other.fix
    assert not check_driver([rec()], None, HWIDS).ok


def test_clock_bound() -> None:
    sample = clock.ExchangeSample(0, 30_000_000, 10_000_000, 0, 16_000_000)
    res = clock_exchange.ExchangeResult((sample,), 20_000_000)
    assert check_clock(res, 50_000_000).ok
    c = check_clock(res, 10_000_000)
    assert not c.ok and "bound +/-18.0 ms" in c.detail      # (30 - 10 + 16) / 2


def test_windows_checks_runs_every_pinned_script_once() -> None:
    fake = FakeClock()

    def clock_reply(script: str, params: dict[str, str]) -> str:
        fake.advance(2_000_000)
        ft = fake() // 100 + 116_444_736_000_000_000
        fake.advance(2_000_000)
        return f"rebalab-clock {ft} {ft}\r\n"

    agent = (ScriptedAgent()
             .on("$PSVersionTable", "5.1.22621.2506\r\n")
             .on("WindowsBuiltInRole", "True\r\n")
             .on("Get-WinEvent -ListProvider", IDS_OK)
             .on("logman.exe create trace", "create 0 ok\r\nstop 0 ok\r\n")
             .on("bcdedit.exe", BCDEDIT_ON)
             .on("WDTF.WDTF", "wdtf missing Class not registered\r\n")
             .on("DEVPKEY_Device_DriverInfPath", structured_stdout([rec()]))
             .on("rebalab-clock", clock_reply))
    checks = windows_checks(agent, "ich9-intel-hda", driver=DRIVER,
                            clock=lambda a: clock_exchange.exchange(a, now=fake, resolution_ns=0))
    assert [c.name for c in checks] == ["powershell", "administrator", "kernel-pnp events", "etw session",
                                        "test signing", "wdtf", "device under test", "driver bound",
                                        "clock exchange"]
    assert [c.name for c in checks if not c.ok] == ["wdtf"]
    assert all(c.fix for c in checks if not c.ok)
    fragments = [c.fragment for c in agent.calls]
    for gs in (PS_VERSION, ADMIN, KERNEL_PNP_IDS, ETW_SESSION, TEST_SIGNING, WDTF):
        assert sum(1 for c in agent.calls if c.script == gs.script) == 1, gs.label
    assert fragments.count("rebalab-clock") == 1        # 2 ms each way: under the target at once
    # the ETW test session's names travel as literals
    etw = next(c for c in agent.calls if c.fragment == "logman.exe create trace")
    assert etw.params == {"Session": "rebalab-doctor", "Etl": "C:\\rebalab\\doctor.etl",
                          "Provider": "{9C205A39-1250-487D-ABD7-E831C6290539}",
                          "Keywords": "0xFFFFFFFFFFFFFFFF", "Level": "0x5"}
    assert "-p $p.Provider $p.Keywords $p.Level -ow -ets" in etw.script


def test_windows_checks_report_a_dead_agent_instead_of_crashing() -> None:
    checks = windows_checks(ScriptedAgent(), "AC97")
    assert checks and not any(c.ok for c in checks)
    assert all(c.fix for c in checks)


def test_every_pinned_script_fits_cmd_exe() -> None:
    """Over Windows OpenSSH commands go through cmd.exe (8191 characters)."""
    from lab.agent.powershell import POWERSHELL
    from lab.guest.windows import driver_check, pnp_wait

    scripts = [PS_VERSION, ADMIN, KERNEL_PNP_IDS, ETW_SESSION, TEST_SIGNING, WDTF,
               driver_check.state_script(HWIDS), pnp_wait.started("PCI\\VEN_8086&DEV_293E", 60),
               clock_exchange.exchange_script()]
    for gs in scripts:
        assert len(POWERSHELL.encode(gs.script)) <= 8191, gs.label
