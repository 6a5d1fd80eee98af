"""Timeline assembly from a run's recorded sources (lab.observe), without a VM."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from lab.events import DeviceId, Event, Kind, Source
from lab.observe import Observation
from tests.unit.guest_fakes import behaviour
from lab.tracers.qemu_trace import QemuTraceParser

LINES = ["6115@1796155325.764275:pci_cfg_write edu 01:00.0 @0x4 <- 0x6\n",
         "6115@1796155325.764300:pci_update_mappings_add edu 01:00.0 0,0x20000000+0x100000\n"]


def test_trace_lines_a_rebalance_also_recorded_appear_once(tmp_path: Path) -> None:
    """A rebalance records the trace lines it read into the run's events; the timeline
    takes QEMU's trace from its log file only, so each line is one event."""
    (tmp_path / "qemu-trace.log").write_text("".join(LINES))
    parser = QemuTraceParser()
    recorded = [ev for line in LINES for ev in parser.parse_line(line)]
    assert recorded, "the sample lines must parse"
    lab_ev = Event(1796155325_700000000, Source.HOST_LAB, Kind.OPERATION, DeviceId(qom="edu0"),
                   data={"name": "rebalance:rescan"})
    m = SimpleNamespace(console=None, accel=None, artifacts=tmp_path, ssh_port=None, sync=None, guest=behaviour("linux"),
                        run=SimpleNamespace(events=[lab_ev, *recorded]))
    obs = Observation(m, kprobes=False)  # type: ignore[arg-type]
    obs.start_ns = 0
    tl = obs._build([], alive=False)
    trace = [e for e in tl.events if e.source == Source.HOST_TRACE]
    keys = [(e.kind, e.t_host_ns, e.data.get("trace")) for e in trace]
    assert len(keys) == len(set(keys)) == len(recorded)
    assert any(e.kind == Kind.OPERATION for e in tl.events)


def test_clock_samples_come_from_the_observation_window_only(tmp_path: Path) -> None:
    """Kernel log lines from before the observation started are not clock evidence for
    it: a fit over the whole boot made the bound grow with every iteration."""
    from lab.console import ConsoleLine

    old = [ConsoleLine(1_000_000_000 + i, f"[    1.{i:06d}] old line {i}", i) for i in range(5)]
    new = [ConsoleLine(9_000_000_000 + i, f"[    9.{i:06d}] new line {i}", 5 + i) for i in range(3)]
    console = SimpleNamespace(lines=lambda after=0: (old + new)[after:], cursor=lambda: len(old))
    m = SimpleNamespace(console=console, accel=None, artifacts=tmp_path, ssh_port=None, sync=None, guest=behaviour("linux"),
                        run=SimpleNamespace(events=[]))
    obs = Observation(m, kprobes=False)  # type: ignore[arg-type]
    obs._console_cursor = len(old)
    seen: list[list[tuple[int, str]]] = []
    obs.guest.sync.samples = lambda lines: seen.append(list(lines)) or []  # type: ignore[attr-defined]
    obs._build([], alive=False)
    assert seen == [[(ln.t_host_ns, ln.text) for ln in new]]
