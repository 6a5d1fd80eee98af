"""The concrete steps an executor runs: one frozen pydantic model per step kind.

A step in YAML is a mapping with exactly one key, the step type (``- plug: {...}``).
Dispatch on that key is done here by hand rather than by a pydantic union, so that an
unknown type gets "did you mean" and a wrong field gets the line of that field, not a
wall of union-branch errors. Variants that the executor handles differently are
separate classes (``RebalanceRescan``, ``WaitQmp``, ``AssertCount``...), so it can
``match`` on the class; their fields mirror the YAML so error paths stay readable.

Steps here are *concrete*: ``${param}`` substitution has already happened
(``lab.scenario.sweep``), jitter delays are drawn, durations are ``Duration`` values,
sizes are bytes. Each step remembers where it came from (``.path``, ``.line``,
``.where``) so the executor can name it in errors and timings.
"""

from __future__ import annotations

import fnmatch
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Union

from pydantic import (BaseModel, ConfigDict, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from lab.scenario.params import draw_int
from lab.scenario.units import (ZERO, BarSize, BarSizeOrAuto, Bool, Duration, Id, Int,
                                KindName, MsNumber, Name, QmpEvent, RuleName, SourceName,
                                Str, check_name)
from vdevice.catalog import REFUSED_PROPS, Role, check_prop_name, check_user_props, get_model
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath, format_path, spec_error, suggest, unknown

PropValue = Union[Str, Int, Bool]


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


class StepBase(Spec):
    """What all steps share: the YAML type key and where the step was written."""

    step_type: ClassVar[str] = ""
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

    def describe(self) -> str:
        """A one-line human description, e.g. ``plug snd0 (AC97 @ rp1)``."""
        return self.step_type

    def to_yaml(self) -> dict[str, Any]:
        """The step as YAML-shaped data (for run.json and logs)."""
        body = self.model_dump(mode="json", exclude_none=True)
        return {self.step_type: body or None}


# ---- device operations ------------------------------------------------------------------

def _check_props(model: str | None, props: Mapping[str, Any]) -> None:
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


def _check_model(name: str, *, hotplug: bool) -> str:
    model = get_model(name)
    if hotplug and (not model.hotpluggable or model.role == Role.CODEC):
        raise SpecError(f"{name!r} cannot be hot-plugged ({model.title}); an HDA codec must "
                        "be placed with its controller in the topology")
    return name


class Plug(StepBase):
    """Hot-plug a device (QMP ``device_add``); returns once QEMU accepted it.

    ``model``/``port`` may be left out for a device the topology declares.
    ``size`` is the BAR a pressure-type model asks for (``pci-testdev`` membar).
    """

    step_type: ClassVar[str] = "plug"
    device: Id
    model: Str | None = None
    port: Id | None = None
    size: BarSize | None = None
    props: dict[Str, PropValue] = {}

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return None if v is None else _check_model(v, hotplug=True)

    @model_validator(mode="after")
    def _props(self) -> Plug:
        _check_props(self.model, self.props)
        return self

    def describe(self) -> str:
        extra = " @ ".join(x for x in (self.model, self.port) if x)
        return f"plug {self.device}" + (f" ({extra})" if extra else "")


class Unplug(StepBase):
    """Request removal (QMP ``device_del``); returns once QEMU accepted the request.

    Wait for the removal with ``wait: {event: device-deleted, device: X}`` (works for
    every model; the lab derives it from QOM for ``ich9-intel-hda``, which emits no
    DEVICE_DELETED in QEMU 7.2) or ``wait: {qmp: DEVICE_DELETED, ...}``.
    """

    step_type: ClassVar[str] = "unplug"
    device: Id

    def describe(self) -> str:
        return f"unplug {self.device}"


# ---- rebalance triggers -------------------------------------------------------------

class RebalanceBase(StepBase):
    step_type: ClassVar[str] = "rebalance"

    def describe(self) -> str:
        dev = getattr(self, "device", None)
        return f"rebalance {getattr(self, 'trigger', '?')}" + (f" {dev}" if dev else "")


class RebalancePressure(RebalanceBase):
    """Plug a resource-hungry device so the OS must move windows/BARs around ``device``.

    ``placement``: ``same-port`` (behind the device's own port: only with a switch),
    ``sibling`` (another port under the same root), ``root`` (a different root port).
    ``port`` names the pressure device's port explicitly instead. ``size: auto`` lets
    the lab pick a BAR that does not fit the current window. The pressure device gets
    QEMU id ``id`` (default ``<device>-pressure``) and counts as plugged afterwards.
    """

    trigger: Literal["pressure"] = "pressure"
    device: Id
    size: BarSizeOrAuto = "auto"
    placement: Literal["same-port", "sibling", "root"] | None = None
    port: Id | None = None
    model: Literal["pci-testdev", "ivshmem-plain"] = "pci-testdev"
    id: Id | None = None

    @model_validator(mode="after")
    def _placement(self) -> RebalancePressure:
        if self.placement is not None and self.port is not None:
            raise ValueError("give placement or port for the pressure device, not both")
        return self

    @property
    def pressure_id(self) -> str:
        return self.id or f"{self.device}-pressure"

    @property
    def effective_placement(self) -> str:
        return self.placement or ("port" if self.port else "sibling")


class RebalanceRescan(RebalanceBase):
    """Make the guest re-enumerate: remove ``remove`` (the device's port, default, or the
    device itself) in sysfs, then rescan the bus. Linux moves windows and BARs only
    this way (PLATFORM.md), with driver unbind and rebind."""

    trigger: Literal["rescan"] = "rescan"
    device: Id
    remove: Literal["port", "device", "none"] = "port"


class RebalanceCpuHotplug(RebalanceBase):
    """Hot-plug vCPUs (Windows rebalances on its own when it sees them)."""

    trigger: Literal["cpu-hotplug"] = "cpu-hotplug"
    count: Int = 1
    device: Id | None = None

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError(f"count must be 1..64, got {v}")
        return v


class RebalanceReconfigure(RebalanceBase):
    """Replace ``device`` with the same id but another model and/or properties."""

    trigger: Literal["reconfigure"] = "reconfigure"
    device: Id
    model: Str | None = None
    props: dict[Str, PropValue] = {}

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return None if v is None else _check_model(v, hotplug=True)

    @model_validator(mode="after")
    def _something(self) -> RebalanceReconfigure:
        if self.model is None and not self.props:
            raise ValueError("reconfigure needs a new model or props (or both)")
        _check_props(self.model, self.props)
        return self


class RebalanceResize(RebalanceBase):
    """Re-create ``device`` (a pressure device) with a BAR of ``size``."""

    trigger: Literal["resize"] = "resize"
    device: Id
    size: BarSize


class RebalanceWdtf(RebalanceBase):
    """Windows only: have WDTF's Enhanced Device Testing filter put ``device`` through a
    documented PnP sequence (``lab.guest.windows.wdtf``), as Microsoft's HLK PnP tests do.

    ``action``: ``restart`` (QUERY_STOP, STOP, START with the same resources),
    ``rebalance`` (the same, forced onto new resources: the host checks a BAR moved),
    ``cancel-stop`` (a query-stop that is vetoed, then CANCEL_STOP), ``fail-restart``
    (the restart after STOP fails: SURPRISE_REMOVAL and REMOVE follow).
    ``target``: ``pci`` (default; the devnode that owns the BARs) or ``function`` (an
    HDA controller's codec function devnode, where a PortCls driver binds; WDTF's docs
    warn that a devnode without hardware resources may get CANCEL_STOP instead).
    ``instance`` pins the exact device instance id when several devices match.
    """

    trigger: Literal["wdtf"] = "wdtf"
    device: Id
    action: Literal["restart", "rebalance", "cancel-stop", "fail-restart"]
    target: Literal["pci", "function"] = "pci"
    instance: Str | None = None

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from lab.guest.windows.trace.common import looks_like_instance_id
        if not looks_like_instance_id(v):
            raise ValueError(f"{v!r} is not a device instance id (ENUMERATOR\\DEVICE-ID\\INSTANCE, "
                             "as Get-PnpDevice shows it)")
        return v

    def describe(self) -> str:
        return f"rebalance wdtf {self.action} {self.device}"


REBALANCE_TRIGGERS: dict[str, type[RebalanceBase]] = {
    "pressure": RebalancePressure, "rescan": RebalanceRescan,
    "cpu-hotplug": RebalanceCpuHotplug, "reconfigure": RebalanceReconfigure,
    "resize": RebalanceResize, "wdtf": RebalanceWdtf,
}

#: What each trigger does and does not exercise, per guest OS: the one table behind
#: ``rebalab rebalance --help``, the README's "Rebalance triggers" and the validator's
#: refusals. Sources are cited where the code relies on them (lab/rebalance.py,
#: lab/guest/windows/wdtf.py).
TRIGGER_EXERCISES: dict[str, dict[str, str]] = {
    "rescan": {
        "linux": "removes the device's port in sysfs and rescans: windows and BARs assigned "
                 "afresh, driver unbind + rebind (remove + re-probe, not a stop)",
        "windows": "refused: Linux sysfs; use wdtf",
    },
    "pressure": {
        "linux": "hot-plugs a device whose BAR does not fit: native mode re-assigns the port "
                 "window; ACPI mode leaves the BAR unassigned (the report says which)",
        "windows": "hot-plugs the same device; host diff plus the guest's PnP state of both "
                   "devices. Windows assigns resources to a device it starts, and pci-testdev "
                   "has no inbox driver, so expect no QUERY_STOP/STOP (unverified)",
    },
    "cpu-hotplug": {
        "linux": "onlines a hot-added vCPU; no PCI resource moves",
        "windows": "Windows Server on a dynamically partitionable machine rebalances after "
                   "a processor hot-add (DEVPKEY_Device_DHP_Rebalance_Policy); refused on "
                   "Windows 10/11, unverified under QEMU on Server",
    },
    "reconfigure": {
        "linux": "unplug + plug with another model or properties: remove and probe, no stop",
        "windows": "the same: removal of the devnode (device_del asks for an eject, so "
                   "QUERY_REMOVE/REMOVE are expected) then START of a new one; no "
                   "QUERY_STOP/STOP",
    },
    "resize": {
        "linux": "Resizable BAR: QEMU 7.2's audio devices have none (refused, exit 2)",
        "windows": "refused: the capability check reads Linux sysfs",
    },
    "wdtf": {
        "linux": "refused: WDTF is Windows' driver test framework",
        "windows": "WDTF's EDT filter sends one device QUERY_STOP/STOP/START (restart), the "
                   "same with new resources (rebalance: a real BAR move, checked on the host), "
                   "a vetoed query-stop then CANCEL_STOP (cancel-stop), or a failed restart "
                   "then SURPRISE_REMOVAL/REMOVE (fail-restart)",
    },
}


# ---- guest, time -----------------------------------------------------------------------

class Guest(StepBase):
    """Run a command in the guest: ``run`` (a shell line) or ``argv`` (no shell).

    ``background: true`` starts it and goes on; ``name`` then identifies it for
    ``wait: {job: NAME}`` and its log file. With ``check`` (default) a non-zero exit
    status fails the iteration like an assert.
    """

    step_type: ClassVar[str] = "guest"
    run: Str | None = None
    argv: tuple[Str, ...] | None = None
    background: Bool = False
    name: Name | None = None
    timeout: Duration | None = None
    check: Bool = True

    @model_validator(mode="after")
    def _shape(self) -> Guest:
        if (self.run is None) == (self.argv is None):
            raise ValueError("give exactly one of run (a shell command) or argv (a list)")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        if self.background and not self.name:
            raise ValueError("a background command needs a name (for wait: {job: NAME} and "
                             "its log)")
        return self

    def describe(self) -> str:
        cmd = self.run if self.run is not None else " ".join(self.argv or ())
        short = cmd if len(cmd) <= 40 else cmd[:37] + "..."
        named = f" [{self.name}]" if self.name else ""
        return f"guest{' &' if self.background else ''}{named} {short}"


_MODULE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,55}")   # never an option: no leading '-' 
_MODPARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


