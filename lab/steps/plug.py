"""``plug`` and ``unplug``: QMP device_add / device_del.

Both return as soon as QEMU accepted the request; a watcher thread records the
outcome (``bound`` / ``device-deleted`` / ``unbound``) in the background.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import field_validator, model_validator

from lab.scenario.units import BarSize, Id, Str
from lab.steps.base import PropValue, StepBase, StepContext, check_model, check_props, step_kind

if TYPE_CHECKING:
    from lab.scenario.loader import RefChecker, RefState

#: the recordable alternative to a hot-plug (lab.record)
RECORD_COLD = ("place the device cold in the topology (placement: cold) and let the guest "
               "remove and rescan it: rebalance: {trigger: rescan}")


@step_kind
class Plug(StepBase):
    """Hot-plug a device (QMP ``device_add``); returns once QEMU accepted it.

    ``model``/``port`` may be left out for a device the topology declares.
    ``size`` is the BAR a pressure-type model asks for (``pci-testdev`` membar).
    """

    step_type: ClassVar[str] = "plug"
    shorthand: ClassVar[str | None] = "device"
    record_refusal: ClassVar[str | None] = (
        "plug is a QMP device_add, which the replay log does not hold (the replay would "
        "stall where it was made); " + RECORD_COLD)
    device: Id
    model: Str | None = None
    port: Id | None = None
    size: BarSize | None = None
    props: dict[Str, PropValue] = {}

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | None) -> str | None:
        return None if v is None else check_model(v, hotplug=True)

    @model_validator(mode="after")
    def _props(self) -> Plug:
        check_props(self.model, self.props)
        return self

    def describe(self) -> str:
        extra = " @ ".join(x for x in (self.model, self.port) if x)
        return f"plug {self.device}" + (f" ({extra})" if extra else "")

    def verify(self, chk: RefChecker, st: RefState) -> None:
        if self.device not in chk.topo_devices and (self.model is None or self.port is None):
            missing = " and ".join(x for x, v in (("model", self.model), ("port", self.port))
                                   if v is None)
            chk.fail(f"device {self.device!r} is not in the topology, so plug needs its "
                     f"{missing}", self.field_path())
        if self.port is not None:
            chk.port(self.port, self.field_path("port"))
        chk.plug(self.device, st, self.field_path("device"), chk.where(self))

    def execute(self, ctx: StepContext) -> str:
        from lab import operations as ops
        from lab.errors import LabError
        from vdevice.topology import Device, Placement

        base = ctx.topology_device(self.device)
        model = self.model or (base.model if base else None)
        port = self.port or (base.port if base else None)
        if model is None or port is None:
            raise LabError(f"{self.where}: plug {self.device} needs a model and a port")
        dev = Device(self.device, model, port, Placement.HOT,
                     {k: str(v) for k, v in self.props.items()}, None,
                     int(self.size) if self.size is not None else (base.size if base else None))
        m = ctx.machine
        ctx.background(f"plug {dev.id}", lambda ack: ops.plug(m, dev, on_requested=ack))
        return f"{model} into {port}"


@step_kind
class Unplug(StepBase):
    """Request removal (QMP ``device_del``); returns once QEMU accepted the request.

    Wait for the removal with ``wait: {event: device-deleted, device: X}`` (works for
    every model; the lab derives it from QOM for ``ich9-intel-hda``, which emits no
    DEVICE_DELETED in QEMU 7.2) or ``wait: {qmp: DEVICE_DELETED, ...}``.
    """

    step_type: ClassVar[str] = "unplug"
    shorthand: ClassVar[str | None] = "device"
    record_refusal: ClassVar[str | None] = (
        "unplug is a QMP device_del, not in the replay log; remove the device from the "
        "guest instead (rebalance: {trigger: rescan}, or a guest step writing 1 to "
        "/sys/bus/pci/devices/BDF/remove)")
    device: Id

    def describe(self) -> str:
        return f"unplug {self.device}"

    def verify(self, chk: RefChecker, st: RefState) -> None:
        path = self.field_path("device")
        chk.known(self.device, st, path)
        if st.devices.get(self.device) == st.ABSENT:
            chk.fail(f"device {self.device!r} is already unplugged "
                     f"({st.changed_at.get(self.device, '?')})", path)
        st.devices[self.device] = st.ABSENT
        st.changed_at[self.device] = f"at {chk.where(self)}"

    def execute(self, ctx: StepContext) -> str:
        from lab import operations as ops

        m = ctx.machine
        ctx.background(f"unplug {self.device}",
                       lambda ack: ops.unplug(m, self.device, on_requested=ack))
        return self.device
