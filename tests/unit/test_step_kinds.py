"""One place per step kind (lab.steps): each kind's class holds its parse name, its
static checks, its record refusal and its execution; the parser, the validator, the
record check and the runner know no kind by name."""

from __future__ import annotations

import inspect
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

import lab.scenario.steps as S
from lab import record, runner as runner_mod
from lab.runner import IterationState, ScenarioRunner
from lab.scenario import loader, validate_text, walk
from lab.scenario.units import Id, Int
from lab.steps import STEP_KINDS, StepBase, StepContext, StepFailed, step_kind
from lab.steps.base import DEFAULT_WAIT_S
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located

#: the YAML keys, in the order messages list them (unchanged by the move to lab.steps)
KEYS = ["plug", "unplug", "rebalance", "guest", "module", "play", "sleep", "jitter", "wait",
        "pause", "resume", "snapshot", "parallel", "assert"]
#: the families whose key is shared by several classes, and their variant maps
FAMILIES: dict[str, Mapping[str, type[StepBase]]] = {
    "rebalance": S.REBALANCE_TRIGGERS, "wait": S.WAIT_KINDS, "assert": S.ASSERT_KINDS}


def concrete_kinds() -> list[type[StepBase]]:
    """Every class a parsed step can be an instance of."""
    out: list[type[StepBase]] = []
    for key, cls in STEP_KINDS.items():
        out.extend(FAMILIES[key].values() if key in FAMILIES else [cls])
    return out


class Topo:
    def __init__(self, ports: list[str], devices: list[str]) -> None:
        self.ports, self.devices = ports, devices

    def device_ids(self) -> list[str]:
        return list(self.devices)

    def port_ids(self) -> list[str]:
        return list(self.ports)


def resolve(ref: Any, located: Located) -> Topo:
    return Topo(["rp1", "rp2"], ["snd0"])


def scenario(steps: str, head: str = "") -> Any:
    return validate_text(f"name: t\ntopology: default\n{head}steps:\n{steps}", "t.yaml",
                         resolve, known_rules=None, known_limits=None)


def test_the_keys_and_their_order_are_unchanged() -> None:
    assert list(STEP_KINDS) == KEYS
    assert S.STEP_TYPES is STEP_KINDS


@pytest.mark.parametrize("cls", concrete_kinds(), ids=lambda c: c.__name__)
def test_every_kind_has_a_parse_name_checks_and_runs(cls: type[StepBase]) -> None:
    assert cls.step_type in STEP_KINDS
    assert callable(cls.parse) and callable(cls.verify)
    # executing is never left to the base class (which says "no implementation")
    assert cls.execute is not StepBase.execute, cls
    assert cls.record_refusal is None or isinstance(cls.record_refusal, str)
    # the parser's module still exports it (tests and tools import it from there)
    assert getattr(S, cls.__name__) is cls


def test_the_base_execute_names_the_kind() -> None:
    class Nothing(StepBase):
        step_type: ClassVar[str] = "nothing"

    from lab.errors import LabError
    with pytest.raises(LabError, match="no implementation for Nothing"):
        Nothing().execute(None)  # type: ignore[arg-type]


def test_the_dispatch_and_the_checker_have_no_isinstance_chain() -> None:
    for fn in (ScenarioRunner._dispatch, ScenarioRunner._run_step, loader.RefChecker.run_steps,
               record.not_recordable):
        assert "isinstance" not in inspect.getsource(fn), fn
    kinds = r"\b(Plug|Unplug|Rebalance\w*|Wait\w+|Assert\w+|Play|Parallel|Guest|Module)\b"
    for parser in (S.parse_step, S.walk):
        assert not re.search(kinds, inspect.getsource(parser)), parser
    # the runner names no step kind but Guest (the guest boot's WinRM check)
    names = {n for n, v in vars(runner_mod).items()
             if isinstance(v, type) and issubclass(v, StepBase)}
    assert names <= {"Guest", "Step"}, names
    assert not re.search(kinds, inspect.getsource(loader.RefChecker))


def test_record_refusals_live_on_the_kinds() -> None:
    refused = {c.__name__ for c in concrete_kinds() if c.record_refusal}
    assert refused == {"Plug", "Unplug", "RebalancePressure", "RebalanceCpuHotplug",
                       "RebalanceReconfigure", "RebalanceResize", "Pause", "Resume"}
    assert record.not_recordable(S.Pause()) == S.Pause.record_refusal
    assert record.not_recordable(S.Sleep.model_validate({"duration": "1ms"})) is None


# ---- a kind added in one module ----------------------------------------------------------

BEEPS: list[str] = []