class Module(StepBase):
    """Load a kernel module into the Linux guest with parameters (e.g. the test driver).

    ``reload`` (default) unloads it first when it is loaded, so every iteration starts
    from a freshly initialised module: parameters given at load time take effect, and
    whatever the module keeps across devices (the test driver's stale-bar address) is
    gone. ``reload: false`` writes the parameters of a loaded module through
    ``/sys/module/NAME/parameters`` instead (they must be writable). ``unload: true``
    only removes it. Names and values reach the guest quoted for its shell.
    """

    step_type: ClassVar[str] = "module"
    name: Str
    params: dict[Str, PropValue] = {}
    reload: Bool = True
    unload: Bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _MODULE_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a kernel module name (letters, digits, - and _, "
                             "not starting with -)")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not _MODPARAM_RE.fullmatch(key):
                raise ValueError(f"{key!r} is not a module parameter name (letters, digits, _)")
            if isinstance(value, str) and ("\n" in value or "\0" in value):
                raise ValueError(f"parameter {key}: a value cannot contain a newline or NUL")
        return v

    @model_validator(mode="after")
    def _shape(self) -> Module:
        if self.unload and self.params:
            raise ValueError("unload takes no params")
        return self

    @property
    def sysfs_name(self) -> str:
        """The kernel's name for it (``-`` and ``_`` are the same to modprobe; sysfs has ``_``)."""
        return self.name.replace("-", "_")

    def param_text(self) -> dict[str, str]:
        """Parameters as the kernel parses them (booleans as Y/N)."""
        return {k: ("Y" if v else "N") if isinstance(v, bool) else str(v)
                for k, v in self.params.items()}

    def describe(self) -> str:
        if self.unload:
            return f"module unload {self.name}"
        args = " ".join(f"{k}={v}" for k, v in self.param_text().items())
        return f"module {'reload' if self.reload else 'load'} {self.name}" + (f" {args}" if args else "")


