"""The concrete steps an executor runs, and their parser.

A step in YAML is a mapping with exactly one key, the step type (``- plug: {...}``).
Dispatch on that key is done here by hand rather than by a pydantic union, so that an
unknown type gets "did you mean" and a wrong field gets the line of that field, not a
wall of union-branch errors. Each key belongs to one step kind, a class in ``lab.steps``
(registered there with ``@step_kind``) that parses its fields, checks them against the
topology, runs them and says whether they can be recorded; variants that run
differently are separate classes (``RebalanceRescan``, ``WaitQmp``, ``AssertCount``...)
whose fields mirror the YAML so error paths stay readable. This module imports the kind
modules (the order is the order messages list the types in) and re-exports their
classes.

Steps here are *concrete*: ``${param}`` substitution has already happened
(``lab.scenario.sweep``), jitter delays are drawn, durations are ``Duration`` values,
sizes are bytes. Each step remembers where it came from (``.path``, ``.line``,
``.where``) so the executor can name it in errors and timings.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping

# the kinds, in the order of their YAML keys in messages
from lab.steps.base import STEP_KINDS, ParseContext, PropValue, Spec, StepBase
from lab.steps.plug import Plug, Unplug
from lab.steps.rebalance import (REBALANCE_TRIGGERS, TRIGGER_EXERCISES, RebalanceBase,
                                 RebalanceCpuHotplug, RebalancePressure, RebalanceReconfigure,
                                 RebalanceRescan, RebalanceResize, RebalanceWdtf)
from lab.steps.guest import Guest, Module
from lab.steps.audio import PLAY_FAULTS, Play
from lab.steps.timing import Jitter, Sleep
from lab.steps.waits import WAIT_KINDS, WaitBase, WaitEvent, WaitGuest, WaitJob, WaitPcm, WaitQmp
from lab.steps.vm import Pause, Resume
from lab.steps.restore_point import RestorePointStep
from lab.steps.parallel import Branch, Parallel
from lab.steps.asserts import (ASSERT_KINDS, AssertAudio, AssertBase, AssertCount, AssertNoKind,
                               AssertRule, AudioCheck, CountCheck, check_known_rule)
from vdevice.yamlsrc import Located, YamlPath, unknown

__all__ = [
    "ASSERT_KINDS", "AssertAudio", "AssertBase", "AssertCount", "AssertNoKind", "AssertRule",
    "AudioCheck", "Branch", "CountCheck", "Guest", "Jitter", "Module", "PLAY_FAULTS",
    "Parallel", "ParseContext", "Pause", "Play", "Plug", "PropValue", "REBALANCE_TRIGGERS",
    "RebalanceBase", "RebalanceCpuHotplug", "RebalancePressure", "RebalanceReconfigure",
    "RebalanceRescan", "RebalanceResize", "RebalanceWdtf", "RestorePointStep", "Resume", "STEP_KINDS", "STEP_TYPES",
    "Sleep", "Spec", "Step", "StepBase", "TRIGGER_EXERCISES", "Unplug", "WAIT_KINDS",
    "WaitBase", "WaitEvent", "WaitGuest", "WaitJob", "WaitPcm", "WaitQmp", "check_known_rule",
    "parse_step", "parse_steps", "walk",
]

#: A concrete step: an instance of a step kind class (``lab.steps``).
Step = StepBase

#: the step types by YAML key (the registry of ``lab.steps``: a kind registered with
#: ``@step_kind`` is parsed without any change here)
STEP_TYPES: Mapping[str, type[StepBase]] = STEP_KINDS


# ---- parsing -----------------------------------------------------------------------------

def parse_steps(located: Located, path: YamlPath, ctx: ParseContext) -> tuple[Step, ...]:
    """Parse the list of steps at ``path`` (substituted data) into concrete steps."""
    data = located.get(path)
    if not isinstance(data, list):
        raise located.error("steps is a list, each item a mapping with the step type as its "
                            "only key (e.g. '- plug: {device: snd0}')", path)
    if not data:
        raise located.error("there must be at least one step", path)
    return tuple(parse_step(located, path + (i,), ctx) for i in range(len(data)))


def parse_step(located: Located, path: YamlPath, ctx: ParseContext) -> Step:
    data = located.get(path)
    if not isinstance(data, Mapping):
        raise located.error(f"a step is a mapping with one key, its type (one of "
                            f"{', '.join(STEP_TYPES)}), got {data!r}", path)
    keys = list(data)
    if len(keys) != 1:
        if not keys:
            raise located.error("empty step", path)
        known = [k for k in keys if k in STEP_TYPES]
        hint = (f"; are the fields of {known[0]!r} indented under it?" if len(known) == 1
                else "; put each step in its own '- ' item" if len(known) > 1 else "")
        raise located.error(f"a step has exactly one key, its type; found "
                            f"{', '.join(map(str, keys))}{hint}", path + (keys[1],))
    typ = keys[0]
    if typ not in STEP_TYPES:
        raise located.error(unknown("step type", typ, list(STEP_TYPES)), path + (typ,))
    step = STEP_TYPES[typ].parse(located, path + (typ,), ctx)
    step._ypath = path
    step._line = located.line_of(path)
    step._file = located.filename
    return step


def walk(steps: tuple[Step, ...]) -> typing.Iterator[Step]:
    """Every step, depth first, including those inside parallel branches."""
    for s in steps:
        yield s
        for _, inner in s.substeps():
            yield from walk(inner)
