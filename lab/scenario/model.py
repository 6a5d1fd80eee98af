"""The scenario file's shape (pydantic) and the validated ``Scenario`` value.

``ScenarioFile`` is exactly what the YAML may contain (frozen, unknown keys refused);
``Scenario`` is the result of validating it as a whole (parameters parsed, topology
resolved, every step checked for every parameter value) and is what a run carries.
Steps stay in their templated form inside ``Scenario``; ``steps_for`` substitutes one
iteration's values and returns concrete step objects.
"""

from __future__ import annotations

import math

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Union

from pydantic import ValidationError, field_validator, model_validator

from lab.scenario.params import Param, Scalar, substitute
from lab.scenario.steps import ParseContext, Spec, Step, parse_steps
from lab.scenario.units import Duration, Id, Int, Name, RuleName, Str
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath, suggest, unknown

if TYPE_CHECKING:
    from lab.scenario.sweep import Sweep


class TopologyLike(Protocol):
    """What the scenario validator needs from a topology: the ids steps may name."""

    def device_ids(self) -> Iterable[str]: ...

    def port_ids(self) -> Iterable[str]: ...


#: ``topology:`` as the resolver receives it: a built-in name (``"default"``), an
#: existing file path (resolved against the scenario's folder), or an inline mapping.
TopologyRef = Union[str, Path, dict[str, Any]]
#: ``resolve(ref, located)``: ``located`` is rooted at the scenario's ``topology`` key,
#: so an inline mapping's errors name the scenario file and line.
TopologyResolver = Callable[[TopologyRef, Located], TopologyLike]


_FLAGS_MAX = (1 << 64) - 1
#: event kinds a driver-message pattern may produce: the PnP inputs the Windows rules read
TRACE_PATTERN_KINDS = ("query-stop", "stop", "cancel-stop", "start", "surprise-removal",
                       "remove", "query-remove", "cancel-remove", "driver-io")