class Sleep(StepBase):
    """A fixed delay. Use it for timing sweeps, never to wait for something to happen."""

    step_type: ClassVar[str] = "sleep"
    duration: Duration

    def describe(self) -> str:
        return f"sleep {self.duration}"


class Jitter(StepBase):
    """A random delay in [min, max], drawn from the iteration seed (``delay``), so a
    replay of the iteration sleeps exactly as long."""

    step_type: ClassVar[str] = "jitter"
    max: Duration
    min: Duration = ZERO
    delay: Duration | None = None     # drawn by the parser; not written in YAML

    @model_validator(mode="after")
    def _bounds(self) -> Jitter:
        if self.min > self.max:
            raise ValueError(f"jitter min {self.min} is above max {self.max}")
        return self

    def describe(self) -> str:
        return f"jitter {self.delay} (<= {self.max})"


class Pause(StepBase):
    """Stop the VM's vCPUs (QMP ``stop``)."""

    step_type: ClassVar[str] = "pause"


class Resume(StepBase):
    """Continue the VM (QMP ``cont``)."""

    step_type: ClassVar[str] = "resume"


# ---- waits -------------------------------------------------------------------------------

class WaitBase(StepBase):
    """Waits match what happened since the previous step started, so an event that
    fired during a fast operation is not missed. ``timeout`` defaults to the lab's
    deadline for that kind of wait (``lab.deadline``)."""

    step_type: ClassVar[str] = "wait"


