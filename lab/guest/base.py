"""The guest-OS interface: everything that differs between the guests a Machine boots.

A ``Machine`` owns what every guest shares (the QEMU process, QMP, the console and the
sync/trace serial ports, the run directory, the shutdown ladder); device operations,
rebalance triggers, observations, the runner and the scenario loader are written once
for every guest. A ``GuestOs`` supplies the rest, as labgrid separates a strategy from
the drivers it uses:

* booting: which accelerator it can run on (``choose_accel``), what it checks before
  anything is created (``preflight``), what it must have from the topology
  (``adjust_topology``), per-machine files (``prepare``/``release``), its QEMU arguments
  (``qemu_args``), how readiness is seen (``wait_boot``/``wait_agent``) and which agent
  talks to it, its polite shutdown (``shutdown_steps``, ``before_stop``);
* device identity and waits: how the guest says a device is bound and gone
  (``bound_wait``/``gone_wait``, whose result names the device as the guest does),
  which driver holds it now (``driver_of``), under which names its events name the
  driver (``driver_names``);
* tracing: the guest's half of an observation (``trace``: events, clock evidence);
* the guest half of each rebalance trigger (``triggers``: ``rescan``,
  ``pressure_seen``, ``cpu_added``, ``capabilities``, ``wdtf``): one that this guest
  cannot do raises ``Unsupported`` with the reason;
* the steps it cannot run, with the reason (``refused_step``, asked by the loader
  before any VM exists) and its default rules (``default_rules``);
* what a run records about it (``describe``, ``versions``, ``image_hash``).

A ``GuestOs`` is configuration only: the runner restarts VMs with the same object, so
all per-machine state lives on the Machine (``MachineView``), in the ``BootFiles`` that
``prepare`` returns, or in the objects ``bound_wait``/``trace`` return.

``lab.guest.spec`` turns ``"linux"`` / ``"windows:<image>"`` and a scenario's ``guest:``
into one.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from lab.accel import Accel
from lab.agent.base import Agent
from lab.guest.audio_player import AudioPlayer
from lab.errors import LabError, QemuError
from lab.events import Event, Source
from vdevice.inventory import QemuInventory
from vdevice.topology import Topology

if TYPE_CHECKING:
    from lab import clock
    from lab.console import Console
    from lab.machine import Machine
    from lab.qemu_process import QemuProcess
    from lab.qmp import QmpSession
    from lab.rebalance import RebalanceReport
    from lab.scenario.model import GuestSpec
    from lab.scenario.steps import Step
    from vdevice.catalog import DeviceModel
    from vdevice.topology import Device

OsName = Literal["linux", "windows"]
AgentKind = Literal["ssh", "winrm"]
KeepDisk = Literal["never", "on-panic", "always"]
KEEP_DISK_CHOICES: tuple[str, ...] = ("never", "on-panic", "always")
AGENTS: dict[str, tuple[str, ...]] = {"linux": ("ssh",), "windows": ("winrm", "ssh")}

#: how long one readiness attempt may take before the Machine looks at QEMU again (a
#: dead QEMU or a bug check must not cost the whole boot deadline). Long enough for a
#: cold PowerShell start behind WinRM.
READY_SLICE_S = 30.0


class Unsupported(LabError):
    """The trigger or step cannot work with this guest, QEMU or device; said plainly,
    detected not assumed."""


CMD_EXE_LIMIT = 8_191


class GuestPanicked(LabError):
    """QEMU reported GUEST_PANICKED (a Windows bug check via hv-crash, or pvpanic).

    The driver's (or the guest's) fault, not the lab's: exit status 1, like a rule
    violation. The event is already in the run's events, so the ``bugcheck`` check of
    the kernel-oops rule reports it; callers catching this should end the iteration
    as FAILED and let the rules run.
    """

    exit_code = 1

    def __init__(self, event: Event) -> None:
        self.event = event
        bc = event.data.get("bugcheck") if isinstance(event.data, Mapping) else None
        self.description = str(bc.get("description")) if isinstance(bc, Mapping) else "guest panicked"
        super().__init__(f"the guest panicked: {self.description} (QMP GUEST_PANICKED)")


class MachineView(Protocol):
    """What a guest strategy may read (and, for ``stopped_at``/``timings``, write) of a Machine."""

    artifacts: Path
    private: Path | None
    ssh_port: int | None
    accel: Accel | None
    topology: Topology
    timings: dict[str, float]
    stopped_at: str | None
    console: Console | None
    qmp: QmpSession | None
    process: QemuProcess | None
    panic: Event | None

    def log(self, message: str) -> None: ...


@dataclass(frozen=True)
class BootFiles:
    """Files a guest made for one machine (``prepare``), handed back to ``release``."""

    disk: Path | None = None
    vars_file: Path | None = None
    created: tuple[Path, ...] = ()


@dataclass(frozen=True)
class GuestArgs:
    """A guest's QEMU arguments, in two groups so the Linux command line keeps its order.

    ``boot`` follows the machine/topology arguments; ``network`` follows the serial
    ports. The NIC forwards ``127.0.0.1:<host port>`` to the guest's agent port only.
    """

    boot: tuple[str, ...]
    network: tuple[str, ...]


ShutdownStep = tuple[str, Callable[[], None]]


def check_machine(m: MachineView) -> None:
    """Raise if waiting on the guest is pointless: a bug check was reported or QEMU died."""
    if m.panic is not None:
        raise GuestPanicked(m.panic)
    if m.process is not None and not m.process.alive():
        raise QemuError(f"QEMU exited while the guest was booting (rc={m.process.returncode()}): "
                        f"{m.process.stderr_tail()}")


@dataclass(frozen=True)
class Seen:
    """What a guest-side device wait saw: its evidence, the guest's name for the device
    (a PnP instance id on Windows) and what the lab's BOUND/UNBOUND event carries."""

    evidence: str
    instance: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)


