"""``assert``: a check of the iteration's events (or audio) so far; one that does not
hold is a violation (status failed). The kind is the one key present (``ASSERT_KINDS``)."""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, ClassVar

from pydantic import ValidationInfo, field_validator, model_validator

from lab.scenario.units import Duration, Id, Int, KindName, RuleName, SourceName
from lab.steps.base import (ParseContext, Spec, StepBase, StepContext, StepFailed, one_of_keys,
                            step_kind, validate_args)
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath, unknown

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState


@step_kind
class AssertBase(StepBase):
    """Asserts check the events of this iteration recorded up to this step; a failed
    assert is a violation (status failed, exit 1), like a broken rule."""

    step_type: ClassVar[str] = "assert"

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        kind, args = one_of_keys(located, apath, ASSERT_KINDS, "assert")
        return validate_args(ASSERT_KINDS[kind], located, apath, args, ctx)


def check_known_rule(pattern: str, known: frozenset[str] | None) -> None:
    """Raise unless ``pattern`` (an id or glob) selects at least one known rule."""
    if known is None or any(fnmatch.fnmatchcase(k, pattern) for k in known):
        return
    raise SpecError(unknown("rule", pattern, sorted(known)))


class AssertRule(AssertBase):
    """Run one rule (or rule set) now, optionally only for one device."""

    rule: RuleName
    device: Id | None = None

    @field_validator("rule")
    @classmethod
    def _known(cls, v: str, info: ValidationInfo) -> str:
        check_known_rule(v, (info.context or {}).get("known_rules"))
        return v

    def describe(self) -> str:
        return f"assert rule {self.rule}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.device is not None:
            chk.known(self.device, st, self.field_path("device"))

    def execute(self, ctx: StepContext) -> str:
        from lab.rules import check_all

        tl = ctx.obs.snapshot()
        found = check_all(tl, ctx.rule_context(tl), [self.rule])
        if self.device:
            found = [v for v in found if v.device == self.device]
        if found:
            ctx.add_violations(found[1:])
            raise StepFailed(found[0])
        return f"{self.rule}: ok"


class AssertNoKind(AssertBase):
    """No event of this kind so far (e.g. ``kernel-oops``)."""

    no_kind: KindName
    device: Id | None = None

    def describe(self) -> str:
        return f"assert no {self.no_kind.value}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.device is not None:
            chk.known(self.device, st, self.field_path("device"))

    def execute(self, ctx: StepContext) -> str:
        from lab.events import Kind
        from lab.results import EventRef, Violation
        from lab.timeline import device_matches

        tl = ctx.obs.snapshot()
        bad = [e for e in tl.select(kinds=Kind(self.no_kind))
               if self.device is None or device_matches(e.device, self.device)]
        if bad:
            text = bad[0].data.get("text", "")
            raise StepFailed(Violation(
                "assert.no-kind", self.device or "guest", "assert",
                f"{self.where}: {len(bad)} {Kind(self.no_kind).value} event(s), first: {text}"[:400],
                events=tuple(EventRef(e.seq, e.t_host_ns, e.kind.value, e.source.value)
                             for e in bad[:5])))
        return "none"


class AudioCheck(Spec):
    max_gap: Duration | None = None
    max_discontinuities: Int | None = None
    max_outage: Duration | None = None        # the stream must come back within this

    @model_validator(mode="after")
    def _any(self) -> AudioCheck:
        if self.max_gap is None and self.max_discontinuities is None and self.max_outage is None:
            raise ValueError("audio needs max_gap (or max_gap_ms), max_discontinuities and/or "
                             "max_outage")
        if self.max_discontinuities is not None and self.max_discontinuities < 0:
            raise ValueError("max_discontinuities must be >= 0")
        return self