class WaitEvent(WaitBase):
    """Wait for a timeline event of ``event`` kind (optionally for a device/source).

    ``text`` is a regular expression searched in the event's text (a kernel log line:
    ``{event: kernel-log, device: edu0, text: "stream start"}``), for the moments a
    driver only announces in its log.
    """

    event: KindName
    device: Id | None = None
    source: SourceName | None = None
    text: Str | None = None
    timeout: Duration | None = None

    @field_validator("text")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"text is not a valid regular expression: {exc}") from None
        return v

    def matches_text(self, text: str) -> bool:
        return self.text is None or re.search(self.text, text) is not None

    def describe(self) -> str:
        return (f"wait {self.event.value}" + (f" {self.device}" if self.device else "")
                + (f" /{self.text}/" if self.text else ""))


class WaitQmp(WaitBase):
    """Wait for a QMP event by name; ``device`` matches its ``data.device``."""

    qmp: QmpEvent
    device: Id | None = None
    timeout: Duration | None = None

    def describe(self) -> str:
        return f"wait qmp {self.qmp}" + (f" {self.device}" if self.device else "")


class WaitGuest(WaitBase):
    """Poll a guest command every ``interval`` until it exits 0."""

    guest: Str | tuple[Str, ...]
    interval: Duration = Duration(100_000_000)
    timeout: Duration | None = None

    def describe(self) -> str:
        cmd = self.guest if isinstance(self.guest, str) else " ".join(self.guest)
        return f"wait guest {cmd[:40]}"


class WaitJob(WaitBase):
    """Wait for a background guest command to end."""

    job: Name
    timeout: Duration | None = None

    def describe(self) -> str:
        return f"wait job {self.job}"


