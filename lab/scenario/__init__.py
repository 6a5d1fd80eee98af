"""The scenario language: validated YAML -> ``Scenario`` -> iterations -> concrete steps.

Public API (what the CLI and the executor call)::

    scenario = validate_file(path, resolve_topology, known_rules=None)   # SpecError on bad input
    sweep = scenario.sweep()              # or Sweep(scenario); len(sweep) iterations
    for it in sweep:                      # Iteration(index, parameters, seed, steps=...)
        run(it.steps)                     # concrete, typed steps (see lab.scenario.steps)
        if sweep.should_stop(results): ...
    sweep.iteration(k)                    # exactly iteration k again (replay)

The syntax is documented in ``scenarios/README.md``.
"""

from lab.scenario.loader import representative_combinations, validate_file, validate_text
from lab.scenario.model import (GuestSpec, Scenario, ScenarioFile, TopologyLike, TopologyRef,
                                TopologyResolver, Until)
from lab.scenario.params import ChoiceParam, GridParam, Param, RandomParam
from lab.scenario.steps import (AssertAudio, AssertBase, AssertCount, AssertNoKind, AssertRule,
                                AudioCheck, Branch, CountCheck, Guest, Jitter, Module, Parallel, Pause,
                                Play, Plug, RebalanceBase, RebalanceCpuHotplug, RebalancePressure,
                                RebalanceReconfigure, RebalanceRescan, RebalanceResize, RebalanceWdtf, Resume,
                                Sleep, Step, StepBase, Unplug, WaitBase, WaitEvent, WaitGuest,
                                WaitJob, WaitPcm, WaitQmp, walk)
from lab.scenario.sweep import Iteration, Sweep, derive_seed
from lab.scenario.units import Duration

__all__ = [
    "AssertAudio", "AssertBase", "AssertCount", "AssertNoKind", "AssertRule", "AudioCheck",
    "Branch", "ChoiceParam", "CountCheck", "Duration", "GridParam", "Guest", "GuestSpec",
    "Iteration", "Jitter", "Module", "Parallel", "Param", "Pause", "Play", "Plug", "RandomParam",
    "RebalanceBase", "RebalanceCpuHotplug", "RebalancePressure", "RebalanceReconfigure",
    "RebalanceRescan", "RebalanceResize", "RebalanceWdtf", "Resume", "Scenario", "ScenarioFile", "Sleep", "Step",
    "StepBase", "Sweep", "TopologyLike", "TopologyRef", "TopologyResolver", "Unplug", "Until",
    "WaitBase", "WaitEvent", "WaitGuest", "WaitJob", "WaitPcm", "WaitQmp", "derive_seed",
    "representative_combinations", "validate_file", "validate_text", "walk",
]
