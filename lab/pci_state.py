"""Host-side ground truth about PCI resources: ``query-pci`` snapshots and their diff.

What QEMU reports is what the virtual hardware decodes, independent of what the guest
says. A diff names every BAR and bridge window that changed, so "the rebalance moved
the audio BAR from 0xfe800000 to 0x20000000" is a fact read from the hardware.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from vdevice.windows import BridgeWindows, Range

UNASSIGNED = (1 << 64) - 1


@dataclass(frozen=True)
class BarState:
    index: int
    kind: str            # "io", "mem32", "mem64", with "-pref" for prefetchable
    address: int | None  # None: not assigned/decoded
    size: int

    def describe(self) -> str:
        where = f"{self.address:#x}" if self.address is not None else "unassigned"
        return f"BAR{self.index} {self.kind} {where}+{self.size:#x}"


@dataclass(frozen=True)
class FunctionState:
    bdf: str
    qdev_id: str
    vendor: int
    device: int
    desc: str
    bars: tuple[BarState, ...]
    windows: BridgeWindows | None = None
    secondary: int | None = None

    @property
    def label(self) -> str:
        return self.qdev_id or self.bdf


@dataclass(frozen=True)
class Change:
    device: str          # qdev id or BDF
    bdf: str
    what: str            # "BAR0", "window.memory", "window.prefetchable", "window.io",
                         # "device" (appeared/disappeared), "bdf" (renumbered)
    old: str | None
    new: str | None
    old_address: int | None = None
    new_address: int | None = None
    old_size: int | None = None
    new_size: int | None = None

    def describe(self) -> str:
        return f"{self.device} ({self.bdf}) {self.what}: {self.old or '-'} -> {self.new or '-'}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _walk(devices: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for d in devices:
        yield d
        br = d.get("pci_bridge")
        if br:
            yield from _walk(br.get("devices", []))


def _range(r: dict[str, Any] | None) -> Range:
    if not r:
        return Range(1, 0)
    return Range(int(r["base"]), int(r["limit"]))


def _bar(region: dict[str, Any]) -> BarState:
    if region.get("type") == "io":
        kind = "io"
    else:
        kind = ("mem64" if region.get("mem_type_64") else "mem32") + (
            "-pref" if region.get("prefetch") else "")
    # QEMU reports -1 for a BAR it does not map: unassigned, or decode off in the
    # command register (a device with no driver bound usually has decode off)
    addr = int(region.get("address", -1))
    return BarState(int(region["bar"]), kind, None if addr in (-1, UNASSIGNED, 0) else addr,
                    int(region.get("size", 0)))


@dataclass(frozen=True)
class PciSnapshot:
    t_host_ns: int
    functions: tuple[FunctionState, ...]

    @classmethod
    def from_query_pci(cls, data: list[dict[str, Any]], t_host_ns: int) -> PciSnapshot:
        out: list[FunctionState] = []
        for bus in data:
            for d in _walk(bus.get("devices", [])):
                bdf = f"0000:{int(d['bus']):02x}:{int(d['slot']):02x}.{int(d['function'])}"
                windows = None
                secondary = None
                br = d.get("pci_bridge")
                if br:
                    b = br.get("bus", {})
                    secondary = int(b.get("secondary", 0))
                    windows = BridgeWindows(d.get("qdev_id") or bdf, _range(b.get("io_range")),
                                            _range(b.get("memory_range")),
                                            _range(b.get("prefetchable_range")))
                ident = d.get("id", {})
                out.append(FunctionState(bdf, d.get("qdev_id") or "", int(ident.get("vendor", 0)),
                                         int(ident.get("device", 0)),
                                         (d.get("class_info") or {}).get("desc", ""),
                                         tuple(_bar(r) for r in d.get("regions", [])), windows,
                                         secondary))
        return cls(t_host_ns, tuple(out))

    def find(self, key: str) -> FunctionState | None:
        for f in self.functions:
            if key in (f.qdev_id, f.bdf):
                return f
        return None

    def to_json(self) -> dict[str, Any]:
        return {"t_host_ns": self.t_host_ns, "functions": [asdict(f) for f in self.functions]}


def _key(f: FunctionState) -> str:
    return f.qdev_id or f"{f.vendor:04x}:{f.device:04x}@{f.bdf}"


def diff(before: PciSnapshot, after: PciSnapshot) -> list[Change]:
    """Every BAR and window that differs; devices matched by QEMU id (BDFs can change)."""
    a = {_key(f): f for f in before.functions}
    b = {_key(f): f for f in after.functions}
    changes: list[Change] = []
    for k in sorted(a.keys() | b.keys()):
        fa, fb = a.get(k), b.get(k)
        if fa is None or fb is None:
            f = fa or fb
            assert f is not None
            changes.append(Change(f.label, f.bdf, "device", "present" if fa else None,
                                  "present" if fb else None))
            continue
        if fa.bdf != fb.bdf:
            changes.append(Change(fb.label, fb.bdf, "bdf", fa.bdf, fb.bdf))
        bars_a = {x.index: x for x in fa.bars}
        bars_b = {x.index: x for x in fb.bars}
        for i in sorted(bars_a.keys() | bars_b.keys()):
            xa, xb = bars_a.get(i), bars_b.get(i)
            if xa != xb:
                changes.append(Change(fb.label, fb.bdf, f"BAR{i}",
                                      xa.describe() if xa else None, xb.describe() if xb else None,
                                      xa.address if xa else None, xb.address if xb else None,
                                      xa.size if xa else None, xb.size if xb else None))
        if fa.windows and fb.windows:
            for name in ("io", "memory", "prefetchable"):
                ra, rb = getattr(fa.windows, name), getattr(fb.windows, name)
                if ra != rb:
                    changes.append(Change(fb.label, fb.bdf, f"window.{name}", str(ra), str(rb),
                                          ra.base if ra.open else None,
                                          rb.base if rb.open else None, ra.size, rb.size))
    return changes