class WaitPcm(WaitBase):
    """Wait until the device's playback PCM exists in the guest again: the driver is
    bound and its sound card registered (after a hot-plug or a rebalance), which is
    when an audio service would reopen its stream."""

    pcm: Id
    timeout: Duration | None = None

    def describe(self) -> str:
        return f"wait pcm {self.pcm}"


WAIT_KINDS: dict[str, type[WaitBase]] = {"event": WaitEvent, "qmp": WaitQmp,
                                         "guest": WaitGuest, "job": WaitJob, "pcm": WaitPcm}

#: planted faults of the player (``play: {fault: ...}``): the signal file the guest plays
#: is edited, so the host's analysis must find exactly this
PLAY_FAULTS = ("none", "drop-100ms", "repeat-buffer")


class Play(StepBase):
    """Play the lab's counter signal on a device's PCM, in the background.

    The lab writes the signal (lab.audio_analysis), copies it into the guest once per
    VM and plays it bit-exact (no resampling, no mixer) so that the host can check every
    frame QEMU captured. A ``play`` of a name that is already playing restarts it (an
    audio service reopening its stream after the device came back). ``fault`` plants a
    glitch in what is played, after ``fault_at`` into the stream, to show that the
    analysis finds one: ``drop-100ms`` skips 4410 frames, ``repeat-buffer`` plays 1024
    frames twice.
    """

    step_type: ClassVar[str] = "play"
    device: Id
    name: Name = "player"
    seconds: Duration = Duration(30_000_000_000)
    fault: Literal["none", "drop-100ms", "repeat-buffer"] = "none"
    fault_at: Duration = Duration(1_000_000_000)

    @model_validator(mode="after")
    def _bounds(self) -> Play:
        if not 0 < self.seconds.ns <= 600_000_000_000:
            raise ValueError("seconds must be more than 0 and at most 10 minutes")
        if self.fault != "none" and self.fault_at.ns >= self.seconds.ns:
            raise ValueError("fault_at must be inside the stream (less than seconds)")
        return self

    def describe(self) -> str:
        fault = f" fault={self.fault}" if self.fault != "none" else ""
        return f"play [{self.name}] {self.device}{fault}"


# ---- asserts -----------------------------------------------------------------------------

class AssertBase(StepBase):
    """Asserts check the events of this iteration recorded up to this step; a failed
    assert is a violation (status failed, exit 1), like a broken rule."""

    step_type: ClassVar[str] = "assert"


def check_known_rule(pattern: str, known: frozenset[str] | None) -> None:
    """Raise unless ``pattern`` (an id or glob) selects at least one known rule."""
    if known is None or any(fnmatch.fnmatchcase(k, pattern) for k in known):
        return
    raise SpecError(unknown("rule", pattern, sorted(known)))


class AssertRule(AssertBase):
    """Run one rule (or rule set) now, optionally only for one device."""

    rule: RuleName
    device: Id | None = None

    @field_validator("rule")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        check_known_rule(v, (info.context or {}).get("known_rules"))
        return v

    def describe(self) -> str:
        return f"assert rule {self.rule}"


class AssertNoKind(AssertBase):
    """No event of this kind so far (e.g. ``kernel-oops``)."""

    no_kind: KindName
    device: Id | None = None

    def describe(self) -> str:
        return f"assert no {self.no_kind.value}"


class AudioCheck(Spec):
    max_gap: Duration | None = None
    max_discontinuities: Int | None = None
    max_outage: Duration | None = None        # the stream must come back within this

    @model_validator(mode="after")
    def _any(self) -> AudioCheck:
        if self.max_gap is None and self.max_discontinuities is None and self.max_outage is None:
            raise ValueError("audio needs max_gap (or max_gap_ms), max_discontinuities and/or "
                             "max_outage")
        if self.max_discontinuities is not None and self.max_discontinuities < 0:
            raise ValueError("max_discontinuities must be >= 0")
        return self


class AssertAudio(AssertBase):
    """The iteration's captured audio so far: no gap longer than ``max_gap``, at most
    ``max_discontinuities`` drops/repeats, every outage (stream stopped -> resumed)
    shorter than ``max_outage`` and the stream playing again."""

    audio: AudioCheck

    def describe(self) -> str:
        return "assert audio"


