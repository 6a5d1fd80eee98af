"""Validate a scenario file as a whole, before any VM starts.

``rebalab validate FILE`` and every run call ``validate_file``. Beyond the shape
(``ScenarioFile``), it checks what only the whole file can tell:

- every ``${name}`` names a declared parameter, and every parameter is used;
- every step is valid for every value its parameters can take (each list and range
  value, the bounds of random ones), so an impossible value fails now with its line
  and the value, not in iteration 37 an hour into a sweep;
- device and port references: a step may name a device the topology declares or one
  an earlier step plugged (in order, per ``parallel`` branch); a device is not plugged
  twice or unplugged twice; ``wait: {job: X}`` follows the background command X;
- the topology reference resolves (through the injected resolver).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, Union

from lab.scenario.sweep import MAX_ITERATIONS
from lab.record import check_recordable, parse_record
from lab.scenario.model import (ScenarioFile, Scenario, TopologyLike, TopologyRef,
                                TopologyResolver, TraceSpec, parse_limits)
from lab.scenario.params import (GridParam, Param, Scalar, check_refs, find_refs, format_value,
                                 parse_parameters, substitute)
from lab.scenario.steps import (ParseContext, Plug, RebalanceCpuHotplug, Step,
                                check_known_rule, parse_step, walk)
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath, load, unknown, validate

#: Above this many parameter combinations, validation varies one parameter at a time.
MAX_CHECKED_COMBINATIONS = 512


#: Default for ``known_rules``/``known_limits``: ask the rules engine (``lab.rules``).
FROM_RULES = "rules-engine"
Known = Union[Iterable[str], None, Literal["rules-engine"]]


def _registry_rules() -> frozenset[str] | None:
    try:
        from lab.rules.base import known_ids
    except ImportError:                          # pragma: no cover - rules not installed
        return None
    return frozenset(known_ids())


def _registry_limits() -> frozenset[str] | None:
    try:
        from lab.rules.base import Limits
    except ImportError:                          # pragma: no cover
        return None
    return frozenset(Limits.__dataclass_fields__)


def _known(value: Known, default: Callable[[], frozenset[str] | None]) -> frozenset[str] | None:
    if isinstance(value, str) and value == FROM_RULES:
        return default()
    return frozenset(value) if value is not None else None


def validate_file(path: str | Path, resolve_topology: TopologyResolver, *,
                  known_rules: Known = FROM_RULES, known_limits: Known = FROM_RULES) -> Scenario:
    """Read and validate a scenario file; errors are ``SpecError`` naming file:line: field.

    ``path`` is shown in errors as given. A missing or unreadable file is a
    ``SpecError`` too (exit 2, like any bad input). ``known_rules``/``known_limits``
    default to what the rules engine (``lab.rules``) registers, so a misspelt rule or
    limit fails here with its line rather than later without one; ``None`` skips the
    rule check and leaves limits to a typo guard.
    """
    from lab.inputs import read_text

    p = Path(path)
    text = read_text(p, "scenario file")
    return validate_text(text, str(path), resolve_topology, base_dir=p.resolve().parent,
                         known_rules=known_rules, known_limits=known_limits)


def validate_text(text: str, filename: str, resolve_topology: TopologyResolver, *,
                  base_dir: str | Path | None = None, known_rules: Known = FROM_RULES,
                  known_limits: Known = FROM_RULES) -> Scenario:
    """Validate scenario text; relative paths in it are taken from ``base_dir``
    (default: the current directory). Options as for ``validate_file``."""
    located = load(text, filename)
    if not isinstance(located.data, dict):
        raise located.error("a scenario file is a mapping with at least 'name' and 'steps'")
    head = validate(ScenarioFile, located)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    rules = _known(known_rules, _registry_rules)
    limit_names = _known(known_limits, _registry_limits)

    params = parse_parameters(located.at(("parameters",))) if "parameters" in located.data \
        else ()
    total = math.prod(len(p.values) for p in params if isinstance(p, GridParam)) * head.repeat
    if total > MAX_ITERATIONS:       # before any step is checked or any list allocated
        raise located.error(f"the sweep has {total} iterations; at most {MAX_ITERATIONS} per "
                            "run: sweep fewer values, or use random parameters with repeat",
                            ("parameters",) if "parameters" in located.data else ())
    used = check_refs(located, params, ("steps",))
    for p in params:
        if p.name not in used:
            raise located.error(f"parameter {p.name!r} is declared but no step uses it "
                                f"(write ${{{p.name}}} in a step; for plain repetition use "
                                "repeat:)", ("parameters", p.name))
    for key in ("topology", "guest", "limits", "rules", "hotplug_mode", "until", "reset"):
        if key in located.data:
            for ref in find_refs(located, (key,)):
                raise located.error("parameters are substituted only inside steps", ref.path)

    if head.rules is not None:
        for i, r in enumerate(head.rules):
            try:
                check_known_rule(r, rules)
            except SpecError as exc:
                raise located.relocate(exc, ("rules", i)) from None
    limits = parse_limits(located.at(("limits",)), limit_names) \
        if "limits" in located.data else {}

    guest = head.guest
    if guest.image:
        where = located.at(("guest",)) if "guest" in located.data else located
        image = inside_scenario_dir(base, guest.image, "the guest image", where)
        guest = guest.model_copy(update={"image": str(image)})
    if guest.trace is not None:
        guest = guest.model_copy(update={"trace": _trace_files(located, guest.trace, base)})

    topo_ref, topo = _resolve_topology(located, head.topology, base, resolve_topology)
    _check_steps(located, params, topo, rules)

    scenario = Scenario(name=head.name, description=head.description, file=filename,
                    topology_ref=topo_ref, topology=topo, guest=guest,
                    hotplug_mode=head.hotplug_mode, parameters=params, seed=head.seed,
                    repeat=head.repeat, until=head.until, reset=head.reset, limits=limits,
                    rules=head.rules, located=located, known_rules=rules,
                    source_text=text, base_dir=base,
                    record=parse_record(head.record))
    check_guest_steps(scenario)
    scenario = check_trace_device(scenario)
    if scenario.record:
        # before any VM: a step QEMU's replay log cannot hold is refused at its line
        check_recordable(scenario, flag=f"record: {'all' if scenario.record == 'all' else 'true'}")
    return scenario


def check_guest_steps(scenario: Scenario) -> None:
    """Refuse steps the scenario's guest cannot do, naming the step's line (SpecError).

    Called on every validated scenario, and again when ``--guest`` changes the guest.
    The guest OS says which steps it refuses and why (``GuestOs.refused_step``).
    """
    from lab.guest.spec import guest_class

    sweep = scenario.sweep()
    if not len(sweep):
        return
    guest = guest_class(scenario.guest.os)
    for step in walk(sweep.iteration(0).steps):
        why = guest.refused_step(step, scenario.guest)
        if why is not None:
            raise SpecError(f"not for a {scenario.guest.os} guest: {why}", file=scenario.file,
                            line=step.line, field=step.path)


def _trace_files(located: Located, trace: TraceSpec, base: Path) -> TraceSpec:
    """``guest.trace.tmf``/``pdb`` resolved inside the scenario's folder and present."""
    update: dict[str, str] = {}
    for key in ("tmf", "pdb"):
        raw = getattr(trace, key)
        if raw is None:
            continue
        where = located.at(("guest", "trace", key))
        path = inside_scenario_dir(base, raw, f"the driver's {key.upper()}", where)
        if not path.is_file():
            raise where.error(f"{key} file {raw!r} not found (looked for {path})")
        update[key] = str(path)
    return trace.model_copy(update=update) if update else trace


