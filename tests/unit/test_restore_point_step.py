"""``snapshot: {name}``: what may come before a restore point is refused at its line
before any VM starts, and the runner's split of an iteration into the VM's setup and the
iteration's own steps keys the setup by its steps and values (a swept parameter before
the point gives a point per value). The restore itself runs in tests/e2e/test_snapshot.py."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lab.runner import ScenarioRunner
from lab.scenario import validate_text
from lab.steps.restore_point import RestorePointStep
from vdevice.errors import SpecError


class Topo:
    def device_ids(self) -> list[str]:
        return ["snd0"]

    def port_ids(self) -> list[str]:
        return ["rp1", "rp2"]


def scenario(steps: str, head: str = "") -> Any:
    return validate_text(f"name: t\ntopology: default\n{head}steps:\n{steps}", "t.yaml",
                         lambda ref, located: Topo(), known_rules=None, known_limits=None)


SETUP = ("  - module: {name: rebalab_testdrv, params: {bug: '${bug}'}}\n"
         "  - plug: {device: edu0, model: edu, port: rp1}\n"
         "  - wait: {event: bound, device: edu0}\n")
BODY = "  - rebalance: {trigger: rescan, device: edu0}\n"


def test_a_setup_of_module_plug_and_wait_is_accepted_and_the_shorthand_names_the_point() -> None:
    sc = scenario(SETUP + "  - snapshot: bound\n" + BODY, head="parameters: {bug: [a]}\n")
    step = sc.sweep().iteration(0).steps[3]
    assert isinstance(step, RestorePointStep) and step.name == "bound"
    assert step.describe() == "snapshot bound"


@pytest.mark.parametrize("before, message", [
    ("  - jitter: {max_ms: 5}\n", r"a jitter step \(line 4\) cannot be"),
    ("  - rebalance: {trigger: rescan, device: snd0}\n", r"a rebalance step \(line 4\)"),
    ("  - pause: {}\n  - resume: {}\n", r"a pause step \(line 4\)"),
    ("  - guest: {run: 'sleep 9', background: true, name: bg}\n",
     r"background command at line 4 runs over an SSH channel"),
    ("  - snapshot: a\n", r"one restore point; line 4 is one already"),
])
def test_what_a_restore_point_cannot_hold_is_refused_at_its_line(before: str,
                                                                 message: str) -> None:
    line = 4 + before.count("\n")
    with pytest.raises(SpecError, match=rf"t.yaml:{line}: steps\[\d\].snapshot: .*{message}"):
        scenario(before + "  - snapshot: b\n" + "  - sleep: 1ms\n")


def test_a_restore_point_inside_a_parallel_block_is_refused() -> None:
    with pytest.raises(SpecError, match=r"not inside a parallel block"):
        scenario("  - parallel:\n      a:\n        - snapshot: x\n      b:\n"
                 "        - sleep: 1ms\n")


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "../etc"])
def test_a_restore_point_name_is_a_plain_word(name: str) -> None:
    with pytest.raises(SpecError, match=r"snapshot.name: .*1-64 letters"):
        scenario(f"  - snapshot: {{name: '{name}'}}\n")


def split(reset: str, sc: Any, k: int) -> tuple[Any, ...]:
    fake = SimpleNamespace(scenario=SimpleNamespace(reset=reset))
    return ScenarioRunner._split(fake, sc.sweep().iteration(k))  # type: ignore[arg-type]


def test_the_setup_is_keyed_by_its_values_and_run_only_under_snapshot_reset() -> None:
    sc = scenario(SETUP + "  - snapshot: bound\n" + "  - sleep: '${d}ms'\n" + BODY,
                  head="parameters: {bug: [a, b], d: [1, 2]}\n")
    its = [sc.sweep().iteration(k) for k in range(len(sc.sweep()))]
    keys = {}
    for k, it in enumerate(its):
        setup, body, name, key = split("snapshot", sc, k)
        assert name == "bound" and len(setup) == 3 and len(body) == 2
        keys.setdefault(it.parameters["bug"], set()).add(key)
    # the same bug: one point whatever d is; another bug: another point
    assert all(len(v) == 1 for v in keys.values())
    assert keys["a"] != keys["b"]
    # elsewhere every step is the iteration's (the snapshot step logs and does nothing)
    setup, body, name, key = split("replug", sc, 0)
    assert setup == () and len(body) == 6 and key == ""


def test_without_a_snapshot_step_every_step_is_the_iterations() -> None:
    sc = scenario(SETUP + BODY, head="parameters: {bug: [a]}\n")
    setup, body, name, key = split("snapshot", sc, 0)
    assert setup == () and len(body) == 4 and (name, key) == ("", "")
