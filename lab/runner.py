"""Run a scenario: iterations on one VM, steps executed, rules checked, reports written.

One VM serves the whole sweep where the scenario allows it (``reset: none|replug``);
``reset: reboot`` and any iteration that leaves the guest unusable (an oops, QEMU
gone, the agent dead) get a fresh VM, so one crash does not stop a race hunt. Every
iteration keeps its own directory (``iterations/<k>/``) with its timeline and the
slice of the logs it produced, and the reports are written even when the run is
interrupted or the lab fails half-way.

Step semantics (documented in scenarios/README.md):
- ``plug``/``unplug`` return as soon as QEMU accepted the request; the lab keeps
  watching in the background and records ``bound`` / ``device-deleted`` / ``unbound``.
- ``wait`` matches events seen since the previous step started.
- ``assert`` checks the timeline as it is at that step (clock samples taken then).
- A ``wait`` that times out and an ``assert`` that does not hold fail the iteration
  (status failed: the guest or driver did not do what the scenario expects); a lab
  problem (QEMU refused, agent lost) is an error (status error).
"""

from __future__ import annotations

import datetime as dt
import json
import random
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lab import kmod
from lab import operations as ops
from lab import rebalance as rb
from lab.errors import DeadlineExceeded, Interrupted, LabError, QemuError
from lab.events import DeviceId, Event, Kind, Source
from lab.guest import GuestBoot, LinuxGuest
from lab.image import GuestImage
from lab.machine import Machine
from lab.observe import Observation
from lab.results import (EventRef, IterationResult, Status, StepTiming, Violation,
                         result_key)
from lab.rules import check_all
from lab.rules.base import Limits, RuleContext
from lab.rundir import RunDir
from lab.scenario.overrides import Overrides
from lab.scenario import (AssertAudio, AssertCount, AssertNoKind, AssertRule, Guest, Iteration,
                          Jitter, Module, Parallel, Pause, Play, Plug, RebalanceCpuHotplug, RebalancePressure,
                          RebalanceReconfigure, RebalanceRescan, RebalanceResize, Resume, Scenario,
                          Sleep, Step, Unplug, WaitEvent, WaitGuest, WaitJob, WaitPcm, WaitQmp)
from lab.timeline import Timeline, device_matches
from vdevice.topology import Device, HotplugMode, Placement, Topology

DEFAULT_WAIT_S = 20.0
GUEST_RULES_LINUX = ("linux-driver", "kernel-oops", "bugcheck", "audio")
GUEST_RULES_WINDOWS = ("windows-pnp", "bugcheck", "audio")
#: per iteration: the rules the run applied and their context (see lab.inspect)
RULES_FILE = "rules.json"