def check_trace_device(scenario: Scenario) -> Scenario:
    """``guest.trace.device`` names a device of the scenario; without it, the only audio
    device is taken (and written into the spec, so the run attributes to it)."""
    trace = scenario.guest.trace
    if trace is None:
        return scenario
    from vdevice.catalog import MODELS, Role

    known: list[str] = list(scenario.topology.device_ids())
    audio: list[str] = [d.id for d in getattr(scenario.topology, "devices", ())
                        if getattr(MODELS.get(d.model), "role", None) == Role.AUDIO]
    sweep = scenario.sweep()
    for step in walk(sweep.iteration(0).steps) if len(sweep) else ():
        if isinstance(step, Plug):
            known.append(step.device)
            if step.model and getattr(MODELS.get(step.model), "role", None) == Role.AUDIO:
                audio.append(step.device)
    path: YamlPath = ("guest", "trace", "device") if trace.device else ("guest", "trace")
    where = scenario.located
    if trace.device is not None and trace.device not in known:
        raise where.error(unknown("device", trace.device, sorted(set(known))), path)
    # the trace belongs to the device named, else to the only audio device
    distinct = list(dict.fromkeys(audio))
    device = trace.device or (distinct[0] if len(distinct) == 1 else None)
    if device is None:
        raise where.error("trace: name the device whose driver writes this trace (guest.trace."
                          "device: ID in the scenario); "
                          f"the scenario has {len(set(audio)) or 'no'} audio devices"
                          + (f" ({', '.join(sorted(set(audio)))})" if audio else ""), path)
    if device == trace.device:
        return scenario
    guest = scenario.guest.model_copy(update={"trace": trace.model_copy(update={"device": device})})
    return replace(scenario, guest=guest)


