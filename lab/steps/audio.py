"""``play``: the lab's counter signal on a device's PCM, in the background (the host
checks every frame QEMU captured: ``assert: {audio: ...}``, ``lab.audio_analysis``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import model_validator

from lab.scenario.units import Duration, Id, Name
from lab.steps.base import Job, StepBase, StepContext, StepFailed, step_kind

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState


#: planted faults of the player (``play: {fault: ...}``): the signal file the guest plays
#: is edited, so the host's analysis must find exactly this
PLAY_FAULTS = ("none", "drop-100ms", "repeat-buffer")


@step_kind
class Play(StepBase):
    """Play the lab's counter signal on a device's PCM, in the background.

    The lab writes the signal (lab.audio_analysis), copies it into the guest once per
    VM and plays it bit-exact (no resampling, no mixer) so that the host can check every
    frame QEMU captured. A ``play`` of a name that is already playing restarts it (an
    audio service reopening its stream after the device came back). ``fault`` plants a
    glitch in what is played, after ``fault_at`` into the stream, to show that the
    analysis finds one: ``drop-100ms`` skips 4410 frames, ``repeat-buffer`` plays 1024
    frames twice.
    """

    step_type: ClassVar[str] = "play"
    shorthand: ClassVar[str | None] = "device"
    needs_audio: ClassVar[bool] = True
    device: Id
    name: Name = "player"
    seconds: Duration = Duration(30_000_000_000)
    fault: Literal["none", "drop-100ms", "repeat-buffer"] = "none"
    fault_at: Duration = Duration(1_000_000_000)
    # the step ends when the host hears the stream (QEMU's capture grows), so that a
    # `sleep` after it is time into the stream: a player that starts slowly (the first
    # aplay of a VM under TCG, a loaded host) must not turn "rebalance 300 ms into the
    # stream" into "rebalance before the stream"
    wait_heard: bool = True
    heard_timeout: Duration = Duration(10_000_000_000)

    @model_validator(mode="after")
    def _bounds(self) -> Play:
        if not 0 < self.seconds.ns <= 600_000_000_000:
            raise ValueError("seconds must be more than 0 and at most 10 minutes")
        if not 0 < self.heard_timeout.ns <= 120_000_000_000:
            raise ValueError("heard_timeout must be more than 0 and at most 2 minutes")
        if self.fault != "none" and self.fault_at.ns >= self.seconds.ns:
            raise ValueError("fault_at must be inside the stream (less than seconds)")
        return self

    def describe(self) -> str:
        fault = f" fault={self.fault}" if self.fault != "none" else ""
        return f"play [{self.name}] {self.device}{fault}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        chk.present(self.device, st, self.field_path("device"), "play")
        # a player is a background job: `wait: {job: NAME}` waits for it; playing a
        # name again restarts it, so a second `play` of one name is not a clash
        chk.job_names.setdefault(self.name, self.path)
        st.jobs.add(self.name)

    def execute(self, ctx: StepContext) -> str:
        from lab.audio_capture import frames_in
        from lab.errors import LabError
        from lab.events import DeviceId

        m = ctx.machine
        assert m.agent is not None
        if m.audio_path is None:
            raise LabError(f"{self.where}: play needs the machine to capture audio")
        signal = self._signal(ctx)
        bdf = ctx.bdf(self.device)
        command = ctx.audio_player().play_command(self.name, signal, bdf)
        old = ctx.jobs.pop(self.name, None)
        if old is not None:
            try:
                old.chan.close()
            except Exception:      # noqa: BLE001 - the old player's channel may be gone
                pass
        if ctx.obs.audio_device is None:
            ctx.obs.audio_device = DeviceId(qom=self.device, bdf=bdf)
        before = frames_in(m.audio_path)
        job = Job(self.name, command, m.agent.open(command), False, time.time_ns())
        ctx.jobs[self.name] = job
        ctx.players.add(self.name)
        what = f"{'restarted' if old else 'started'} {self.name} on {bdf or self.device}"
        if not self.wait_heard:
            return what
        return f"{what}; heard after {self._await_heard(ctx, job, before):.0f} ms"

    def _await_heard(self, ctx: StepContext, job: Job, before: int) -> float:
        """Until QEMU's capture holds frames written after the player started: the ms
        that took. A player that ends first fails the step with what it said."""
        from lab.audio_capture import frames_in
        from lab.deadline import poll
        from lab.errors import DeadlineExceeded

        m = ctx.machine
        agent, path = m.agent, m.audio_path
        assert agent is not None and path is not None
        t0 = time.monotonic()

        def probe() -> str | None:
            if frames_in(path) > before:
                return "heard"
            return "ended" if agent.finished(job.chan) else None

        timeout = self.heard_timeout.seconds
        try:
            how = poll(f"the stream of {self.name} to be heard", timeout, probe, ceiling=0.01)
        except DeadlineExceeded:
            raise StepFailed(self.violation(
                "wait.timeout", self.device,
                f"the host heard nothing from {self.name} on {self.device} within "
                f"{timeout:.1f}s (QEMU's capture did not grow)")) from None
        if how == "ended":
            r = agent.collect(job.chan, job.command, 5.0)
            ctx.guest_log(f"$ {job.command} &\n[exit {r.exit_status}]\n{r.stdout}{r.stderr}\n")
            ctx.jobs.pop(self.name, None)
            ctx.players.discard(self.name)
            raise StepFailed(self.violation(
                "guest.command", self.device,
                f"{self.name} ended (exit {r.exit_status}) before the host heard its stream: "
                f"{(r.stderr or r.stdout).strip()[-200:]}"))
        return (time.monotonic() - t0) * 1000

    def _signal(self, ctx: StepContext) -> str:
        """The signal file in the guest: written and copied once per VM and variant."""
        from lab.guest.audio_player import signal_name, write_signal_file

        m = ctx.machine
        assert m.agent is not None and m.private is not None
        agent, private = m.agent, m.private
        player = ctx.audio_player()
        name = signal_name(self.seconds.seconds, self.fault, self.fault_at.seconds)

        def make() -> str:
            local = private / name
            write_signal_file(local, self.seconds.seconds, self.fault, self.fault_at.seconds)
            agent.run(player.prepare_command(), timeout=20.0).check()
            remote = player.signal_path(name)
            agent.put(local, remote)
            local.unlink(missing_ok=True)
            return remote

        return ctx.once_per_vm(name, make)
