"""``parallel``: branches of steps run concurrently; the step ends when all have ended."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ConfigDict

from lab.scenario.units import check_name
from lab.steps.base import ParseContext, StepBase, StepContext, StepFailed, step_kind
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, YamlPath

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState


@dataclass(frozen=True)
class Branch:
    name: str
    steps: tuple[StepBase, ...]


@step_kind
class Parallel(StepBase):
    """Run branches concurrently; the step ends when every branch has ended.

    Within a branch steps run in order; across branches there is no order, so a
    device plugged in one branch cannot be used by another one.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)
    step_type: ClassVar[str] = "parallel"
    branches: tuple[Branch, ...]

    def describe(self) -> str:
        return f"parallel {', '.join(b.name for b in self.branches)}"

    def to_yaml(self) -> dict[str, Any]:
        return {"parallel": {b.name: [s.to_yaml() for s in b.steps] for b in self.branches}}

    def substeps(self) -> tuple[tuple[str, tuple[StepBase, ...]], ...]:
        return tuple((b.name, tuple(b.steps)) for b in self.branches)

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        from lab.scenario.steps import parse_steps

        data = located.get(apath)
        branches: list[Branch] = []
        if isinstance(data, Mapping):
            for name in data:
                if not isinstance(name, str):
                    raise located.error(f"branch name {name!r} must be text", apath + (name,))
                try:
                    check_name(name)
                except SpecError as exc:
                    raise located.relocate(exc, apath + (name,)) from None
                branches.append(Branch(name, parse_steps(located, apath + (name,), ctx)))
        elif isinstance(data, list):
            for i, item in enumerate(data):
                if not isinstance(item, list):
                    raise located.error("each parallel branch is a list of steps (or name the "
                                        "branches: 'parallel: {stream: [...], yank: [...]}')",
                                        apath + (i,))
                branches.append(Branch(f"b{i + 1}", parse_steps(located, apath + (i,), ctx)))
        else:
            raise located.error("parallel takes branches: a mapping of name to steps, or a "
                                "list of step lists", apath)
        if len(branches) < 2:
            raise located.error("parallel needs at least two branches", apath)
        return cls.model_construct(branches=tuple(branches))

    def verify(self, chk: RefChecker, st: RefState) -> None:
        """Each branch from the state before the step; a device that two branches both
        plug or unplug is refused (their order is undefined)."""
        start = st.copy()
        changes: dict[str, tuple[str, str]] = {}        # device -> (branch, new state)
        for b in self.branches:
            bst = start.copy()
            chk.run_steps(b.steps, bst)
            for dev, state in bst.devices.items():
                if start.devices.get(dev) == state:
                    continue
                if dev in changes:
                    chk.fail(f"branches {changes[dev][0]!r} and {b.name!r} both plug or "
                             f"unplug device {dev!r}; across branches the order is undefined",
                             self.field_path())
                changes[dev] = (b.name, state)
                st.changed_at[dev] = bst.changed_at.get(dev, "")
            st.ever |= bst.ever
            st.jobs |= bst.jobs
        for dev, (_, state) in changes.items():
            st.devices[dev] = state

    def execute(self, ctx: StepContext) -> str:
        errors: list[BaseException] = []

        def branch(steps: Sequence[StepBase]) -> None:
            try:
                for s in steps:
                    ctx.run_step(s)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=branch, args=(b.steps,), name=f"branch-{b.name}",
                                    daemon=True) for b in self.branches]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        failed = [e for e in errors if isinstance(e, StepFailed)]
        if failed:
            ctx.add_violations(f.violation for f in failed[1:])
            raise failed[0]
        if errors:
            raise errors[0]
        return f"{len(threads)} branches"
