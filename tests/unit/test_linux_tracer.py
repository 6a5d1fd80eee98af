"""The Linux kprobe tracer's snapshot-reset paths, without a VM: a restored guest whose
point holds the probes armed is asked nothing at start, and a VM about to be discarded is
drained by a mirrored clock-sync token instead of an SSH command. The guest side runs in
tests/e2e/test_snapshot.py; here the decisions and their fallbacks are checked."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from lab.agent.base import CommandResult
from lab.console import ConsoleLine
from lab.agent.posix import PosixShell
from lab.guest.linux.kprobes import ALL_SPECS, ARMED_KEY, LinuxTracer

PROBE = ('    kworker/u4:1-24      [000] .....     9.269656: rebalab_testdrv_probe_ent: '
         '(rebalab_testdrv_probe+0x0/0x490 [rebalab_testdrv]) name="0000:01:00.0"')


def mark(token: str) -> str:
    return f"            init-147     [000] .....    10.784688: tracing_mark_write: rebalab-sync {token}"


class Port:
    def __init__(self) -> None:
        self.listeners: list[Any] = []
        self.n = 0

    def feed(self, text: str) -> None:
        self.n += 1
        for fn in list(self.listeners):
            fn(ConsoleLine(t_host_ns=1_000 + self.n, text=text, index=self.n))


class Agent:
    """Records each command; answers like a guest that has done it and has every
    traced function."""

    shell = PosixShell()

    def __init__(self) -> None:
        self.commands: list[str] = []

    def run(self, command: str, timeout: float | None = None, **_: Any) -> CommandResult:
        self.commands.append(command)
        out = ("\n".join(s.func for s in ALL_SPECS) if "available_filter_functions" in command
               else "started\n")
        return CommandResult(command=command, exit_status=0, stdout=out, stderr="",
                             duration_s=0.0)


class Process:
    def responsive(self) -> bool:
        return True


class Run:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, text: str) -> None:
        self.lines.append(text)


class Image:
    def __init__(self, mirrored: bool) -> None:
        self.manifest = {"serial": {"sync": "ttyS1", "sync_trace_marker": mirrored}}


class FakeMachine:
    def __init__(self, *, restored: bool, disposable: bool, cache: dict[str, Any]) -> None:
        self.restore = object() if restored else None
        self.disposable = disposable
        self.guest_cache = cache
        self.trace_port = Port()
        self.agent = Agent()
        self.process = Process()
        self.run = Run()


def armed_cache(tracer: LinuxTracer, active: tuple[str, ...] | None = None) -> dict[str, Any]:
    funcs = tuple(s.func for s in tracer.wanted)
    return {ARMED_KEY: {"wanted": funcs, "preload": tracer.preload,
                        "active": active if active is not None else funcs, "missing": ()}}


def tracer_for(m: FakeMachine, mirrored: bool = True) -> LinuxTracer:
    return LinuxTracer(m, Image(mirrored))  # type: ignore[arg-type]


def test_a_restored_guest_armed_at_its_point_is_asked_nothing_and_still_traced() -> None:
    m = FakeMachine(restored=True, disposable=True, cache={})
    t = tracer_for(m)
    m.guest_cache.update(armed_cache(t, active=("pci_device_probe", "rebalab_testdrv_probe")))
    t.start()
    assert m.agent.commands == []
    assert [s.func for s in t.active] == ["pci_device_probe", "rebalab_testdrv_probe"]
    m.trace_port.feed(PROBE)
    assert [e.data["func"] for e in t.snapshot()] == ["rebalab_testdrv_probe"]


@pytest.mark.parametrize("why", ["booted", "point-not-armed", "other-probes"])
def test_without_an_armed_point_the_probes_are_set_up_in_the_guest(why: str,
                                                                     tmp_path: Path) -> None:
    m = FakeMachine(restored=why != "booted", disposable=True, cache={})
    t = tracer_for(m)
    if why == "booted":
        m.guest_cache.update(armed_cache(t))      # a booted VM's cache proves nothing
    elif why == "other-probes":
        cache = armed_cache(t)
        cache[ARMED_KEY]["wanted"] = ("pci_device_probe",)
        m.guest_cache.update(cache)
    t._offsets = lambda: None                     # type: ignore[method-assign]
    t.start()
    assert any("kprobe_events" in c or "tracing_on" in c for c in m.agent.commands)
    assert m.guest_cache[ARMED_KEY]["active"]     # armed now: a point saved next holds them


def test_a_discarded_vm_is_drained_by_the_mirrored_sync_token_without_ssh() -> None:
    m = FakeMachine(restored=True, disposable=True, cache={})
    t = tracer_for(m)
    m.guest_cache.update(armed_cache(t))
    t.start()
    m.trace_port.feed(PROBE)
    timer = threading.Timer(0.05, m.trace_port.feed, args=(mark("c439.50"),))
    timer.start()
    events = t.stop(synced="c439.50")
    timer.join()
    assert m.agent.commands == []
    assert len(events) == 1
    assert t.parser is not None and t.parser.unparsed == 0   # the mark is not an unknown line
    assert m.trace_port.listeners == []


def test_a_sync_token_that_never_comes_through_falls_back_to_the_agents_drain() -> None:
    m = FakeMachine(restored=True, disposable=True, cache={})
    t = tracer_for(m)
    m.guest_cache.update(armed_cache(t))
    t.start()
    t.stop(drain_s=0.05, synced="never")
    assert any("trace_marker" in c and "enable" in c for c in m.agent.commands)
    assert any("did not come through the trace port" in line for line in m.run.lines)
    assert ARMED_KEY not in m.guest_cache


@pytest.mark.parametrize("disposable, mirrored", [(False, True), (True, False)])
def test_a_vm_that_lives_on_or_an_image_without_the_mirror_is_disarmed(disposable: bool,
                                                                         mirrored: bool) -> None:
    m = FakeMachine(restored=True, disposable=disposable, cache={})
    t = tracer_for(m, mirrored)
    m.guest_cache.update(armed_cache(t))
    t.start()
    m.trace_port.feed(mark("c1.1"))
    t.stop(drain_s=0.05, synced="c1.1")
    assert any("echo 0 > events/rebalab/enable" in c for c in m.agent.commands)
    assert ARMED_KEY not in m.guest_cache
