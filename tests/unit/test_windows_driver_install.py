"""The driver under test at image build (pnputil exit codes) and at the lab's first boot
(bound to the virtual device), issue 10 point 4.

No Windows here: the exit-code table is checked against PnPUtil's documented return
values and against provision.ps1's own copy; the bound check runs the pinned
Get-PnpDevice script through a scripted agent answering in the shape the script emits
(Get-PnpDevice / Get-PnpDeviceProperty values: Status 'OK'/'Error', ProblemCode an
integer CM_PROB_*, DriverInfPath 'oemNN.inf').
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lab.guest.windows import driver_check
from lab.guest.windows.driver_check import DeviceDriver, DriverNotBound
from lab.guest.windows.scripted_agent import ScriptedAgent, structured_stdout
from vdevice.catalog import MODELS

PROVISION = Path(__file__).parents[2] / "images" / "windows" / "provision.ps1"
PCI = "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\3&267A616A&0&D8"
FUNC = "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021&REV_1001\\4&2F8B1D8E&0&0001"
FUNC_HWIDS = ["HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021&REV_1001",
              "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021"]
DRIVER = {"pnputil_exit_code": 259, "status": "staged-no-device",
          "published": [{"inf": "mycodec.inf", "published_name": "oem7.inf"}]}


def _ps1_table() -> dict[int, str]:
    text = PROVISION.read_text(encoding="utf-8")
    m = re.search(r"^\s*\$PnputilOutcome = @\{(.*)\}\s*$", text, re.M)
    assert m, "provision.ps1 has no $PnputilOutcome table"
    return {int(k): v for k, v in re.findall(r"(\d+)\s*=\s*'([^']*)'", m[1])}


def test_259_is_staged_not_failed_in_the_guest_script_and_here() -> None:
    """pnputil-return-values: 259 ERROR_NO_MORE_ITEMS = no device matches the driver.
    The install VM has no device under test, so the build must not fail on it."""
    assert _ps1_table() == driver_check.PNPUTIL_OUTCOME
    assert driver_check.PNPUTIL_OUTCOME[259] == "staged-no-device"
    text = PROVISION.read_text(encoding="utf-8")
    # the step throws only for an outcome outside the table
    assert "if ($status -eq 'failed') { throw" in text
    assert "-ne 3010) { throw" not in text


@pytest.mark.parametrize("code, outcome", [(0, "installed"), (259, "staged-no-device"),
                                           (3010, "installed-reboot-required"), (1, "failed"),
                                           (2, "failed"), (None, "failed")])
def test_outcomes(code: int | None, outcome: str) -> None:
    assert driver_check.pnputil_outcome(code) == outcome
    line = driver_check.describe_pnputil(code)
    assert (("ERROR_NO_MORE_ITEMS" in line and "first boot" in line) if code == 259 else True)


def test_hda_driver_is_looked_for_on_the_codec_function_not_the_pci_id() -> None:
    hw = driver_check.target_hwids("ich9-intel-hda")
    assert hw == MODELS["ich9-intel-hda"].function_hwids
    assert all(h.startswith("HDAUDIO\\FUNC_01&") for h in hw)
    assert driver_check.target_hwids("AC97") == ("PCI\\VEN_8086&DEV_2415",)
    assert driver_check.target_hwids("PCI\\VEN_1234&DEV_5678") == ("PCI\\VEN_1234&DEV_5678",)


def _agent(records: list[dict[str, object]]) -> ScriptedAgent:
    return ScriptedAgent().on("DEVPKEY_Device_DriverInfPath", structured_stdout(records))


def _rec(instance: str, status: str = "OK", code: int | None = 0, inf: str | None = "oem7.inf",
         service: str | None = "mycodec") -> dict[str, object]:
    return {"InstanceId": instance, "Status": status, "HardwareIds": FUNC_HWIDS, "ProblemCode": code,
            "DriverInfPath": inf, "Service": service}


def test_bound_driver_passes_and_the_script_asks_for_the_codec_ids() -> None:
    agent = _agent([_rec(FUNC)])
    got = driver_check.verify_bound(agent, DRIVER, "ich9-intel-hda")
    assert got is not None and got.instance_id == FUNC and got.driver_inf == "oem7.inf"
    (call,) = agent.calls
    assert "Get-PnpDevice -PresentOnly" in call.script
    assert "'DEVPKEY_Device_ProblemCode', 'DEVPKEY_Device_DriverInfPath'" in call.script
    # the ids travel as literals in $p, not in the template
    header, body = call.script.split("}\n", 1)
    assert "'HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0021&SUBSYS_1AF40021'" in header
    assert "HDAUDIO" not in body


def test_problem_code_is_a_clear_error() -> None:
    with pytest.raises(DriverNotBound) as exc:
        driver_check.verify_bound(_agent([_rec(FUNC, "Error", 28, None, None)]), DRIVER, "ich9-intel-hda")
    msg = str(exc.value)
    assert FUNC in msg and "problem code 28 (CM_PROB_FAILED_INSTALL)" in msg
    assert "HDAUDIO function id, not the controller's PCI id" in msg


def test_inbox_driver_instead_of_ours_is_an_error() -> None:
    """Microsoft's HD Audio function driver (hdaudio.inf) bound instead of the package."""
    with pytest.raises(DriverNotBound, match=r"runs hdaudio\.inf \(service HdAudAddService\), not the image's oem7\.inf"):
        driver_check.verify_bound(_agent([_rec(FUNC, inf="hdaudio.inf", service="HdAudAddService")]),
                                  DRIVER, "ich9-intel-hda")


def test_no_device_names_the_codec_placement() -> None:
    with pytest.raises(DriverNotBound, match="no present device matches .*place the controller cold with a codec"):
        driver_check.verify_bound(_agent([]), DRIVER, "ich9-intel-hda")


def test_no_driver_in_the_image_checks_nothing() -> None:
    agent = _agent([])
    assert driver_check.verify_bound(agent, None, "ich9-intel-hda") is None and not agent.calls


def test_parse_state_tolerates_missing_properties() -> None:
    got = driver_check.parse_state([{"InstanceId": FUNC, "Status": "Unknown", "HardwareIds": FUNC_HWIDS[0]},
                                    "junk", {"Status": "OK"}])
    assert got == [DeviceDriver(FUNC, "Unknown", None, None, None, (FUNC_HWIDS[0],))]
