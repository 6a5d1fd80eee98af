from __future__ import annotations

from vdevice.windows import BridgeWindows, Range, Used, check_fit, first_fit, size_to_force_rebalance

M = 1 << 20
CLOSED = Range(1, 0)


def rp(port: str, pref: Range, mem: Range = CLOSED) -> BridgeWindows:
    return BridgeWindows(port, CLOSED, mem, pref)


def test_first_fit_aligns_and_skips_used() -> None:
    w = Range(0x100000, 0x2FFFFF)   # 2M at 1M
    assert first_fit(w, 0x4000, []) == 0x100000
    assert first_fit(w, 0x4000, [Used("mem32", 0x100000, 0x4000)]) == 0x104000
    assert first_fit(w, 2 * M, []) is None            # 2M can't be 2M-aligned inside [1M,3M)
    assert first_fit(w, M, []) == 0x100000
    assert first_fit(CLOSED, 0x1000, []) is None


def test_check_fit_names_the_windows_that_must_grow() -> None:
    port = rp("rp1", Range(0x800000000, 0x8001FFFFF))   # 2M prefetchable
    v = check_fit("mem64-pref", 64 * M, [port], {})
    assert not v.fits
    assert v.blocking[0][0] == "rp1"
    assert "at least 64M" in v.blocking[0][1]
    ok = check_fit("mem64-pref", M, [port], {})
    assert ok.fits and ok.base == 0x800000000


def test_switch_chain_checks_every_level() -> None:
    down = rp("sw1p1", Range(0x800000000, 0x8003FFFFF))   # 4M
    root = rp("rp2", Range(0x800000000, 0x8003FFFFF))     # 4M, half used by a sibling port
    v = check_fit("mem64-pref", 4 * M, [down, root], {"rp2": [Used("mem64-pref", 0x800000000, 2 * M)]})
    assert not v.fits and [p for p, _ in v.blocking] == ["rp2"]


def test_auto_size_overflows_the_window() -> None:
    assert size_to_force_rebalance(Range(0, 2 * M - 1)) == 64 * M
    assert size_to_force_rebalance(Range(0, 128 * M - 1)) == 256 * M
