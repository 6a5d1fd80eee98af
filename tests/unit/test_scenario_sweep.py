"""Sweep expansion: order, ranges, seeds, random draws, replay, until, skipped."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from lab.errors import ConfigError
from lab.results import IterationResult, Status
from lab.scenario import (GridParam, Jitter, RandomParam, Sleep, Sweep, derive_seed,
                          representative_combinations, validate_file, validate_text)
from lab.scenario.params import ChoiceParam, draw_float, draw_int, stable_u64
from lab.scenario.units import Duration
from vdevice.errors import SpecError

DATA = Path(__file__).parent / "data" / "scenarios"


class Topo:
    def device_ids(self) -> list[str]:
        return []

    def port_ids(self) -> list[str]:
        return ["rp1", "rp2"]


def resolve(ref: Any, located: Any) -> Topo:
    return Topo()


def scenario(params: str, steps: str, extra: str = "") -> Any:
    text = f"name: t\nparameters:\n{params}steps:\n{steps}{extra}"
    return validate_text(text, "t.yaml", resolve)


SWEEP = scenario("  delay_ms: {range: [0, 400, 100]}\n  model: [AC97, ES1370]\n"
                 "  jitter_ms: {random: [0, 20]}\n",
                 "  - plug: {device: snd0, model: '${model}', port: rp1}\n"
                 "  - sleep: ${delay_ms}ms\n  - sleep: ${jitter_ms}ms\n  - jitter: {max_ms: 20}\n",
                 "seed: 1234\nrepeat: 3\n")


def test_range_includes_stop() -> None:
    p = SWEEP.parameter("delay_ms")
    assert isinstance(p, GridParam) and p.values == (0, 100, 200, 300, 400)


@pytest.mark.parametrize("spec,values", [
    ("[0, 400, 100]", (0, 100, 200, 300, 400)),
    ("[0, 350, 100]", (0, 100, 200, 300)),          # stop not on the grid: not included
    ("[1, 3]", (1, 2, 3)),                          # step defaults to 1
    ("[0, 1, 0.25]", (0.0, 0.25, 0.5, 0.75, 1.0)),  # floats, no drift
    ("[0.1, 0.3, 0.1]", (0.1, 0.2, 0.3)),
    ("[5, 5, 1]", (5,)),
])
def test_range_values(spec: str, values: tuple[Any, ...]) -> None:
    sc = scenario(f"  x: {{range: {spec}}}\n", "  - sleep: ${x}ms\n")
    assert sc.parameter("x").values == values


def test_total_and_order() -> None:
    sweep = SWEEP.sweep()
    assert len(sweep) == 5 * 2 * 3 == sweep.total and sweep.grid_size == 10
    its = list(sweep)
    # last grid parameter varies fastest; rounds outermost
    assert [(i.parameters["delay_ms"], i.parameters["model"]) for i in its[:4]] == \
        [(0, "AC97"), (0, "ES1370"), (100, "AC97"), (100, "ES1370")]
    assert [i.round for i in its] == [0] * 10 + [1] * 10 + [2] * 10
    assert [i.point for i in its[:12]] == list(range(10)) + [0, 1]
    assert [i.index for i in its] == list(range(30))
    # parameter dict keeps file order
    assert list(its[0].parameters) == ["delay_ms", "model", "jitter_ms"]
    assert its[0].label().startswith("#0 delay_ms=0 model=AC97 jitter_ms=")


def test_derive_seed_is_the_documented_function() -> None:
    digest = hashlib.sha256(b"rebalab/v1/iteration/1234/7").digest()
    assert derive_seed(1234, 7) == int.from_bytes(digest[:8], "big") & ((1 << 48) - 1)
    assert derive_seed(1234, 7) == derive_seed(1234, 7)
    assert derive_seed(1234, 7) != derive_seed(1234, 8) != derive_seed(1235, 7)
    assert SWEEP.sweep().iteration(7).seed == derive_seed(1234, 7)
    # pinned: these must never change, or old run directories could not be replayed
    assert derive_seed(0, 0) == 58162926092539
    assert derive_seed(1234, 7) == 263373438859753
    assert draw_int(263373438859753, "jitter_ms", 0, 20) == 11


def test_draws_are_stable_and_bounded() -> None:
    assert stable_u64("a", 1) == int.from_bytes(hashlib.sha256(b"a/1").digest()[:8], "big")
    vals = [draw_int(s, "x", 0, 20) for s in range(500)]
    assert min(vals) == 0 and max(vals) == 20
    fl = [draw_float(s, "y", 1.0, 2.0) for s in range(500)]
    assert all(1.0 <= v < 2.0 for v in fl)
    assert draw_int(99, "x", 3, 3) == 3


def test_random_parameters_per_iteration() -> None:
    sweep = SWEEP.sweep()
    jit = [it.parameters["jitter_ms"] for it in sweep]
    assert all(isinstance(v, int) and 0 <= v <= 20 for v in jit)
    assert len(set(jit)) > 5                        # really drawn per iteration
    # the value is a function of (iteration seed, name): stable
    p = SWEEP.parameter("jitter_ms")
    assert isinstance(p, RandomParam)
    assert jit[5] == p.draw(derive_seed(1234, 5))


def test_float_random_and_choice() -> None:
    sc = scenario("  f: {random: [0.5, 1.5]}\n  c: {choice: [rp1, rp2]}\n",
                  "  - sleep: ${f}s\n  - plug: {device: s, model: AC97, port: '${c}'}\n",
                  "repeat: 40\n")
    its = list(sc.sweep())
    assert len(its) == 40
    assert all(0.5 <= it.parameters["f"] < 1.5 for it in its)
    assert {it.parameters["c"] for it in its} == {"rp1", "rp2"}
    assert isinstance(sc.parameter("c"), ChoiceParam)
    s0 = its[0].steps[0]
    assert isinstance(s0, Sleep)
    assert s0.duration == Duration.parse(f"{its[0].parameters['f']}s")


def test_steps_are_concrete() -> None:
    it = SWEEP.sweep().iteration(3)          # delay 100, ES1370
    plug, sleep, sleep2, jit = it.steps
    assert plug.model == "ES1370"
    assert isinstance(sleep, Sleep) and sleep.duration == Duration(100 * 10**6)
    assert isinstance(sleep2, Sleep) and sleep2.duration.ms == it.parameters["jitter_ms"]
    assert isinstance(jit, Jitter) and jit.delay is not None
    assert Duration(0) <= jit.delay <= Duration(20 * 10**6)
    assert jit.delay.ns % 1000 == 0


def test_jitter_differs_between_iterations_but_replays() -> None:
    sweep = SWEEP.sweep()
    delays = [sweep.iteration(k).steps[3].delay for k in range(30)]
    assert len(set(delays)) > 10
    assert sweep.iteration(17).steps[3].delay == delays[17]


def test_replay_equals_original() -> None:
    """``rebalab replay RUN --iteration K``: validate the file again, take iteration K."""
    original = list(validate_file(DATA / "full.yaml", resolve_full).sweep())
    again = validate_file(DATA / "full.yaml", resolve_full).sweep()
    for k in (0, 5, len(original) - 1):
        it = again.iteration(k)
        assert it == original[k]
        assert [s.to_yaml() for s in it.steps] == [s.to_yaml() for s in original[k].steps]
        assert [s.line for s in it.steps] == [s.line for s in original[k].steps]


def test_replay_from_the_copied_text(tmp_path: Path) -> None:
    """A run keeps ``source_text``; replay validates that copy with the original base dir."""
    sc = validate_file(DATA / "full.yaml", resolve_full)
    copy = tmp_path / "scenario.yaml"
    copy.write_text(sc.source_text)
    again = validate_text(copy.read_text(), sc.file, resolve_full, base_dir=sc.base_dir)
    assert again.sweep().iteration(9) == sc.sweep().iteration(9)
    assert again.to_json() == sc.to_json()


def resolve_full(ref: Any, located: Any) -> Any:
    class T:
        def device_ids(self) -> list[str]:
            return ["cold0"]

        def port_ids(self) -> list[str]:
            return ["rp1", "rp2", "rp3"]
    return T()


def test_iteration_out_of_range() -> None:
    sweep = SWEEP.sweep()
    for k in (-1, 30, 10**9):
        with pytest.raises(ConfigError, match=r"has 30 iterations \(0..29\)"):
            sweep.iteration(k)


def test_no_parameters_means_repeat_only() -> None:
    sc = validate_text("name: t\nrepeat: 4\nseed: 9\nsteps:\n  - sleep: 1ms\n", "t.yaml", resolve)
    its = list(Sweep(sc))
    assert len(its) == 4 and all(it.parameters == {} for it in its)
    assert [it.seed for it in its] == [derive_seed(9, k) for k in range(4)]


def _r(k: int, status: Status) -> IterationResult:
    return IterationResult(index=k, parameters={}, seed=0, status=status)


def test_until_fail() -> None:
    sc = validate_text("name: t\nuntil: fail\nrepeat: 5\nsteps:\n  - sleep: 1ms\n", "t", resolve)
    sw = sc.sweep()
    assert sw.should_stop([_r(0, Status.PASSED), _r(1, Status.ERROR)]) is None
    assert sw.should_stop([_r(0, Status.PASSED), _r(1, Status.FAILED)]) == \
        "until: fail reached at iteration 1"
    skipped = sw.skipped(2, "until: fail reached at iteration 1")
    assert [s.index for s in skipped] == [2, 3, 4]
    assert all(s.status == Status.SKIPPED and s.stopped_at for s in skipped)
    assert skipped[0].seed == derive_seed(0, 2)


def test_until_failures_n_and_interrupt() -> None:
    sc = validate_text("name: t\nuntil: {failures: 2}\nrepeat: 5\nsteps:\n  - sleep: 1ms\n", "t",
                       resolve)
    sw = sc.sweep()
    assert sw.should_stop([_r(0, Status.FAILED)]) is None
    assert sw.should_stop([_r(0, Status.FAILED), _r(1, Status.FAILED)]) == \
        "until: {failures: 2} reached at iteration 1"
    assert sw.should_stop([_r(0, Status.INTERRUPTED)]) == "interrupted"
    free = validate_text("name: t\nrepeat: 2\nsteps:\n  - sleep: 1ms\n", "t", resolve).sweep()
    assert free.should_stop([_r(0, Status.FAILED), _r(1, Status.FAILED)]) is None


def test_skipped_parameters_match_iterations() -> None:
    sweep = SWEEP.sweep()
    for res in sweep.skipped(25, "x"):
        it = sweep.iteration(res.index)
        assert res.parameters == it.parameters and res.seed == it.seed


def test_representative_combinations() -> None:
    params = SWEEP.parameters
    combos = representative_combinations(params)
    assert len(combos) == 5 * 2 * 2                 # random: its two bounds
    assert {c["jitter_ms"] for c in combos} == {0, 20}
    big = tuple(GridParam(f"p{i}", tuple(range(10)), None) for i in range(4))
    few = representative_combinations(big)
    assert len(few) == 1 + 4 * 9                    # one at a time beyond the cap
    assert representative_combinations(()) == [{}]


def test_steps_for_missing_value() -> None:
    with pytest.raises(SpecError, match="no value for parameter"):
        SWEEP.steps_for({"delay_ms": 1}, 0)
