"""A synthetic, realistic run directory, for tests and for previewing the reports.

``python -m lab.report.sample DIR`` writes a run of ``sweep-rebalance-delay`` (10
iterations, a rebalance race that fails at some delays, one lab error) with timelines,
``summary.json``, ``junit.xml`` and ``report.html``, so the report can be looked at
and reviewed without QEMU. Nothing here is used by a real run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lab.events import DeviceId, Event, Kind, Source
from lab.results import EventRef, IterationResult, Status, StepTiming, Violation
from lab.report.summary import RunInfo

T0 = 1_732_250_000_000_000_000          # a fixed wall-clock start (ns)
MS = 1_000_000
SND = DeviceId(qom="snd0", bdf="0000:01:00.0")


def sample_events(index: int, delay_ms: int, fail: bool, t0: int) -> list[Event]:
    """One iteration's merged timeline: plug, bind, stream, rebalance via rescan.

    Spans (``duration_ns``) run forward from the event, as operation spans do: the
    driver-call spans sit on the ``*-enter`` events."""
    ev: list[Event] = []

    def add(at_ms: float, src: Source, kind: Kind, dev: DeviceId | None = SND,
            dur_ms: float | None = None, **data: object) -> Event:
        e = Event(t_host_ns=t0 + int(at_ms * MS), source=src, kind=kind, device=dev,
                  duration_ns=int(dur_ms * MS) if dur_ms is not None else None,
                  data=dict(data), seq=len(ev) + 1)
        ev.append(e)
        return e

    add(0.0, Source.HOST_LAB, Kind.HOTPLUG_REQUEST, driver="AC97", port="rp1")
    add(2.6, Source.HOST_QMP, Kind.QMP_EVENT, name="device_add returned")
    add(3.1, Source.HOST_TRACE, Kind.CONFIG_WRITE, reg="0x04", value="0x0107")
    add(7.9, Source.GUEST_UEVENT, Kind.UEVENT, action="add", devpath="/devices/pci0000:00")
    add(9.4, Source.GUEST_KPROBE, Kind.PROBE_ENTER, dur_ms=13.4, function="snd_intel8x0_probe")
    add(10.2, Source.HOST_TRACE, Kind.BAR_MAPPED, bar=0, addr="0xc000", size="0x100")
    add(22.8, Source.GUEST_KPROBE, Kind.PROBE_EXIT, ret=0)
    add(23.0, Source.GUEST_KERNEL, Kind.KERNEL_LOG, msg="snd_intel8x0 0000:01:00.0: "
        "enable Intel 82801AA AC'97 audio")
    add(24.5, Source.HOST_LAB, Kind.BOUND, driver="snd_intel8x0")
    add(40.0, Source.HOST_AUDIO, Kind.OPERATION, name="stream", dur_ms=360.0 + delay_ms)
    r = 40.0 + delay_ms
    add(r, Source.HOST_LAB, Kind.REBALANCE_START, trigger="rescan")
    add(r + 3.0, Source.GUEST_KPROBE, Kind.REMOVE_ENTER, dur_ms=9.0,
        function="snd_intel8x0_remove")
    add(r + 3.4, Source.GUEST_KERNEL, Kind.KERNEL_LOG, msg="pci 0000:00:02.0: removing")
    add(r + 4.0, Source.HOST_TRACE, Kind.BAR_UNMAPPED, bar=0, addr="0xc000")
    add(r + 4.2, Source.HOST_TRACE, Kind.DECODE_OFF)
    add(r + 12.0, Source.GUEST_KPROBE, Kind.REMOVE_EXIT, ret=0)
    if fail:
        add(r + 13.9, Source.GUEST_KPROBE, Kind.DRIVER_IO, function="snd_intel8x0_interrupt",
            port="0xc006", note="I/O after remove() returned")
    add(r + 30.0, Source.GUEST_KERNEL, Kind.KERNEL_LOG, msg="pci 0000:01:00.0: BAR 0: "
        "assigned [io  0xd000-0xd0ff]")
    add(r + 31.0, Source.HOST_TRACE, Kind.BAR_MAPPED, bar=0, addr="0xd000", size="0x100")
    add(r + 34.0, Source.GUEST_KPROBE, Kind.PROBE_ENTER, dur_ms=13.5,
        function="snd_intel8x0_probe")
    add(r + 47.5, Source.GUEST_KPROBE, Kind.PROBE_EXIT, ret=0)
    add(r + 49.0, Source.HOST_LAB, Kind.REBALANCE_END)
    if fail:
        add(r + 52.0, Source.HOST_AUDIO, Kind.AUDIO_GAP, dur_ms=48.0)
    add(r + 60.0, Source.HOST_LAB, Kind.RESOURCE_MOVED, before="0xc000", after="0xd000")
    return ev


def sample_run(run_dir: Path) -> tuple[RunInfo, list[IterationResult]]:
    """Write timelines under ``run_dir`` and return the run's info and results."""
    results: list[IterationResult] = []
    delays = [0, 100, 200, 300, 400]
    for k in range(10):
        delay = delays[k % 5]
        t0 = T0 + k * 3_000 * MS
        fail = (delay == 200) or (delay == 300 and k >= 5)
        error = k == 9
        events = sample_events(k, delay, fail, t0)
        it_dir = run_dir / "iterations" / str(k)
        it_dir.mkdir(parents=True, exist_ok=True)
        with (it_dir / "timeline.jsonl").open("w", encoding="utf-8") as f:
            f.write(json.dumps({"type": "header", "alignment": {"bound_ns": 1_400_000,
                                                               "method": "serial-min"}}) + "\n")
            for e in events:
                f.write(e.dumps() + "\n")
        (it_dir / "kmsg.log").write_text("...\n", encoding="utf-8")
        timings = (
            StepTiming("plug snd0 (AC97 @ rp1)", t0, 3 * MS),
            StepTiming("wait bound snd0", t0 + 3 * MS, 22 * MS),
            StepTiming("guest & aplay", t0 + 25 * MS, 15 * MS),
            StepTiming(f"sleep {delay}ms", t0 + 40 * MS, delay * MS),
            StepTiming("rebalance rescan snd0", t0 + (40 + delay) * MS, 50 * MS,
                       ok=not error, detail="agent timed out" if error else ""),
        )
        violations: tuple[Violation, ...] = ()
        if fail:
            by_kind = {e.kind: e for e in events}
            io = by_kind[Kind.DRIVER_IO]
            rexit = by_kind[Kind.REMOVE_EXIT]
            violations = (Violation(
                rule="linux.callback-after-remove", device="snd0", phase="rebalance",
                message="snd_intel8x0_interrupt ran 1.9 ms after snd_intel8x0_remove returned "
                        "(I/O to port 0xc006 of a BAR QEMU had unmapped)",
                events=(EventRef(rexit.seq, rexit.t_host_ns, rexit.kind.value,
                                 rexit.source.value, "snd_intel8x0_remove returned"),
                        EventRef(io.seq, io.t_host_ns, io.kind.value, io.source.value,
                                 "inw 0xc006")),
                details={"gap_ms": 1.9}),)
            if delay == 300:
                gap = by_kind[Kind.AUDIO_GAP]
                violations += (Violation(
                    rule="audio.max-gap", device="snd0", phase="rebalance",
                    message="48 ms of silence exceeds max_gap 30 ms",
                    events=(EventRef(gap.seq, gap.t_host_ns, gap.kind.value,
                                     gap.source.value, "48 ms"),)),)
        status = Status.ERROR if error else Status.FAILED if violations else Status.PASSED
        results.append(IterationResult(
            index=k, parameters={"delay_ms": delay, "model": "AC97"}, seed=1000 + k,
            status=status, violations=violations, timings=timings,
            artifacts={"timeline": f"iterations/{k}/timeline.jsonl",
                       "kmsg": f"iterations/{k}/kmsg.log"},
            error="guest agent: timed out after 30.0s waiting for 'echo 1 > /sys/bus/pci/"
                  "rescan' (last seen: connection reset)" if error else None))
    info = RunInfo(scenario="sweep-rebalance-delay", accelerator="tcg",
                   versions={"qemu": "7.2.15", "kernel": "6.1.0-28-amd64", "rebalab": "0.1.0"},
                   topology="default", seed=1234, started_at="2024-11-22T05:40:00+00:00",
                   ended_at="2024-11-22T05:41:12+00:00", guest="linux (debian 6.1)",
                   guest_image_sha256="9f2c1e0b7d4a6f3e8c5b2a1d0e9f8c7b6a5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f",
                   alignment_bound_ns=1_400_000,
                   parameters={"delay_ms": {"range": [0, 400, 100]}, "model": ["AC97"]},
                   scenario_file="scenarios/sweep-rebalance-delay.yaml")
    for name in ("run.json", "qmp.jsonl", "console.log", "qemu-cmdline.txt"):
        (run_dir / name).write_text("{}\n" if name.endswith("json") else "\n", encoding="utf-8")
    return info, results


def main(argv: list[str]) -> int:
    from lab.report.html import write_report
    from lab.report.junit import write_junit
    from lab.report.summary import write_summary

    run_dir = Path(argv[0] if argv else "sample-run")
    run_dir.mkdir(parents=True, exist_ok=True)
    info, results = sample_run(run_dir)
    summary = write_summary(run_dir, info, results)
    write_junit(run_dir, summary)
    print(write_report(run_dir, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
