"""What every step kind shares, and the two contexts a step is given.

A step kind is one class (``lab.steps.plug.Plug``...) that holds all the lab knows
about it:

- its fields (a frozen pydantic model) and their validators, and how its YAML is
  parsed (``parse``; the default takes a mapping, or a shorthand scalar);
- ``verify(chk, st)``: its static checks against the topology and the steps before
  it, before any VM starts (``chk``: the scenario validator's reference checker,
  ``lab.scenario.loader.RefChecker``);
- ``record_refusal``: why QEMU's record/replay log cannot hold it (``lab.record``);
- ``execute(ctx)``: what it does on a running VM, through a ``StepContext`` that the
  runner builds for each step.

A kind registers its YAML key with ``@step_kind``; the parser (``lab.scenario.steps``),
the validator and the runner know no kind by name. Families that share a key (``wait``,
``assert``, ``rebalance``) register their base class, whose ``parse`` picks the
variant; each variant is a class with its own ``verify`` and ``execute``.

Importing this package stays cheap and needs no QEMU: modules that drive a VM
(``lab.operations``, ``lab.rebalance``, ``lab.rules``...) are imported inside
``execute``.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, Union

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError, model_validator

from lab.scenario.units import Bool, Duration, Int, MsNumber, Str
from vdevice.catalog import REFUSED_PROPS, Role, check_prop_name, check_user_props, get_model
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath, format_path, spec_error, suggest, unknown

if TYPE_CHECKING:
    from lab.guest.audio_player import AudioPlayer
    from lab.events import DeviceId, Event
    from lab.machine import Machine
    from lab.observe import Observation
    from lab.results import Violation
    from lab.rules.base import RuleContext
    from lab.scenario.loader import RefChecker, RefState
    from lab.timeline import Timeline
    from vdevice.topology import Device

PropValue = Union[Str, Int, Bool]

#: how long a wait waits when its step gives no timeout (seconds)
DEFAULT_WAIT_S = 20.0


class Spec(BaseModel):
    """Base of every scenario model: frozen, unknown fields refused.

    Also gives every ``Duration`` field ``x`` a twin key ``x_ms`` taking a plain number
    of milliseconds (``timeout_ms: 500`` is ``timeout: 500ms``), one rule instead of a
    special case per field.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    _ms_keys: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        cls._ms_keys = {f"{f.alias or n}_ms": f.alias or n for n, f in cls.model_fields.items()
                        if _mentions(f.annotation, Duration)}

    @model_validator(mode="before")
    @classmethod
    def _ms_twins(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and cls._ms_keys:
            out = dict(data)
            for ms_key, key in cls._ms_keys.items():
                if ms_key in out:
                    if key in out:
                        raise ValueError(f"give either {key} or {ms_key}, not both")
                    out[key] = MsNumber(out.pop(ms_key))
            return out
        return data


def _mentions(ann: Any, target: type) -> bool:
    if ann is target:
        return True
    return any(_mentions(a, target) for a in typing.get_args(ann))


# ---- parsing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParseContext:
    """What step parsing needs besides the data: the iteration seed (jitter draws) and
    the rule names the rules engine knows (None: don't check)."""

    seed: int = 0
    known_rules: frozenset[str] | None = None


S = TypeVar("S", bound="StepBase")


def validate_args(cls: type[S], located: Located, apath: YamlPath, args: Any,
                  ctx: ParseContext) -> S:
    """``args`` validated as ``cls``; errors name the field's line."""
    try:
        return cls.model_validate(args, context={"known_rules": ctx.known_rules})
    except ValidationError as exc:
        raise spec_error(exc, located.at(apath), cls) from None


def mapping_or(located: Located, apath: YamlPath, shorthand: str | None,
               what: str) -> dict[str, Any]:
    """The step's fields: a mapping, nothing, or a scalar for the ``shorthand`` field."""
    data = located.get(apath)
    if isinstance(data, Mapping):
        return dict(data)
    if data is None:
        return {}
    if shorthand is not None and not isinstance(data, list):
        return {shorthand: data}
    raise located.error(f"{what} takes a mapping of fields", apath)


def one_of_keys(located: Located, apath: YamlPath, kinds: Mapping[str, Any], what: str
                ) -> tuple[str, dict[str, Any]]:
    """For a family whose variant is the one key of ``kinds`` present (``wait``,
    ``assert``): that key and the fields."""
    data = located.get(apath)
    if not isinstance(data, Mapping):
        raise located.error(f"{what} takes a mapping with one of: {', '.join(kinds)}", apath)
    present = [k for k in kinds if k in data]
    if len(present) != 1:
        if present:
            raise located.error(f"{what} takes one of {', '.join(kinds)}; found "
                                f"{' and '.join(present)}", apath + (present[1],))
        others = [k for k in data if k not in kinds]
        close = [k for k in others if suggest(k, list(kinds)) is not None]
        if close:
            raise located.error(unknown(f"{what} kind", close[0], list(kinds)),
                                apath + (close[0],))
        raise located.error(f"{what} needs one of: {', '.join(kinds)}", apath)
    return present[0], dict(data)


# ---- the step ----------------------------------------------------------------------------

class StepBase(Spec):
    """What all steps share: the YAML type key and where the step was written, and the
    hooks each kind fills in (see the module docstring)."""

    #: the YAML key (``- plug: ...``)
    step_type: ClassVar[str] = ""
    #: the field a scalar stands for (``- plug: snd0`` is ``{device: snd0}``)
    shorthand: ClassVar[str | None] = None
    #: why QEMU's record/replay log cannot hold this step (None: it can)
    record_refusal: ClassVar[str | None] = None
    #: the machine must capture audio for this step
    needs_audio: ClassVar[bool] = False

    _ypath: YamlPath = PrivateAttr(default=())
    _line: int | None = PrivateAttr(default=None)
    _file: str = PrivateAttr(default="")

    @property
    def path(self) -> str:
        """The field path of this step, e.g. ``steps[3]`` or ``steps[5].parallel.yank[0]``."""
        return format_path(self._ypath)

    @property
    def yaml_path(self) -> YamlPath:
        return self._ypath

    @property
    def line(self) -> int | None:
        return self._line

    @property
    def where(self) -> str:
        """``file:line`` of the step, for error messages and logs."""
        return f"{self._file}:{self._line}" if self._line else self._file

    def field_path(self, *fields: str | int) -> YamlPath:
        """The YAML path of one of this step's fields (for errors at its line)."""
        return self._ypath + (self.step_type,) + tuple(fields)

    def describe(self) -> str:
        """A one-line human description, e.g. ``plug snd0 (AC97 @ rp1)``."""
        return self.step_type

    def to_yaml(self) -> dict[str, Any]:
        """The step as YAML-shaped data (for run.json and logs)."""
        body = self.model_dump(mode="json", exclude_none=True)
        return {self.step_type: body or None}

    def substeps(self) -> tuple[tuple[str, tuple[StepBase, ...]], ...]:
        """Steps nested in this one, as (branch name, steps); none but for ``parallel``."""
        return ()

    # -- the hooks -------------------------------------------------------------------
    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        """The step whose fields are at ``apath`` (the value of its type key)."""
        args = mapping_or(located, apath, cls.shorthand, cls.step_type)
        return validate_args(cls, located, apath, args, ctx)

    def verify(self, chk: RefChecker, st: RefState) -> None:
        """Static checks against the topology and the steps before this one (the
        scenario validator); ``chk.fail`` reports a problem at a field's line."""

    def execute(self, ctx: StepContext) -> str | None:
        """Run the step on the VM; returns a short detail for the step's timing."""
        from lab.errors import LabError
        raise LabError(f"{self.where}: the runner has no implementation for "
                       f"{type(self).__name__}")

    def violation(self, rule: str, device: str, message: str) -> Violation:
        """A violation of this step (``file:line: message``)."""
        from lab.results import Violation
        return Violation(rule, device, "step", f"{self.where}: {message}")


#: YAML key -> the class that parses it, in registration order (the order error
#: messages list the step types in)
STEP_KINDS: dict[str, type[StepBase]] = {}

K = TypeVar("K", bound=type[StepBase])


def step_kind(cls: K) -> K:
    """Register ``cls`` as the step kind of its ``step_type`` key."""
    name = cls.step_type
    if not name:
        raise TypeError(f"{cls.__name__} has no step_type")
    old = STEP_KINDS.get(name)
    if old is not None and old is not cls:
        raise TypeError(f"step type {name!r} is already {old.__module__}.{old.__qualname__}")
    STEP_KINDS[name] = cls
    return cls


# ---- device properties (plug, reconfigure) -------------------------------------------

def check_props(model: str | None, props: Mapping[str, Any]) -> None:
    """Device properties a scenario may set (vdevice.catalog.check_user_props); with no
    model here (a topology device), the names and the never-allowed ones are checked now
    and the rest when the runner knows the model, before any device_add."""
    try:
        if model is not None:
            check_user_props(model, props)
            return
        for key in props:
            check_prop_name(key)
            if key in REFUSED_PROPS:
                raise ValueError(f"property {key!r} is refused: {REFUSED_PROPS[key]}")
    except SpecError as exc:
        raise ValueError(exc.bare_message) from None


def check_model(name: str, *, hotplug: bool) -> str:
    model = get_model(name)
    if hotplug and (not model.hotpluggable or model.role == Role.CODEC):
        raise SpecError(f"{name!r} cannot be hot-plugged ({model.title}); an HDA codec must "
                        "be placed with its controller in the topology")
    return name


# ---- execution ---------------------------------------------------------------------------

class StepFailed(Exception):
    """The guest or driver did not do what a step expects (iteration status: failed)."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.message)
        self.violation = violation


@dataclass
class Job:
    """A background guest command (``guest: {background: true}``, ``play``)."""

    name: str
    command: str
    chan: Any
    check: bool
    started_ns: int
    result: Any = None


class StepContext(Protocol):
    """What a step's ``execute`` gets from the runner: one per step run, on one VM and
    in one iteration (parallel branches each get their own per step)."""

    @property
    def machine(self) -> Machine:
        """The VM the step runs on."""

    @property
    def since_ns(self) -> int:
        """When the previous step started: a wait matches what happened since."""

    @property
    def jobs(self) -> dict[str, Job]:
        """The iteration's background guest commands by name."""

    @property
    def players(self) -> set[str]:
        """Names of the iteration's ``play`` jobs (stopped when it ends)."""

    @property
    def obs(self) -> Observation:
        """The iteration's observation (its timeline so far, its audio)."""

    @property
    def watcher_errors(self) -> list[str]:
        """What the background watchers of plug/unplug reported so far."""

    def add_violations(self, found: Iterable[Violation]) -> None:
        """Violations besides the one a ``StepFailed`` carries."""

    def guest_log(self, text: str) -> None:
        """Append to the iteration's guest-commands.log."""

    def background(self, name: str, fn: Callable[[Callable[[], None]], Any]) -> None:
        """Run ``fn(ack)`` in a watcher thread; return once it called ``ack`` (QEMU
        accepted the request), raising a lab error it failed with before that."""

    def topology_device(self, dev: str) -> Device | None:
        """The topology's declaration of ``dev``, if any."""

    def bdf(self, dev: str) -> str | None:
        """The device's PCI address as QEMU has it now (None if unknown)."""

    def device_id(self, dev: str | None) -> DeviceId | None:
        """``dev`` with its current BDF, for matching events."""

    def live_events(self) -> list[Event]:
        """The iteration's events so far: host, guest tracer and console."""

    def audio_player(self) -> AudioPlayer:
        """How this guest plays the lab's signal."""

    def once_per_vm(self, key: str, make: Callable[[], str]) -> str:
        """``make()``'s value, computed once per VM (and runner) for ``key``."""

    def rule_context(self, tl: Timeline) -> RuleContext:
        """The rules' context for the timeline so far."""

    def qemu_answered(self, what: str) -> None:
        """Raise a QEMU error when QEMU is dead or frozen (a wait then blames QEMU)."""

    def run_step(self, step: StepBase) -> None:
        """Run a nested step as the runner runs any step (timing, errors)."""
