"""A Windows guest's half of the rebalance triggers: the PnP state of the devices
involved (Get-PnpDevice), a processor hot-add on a Windows Server, and WDTF's Enhanced
Device Testing, which makes Windows stop one device and restart it (with new resources,
cancelled, or failing) as the HLK Device Fundamentals PnP tests do."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lab.deadline import poll, seconds
from lab.errors import LabError
from lab.guest.base import TriggerHalves
from vdevice.catalog import get_model

if TYPE_CHECKING:
    from lab.machine import Machine
    from lab.rebalance import RebalanceReport


def pnp_state(m: Machine, hardware_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Present devnodes matching ``hardware_ids`` (Get-PnpDevice: instance id, status,
    problem code, driver INF), as JSON for the report."""
    from lab.guest.windows import driver_check
    from lab.guest.windows.trace.common import run_structured

    assert m.agent is not None
    found = driver_check.parse_state(run_structured(m.agent, driver_check.state_script(hardware_ids)))
    return [{"instance_id": d.instance_id, "status": d.status, "problem_code": d.problem_code,
             "problem": d.problem, "driver_inf": d.driver_inf} for d in found]


class WindowsTriggers(TriggerHalves):
    """The Windows guest half of each trigger (module docstring)."""

    def pressure_seen(self, m: Machine, rep: RebalanceReport, dev_id: str, pressure_id: str,
                      model: str, t0: float) -> None:
        """No sysfs: the host's query-pci diff is the evidence, with the PnP state of both
        devices from Get-PnpDevice.

        Windows hands resources to a device it starts (the arbiter assigns them on the way
        to IRP_MN_START_DEVICE); pci-testdev/ivshmem have no in-box driver, so the newcomer
        is expected to sit with a problem code and take nothing, in which case nothing
        rebalances (unverified on a real guest: the report shows what happened).
        """
        pressure_hwids = tuple(h for h in (get_model(model).windows_hwid,) if h)
        audio = m.topology.device(dev_id).catalog()
        audio_hwids = tuple(h for h in (audio.windows_hwid,) if h)
        if not pressure_hwids:
            raise LabError(f"{model} has no Windows hardware id in the catalog: the guest's view of "
                           "it cannot be checked")

        def seen() -> list[dict[str, Any]] | None:
            return pnp_state(m, pressure_hwids) or None

        # each probe is a PowerShell launch in the guest: at most one a second
        state = poll(f"{pressure_id} ({', '.join(pressure_hwids)}) to appear in the guest's "
                     "Get-PnpDevice", seconds("driver_bound"), seen, ceiling=1.0)
        rep.durations_ms["guest_sees"] = (time.monotonic() - t0) * 1e3
        after = pnp_state(m, audio_hwids) if audio_hwids else []
        rep.details.update({"pressure_guest_state": state, "device_guest_state": after})
        for d in state:
            what = (f"problem code {d['problem_code']} ({d['problem']})" if d["problem_code"]
                    else f"status {d['status']}")
            rep.notes.append(f"pressure device {d['instance_id']}: {what} in the guest"
                             + ("; a device Windows does not start takes no resources, so "
                                "nothing had to move" if d["problem_code"] else ""))
        for d in after:
            rep.notes.append(f"{dev_id} ({d['instance_id']}): status {d['status']}"
                             + (f", problem code {d['problem_code']} ({d['problem']})"
                                if d["problem_code"] else ""))

    def cpu_added(self, m: Machine, rep: RebalanceReport, add: Callable[[], None]) -> None:
        """A Windows Server guest (the loader refused Windows 10/11: ``CPU_HOTPLUG_CLIENT``);
        the host's diff is the evidence."""
        add()
        rep.notes.append("Windows Server: a processor hot-add makes a dynamically partitionable "
                         "server rebalance")

    def wdtf(self, m: Machine, dev_id: str, *, action: str, target: str,
             instance: str | None) -> RebalanceReport:
        """WDTF's Enhanced Device Testing puts ``dev_id`` through ``action``
        (``lab.guest.windows.wdtf``: restart, rebalance, cancel-stop, fail-restart).

        The EDT filter is attached first (its ``Enable`` restarts the device, so it runs
        before the evidence starts); then the action runs inside ``query-pci`` snapshots and
        QEMU's trace. For ``rebalance`` the host's diff is the proof: WDTF's success flag
        says the request went through, a BAR of ``dev_id`` that moved says Windows really
        gave the device new resources, and the report says plainly when none moved (the
        stop is not guaranteed: another driver may veto the query-stop).
        """
        from lab import rebalance as rb
        from lab.guest.windows import wdtf as W

        method = W.method_for(action)
        dev = m.topology.device(dev_id)
        model = dev.catalog()
        if target == "function":
            hwids = model.function_hwids
            if not hwids:
                raise LabError(f"{dev_id} ({model.driver}) has no function devnode: only an HD Audio "
                               "controller has one (use target: pci)")
        elif target == "pci":
            hwids = tuple(h for h in (model.windows_hwid,) if h)
            if not hwids:
                raise LabError(f"{model.driver} has no Windows hardware id in the catalog")
        else:
            raise LabError(f"wdtf target must be pci or function, not {target!r}")
        if dev_id not in m.present:
            raise LabError(f"{dev_id} is not plugged in; plug it before the wdtf {action}")
        assert m.agent is not None
        prepared = W.prepare(m.agent, W.WdtfTarget(hardware_ids=hwids, instance_id=instance))
        rep, ev = rb.begin(m, f"wdtf-{action}", dev_id)
        outcome = W.run_action(m.agent, action, prepared.instance_id)
        rep.durations_ms[method] = outcome.elapsed_ms if outcome.elapsed_ms is not None else \
            (time.time_ns() - rep.started_ns) / 1e6
        rep.details.update({"wdtf": outcome.to_json(), "target": target,
                            "edt_enabled_by_lab": prepared.enabled_now})
        if prepared.enabled_now:
            rep.notes.append(f"EDT filter attached to {prepared.instance_id} (Enable restarted the "
                             "device before the evidence began)")
        rep.notes.append(outcome.summary())
        rep.notes.append(f"expected: {W.EXPECTED[action]}")
        rep = rb.end(m, rep, ev)
        moved = [c for c in rep.changes if c.device == dev_id and c.what.startswith("BAR")
                 and c.old_address != c.new_address]
        rep.details["bar_moves"] = [c.to_json() for c in moved]
        if action == "rebalance":
            rep.notes.append(
                "the host saw " + ", ".join(f"{c.what} {c.old} -> {c.new}" for c in moved)
                if moved else
                f"the host saw no BAR of {dev_id} move: Windows kept its resources (a veto of the "
                "query-stop, or the same range assigned again); this was no rebalance onto new "
                "resources")
        elif moved:
            rep.notes.append(f"{dev_id}'s BARs moved although {action} keeps the resources")
        return rep
