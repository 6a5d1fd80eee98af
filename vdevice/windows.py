"""Window arithmetic: will a BAR fit behind a bridge, and if not, which windows must grow.

Input is what the firmware and guest really assigned (read at run time from QMP
``query-pci`` and turned into ``BridgeWindows``), not what we asked for: SeaBIOS
ignores some reservation hints (PLATFORM.md), so only the assigned windows count.
Allocation follows PCI rules: a BAR is a power of two, naturally aligned, and must lie
inside every bridge window above it, of the matching type (I/O, 32-bit memory, or
prefetchable memory, where a 64-bit prefetchable BAR may also fall back to the
non-prefetchable window only if it is below 4G, which we do not rely on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vdevice.sizes import fmt_size, next_pow2


@dataclass(frozen=True)
class Range:
    base: int
    limit: int   # inclusive; base > limit means the window is closed

    @property
    def size(self) -> int:
        return 0 if self.base > self.limit else self.limit - self.base + 1

    @property
    def open(self) -> bool:
        return self.base <= self.limit

    def __str__(self) -> str:
        return f"[{self.base:#x}-{self.limit:#x}] ({fmt_size(self.size)})" if self.open else "closed"


@dataclass(frozen=True)
class BridgeWindows:
    """The windows of one bridge (root port or switch port), as assigned."""

    port: str
    io: Range
    memory: Range
    prefetchable: Range


@dataclass(frozen=True)
class Used:
    """A BAR already placed somewhere below a bridge."""

    kind: str     # "io", "mem32", "mem64-pref" (prefetchable)
    base: int
    size: int


def window_for(kind: str, w: BridgeWindows) -> Range:
    return {"io": w.io, "mem32": w.memory, "mem64-pref": w.prefetchable,
            "mem32-pref": w.prefetchable}[kind]


def first_fit(window: Range, size: int, used: Sequence[Used]) -> int | None:
    """The lowest naturally aligned base for ``size`` inside ``window`` avoiding ``used``."""
    if not window.open or size > window.size:
        return None
    taken = sorted((u.base, u.base + u.size) for u in used)
    base = (window.base + size - 1) // size * size
    while base + size - 1 <= window.limit:
        clash = next(((s, e) for s, e in taken if s < base + size and base < e), None)
        if clash is None:
            return base
        base = (clash[1] + size - 1) // size * size
    return None


@dataclass(frozen=True)
class FitVerdict:
    fits: bool
    kind: str
    size: int
    chain: tuple[str, ...]               # ports from the device's port up to the root
    blocking: tuple[tuple[str, str], ...]  # (port, why) for each window that must grow
    base: int | None = None

    def explain(self) -> str:
        if self.fits:
            return f"a {fmt_size(self.size)} {self.kind} BAR fits at {self.base:#x}"
        return (f"a {fmt_size(self.size)} {self.kind} BAR does not fit: "
                + "; ".join(f"{p}: {why}" for p, why in self.blocking))


def check_fit(kind: str, size: int, chain: Sequence[BridgeWindows],
              used_below: dict[str, Sequence[Used]]) -> FitVerdict:
    """Does a BAR of ``kind``/``size`` fit behind ``chain[0]`` (and every bridge above)?

    ``chain`` runs from the bridge the device sits behind up to the root port;
    ``used_below[port]`` lists BARs (and child windows) already inside that port's window.
    A window that must grow is named with the size it would need at least.
    """
    blocking: list[tuple[str, str]] = []
    base: int | None = None
    for i, w in enumerate(chain):
        win = window_for(kind, w)
        need = size if i == 0 else max(size, next_pow2(size))
        b = first_fit(win, need, used_below.get(w.port, ()))
        if b is None:
            used = sum(u.size for u in used_below.get(w.port, ()) if window_for(u.kind, w) is win)
            want = next_pow2(used + size)
            blocking.append((w.port, f"{_label(kind)} window {win} has no aligned room for "
                                     f"{fmt_size(size)}; it would need at least {fmt_size(want)}"))
        elif i == 0:
            base = b
    return FitVerdict(not blocking, kind, size, tuple(w.port for w in chain), tuple(blocking),
                      base if not blocking else None)


def _label(kind: str) -> str:
    return {"io": "I/O", "mem32": "memory", "mem64-pref": "prefetchable",
            "mem32-pref": "prefetchable"}[kind]


def size_to_force_rebalance(window: Range, *, minimum: int = 64 << 20) -> int:
    """The BAR size the lab picks to make a hot-plug overflow ``window``.

    Strictly larger than the whole window (so it cannot fit whatever else is there)
    and at least ``minimum``: 64M is what was seen to make Linux release and
    re-assign a root port's window (PLATFORM.md) while staying far below the 64-bit
    hole, so the retry can succeed.
    """
    return max(minimum, next_pow2(window.size + 1))
