"""Sizes as people write them (``64M``, ``2MiB``, ``0x4000``) and as QEMU wants them."""

from __future__ import annotations

import re

from vdevice.errors import SpecError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
          "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40,
          "tib": 1 << 40}
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-fA-F]+|\d+)\s*([a-zA-Z]*)\s*$")

# A 64-bit prefetchable BAR can in principle be 2^63, but the q35 guest physical
# address space QEMU 7.2 gives by default is 40 bits (1 TiB); refuse what can never fit.
ADDRESS_SPACE = 1 << 40


def parse_size(value: object, *, field: str | None = None) -> int:
    """Bytes from an int or a string with binary units (K/M/G/T are powers of 1024)."""
    if isinstance(value, bool):
        raise SpecError(f"expected a size such as 64M, got {value!r}", field=field)
    if isinstance(value, int):
        if value < 0:
            raise SpecError(f"size must not be negative, got {value}", field=field)
        return value
    if not isinstance(value, str):
        raise SpecError(f"expected a size such as 64M, got {value!r}", field=field)
    m = _SIZE_RE.match(value)
    if not m or m[2].lower() not in _UNITS:
        raise SpecError(f"cannot read size {value!r} (use e.g. 4K, 64M, 1G, or a byte count)",
                        field=field)
    return int(m[1], 0) * _UNITS[m[2].lower()]


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def bar_size(value: object, *, field: str | None = None, minimum: int = 16) -> int:
    """A BAR size: a power of two, at least ``minimum`` and within the address space."""
    n = parse_size(value, field=field)
    if not is_power_of_two(n):
        raise SpecError(f"BAR size {fmt_size(n)} ({n} bytes) is not a power of two; PCI BARs "
                        f"are naturally aligned powers of two (try {fmt_size(next_pow2(n))})",
                        field=field)
    if n < minimum:
        raise SpecError(f"BAR size {n} bytes is below the minimum of {minimum}", field=field)
    if n > ADDRESS_SPACE:
        raise SpecError(f"BAR size {fmt_size(n)} is larger than the guest's {fmt_size(ADDRESS_SPACE)} "
                        "physical address space", field=field)
    return n


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def fmt_size(n: int) -> str:
    """The shortest exact binary-unit spelling (``64M``, ``4K``, ``1536K``)."""
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
