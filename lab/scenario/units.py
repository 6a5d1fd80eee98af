"""Durations, sizes, names: the value types a scenario is written in.

A driver engineer writes ``250ms`` or ``2s``; the executor needs nanoseconds or
seconds. A bare number is refused where a duration is meant, because ``sleep: 250``
is ambiguous (ms? s?) and guessing wrong hides races; fields whose name ends in
``_ms`` (``max_ms: 20``, ``timeout_ms: 500``) take plain numbers of milliseconds.
Sizes reuse ``vdevice.sizes`` so that a scenario and a topology read ``64M`` alike.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import GetCoreSchemaHandler, PlainSerializer, PlainValidator, Strict
from pydantic_core import core_schema

from lab.events import Kind, Source
from vdevice.errors import SpecError
from vdevice.sizes import bar_size, fmt_size
from vdevice.yamlsrc import unknown

_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 1_000_000_000,
       "min": 60_000_000_000}
_DUR_RE = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*([^\s\d.+-][^\s]*)?\s*$")
MAX_DURATION_NS = 24 * 3600 * 1_000_000_000   # a day: anything longer is a typo, not a test


@dataclass(frozen=True)
class MsNumber:
    """A plain number given under a ``*_ms`` key: milliseconds, no unit needed."""

    value: object


@dataclass(frozen=True, order=True)
class Duration:
    """A non-negative time span, exact in nanoseconds; prints as people write it."""

    ns: int

    @property
    def seconds(self) -> float:
        return self.ns / 1e9

    @property
    def ms(self) -> float:
        return self.ns / 1e6

    def __str__(self) -> str:
        if self.ns == 0:
            return "0ms"
        for unit, mult in (("min", _NS["min"]), ("s", _NS["s"]), ("ms", _NS["ms"]),
                           ("us", _NS["us"])):
            if self.ns >= mult and self.ns % mult == 0:
                return f"{self.ns // mult}{unit}"
        if self.ns >= _NS["ms"]:
            return f"{self.ns / _NS['ms']:g}ms"
        return f"{self.ns}ns"

    @classmethod
    def from_ms(cls, ms: float) -> Duration:
        return cls.parse(MsNumber(ms))

    @classmethod
    def parse(cls, value: object) -> Duration:
        """``250ms``, ``2s``, ``1.5s``, ``100us``, ``1min``; ``MsNumber`` for ``*_ms`` keys.

        Raises ``SpecError`` (a ``ValueError``) for a missing or unknown unit, a
        negative, non-finite or absurdly long value.
        """
        if isinstance(value, Duration):
            return value
        if isinstance(value, MsNumber):
            num = value.value
            if isinstance(num, bool) or not isinstance(num, (int, float)):
                raise SpecError(f"expected a number of milliseconds, got {num!r}")
            return cls._make(float(num) * _NS["ms"], f"{num}ms")
        if isinstance(value, bool) or value is None:
            raise SpecError(f"expected a duration such as 250ms or 2s, got {value!r}")
        if isinstance(value, (int, float)):
            raise SpecError(f"a duration needs a unit: write {value}ms or {value}s "
                            "(or use a field ending in _ms for plain milliseconds)")
        if not isinstance(value, str):
            raise SpecError(f"expected a duration such as 250ms or 2s, got {value!r}")
        m = _DUR_RE.match(value)
        if not m:
            raise SpecError(f"cannot read duration {value!r} (write e.g. 250ms, 2s, 1.5s)")
        number, unit = m[1], m[2]
        if unit is None:
            raise SpecError(f"duration {value!r} needs a unit: write {number}ms or {number}s")
        if unit not in _NS:
            raise SpecError(unknown("unit", unit, list(_NS)) + f" in duration {value!r}")
        return cls._make(float(number) * _NS[unit], value)

    @classmethod
    def _make(cls, ns: float, text: str) -> Duration:
        if not math.isfinite(ns):
            raise SpecError(f"duration {text!r} is not a finite number")
        if ns < 0:
            raise SpecError(f"duration {text!r} is negative; durations are >= 0")
        if ns > MAX_DURATION_NS:
            raise SpecError(f"duration {text!r} is longer than a day; is the unit right?")
        return cls(int(round(ns)))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler
                                     ) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse, serialization=core_schema.plain_serializer_function_ser_schema(str))


ZERO = Duration(0)


# ---- sizes -------------------------------------------------------------------------------

def _bar_size_or_auto(value: object) -> int | str:
    if value == "auto":
        return "auto"
    return bar_size(value)


def _fmt_size_or_auto(value: int | str) -> str:
    return value if isinstance(value, str) else fmt_size(value)


#: A BAR size (a power of two): ``64M``, ``1G``, ``0x4000`` -> bytes.
BarSize = Annotated[int, PlainValidator(bar_size), PlainSerializer(fmt_size)]
#: A BAR size, or ``auto`` (the lab picks one that does not fit the current window).
BarSizeOrAuto = Annotated[int | str, PlainValidator(_bar_size_or_auto),
                          PlainSerializer(_fmt_size_or_auto)]


# ---- names ---------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,79}$")
_QMP_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
_RULE_RE = re.compile(r"^[a-z0-9*?\[][a-z0-9_.*?!\[\]-]{0,99}$")


def check_id(value: str) -> str:
    """A QEMU id (device, port): what ``-device ...,id=`` accepts."""
    if not _ID_RE.match(value):
        raise SpecError(f"{value!r} is not a valid QEMU id (a letter, then up to 63 letters, "
                        "digits, '-', '_' or '.')")
    return value


def check_name(value: str) -> str:
    """A scenario, rule or job name: lower case, safe in file names and URLs."""
    if not _NAME_RE.match(value):
        raise SpecError(f"{value!r} is not a valid name (lower-case letters, digits, '-', '_', "
                        "'.'; starting with a letter or digit)")
    return value


def check_rule(value: str) -> str:
    """A rule family, check id or glob, as the rules engine selects them
    (``linux-driver``, ``pnp.query-stop-slow``, ``pnp.*``)."""
    if not _RULE_RE.match(value):
        raise SpecError(f"{value!r} is not a rule id or pattern (lower case, digits, '-', '_', "
                        "'.', and * ? [] for globs)")
    return value


def check_qmp_event(value: str) -> str:
    if not _QMP_RE.match(value):
        raise SpecError(f"{value!r} is not a QMP event name (upper case, e.g. DEVICE_DELETED)")
    return value


def parse_kind(value: object) -> Kind:
    if isinstance(value, Kind):
        return value
    if not isinstance(value, str):
        raise SpecError(f"expected an event kind such as 'bound', got {value!r}")
    try:
        return Kind(value)
    except ValueError:
        raise SpecError(unknown("event kind", value, [k.value for k in Kind])) from None


def parse_source(value: object) -> Source:
    if isinstance(value, Source):
        return value
    if not isinstance(value, str):
        raise SpecError(f"expected an event source such as 'guest.kernel', got {value!r}")
    try:
        return Source(value)
    except ValueError:
        raise SpecError(unknown("event source", value, [s.value for s in Source])) from None


Id = Annotated[str, Strict(), PlainValidator(lambda v: check_id(_strict_str(v)))]
Name = Annotated[str, Strict(), PlainValidator(lambda v: check_name(_strict_str(v)))]
RuleName = Annotated[str, PlainValidator(lambda v: check_rule(_strict_str(v)))]
QmpEvent = Annotated[str, PlainValidator(lambda v: check_qmp_event(_strict_str(v)))]
KindName = Annotated[Kind, PlainValidator(parse_kind), PlainSerializer(lambda k: k.value)]
SourceName = Annotated[Source, PlainValidator(parse_source), PlainSerializer(lambda s: s.value)]
Int = Annotated[int, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]
Number = Annotated[float, Strict()]


def _strict_str(value: object) -> str:
    if not isinstance(value, str):
        raise SpecError(f"expected a name (text), got {value!r}")
    return value
