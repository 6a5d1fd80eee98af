"""PCI resources: a device whose BARs the kernel could not place.

A device with a BAR left unassigned cannot work at all (Linux will not enable a
device whose memory or I/O resources are unassigned: ``pci_enable_resources`` fails
with "not claimed; can't enable device"), and on real machines it is the trace a
rebalance bug leaves when a hot-plugged device's windows do not fit. Linux retries
("PCI: No. 2 try to assign unassigned res") and may succeed on a later pass, so
only a resource that stays unassigned to the end of the evidence counts.

Evidence: ``Kind.RESOURCE_UNASSIGNED`` / ``Kind.RESOURCES_ASSIGNED`` events from the
kernel-log parser (lab.logs.kernel), ``data["resource"]`` naming the BAR
(``"BAR 0"``) or ``"bridge window"``. Bridge windows belong to a port, not to the
device under test: they are judged only for devices named explicitly.
"""

from __future__ import annotations

from collections.abc import Mapping

from lab.events import Event, Kind, Source
from lab.results import Violation
from lab.rules.base import RuleContext, register, violation
from lab.timeline import Timeline

_KINDS = (Kind.RESOURCE_UNASSIGNED, Kind.RESOURCES_ASSIGNED)


def _resource_key(ev: Event) -> str:
    res = str(ev.data.get("resource") or "?")
    bar = ev.data.get("bar")
    if res == "bridge window":
        # one port has up to three windows: io, mem, prefetchable mem
        return f"window:{ev.data.get('space')}:{bool(ev.data.get('prefetch'))}"
    return f"bar:{bar}" if bar is not None else res


def _is_window(ev: Event) -> bool:
    """Not the device's own BAR. Old wording numbers a bridge's windows as resources:
    13-16 with CONFIG_PCI_IOV (7-12 are then SR-IOV VF BARs), 7-10 without it
    (include/linux/pci.h: PCI_BRIDGE_RESOURCES follows PCI_IOV_RESOURCE_END). Both
    ranges are left to named devices: neither is a BAR the device's function needs."""
    if ev.data.get("resource") in ("bridge window",) or str(ev.data.get("resource", "")).startswith("VF "):
        return True
    bar = ev.data.get("bar")
    return isinstance(bar, int) and bar >= 7


class PciResourceRules:
    id = "pci-resources"
    description = "PCI resources: BARs and bridge windows the kernel could not assign"
    checks: Mapping[str, str] = {
        "pci.resource-unassigned": "a device's BAR (or, for a named device, bridge window) "
                                   "stayed unassigned to the end of the evidence",
    }

    def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]:
        open_: dict[tuple[str, str], Event] = {}
        for ev in timeline.select(kinds=_KINDS):
            if ev.source not in (Source.GUEST_KERNEL,) or ev.device is None:
                continue
            if not context.under_test(ev.device):
                continue
            if _is_window(ev) and not context.devices:
                continue
            if ev.data.get("resource") == "ROM" or ev.data.get("bar") == 6:
                continue      # an expansion ROM is optional: unassigned, the device still works
            key = (context.label(ev.device), _resource_key(ev))
            if ev.kind == Kind.RESOURCE_UNASSIGNED:
                open_.setdefault(key, ev)
            else:
                open_.pop(key, None)
        out: list[Violation] = []
        for (label, _), ev in open_.items():
            what = str(ev.data.get("resource") or "a resource")
            if ev.data.get("bar") is not None and what == "BAR":
                what = f"BAR {ev.data['bar']}"
            size = ev.data.get("size")
            reason = ev.data.get("reason") or "could not be assigned"
            out.append(violation(
                "pci.resource-unassigned", label, context.phase_at(ev.t_host_ns),
                f"{what} of {label}"
                + (f" ({ev.data.get('space') or 'mem'} size {size:#x})" if isinstance(size, int) else "")
                + f": {reason}, and it was never assigned later; the device cannot be "
                  "enabled with that resource missing.",
                [ev], resource=what, size=size))
        return out


register(PciResourceRules())
