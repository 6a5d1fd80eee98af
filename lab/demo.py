"""The default hot-plug cycle: what `rebalab demo` and `make demo` run.

Per hot-plug mode one VM; per audio model: plug -> driver bound -> unplug -> gone in
QEMU and in the guest. Every step is timed from the host and written to the run
directory, so a failed or interrupted demo still says how far it got.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import operations as ops
from lab.errors import Interrupted, LabError
from lab.image import GuestImage
from lab.machine import Machine
from lab.observe import Observation
from lab.rundir import RunDir
from vdevice.catalog import get_model
from vdevice.presets import default_topology
from vdevice.topology import Device, HotplugMode, Placement

Progress = Callable[[str], None]


@dataclass
class DemoResult:
    run_dir: Path
    status: str = "passed"            # passed | failed | error | interrupted
    stopped_at: str | None = None
    error: str | None = None
    machines: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    timelines: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"passed": 0, "failed": 1, "error": 2, "interrupted": 130}[self.status]

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "exit_code": self.exit_code, "stopped_at": self.stopped_at,
                "error": self.error, "machines": self.machines, "steps": self.steps,
                "timelines": self.timelines,
                "run_dir": str(self.run_dir)}


def run_demo(models: Sequence[str], modes: Sequence[HotplugMode], *, cycles: int = 1,
             runs_root: Path = Path("runs"), accel: str | None = None,
             image: GuestImage | None = None, progress: Progress = lambda s: None) -> DemoResult:
    for name in models:
        m = get_model(name, field="--model")
        if not m.hotpluggable or m.role.value != "audio":
            raise LabError(f"{name} is not a hot-pluggable audio device")
    image = image or GuestImage.load()
    run = RunDir(runs_root, "demo")
    result = DemoResult(run.path)
    run.write_json("run.json", {"command": "demo", "models": list(models),
                                "modes": [m.value for m in modes], "cycles": cycles,
                                "image": image.describe()})
    where = "start"
    try:
        for mode in modes:
            topo = default_topology(mode, model=models[0])
            where = f"booting the guest ({mode.value} hot-plug)"
            progress(where)
            machine = Machine(topo, run, image=image, accel=accel,
                              subdir=mode.value if len(modes) > 1 else None)
            obs: Observation | None = None
            try:
                machine.start()
                obs = Observation(machine).start()
                info = machine.describe()
                result.machines.append(info)
                progress(f"guest ready in {machine.timings['boot_to_agent_s']:.2f}s "
                         f"({machine.accel.name if machine.accel else '?'})")
                result.steps.append({"mode": mode.value, "step": "boot", "ok": True,
                                     "ms": round(machine.timings["boot_to_agent_s"] * 1e3, 1),
                                     "accel": machine.accel.name if machine.accel else None})
                for cycle in range(cycles):
                    for model in models:
                        dev = Device("snd0", model, "rp1", Placement.HOT)
                        where = f"plugging {model} ({mode.value}, cycle {cycle + 1})"
                        progress(where)
                        r = ops.plug(machine, dev)
                        result.steps.append({"mode": mode.value, "step": "plug", "model": model,
                                             "cycle": cycle, "ok": True, "bdf": r.details["bdf"],
                                             "device_add_ms": round(r.durations_ms["device_add"], 1),
                                             "ms": round(r.durations_ms["bound"], 1)})
                        where = f"unplugging {model} ({mode.value}, cycle {cycle + 1})"
                        progress(where)
                        u = ops.unplug(machine, dev.id)
                        result.steps.append({"mode": mode.value, "step": "unplug", "model": model,
                                             "cycle": cycle, "ok": True,
                                             "evidence": u.details.get("qemu_evidence"),
                                             "qemu_ms": round(u.durations_ms["qemu_gone"], 1),
                                             "ms": round(u.durations_ms.get("guest_gone", 0), 1)})
            finally:
                if obs is not None:
                    try:
                        tl = obs.finish()
                        result.timelines.append({"mode": mode.value, "events": len(tl),
                                                 "bound_ms": tl.bound_ns / 1e6 if tl.bound_ns
                                                 is not None else None,
                                                 "path": str(machine.artifacts / "timeline.jsonl")})
                    except Exception as exc:  # the timeline must not hide the run's own error
                        run.log(f"timeline assembly failed: {exc!r}")
                step = machine.stop()
                if result.machines and result.machines[-1].get("state") != "stopped":
                    result.machines[-1]["stopped_by"] = step
        where = "done"
    except (KeyboardInterrupt, Interrupted) as exc:
        result.status, result.error = "interrupted", str(exc) or "interrupted"
    except LabError as exc:
        result.status, result.error = "error", str(exc)
    finally:
        result.stopped_at = None if result.status == "passed" else where
        run.write_json("summary.json", result.to_json())
        run.write_text("summary.txt", render_text(result))
        run.close()
    return result


def render_text(result: DemoResult) -> str:
    lines = [f"rebalab demo: {result.status.upper()}"]
    if result.stopped_at:
        lines.append(f"stopped at: {result.stopped_at}")
    if result.error:
        lines.append(f"error: {result.error}")
    for m in result.machines:
        acc = m.get("accelerator") or {}
        lines.append(f"machine: QEMU {m['qemu']['version']}, accel {acc.get('name')} "
                     f"({acc.get('reason')}), hot-plug mode {m['topology']['hotplug_mode']}")
    lines.append(f"{'mode':8} {'step':7} {'model':16} {'result':8} {'host-timed':>12}")
    for s in result.steps:
        lines.append(f"{s['mode']:8} {s['step']:7} {s.get('model', ''):16} "
                     f"{'ok' if s['ok'] else 'FAILED':8} {s['ms']:>9.1f} ms")
    for t in result.timelines:
        bound = f"±{t['bound_ms']:.3f} ms" if t["bound_ms"] is not None else "unknown"
        lines.append(f"timeline ({t['mode']}): {t['events']} events, guest clock aligned {bound}: "
                     f"{t['path']}")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines) + "\n"
