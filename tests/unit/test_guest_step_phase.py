"""A foreground guest command is a phase of the iteration, named as its own failure is.

race-planted-recorded drives its race from one guest command (``name: race``); before
guest commands opened phases, the oops that race caused read ``after:module`` in the
report and in its signature, because a module load was the last operation the lab had
recorded."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lab.agent.base import CommandResult
from lab.agent.posix import PosixShell
from lab.events import Event, Kind, Source
from lab.rules.base import phases_from_timeline
from lab.steps import StepFailed
from lab.steps.guest import Guest
from lab.timeline import Timeline
from tests.unit.test_step_kinds import scenario


class Agent:
    shell = PosixShell()

    def __init__(self, status: int, *, raises: Exception | None = None) -> None:
        self.status, self.raises = status, raises

    def run(self, command: str, timeout: float) -> CommandResult:
        if self.raises is not None:
            raise self.raises
        return CommandResult(command, self.status, "", "", 0.0)


def run_step(yaml: str, agent: Agent) -> tuple[list[Event], Exception | None]:
    sc = scenario(yaml)
    (step,) = sc.sweep().iteration(0).steps
    assert isinstance(step, Guest)
    events: list[Event] = []
    m = SimpleNamespace(agent=agent, run=SimpleNamespace(record=events.append))
    ctx: Any = SimpleNamespace(machine=m, jobs={}, guest_log=lambda s: None)
    try:
        step.execute(ctx)
    except Exception as exc:          # noqa: BLE001 - the test looks at what was raised
        return events, exc
    return events, None


def test_a_named_command_is_a_phase_and_a_guest_event_inside_it_is_attributed() -> None:
    events, exc = run_step("  - guest: {run: 'echo 1 > /sys/bus/pci/rescan', name: race}\n",
                           Agent(0))
    assert exc is None
    (op,) = events
    assert op.kind == Kind.OPERATION and op.data["name"] == "race"
    assert op.duration_ns is not None and op.duration_ns >= 0
    oops = Event(op.t_host_ns + (op.duration_ns or 0) // 2, Source.GUEST_KERNEL,
                 Kind.KERNEL_OOPS, data={"text": "BUG: unable to handle page fault"})
    phases = phases_from_timeline(Timeline([op, oops]))
    assert [p.name for p in phases] == ["race"]
    assert phases[0].contains(oops.t_host_ns)


def test_an_unnamed_command_is_the_guest_phase() -> None:
    events, _ = run_step("  - guest: 'true'\n", Agent(0))
    assert [e.data["name"] for e in events] == ["guest"]


@pytest.mark.parametrize("agent", [Agent(3), Agent(0, raises=OSError("connection lost"))],
                         ids=["fails", "raises"])
def test_the_phase_is_recorded_when_the_command_fails_or_the_agent_raises(agent: Agent) -> None:
    events, exc = run_step("  - guest: {run: 'false', name: io-after-rebalance}\n", agent)
    assert exc is not None
    if agent.raises is None:
        assert isinstance(exc, StepFailed)
        assert exc.violation.phase == "io-after-rebalance"     # the same name as the phase
    assert [e.data["name"] for e in events] == ["io-after-rebalance"]
