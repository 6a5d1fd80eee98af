"""Kernel modules in the Linux guest: load with parameters, reload, unload.

A scenario that drives a driver of its own (the test driver with a planted bug, or a
user's module built into an image) must be able to say which parameters the driver
starts with, every iteration afresh. ``modprobe`` on a loaded module silently ignores
new parameters, so a plain "modprobe" step would make a sweep over bug modes lie: the
first iteration's parameters would stay in force. Here a (re)load is explicit.

Every name and value reaches the guest through the agent's shell quoting; names are
also checked by the scenario validator, so this never builds a command by pasting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lab.errors import LabError
from lab.events import Event, Kind, Source
from lab.machine import Machine

MODULE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ModuleRequest:
    """What to do with one module. ``params`` are already the kernel's text form."""

    name: str
    params: Mapping[str, str] = field(default_factory=dict)
    reload: bool = True
    unload: bool = False
    sysfs_root: str = "/sys/module"     # a test points it elsewhere

    @property
    def sysfs_dir(self) -> str:
        return f"{self.sysfs_root}/{self.name.replace('-', '_')}"


def command(req: ModuleRequest, quote: Callable[[str], str]) -> str:
    """The POSIX shell line for ``req`` (exit status: the failing step's)."""
    q = quote
    loaded = f"[ -d {q(req.sysfs_dir)} ]"
    if req.unload:
        return f"if {loaded}; then rmmod {q(req.name)}; fi"
    load = " ".join(["modprobe", q(req.name), *(q(f"{k}={v}") for k, v in req.params.items())])
    if req.reload:
        return f"if {loaded}; then rmmod {q(req.name)} || exit $?; fi; {load}"
    if not req.params:
        return f"{loaded} || {load}"
    writes = "; ".join(
        f"printf '%s\\n' {q(v)} > {q(req.sysfs_dir + '/parameters/' + k)} || exit $?"
        for k, v in req.params.items())
    return f"if {loaded}; then {writes}; else {load}; fi"


def apply(m: Machine, req: ModuleRequest) -> str:
    """Run ``req`` in the guest; raise LabError naming the module and what the guest said.

    A module that will not load is a problem of the lab set-up (the image lacks it, a
    parameter is unknown), not a driver behaviour under test: hence LabError, exit 2.
    """
    m.require_running()
    if m.agent is None:
        raise LabError("no guest agent to load modules with")
    cmd = command(req, m.agent.shell.quote)
    t_ns = time.time_ns()
    r = m.agent.run(cmd, timeout=MODULE_TIMEOUT_S)
    what = "unload" if req.unload else ("reload" if req.reload else "load")
    args = " ".join(f"{k}={v}" for k, v in req.params.items())
    if not r.ok:
        raise LabError(f"module {what} {req.name}{' ' + args if args else ''} failed in the "
                       f"guest (exit {r.exit_status}): {(r.stderr or r.stdout).strip()[-300:]}")
    m.run.record(Event(t_ns, Source.HOST_LAB, Kind.OPERATION, duration_ns=time.time_ns() - t_ns,
                       data={"name": f"module:{what}", "module": req.name,
                             "params": dict(req.params)}))
    m.run.log(f"module {what} {req.name} {args}".rstrip())
    return f"{what} {req.name} {args}".rstrip()