def _looks_like_path(ref: str) -> bool:
    return "/" in ref or "\\" in ref or ref.endswith((".yaml", ".yml"))


def inside_scenario_dir(base: Path, raw: str, what: str, where: Located) -> Path:
    """``raw`` resolved against the scenario's directory, which it must stay inside.

    A scenario may come from someone else: were it free to name any host file, the lab
    would read it (a topology: its content could end up in an error) or hand it to QEMU
    (an image). Symlinks are resolved first, so a link out of the directory is refused
    too. The error names the path as written, never anything read from it."""
    root = base.resolve()
    path = (root / raw).resolve()
    if path != root and root not in path.parents:
        raise where.error(f"{what} must be inside the scenario's directory ({root}); "
                          f"{raw!r} is not: copy it next to the scenario")
    return path


def _resolve_topology(located: Located, raw: str | dict[str, Any], base: Path,
                      resolve: TopologyResolver) -> tuple[TopologyRef, TopologyLike]:
    where = located.at(("topology",)) if "topology" in located.data else located
    ref: TopologyRef
    if isinstance(raw, str):
        if _looks_like_path(raw):
            path = inside_scenario_dir(base, raw, "a topology file", where)
            if not path.is_file():
                raise where.error(f"topology file {raw!r} not found (looked for {path})")
            ref = path
        else:
            ref = raw
    else:
        ref = raw
    try:
        topo = resolve(ref, where)
    except SpecError as exc:
        if exc.file is not None:
            raise                        # located in the topology file itself
        # relative to the topology's root: anchor it inside the inline mapping
        fpath = _parse_field(exc.field) if exc.field else ()
        if fpath is None:
            raise where.relocate(exc) from None
        raise SpecError(exc.bare_message, file=where.filename, line=where.line_of(fpath),
                        field=where.field(fpath)) from None
    return ref, topo


_FIELD_TOKEN = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_-]*)|\[(\d+)\]|\['([^']*)'\]")


def _parse_field(text: str) -> YamlPath | None:
    """``ports[0].id`` -> ``("ports", 0, "id")``; None when it isn't such a path."""
    out: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _FIELD_TOKEN.match(text, pos)
        if not m:
            return None
        out.append(int(m[2]) if m[2] is not None else (m[1] if m[1] is not None else m[3]))
        pos = m.end()
    return tuple(out)


# ---- every step for every value ----------------------------------------------------------

def representative_combinations(params: Sequence[Param]) -> list[dict[str, Scalar]]:
    """Parameter values to check steps with: all combinations of every list/range value
    and random bound, or (above ``MAX_CHECKED_COMBINATIONS``) each parameter's values
    varied alone with the others at their first value."""
    if not params:
        return [{}]
    reps = [p.representatives() for p in params]
    if math.prod(len(r) for r in reps) <= MAX_CHECKED_COMBINATIONS:
        return [dict(zip((p.name for p in params), combo)) for combo in itertools.product(*reps)]
    base = {p.name: r[0] for p, r in zip(params, reps)}
    out = [dict(base)]
    for p, r in zip(params, reps):
        for v in r[1:]:
            out.append(base | {p.name: v})
    return out


def _check_steps(located: Located, params: Sequence[Param], topo: TopologyLike,
                 rules: frozenset[str] | None) -> None:
    raw_steps = located.data["steps"]
    step_refs = [{r.name for r in find_refs(located, ("steps", i))}
                 for i in range(len(raw_steps))]
    plug_lines = _plug_lines(located)
    ctx = ParseContext(seed=0, known_rules=rules)
    for values in representative_combinations(params):
        root = dict(located.data)
        root["steps"] = substitute(raw_steps, values)
        sub = located.with_data(root)
        steps: list[Step] = []
        for i in range(len(raw_steps)):
            try:
                steps.append(parse_step(sub, ("steps", i), ctx))
            except SpecError as exc:
                raise _with_values(exc, values, step_refs[i]) from None
        checker = RefChecker(sub, topo, plug_lines)
        try:
            checker.run(steps)
        except _RefError as exc:
            top = exc.path[1] if len(exc.path) > 1 and isinstance(exc.path[1], int) else None
            names = step_refs[top] if top is not None else set()
            raise _with_values(sub.error(exc.message, exc.path), values, names) from None


def _with_values(exc: SpecError, values: dict[str, Scalar], names: set[str]) -> SpecError:
    shown = {k: v for k, v in values.items() if k in names}
    if not shown:
        return exc
    text = ", ".join(f"{k}={format_value(v)}" for k, v in shown.items())
    return SpecError(f"{exc.bare_message} (with {text})", file=exc.file, line=exc.line,
                     field=exc.field)


