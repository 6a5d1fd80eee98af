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

import contextlib
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lab import operations as ops
from lab import snapshot
from lab.guest.audio_player import AudioPlayer
from lab.errors import (ArtifactsLost, ConnectionLost, DeadlineExceeded, Interrupted, LabError,
                        QemuError, is_disk_full)
from lab.events import DeviceId, Event, Kind, Source
from lab.guest import GuestOs, for_scenario
from lab.image import GuestImage
from lab.machine import Machine
from lab.observe import Observation
from lab.record_run import Recorder
from lab.results import (IterationResult, Status, StepTiming, Violation,
                         result_key)
from lab.rules import check_all
from lab.rules.base import Limits, RuleContext
from lab.rundir import RunDir
from lab.scenario.overrides import Overrides
from lab.scenario import Guest, Iteration, Scenario, Step
from lab.steps.base import DEFAULT_WAIT_S, Job, StepFailed
from lab.timeline import Timeline
from vdevice.topology import Device, HotplugMode, Placement, Topology

#: how long a lost connection waits for QEMU's exit to become visible before the lab
#: calls it an SSH drop (``_cause``)
CAUSE_GRACE_S = 1.0
#: per iteration: the rules the run applied and their context (see lab.inspect)
RULES_FILE = "rules.json"


class _Lost(Exception):
    """A full disk during an iteration: its error result, and the run-ending cause."""

    def __init__(self, result: IterationResult, cause: ArtifactsLost) -> None:
        super().__init__(str(cause))
        self.result = result
        self.cause = cause


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
                 every_attempt: bool = False, record: str | None = None,
                 shard: dict[str, Any] | None = None, jobs: int = 1,
                 guest: GuestOs | None = None) -> None:
        # --shard K/N (lab.shard): which part of the sweep this run is, for merge
        self.shard = shard
        # what the CLI changed (already applied to ``scenario``): recorded for replay
        self.overrides = overrides or Overrides()
        # ``guest``: a prepared boot strategy (tests: lab.guest.windows.simulated); it must be
        # of the OS the scenario was validated for, whose steps and rules it gets
        if guest is not None and guest.os != scenario.guest.os:
            raise LabError(f"the scenario is for a {scenario.guest.os} guest; the guest given "
                           f"to the runner is {guest.os}")
        self.guest = guest if guest is not None else self._guest_boot(scenario, image, accel)
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
            s.needs_audio for k in self.indices[:1]
            for s in _walk(self.sweep.iteration(k).steps))
        self._signals: dict[tuple[int, str], str] = {}   # (machine, file) -> guest path
        self.started_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.machine_count = 0
        self._bounds: dict[int | str, int] = {}
        # --record / `record:` (lab.record_run): a fresh recorded VM per iteration
        mode = record or scenario.record
        self.recorder: Recorder | None = Recorder(mode, self.run) if mode else None
        #: reports execute() could not write (a full disk): the CLI names them
        self.unwritten: list[str] = []
        # reset: snapshot (lab.snapshot): the point every iteration after the first
        # starts from, kept in a private directory of its own
        self.restore_point: snapshot.RestorePoint | None = None
        self._snapshot_dir: Path | None = None
        self._snapshot_vm: str | None = None
        if scenario.reset == "snapshot":
            self._check_snapshot_reset()
        # --jobs N (lab.parallel): VMs at once; each worker names its VMs jobJ-vmK
        self.jobs = jobs
        self.vm_prefix = "vm"
        if jobs > 1 and self.recorder is not None:
            raise LabError("--jobs and --record do not go together yet: each recorded "
                           "iteration boots its own VM already; run --jobs 1")

    # ---- the run -----------------------------------------------------------------------
    def execute(self) -> Any:
        """Run the iterations; always write the reports. Returns the Summary."""
        from lab.report import RunInfo, write_junit, write_report
        from lab.report.summary import build_summary, save_summary

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
            "topology": self.topology.to_json(), "started_at": self.started_at,
            "record": self.recorder.mode if self.recorder else None,
            "shard": self.shard})
        run_status: Status | None = None
        stopped_at: str | None = None
        error: str | None = None
        done: set[int] = set()
        try:
            if self.jobs > 1:
                from lab.parallel import run_parallel
                stopped_at = run_parallel(self, self._schedule(), self.jobs, done)
            for k, attempt in (self._schedule() if self.jobs == 1 else ()):
                result = self._run_item(k, attempt)
                done.add(k)
                self.results.append(result)
                why = self._stop_reason(result, attempt)
                if why:
                    stopped_at = why
                    if self.console is not None and attempt is not None:
                        self.console.note(f"#{k}: {why}")
                    break
        except _Lost as lost:
            self.results.append(lost.result)
            done.add(lost.result.index)
            run_status, error = Status.ERROR, str(lost.cause)
            stopped_at = f"lab error: {lost.cause}"
        except (KeyboardInterrupt, Interrupted) as exc:
            run_status, stopped_at = Status.INTERRUPTED, f"interrupted: {exc or 'Ctrl-C'}"
        except LabError as exc:
            run_status, error = Status.ERROR, str(exc)
            stopped_at = f"lab error: {exc}"
        finally:
            self._stop_machine()
            self._drop_snapshot()
            rest = [k for k in self.indices if k not in done]
            for k in rest:
                self.results.extend(r for r in self.sweep.skipped(k, stopped_at or "not run")
                                    if r.index == k)
            self.results.sort(key=lambda r: r.index)
            if run.write_failures and run_status is None:
                # events the rules may have needed were not kept: no verdict stands on them
                run_status = Status.ERROR
                error = (f"{run.write_failures} line(s) of lab.log/events.jsonl could not be "
                         "written (disk full?)")
                stopped_at = stopped_at or f"lab error: {error}"
            acc = self._accel_name()
            known = list(self._bounds.values())
            info = RunInfo(
                scenario=self.scenario.name, accelerator=acc,
                versions={"rebalab": _version(), "qemu": self._qemu_version(),
                          **self.guest.versions()},
                topology=self.topology.to_json(), seed=self.scenario.seed,
                started_at=self.started_at,
                ended_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                status=run_status, stopped_at=stopped_at, error=error, guest=self.guest.os,
                guest_image_sha256=self.guest.image_hash(),
                alignment_bound_ns=max(known) if known else None,
                parameters=self.scenario.to_json().get("parameters", {}),
                scenario_file=self.scenario.file, shard=self.shard)
            summary = build_summary(info, self.results)
            self.unwritten = []
            writers: tuple[tuple[str, Callable[[], object]], ...] = (
                ("summary.json", lambda: save_summary(run.path, summary)),
                ("junit.xml", lambda: write_junit(run.path, summary)),
                ("report.html", lambda: write_report(run.path, summary)))
            for name, write in writers:
                try:
                    write()
                except OSError as exc:
                    # the terminal still gets the results (the CLI prints them and names
                    # what is missing); the run log says why
                    self.unwritten.append(name)
                    run.log(f"{name} could not be written: {exc.strerror or exc!r}")
                except Exception as exc:  # a report problem must not hide the run's result
                    if name != "report.html":
                        raise
                    run.log(f"report.html could not be written: {exc!r}")
            if run.write_failures:
                self.unwritten.append(f"{run.write_failures} line(s) of lab.log/events.jsonl")
            run.close()
        return summary

    # ---- the guest ---------------------------------------------------------------------
    @staticmethod
    def _guest_boot(scenario: Scenario, image: GuestImage | None, accel: str | None) -> GuestOs:
        """The scenario's guest, checked before any run directory or VM exists
        (``lab.guest.for_scenario``: a guest that cannot run on this host, or a step its
        agent cannot do, is refused here, so nothing half-runs)."""
        sweep = scenario.sweep()
        # step types do not vary with parameter values: iteration 0 shows them all
        steps = list(_walk(sweep.iteration(0).steps)) if len(sweep) else []
        return for_scenario(scenario.guest, steps, image=image, accel=accel)

    def _accel_name(self) -> str:
        return getattr(getattr(self, "_accel", None), "name", None) or "unknown"

    def _qemu_version(self) -> str:
        try:
            from lab import qemu_caps
            return qemu_caps.probe().version_str
        except LabError:
            return "?"

    # ---- machines ------------------------------------------------------------------------
    def _ensure_machine(self, setup_key: str = "") -> Machine:
        """The VM for the next iteration: the one running, else (snapshot reset) one
        restored from the point when it holds this iteration's setup, else a new boot."""
        m = self.machine
        if m is not None and m.process is not None and m.process.alive():
            return m
        self._stop_machine()
        point = self.restore_point
        if point is not None and point.key != setup_key:
            self.run.log(f"this iteration's steps before the restore point {point.name!r} "
                         f"differ from the point's (a swept parameter): a new VM runs them "
                         f"and takes a new point")
        elif point is not None:
            # the same artifacts directory as the VM that took the point: its logs go on;
            # the devices plugged before the point are on its command line
            m = Machine(point.topology or self.topology, self.run, guest=self.guest,
                        accel=self.accel, subdir=self._snapshot_vm, audio_capture=self.audio,
                        restore=point)
            self.machine = m
            m.start()
            self.run.log(f"VM restored from the snapshot in {m.timings.get('restore_s', 0):.2f} s "
                         f"(agent {m.timings.get('launch_to_agent_s', 0):.2f} s after launch)")
            return m
        self.machine_count += 1
        vm = f"{self.vm_prefix}{self.machine_count}"
        m = Machine(self.topology, self.run, guest=self.guest, accel=self.accel,  # type: ignore[arg-type]
                    subdir=vm, audio_capture=self.audio,
                    record=self.recorder.spec(self.run.path / vm) if self.recorder else None)
        # under snapshot reset the booted VM is discarded after its first iteration too
        m.disposable = self.scenario.reset == "snapshot"
        self.machine = m
        m.start()
        self._accel = m.accel
        self.run.log(f"VM {self.machine_count} ready ({m.accel.name if m.accel else '?'})")
        return m

    def _run_item(self, k: int, attempt: int | None,
                  lock: threading.Lock | None = None) -> IterationResult:
        """One scheduled iteration on this runner's VM, with the console told. A full
        disk ends the run: ``_Lost`` carries the iteration's error result."""
        it = self.sweep.iteration(k)
        if self.console is not None:
            with lock or contextlib.nullcontext():
                self.console.start(k, it.parameters, attempt)
        try:
            result = self._iteration(it, attempt)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            key = result_key(k, attempt)
            lost = ArtifactsLost(f"iteration {key}'s artifacts", str(self.run.path), exc)
            raise _Lost(IterationResult(
                index=k, parameters=it.parameters, seed=it.seed, status=Status.ERROR,
                error=str(lost), stopped_at="writing the iteration's artifacts",
                attempt=attempt, artifacts={"dir": f"iterations/{key}"}), lost) from exc
        if self.console is not None:
            with lock or contextlib.nullcontext():
                self.console.finish(result)
        return result

    def _stop_reason(self, result: IterationResult, attempt: int | None) -> str | None:
        """Why the run stops after this result (``until``, a replay that reproduced)."""
        why = self.sweep.should_stop(self.results)
        if (why is None and attempt is not None and not self.every_attempt
                and result.status == Status.FAILED):
            why = f"reproduced at attempt {attempt} of {self.attempts}"
        return why

    def _drop_snapshot(self) -> None:
        if self._snapshot_dir is not None:
            shutil.rmtree(self._snapshot_dir, ignore_errors=True)
            self._snapshot_dir = None

    def _check_snapshot_reset(self) -> None:
        """``reset: snapshot`` is refused, with the reason, where it is not verified."""
        why = self.guest.snapshot_refusal()
        if why is not None:
            raise LabError(why)
        if self.recorder is not None:
            raise LabError("reset: snapshot and --record do not go together: a recording "
                           "starts at boot, a restored VM did not boot")
        from lab import qemu_caps
        why = snapshot.unmigratable(self._point_devices(), qemu_caps.probe(qemu_caps.find_binary()))
        if why is not None:
            raise LabError(why)

    def _point_devices(self) -> list[snapshot.PointDevice]:
        """The devices present at the restore point of any of this run's iterations:
        the topology's cold ones and those its setup (the steps before ``snapshot:``)
        plugs and does not unplug."""
        from lab.steps.plug import Plug, Unplug
        from vdevice.catalog import get_model
        out = {d.id: snapshot.PointDevice(d.id, d.catalog().driver, "the topology")
               for d in self.topology.devices if d.placement == Placement.COLD}
        seen: set[str] = set()
        for k in self.indices:
            setup, _, _, key = self._split(self.sweep.iteration(k))
            if key in seen:
                continue
            seen.add(key)
            present = dict(out)
            for step in setup:
                if isinstance(step, Plug):
                    declared = next((d for d in self.topology.devices if d.id == step.device), None)
                    model = step.model or (declared.model if declared else None)
                    if model is not None:
                        present[step.device] = snapshot.PointDevice(
                            step.device, get_model(model).driver, step.where)
                elif isinstance(step, Unplug):
                    present.pop(step.device, None)
            out |= present
        return list(out.values())

    def _split(self, it: Iteration) -> tuple[tuple[Step, ...], tuple[Step, ...], str, str]:
        """(setup, body, point name, setup key): under snapshot reset, the steps before a
        ``snapshot:`` step are the VM's setup, run once per VM and saved with the point;
        the key tells setups apart (the same steps with the same values: the same key).
        Elsewhere every step is the iteration's."""
        from lab.steps.restore_point import RestorePointStep
        steps = tuple(it.steps)
        if self.scenario.reset != "snapshot":
            return (), steps, "", ""
        for i, step in enumerate(steps):
            if isinstance(step, RestorePointStep):
                setup = steps[:i]
                text = json.dumps([x.to_yaml() for x in setup], sort_keys=True, default=str)
                return setup, steps[i + 1:], step.name, hashlib.sha256(text.encode()).hexdigest()[:16]
        return (), steps, "", ""

    def _run_setup(self, m: Machine, it: Iteration, setup: Sequence[Step], name: str) -> None:
        """The steps before the restore point, on a VM just booted, in an observation of
        their own (``<vm>/setup-NAME/``), judged by the rules: a point must not hold a
        broken guest. They belong to no iteration: every iteration, the first included,
        starts its timeline at the point."""
        where = m.artifacts / f"setup-{name}"
        where.mkdir(parents=True, exist_ok=True)
        self.run.log(f"setup before the restore point {name!r}: {len(setup)} step(s)")
        obs = Observation(m, name="setup").start()
        st = IterationState(it, obs, where, time.time_ns())
        random.seed(it.seed)
        failure: str | None = None
        try:
            for step in setup:
                try:
                    self._run_step(m, st, step)
                except StepFailed as exc:
                    failure = exc.violation.message
                    break
        finally:
            self._end_jobs(st)
            tl = obs.finish(where / "timeline.jsonl")
        broken = self._final_rules(tl, where)
        if failure is not None or broken:
            why = failure or "; ".join(f"{v.rule}: {v.message}" for v in broken[:3])
            raise LabError(f"the setup before the restore point {name!r} failed ({why}); "
                           f"its timeline is in {where.relative_to(self.run.path)}")

    def _take_restore_point(self, m: Machine, key: str = "", name: str = "") -> None:
        """On a booted VM, when its first iteration's tracing is up (after the setup of a
        ``snapshot:`` step, if any): the state every later iteration starts from. The
        kprobes are armed and the trace relay runs, so a restored iteration does not pay
        to set them up again (the tracer's cache travels with the point). A new point
        (another setup) replaces the last one."""
        if self._snapshot_dir is None:
            self._snapshot_dir = Path(tempfile.mkdtemp(prefix="rebalab-snapshot-"))
            os.chmod(self._snapshot_dir, 0o700)
            # ~100 MB: a lab killed with -9 leaves it, and the next machine that starts
            # reclaims it (lab.machine.reclaim_stale_private_dirs reads this)
            from lab.machine import OWNER_FILE
            (self._snapshot_dir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.restore_point = snapshot.save(m, self._snapshot_dir / "restore-point.vmstate",
                                           key=key, name=name)
        self._snapshot_vm = m.artifacts.name if m.artifacts != self.run.path else None

    def _discard_machine(self) -> None:
        """Stop a VM whose state nobody needs (snapshot reset): no guest clean-up."""
        if self.machine is not None:
            try:
                self.machine.stop(discard=True)
            finally:
                self.machine = None

    def _stop_machine(self) -> None:
        if self.machine is not None:
            try:
                self.machine.stop()
            finally:
                self.machine = None

    def _reset(self, m: Machine, *, failed: bool = False) -> None:
        """Between iterations: ``replug`` unplugs what the iteration left plugged.

        ``reset: none`` leaves the VM as the iteration left it, except after a failed
        iteration: a step that failed halfway (a probe that returned -19) leaves its
        device plugged, and the next iteration's plug of the same id would be a lab
        error charged to an innocent iteration (seen in the soak)."""
        initial = {d.id for d in self.topology.devices if d.placement == Placement.COLD}
        if self.scenario.reset == "none" and failed and m.present - initial:
            left = sorted(m.present - initial)
            self.run.log(f"the failed iteration left {', '.join(left)} plugged; unplugging "
                         "so the next one starts as the others do")
            for dev_id in left:
                ops.unplug(m, dev_id)
            return
        if self.scenario.reset == "reboot":
            self._stop_machine()
            return
        if self.scenario.reset == "snapshot":
            # the next iteration starts from the restore point in a fresh QEMU
            self._discard_machine()
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
            # where a failure before the first step happened: the summary says it
            stopped_at = "starting the guest (or checking it is still up)"
            if self.recorder is not None:
                # one recording per QEMU run, from its first instruction: a fresh VM
                self._stop_machine()
                self.recorder.begin(self.guest)
            setup, body, point_name, setup_key = self._split(it)
            m = self._ensure_machine(setup_key)
            self._forget_history(m)
            if setup and m.restore is None:
                stopped_at = f"the setup before the restore point {point_name!r}"
                self._run_setup(m, it, setup, point_name)
            stopped_at = "starting the iteration's tracing (the guest's agent)"
            obs = Observation(m).start()
            if self.scenario.reset == "snapshot" and m.restore is None:
                stopped_at = "saving the restore point"
                self._take_restore_point(m, setup_key, point_name)
            stopped_at = None
            st = IterationState(it, obs, it_dir, time.time_ns())
            random.seed(it.seed)
            for step in body:
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
                self._end_jobs(st, patient=status in (Status.PASSED, Status.FAILED))
                try:
                    tl = st.obs.finish(it_dir / "timeline.jsonl")
                except Exception as exc:
                    if is_disk_full(exc):
                        raise            # the run stops: see execute()
                    self.run.log(f"iteration {key}: timeline failed: {exc!r}")
                    if status == Status.PASSED:
                        # no timeline, no rules: "passed" would be a verdict nobody checked
                        status = Status.ERROR
                        error = f"the iteration's timeline could not be built: {exc}"
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
        recorded = self.machine      # under --record, its log is kept or dropped below
        # a guest that oopsed, or a dead QEMU, is not reused for the next iteration
        after: Machine | None = self.machine
        if after is not None:
            m = after
            broken = (m.process is None or not m.process.alive()
                      or any(v.rule.startswith("kernel") or v.rule == "bugcheck"
                             for v in violations))
            if broken or status == Status.ERROR:
                self.run.log(f"iteration {key}: restarting the guest "
                             f"({'broken' if broken else 'after a lab error'})")
                if m.disposable and status != Status.ERROR:
                    # snapshot reset: the next VM is the restore point, and what the
                    # ladder's polite rungs would collect from this one (its dmesg, by
                    # SSH, then poweroff: ~0.22 s under TCG) is in the console log the
                    # iteration keeps; the oops recovery is the restore alone. (After a
                    # lab error they run: sshd's log says why a connection went down.)
                    self._discard_machine()
                else:
                    self._stop_machine()
            elif status != Status.INTERRUPTED and self.recorder is None:
                try:
                    self._reset(m, failed=status == Status.FAILED)
                except LabError as exc:
                    self.run.log(f"reset failed ({exc}); restarting the guest")
                    self._stop_machine()
        measurements = self._audio_measurements(st, it_dir, artifacts)
        if self.recorder is not None:
            # the log is complete only once QEMU exited: stop the VM, then keep or drop
            self._stop_machine()
            if recorded is not None:
                recorded.stop()      # already stopped when the guest broke: a no-op
            measurements |= self.recorder.finish(recorded, str(key), status, it_dir)
            if str(key) in self.recorder.kept:
                artifacts["recording"] = f"iterations/{key}/record"
        return IterationResult(index=it.index, parameters=it.parameters, seed=it.seed,
                               status=status, violations=tuple(violations),
                               timings=tuple(st.timings) if st else (), artifacts=artifacts,
                               error=error, stopped_at=stopped_at if status != Status.PASSED
                               else None, attempt=attempt, measurements=measurements)

    def _cause(self, exc: LabError) -> str:
        """The error as the user should read it: when QEMU is gone, that is the cause
        (an SSH drop or a broken pipe is only how the lab noticed)."""
        if str(exc).startswith("QEMU "):
            return str(exc)                  # already says it (_qemu_answered)
        state = _qemu_state(self.machine)
        if state is None and isinstance(exc, ConnectionLost):
            # a killed QEMU's sockets close before its exit status exists: the SSH drop can
            # reach the lab a moment before the process is seen gone
            end = time.monotonic() + CAUSE_GRACE_S
            while state is None and time.monotonic() < end:
                time.sleep(0.02)
                state = _qemu_state(self.machine)
        return f"{state} during this step; the lab saw: {exc}" if state else str(exc)

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
        if s.emulator_drops:
            out["audio_emulator_drops"] = float(s.emulator_drops)
        if s.host_stalls:
            out["audio_host_stalls"] = float(s.host_stalls)
        return out

    def _final_rules(self, tl: Timeline, it_dir: Path | None = None) -> list[Violation]:
        ids = list(self.scenario.rules) if self.scenario.rules else list(self.guest.default_rules)
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
        # the guest's own names the plug waits reported (a PnP instance id, an HDA
        # function devnode's) name the same devices under test
        for e in tl.select(kinds=Kind.BOUND):
            if e.source == Source.HOST_LAB and e.device and e.device.qom:
                for inst in (e.device.instance, e.data.get("function_instance")):
                    if isinstance(inst, str) and inst:
                        devices += (DeviceId(qom=e.device.qom, instance=inst),)
        drivers: dict[str, str] = {}
        for e in tl.select(kinds=Kind.HOTPLUG_REQUEST):
            drv = (e.data.get("payload") or {}).get("driver")
            if drv and e.device and e.device.qom:
                from vdevice.catalog import MODELS
                model = MODELS.get(drv)
                for name in (self.guest.driver_names(model) if model else ()):
                    drivers[name] = e.device.qom
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

    def _forget_history(self, m: Machine) -> None:
        """Earlier iterations' host events, console lines and QMP events leave memory
        (their files keep them): a soak of 500 iterations on one VM grew the lab by
        ~40 KB an iteration when they did not."""
        self.run.forget_events_before(time.time_ns())
        if m.console is not None:
            m.console.forget_before(m.console.cursor())
        if m.qmp is not None:
            m.qmp.forget_before(m.qmp.cursor())

    def _end_jobs(self, st: IterationState, *, patient: bool = True) -> None:
        """End the iteration's background work. ``patient`` (the iteration ran to its
        end): the plug watchers get their deadline to report. Otherwise (interrupted,
        a lab error) the machine is about to be stopped, which ends them; waiting for
        them would hold a Ctrl-C for the watcher's whole deadline (25 s seen)."""
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
            w.join(timeout=DEFAULT_WAIT_S + 10 if patient else 0.2)

    # ---- steps ---------------------------------------------------------------------------
    def _run_step(self, m: Machine, st: IterationState, step: Step) -> None:
        t0 = time.time_ns()
        prev = st.step_started_ns or st.started_ns
        st.step_started_ns = t0
        ok = True
        detail = ""
        # under --record a clock anchor at both ends of each step (clock.estimate_monotone):
        # what the guest logged during the step is then placed inside it. The end of one
        # step is the start of the next, so a start has its own only before the first
        marks = getattr(m, "record", None) is not None
        if marks and not st.timings:
            st.obs.guest.mark()
        try:
            detail = self._dispatch(m, st, step, since_ns=prev) or ""
        except StepFailed as exc:
            ok = False
            detail = str(exc)[:300]
            if exc.violation.rule == "wait.timeout":
                _qemu_answered(m, f"{step.where}: {_label_step(step)}")
            raise
        except BaseException as exc:
            ok = False
            detail = str(exc)[:300]
            raise
        finally:
            with st.lock:
                st.timings.append(StepTiming(_label_step(step), t0, time.time_ns() - t0, ok,
                                             detail))
            if marks:
                st.obs.guest.mark()

    def _dispatch(self, m: Machine, st: IterationState, step: Step, *, since_ns: int) -> str | None:
        """Run one step: the step kind does it (``lab.steps``), with what this runner,
        VM and iteration give it."""
        return step.execute(_StepContext(self, m, st, since_ns))

    # plug / unplug return once QEMU accepted; a watcher records the outcome
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


class _StepContext:
    """What a step's ``execute`` gets (``lab.steps.base.StepContext``): one step on one
    VM, in one iteration of one runner (a parallel worker is a runner of its own)."""

    def __init__(self, runner: ScenarioRunner, m: Machine, st: IterationState,
                 since_ns: int) -> None:
        self._runner = runner
        self._st = st
        self.machine = m
        self.since_ns = since_ns

    @property
    def jobs(self) -> dict[str, Job]:
        return self._st.jobs

    @property
    def players(self) -> set[str]:
        return self._st.players

    @property
    def obs(self) -> Observation:
        return self._st.obs

    @property
    def watcher_errors(self) -> list[str]:
        return self._st.watcher_errors

    def add_violations(self, found: Iterable[Violation]) -> None:
        self._st.violations.extend(found)

    def guest_log(self, text: str) -> None:
        with (self._st.dir / "guest-commands.log").open("a") as f:
            f.write(text)

    def background(self, name: str, fn: Callable[[Callable[[], None]], Any]) -> None:
        self._runner._background(self._st, name, fn)

    def topology_device(self, dev: str) -> Device | None:
        return next((d for d in self._runner.topology.devices if d.id == dev), None)

    def bdf(self, dev: str) -> str | None:
        m = self.machine
        try:
            return ops.device_bdf_from_qemu(m, dev) if m.qmp is not None else None
        except LabError:
            return None

    def device_id(self, dev: str | None) -> DeviceId | None:
        if dev is None:
            return None
        return DeviceId(qom=dev, bdf=self.bdf(dev))

    def live_events(self) -> list[Event]:
        from lab.tracers.kernel_log import events_from_console

        m, st = self.machine, self._st
        host = [e for e in self._runner.run.events if e.t_host_ns >= st.started_ns]
        guest = st.obs.guest.received()
        lines = [(ln.t_host_ns, ln.text) for ln in (m.console.lines(st.obs._console_cursor)
                                                     if m.console else [])]
        return host + guest + events_from_console(lines)

    def audio_player(self) -> AudioPlayer:
        return self._runner.guest.audio_player()

    def once_per_vm(self, key: str, make: Callable[[], str]) -> str:
        cache = self._runner._signals
        k = (id(self.machine), key)
        if k not in cache:
            cache[k] = make()
        return cache[k]

    def rule_context(self, tl: Timeline) -> RuleContext:
        return self._runner._context(tl)

    def qemu_answered(self, what: str) -> None:
        _qemu_answered(self.machine, what)

    def run_step(self, step: Step) -> None:
        self._runner._run_step(self.machine, self._st, step)


def _walk(steps: Iterable[Step]) -> Iterable[Step]:
    for s in steps:
        yield s
        for _, inner in s.substeps():
            yield from _walk(inner)


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


_STOPPED = "QEMU is stopped (SIGSTOP or a debugger: process state T)"


def _qemu_state(m: Machine | None) -> str | None:
    """What is wrong with QEMU itself, if anything: exited, or frozen."""
    proc = m.process if m is not None else None
    if proc is None:
        return None
    if not proc.alive():
        rc = proc.returncode()
        return f"QEMU exited (status {rc})" if rc is not None else "QEMU exited"
    return _STOPPED if proc.suspended() else None


def _qemu_answered(m: Machine, what: str) -> None:
    """A wait that ran out is the guest's fault only if QEMU could answer all along:
    dead or frozen (SIGSTOP, a debugger), the lab names that instead of a violation."""
    state = _qemu_state(m)
    if state is not None:
        raise QemuError(f"{state} during {what}"
                        + ("; nothing in the guest could happen" if state == _STOPPED else ""))
