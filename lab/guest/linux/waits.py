"""Device waits in the Linux guest, begun before the host acts.

Bound means the kernel's bind uevent (sent after probe() returned 0); the sysfs
``driver`` link is not enough: it appears before probe() runs. The built-in image's
uevent helper (images/linux/rootfs/etc/rebalab/uevent.sh) prints every PCI uevent to
the kernel log, hence to the serial console, and then records a bind in
/run/rebalab/bound/<BDF>. So the first evidence the host can have is the console line:
``UeventWait`` watches for it (no SSH channel, no guest CPU spent polling, one serial
line of latency: the lab's own detection lag). Between slices of console watching,
an instant check over SSH asks the guest's state, so a line that does not come (lost, or
an image without the helper) costs a slice, never a verdict; at the deadline a last
check decides.

``ShellWait`` (a shell loop over SSH, started before the host acts: one round trip in
total) is what a machine without a console gets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lab.agent.base import Agent
from lab.errors import AgentError, ConnectionLost, DeadlineExceeded
from lab.guest.base import DeviceWait, Seen

if TYPE_CHECKING:
    from lab.machine import Machine

BOUND_DIR = "/run/rebalab/bound"
POLL_US = 2000  # guest waiter granularity


def bound_command(agent: Agent, bdf: str, driver: str, timeout: float) -> str:
    """A guest loop that ends when ``driver`` is bound to ``bdf`` (exit 0, "bound HOW DRV")."""
    sh = agent.shell
    n = int(timeout * 1_000_000 / POLL_US) + 1
    return (f"d=/sys/bus/pci/devices/{sh.quote(bdf)}; b={BOUND_DIR}/{sh.quote(bdf)}; "
            f"want={sh.quote(driver)}; i=0; "
            f"if [ -d {BOUND_DIR} ]; then how=uevent; else how=link; fi; "
            f"while [ $i -lt {n} ]; do "
            # read, a shell builtin, not $(cat): no fork per poll (each costs ms under TCG)
            f"if [ $how = uevent ]; then got=; [ -e \"$b\" ] && read -r got < \"$b\"; "
            f"else l=$(readlink \"$d/driver\" 2>/dev/null); got=${{l##*/}}; fi; "
            f"[ \"$got\" = \"$want\" ] && {{ echo bound $how \"$got\"; exit 0; }}; "
            f"usleep {POLL_US}; i=$((i+1)); done; "
            f"echo \"not bound ($how): driver=$(readlink \"$d/driver\" 2>/dev/null || echo none)\"; exit 3")


def gone_command(agent: Agent, bdf: str, timeout: float) -> str:
    """A guest loop that ends when ``bdf`` has left sysfs (exit 0, "gone")."""
    sh = agent.shell
    n = int(timeout * 1_000_000 / POLL_US) + 1
    return (f"d=/sys/bus/pci/devices/{sh.quote(bdf)}; i=0; "
            f"while [ $i -lt {n} ]; do [ -e \"$d\" ] || {{ echo gone; exit 0; }}; "
            f"usleep {POLL_US}; i=$((i+1)); done; echo still present; exit 3")


class ShellWait(DeviceWait):
    """One waiter loop: opened on its own channel in ``begin``, collected in ``end``.

    The loops only read state (the bound file, sysfs), so one whose connection went down
    is run again on a new one: it sees the state as it is by now."""

    def __init__(self, m: Machine, cmd: str, what: str, timeout: float,
                 fail: str, seen: Any) -> None:
        self.m, self.cmd, self.what, self.timeout = m, cmd, what, timeout
        self.fail = fail                 # the AgentError's message, "{out}" for what the loop said
        self.seen = seen                 # stdout -> Seen
        self.chan: Any = None

    def begin(self) -> None:
        assert self.m.agent is not None
        self.chan = self.m.agent.open(self.cmd)

    def end(self) -> Seen:
        agent = self.m.agent
        assert agent is not None
        try:
            if self.chan is None:
                r = agent.run(self.cmd, timeout=self.timeout + 5, idempotent=True)
            else:
                try:
                    r = agent.collect(self.chan, self.what, self.timeout + 5)
                except ConnectionLost as exc:
                    self.m.run.log(f"{self.what}: {exc}; asking again on a new connection")
                    r = agent.run(self.cmd, timeout=self.timeout + 5, idempotent=True)
        finally:
            self.chan = None
        if r.exit_status != 0:
            raise AgentError(self.fail.format(out=r.stdout.strip() or r.stderr.strip()))
        return self.seen(r.stdout)

    def close(self) -> None:
        if self.chan is not None:
            self.chan.close()
            self.chan = None


#: how long the last SSH check polls, at the deadline (the state is settled by then)
CHECK_S = 1.0
#: the console is watched this long between instant SSH checks (a lost line costs this)
GRACE_S = 2.0


def uevent_line(action: str, bdf: str, driver: str | None = None) -> re.Pattern[str]:
    """The console line uevent.sh prints for ``action`` on the PCI function ``bdf``."""
    tail = f" DRIVER={re.escape(driver)} " if driver else " "
    return re.compile(rf"rebalab-uevent ACTION={action} SUBSYSTEM=pci DEVPATH=\S*/"
                      rf"{re.escape(bdf)}{tail}")


class UeventWait(DeviceWait):
    """The uevent's console line, else the guest's state over SSH (module docstring).

    The console is watched in slices of ``GRACE_S``; between slices one instant check
    over SSH asks whether the state is there already (a line lost), so a missed line
    costs a slice, not the whole deadline, and a slow driver still gets the console's
    low latency. At the deadline a last check (polling ``CHECK_S``) decides."""

    def __init__(self, m: Machine, line: re.Pattern[str], what: str, timeout: float,
                 check: Callable[[float], ShellWait], evidence: str,
                 data: dict[str, Any]) -> None:
        self.m, self.line, self.what, self.timeout = m, line, what, timeout
        self.check, self.evidence, self.data = check, evidence, data
        self.cursor = 0

    def begin(self) -> None:
        assert self.m.console is not None
        self.cursor = self.m.console.cursor()
        self.end_at = time.monotonic() + self.timeout

    def end(self) -> Seen:
        console = self.m.console
        assert console is not None
        process = self.m.process
        while True:
            left = self.end_at - time.monotonic()
            try:
                console.wait_for(self.line, timeout=max(0.0, min(GRACE_S, left)),
                                 after=self.cursor, what=self.what,
                                 alive=process.alive if process is not None else None)
                return Seen(self.evidence, data=self.data)
            except DeadlineExceeded:
                pass
            if self.end_at - time.monotonic() <= 0:
                self.m.run.log(f"{self.what}: no uevent line on the console within "
                               f"{self.timeout:.1f}s; asking the guest")
                return self.check(CHECK_S).end()
            try:
                seen = self.check(0.0).end()
            except AgentError:
                continue                     # not there yet: back to the console
            self.m.run.log(f"{self.what}: the guest has it, its uevent line was not on the "
                           "console")
            return seen


def bound_wait(m: Machine, dev_id: str, model_name: str, bdf: str, driver: str,
               timeout: float) -> DeviceWait:
    assert m.agent is not None

    def seen(out: str) -> Seen:
        words = out.split()
        evidence = words[1] if len(words) > 1 else "?"
        return Seen(evidence, data={"driver": driver})

    fail = (f"{dev_id} ({model_name}) at {bdf}: {driver} did not bind within {timeout:.1f}s "
            "({out}); see dmesg.txt and console.log")
    if m.console is None:
        return ShellWait(m, bound_command(m.agent, bdf, driver, timeout), "wait for driver bound",
                         timeout, fail, seen)
    agent = m.agent

    def check(t: float) -> ShellWait:
        return ShellWait(m, bound_command(agent, bdf, driver, t), "check driver bound", t,
                         fail, seen)

    return UeventWait(m, uevent_line("bind", bdf, driver), f"{driver} bound to {bdf}", timeout,
                      check, "uevent-console", {"driver": driver})


def gone_wait(m: Machine, dev_id: str, bdf: str, timeout: float) -> DeviceWait:
    assert m.agent is not None
    fail = (f"{dev_id} at {bdf} is still present in the guest {timeout:.1f}s after QEMU "
            "deleted it")
    if m.console is None:
        return ShellWait(m, gone_command(m.agent, bdf, timeout),
                         "wait for the device to leave the guest", timeout, fail,
                         lambda out: Seen("sysfs-gone"))
    agent = m.agent

    def check(t: float) -> ShellWait:
        return ShellWait(m, gone_command(agent, bdf, t), "check the device left the guest", t,
                         fail, lambda out: Seen("sysfs-gone"))

    return UeventWait(m, uevent_line("remove", bdf), f"{bdf} removed from the guest", timeout,
                      check, "uevent-console", {})
