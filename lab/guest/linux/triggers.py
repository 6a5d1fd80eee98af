"""The Linux guest's half of the rebalance triggers: sysfs remove/rescan, the guest's
view of a pressure device's BAR, onlining a hot-added CPU, reading config space.

Linux never moves a running device's BARs for a sibling (PLATFORM.md); removing the
port subtree and rescanning makes it assign windows and BARs afresh, with driver
unbind and rebind, which is the closest Linux analogue of a Windows rebalance.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from lab import operations as ops
from lab.deadline import poll, seconds
from lab.errors import AgentError, LabError
from lab.guest.base import TriggerHalves, Unsupported
from lab.guest.linux.waits import bound_command
from vdevice.sizes import fmt_size

if TYPE_CHECKING:
    from lab.machine import Machine
    from lab.rebalance import RebalanceReport


def driver_of(m: Machine, bdf: str) -> str | None:
    """The driver bound to ``bdf`` in the guest right now (its sysfs link), or None."""
    assert m.agent is not None
    r = m.agent.run_argv(["readlink", f"/sys/bus/pci/devices/{bdf}/driver"], timeout=10,
                         idempotent=True)
    return r.stdout.strip().rsplit("/", 1)[-1] if r.ok and r.stdout.strip() else None


def _bar_assigned(m: Machine, bdf: str | None, bar: int) -> bool:
    """Did the guest give the BAR an address? Read from sysfs ``resource``.

    QEMU maps a BAR only while the device's decode is on, and a pressure device has no
    driver to turn it on, so the host cannot see this one; the host evidence for
    pressure is the bridge window change, which the diff reports.
    """
    assert m.agent is not None
    if bdf is None:
        return False
    r = m.agent.run_argv(["cat", f"/sys/bus/pci/devices/{bdf}/resource"])
    lines = r.stdout.splitlines() if r.ok else []
    if len(lines) <= bar:
        return False
    start, end, _flags = (int(x, 16) for x in lines[bar].split()[:3])
    return start != 0 and end > start


def _guest_cpus(m: Machine) -> int:
    assert m.agent is not None
    r = m.agent.run("ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l")
    return int(r.stdout.strip() or 0)


class LinuxTriggers(TriggerHalves):
    """The Linux guest half of each trigger (module docstring)."""

    def rescan(self, m: Machine, rep: RebalanceReport, dev_id: str, remove: str) -> None:
        """Remove the device's root port (or the device), rescan the bus, wait for the rebind.

        One SSH command does both (each costs 0.1-0.4 s under TCG, most right after a
        snapshot restore); the guest's kprobes time the removal itself. The rebind is the
        bind uevent's console line, watched from before the removal (``UeventWait``), so
        waiting costs no command either; if the rescan gave the device another address,
        the guest is asked at that one.
        """
        assert m.agent is not None
        dev = m.topology.device(dev_id)
        root = m.topology.root_port_of(dev.port)
        target = root if remove == "port" else dev_id
        port_bdf = ops.device_bdf_from_qemu(m, target)
        if port_bdf is None:
            raise LabError(f"{target} not found in query-pci")
        model = dev.catalog()
        sh = m.agent.shell
        old_bdf = ops.device_bdf_from_qemu(m, dev_id) if model.linux_driver else None
        wait = (m.guest.bound_wait(m, dev, old_bdf, seconds("driver_bound"))
                if old_bdf is not None else None)
        if wait is not None:
            wait.begin()
        t0 = time.monotonic()
        script = "echo 1 > /sys/bus/pci/rescan"          # twice is harmless
        if remove != "none":
            # idempotent by construction: a removed device has no `remove` file, so sending
            # this again after a connection lost mid-command (the command may have run) finds
            # it gone and succeeds, instead of failing the iteration with "nonexistent directory"
            node = sh.quote(f"/sys/bus/pci/devices/{port_bdf}/remove")
            script = f"if [ -e {node} ]; then echo 1 > {node}; fi; {script}"
        try:
            m.agent.run(script, idempotent=True).check()
        except BaseException:
            if wait is not None:
                wait.close()
            raise
        rep.durations_ms["rescan"] = (time.monotonic() - t0) * 1e3
        if model.linux_driver:
            bdf = poll(f"{dev_id} to reappear in query-pci after rescan", seconds("driver_bound"),
                       lambda: ops.device_bdf_from_qemu(m, dev_id))
            if wait is not None and bdf == old_bdf:
                try:
                    wait.end()
                    rep.rebound = True
                except AgentError:
                    rep.rebound = False
            else:
                if wait is not None:
                    wait.close()
                ok = m.agent.run(bound_command(m.agent, bdf, model.linux_driver,
                                               seconds("driver_bound")),
                                 idempotent=True, timeout=seconds("driver_bound") + 5)
                rep.rebound = ok.ok
            rep.durations_ms["rebound"] = (time.monotonic() - t0) * 1e3
        rep.details["removed"] = {"what": remove, "id": target, "bdf": port_bdf}

    def pressure_seen(self, m: Machine, rep: RebalanceReport, dev_id: str, pressure_id: str,
                      model: str, t0: float) -> None:
        """Wait until the guest enumerated the pressure device, then read whether its BAR got
        an address: in native mode Linux retries ("No. 2 try to assign unassigned res"),
        releasing and re-assigning the port window; in ACPI mode the BAR stays unassigned."""
        agent = m.agent
        assert agent is not None
        bdf = ops.device_bdf_from_qemu(m, pressure_id)
        poll(f"{pressure_id} to appear in the guest", seconds("driver_bound"),
             lambda: True if agent.run_argv(["test", "-e", f"/sys/bus/pci/devices/{bdf}"]).ok
             else None)
        rep.durations_ms["guest_sees"] = (time.monotonic() - t0) * 1e3
        bar_index = 2 if model in ("pci-testdev", "ivshmem-plain") else 0
        assigned = _bar_assigned(m, bdf, bar_index)
        size = int(rep.details.get("pressure_size") or 0)
        rep.details["pressure_bar_assigned"] = assigned
        rep.notes.append(f"pressure BAR{bar_index} ({fmt_size(size)}) "
                         + ("was assigned: the guest made room" if assigned else
                            "stayed unassigned: the guest did not rebalance for it"))

    def cpu_added(self, m: Machine, rep: RebalanceReport, add: Callable[[], None]) -> None:
        """Hot-add, wait for the guest to see the CPU, and online it as udev would (Linux
        does not online hot-added CPUs by itself without a udev rule)."""
        assert m.agent is not None
        n_before = _guest_cpus(m)
        t0 = time.monotonic()
        add()
        n = poll("the guest to see the new CPU", seconds("driver_bound"),
                 lambda: (lambda c: c if c > n_before else None)(_guest_cpus(m)))
        m.agent.run("for c in /sys/devices/system/cpu/cpu[0-9]*/online; do "
                    "[ \"$(cat $c)\" = 1 ] || echo 1 > $c; done").check()
        online = m.agent.run("cat /sys/devices/system/cpu/online").stdout.strip()
        rep.durations_ms["online"] = (time.monotonic() - t0) * 1e3
        rep.details.update({"guest_cpus": n, "guest_online": online})
        rep.notes.append(f"guest sees {n} CPUs (online: {online})")
        rep.notes.append("Linux does not rebalance PCI resources on a CPU hot-add")

    def capabilities(self, m: Machine, bdf: str) -> list[int]:
        """The PCIe extended capability ids in the device's config space (sysfs ``config``)."""
        assert m.agent is not None
        r = m.agent.run_argv(["od", "-An", "-v", "-tx4", "-j256", "-N3840",
                              f"/sys/bus/pci/devices/{bdf}/config"])
        words = [int(w, 16) for w in r.stdout.split()] if r.ok else []
        caps: list[int] = []
        off = 0x100
        while words and 0x100 <= off < 0x1000 and len(caps) < 64:
            hdr = words[(off - 0x100) // 4]
            if hdr in (0, 0xFFFFFFFF):
                break
            caps.append(hdr & 0xFFFF)
            off = (hdr >> 20) & 0xFFC
        return caps

    def wdtf(self, m: Machine, dev_id: str, *, action: str, target: str,
             instance: str | None) -> RebalanceReport:
        raise Unsupported("the wdtf trigger drives WDTF in a Windows guest; on Linux use rescan")
