"""``play``: the lab's counter signal on a device's PCM, in the background (the host
checks every frame QEMU captured: ``assert: {audio: ...}``, ``lab.audio_analysis``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import model_validator

from lab.scenario.units import Duration, Id, Name
from lab.steps.base import Job, StepBase, StepContext, step_kind

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

    @model_validator(mode="after")
    def _bounds(self) -> Play:
        if not 0 < self.seconds.ns <= 600_000_000_000:
            raise ValueError("seconds must be more than 0 and at most 10 minutes")
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
        ctx.jobs[self.name] = Job(self.name, command, m.agent.open(command), False,
                                  time.time_ns())
        ctx.players.add(self.name)
        return f"{'restarted' if old else 'started'} {self.name} on {bdf or self.device}"

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
