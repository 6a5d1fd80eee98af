"""``wait``: until something happened (an event, a QMP event, a guest command, a
background job, a PCM). The kind is the one key present (``WAIT_KINDS``)."""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, ClassVar

from pydantic import field_validator

from lab.scenario.units import Duration, Id, KindName, Name, QmpEvent, SourceName, Str
from lab.steps.base import (DEFAULT_WAIT_S, ParseContext, StepBase, StepContext, StepFailed,
                            one_of_keys, step_kind, validate_args)
from vdevice.yamlsrc import Located, YamlPath, unknown

if TYPE_CHECKING:
    from lab.events import Event, Kind
    from lab.scenario.loader import RefChecker, RefState


@step_kind
class WaitBase(StepBase):
    """Waits match what happened since the previous step started, so an event that
    fired during a fast operation is not missed. ``timeout`` defaults to the lab's
    deadline for that kind of wait (``lab.deadline``)."""

    step_type: ClassVar[str] = "wait"

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        kind, args = one_of_keys(located, apath, WAIT_KINDS, "wait")
        return validate_args(WAIT_KINDS[kind], located, apath, args, ctx)


class WaitEvent(WaitBase):
    """Wait for a timeline event of ``event`` kind (optionally for a device/source).

    ``text`` is a regular expression searched in the event's text (a kernel log line:
    ``{event: kernel-log, device: edu0, text: "stream start"}``), for the moments a
    driver only announces in its log.
    """

    event: KindName
    device: Id | None = None
    source: SourceName | None = None
    text: Str | None = None
    timeout: Duration | None = None

    @field_validator("text")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"text is not a valid regular expression: {exc}") from None
        return v

    def matches_text(self, text: str) -> bool:
        return self.text is None or re.search(self.text, text) is not None

    def describe(self) -> str:
        return (f"wait {self.event.value}" + (f" {self.device}" if self.device else "")
                + (f" /{self.text}/" if self.text else ""))

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.device is not None:
            chk.known(self.device, st, self.field_path("device"))

    def execute(self, ctx: StepContext) -> str:
        """Until the event is on the live timeline. A QEMU that exits meanwhile ends the
        wait at once (a panic with panic=-1 and -no-reboot does that): waiting out the
        deadline for an event a dead guest cannot send only delays the verdict."""
        from lab.events import Kind

        m = ctx.machine
        since_ns = ctx.since_ns
        kind = Kind(self.event)
        timeout = self.timeout.seconds if self.timeout else DEFAULT_WAIT_S
        end = time.monotonic() + timeout
        bdfs: set[str] = set()
        while True:
            devid = ctx.device_id(self.device) if self.device else None
            if devid and devid.bdf:
                bdfs.add(devid.bdf)
            for ev in ctx.live_events():
                if ev.t_host_ns < since_ns:
                    continue
                if self.source and ev.source.value != self.source:
                    continue
                if not kind_matches(ev, kind):
                    continue
                if not self.matches_text(str(ev.data.get("text", ""))):
                    continue
                if self.device and not (ev.device and (ev.device.qom == self.device or
                                                       (ev.device.bdf in bdfs))):
                    continue
                return f"{kind.value} after {(ev.t_host_ns - since_ns) / 1e6:.1f} ms"
            if m.process is not None and not m.process.alive():
                ctx.qemu_answered(f"{self.where}: waiting for {kind.value}")
            if time.monotonic() > end:
                errs = "; ".join(ctx.watcher_errors[-2:])
                raise StepFailed(self.violation(
                    "wait.timeout", self.device or "guest",
                    f"no {kind.value} event" + (f" for {self.device}" if self.device else "")
                    + f" within {timeout:.1f}s" + (f" ({errs})" if errs else "")))
            time.sleep(0.01)


class WaitQmp(WaitBase):
    """Wait for a QMP event by name; ``device`` matches its ``data.device``."""

    qmp: QmpEvent
    device: Id | None = None
    timeout: Duration | None = None

    def describe(self) -> str:
        return f"wait qmp {self.qmp}" + (f" {self.device}" if self.device else "")

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.device is not None:
            chk.known(self.device, st, self.field_path("device"))

    def execute(self, ctx: StepContext) -> str:
        m = ctx.machine
        assert m.qmp is not None
        timeout = self.timeout.seconds if self.timeout else DEFAULT_WAIT_S
        cursor = m.qmp.cursor_at(ctx.since_ns)
        ev = m.qmp.wait_event(self.qmp, after=cursor, timeout=timeout,
                              match=(lambda e: (e.get("data") or {}).get("device") == self.device)
                              if self.device else None)
        return f"{self.qmp} at {ev.get('t_host_ns')}"