def _plug_lines(located: Located) -> dict[str, int]:
    """Literal device ids of plug steps anywhere, with their lines (for hints)."""
    out: dict[str, int] = {}

    def visit(path: YamlPath) -> None:
        node = located.get(path)
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "plug":
                    dev = v.get("device") if isinstance(v, dict) else v
                    if isinstance(dev, str):
                        out.setdefault(dev, located.line_of(path + (k,)) or 0)
                visit(path + (k,))
        elif isinstance(node, list):
            for i in range(len(node)):
                visit(path + (i,))
    visit(("steps",))
    return out


# ---- references --------------------------------------------------------------------------

class _RefError(Exception):
    def __init__(self, message: str, path: YamlPath) -> None:
        super().__init__(message)
        self.message = message
        self.path = path


@dataclass
class RefState:
    """What the steps so far left: which devices exist, which jobs were started."""

    PRESENT: ClassVar[str] = "present"
    ABSENT: ClassVar[str] = "absent"
    UNKNOWN: ClassVar[str] = "unknown"

    devices: dict[str, str]                       # id -> present | absent | unknown
    ever: set[str]                                # ids that existed at some point so far
    jobs: set[str]                                # background jobs started so far
    changed_at: dict[str, str] = field(default_factory=dict)   # id -> step path (errors)

    def copy(self) -> RefState:
        return RefState(dict(self.devices), set(self.ever), set(self.jobs), dict(self.changed_at))


PRESENT, ABSENT, UNKNOWN = RefState.PRESENT, RefState.ABSENT, RefState.UNKNOWN


class RefChecker:
    """Walks concrete steps in order and tracks which devices exist; each step checks
    itself (``StepBase.verify``) with the helpers here.

    Topology devices start as 'unknown' (cold ones exist at boot, hot ones once the
    lab plugs them); step-plugged devices are tracked exactly.
    """

    def __init__(self, located: Located, topo: TopologyLike, plug_lines: dict[str, int]) -> None:
        self.located = located
        self.topo_devices = list(dict.fromkeys(topo.device_ids()))
        self.ports = list(dict.fromkeys(topo.port_ids()))
        self.plug_lines = plug_lines
        self.job_names: dict[str, str] = {}        # name -> path of the step that starts it
        self.seen: list[Step] = []                 # the steps checked so far, nested ones too

    def run(self, steps: Sequence[Step]) -> None:
        state = RefState({d: UNKNOWN for d in self.topo_devices}, set(self.topo_devices), set())
        self.run_steps(steps, state)

    def run_steps(self, steps: Sequence[Step], st: RefState) -> None:
        for s in steps:
            s.verify(self, st)
            self.seen.append(s)

    @staticmethod
    def fail(message: str, path: YamlPath) -> NoReturn:
        """Refuse the scenario: ``message`` at the line of ``path``."""
        raise _RefError(message, path)

    @staticmethod
    def where(s: Step) -> str:
        """How the messages of later steps name ``s``."""
        return f"line {s.line}" if s.line else s.path

    def known(self, dev: str, st: RefState, path: YamlPath) -> None:
        """``dev`` is declared by the topology or plugged by an earlier step."""
        if dev in st.ever:
            return
        msg = unknown("device", dev, sorted(st.ever)) if st.ever else \
            f"unknown device {dev!r}"
        later = self.plug_lines.get(dev)
        if later is not None:
            msg += f"; it is plugged only later (line {later}), or in another parallel branch"
        else:
            msg += "; declare it in the topology or plug it in an earlier step"
        raise _RefError(msg, path)

    def present(self, dev: str, st: RefState, path: YamlPath, what: str) -> None:
        """``dev`` is known and not unplugged before this ``what``."""
        self.known(dev, st, path)
        if st.devices.get(dev) == ABSENT:
            raise _RefError(f"device {dev!r} was unplugged ({st.changed_at.get(dev, '?')}) "
                            f"before this {what}", path)

    def port(self, port: str, path: YamlPath) -> None:
        if port not in self.ports:
            raise _RefError(unknown("port", port, self.ports), path)

    def plug(self, dev: str, st: RefState, path: YamlPath, where: str) -> None:
        """``dev`` is plugged here (refused when it is plugged already)."""
        if st.devices.get(dev) == PRESENT:
            raise _RefError(f"device {dev!r} is already plugged ({st.changed_at.get(dev, '?')}); "
                            "unplug it first", path)
        st.devices[dev] = PRESENT
        st.ever.add(dev)
        st.changed_at[dev] = f"at {where}"
