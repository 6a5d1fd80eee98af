"""``guest`` (a command in the guest) and ``module`` (a Linux kernel module)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import field_validator, model_validator

from lab.events import Event, Kind, Source
from lab.scenario.units import Bool, Duration, Name, Str
from lab.steps.base import (ParseContext, PropValue, StepBase, StepContext, StepFailed, Job,
                            mapping_or, step_kind, validate_args)
from vdevice.yamlsrc import Located, YamlPath

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState


@step_kind
class Guest(StepBase):
    """Run a command in the guest: ``run`` (a shell line) or ``argv`` (no shell).

    ``background: true`` starts it and goes on; ``name`` then identifies it for
    ``wait: {job: NAME}`` and its log file. With ``check`` (default) a non-zero exit
    status fails the iteration like an assert.
    """

    step_type: ClassVar[str] = "guest"
    shorthand: ClassVar[str | None] = "run"
    run: Str | None = None
    argv: tuple[Str, ...] | None = None
    background: Bool = False
    name: Name | None = None
    timeout: Duration | None = None
    check: Bool = True

    @model_validator(mode="after")
    def _shape(self) -> Guest:
        if (self.run is None) == (self.argv is None):
            raise ValueError("give exactly one of run (a shell command) or argv (a list)")
        if self.argv is not None and not self.argv:
            raise ValueError("argv must not be empty")
        if self.background and not self.name:
            raise ValueError("a background command needs a name (for wait: {job: NAME} and "
                             "its log)")
        return self

    def describe(self) -> str:
        cmd = self.run if self.run is not None else " ".join(self.argv or ())
        short = cmd if len(cmd) <= 40 else cmd[:37] + "..."
        named = f" [{self.name}]" if self.name else ""
        return f"guest{' &' if self.background else ''}{named} {short}"

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        data = located.get(apath)
        args = {"argv": data} if isinstance(data, list) else \
            mapping_or(located, apath, "run", "guest")
        return validate_args(cls, located, apath, args, ctx)

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.background and self.name:
            first = chk.job_names.get(self.name)
            if first is not None and first != self.path:
                chk.fail(f"background command name {self.name!r} is already used ({first})",
                         self.field_path("name"))
            chk.job_names[self.name] = self.path
            st.jobs.add(self.name)

    def execute(self, ctx: StepContext) -> str:
        import time
        from dataclasses import replace

        m = ctx.machine
        assert m.agent is not None
        command = self.run if self.run is not None else m.agent.shell.join(self.argv or ())
        if self.background:
            name = self.name or f"job{len(ctx.jobs) + 1}"
            chan = m.agent.open(command)
            ctx.jobs[name] = Job(name, command, chan, self.check, time.time_ns())
            return f"started {name}"
        timeout = self.timeout.seconds if self.timeout else 60.0
        t0 = time.time_ns()
        try:
            r = m.agent.run(command, timeout=timeout)
        finally:
            # the command is a phase of the iteration, named as its failure is: what the
            # guest logged while it ran (an oops in the race a guest command drives, as in
            # race-planted-recorded) reads "race", not "after:module"
            m.run.record(Event(t0, Source.HOST_LAB, Kind.OPERATION,
                               duration_ns=time.time_ns() - t0,
                               data={"name": self.name or "guest"}))
        ctx.guest_log(f"$ {command}\n[exit {r.exit_status}]\n{r.stdout}{r.stderr}\n")
        if self.check and not r.ok:
            # a named check gets its own signature (guest.command@guest/<name>)
            v = self.violation("guest.command", "guest",
                               f"`{command}` exited with {r.exit_status}: "
                               f"{(r.stderr or r.stdout).strip()[-200:]}")
            raise StepFailed(replace(v, phase=self.name) if self.name else v)
        return f"exit {r.exit_status}"


_MODULE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,55}")   # never an option: no leading '-' 
_MODPARAM_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@step_kind
class Module(StepBase):
    """Load a kernel module into the Linux guest with parameters (e.g. the test driver).

    ``reload`` (default) unloads it first when it is loaded, so every iteration starts
    from a freshly initialised module: parameters given at load time take effect, and
    whatever the module keeps across devices (the test driver's stale-bar address) is
    gone. ``reload: false`` writes the parameters of a loaded module through
    ``/sys/module/NAME/parameters`` instead (they must be writable). ``unload: true``
    only removes it. Names and values reach the guest quoted for its shell.
    """

    step_type: ClassVar[str] = "module"
    shorthand: ClassVar[str | None] = "name"
    name: Str
    params: dict[Str, PropValue] = {}
    reload: Bool = True
    unload: Bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _MODULE_RE.fullmatch(v):
            raise ValueError(f"{v!r} is not a kernel module name (letters, digits, - and _, "
                             "not starting with -)")
        return v

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key, value in v.items():
            if not _MODPARAM_RE.fullmatch(key):
                raise ValueError(f"{key!r} is not a module parameter name (letters, digits, _)")
            if isinstance(value, str) and ("\n" in value or "\0" in value):
                raise ValueError(f"parameter {key}: a value cannot contain a newline or NUL")
        return v

    @model_validator(mode="after")
    def _shape(self) -> Module:
        if self.unload and self.params:
            raise ValueError("unload takes no params")
        return self

    @property
    def sysfs_name(self) -> str:
        """The kernel's name for it (``-`` and ``_`` are the same to modprobe; sysfs has ``_``)."""
        return self.name.replace("-", "_")

    def param_text(self) -> dict[str, str]:
        """Parameters as the kernel parses them (booleans as Y/N)."""
        return {k: ("Y" if v else "N") if isinstance(v, bool) else str(v)
                for k, v in self.params.items()}

    def describe(self) -> str:
        if self.unload:
            return f"module unload {self.name}"
        args = " ".join(f"{k}={v}" for k, v in self.param_text().items())
        return f"module {'reload' if self.reload else 'load'} {self.name}" + (f" {args}" if args else "")

    def execute(self, ctx: StepContext) -> str:
        m = ctx.machine
        return m.guest.load_module(m, self.name, self.param_text(), reload=self.reload,
                                   unload=self.unload)