class StepFailed(Exception):
    """The guest or driver did not do what a step expects (iteration status: failed)."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.message)
        self.violation = violation


@dataclass
class Job:
    name: str
    command: str
    chan: Any
    check: bool
    started_ns: int
    result: Any = None


@dataclass
class IterationState:
    """What one iteration builds up while its steps run."""

    it: Iteration
    obs: Observation
    dir: Path
    started_ns: int
    jobs: dict[str, Job] = field(default_factory=dict)
    players: set[str] = field(default_factory=set)      # `play` jobs, stopped at the end
    watchers: list[threading.Thread] = field(default_factory=list)
    watcher_errors: list[str] = field(default_factory=list)
    timings: list[StepTiming] = field(default_factory=list)
    step_started_ns: int = 0
    violations: list[Violation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _label_step(step: Step) -> str:
    try:
        return step.describe()
    except Exception:
        return type(step).__name__


class ScenarioRunner:
    def __init__(self, scenario: Scenario, *, runs_root: Path = Path("runs"),
                 accel: str | None = None, image: GuestImage | None = None,
                 only: Sequence[int] | None = None, name_suffix: str = "",
                 console: Any = None, audio: bool | None = None,
                 overrides: Overrides | None = None, attempts: int = 1,
                 every_attempt: bool = False) -> None:
        # what the CLI changed (already applied to ``scenario``): recorded for replay
        self.overrides = overrides or Overrides()
        self.guest = self._guest_boot(scenario, image, accel)
        self.scenario = scenario
        self.topology: Topology = scenario.topology
        if scenario.hotplug_mode:
            self.topology = replace(self.topology, hotplug_mode=HotplugMode(scenario.hotplug_mode))
        self.sweep = scenario.sweep()
        self.indices = list(only) if only is not None else list(range(len(self.sweep)))
        # a replay of a race: each iteration up to ``attempts`` times, until one fails
        # (or all of them, ``every_attempt``, to measure how often it reproduces)
        if attempts < 1:
            raise ValueError(f"attempts must be >= 1, not {attempts}")
        self.attempts = attempts
        self.every_attempt = every_attempt
        self.accel = accel
        self.run = RunDir(runs_root, scenario.name + name_suffix)
        self.console = console
        self.machine: Machine | None = None
        self.results: list[IterationResult] = []
        self.audio = audio if audio is not None else any(
            isinstance(s, (AssertAudio, Play)) for k in self.indices[:1]
            for s in _walk(self.sweep.iteration(k).steps))
        self._signals: dict[tuple[int, str], str] = {}   # (machine, file) -> guest path
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.machine_count = 0
        self._bounds: dict[int | str, int] = {}

    # ---- the run -----------------------------------------------------------------------
    def execute(self) -> Any:
        """Run the iterations; always write the reports. Returns the Summary."""
        from lab.report import RunInfo, write_junit, write_report, write_summary

        run = self.run
        (run.path / "scenario.yaml").write_text(self.scenario.source_text)
        run.write_json("run.json", {
            "command": "run", "scenario": self.scenario.to_json(),
            "scenario_file": self.scenario.file,
            "base_dir": str(self.scenario.base_dir) if self.scenario.base_dir else None,
            "iterations": self.indices, "attempts": self.attempts,
            "every_attempt": self.every_attempt,
            "overrides": self.overrides.to_json(),
            "image": self.guest.describe_image(), "guest": self.guest.describe(),
            "topology": self.topology.to_json(), "started_at": self.started_at})
        run_status: Status | None = None
        stopped_at: str | None = None
        error: str | None = None
        done: set[int] = set()
        try:
            for k, attempt in self._schedule():
                it = self.sweep.iteration(k)
                if self.console is not None:
                    self.console.start(k, it.parameters, attempt)
                result = self._iteration(it, attempt)
                done.add(k)
                self.results.append(result)
                if self.console is not None:
                    self.console.finish(result)
                why = self.sweep.should_stop(self.results)
                if (why is None and attempt is not None and not self.every_attempt
                        and result.status == Status.FAILED):
                    why = f"reproduced at attempt {attempt} of {self.attempts}"
                if why:
                    stopped_at = why
                    if self.console is not None and attempt is not None:
                        self.console.note(f"#{k}: {why}")
                    break
        except (KeyboardInterrupt, Interrupted) as exc:
            run_status, stopped_at = Status.INTERRUPTED, f"interrupted: {exc or 'Ctrl-C'}"
        except LabError as exc:
            run_status, error = Status.ERROR, str(exc)
            stopped_at = f"lab error: {exc}"
        finally:
            self._stop_machine()
            rest = [k for k in self.indices if k not in done]
            for k in rest:
                self.results.extend(r for r in self.sweep.skipped(k, stopped_at or "not run")
                                    if r.index == k)
            self.results.sort(key=lambda r: r.index)
            acc = self._accel_name()
            known = list(self._bounds.values())
            info = RunInfo(
                scenario=self.scenario.name, accelerator=acc,
                versions={"rebalab": _version(), "qemu": self._qemu_version(),
                          **self._guest_versions()},
                topology=self.topology.to_json(), seed=self.scenario.seed,
                started_at=self.started_at,
                ended_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                status=run_status, stopped_at=stopped_at, error=error, guest=self.guest.os,
                guest_image_sha256=self._guest_image_hash(),
                alignment_bound_ns=max(known) if known else None,
                parameters=self.scenario.to_json().get("parameters", {}),
                scenario_file=self.scenario.file)
            summary = write_summary(run.path, info, self.results)
            write_junit(run.path, summary)
            try:
                write_report(run.path, summary)
            except Exception as exc:  # a report problem must not hide the run's result
                run.log(f"report.html could not be written: {exc!r}")
            run.close()
        return summary

    # ---- the guest ---------------------------------------------------------------------
    @staticmethod
    def _guest_boot(scenario: Scenario, image: GuestImage | None, accel: str | None) -> GuestBoot:
        """The scenario's guest, checked before any run directory or VM exists.

        A Windows guest is refused here when it cannot run on this host (no KVM), or
        when the scenario needs what its agent cannot do (background commands over
        WinRM, which has no streaming channel), so nothing half-runs.
        """
        if scenario.guest.os == "linux":
            return LinuxGuest(image or GuestImage.load())
        from lab import qemu_caps
        from lab.guest import WindowsGuest

        assert scenario.guest.image is not None    # the GuestSpec validator ensures it
        guest = WindowsGuest(scenario.guest.image, scenario.guest.agent_kind,
                             probe_image=image)
        if guest.agent_kind == "winrm":
            sweep = scenario.sweep()
            # step types do not vary with parameter values: iteration 0 shows them all
            bg = next((st for st in _walk(sweep.iteration(0).steps)
                       if isinstance(st, Guest) and st.background), None) if len(sweep) else None
            if bg is not None:
                raise LabError(f"{bg.where}: a background guest command needs a streaming "
                               "agent; WinRM has none. Use the Windows OpenSSH agent "
                               "(guest: {os: windows, image: ..., agent: ssh})")
        guest.choose_accel(qemu_caps.find_binary(), accel)   # KVM or a clear refusal
        return guest

    def _guest_versions(self) -> dict[str, str]:
        if isinstance(self.guest, LinuxGuest):
            return {"kernel": self.guest.image.kernel_release}
        win = self.guest.describe_image().get("windows") or {}
        return {"windows": " ".join(str(v) for v in (win.get("edition"), win.get("build"),
                                                     win.get("ubr")) if v) or "?"}

    def _guest_image_hash(self) -> str | None:
        if isinstance(self.guest, LinuxGuest):
            return self.guest.image.input_hash
        return None

    @property
    def image(self) -> GuestImage:
        """The built-in Linux image (Linux guests only)."""
        if isinstance(self.guest, LinuxGuest):
            return self.guest.image
        raise LabError("this run boots a Windows guest, not the built-in Linux image")

    def _accel_name(self) -> str:
        return getattr(getattr(self, "_accel", None), "name", None) or "unknown"

    def _qemu_version(self) -> str:
        try:
            from lab import qemu_caps
            return qemu_caps.probe().version_str
        except LabError:
            return "?"

    # ---- machines ------------------------------------------------------------------------
    def _ensure_machine(self) -> Machine:
        m = self.machine
        if m is not None and m.process is not None and m.process.alive():
            return m
        self._stop_machine()
        self.machine_count += 1
        m = Machine(self.topology, self.run, guest=self.guest, accel=self.accel,
                    subdir=f"vm{self.machine_count}", audio_capture=self.audio)
        self.machine = m
        m.start()
        self._accel = m.accel
        self.run.log(f"VM {self.machine_count} ready ({m.accel.name if m.accel else '?'})")
        return m

    def _stop_machine(self) -> None:
        if self.machine is not None:
            try:
                self.machine.stop()
            finally:
                self.machine = None

    def _reset(self, m: Machine) -> None:
        """Between iterations: ``replug`` unplugs what the iteration left plugged."""
        initial = {d.id for d in self.topology.devices if d.placement == Placement.COLD}
        if self.scenario.reset == "reboot":
            self._stop_machine()
            return
        if self.scenario.reset == "replug":
            for dev_id in sorted(m.present - initial):
                ops.unplug(m, dev_id)

    def _schedule(self) -> list[tuple[int, int | None]]:
        """(index, attempt) in run order; attempt is None unless a replay asked for
        several, because a race reproduces only some of the time."""
        if self.attempts == 1:
            return [(k, None) for k in self.indices]
        return [(k, a) for k in self.indices for a in range(1, self.attempts + 1)]

    # ---- one iteration -----------------------------------------------------------------
    def _iteration(self, it: Iteration, attempt: int | None = None) -> IterationResult:
        key = result_key(it.index, attempt)
        it_dir = self.run.path / "iterations" / str(key)
        it_dir.mkdir(parents=True, exist_ok=True)
        (it_dir / "parameters.json").write_text(json.dumps(
            {"index": it.index, "parameters": it.parameters, "seed": it.seed}
            | ({"attempt": attempt} if attempt is not None else {}), indent=2, default=str))
        self.run.log(f"iteration {it.label()} seed={it.seed}"
                     + (f" attempt {attempt} of {self.attempts}" if attempt is not None else ""))
        status = Status.PASSED
        error: str | None = None
        stopped_at: str | None = None
        st: IterationState | None = None
        tl: Timeline | None = None
        artifacts: dict[str, str] = {"dir": f"iterations/{key}"}
        try:
            m = self._ensure_machine()
            obs = Observation(m).start()
            st = IterationState(it, obs, it_dir, time.time_ns())
            random.seed(it.seed)
            for step in it.steps:
                stopped_at = f"{step.where}: {_label_step(step)}"
                self._run_step(m, st, step)
            stopped_at = None
        except StepFailed as exc:
            status = Status.FAILED
            assert st is not None
            st.violations.append(exc.violation)
        except (KeyboardInterrupt, Interrupted):
            status, error = Status.INTERRUPTED, "interrupted"
        except LabError as exc:
            status, error = Status.ERROR, self._cause(exc)
        finally:
            if st is not None:
                self._end_jobs(st)
                try:
                    tl = st.obs.finish(it_dir / "timeline.jsonl")
                except Exception as exc:
                    self.run.log(f"iteration {key}: timeline failed: {exc!r}")
        violations = list(st.violations) if st else []
        if tl is not None:
            artifacts["timeline"] = f"iterations/{key}/timeline.jsonl"
            if tl.bound_ns is not None:
                self._bounds[key] = tl.bound_ns
            if status in (Status.PASSED, Status.FAILED):
                found = self._final_rules(tl, it_dir)
                seen = {(v.rule, v.device, v.message) for v in violations}
                violations += [v for v in found if (v.rule, v.device, v.message) not in seen]
                if violations and status == Status.PASSED:
                    status = Status.FAILED
            elif status == Status.ERROR:
                # a step failing because the guest died (a panic cut the SSH command, QEMU
                # exited): the guest broke a rule, that is the verdict, not the lab error
                found = self._final_rules(tl, it_dir)
                if any(v.rule.startswith("kernel.") or v.rule == "bugcheck" for v in found):
                    self.run.log(f"iteration {key}: the lab error ({error}) followed a guest "
                                 "failure; judged by the rules")
                    violations += found
                    status = Status.FAILED
        self._keep_logs(it_dir)
        # a guest that oopsed, or a dead QEMU, is not reused for the next iteration
        m = self.machine
        if m is not None:
            broken = (m.process is None or not m.process.alive()
                      or any(v.rule.startswith("kernel") or v.rule == "bugcheck"
                             for v in violations))
            if broken or status == Status.ERROR:
                self.run.log(f"iteration {key}: restarting the guest "
                             f"({'broken' if broken else 'after a lab error'})")
                self._stop_machine()
            elif status != Status.INTERRUPTED:
                try:
                    self._reset(m)
                except LabError as exc:
                    self.run.log(f"reset failed ({exc}); restarting the guest")
                    self._stop_machine()
        return IterationResult(index=it.index, parameters=it.parameters, seed=it.seed,
                               status=status, violations=tuple(violations),
                               timings=tuple(st.timings) if st else (), artifacts=artifacts,
                               error=error, stopped_at=stopped_at if status != Status.PASSED
                               else None, attempt=attempt,
                               measurements=self._audio_measurements(st, it_dir, artifacts))

    def _cause(self, exc: LabError) -> str:
        """The error as the user should read it: when QEMU is gone, that is the cause
        (an SSH drop or a broken pipe is only how the lab noticed)."""
        m = self.machine
        proc = m.process if m is not None else None
        if proc is not None and not proc.alive():
            rc = proc.returncode()
            return (f"QEMU exited (status {rc}) during this step; the lab saw: {exc}"
                    if rc is not None else f"QEMU exited during this step; the lab saw: {exc}")
        return str(exc)

    def _audio_measurements(self, st: IterationState | None, it_dir: Path,
                            artifacts: dict[str, str]) -> dict[str, float]:
        """What the host heard in this iteration, as numbers for the reports (and the
        analysis in iterations/K/audio.json)."""
        if st is None or st.obs.audio is None:
            return {}
        audio = st.obs.audio
        s = audio.summary
        (it_dir / "audio.json").write_text(json.dumps(
            {"capture": str(st.obs.m.audio_path) if st.obs.m.audio_path else None,
             "summary": s.to_json()}, indent=2, default=str) + "\n", encoding="utf-8")
        artifacts["audio"] = f"{artifacts['dir']}/audio.json"
        out = {"audio_streams": float(s.streams), "audio_longest_gap_ms": s.longest_gap_ms,
               "audio_discontinuities": float(s.discontinuities)}
        if s.outages_ms:
            out["audio_outage_ms"] = s.longest_outage_ms
        return out

    def _final_rules(self, tl: Timeline, it_dir: Path | None = None) -> list[Violation]:
        default = GUEST_RULES_LINUX if self.guest.os == "linux" else GUEST_RULES_WINDOWS
        ids = list(self.scenario.rules) if self.scenario.rules else list(default)
        ctx = self._context(tl)
        if it_dir is not None:
            # the selection and context beside the timeline: `rebalab inspect RUN_DIR`
            # re-checks the iteration from these two files alone
            (it_dir / RULES_FILE).write_text(json.dumps(
                {"rules": ids, "context": ctx.recorded()}, indent=2, sort_keys=True) + "\n",
                encoding="utf-8")
        return check_all(tl, ctx, ids)

    def _context(self, tl: Timeline) -> RuleContext:
        devices = tuple(DeviceId(qom=d.id) for d in self.topology.devices)
        extra = {e.device.qom for e in tl.select(kinds=Kind.HOTPLUG_REQUEST)
                 if e.device and e.device.qom}
        devices += tuple(DeviceId(qom=q) for q in sorted(extra)
                         if not any(d.qom == q for d in devices))
        drivers: dict[str, str] = {}
        for e in tl.select(kinds=Kind.HOTPLUG_REQUEST):
            drv = (e.data.get("payload") or {}).get("driver")
            if drv and e.device and e.device.qom:
                from vdevice.catalog import MODELS
                model = MODELS.get(drv)
                if model and model.linux_driver:
                    drivers[model.linux_driver] = e.device.qom
        # cold devices were bound by the guest at boot, before any tracing began: their
        # first remove in an iteration is no remove without probe
        cold = frozenset(d.id for d in self.topology.devices if d.placement == Placement.COLD)
        return RuleContext.from_timeline(tl, devices=devices, drivers=drivers,
                                         limits=Limits.from_mapping(self.scenario.limits),
                                         bound_at_start=cold)

    def _keep_logs(self, it_dir: Path) -> None:
        m = self.machine
        if m is None:
            return
        for name in ("console.log", "guest-trace.txt"):
            src = m.artifacts / name
            if src.exists():
                try:
                    (it_dir / "vm").mkdir(exist_ok=True)
                    rel = Path("..") / ".." / ".." / m.artifacts.name / name
                    link = it_dir / "vm" / name
                    if not link.exists():
                        link.symlink_to(rel)
                except OSError:
                    pass

    def _end_jobs(self, st: IterationState) -> None:
        m = self.machine
        if st.players and m is not None and m.agent is not None:
            # the window of audio the iteration is judged on ends here: the lab's own stop
            # of the player is no outage
            st.obs.audio_end_ns = time.time_ns()
            try:
                m.agent.run(self.guest.audio_player().stop_command(sorted(st.players)),
                            timeout=10.0)
            except LabError as exc:
                self.run.log(f"stopping the audio player(s) failed: {exc}")
        for job in st.jobs.values():
            try:
                job.chan.close()
            except Exception:
                pass
        for w in st.watchers:
            w.join(timeout=DEFAULT_WAIT_S + 10)

    # ---- steps ---------------------------------------------------------------------------
    def _run_step(self, m: Machine, st: IterationState, step: Step) -> None:
        t0 = time.time_ns()
        prev = st.step_started_ns or st.started_ns
        st.step_started_ns = t0
        ok = True
        detail = ""
        try:
            detail = self._dispatch(m, st, step, since_ns=prev) or ""
        except BaseException as exc:
            ok = False
            detail = str(exc)[:300]
            raise
        finally:
            with st.lock:
                st.timings.append(StepTiming(_label_step(step), t0, time.time_ns() - t0, ok,
                                             detail))

    def _dispatch(self, m: Machine, st: IterationState, step: Step, *, since_ns: int) -> str | None:
        if isinstance(step, Plug):
            return self._plug(m, st, step)
        if isinstance(step, Unplug):
            return self._unplug(m, st, step)
        if isinstance(step, RebalanceRescan):
            return rb.rescan(m, step.device, remove=step.remove).summary()
        if isinstance(step, RebalancePressure):
            placement = step.placement or "sibling"
            if placement == "same-port":
                placement = "sibling"
            return rb.pressure(m, step.device, size=None if step.size == "auto" else int(step.size),
                               placement=placement, model=step.model,
                               pressure_id=step.id or "press0").summary()
        if isinstance(step, RebalanceCpuHotplug):
            out = []
            for _ in range(step.count):
                out.append(rb.cpu_hotplug(m, step.device).summary())
            return "; ".join(out)
        if isinstance(step, RebalanceReconfigure):
            return rb.reconfigure(m, step.device, model=step.model,
                                  props={k: str(v) for k, v in step.props.items()}).summary()
        if isinstance(step, RebalanceResize):
            rb.resize(m, step.device)
            return None
        if isinstance(step, Guest):
            return self._guest(m, st, step)
        if isinstance(step, Module):
            return kmod.apply(m, kmod.ModuleRequest(step.name, step.param_text(),
                                                    reload=step.reload, unload=step.unload))
        if isinstance(step, Sleep):
            time.sleep(step.duration.seconds)
            return None
        if isinstance(step, Jitter):
            delay = step.delay.seconds if step.delay is not None else 0.0
            time.sleep(delay)
            return f"{delay * 1e3:.1f} ms"
        if isinstance(step, Pause):
            assert m.qmp is not None
            m.qmp.execute("stop")
            return None
        if isinstance(step, Resume):
            assert m.qmp is not None
            m.qmp.execute("cont")
            return None
        if isinstance(step, WaitEvent):
            return self._wait_event(m, st, step, since_ns)
        if isinstance(step, WaitQmp):
            return self._wait_qmp(m, step, since_ns)
        if isinstance(step, WaitGuest):
            return self._wait_guest(m, step)
        if isinstance(step, WaitJob):
            return self._wait_job(m, st, step)
        if isinstance(step, WaitPcm):
            return self._wait_pcm(m, step)
        if isinstance(step, Play):
            return self._play(m, st, step)
        if isinstance(step, (AssertRule, AssertNoKind, AssertCount, AssertAudio)):
            return self._assert(m, st, step)
        if isinstance(step, Parallel):
            return self._parallel(m, st, step)
        raise LabError(f"{step.where}: the runner has no implementation for "
                       f"{type(step).__name__}")

    # plug / unplug: return once QEMU accepted; a watcher records the outcome
    def _background(self, st: IterationState, name: str, fn: Callable[[Callable[[], None]], Any]
                    ) -> None:
        accepted = threading.Event()
        failure: list[BaseException] = []

        def body() -> None:
            try:
                fn(accepted.set)
            except BaseException as exc:  # recorded; a wait on the outcome reports it
                failure.append(exc)
                with st.lock:
                    st.watcher_errors.append(f"{name}: {exc}")
                self.run.log(f"{name}: {exc}")
            finally:
                accepted.set()

        th = threading.Thread(target=body, name=name, daemon=True)
        th.start()
        st.watchers.append(th)
        accepted.wait(DEFAULT_WAIT_S + 10)
        if failure and not th.is_alive():
            exc = failure[0]
            if isinstance(exc, (QemuError, LabError)) and not isinstance(exc, DeadlineExceeded):
                raise exc

    def _plug(self, m: Machine, st: IterationState, step: Plug) -> str:
        base = next((d for d in self.topology.devices if d.id == step.device), None)
        model = step.model or (base.model if base else None)
        port = step.port or (base.port if base else None)
        if model is None or port is None:
            raise LabError(f"{step.where}: plug {step.device} needs a model and a port")
        dev = Device(step.device, model, port, Placement.HOT,
                     {k: str(v) for k, v in step.props.items()}, None,
                     int(step.size) if step.size is not None else (base.size if base else None))
        self._background(st, f"plug {dev.id}",
                         lambda ack: ops.plug(m, dev, on_requested=ack))
        return f"{model} into {port}"

    def _unplug(self, m: Machine, st: IterationState, step: Unplug) -> str:
        self._background(st, f"unplug {step.device}",
                         lambda ack: ops.unplug(m, step.device, on_requested=ack))
        return step.device

    def _guest(self, m: Machine, st: IterationState, step: Guest) -> str:
        assert m.agent is not None
        command = step.run if step.run is not None else m.agent.shell.join(step.argv or ())
        if step.background:
            name = step.name or f"job{len(st.jobs) + 1}"
            chan = m.agent.open(command)
            st.jobs[name] = Job(name, command, chan, step.check, time.time_ns())
            return f"started {name}"
        timeout = step.timeout.seconds if step.timeout else 60.0
        r = m.agent.run(command, timeout=timeout)
        (st.dir / "guest-commands.log").open("a").write(
            f"$ {command}\n[exit {r.exit_status}]\n{r.stdout}{r.stderr}\n")
        if step.check and not r.ok:
            # a named check gets its own signature (guest.command@guest/<name>)
            v = self._violation(st, "guest.command", "guest", step,
                                f"`{command}` exited with {r.exit_status}: "
                                f"{(r.stderr or r.stdout).strip()[-200:]}")
            raise StepFailed(replace(v, phase=step.name) if step.name else v)
        return f"exit {r.exit_status}"

    # ---- audio: play the lab's signal, wait for the PCM -----------------------------------
    def _bdf(self, m: Machine, dev: str) -> str | None:
        try:
            return ops.device_bdf_from_qemu(m, dev) if m.qmp is not None else None
        except LabError:
            return None

    def _signal(self, m: Machine, step: Play) -> str:
        """The signal file in the guest: written and copied once per VM and variant."""
        from lab.audio_player import signal_name, write_signal_file

        assert m.agent is not None and m.private is not None
        player = self.guest.audio_player()
        name = signal_name(step.seconds.seconds, step.fault, step.fault_at.seconds)
        key = (id(m), name)
        if key not in self._signals:
            local = m.private / name
            write_signal_file(local, step.seconds.seconds, step.fault, step.fault_at.seconds)
            m.agent.run(player.prepare_command(), timeout=20.0).check()
            remote = player.signal_path(name)
            m.agent.put(local, remote)
            local.unlink(missing_ok=True)
            self._signals[key] = remote
        return self._signals[key]

    def _play(self, m: Machine, st: IterationState, step: Play) -> str:
        assert m.agent is not None
        if m.audio_path is None:
            raise LabError(f"{step.where}: play needs the machine to capture audio")
        signal = self._signal(m, step)
        bdf = self._bdf(m, step.device)
        command = self.guest.audio_player().play_command(step.name, signal, bdf)
        old = st.jobs.pop(step.name, None)
        if old is not None:
            try:
                old.chan.close()
            except Exception:      # noqa: BLE001 - the old player's channel may be gone
                pass
        if st.obs.audio_device is None:
            st.obs.audio_device = DeviceId(qom=step.device, bdf=bdf)
        st.jobs[step.name] = Job(step.name, command, m.agent.open(command), False, time.time_ns())
        st.players.add(step.name)
        return f"{'restarted' if old else 'started'} {step.name} on {bdf or step.device}"

    def _wait_pcm(self, m: Machine, step: WaitPcm) -> str:
        """Poll until the device's playback PCM is there (what an audio service waits
        for before reopening its stream)."""
        assert m.agent is not None
        timeout = step.timeout.seconds if step.timeout else DEFAULT_WAIT_S
        end = time.monotonic() + timeout
        while True:
            bdf = self._bdf(m, step.pcm)
            cmd = self.guest.audio_player().pcm_ready_command(bdf)
            r = m.agent.run(cmd, timeout=max(1.0, min(10.0, end - time.monotonic())))
            if r.ok:
                return f"{step.pcm} PCM ready"
            if time.monotonic() >= end:
                raise StepFailed(Violation("wait.timeout", step.pcm, "wait",
                                           f"{step.where}: the PCM of {step.pcm} did not "
                                           f"appear within {timeout:.1f}s"))
            time.sleep(0.05)

    def _wait_job(self, m: Machine, st: IterationState, step: WaitJob) -> str:
        assert m.agent is not None
        job = st.jobs.get(step.job)
        if job is None:
            raise LabError(f"{step.where}: no background job named {step.job!r}")
        timeout = step.timeout.seconds if step.timeout else 60.0
        try:
            r = m.agent.collect(job.chan, job.command, timeout)
        except DeadlineExceeded:
            raise StepFailed(self._violation(st, "wait.timeout", "guest", step,
                                             f"job {job.name} still running after {timeout:.1f}s"))
        (st.dir / "guest-commands.log").open("a").write(
            f"$ {job.command} &\n[exit {r.exit_status}]\n{r.stdout}{r.stderr}\n")
        if job.check and not r.ok:
            raise StepFailed(self._violation(st, "guest.command", "guest", step,
                                             f"job {job.name} exited with {r.exit_status}: "
                                             f"{(r.stderr or r.stdout).strip()[-200:]}"))
        return f"{job.name} exit {r.exit_status}"

    def _live_events(self, m: Machine, st: IterationState) -> list[Event]:
        from lab.tracers.kernel_log import events_from_console

        host = [e for e in self.run.events if e.t_host_ns >= st.started_ns]
        guest = st.obs.tracer.snapshot() if st.obs.tracer else []
        lines = [(ln.t_host_ns, ln.text) for ln in (m.console.lines(st.obs._console_cursor)
                                                     if m.console else [])]
        return host + guest + events_from_console(lines)

    def _device_id(self, m: Machine, dev: str | None) -> DeviceId | None:
        if dev is None:
            return None
        bdf = None
        try:
            bdf = ops.device_bdf_from_qemu(m, dev) if m.qmp is not None else None
        except LabError:
            pass
        return DeviceId(qom=dev, bdf=bdf)

    def _wait_event(self, m: Machine, st: IterationState, step: WaitEvent, since_ns: int) -> str:
        kind = Kind(step.event)
        timeout = step.timeout.seconds if step.timeout else DEFAULT_WAIT_S
        end = time.monotonic() + timeout
        bdfs: set[str] = set()
        while True:
            devid = self._device_id(m, step.device) if step.device else None
            if devid and devid.bdf:
                bdfs.add(devid.bdf)
            for ev in self._live_events(m, st):
                if ev.t_host_ns < since_ns:
                    continue
                if step.source and ev.source.value != step.source:
                    continue
                if not self._kind_matches(ev, kind):
                    continue
                if not step.matches_text(str(ev.data.get("text", ""))):
                    continue
                if step.device and not (ev.device and (ev.device.qom == step.device or
                                                       (ev.device.bdf in bdfs))):
                    continue
                return f"{kind.value} after {(ev.t_host_ns - since_ns) / 1e6:.1f} ms"
            if time.monotonic() > end:
                errs = "; ".join(st.watcher_errors[-2:])
                raise StepFailed(self._violation(
                    st, "wait.timeout", step.device or "guest", step,
                    f"no {kind.value} event" + (f" for {step.device}" if step.device else "")
                    + f" within {timeout:.1f}s" + (f" ({errs})" if errs else "")))
            time.sleep(0.01)

    @staticmethod
    def _kind_matches(ev: Event, kind: Kind) -> bool:
        if ev.kind == kind:
            return True
        # a bind uevent is the guest's own word that a driver is bound
        return kind == Kind.BOUND and ev.kind == Kind.UEVENT and ev.data.get("action") == "bind"

    def _wait_qmp(self, m: Machine, step: WaitQmp, since_ns: int) -> str:
        assert m.qmp is not None
        timeout = step.timeout.seconds if step.timeout else DEFAULT_WAIT_S
        cursor = 0
        for i, ev in enumerate(m.qmp.events()):
            if ev.get("t_host_ns", 0) < since_ns:
                cursor = i + 1
        ev = m.qmp.wait_event(step.qmp, after=cursor, timeout=timeout,
                              match=(lambda e: (e.get("data") or {}).get("device") == step.device)
                              if step.device else None)
        return f"{step.qmp} at {ev.get('t_host_ns')}"

    def _wait_guest(self, m: Machine, step: WaitGuest) -> str:
        assert m.agent is not None
        cmd = step.guest if isinstance(step.guest, str) else m.agent.shell.join(step.guest)
        timeout = step.timeout.seconds if step.timeout else DEFAULT_WAIT_S
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            last = m.agent.run(cmd, timeout=max(1.0, end - time.monotonic()))
            if last.ok:
                return "ok"
            time.sleep(step.interval.seconds)
        raise StepFailed(Violation("wait.timeout", "guest", "wait",
                                   f"{step.where}: `{cmd}` did not succeed within {timeout:.1f}s"
                                   + (f" (last exit {last.exit_status})" if last else "")))

    def _assert(self, m: Machine, st: IterationState, step: Any) -> str:
        tl = st.obs.snapshot()
        if isinstance(step, AssertRule):
            ctx = self._context(tl)
            found = check_all(tl, ctx, [step.rule])
            if step.device:
                found = [v for v in found if v.device == step.device]
            if found:
                st.violations.extend(found[1:])
                raise StepFailed(found[0])
            return f"{step.rule}: ok"
        if isinstance(step, AssertNoKind):
            bad = [e for e in tl.select(kinds=Kind(step.no_kind))
                   if step.device is None or device_matches(e.device, step.device)]
            if bad:
                text = bad[0].data.get("text", "")
                raise StepFailed(Violation(
                    "assert.no-kind", step.device or "guest", "assert",
                    f"{step.where}: {len(bad)} {Kind(step.no_kind).value} event(s), first: {text}"[:400],
                    events=tuple(EventRef(e.seq, e.t_host_ns, e.kind.value, e.source.value)
                                 for e in bad[:5])))
            return "none"
        if isinstance(step, AssertCount):
            c = step.count
            evs = [e for e in tl.select(kinds=Kind(c.kind))
                   if (c.device is None or device_matches(e.device, c.device))
                   and (c.source is None or e.source.value == c.source)]
            n = len(evs)
            ok = ((c.eq is None or n == c.eq) and (c.min is None or n >= c.min)
                  and (c.max is None or n <= c.max))
            if not ok:
                raise StepFailed(Violation("assert.count", c.device or "guest", "assert",
                                           f"{step.where}: {n} {Kind(c.kind).value} event(s); expected "
                                           f"eq={c.eq} min={c.min} max={c.max}"))
            return f"{n} {Kind(c.kind).value}"
        if isinstance(step, AssertAudio):
            return self._assert_audio(m, st, step)
        raise LabError(f"{step.where}: unknown assert")

    def _assert_audio(self, m: Machine, st: IterationState, step: AssertAudio) -> str:
        """The iteration's audio so far (its own capture window, not the VM's whole
        file): gaps, discontinuities, outages and whether the stream is back."""
        if m.audio_path is None or not m.audio_path.exists():
            raise LabError(f"{step.where}: audio assert needs audio capture (the codec's "
                           "-audiodev wav); none was recorded")
        got = st.obs.audio_analysis()
        if got is None:
            raise LabError(f"{step.where}: audio assert needs a `play` step before it")
        summ = got.summary
        gap_ms, disc = summ.longest_gap_ms, summ.discontinuities
        outage = summ.longest_outage_ms
        chk = step.audio
        dev = st.obs.audio_device.label() if st.obs.audio_device else "audio"
        if chk.max_gap is not None and gap_ms > chk.max_gap.ms:
            raise StepFailed(Violation("assert.audio", dev, "assert",
                                       f"{step.where}: longest gap {gap_ms:.1f} ms > "
                                       f"{chk.max_gap.ms:.1f} ms"))
        if chk.max_discontinuities is not None and disc > chk.max_discontinuities:
            raise StepFailed(Violation("assert.audio", dev, "assert",
                                       f"{step.where}: {disc} discontinuities > "
                                       f"{chk.max_discontinuities}"))
        if chk.max_outage is not None:
            if not summ.resumed:
                raise StepFailed(Violation("assert.audio", dev, "assert",
                                           f"{step.where}: the stream stopped and is not "
                                           "playing again"))
            if outage > chk.max_outage.ms:
                raise StepFailed(Violation("assert.audio", dev, "assert",
                                           f"{step.where}: outage {outage:.1f} ms > "
                                           f"{chk.max_outage.ms:.1f} ms"))
        return (f"{summ.streams} stream(s), outage {outage:.1f} ms, longest gap "
                f"{gap_ms:.1f} ms, {disc} discontinuities")

    def _parallel(self, m: Machine, st: IterationState, step: Parallel) -> str:
        errors: list[BaseException] = []

        def branch(steps: Sequence[Step]) -> None:
            try:
                for s in steps:
                    self._run_step(m, st, s)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=branch, args=(b.steps,), name=f"branch-{b.name}",
                                    daemon=True) for b in step.branches]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        failed = [e for e in errors if isinstance(e, StepFailed)]
        if failed:
            st.violations.extend(f.violation for f in failed[1:])
            raise failed[0]
        if errors:
            raise errors[0]
        return f"{len(threads)} branches"

    def _violation(self, st: IterationState, rule: str, device: str, step: Any,
                   message: str) -> Violation:
        return Violation(rule, device, "step", f"{step.where}: {message}")


def _walk(steps: Iterable[Step]) -> Iterable[Step]:
    for s in steps:
        yield s
        if isinstance(s, Parallel):
            for b in s.branches:
                yield from _walk(b.steps)


def _version() -> str:
    from lab import __version__
    return __version__


# ---- topology resolution for scenarios ------------------------------------------------------

def resolve_topology(ref: Any, located: Any) -> Topology:
    """The resolver the scenario validator calls: preset names, files, inline mappings,
    all checked against the installed QEMU."""
    from lab import qemu_caps
    from vdevice import topology_yaml
    from lab.inputs import read_text
    from vdevice.yamlsrc import load

    inv = None
    try:
        inv = qemu_caps.probe()
    except LabError:
        pass
    if isinstance(ref, Path):
        loc = load(read_text(ref, "topology file"), str(ref))
        return topology_yaml.check(topology_yaml.from_located(loc), loc, inv)
    return topology_yaml.check(topology_yaml.from_located(located.with_data(ref)
                                                          if not isinstance(ref, str) else
                                                          located.with_data(ref)), located, inv)


def load_scenario(path: Path) -> Scenario:
    from lab.scenario import validate_file
    return validate_file(path, resolve_topology)


def copy_tree_note(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)