@pytest.fixture
def beep() -> Iterator[type[StepBase]]:
    """A new step kind, defined (as a kind module would) in one place."""

    @step_kind
    class Beep(StepBase):
        """Beep ``times`` times at ``device``."""

        step_type: ClassVar[str] = "beep"
        shorthand: ClassVar[str | None] = "device"
        record_refusal: ClassVar[str | None] = "a beep is not in the replay log"
        device: Id
        times: Int = 1

        def verify(self, chk: loader.RefChecker, st: loader.RefState) -> None:
            chk.present(self.device, st, self.field_path("device"), "beep")
            if self.times > 3:
                chk.fail("at most 3 beeps", self.field_path("times"))

        def execute(self, ctx: StepContext) -> str:
            BEEPS.append(f"{threading.current_thread().name}:{self.device}")
            if self.times == 3:
                raise StepFailed(self.violation("beep.loud", self.device, "too loud"))
            return f"beep x{self.times}"

    BEEPS.clear()
    try:
        yield Beep
    finally:
        del STEP_KINDS["beep"]


def test_a_new_kind_is_parsed_checked_and_refused_by_record(beep: type[StepBase]) -> None:
    sc = scenario("  - beep: snd0\n  - beep: {device: snd0, times: 2}\n")
    steps = sc.sweep().iteration(0).steps
    assert [type(s) for s in steps] == [beep, beep]
    assert steps[1].line == 5 and steps[1].describe() == "beep"
    assert steps[1].to_yaml() == {"beep": {"device": "snd0", "times": 2}}
    # its fields, its checks (at their line), its record refusal
    with pytest.raises(SpecError, match=r"t.yaml:4: steps\[0\].beep.times: expected an integer"):
        scenario("  - beep: {device: snd0, times: x}\n")
    with pytest.raises(SpecError, match=r"t.yaml:5: steps\[1\].beep.device: device 'snd0' "
                                        r"was unplugged \(at line 4\) before this beep"):
        scenario("  - unplug: snd0\n  - beep: snd0\n")
    with pytest.raises(SpecError, match=r"t.yaml:4: steps\[0\].beep.times: at most 3 beeps"):
        scenario("  - beep: {device: snd0, times: 4}\n")
    with pytest.raises(SpecError, match=r"t.yaml:5: steps\[0\]: not recordable \(record: true\)"
                                        r": a beep is not in the replay log"):
        scenario("  - beep: snd0\n", head="record: true\n")
    # did-you-mean knows it too
    with pytest.raises(SpecError, match="beep"):
        scenario("  - beeep: snd0\n")


def _state(tmp_path: Path) -> IterationState:
    return IterationState(None, None, tmp_path, 0)  # type: ignore[arg-type]


def test_a_new_kind_runs_through_the_runner_also_in_parallel(beep: type[StepBase],
                                                              tmp_path: Path) -> None:
    sc = scenario("  - beep: snd0\n"
                  "  - parallel: {a: [beep: snd0], b: [{beep: {device: snd0, times: 2}}]}\n")
    first, par = sc.sweep().iteration(0).steps
    assert [type(s) for s in walk((first, par))] == [beep, S.Parallel, beep, beep]
    runner = object.__new__(ScenarioRunner)
    st = _state(tmp_path)
    m = SimpleNamespace()
    runner._run_step(m, st, first)  # type: ignore[arg-type]
    runner._run_step(m, st, par)  # type: ignore[arg-type]
    got = [(t.name, t.ok, t.detail) for t in st.timings]
    # the branches' steps in either order, then the parallel step itself
    assert got[0] == ("beep", True, "beep x1") and got[3] == ("parallel a, b", True, "2 branches")
    assert sorted(got[1:3]) == [("beep", True, "beep x1"), ("beep", True, "beep x2")]
    assert sorted(BEEPS[1:]) == ["branch-a:snd0", "branch-b:snd0"]


def test_a_failing_step_is_a_violation_of_its_line(beep: type[StepBase], tmp_path: Path) -> None:
    sc = scenario("  - beep: {device: snd0, times: 3}\n")
    step, = sc.sweep().iteration(0).steps
    runner = object.__new__(ScenarioRunner)
    st = _state(tmp_path)
    with pytest.raises(StepFailed) as err:
        runner._run_step(SimpleNamespace(), st, step)  # type: ignore[arg-type]
    v = err.value.violation
    assert (v.rule, v.device, v.phase, v.message) == ("beep.loud", "snd0", "step",
                                                      "t.yaml:4: too loud")
    assert st.timings[-1].ok is False


def test_the_runner_keeps_its_names() -> None:
    """What other modules and tests import from the runner is still there."""
    assert runner_mod.StepFailed is StepFailed and runner_mod.DEFAULT_WAIT_S == DEFAULT_WAIT_S
    from lab.steps.base import Job
    assert runner_mod.Job is Job
