"""``pause`` and ``resume``: stop and continue the VM's vCPUs (QMP ``stop``/``cont``)."""

from __future__ import annotations

from typing import ClassVar

from lab.steps.base import ParseContext, StepBase, StepContext, step_kind
from vdevice.yamlsrc import Located, YamlPath


class _NoArgs(StepBase):
    """A step written ``- NAME: {}``: no fields."""

    qmp_command: ClassVar[str] = ""

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        data = located.get(apath)
        if data not in (None, {}):
            raise located.error(f"{cls.step_type} takes no arguments (write "
                                f"'- {cls.step_type}: {{}}')", apath)
        return cls()

    def execute(self, ctx: StepContext) -> None:
        m = ctx.machine
        assert m.qmp is not None
        m.qmp.execute(self.qmp_command)
        return None


@step_kind
class Pause(_NoArgs):
    """Stop the VM's vCPUs (QMP ``stop``)."""

    step_type: ClassVar[str] = "pause"
    qmp_command: ClassVar[str] = "stop"
    record_refusal: ClassVar[str | None] = (
        "pause is a QMP stop, not in the replay log; a guest-side delay (sleep, or a guest "
        "command) is recordable")


@step_kind
class Resume(_NoArgs):
    """Continue the VM (QMP ``cont``)."""

    step_type: ClassVar[str] = "resume"
    qmp_command: ClassVar[str] = "cont"
    record_refusal: ClassVar[str | None] = (
        "resume is a QMP cont, not in the replay log; a guest-side delay (sleep, or a guest "
        "command) is recordable")
