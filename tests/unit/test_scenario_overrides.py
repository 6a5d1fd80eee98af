"""Command-line overrides of a validated scenario (rebalab run --set/--repeat/--seed/...)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.errors import ConfigError
from lab.scenario import Module, WaitEvent, validate_file
from lab.scenario.overrides import Overrides

from tests.unit.test_scenario_validate import Resolver

RACE = Path(__file__).resolve().parents[2] / "scenarios" / "race-planted.yaml"


@pytest.fixture(scope="module")
def race():
    return validate_file(RACE, Resolver())


def test_set_pins_a_grid_parameter(race) -> None:
    full = race.sweep()
    pinned = Overrides(sets=("bug=no-drain",)).apply(race).sweep()
    assert len(full) == 32 and len(pinned) == 8
    assert {it.parameters["bug"] for it in pinned} == {"no-drain"}
    assert [it.parameters["delay_ms"] for it in pinned] == list(range(0, 176, 25))
    # the module step of every iteration carries the pinned bug
    for it in pinned:
        mod = next(s for s in it.steps if isinstance(s, Module))
        assert mod.param_text() == {"bug": "no-drain", "slow_ms": "800", "timeout_ms": "250"}
        assert not mod.reload and mod.describe() == ("module load rebalab_testdrv bug=no-drain "
                                                     "slow_ms=800 timeout_ms=250")
    # integers are matched by their text
    assert len(Overrides(sets=("delay_ms=75",)).apply(race).sweep()) == 4


def test_repeat_seed_until_and_reset(race) -> None:
    o = Overrides(sets=("bug=none",), repeat=7, seed=99, until_failures=2, reset="reboot")
    sc = o.apply(race)
    assert len(sc.sweep()) == 56 and sc.seed == 99 and sc.reset == "reboot"
    assert sc.until is not None and sc.until.failures == 2
    assert o.describe() == "--set bug=none --repeat 7 --seed 99 --until-fail 2 --reset reboot"
    # the seed changes the draws (jitter), the grid stays
    a = race.sweep().iteration(0).seed
    assert sc.sweep().iteration(0).seed != a


def test_replay_rebuilds_the_same_iterations_from_run_json(race) -> None:
    o = Overrides(sets=("bug=stale-bar",), repeat=2, reset="reboot")
    back = Overrides.from_json(o.to_json())
    assert back == o
    a, b = o.apply(race).sweep(), back.apply(race).sweep()
    assert [(it.parameters, it.seed) for it in a] == [(it.parameters, it.seed) for it in b]
    # the older run.json form: a bare list of --set values
    assert Overrides.from_json(["bug=none"]) == Overrides(sets=("bug=none",))
    assert Overrides.from_json(None).empty


@pytest.mark.parametrize("o,needle", [
    (Overrides(sets=("bug",)), "expected NAME=VALUE"),
    (Overrides(sets=("bgu=none",)), "no parameter 'bgu'"),
    (Overrides(sets=("bug=nope",)), "not one of the declared values (none, no-drain, slow-remove, stale-bar)"),
    (Overrides(sets=("bug=none", "bug=no-drain")), "given twice"),
    (Overrides(repeat=0), "--repeat must be 1"),
    (Overrides(seed=-1), "--seed must be 0"),
    (Overrides(until_failures=0), "--until-fail must be >= 1"),
    (Overrides(reset="rebot"), "--reset must be one of"),
])
def test_bad_overrides_name_the_flag(race, o: Overrides, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        o.apply(race)
    assert needle in str(e.value)


def test_wait_text_is_a_checked_regex(race) -> None:
    it = race.sweep().iteration(0)
    w = next(s for s in it.steps if isinstance(s, WaitEvent) and s.text)
    assert w.matches_text("rebalab_testdrv 0000:01:00.0: stream start (pid 316 dd)")
    assert not w.matches_text("stream stop")


def test_guest_override_rechecks_the_steps(race, tmp_path) -> None:
    from vdevice.errors import SpecError

    with pytest.raises(SpecError) as e:
        Overrides(guest=f"windows:{tmp_path / 'w.qcow2'}").apply(race)
    assert e.value.file == str(RACE) and e.value.field == "steps[0]"
    assert "not for a windows guest" in str(e.value)
    with pytest.raises(ConfigError, match="reached over ssh, not winrm"):
        Overrides(agent="winrm").apply(race)
    with pytest.raises(ConfigError, match="needs an image"):
        Overrides(guest="windows").apply(race)
    same = Overrides(guest="linux", agent="ssh").apply(race)
    assert same.guest.os == "linux" and same.guest.agent_kind == "ssh"
