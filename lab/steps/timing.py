"""``sleep`` (a fixed delay) and ``jitter`` (a random one, drawn from the iteration seed)."""

from __future__ import annotations

import time
from typing import ClassVar

from pydantic import model_validator

from lab.scenario.params import draw_int
from lab.scenario.units import ZERO, Duration, MsNumber
from lab.steps.base import (ParseContext, StepBase, StepContext, mapping_or, step_kind,
                            validate_args)
from vdevice.yamlsrc import Located, YamlPath, format_path


@step_kind
class Sleep(StepBase):
    """A fixed delay. Use it for timing sweeps, never to wait for something to happen."""

    step_type: ClassVar[str] = "sleep"
    shorthand: ClassVar[str | None] = "duration"
    duration: Duration

    def describe(self) -> str:
        return f"sleep {self.duration}"

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        args = mapping_or(located, apath, "duration", "sleep")
        if "ms" in args:                     # sleep: {ms: 250}
            if len(args) != 1:
                raise located.error("sleep takes either a duration or {ms: N}", apath)
            args = {"duration": MsNumber(args["ms"])}
        return validate_args(cls, located, apath, args, ctx)

    def execute(self, ctx: StepContext) -> None:
        time.sleep(self.duration.seconds)
        return None


@step_kind
class Jitter(StepBase):
    """A random delay in [min, max], drawn from the iteration seed (``delay``), so a
    replay of the iteration sleeps exactly as long."""

    step_type: ClassVar[str] = "jitter"
    shorthand: ClassVar[str | None] = "max"
    max: Duration
    min: Duration = ZERO
    delay: Duration | None = None     # drawn by the parser; not written in YAML

    @model_validator(mode="after")
    def _bounds(self) -> Jitter:
        if self.min > self.max:
            raise ValueError(f"jitter min {self.min} is above max {self.max}")
        return self

    def describe(self) -> str:
        return f"jitter {self.delay} (<= {self.max})"

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        args = mapping_or(located, apath, "max", "jitter")
        if "delay" in args:
            raise located.error("the jitter delay is drawn from the iteration seed; give max "
                                "(and optionally min)", apath + ("delay",))
        step = validate_args(cls, located, apath, args, ctx)
        key = "jitter:" + format_path(apath[:-1])
        # microsecond resolution: finer than any sleep the host can honour, and readable
        lo_us, hi_us = -(-step.min.ns // 1000), step.max.ns // 1000
        delay_ns = draw_int(ctx.seed, key, lo_us, hi_us) * 1000 if hi_us >= lo_us else step.min.ns
        return step.model_copy(update={"delay": Duration(delay_ns)})

    def execute(self, ctx: StepContext) -> str:
        delay = self.delay.seconds if self.delay is not None else 0.0
        time.sleep(delay)
        return f"{delay * 1e3:.1f} ms"