class TraceProviderSpec(Spec):
    """One of the driver's trace providers: ``{guid, flags, level, name, kind}``.

    ``kind: wpp`` (default) needs the driver's TMF or PDB to be formatted;
    ``tracelogging`` events describe themselves. ``flags`` is the WPP enable-flag /
    TraceLogging keyword mask (a number, or hex text like ``"0xFF"``), ``level`` 0..255
    (5 = verbose).
    """

    guid: Str
    flags: Int | Str = 0xFFFFFFFF
    level: Int = 5
    name: Str = ""
    kind: Literal["wpp", "tracelogging"] = "wpp"

    @field_validator("guid")
    @classmethod
    def _guid(cls, v: str) -> str:
        from lab.errors import ConfigError
        from lab.guest.windows.trace.common import validate_guid
        try:
            return validate_guid(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("flags")
    @classmethod
    def _flags(cls, v: int | str) -> int:
        if isinstance(v, str):
            try:
                v = int(v.strip(), 16) if v.strip().lower().startswith("0x") else int(v.strip())
            except ValueError:
                raise ValueError(f"flags must be a number or hex like 0xFF, got {v!r}") from None
        if not 0 <= v <= _FLAGS_MAX:
            raise ValueError(f"flags must be 0 .. 0xFFFFFFFFFFFFFFFF, got {v}")
        return v

    @field_validator("level")
    @classmethod
    def _level(cls, v: int) -> int:
        if not 0 <= v <= 255:
            raise ValueError(f"level must be 0 .. 255, got {v}")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if len(v) > 64 or any(c in v for c in "\r\n\0"):
            raise ValueError("name: at most 64 characters on one line")
        return v

    @property
    def flags_hex(self) -> str:
        return f"0x{int(self.flags):X}"


class TracePatternSpec(Spec):
    """A driver message pattern: ``{regex, kind, phase}`` (lab.guest.windows.trace.wpp)."""

    regex: Str
    kind: Literal["query-stop", "stop", "cancel-stop", "start", "surprise-removal",
                  "remove", "query-remove", "cancel-remove", "driver-io"]
    phase: Literal["begin", "end", "point"] = "point"
    name: Str = ""

    @field_validator("regex")
    @classmethod
    def _regex(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return v


class TraceSpec(Spec):
    """``guest.trace``: the driver's own WPP/TraceLogging trace (issue 10).

    Kernel-PnP logs no QUERY_STOP, STOP or CANCEL_STOP: only the driver's trace shows
    them. ``providers`` are enabled for every iteration; ``tmf`` (a TMF file) or ``pdb``
    (the driver's PDB, turned into TMFs in the guest with tracepdb) are files next to
    the scenario, copied into the guest; ``tracefmt``/``tracepdb`` are guest paths of
    the WDK tools. ``device`` names the device whose driver writes the trace (default:
    the topology's only audio device): its messages are attributed to it. ``patterns``
    add message patterns ahead of the built-in ones (PortCls ``PnpQueryStop``...,
    ``IRP_MN_*`` names).
    """

    providers: tuple[TraceProviderSpec, ...] = ()
    tmf: Str | None = None
    pdb: Str | None = None
    tracefmt: Str | None = None
    tracepdb: Str | None = None
    device: Id | None = None
    patterns: tuple[TracePatternSpec, ...] = ()

    @field_validator("tracefmt", "tracepdb")
    @classmethod
    def _guest_path(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from lab.errors import ConfigError
        from lab.guest.windows.trace.common import validate_guest_path
        try:
            return validate_guest_path(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _consistent(self) -> TraceSpec:
        seen: set[str] = set()
        for p in self.providers:
            if p.guid in seen:
                raise ValueError(f"provider {p.guid} is listed twice")
            seen.add(p.guid)
        if self.tmf and self.pdb:
            raise ValueError("give tmf or pdb, not both")
        wpp = [p for p in self.providers if p.kind == "wpp"]
        if wpp and not (self.tmf or self.pdb):
            raise ValueError(f"WPP provider {wpp[0].guid} needs the driver's tmf or pdb to be "
                             "formatted (or kind: tracelogging)")
        if (self.tmf or self.pdb) and not self.tracefmt:
            raise ValueError("tmf/pdb need tracefmt: the guest path of the WDK's tracefmt.exe")
        if self.pdb and not self.tracepdb:
            raise ValueError("pdb needs tracepdb: the guest path of the WDK's tracepdb.exe")
        return self

    def with_provider(self, text: str) -> TraceSpec:
        """This spec plus a ``GUID[:FLAGS[:LEVEL]]`` provider (``--trace-provider``): WPP
        when the spec formats WPP (tmf/pdb), else TraceLogging. ValueError when bad."""
        parts = text.split(":")
        if not 1 <= len(parts) <= 3 or not parts[0].strip():
            raise ValueError(f"{text!r}: expected GUID[:FLAGS[:LEVEL]]")
        d: dict[str, Any] = {"guid": parts[0].strip(),
                             "kind": "wpp" if (self.tmf or self.pdb) else "tracelogging"}
        if len(parts) > 1:
            d["flags"] = parts[1].strip()
        if len(parts) > 2:
            try:
                d["level"] = int(parts[2].strip(), 0)
            except ValueError:
                raise ValueError(f"{text!r}: level must be a number 0..255") from None
        try:
            prov = TraceProviderSpec.model_validate(d)
            return TraceSpec.model_validate(
                self.model_dump() | {"providers": [p.model_dump() for p in self.providers]
                                     + [prov.model_dump()]})
        except ValidationError as exc:
            raise ValueError("; ".join(str(e["msg"]).removeprefix("Value error, ")
                                       for e in exc.errors())) from None


class GuestSpec(Spec):
    """Which guest runs and how the lab talks to it.

    ``guest: linux`` (the lab's built image) or ``guest: "windows:<image>"``, or the
    long form ``{os: windows, image: ..., agent: winrm, trace: {...}}``. ``agent``
    defaults to ssh for Linux and winrm for Windows. ``image`` (and ``trace.tmf``/
    ``trace.pdb``) are relative to the scenario file and must stay inside its folder.
    """

    os: Literal["linux", "windows"] = "linux"
    image: Str | None = None
    agent: Literal["ssh", "winrm"] | None = None
    trace: TraceSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            os_name, sep, image = data.partition(":")
            out: dict[str, Any] = {"os": os_name.strip()}
            if sep:
                out["image"] = image.strip()
            return out
        return data

    @model_validator(mode="after")
    def _consistent(self) -> GuestSpec:
        if self.os == "windows" and not self.image:
            raise ValueError("a Windows guest needs an image: 'windows:<path to image>'")
        if self.image and self.image.lower().endswith((".yaml", ".yml", ".json")):
            raise ValueError("the guest image is a disk image (.qcow2, built by `rebalab image "
                             "windows`), not a YAML or JSON file")
        if self.os == "linux" and self.agent == "winrm":
            raise ValueError("a Linux guest is reached over ssh, not winrm")
        if self.os == "linux" and self.trace is not None:
            raise ValueError("trace configures a Windows driver's WPP/TraceLogging trace; the "
                             "Linux guest traces with kprobes")
        return self

    def with_trace_providers(self, texts: Iterable[str]) -> GuestSpec:
        """This guest plus ``--trace-provider`` values; ValueError naming the bad one."""
        texts = list(texts)
        if not texts:
            return self
        if self.os != "windows":
            raise ValueError("--trace-provider needs a Windows guest (--guest windows:IMAGE)")
        trace = self.trace or TraceSpec()
        for t in texts:
            trace = trace.with_provider(t)
        return self.model_copy(update={"trace": trace})

    @property
    def agent_kind(self) -> str:
        return self.agent or ("winrm" if self.os == "windows" else "ssh")


class Until(Spec):
    """``until: fail`` (stop at the first failed iteration) or ``{failures: N}``."""

    failures: Int

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if data == "fail":
            return {"failures": 1}
        if isinstance(data, str):
            raise ValueError(f"until takes 'fail' or {{failures: N}}, got {data!r}")
        return data

    @field_validator("failures")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"failures must be >= 1, got {v}")
        return v


class ScenarioFile(Spec):
    """The top level of a scenario YAML file."""

    name: Name
    description: Str = ""
    topology: Str | dict[Str, Any] = "default"
    guest: GuestSpec = GuestSpec()
    hotplug_mode: Literal["acpi", "native"] | None = None
    parameters: dict[Str, Any] = {}
    seed: Int = 0
    repeat: Int = 1
    until: Until | None = None
    reset: Literal["none", "replug", "reboot", "snapshot"] = "none"
    limits: dict[Str, Any] = {}
    rules: tuple[RuleName, ...] | None = None
    #: QEMU record/replay of every iteration (lab.record): true keeps the recordings of
    #: failing iterations, all keeps every one
    record: bool | Literal["all"] = False
    steps: list[Any]

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("there must be at least one step")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 1 << 63:
            raise ValueError(f"seed must be 0 .. 2^63-1, got {v}")
        return v

    @field_validator("repeat")
    @classmethod
    def _repeat(cls, v: int) -> int:
        if not 1 <= v <= 100_000:
            raise ValueError(f"repeat must be 1 .. 100000, got {v}")
        return v


# ---- limits ----------------------------------------------------------------------------

#: Typo guard used when the rules engine's list of limits is not available (see
#: ``parse_limits``): a key close to one of these but not equal is refused.
KNOWN_LIMITS = ("query_stop_max_ms", "cancel_stop_max_ms", "unbound_decode_max_ms",
                "remove_max_ms", "audio_max_gap_ms", "audio_max_discontinuities",
                "audio_max_outage_ms")
_LIMIT_KEY_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def parse_limits(located: Located, known: frozenset[str] | None = None) -> dict[str, float]:
    """``limits:`` -> numbers. Keys ending in ``_ms`` are milliseconds and also take a
    duration (``query_stop_max_ms: 50`` or ``query_stop_max_ms: 50ms``).

    ``known``: the limits the rules read (a closed set: anything else is refused, with a
    suggestion). Without it, only near-misses of ``KNOWN_LIMITS`` are refused."""
    out: dict[str, float] = {}
    data = located.data or {}
    for key, value in data.items():
        path: YamlPath = (key,)
        if not isinstance(key, str) or not _LIMIT_KEY_RE.match(key):
            raise located.error(f"limit name {key!r} must be lower_case_with_underscores", path)
        if known is not None:
            if key not in known:
                raise located.error(unknown("limit", key, sorted(known)), path)
        elif key not in KNOWN_LIMITS:
            close = suggest(key, KNOWN_LIMITS, cutoff=0.85)   # near-misses only
            if close is not None:
                raise located.error(f"unknown limit {key!r}; did you mean {close!r}? (known: "
                                    f"{', '.join(KNOWN_LIMITS)})", path)
        if key.endswith("_ms") and isinstance(value, str):
            try:
                out[key] = Duration.parse(value).ms
            except SpecError as exc:
                raise located.relocate(exc, path) from None
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise located.error(f"a limit is a number, got {value!r}", path)
        if not math.isfinite(value) or value < 0:
            raise located.error(f"a limit must be >= 0 (and finite), got {value}", path)
        out[key] = float(value)
    return out


# ---- the validated scenario ----------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    """A validated scenario: everything a run needs before any VM starts.

    ``topology`` is whatever the injected resolver returned (the lead's
    ``vdevice`` topology); ``topology_ref`` is what the file said (name, absolute
    path, or mapping). ``parameters`` keep file order, which fixes the sweep order.
    """

    name: str
    description: str
    file: str
    topology_ref: TopologyRef
    topology: Any
    guest: GuestSpec
    hotplug_mode: str | None
    parameters: tuple[Param, ...]
    seed: int
    repeat: int
    until: Until | None
    reset: str
    limits: dict[str, float]
    rules: tuple[str, ...] | None
    located: Located = field(repr=False, compare=False)
    known_rules: frozenset[str] | None = field(default=None, repr=False, compare=False)
    #: the file's text and the folder its relative paths resolve from: a run copies the
    #: text into its directory so ``replay`` validates exactly what ran
    source_text: str = field(default="", repr=False, compare=False)
    base_dir: Path | None = field(default=None, repr=False, compare=False)
    #: ``record:`` (lab.record): None, "failing" (true) or "all"
    record: str | None = None

    @property
    def raw_steps(self) -> list[Any]:
        """The steps as written, ``${...}`` not yet substituted."""
        return list(self.located.data["steps"])

    def parameter(self, name: str) -> Param:
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)

    def steps_for(self, values: Mapping[str, Scalar], seed: int) -> tuple[Step, ...]:
        """Concrete steps for one iteration: ``values`` substituted, jitter drawn from
        ``seed``. Raises ``SpecError`` (with line) if a value makes a step invalid,
        which validation rules out for every list/range value and random bound."""
        missing = [p.name for p in self.parameters if p.name not in values]
        if missing:
            raise SpecError(f"no value for parameter(s) {', '.join(missing)}", file=self.file)
        root = dict(self.located.data)
        root["steps"] = substitute(root["steps"], values)
        sub = self.located.with_data(root)
        return parse_steps(sub, ("steps",), ParseContext(seed=seed, known_rules=self.known_rules))

    def sweep(self) -> Sweep:
        from lab.scenario.sweep import Sweep
        return Sweep(self)

    def to_json(self) -> dict[str, Any]:
        """What ran, for ``run.json``: the file's content with references resolved."""
        ref = self.topology_ref
        return {
            "name": self.name, "description": self.description, "file": self.file,
            "topology": str(ref) if isinstance(ref, Path) else ref,
            "guest": self.guest.model_dump(mode="json") | {"agent": self.guest.agent_kind},
            "hotplug_mode": self.hotplug_mode,
            "parameters": {p.name: p.spec for p in self.parameters},
            "seed": self.seed, "repeat": self.repeat,
            "until": self.until.model_dump() if self.until else None,
            "reset": self.reset, "limits": self.limits,
            "rules": list(self.rules) if self.rules is not None else None,
            **({"record": self.record} if self.record else {}),
            "steps": self.raw_steps,
        }
