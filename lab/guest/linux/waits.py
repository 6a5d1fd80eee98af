"""Device waits in the Linux guest: shell loops over SSH, started before the host acts.

The guest-side detection then costs one SSH round trip in total instead of one per
poll. Bound means the kernel's bind uevent (sent after probe() returned 0), which the
built-in image records in /run/rebalab/bound/<BDF>; the sysfs ``driver`` link is not
enough: it appears before probe() runs. Guests without that directory fall back to the
link (and the evidence says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lab.agent.base import Agent
from lab.errors import AgentError, ConnectionLost
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


def bound_wait(m: Machine, dev_id: str, model_name: str, bdf: str, driver: str,
               timeout: float) -> ShellWait:
    assert m.agent is not None

    def seen(out: str) -> Seen:
        words = out.split()
        evidence = words[1] if len(words) > 1 else "?"
        return Seen(evidence, data={"driver": driver})

    return ShellWait(m, bound_command(m.agent, bdf, driver, timeout), "wait for driver bound",
                     timeout,
                     f"{dev_id} ({model_name}) at {bdf}: {driver} did not bind within "
                     f"{timeout:.1f}s ({{out}}); see dmesg.txt and console.log", seen)


def gone_wait(m: Machine, dev_id: str, bdf: str, timeout: float) -> ShellWait:
    assert m.agent is not None
    return ShellWait(m, gone_command(m.agent, bdf, timeout),
                     "wait for the device to leave the guest", timeout,
                     f"{dev_id} at {bdf} is still present in the guest {timeout:.1f}s after "
                     "QEMU deleted it", lambda out: Seen("sysfs-gone"))
