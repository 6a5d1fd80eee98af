"""Sweep parameters and ``${name}`` substitution.

Parameters are the axes a race hunt sweeps: a list of values, a numeric range, or a
value drawn at random per iteration from the iteration's seed. Declaring them up
front lets the validator check every ``${name}`` (a typo is an error with its line,
not a literal ``${dleay_ms}`` sent to the guest) and check each step for every value
a parameter can take, before any VM starts.

Random draws do not use Python's ``random`` or ``hash``: a value is a pure function of
(iteration seed, parameter name), SHA-256 based, so it is the same on every host and
Python version, and adding a parameter does not change the others' draws.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath, unknown

Scalar = Union[str, int, float, bool]

_PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TEMPLATE_RE = re.compile(r"\$\$|\$\{([^}]*)\}|\$\{")
MAX_RANGE_VALUES = 10_000


# ---- the documented stable random function -------------------------------------------

def stable_u64(*parts: object) -> int:
    """64 uniform bits from SHA-256 of the parts joined by '/' (stable across hosts)."""
    text = "/".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def draw_int(seed: int, key: str, low: int, high: int) -> int:
    """A uniform integer in [low, high] for (seed, key)."""
    return low + stable_u64("rebalab", "v1", "draw", seed, key) % (high - low + 1)


def draw_float(seed: int, key: str, low: float, high: float) -> float:
    """A uniform float in [low, high) for (seed, key), 53 bits of resolution."""
    frac = (stable_u64("rebalab", "v1", "draw", seed, key) >> 11) / float(1 << 53)
    return low + (high - low) * frac


# ---- parameter kinds ---------------------------------------------------------------------

@dataclass(frozen=True)
class GridParam:
    """A parameter swept over every value: from a list, or a range (stop inclusive)."""

    name: str
    values: tuple[Scalar, ...]
    spec: Any                      # what the YAML said, for run.json

    @property
    def is_grid(self) -> bool:
        return True

    def representatives(self) -> tuple[Scalar, ...]:
        return self.values


@dataclass(frozen=True)
class RandomParam:
    """A number drawn per iteration: integers if both bounds are integers (inclusive),
    else a float in [low, high)."""

    name: str
    low: float | int
    high: float | int
    spec: Any

    @property
    def is_grid(self) -> bool:
        return False

    @property
    def integer(self) -> bool:
        return isinstance(self.low, int) and isinstance(self.high, int)

    def draw(self, seed: int) -> Scalar:
        if self.integer:
            return draw_int(seed, self.name, int(self.low), int(self.high))
        return draw_float(seed, self.name, float(self.low), float(self.high))

    def representatives(self) -> tuple[Scalar, ...]:
        return (self.low, self.high) if self.low != self.high else (self.low,)


@dataclass(frozen=True)
class ChoiceParam:
    """One of the listed values, drawn per iteration from the seed."""

    name: str
    values: tuple[Scalar, ...]
    spec: Any

    @property
    def is_grid(self) -> bool:
        return False

    def draw(self, seed: int) -> Scalar:
        return self.values[draw_int(seed, self.name, 0, len(self.values) - 1)]

    def representatives(self) -> tuple[Scalar, ...]:
        return self.values


Param = Union[GridParam, RandomParam, ChoiceParam]


def parse_parameters(located: Located) -> tuple[Param, ...]:
    """Read the ``parameters:`` mapping (``located`` is rooted at it), in file order."""
    data = located.data
    if data is None:
        return ()
    if not isinstance(data, Mapping):
        raise located.error("parameters is a mapping of name to values, e.g. "
                            "'delay_ms: {range: [0, 400, 100]}'")
    out: list[Param] = []
    for name, spec in data.items():
        path: YamlPath = (name,)
        if not isinstance(name, str) or not _PARAM_NAME_RE.match(name):
            raise located.error(f"parameter name {name!r} must be a letter or '_' followed by "
                                "letters, digits or '_' (it is written ${name} in steps)", path)
        out.append(_parse_one(located, name, spec, path))
    return tuple(out)


def _scalar_list(located: Located, values: object, path: YamlPath, what: str
                 ) -> tuple[Scalar, ...]:
    if not isinstance(values, list) or not values:
        raise located.error(f"{what} needs a non-empty list of values", path)
    for i, v in enumerate(values):
        if isinstance(v, (dict, list)) or v is None:
            raise located.error(f"parameter values must be plain values (text, number, true/"
                                f"false), got {'nothing' if v is None else type(v).__name__}",
                                path + (i,))
    seen: dict[object, int] = {}
    for i, v in enumerate(values):
        key = (type(v).__name__, v)
        if key in seen:
            raise located.error(f"value {v!r} is listed twice (items {seen[key]} and {i})",
                                path + (i,))
        seen[key] = i
    return tuple(values)


def _number(located: Located, v: object, path: YamlPath) -> int | float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise located.error(f"expected a number, got {v!r} (units belong in the steps: "
                            "'${delay_ms}ms')", path)
    return v


def _parse_one(located: Located, name: str, spec: object, path: YamlPath) -> Param:
    if isinstance(spec, list):
        return GridParam(name, _scalar_list(located, spec, path, f"parameter {name!r}"), spec)
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise located.error(f"parameter {name!r} must be a list of values or one of "
                            "{range: [start, stop, step]}, {random: [low, high]}, "
                            "{choice: [values...]}", path)
    (kind, arg), = spec.items()
    apath = path + (kind,)
    if kind == "range":
        if not isinstance(arg, list) or len(arg) not in (2, 3):
            raise located.error("range is [start, stop] or [start, stop, step]; stop is "
                                "included when it lands on the grid", apath)
        nums = [_number(located, v, apath + (i,)) for i, v in enumerate(arg)]
        start, stop = nums[0], nums[1]
        step = nums[2] if len(nums) == 3 else 1
        if step <= 0:
            raise located.error(f"range step must be > 0, got {step}", apath + (2,))
        if stop < start:
            raise located.error(f"range stop {stop} is below start {start}", apath + (1,))
        try:
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
        except (OverflowError, ValueError):   # 1e308 bounds, a step that underflows
            raise located.error("range is too large to count; more than "
                                f"{MAX_RANGE_VALUES} values is surely a mistake", apath) from None
        if count > MAX_RANGE_VALUES:
            raise located.error(f"range has {count} values; more than {MAX_RANGE_VALUES} is "
                                "surely a mistake", apath)
        if all(isinstance(n, int) for n in nums):
            values: tuple[Scalar, ...] = tuple(int(start) + i * int(step) for i in range(count))
        else:
            values = tuple(round(start + i * step, 9) for i in range(count))
        return GridParam(name, values, dict(spec))
    if kind == "random":
        if not isinstance(arg, list) or len(arg) != 2:
            raise located.error("random is [low, high] (integers: both inclusive; "
                                "otherwise a float in [low, high))", apath)
        low = _number(located, arg[0], apath + (0,))
        high = _number(located, arg[1], apath + (1,))
        if high < low:
            raise located.error(f"random high {high} is below low {low}", apath + (1,))
        return RandomParam(name, low, high, dict(spec))
    if kind == "choice":
        return ChoiceParam(name, _scalar_list(located, arg, apath, "choice"), dict(spec))
    raise located.error(unknown("parameter kind", kind, ["range", "random", "choice"])
                        + "; or give a plain list of values", apath)


def grid_of(params: Sequence[Param]) -> list[GridParam]:
    return [p for p in params if isinstance(p, GridParam)]


# ---- templates ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TemplateRef:
    name: str
    path: YamlPath


def find_refs(located: Located, path: YamlPath = ()) -> Iterator[TemplateRef]:
    """Every ``${name}`` in the strings under ``path`` (checks the syntax on the way)."""
    node = located.get(path)
    if isinstance(node, str):
        for m in _TEMPLATE_RE.finditer(node):
            tok = m.group(0)
            if tok == "$$":
                continue
            if tok == "${":
                raise located.error(f"unclosed '${{' in {node!r} (write $$ for a literal $)",
                                    path)
            name = m.group(1).strip()
            if not _PARAM_NAME_RE.match(name):
                raise located.error(f"'${{{m.group(1)}}}' is not a parameter reference "
                                    "(write $$ for a literal $, e.g. $${HOME} in a shell "
                                    "command)", path)
            yield TemplateRef(name, path)
    elif isinstance(node, dict):
        for k in node:
            yield from find_refs(located, path + (k,))
    elif isinstance(node, list):
        for i in range(len(node)):
            yield from find_refs(located, path + (i,))


def check_refs(located: Located, params: Sequence[Param], path: YamlPath = ()) -> set[str]:
    """Raise for an unknown ``${name}``; return the names used."""
    declared = [p.name for p in params]
    used: set[str] = set()
    for ref in find_refs(located, path):
        if ref.name not in declared:
            hint = unknown("parameter", ref.name, declared) if declared else \
                f"unknown parameter {ref.name!r}: no parameters are declared"
            raise located.error(f"{hint}; write $${{{ref.name}}} for a literal ${{{ref.name}}} "
                                "(e.g. a shell variable)", ref.path)
        used.add(ref.name)
    return used


def substitute(node: Any, values: Mapping[str, Scalar]) -> Any:
    """A copy of ``node`` with ``${name}`` replaced; same shape, so positions still apply.

    A string that is exactly one reference takes the value with its type
    (``"${delay_ms}"`` -> ``100``); inside text the value is formatted
    (``"${delay_ms}ms"`` -> ``"100ms"``). ``$$`` is a literal ``$``.
    """
    if isinstance(node, str):
        m = re.fullmatch(r"\$\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}", node)
        if m and m.group(1) in values:
            return values[m.group(1)]

        def repl(mm: re.Match[str]) -> str:
            if mm.group(0) == "$$":
                return "$"
            return format_value(values[mm.group(1).strip()])
        return _TEMPLATE_RE.sub(repl, node)
    if isinstance(node, dict):
        return {k: substitute(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [substitute(v, values) for v in node]
    return node


def format_value(value: Scalar) -> str:
    """How a value reads inside text: ``true``, ``100``, ``0.25``, ``AC97``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.9g}" if not value.is_integer() else str(int(value))
    return str(value)