class DeviceWait(abc.ABC):
    """A guest-side wait for one device. ``begin`` runs before the host acts, so a
    guest that can watch in the background (a shell loop over SSH) costs one round trip
    in total; ``end`` returns what the guest saw or raises ``AgentError`` saying what it
    saw instead; ``close`` is always called."""

    def begin(self) -> None:
        """Start watching (default: nothing; ``end`` does all the work)."""

    @abc.abstractmethod
    def end(self) -> Seen: ...

    def close(self) -> None:
        """Give up a wait that ``end`` did not finish."""


class GuestTrace(abc.ABC):
    """The guest's half of one observation: its events and its clock evidence."""

    #: the timeline's name for this guest's events
    group: ClassVar[str]

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self, alive: bool) -> list[Event]:
        """End tracing and return the guest's events (what arrived, from a dead guest)."""

    def received(self) -> list[Event]:
        """The events received so far, tracing goes on (default: none until ``stop``)."""
        return []

    def snapshot(self, alive: bool) -> list[Event]:
        """Like ``received``, after fresh clock evidence where the guest gives it cheaply."""
        return self.received()

    def samples(self, lines: Sequence[tuple[int, str]]) -> list[clock.SyncSample]:
        """Clock samples found in this observation's console lines."""
        return []

    def mark(self) -> None:
        """Clock evidence at a step boundary, where the guest gives it without a wait
        (default: none). The runner asks for it under ``--record``, whose guest clock
        is not linear in host time (``clock.estimate_monotone``)."""

    def source_alignment(self) -> dict[Source, clock.Alignment] | None:
        """A fixed alignment per source, where the guest's clock is not fitted from samples."""
        return None

    def meta(self) -> dict[str, Any]:
        """What the timeline header says about this guest's tracing."""
        return {}


class TriggerHalves:
    """The guest half of each rebalance trigger (``lab.rebalance`` does the host half:
    the QMP actions and the query-pci/trace evidence). A guest that cannot do one
    raises ``Unsupported`` with the reason; the defaults are what a guest without any
    does."""

    def rescan(self, m: Machine, rep: RebalanceReport, dev_id: str, remove: str) -> None:
        """Make the guest assign the device's resources afresh and wait for its driver."""
        raise Unsupported("the rescan trigger is not available on this guest")

    def pressure_seen(self, m: Machine, rep: RebalanceReport, dev_id: str, pressure_id: str,
                      model: str, t0: float) -> None:
        """After the host plugged the pressure device: what the guest made of it."""

    def cpu_added(self, m: Machine, rep: RebalanceReport, add: Callable[[], None]) -> None:
        """Hot-add one vCPU (``add`` does it on the host) and see the guest take it."""
        add()

    def capabilities(self, m: Machine, bdf: str) -> list[int]:
        """The PCIe extended capability ids of ``bdf`` as the guest reads them."""
        raise Unsupported("this guest's config space is not read by the lab")

    def wdtf(self, m: Machine, dev_id: str, *, action: str, target: str,
             instance: str | None) -> RebalanceReport:
        """Put the device through a WDTF action (Windows' driver test framework)."""
        raise Unsupported("the wdtf trigger drives WDTF, Windows' driver test framework, "
                          "which this guest does not have")