class AssertAudio(AssertBase):
    """The iteration's captured audio so far: no gap longer than ``max_gap``, at most
    ``max_discontinuities`` drops/repeats, every outage (stream stopped -> resumed)
    shorter than ``max_outage`` and the stream playing again."""

    audio: AudioCheck

    needs_audio: ClassVar[bool] = True

    def describe(self) -> str:
        return "assert audio"

    def execute(self, ctx: StepContext) -> str:
        """The iteration's audio so far (its own capture window, not the VM's whole
        file): gaps, discontinuities, outages and whether the stream is back."""
        from lab.errors import LabError
        from lab.results import Violation

        m = ctx.machine
        # as every assert: the timeline as it is at this step (clock samples taken now)
        ctx.obs.snapshot()
        if m.audio_path is None or not m.audio_path.exists():
            raise LabError(f"{self.where}: audio assert needs audio capture (the codec's "
                           "-audiodev wav); none was recorded")
        got = ctx.obs.audio_analysis()
        if got is None:
            raise LabError(f"{self.where}: audio assert needs a `play` step before it")
        summ = got.summary
        gap_ms, disc = summ.longest_gap_ms, summ.discontinuities
        outage = summ.longest_outage_ms
        chk = self.audio
        dev = ctx.obs.audio_device.label() if ctx.obs.audio_device else "audio"
        if chk.max_gap is not None and gap_ms > chk.max_gap.ms:
            raise StepFailed(Violation("assert.audio", dev, "assert",
                                       f"{self.where}: longest gap {gap_ms:.1f} ms > "
                                       f"{chk.max_gap.ms:.1f} ms"))
        if chk.max_discontinuities is not None and disc > chk.max_discontinuities:
            raise StepFailed(Violation("assert.audio", dev, "assert",
                                       f"{self.where}: {disc} discontinuities > "
                                       f"{chk.max_discontinuities}"))
        if chk.max_outage is not None:
            if not summ.resumed:
                raise StepFailed(Violation("assert.audio", dev, "assert",
                                           f"{self.where}: the stream stopped and is not "
                                           "playing again"))
            if outage > chk.max_outage.ms:
                raise StepFailed(Violation("assert.audio", dev, "assert",
                                           f"{self.where}: outage {outage:.1f} ms > "
                                           f"{chk.max_outage.ms:.1f} ms"))
        return (f"{summ.streams} stream(s), outage {outage:.1f} ms, longest gap "
                f"{gap_ms:.1f} ms, {disc} discontinuities")


class CountCheck(Spec):
    kind: KindName
    device: Id | None = None
    source: SourceName | None = None
    eq: Int | None = None
    min: Int | None = None
    max: Int | None = None

    @model_validator(mode="after")
    def _bounds(self) -> CountCheck:
        if self.eq is None and self.min is None and self.max is None:
            raise ValueError("count needs eq, or min and/or max")
        if self.eq is not None and (self.min is not None or self.max is not None):
            raise ValueError("count takes eq, or min/max, not both")
        for k in ("eq", "min", "max"):
            v = getattr(self, k)
            if v is not None and v < 0:
                raise ValueError(f"count {k} must be >= 0, got {v}")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"count min {self.min} is above max {self.max}")
        return self

    def accepts(self, n: int) -> bool:
        if self.eq is not None:
            return n == self.eq
        return (self.min is None or n >= self.min) and (self.max is None or n <= self.max)


class AssertCount(AssertBase):
    """The number of events of a kind (for a device) is as expected."""

    count: CountCheck

    def describe(self) -> str:
        return f"assert count {self.count.kind.value}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.count.device is not None:
            chk.known(self.count.device, st, self.field_path("count", "device"))

    def execute(self, ctx: StepContext) -> str:
        from lab.events import Kind
        from lab.results import Violation
        from lab.timeline import device_matches

        tl = ctx.obs.snapshot()
        c = self.count
        evs = [e for e in tl.select(kinds=Kind(c.kind))
               if (c.device is None or device_matches(e.device, c.device))
               and (c.source is None or e.source.value == c.source)]
        n = len(evs)
        ok = ((c.eq is None or n == c.eq) and (c.min is None or n >= c.min)
              and (c.max is None or n <= c.max))
        if not ok:
            raise StepFailed(Violation("assert.count", c.device or "guest", "assert",
                                       f"{self.where}: {n} {Kind(c.kind).value} event(s); expected "
                                       f"eq={c.eq} min={c.min} max={c.max}"))
        return f"{n} {Kind(c.kind).value}"


ASSERT_KINDS: dict[str, type[AssertBase]] = {"rule": AssertRule, "no_kind": AssertNoKind,
                                             "audio": AssertAudio, "count": AssertCount}