class WaitGuest(WaitBase):
    """Poll a guest command every ``interval`` until it exits 0."""

    guest: Str | tuple[Str, ...]
    interval: Duration = Duration(100_000_000)
    timeout: Duration | None = None

    def describe(self) -> str:
        cmd = self.guest if isinstance(self.guest, str) else " ".join(self.guest)
        return f"wait guest {cmd[:40]}"

    def execute(self, ctx: StepContext) -> str:
        from lab.results import Violation

        m = ctx.machine
        assert m.agent is not None
        cmd = self.guest if isinstance(self.guest, str) else m.agent.shell.join(self.guest)
        timeout = self.timeout.seconds if self.timeout else DEFAULT_WAIT_S
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            last = m.agent.run(cmd, timeout=max(1.0, end - time.monotonic()))
            if last.ok:
                return "ok"
            time.sleep(self.interval.seconds)
        raise StepFailed(Violation("wait.timeout", "guest", "wait",
                                   f"{self.where}: `{cmd}` did not succeed within {timeout:.1f}s"
                                   + (f" (last exit {last.exit_status})" if last else "")))


class WaitJob(WaitBase):
    """Wait for a background guest command to end."""

    job: Name
    timeout: Duration | None = None

    def describe(self) -> str:
        return f"wait job {self.job}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.job not in st.jobs:
            started = chk.job_names.get(self.job)
            msg = unknown("background command", self.job, sorted(st.jobs)) if st.jobs else \
                f"no background command {self.job!r} has been started"
            if started:
                msg += f"; it starts in {started}, which does not run before this wait"
            chk.fail(msg, self.field_path("job"))

    def execute(self, ctx: StepContext) -> str:
        from lab.errors import DeadlineExceeded, LabError

        m = ctx.machine
        assert m.agent is not None
        job = ctx.jobs.get(self.job)
        if job is None:
            raise LabError(f"{self.where}: no background job named {self.job!r}")
        timeout = self.timeout.seconds if self.timeout else 60.0
        try:
            r = m.agent.collect(job.chan, job.command, timeout)
        except DeadlineExceeded:
            raise StepFailed(self.violation("wait.timeout", "guest",
                                            f"job {job.name} still running after {timeout:.1f}s"))
        ctx.guest_log(f"$ {job.command} &\n[exit {r.exit_status}]\n{r.stdout}{r.stderr}\n")
        if job.check and not r.ok:
            raise StepFailed(self.violation("guest.command", "guest",
                                            f"job {job.name} exited with {r.exit_status}: "
                                            f"{(r.stderr or r.stdout).strip()[-200:]}"))
        return f"{job.name} exit {r.exit_status}"


class WaitPcm(WaitBase):
    """Wait until the device's playback PCM exists in the guest again: the driver is
    bound and its sound card registered (after a hot-plug or a rebalance), which is
    when an audio service would reopen its stream."""

    pcm: Id
    timeout: Duration | None = None

    def describe(self) -> str:
        return f"wait pcm {self.pcm}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        chk.present(self.pcm, st, self.field_path("pcm"), "wait for its PCM")

    def execute(self, ctx: StepContext) -> str:
        """Poll until the device's playback PCM is there (what an audio service waits
        for before reopening its stream)."""
        from lab.results import Violation

        m = ctx.machine
        assert m.agent is not None
        timeout = self.timeout.seconds if self.timeout else DEFAULT_WAIT_S
        end = time.monotonic() + timeout
        while True:
            bdf = ctx.bdf(self.pcm)
            cmd = ctx.audio_player().pcm_ready_command(bdf)
            r = m.agent.run(cmd, timeout=max(1.0, min(10.0, end - time.monotonic())))
            if r.ok:
                return f"{self.pcm} PCM ready"
            if time.monotonic() >= end:
                raise StepFailed(Violation("wait.timeout", self.pcm, "wait",
                                           f"{self.where}: the PCM of {self.pcm} did not "
                                           f"appear within {timeout:.1f}s"))
            time.sleep(0.05)


WAIT_KINDS: dict[str, type[WaitBase]] = {"event": WaitEvent, "qmp": WaitQmp,
                                         "guest": WaitGuest, "job": WaitJob, "pcm": WaitPcm}


def kind_matches(ev: Event, kind: Kind) -> bool:
    """Whether ``ev`` counts as an event of ``kind`` for a wait."""
    from lab.events import Kind

    if ev.kind == kind:
        return True
    # a bind uevent is the guest's own word that a driver is bound
    return kind == Kind.BOUND and ev.kind == Kind.UEVENT and ev.data.get("action") == "bind"
