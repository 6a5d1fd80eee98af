"""Expand a scenario's parameters into numbered, reproducible iterations.

Order. The grid is the cartesian product of the list/range parameters in file order,
the last one varying fastest (like nested for-loops written in that order). The
whole grid is run once per *round*, ``repeat`` rounds in all:

    index k  ->  round = k // grid_size,  grid point = k % grid_size

Rounds outermost means an interrupted or ``until: fail`` run has still covered the
whole parameter space as evenly as possible, and per-value failure rates stay
comparable.

Seeds. Each iteration's seed is ``derive_seed(scenario_seed, k)``: the first 8 bytes
of SHA-256 of ``"rebalab/v1/iteration/<scenario_seed>/<k>"``, big-endian, keeping
the low 48 bits (so it survives JSON tools that read numbers as doubles). Random
parameters and jitter delays are drawn from that seed (``params.draw_int`` /
``draw_float``, SHA-256 of seed and parameter name or step path). Iteration k is a
pure function of (scenario file, k): ``Sweep.iteration(k)`` is what
``rebalab replay RUN_DIR --iteration K`` runs, and equals the k-th iteration of the
original run.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from lab.errors import ConfigError
from lab.results import IterationResult, Status
from lab.scenario.model import Scenario
from lab.scenario.params import GridParam, Scalar, format_value, stable_u64
from lab.scenario.steps import Step
from vdevice.errors import SpecError

SEED_BITS = 48


def derive_seed(scenario_seed: int, index: int) -> int:
    """The seed of iteration ``index`` (documented above; never Python's ``hash``)."""
    return stable_u64("rebalab", "v1", "iteration", scenario_seed, index) & ((1 << SEED_BITS) - 1)


@dataclass(frozen=True)
class Iteration:
    """One iteration: its index, the parameter values (file order) and its seed."""

    index: int
    parameters: dict[str, Scalar]
    seed: int
    round: int = 0          # 0 .. repeat-1
    point: int = 0          # index into the parameter grid
    steps: tuple[Step, ...] = field(default=(), repr=False, compare=False)

    def label(self) -> str:
        """``#7 delay_ms=100 model=AC97`` - for logs, test names and the console."""
        vals = " ".join(f"{k}={format_value(v)}" for k, v in self.parameters.items())
        return f"#{self.index}" + (f" {vals}" if vals else "")


#: iterations one run may have (a week of 1-second iterations is far below it)
MAX_ITERATIONS = 1_000_000


class Sweep:
    """The iterations of a scenario, in run order; ``len()`` is the total."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.grid: list[GridParam] = [p for p in scenario.parameters if isinstance(p, GridParam)]
        self.grid_size = math.prod(len(p.values) for p in self.grid) if self.grid else 1
        self.total = self.grid_size * scenario.repeat
        if self.total > MAX_ITERATIONS:
            # checked before anything is allocated per iteration (the runner's index list)
            raise SpecError(f"the sweep has {self.total} iterations ({self.grid_size} parameter "
                            f"combinations x repeat {scenario.repeat}); at most "
                            f"{MAX_ITERATIONS} per run: sweep fewer values, or use random "
                            "parameters with repeat", file=scenario.file, field="parameters")

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Iteration]:
        for k in range(self.total):
            yield self.iteration(k)

    def iteration(self, k: int) -> Iteration:
        """Iteration ``k`` exactly as the original run had it, concrete steps included.

        Raises ``ConfigError`` when ``k`` is out of range (a replay of a run made
        from a different scenario file, or a typo).
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.total:
            raise ConfigError(f"iteration {k} does not exist: scenario "
                              f"{self.scenario.name!r} has {self.total} iterations "
                              f"(0..{self.total - 1})")
        it = self._light(k)
        return replace(it, steps=self.scenario.steps_for(it.parameters, it.seed))

    # ---- until ------------------------------------------------------------------------
    def should_stop(self, results: Sequence[IterationResult]) -> str | None:
        """Why the run should stop after ``results`` (in run order), or None.

        ``until: fail`` / ``{failures: N}`` counts *failed* iterations (the driver broke
        a rule or an assert). Lab errors don't count: they say nothing about the
        driver; the executor decides whether a lab error aborts the run. An
        interrupted iteration always stops the run.
        """
        if any(r.status == Status.INTERRUPTED for r in results):
            return "interrupted"
        until = self.scenario.until
        if until is None:
            return None
        failed = [r for r in results if r.status == Status.FAILED]
        if len(failed) >= until.failures:
            n = until.failures
            what = "fail" if n == 1 else f"{{failures: {n}}}"
            return f"until: {what} reached at iteration {failed[n - 1].index}"
        return None

    def skipped(self, start: int, reason: str) -> list[IterationResult]:
        """``SKIPPED`` results for iterations ``start..total-1`` (not run, with why), so
        reports list every iteration the scenario defines."""
        out = []
        for k in range(max(0, start), self.total):
            it = self._light(k)
            out.append(IterationResult(index=k, parameters=it.parameters, seed=it.seed,
                                       status=Status.SKIPPED, stopped_at=reason))
        return out

    def _light(self, k: int) -> Iteration:
        """Iteration ``k`` without building its steps (cheap; for skipped ones)."""
        rnd, point = divmod(k, self.grid_size)
        rest = point
        grid_values: dict[str, Scalar] = {}
        for p in reversed(self.grid):
            rest, digit = divmod(rest, len(p.values))
            grid_values[p.name] = p.values[digit]
        seed = derive_seed(self.scenario.seed, k)
        values = {p.name: grid_values[p.name] if isinstance(p, GridParam) else p.draw(seed)
                  for p in self.scenario.parameters}
        return Iteration(index=k, parameters=values, seed=seed, round=rnd, point=point)
