"""Command-line overrides of a validated scenario: ``--set``, ``--repeat``, ``--seed``,
``--until-fail``, ``--reset``.

A race hunt is one scenario run many ways: the same sweep for each planted bug, twenty
rounds instead of two, another seed, stop at the first failure. Editing the YAML for
each would make runs that differ only by a copy of the file; instead the CLI narrows or
extends the validated scenario, and the run records exactly which overrides it used,
so ``rebalab replay`` rebuilds the same iteration list.

Overrides never widen what was validated: ``--set`` pins a list/range parameter to one
of its *declared* values (every step was checked with each of them), ``--repeat`` and
``--seed`` take the same bounds as the file's own keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lab.errors import ConfigError as UsageError
from pydantic import ValidationError

from lab.scenario.loader import check_guest_steps, check_trace_device
from lab.scenario.model import GuestSpec, Scenario, Until
from lab.scenario.params import GridParam

MAX_REPEAT = 100_000
RESETS = ("none", "replug", "reboot", "snapshot")
SEED_MAX = 2**63 - 1


@dataclass(frozen=True)
class Overrides:
    sets: tuple[str, ...] = ()        # NAME=VALUE, in the order given
    repeat: int | None = None
    seed: int | None = None
    until_failures: int | None = None
    reset: str | None = None
    guest: str | None = None          # "linux" or "windows:<image>" (relative to the cwd)
    agent: str | None = None
    #: ``--trace-provider GUID[:FLAGS[:LEVEL]]``: the driver's trace providers, added to
    #: the (Windows) guest's ``trace`` after --guest/--agent
    trace_providers: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self == Overrides()

    def to_json(self) -> dict[str, Any]:
        return {"set": list(self.sets), "repeat": self.repeat, "seed": self.seed,
                "until_failures": self.until_failures, "reset": self.reset,
                "guest": self.guest, "agent": self.agent,
                "trace_providers": list(self.trace_providers)}

    @classmethod
    def from_json(cls, data: Any) -> Overrides:
        """From run.json; a bare list is the older ``--set`` only form."""
        if not data:
            return cls()
        if isinstance(data, list):
            return cls(sets=tuple(str(x) for x in data))
        if not isinstance(data, Mapping):
            raise UsageError(f"run.json: overrides must be a mapping, got {data!r}")
        return cls(sets=tuple(str(x) for x in data.get("set") or ()),
                   repeat=data.get("repeat"), seed=data.get("seed"),
                   until_failures=data.get("until_failures"), reset=data.get("reset"),
                   guest=data.get("guest"), agent=data.get("agent"),
                   trace_providers=tuple(str(x) for x in data.get("trace_providers") or ()))

    def describe(self) -> str:
        """The overrides as the command line flags that give them."""
        flags = (("--repeat", self.repeat), ("--seed", self.seed),
                 ("--until-fail", self.until_failures), ("--reset", self.reset),
                 ("--guest", self.guest), ("--agent", self.agent))
        return " ".join([*(f"--set {s}" for s in self.sets),
                         *(f"{flag} {value}" for flag, value in flags if value is not None),
                         *(f"--trace-provider {t}" for t in self.trace_providers)])

    def apply(self, scenario: Scenario) -> Scenario:
        """The scenario with these overrides; UsageError names the flag that is wrong."""
        if self.empty:
            return scenario
        params = list(scenario.parameters)
        pinned: set[str] = set()
        for item in self.sets:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UsageError(f"--set {item!r}: expected NAME=VALUE")
            if name in pinned:
                raise UsageError(f"--set {name}: given twice")
            idx = next((i for i, p in enumerate(params) if p.name == name), None)
            if idx is None:
                raise UsageError(f"--set {name}: the scenario has no parameter {name!r} "
                                 f"(parameters: {', '.join(p.name for p in params) or 'none'})")
            p = params[idx]
            if not isinstance(p, GridParam):
                raise UsageError(f"--set {name}: only list/range parameters can be pinned "
                                 f"({name} is drawn per iteration)")
            match = [v for v in p.values if str(v) == value]
            if not match:
                raise UsageError(f"--set {name}={value}: not one of the declared values "
                                 f"({', '.join(str(v) for v in p.values)})")
            params[idx] = replace(p, values=(match[0],), spec=[match[0]])
            pinned.add(name)
        changes: dict[str, Any] = {"parameters": tuple(params)}
        if self.repeat is not None:
            if not 1 <= self.repeat <= MAX_REPEAT:
                raise UsageError(f"--repeat must be 1 .. {MAX_REPEAT}, got {self.repeat}")
            changes["repeat"] = self.repeat
        if self.seed is not None:
            if not 0 <= self.seed <= SEED_MAX:
                raise UsageError(f"--seed must be 0 .. 2^63-1, got {self.seed}")
            changes["seed"] = self.seed
        if self.until_failures is not None:
            if self.until_failures < 1:
                raise UsageError(f"--until-fail must be >= 1, got {self.until_failures}")
            changes["until"] = Until(failures=self.until_failures)
        if self.reset is not None:
            if self.reset not in RESETS:
                raise UsageError(f"--reset must be one of {', '.join(RESETS)}, not {self.reset!r}")
            changes["reset"] = self.reset
        if self.guest is not None or self.agent is not None:
            changes["guest"] = self._guest_spec(scenario)
        if self.trace_providers:
            guest = changes.get("guest", scenario.guest)
            try:
                changes["guest"] = guest.with_trace_providers(self.trace_providers)
            except ValueError as exc:
                raise UsageError(f"--trace-provider: {exc}") from None
        out = replace(scenario, **changes)
        if "guest" in changes:
            check_guest_steps(out)     # SpecError naming the step a new guest cannot do
            out = check_trace_device(out)
        return out

    def _guest_spec(self, scenario: Scenario) -> GuestSpec:
        data: dict[str, Any]
        if self.guest is None:
            data = scenario.guest.model_dump()
        else:
            os_name, sep, image = self.guest.partition(":")
            data = {"os": os_name.strip().lower()}
            if sep and image.strip():
                data["image"] = str(Path(image.strip()).expanduser().resolve())
        if self.agent is not None:
            data["agent"] = self.agent
        elif self.guest is not None:
            data.pop("agent", None)
        if self.guest is not None and data.get("os") == "windows" and scenario.guest.trace is not None:
            data["trace"] = scenario.guest.trace.model_dump()   # another image, the same driver trace
        try:
            return GuestSpec.model_validate(data)
        except ValidationError as exc:
            msg = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
            raise UsageError(f"--guest {self.guest or scenario.guest.os}"
                             + (f" --agent {self.agent}" if self.agent else "") + f": {msg}") from None


def from_args(args: Any) -> Overrides:
    """From the CLI's namespace (``rebalab run``)."""
    return Overrides(tuple(getattr(args, "set", None) or ()), getattr(args, "repeat", None),
                     getattr(args, "seed", None), getattr(args, "until_fail", None),
                     getattr(args, "reset", None), getattr(args, "guest", None),
                     getattr(args, "agent", None),
                     tuple(getattr(args, "trace_provider", None) or ()))
