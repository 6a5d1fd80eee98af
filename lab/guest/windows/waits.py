"""Device waits in a Windows guest: ``lab.guest.windows.pnp_wait`` loops (Get-PnpDevice),
run after the host acted (a PowerShell launch per wait; WinRM has no background channel).

A device is up when its devnode (for an HD Audio controller: the codec's HDAUDIO function
devnode, where the PortCls driver sits) is started; the instance ids the loop reports
are the guest's names for the device, which the timeline binds to the lab's."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from lab.errors import AgentError
from lab.guest.base import DeviceWait, Seen
from lab.guest.windows import pnp_wait
from lab.guest.windows.trace.common import GuestScript, run_script

if TYPE_CHECKING:
    from lab.machine import Machine


class PnpWait(DeviceWait):
    def __init__(self, m: Machine, script: GuestScript, timeout: float, fail: str,
                 seen: Callable[[str], Seen]) -> None:
        self.m, self.script, self.timeout, self.fail, self.seen = m, script, timeout, fail, seen

    def end(self) -> Seen:
        assert self.m.agent is not None
        r = run_script(self.m.agent, self.script)
        if r.exit_status != 0:
            raise AgentError(f"{self.fail} within {self.timeout:.1f}s "
                             f"({(r.stdout or r.stderr).strip()[-300:]})")
        return self.seen(r.stdout.strip())


def started(m: Machine, dev_id: str, model_name: str, hwid: str, timeout: float) -> PnpWait:
    def seen(out: str) -> Seen:
        s = pnp_wait.parse_started(out)
        return Seen("pnp-started", instance=s.instance_id if s else None,
                    data={"function_instance": s.function_instance_id if s else None,
                          "hardware_id": hwid})

    return PnpWait(m, pnp_wait.started(hwid, timeout), timeout,
                   f"{dev_id} ({model_name}, {hwid}) did not start", seen)


def gone(m: Machine, dev_id: str, hwid: str, timeout: float) -> PnpWait:
    return PnpWait(m, pnp_wait.gone(hwid, timeout), timeout,
                   f"{dev_id} ({hwid}) is still present in the guest",
                   lambda out: Seen("pnp-gone", data={"evidence": "pnp-gone"}))
