"""``rebalance``: make the guest OS move PCI resources, by one of several triggers.

The YAML key is one (``rebalance: {trigger: ...}``); each trigger is a class of its
own, with its fields, checks and execution (``lab.rebalance`` does the work).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import field_validator, model_validator

from lab.scenario.units import BarSize, BarSizeOrAuto, Id, Int, Str
from lab.steps.base import (ParseContext, PropValue, StepBase, StepContext, check_model,
                            check_props, step_kind, validate_args)
from vdevice.yamlsrc import Located, YamlPath, unknown

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState


@step_kind
class RebalanceBase(StepBase):
    """The ``rebalance`` key; ``trigger`` picks the class (``REBALANCE_TRIGGERS``)."""

    step_type: ClassVar[str] = "rebalance"

    def describe(self) -> str:
        dev = getattr(self, "device", None)
        return f"rebalance {getattr(self, 'trigger', '?')}" + (f" {dev}" if dev else "")

    @classmethod
    def parse(cls, located: Located, apath: YamlPath, ctx: ParseContext) -> StepBase:
        data = located.get(apath)
        if not isinstance(data, Mapping):
            raise located.error("rebalance takes a mapping with a trigger, e.g. "
                                "{trigger: rescan, device: snd0}", apath)
        if "trigger" not in data:
            raise located.error("rebalance needs a trigger (one of: "
                                f"{', '.join(REBALANCE_TRIGGERS)})", apath)
        trig = data["trigger"]
        if not isinstance(trig, str) or trig not in REBALANCE_TRIGGERS:
            raise located.error(unknown("trigger", trig, list(REBALANCE_TRIGGERS)),
                                apath + ("trigger",))
        return validate_args(REBALANCE_TRIGGERS[trig], located, apath, dict(data), ctx)

    def verify(self, chk: RefChecker, st: RefState) -> None:
        """The device a trigger names must be there (not unplugged before it)."""
        dev = getattr(self, "device", None)
        if dev is not None:
            chk.present(dev, st, self.field_path("device"), "rebalance")


class RebalancePressure(RebalanceBase):
    """Plug a resource-hungry device so the OS must move windows/BARs around ``device``.

    ``placement``: ``same-port`` (behind the device's own port: only with a switch),
    ``sibling`` (another port under the same root), ``root`` (a different root port).
    ``port`` names the pressure device's port explicitly instead. ``size: auto`` lets
    the lab pick a BAR that does not fit the current window. The pressure device gets
    QEMU id ``id`` (default ``<device>-pressure``) and counts as plugged afterwards.
    """

    trigger: Literal["pressure"] = "pressure"
    record_refusal: ClassVar[str | None] = (
        "the pressure trigger hot-plugs a device through QMP, not in the replay log; put "
        "the pressure device cold in the topology and rebalance with the guest-side rescan "
        "trigger")
    device: Id
    size: BarSizeOrAuto = "auto"
    placement: Literal["same-port", "sibling", "root"] | None = None
    port: Id | None = None
    model: Literal["pci-testdev", "ivshmem-plain"] = "pci-testdev"
    id: Id | None = None

    @model_validator(mode="after")
    def _placement(self) -> RebalancePressure:
        if self.placement is not None and self.port is not None:
            raise ValueError("give placement or port for the pressure device, not both")
        return self

    @property
    def pressure_id(self) -> str:
        return self.id or f"{self.device}-pressure"

    @property
    def effective_placement(self) -> str:
        return self.placement or ("port" if self.port else "sibling")

    def verify(self, chk: RefChecker, st: RefState) -> None:
        super().verify(chk, st)
        if self.port is not None:
            chk.port(self.port, self.field_path("port"))
        chk.plug(self.pressure_id, st, self.field_path("id"), chk.where(self))

    def execute(self, ctx: StepContext) -> str:
        from lab import rebalance as rb

        placement = self.placement or "sibling"
        if placement == "same-port":
            placement = "sibling"
        return rb.pressure(ctx.machine, self.device,
                           size=None if self.size == "auto" else int(self.size),
                           placement=placement, model=self.model,
                           pressure_id=self.pressure_id, port=self.port).summary()


class RebalanceRescan(RebalanceBase):
    """Make the guest re-enumerate: remove ``remove`` (the device's port, default, or the
    device itself) in sysfs, then rescan the bus. Linux moves windows and BARs only
    this way (PLATFORM.md), with driver unbind and rebind."""

    trigger: Literal["rescan"] = "rescan"
    device: Id
    remove: Literal["port", "device", "none"] = "port"

    def execute(self, ctx: StepContext) -> str:
        from lab import rebalance as rb
        return rb.rescan(ctx.machine, self.device, remove=self.remove).summary()


class RebalanceCpuHotplug(RebalanceBase):
    """Hot-plug vCPUs (Windows rebalances on its own when it sees them)."""

    trigger: Literal["cpu-hotplug"] = "cpu-hotplug"
    record_refusal: ClassVar[str | None] = (
        "the cpu-hotplug trigger is a QMP device_add of a CPU, not in the replay log; give "
        "the topology the CPUs cold")
    count: Int = 1
    device: Id | None = None

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError(f"count must be 1..64, got {v}")
        return v

    def verify(self, chk: RefChecker, st: RefState) -> None:
        # known is enough: the device need not be present
        if self.device is not None:
            chk.known(self.device, st, self.field_path("device"))

    def execute(self, ctx: StepContext) -> str:
        from lab import rebalance as rb
        return "; ".join(rb.cpu_hotplug(ctx.machine, self.device).summary()
                         for _ in range(self.count))


class RebalanceReconfigure(RebalanceBase):
    """Replace ``device`` with the same id but another model and/or properties."""

    trigger: Literal["reconfigure"] = "reconfigure"
    record_refusal: ClassVar[str | None] = (
        "reconfigure replaces the device through QMP (device_del + device_add), not in the "
        "replay log; run one iteration per model with the model cold in the topology")
    device: Id
    model: Str | None = None
    props: dict[Str, PropValue] = {}

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return None if v is None else check_model(v, hotplug=True)

    @model_validator(mode="after")
    def _something(self) -> RebalanceReconfigure:
        if self.model is None and not self.props:
            raise ValueError("reconfigure needs a new model or props (or both)")
        check_props(self.model, self.props)
        return self

    def execute(self, ctx: StepContext) -> str:
        from lab import rebalance as rb
        return rb.reconfigure(ctx.machine, self.device, model=self.model,
                              props={k: str(v) for k, v in self.props.items()}).summary()


class RebalanceResize(RebalanceBase):
    """Re-create ``device`` (a pressure device) with a BAR of ``size``."""

    trigger: Literal["resize"] = "resize"
    record_refusal: ClassVar[str | None] = (
        "resize is not recordable (and QEMU 7.2's audio devices have no Resizable BAR)")
    device: Id
    size: BarSize

    def execute(self, ctx: StepContext) -> None:
        from lab import rebalance as rb
        rb.resize(ctx.machine, self.device)
        return None


class RebalanceWdtf(RebalanceBase):
    """Windows only: have WDTF's Enhanced Device Testing filter put ``device`` through a
    documented PnP sequence (``lab.guest.windows.wdtf``), as Microsoft's HLK PnP tests do.

    ``action``: ``restart`` (QUERY_STOP, STOP, START with the same resources),
    ``rebalance`` (the same, forced onto new resources: the host checks a BAR moved),
    ``cancel-stop`` (a query-stop that is vetoed, then CANCEL_STOP), ``fail-restart``
    (the restart after STOP fails: SURPRISE_REMOVAL and REMOVE follow).
    ``target``: ``pci`` (default; the devnode that owns the BARs) or ``function`` (an
    HDA controller's codec function devnode, where a PortCls driver binds; WDTF's docs
    warn that a devnode without hardware resources may get CANCEL_STOP instead).
    ``instance`` pins the exact device instance id when several devices match.
    """

    trigger: Literal["wdtf"] = "wdtf"
    device: Id
    action: Literal["restart", "rebalance", "cancel-stop", "fail-restart"]
    target: Literal["pci", "function"] = "pci"
    instance: Str | None = None

    @field_validator("instance")
    @classmethod
    def _instance(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from lab.guest.windows.trace.common import looks_like_instance_id
        if not looks_like_instance_id(v):
            raise ValueError(f"{v!r} is not a device instance id (ENUMERATOR\\DEVICE-ID\\INSTANCE, "
                             "as Get-PnpDevice shows it)")
        return v

    def describe(self) -> str:
        return f"rebalance wdtf {self.action} {self.device}"

    def execute(self, ctx: StepContext) -> str:
        from lab import rebalance as rb
        return rb.wdtf(ctx.machine, self.device, action=self.action, target=self.target,
                       instance=self.instance).summary()


REBALANCE_TRIGGERS: dict[str, type[RebalanceBase]] = {
    "pressure": RebalancePressure, "rescan": RebalanceRescan,
    "cpu-hotplug": RebalanceCpuHotplug, "reconfigure": RebalanceReconfigure,
    "resize": RebalanceResize, "wdtf": RebalanceWdtf,
}

#: What each trigger does and does not exercise, per guest OS: the one table behind
#: ``rebalab rebalance --help``, the README's "Rebalance triggers" and the validator's
#: refusals. Sources are cited where the code relies on them (lab/rebalance.py,
#: lab/guest/windows/wdtf.py).
TRIGGER_EXERCISES: dict[str, dict[str, str]] = {
    "rescan": {
        "linux": "removes the device's port in sysfs and rescans: windows and BARs assigned "
                 "afresh, driver unbind + rebind (remove + re-probe, not a stop)",
        "windows": "refused: Linux sysfs; use wdtf",
    },
    "pressure": {
        "linux": "hot-plugs a device whose BAR does not fit: native mode re-assigns the port "
                 "window; ACPI mode leaves the BAR unassigned (the report says which)",
        "windows": "hot-plugs the same device; host diff plus the guest's PnP state of both "
                   "devices. Windows assigns resources to a device it starts, and pci-testdev "
                   "has no inbox driver, so expect no QUERY_STOP/STOP (unverified)",
    },
    "cpu-hotplug": {
        "linux": "onlines a hot-added vCPU; no PCI resource moves",
        "windows": "Windows Server on a dynamically partitionable machine rebalances after "
                   "a processor hot-add (DEVPKEY_Device_DHP_Rebalance_Policy); refused on "
                   "Windows 10/11, unverified under QEMU on Server",
    },
    "reconfigure": {
        "linux": "unplug + plug with another model or properties: remove and probe, no stop",
        "windows": "the same: removal of the devnode (device_del asks for an eject, so "
                   "QUERY_REMOVE/REMOVE are expected) then START of a new one; no "
                   "QUERY_STOP/STOP",
    },
    "resize": {
        "linux": "Resizable BAR: QEMU 7.2's audio devices have none (refused, exit 2)",
        "windows": "refused: the capability check reads Linux sysfs",
    },
    "wdtf": {
        "linux": "refused: WDTF is Windows' driver test framework",
        "windows": "WDTF's EDT filter sends one device QUERY_STOP/STOP/START (restart), the "
                   "same with new resources (rebalance: a real BAR move, checked on the host), "
                   "a vetoed query-stop then CANCEL_STOP (cancel-stop), or a failed restart "
                   "then SURPRISE_REMOVAL/REMOVE (fail-restart)",
    },
}