class GuestOs(abc.ABC):
    """What the lab needs to know about the guest it runs. See the module docstring."""

    os: OsName
    agent_kind: AgentKind
    guest_port: int
    #: the rules a scenario without ``rules:`` is checked with
    default_rules: ClassVar[tuple[str, ...]]

    # ---- before any VM: the scenario --------------------------------------------------
    @classmethod
    def refused_step(cls, step: Step, spec: GuestSpec) -> str | None:
        """Why this guest cannot run ``step`` (the loader names the step's line), or None."""
        return None

    @classmethod
    def record_refusal(cls) -> str | None:
        """Why this guest cannot run under QEMU's record/replay (which needs TCG), or None."""
        return (f"record/replay needs TCG (QEMU cannot record under KVM); a {cls.os} guest "
                "runs only under KVM here")

    def check_scenario(self, steps: Iterable[Step]) -> None:
        """Refuse (LabError naming the step) what this guest's agent cannot do."""

    def snapshot_refusal(self) -> str | None:
        """Why ``reset: snapshot`` is refused for this guest, or None."""
        return "reset: snapshot is not verified for this guest; use reset: reboot or replug"

    # ---- booting ----------------------------------------------------------------------
    @abc.abstractmethod
    def choose_accel(self, binary: str, want: str | None) -> Accel:
        """The accelerator to run on; raise (creating nothing) if this guest cannot."""

    def preflight(self, binary: str, inventory: QemuInventory, accel: Accel,
                  log: Callable[[str], None]) -> None:
        """Checks that must pass before any file or process is created."""

    def adjust_topology(self, topology: Topology) -> Topology:
        """The topology this guest can boot with (default: as given)."""
        return topology

    def prepare(self, m: MachineView) -> BootFiles:
        """Per-machine files, made after the accelerator and preflight checks passed."""
        return BootFiles()

    @abc.abstractmethod
    def qemu_args(self, m: MachineView, files: BootFiles) -> GuestArgs: ...

    def wait_boot(self, m: MachineView) -> None:
        """Wait for a boot milestone seen without the agent (a console marker)."""

    @abc.abstractmethod
    def make_agent(self, m: MachineView) -> Agent: ...

    @abc.abstractmethod
    def wait_agent(self, m: MachineView, agent: Agent) -> None:
        """Block until ``agent`` answers, under this guest's deadline."""

    def before_stop(self, m: MachineView, agent: Agent) -> None:
        """Collect what only a live guest can give, before the shutdown ladder."""

    @abc.abstractmethod
    def shutdown_steps(self, m: MachineView, agent: Agent | None) -> list[ShutdownStep]:
        """The polite rungs of the ladder, before QEMU's SIGTERM/SIGKILL."""

    def release(self, m: MachineView, files: BootFiles) -> dict[str, Any]:
        """Remove (or keep) ``prepare``'s files once QEMU is gone; returns what happened."""
        return {}

    # ---- what a run records -----------------------------------------------------------
    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """What a run records about the guest (never a secret)."""

    @abc.abstractmethod
    def describe_image(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """The guest's software versions a report names (kernel release, Windows build)."""

    def image_hash(self) -> str | None:
        """A digest of what the image was built from, when the lab built it."""
        return None

    def boot_files(self) -> dict[str, Path]:
        """The read-only files a VM boots from (a recording keeps their digests: one
        rebuilt meanwhile makes the recording unreplayable)."""
        return {}

    def kernel_log(self, agent: Agent) -> str | None:
        """The guest kernel's log, where it has one the agent can read."""
        return None

    @abc.abstractmethod
    def audio_player(self) -> AudioPlayer:
        """How this guest plays the lab's audio signal and knows its PCM is back."""

    # ---- devices ----------------------------------------------------------------------
    @abc.abstractmethod
    def bound_wait(self, m: Machine, dev: Device, bdf: str | None,
                   timeout: float) -> DeviceWait | None:
        """A wait until the guest's driver for ``dev`` is up, or None when this guest
        has none for its model (nothing to wait for)."""

    @abc.abstractmethod
    def gone_wait(self, m: Machine, dev: Device, bdf: str | None,
                  timeout: float) -> DeviceWait | None:
        """A wait until the guest no longer has ``dev``, or None when it cannot tell."""

    def driver_of(self, m: Machine, dev_id: str) -> str | None:
        """The driver the guest has bound to device ``dev_id`` now, where it can say cheaply."""
        return None

    def driver_names(self, model: DeviceModel) -> tuple[str, ...]:
        """The names under which this guest's events name ``model``'s driver."""
        return ()

    def load_module(self, m: Machine, name: str, params: Mapping[str, str], *,
                    reload: bool, unload: bool) -> str:
        """(Re)load or unload the guest kernel module ``name`` with ``params`` (the
        ``module`` step); a guest without loadable modules refuses it."""
        raise Unsupported(f"a {self.os} guest has no kernel modules the lab loads")

    # ---- tracing ----------------------------------------------------------------------
    @abc.abstractmethod
    def trace(self, m: Machine, *, kprobes: bool = True) -> GuestTrace:
        """The guest's half of a new observation (not started)."""

    # ---- the guest half of each rebalance trigger -------------------------------------
    def triggers(self) -> TriggerHalves:
        """The guest half of each rebalance trigger (default: none it can do)."""
        return TriggerHalves()


__all__ = ["GuestOs", "GuestTrace", "TriggerHalves", "DeviceWait", "Seen", "Unsupported", "GuestPanicked",
           "GuestArgs", "BootFiles", "MachineView", "ShutdownStep", "check_machine",
           "KEEP_DISK_CHOICES", "AGENTS", "READY_SLICE_S", "OsName", "AgentKind", "KeepDisk"]
