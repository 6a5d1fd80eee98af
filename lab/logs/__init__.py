"""Readers of the logs a machine leaves behind, one module per format.

The same parsers serve ``rebalab inspect`` (logs brought from real machines) and the
live tracers (the guest's console, the Windows tracer's ETW/setupapi/pnputil output),
so a fix to a format helps both. ``PARSERS`` lists them; ``detect`` picks one for a
file by sniffing its head.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from lab.logs.base import LogFormatError, LogInput, LogParser, Tally

#: modules holding parsers, in the order ties are broken (most specific first)
_MODULES = (
    "lab.logs.lab_artifacts",
    "lab.logs.winevent",
    "lab.logs.setupapi",
    "lab.logs.pnputil",
    "lab.logs.kernel",
)

_cache: dict[str, LogParser] | None = None


def parsers() -> Mapping[str, LogParser]:
    """Every parser by its format name (loaded once)."""
    global _cache
    if _cache is None:
        found: dict[str, LogParser] = {}
        for mod in _MODULES:
            for p in getattr(importlib.import_module(mod), "PARSERS", ()):
                if p.name in found:
                    raise RuntimeError(f"two log parsers are named {p.name!r}")
                found[p.name] = p
        _cache = found
    return _cache


def names() -> list[str]:
    return list(parsers())


def get(name: str) -> LogParser:
    try:
        return parsers()[name]
    except KeyError:
        raise LogFormatError(f"unknown log format {name!r}; known: auto, "
                             + ", ".join(names())) from None


def detect(inp: LogInput) -> LogParser:
    """The parser whose ``sniff`` is most confident about ``inp``; a file no parser
    recognises is an error that says how to name the format."""
    best: tuple[int, int, LogParser] | None = None
    for order, p in enumerate(parsers().values()):
        score = p.sniff(inp)
        if score > 0 and (best is None or score > best[0]):
            best = (score, -order, p)
    if best is None:
        raise LogFormatError(f"{inp.display}: the format was not recognised; name it with "
                             f"--format (one of: {', '.join(names())})")
    return best[2]


__all__ = ["LogFormatError", "LogInput", "LogParser", "Tally", "detect", "get", "names",
           "parsers"]
