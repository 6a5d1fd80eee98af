"""``snapshot: {name: NAME}``: where the restore point of ``reset: snapshot`` is taken.

Without it the point is taken when an iteration's tracing is up, before its first step.
With it, the steps before it are the VM's setup (load the module, plug the device, wait
until it is bound): under ``reset: snapshot`` they run once per VM, outside any
iteration, and every iteration restores the VM as they left it and runs only the steps
after this one. Under the other resets the step does nothing: the same file runs
everywhere, and every iteration runs its setup itself.

What the setup may hold is checked before any VM starts (``verify``): only steps whose
effect is the guest's and QEMU's state, which the point saves. Not a jitter (it would be
drawn once per VM, not per iteration), not a background command or a player (the SSH
channel that runs it is the old VM's), not a rebalance, reconfigure, pause or parallel
block (state the restored command line cannot rebuild or timing that belongs to an
iteration). Setup steps that differ between iterations (they use a swept parameter) get
a point of their own: the runner takes a new one when an iteration's setup differs from
the VM's point (``lab.runner``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import field_validator

from lab.scenario.units import Str
from lab.steps.base import StepBase, StepContext, step_kind

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState

#: step kinds whose effect the restore point saves (the guest's and QEMU's state)
SETUP_KINDS = ("module", "plug", "unplug", "wait", "guest", "sleep", "assert")


@step_kind
class RestorePointStep(StepBase):
    """The restore point of ``reset: snapshot``: the steps before it are the VM's setup."""

    step_type: ClassVar[str] = "snapshot"
    shorthand: ClassVar[str | None] = "name"
    name: Str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or len(v) > 64 or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("a restore point's name is 1-64 letters, digits, '-', '_' or '.'")
        return v

    def describe(self) -> str:
        return f"snapshot {self.name}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if len(self.yaml_path) != 2:
            chk.fail("snapshot marks where every iteration starts: it goes in the scenario's "
                     "own steps, not inside a parallel block", self.field_path())
        for earlier in chk.seen:
            if isinstance(earlier, RestorePointStep):
                chk.fail(f"a scenario has one restore point; {chk.where(earlier)} is one "
                         f"already", self.field_path())
            if earlier.step_type not in SETUP_KINDS:
                chk.fail(f"the steps before the restore point run once per VM and are saved "
                         f"with it; a {earlier.step_type} step ({chk.where(earlier)}) cannot "
                         f"be: move it after the snapshot step (allowed before it: "
                         f"{', '.join(SETUP_KINDS)})", self.field_path())
            if getattr(earlier, "background", False):
                chk.fail(f"the background command at {chk.where(earlier)} runs over an SSH "
                         f"channel that a VM restored from the point does not have: start it "
                         f"after the snapshot step", self.field_path())

    def execute(self, ctx: StepContext) -> str:
        from lab.errors import LabError
        if getattr(ctx.machine, "disposable", False):
            # under reset: snapshot the runner splits the steps here and never runs this
            raise LabError(f"{self.where}: the restore point {self.name!r} reached the "
                           f"runner as a step under reset: snapshot")
        return "not under reset: snapshot: nothing saved"
