"""Rule registry, selection, phases and context helpers."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from lab.errors import ConfigError
from lab.events import DeviceId, Event, Kind, Source
from lab.results import Violation
from lab.rules import Limits, Phase, RuleContext, check_all, known_ids, phases_from_timeline
from lab.rules.base import register, registered
from lab.timeline import Timeline

SND = DeviceId(qom="snd0", bdf="0000:01:00.0")
MS = 1_000_000


def op(t_ms: float, dur_ms: float | None, name: str, phase: str | None = None,
       **extra: object) -> Event:
    d: dict[str, object] = {"name": name, **extra}
    if phase:
        d["phase"] = phase
    return Event(int(t_ms * MS), Source.HOST_LAB, Kind.OPERATION, None,
                 None if dur_ms is None else int(dur_ms * MS), d)


def mixed_timeline() -> Timeline:
    return Timeline.build([
        op(0, 100, "rebalance"), op(10, 30, "rebalance", "remove"),
        Event(5 * MS, Source.GUEST_PNP, Kind.START, SND),
        Event(20 * MS, Source.GUEST_PNP, Kind.STOP, SND),                   # pnp violation
        Event(50 * MS, Source.GUEST_KPROBE, Kind.PROBE_ENTER, SND),          # hung probe
        Event(60 * MS, Source.GUEST_KERNEL, Kind.KERNEL_LOG,
              data={"message": "WARNING: CPU: 0 PID: 1 at x.c:1 f+0x1/0x2"}),
        Event(200 * MS, Source.HOST_LAB, Kind.BOUND, SND),
    ], devices=[SND])


def test_builtin_families_are_registered() -> None:
    ids = {r.id for r in registered()}
    assert {"windows-pnp", "linux-driver", "kernel-oops"} <= ids
    k = known_ids()
    assert "pnp.cancel-stop-failed" in k and "linux.decode-unbound" in k and "bugcheck" in k
    assert all(k[i] for i in k)


def test_selection_by_family_check_and_glob() -> None:
    tl = mixed_timeline()
    ctx = RuleContext.from_timeline(tl, devices=(SND,))
    everything = [v.rule for v in check_all(tl, ctx)]
    assert everything == ["pnp.stop-without-query-stop", "pnp.stopped-at-end",
                          "linux.probe-unpaired", "kernel.warning"]
    assert [v.rule for v in check_all(tl, ctx, ["kernel-oops"])] == ["kernel.warning"]
    assert [v.rule for v in check_all(tl, ctx, ["pnp.stop-*"])] == \
        ["pnp.stop-without-query-stop"]
    assert [v.rule for v in check_all(tl, ctx, ["linux.probe-unpaired", "kernel.*"])] == \
        ["linux.probe-unpaired", "kernel.warning"]
    with pytest.raises(ConfigError, match="unknown rule 'pnp.nope'"):
        check_all(tl, ctx, ["pnp.nope"])


def test_disabled_checks_are_dropped() -> None:
    tl = mixed_timeline()
    ctx = RuleContext.from_timeline(tl, devices=(SND,), disabled=frozenset({"pnp.*"}))
    assert [v.rule for v in check_all(tl, ctx)] == ["linux.probe-unpaired", "kernel.warning"]


def test_phases_from_operation_events() -> None:
    tl = Timeline.build([op(0, 100, "rebalance"), op(10, 30, "rebalance", "remove"),
                         op(200, None, "unplug"), op(300, None, "plug"),
                         op(400, None, "plug", edge="end")])
    phases = phases_from_timeline(tl)
    assert phases == (Phase("rebalance", 0, 100 * MS), Phase("rebalance:remove", 10 * MS, 40 * MS),
                      Phase("unplug", 200 * MS, None), Phase("plug", 300 * MS, 400 * MS))
    ctx = RuleContext(phases=phases[:2])
    assert ctx.phase_at(-1) == "setup"
    assert ctx.phase_at(5 * MS) == "rebalance"
    assert ctx.phase_at(20 * MS) == "rebalance:remove"
    assert ctx.phase_at(150 * MS) == "after:rebalance"


def test_context_labels_and_limits() -> None:
    ctx = RuleContext(devices=(SND,), drivers={"snd-hda-intel": "snd0"})
    assert ctx.label(DeviceId(bdf="0000:01:00.0")) == "snd0"
    assert ctx.label(DeviceId(bdf="0000:09:00.0")) == "0000:09:00.0"
    assert ctx.label(None) == "guest"
    assert ctx.under_test(DeviceId(qom="snd0")) and not ctx.under_test(DeviceId(qom="x"))
    assert ctx.driver_device("snd_hda_intel") == "snd0"
    assert RuleContext().under_test(DeviceId(qom="anything"))
    assert Limits.from_mapping({"remove_max_ms": 5}).remove_max_ms == 5.0
    with pytest.raises(ConfigError, match="unknown rule limit"):
        Limits.from_mapping({"remove_ms": 5})


def test_violations_cite_events_and_serialise() -> None:
    tl = mixed_timeline()
    v = check_all(tl, RuleContext.from_timeline(tl, devices=(SND,)), ["pnp.stop-*"])[0]
    assert v.events[0].seq == 4 and v.events[0].source == "guest.pnp"
    assert v.phase == "rebalance:remove"
    assert Violation.from_json(v.to_json()) == v


def test_register_rejects_duplicate_ids() -> None:
    class Dup:
        id = "dup-family"
        description = "x"
        checks: Mapping[str, str] = {"pnp.stop-failed": "clash"}

        def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]:
            return []

    with pytest.raises(ValueError, match="pnp.stop-failed"):
        register(Dup())
