"""The Windows guest clock exchange: guest UTC -> host time, with a bound (issue 10, point 7).

Before: the guest's clock was read once, at the end of several sequential PowerShell
launches (the tracer's start scripts), and assumed to be read at their midpoint, so
events could land seconds off with a bound that did not hold.

Now a dedicated exchange (``EXCHANGE``) does nothing else: the host stamps before it
sends and after the reply; the guest reports its clock and, from the kernel, when its
PowerShell process was created (``(Get-Process -Id $PID).StartTime``), which happened
after the host's send. The round is repeated until the bound is under the target (or
the rounds or the deadline run out), and the round with the narrowest interval is kept
(``lab.clock.best_exchange``): the shortest round trip once the guest's own start-up
is discounted. The bound always goes into the run log and the timeline's clock metadata.

Guest stamps: ``[DateTime]::UtcNow`` and ``Process.StartTime`` are system time, whose
resolution "is approximately 10000-15000 microseconds" on Windows NT and later
(learn.microsoft.com/dotnet/api/system.datetimeoffset.microsecond, Remarks; Windows
PowerShell 5.1 runs on .NET Framework, whose UtcNow reads the coarse system time), so
each stamp may lag by up to ``GUEST_RESOLUTION_NS``; the bound allows for it. ETW's own
event stamps are not affected (they carry the event's precise time).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lab import clock
from lab.agent.base import Agent
from lab.deadline import Deadline
from lab.errors import AgentError, LabError
from lab.guest.windows.trace.common import GuestScript, filetime_to_unix_ns, run_script

GUEST_RESOLUTION_NS = 16_000_000
DEFAULT_TARGET_BOUND_NS = 20_000_000
DEFAULT_MAX_ROUNDS = 12
DEFAULT_TIMEOUT_S = 90.0

EXCHANGE = r"""
$start = (Get-Process -Id $PID).StartTime.ToUniversalTime().ToFileTimeUtc()
$now = [DateTime]::UtcNow.ToFileTimeUtc()
[Console]::Out.WriteLine('rebalab-clock ' + $start + ' ' + $now)
"""

_REPLY = re.compile(r"^rebalab-clock (\d+) (\d+)\s*$", re.M)


def exchange_script(timeout_s: float = 30.0) -> GuestScript:
    return GuestScript("clock: exchange", EXCHANGE, {}, timeout=timeout_s)


def parse_reply(stdout: str) -> tuple[int, int]:
    """(process start, clock read) in Unix ns from the exchange's output line."""
    m = _REPLY.search(stdout)
    if not m:
        raise AgentError(f"the guest's clock reply is not 'rebalab-clock START NOW': {stdout.strip()[-120:]!r}")
    return filetime_to_unix_ns(int(m[1])), filetime_to_unix_ns(int(m[2]))


@dataclass(frozen=True)
class ExchangeResult:
    samples: tuple[clock.ExchangeSample, ...]
    target_bound_ns: int
    failures: tuple[str, ...] = ()

    @property
    def best(self) -> clock.ExchangeSample:
        return clock.best_exchange(self.samples)

    @property
    def bound_ns(self) -> int:
        return self.best.bound_ns

    def alignment(self) -> clock.Alignment:
        return clock.exchange_alignment(self.samples)

    def describe(self) -> str:
        b = self.best
        reached = "reached" if b.bound_ns <= self.target_bound_ns else "NOT reached"
        return (f"windows clock exchange: bound +/-{b.bound_ns / 1e6:.1f} ms (best of {len(self.samples)} "
                f"rounds: round trip {b.rtt_ns / 1e6:.1f} ms, guest start-up {b.guest_ns / 1e6:.1f} ms "
                f"discounted, guest stamp resolution {b.g_resolution_ns / 1e6:.0f} ms); target "
                f"+/-{self.target_bound_ns / 1e6:.0f} ms {reached}"
                + (f"; {len(self.failures)} round(s) failed" if self.failures else ""))

    def to_json(self) -> dict[str, Any]:
        return {"target_bound_ns": self.target_bound_ns, "bound_ns": self.bound_ns,
                "best": self.best.to_json(), "samples": [s.to_json() for s in self.samples],
                "failures": list(self.failures), "alignment": self.alignment().to_json()}


def exchange(agent: Agent, *, target_bound_ns: int = DEFAULT_TARGET_BOUND_NS,
             max_rounds: int = DEFAULT_MAX_ROUNDS, timeout_s: float = DEFAULT_TIMEOUT_S,
             now: Callable[[], int] = time.time_ns, log: Callable[[str], None] | None = None,
             resolution_ns: int = GUEST_RESOLUTION_NS) -> ExchangeResult:
    """Rounds until the best bound is at most ``target_bound_ns``, ``max_rounds`` were
    made or ``timeout_s`` passed; raises ``LabError`` only when no round succeeded."""
    if max_rounds < 1:
        raise ValueError("max_rounds must be at least 1")
    dl = Deadline("the Windows clock exchange", timeout_s)
    samples: list[clock.ExchangeSample] = []
    failures: list[str] = []
    script = exchange_script(min(30.0, timeout_s))
    for _ in range(max_rounds):
        h_send = now()
        try:
            res = run_script(agent, script).check()
            h_recv = now()
            g_start, g_read = parse_reply(res.stdout)
        except LabError as exc:      # a failed, timed-out or garbled round: try another
            failures.append(f"{type(exc).__name__}: {exc}")
        else:
            samples.append(clock.ExchangeSample(h_send, h_recv, g_read, g_start, resolution_ns))
            if clock.best_exchange(samples).bound_ns <= target_bound_ns:
                break
        if dl.expired():
            break
    if not samples:
        raise LabError("the Windows clock exchange got no answer from the guest: "
                       + (failures[-1] if failures else "no round ran"))
    result = ExchangeResult(tuple(samples), target_bound_ns, tuple(failures))
    if log is not None:
        log(result.describe())
    return result


def dumps(result: ExchangeResult) -> str:
    return json.dumps(result.to_json(), indent=2, sort_keys=True)