class CountCheck(Spec):
    kind: KindName
    device: Id | None = None
    source: SourceName | None = None
    eq: Int | None = None
    min: Int | None = None
    max: Int | None = None

    @model_validator(mode="after")
    def _bounds(self) -> CountCheck:
        if self.eq is None and self.min is None and self.max is None:
            raise ValueError("count needs eq, or min and/or max")
        if self.eq is not None and (self.min is not None or self.max is not None):
            raise ValueError("count takes eq, or min/max, not both")
        for k in ("eq", "min", "max"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"count {k} must be >= 0, got {v}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"count min {self.min} is above max {self.max}")
        return self

    def accepts(self, n: int) -> bool:
        if self.eq is not None:
            return n == self.eq
        return (self.min is None or n >= self.min) and (self.max is None or n <= self.max)


class AssertCount(AssertBase):
    """The number of events of a kind (for a device) is as expected."""

    count: CountCheck

    def describe(self) -> str:
        return f"assert count {self.count.kind.value}"


ASSERT_KINDS: dict[str, type[AssertBase]] = {"rule": AssertRule, "no_kind": AssertNoKind,
                                             "audio": AssertAudio, "count": AssertCount}


# ---- parallel ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Branch:
    name: str
    steps: tuple[Step, ...]


class Parallel(StepBase):
    """Run branches concurrently; the step ends when every branch has ended.

    Within a branch steps run in order; across branches there is no order, so a
    device plugged in one branch cannot be used by another one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    step_type: ClassVar[str] = "parallel"
    branches: tuple[Branch, ...]

    def describe(self) -> str:
        return f"parallel {', '.join(b.name for b in self.branches)}"

    def to_yaml(self) -> dict[str, Any]:
        return {"parallel": {b.name: [s.to_yaml() for s in b.steps] for b in self.branches}}


Step = Union[Plug, Unplug, RebalancePressure, RebalanceRescan, RebalanceCpuHotplug,
             RebalanceReconfigure, RebalanceResize, RebalanceWdtf, Guest, Module, Play, Sleep, Jitter, Pause,
             Resume, WaitEvent, WaitQmp, WaitGuest, WaitJob, WaitPcm, AssertRule, AssertNoKind,
             AssertAudio, AssertCount, Parallel]


# ---- parsing -----------------------------------------------------------------------------

@dataclass(frozen=True)
class ParseContext:
    """What step parsing needs besides the data: the iteration seed (jitter draws) and
    the rule names the rules engine knows (None: don't check)."""

    seed: int = 0
    known_rules: frozenset[str] | None = None


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
    step = STEP_TYPES[typ](located, path + (typ,), ctx)
    step._ypath = path
    step._line = located.line_of(path)
    step._file = located.filename
    return step


def _validate(cls: type[StepBase] | type[Spec], located: Located, apath: YamlPath, args: Any,
              ctx: ParseContext) -> Any:
    try:
        return cls.model_validate(args, context={"known_rules": ctx.known_rules})
    except ValidationError as exc:
        raise spec_error(exc, located.at(apath), cls) from None


def _mapping_or(located: Located, apath: YamlPath, shorthand: str | None,
                what: str) -> dict[str, Any]:
    data = located.get(apath)
    if isinstance(data, Mapping):
        return dict(data)
    if data is None:
        return {}
    if shorthand is not None and not isinstance(data, list):
        return {shorthand: data}
    raise located.error(f"{what} takes a mapping of fields", apath)


def _simple(cls: type[StepBase], shorthand: str | None = None
            ) -> Callable[[Located, YamlPath, ParseContext], Step]:
    def parse(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
        args = _mapping_or(located, apath, shorthand, cls.step_type)
        return typing.cast(Step, _validate(cls, located, apath, args, ctx))
    return parse


def _parse_guest(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    data = located.get(apath)
    args = {"argv": data} if isinstance(data, list) else \
        _mapping_or(located, apath, "run", "guest")
    return typing.cast(Step, _validate(Guest, located, apath, args, ctx))


def _parse_sleep(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    args = _mapping_or(located, apath, "duration", "sleep")
    if "ms" in args:                     # sleep: {ms: 250}
        if len(args) != 1:
            raise located.error("sleep takes either a duration or {ms: N}", apath)
        args = {"duration": MsNumber(args["ms"])}
    return typing.cast(Step, _validate(Sleep, located, apath, args, ctx))


def _parse_jitter(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    args = _mapping_or(located, apath, "max", "jitter")
    if "delay" in args:
        raise located.error("the jitter delay is drawn from the iteration seed; give max "
                            "(and optionally min)", apath + ("delay",))
    step = typing.cast(Jitter, _validate(Jitter, located, apath, args, ctx))
    key = "jitter:" + format_path(apath[:-1])
    # microsecond resolution: finer than any sleep the host can honour, and readable
    lo_us, hi_us = -(-step.min.ns // 1000), step.max.ns // 1000
    delay_ns = draw_int(ctx.seed, key, lo_us, hi_us) * 1000 if hi_us >= lo_us else step.min.ns
    return step.model_copy(update={"delay": Duration(delay_ns)})


def _parse_no_args(cls: type[StepBase]) -> Callable[[Located, YamlPath, ParseContext], Step]:
    def parse(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
        data = located.get(apath)
        if data not in (None, {}):
            raise located.error(f"{cls.step_type} takes no arguments (write "
                                f"'- {cls.step_type}: {{}}')", apath)
        return typing.cast(Step, cls())
    return parse


def _parse_rebalance(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    data = located.get(apath)
    if not isinstance(data, Mapping):
        raise located.error("rebalance takes a mapping with a trigger, e.g. "
                            "{trigger: rescan, device: snd0}", apath)
    if "trigger" not in data:
        raise located.error("rebalance needs a trigger (one of: "
                            f"{', '.join(REBALANCE_TRIGGERS)})", apath)
    trig = data["trigger"]
    if not isinstance(trig, str) or trig not in REBALANCE_TRIGGERS:
        raise located.error(unknown("trigger", trig, list(REBALANCE_TRIGGERS)),
                            apath + ("trigger",))
    cls = REBALANCE_TRIGGERS[trig]
    return typing.cast(Step, _validate(cls, located, apath, dict(data), ctx))


def _one_of_keys(located: Located, apath: YamlPath, kinds: Mapping[str, Any], what: str
                 ) -> tuple[str, dict[str, Any]]:
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


def _parse_wait(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    kind, args = _one_of_keys(located, apath, WAIT_KINDS, "wait")
    return typing.cast(Step, _validate(WAIT_KINDS[kind], located, apath, args, ctx))


def _parse_assert(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    kind, args = _one_of_keys(located, apath, ASSERT_KINDS, "assert")
    return typing.cast(Step, _validate(ASSERT_KINDS[kind], located, apath, args, ctx))


def _parse_parallel(located: Located, apath: YamlPath, ctx: ParseContext) -> Step:
    data = located.get(apath)
    branches: list[Branch] = []
    if isinstance(data, Mapping):
        for name in data:
            if not isinstance(name, str):
                raise located.error(f"branch name {name!r} must be text", apath + (name,))
            try:
                check_name(name)
            except SpecError as exc:
                raise located.relocate(exc, apath + (name,)) from None
            branches.append(Branch(name, parse_steps(located, apath + (name,), ctx)))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, list):
                raise located.error("each parallel branch is a list of steps (or name the "
                                    "branches: 'parallel: {stream: [...], yank: [...]}')",
                                    apath + (i,))
            branches.append(Branch(f"b{i + 1}", parse_steps(located, apath + (i,), ctx)))
    else:
        raise located.error("parallel takes branches: a mapping of name to steps, or a list "
                            "of step lists", apath)
    if len(branches) < 2:
        raise located.error("parallel needs at least two branches", apath)
    return Parallel.model_construct(branches=tuple(branches))


STEP_TYPES: dict[str, Callable[[Located, YamlPath, ParseContext], Step]] = {
    "plug": _simple(Plug, "device"),
    "unplug": _simple(Unplug, "device"),
    "rebalance": _parse_rebalance,
    "guest": _parse_guest,
    "module": _simple(Module, "name"),
    "play": _simple(Play, "device"),
    "sleep": _parse_sleep,
    "jitter": _parse_jitter,
    "wait": _parse_wait,
    "pause": _parse_no_args(Pause),
    "resume": _parse_no_args(Resume),
    "parallel": _parse_parallel,
    "assert": _parse_assert,
}


def walk(steps: tuple[Step, ...]) -> typing.Iterator[Step]:
    """Every step, depth first, including those inside parallel branches."""
    for s in steps:
        yield s
        if isinstance(s, Parallel):
            for b in s.branches:
                yield from walk(b.steps)
