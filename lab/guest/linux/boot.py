"""The built-in Linux guest: direct kernel boot, ready marker on ttyS0, OpenSSH sshd,
kprobes for the trace, sysfs for device state and the rebalance triggers' guest half."""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lab import accel as accel_mod
from lab.accel import Accel
from lab.agent.base import Agent
from lab.agent.ssh import SshAgent
from lab.deadline import seconds
from lab.errors import LabError
from lab.guest.audio_player import AudioPlayer, LinuxAudioPlayer
from lab.guest.base import (BootFiles, DeviceWait, GuestArgs, GuestOs, GuestTrace, MachineView,
                            OsName, AgentKind, ShutdownStep, TriggerHalves)
from lab.image import GuestImage

if TYPE_CHECKING:
    from lab.machine import Machine
    from lab.scenario.model import GuestSpec
    from lab.scenario.steps import Step
    from vdevice.catalog import DeviceModel
    from vdevice.topology import Device


class LinuxGuest(GuestOs):
    """The built-in Linux image: direct kernel boot, ready marker on ttyS0, OpenSSH sshd."""

    os: OsName = "linux"
    agent_kind: AgentKind = "ssh"
    guest_port = 22
    default_rules = ("linux-driver", "kernel-oops", "bugcheck", "audio")

    def __init__(self, image: GuestImage) -> None:
        self.image = image

    def choose_accel(self, binary: str, want: str | None) -> Accel:
        return accel_mod.choose(binary, self.image, want=want)

    def qemu_args(self, m: MachineView, files: BootFiles) -> GuestArgs:
        cmdline = " ".join([self.image.cmdline, *m.topology.kernel_args])
        return GuestArgs(
            boot=("-kernel", str(self.image.kernel()), "-initrd", str(self.image.initrd),
                  "-append", cmdline),
            network=("-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{m.ssh_port}-:22",
                     "-device", "virtio-net-pci,netdev=n0,bus=pcie.0"))

    def wait_boot(self, m: MachineView) -> None:
        assert m.console is not None and m.process is not None
        t = time.monotonic()
        m.console.wait_for(self.image.ready_marker, timeout=seconds("boot_marker"),
                           what="the guest's ready marker on the serial console",
                           alive=m.process.alive)
        m.timings["boot_to_marker_s"] = time.monotonic() - t

    def make_agent(self, m: MachineView) -> SshAgent:
        assert m.ssh_port is not None
        return SshAgent("127.0.0.1", m.ssh_port, str(self.image.ssh.get("user", "root")),
                        self.image.ssh_key, self.image.host_key, log=m.log)

    def wait_agent(self, m: MachineView, agent: Agent) -> None:
        agent.wait_ready(seconds("agent_ready"))

    def before_stop(self, m: MachineView, agent: Agent) -> None:
        """Keep the guest's kernel log, and sshd's own log when SSH was ever lost
        (the server's side of why a connection went down)."""
        text = self.kernel_log(agent)
        if text is None:
            return
        (m.artifacts / "dmesg.txt").write_text(text)
        if getattr(agent, "reconnects", 0):
            try:
                log = agent.run("cat /run/sshd.log", timeout=10).stdout
            except LabError:
                return
            (m.artifacts / "sshd.log").write_text(log)

    def shutdown_steps(self, m: MachineView, agent: Agent | None) -> list[ShutdownStep]:
        steps: list[ShutdownStep] = []
        if isinstance(agent, SshAgent):
            ssh = agent
            # fire and forget: poweroff -f takes the connection down with it
            def poweroff() -> None:
                ssh.open("poweroff -f")

            steps.append(("guest-poweroff", poweroff))
        if m.qmp is not None:
            q = m.qmp
            steps.append(("qmp-quit", lambda: q.execute("quit", timeout=2)))
        return steps

    def describe(self) -> dict[str, Any]:
        return {"os": self.os, "agent": self.agent_kind, "guest_port": self.guest_port}

    def describe_image(self) -> dict[str, Any]:
        return self.image.describe()

    def audio_player(self) -> AudioPlayer:
        return LinuxAudioPlayer()

    # ---- before any VM ------------------------------------------------------------------
    @classmethod
    def refused_step(cls, step: Step, spec: GuestSpec) -> str | None:
        from lab.scenario.steps import RebalanceWdtf
        if isinstance(step, RebalanceWdtf):
            return ("the wdtf trigger drives WDTF, Windows' driver test framework; on Linux "
                    "use the rescan trigger")
        return None

    @classmethod
    def record_refusal(cls) -> str | None:
        return None          # TCG: tests/e2e/test_record_replay.py

    def snapshot_refusal(self) -> str | None:
        return None          # verified here: tests/e2e/test_snapshot.py

    # ---- what a run records -------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        return {"kernel": self.image.kernel_release}

    def image_hash(self) -> str | None:
        return self.image.input_hash

    def boot_files(self) -> dict[str, Path]:
        return {"kernel": self.image.kernel(), "initrd": self.image.initrd}

    def kernel_log(self, agent: Agent) -> str | None:
        try:
            return agent.run("dmesg", timeout=10).stdout
        except LabError:
            return None

    # ---- devices: the kernel's bind uevent and sysfs ------------------------------------
    def bound_wait(self, m: Machine, dev: Device, bdf: str | None,
                   timeout: float) -> DeviceWait | None:
        from lab.guest.linux import waits
        model = dev.catalog()
        if not model.linux_driver or bdf is None:
            return None
        return waits.bound_wait(m, dev.id, model.driver, bdf, model.linux_driver, timeout)

    def gone_wait(self, m: Machine, dev: Device, bdf: str | None,
                  timeout: float) -> DeviceWait | None:
        from lab.guest.linux import waits
        return waits.gone_wait(m, dev.id, bdf, timeout) if bdf else None

    def driver_of(self, m: Machine, dev_id: str) -> str | None:
        from lab import operations as ops
        from lab.guest.linux import triggers
        bdf = ops.device_bdf_from_qemu(m, dev_id)
        return triggers.driver_of(m, bdf) if bdf else None

    def driver_names(self, model: DeviceModel) -> tuple[str, ...]:
        return (model.linux_driver,) if model.linux_driver else ()

    def load_module(self, m: Machine, name: str, params: Mapping[str, str], *,
                    reload: bool, unload: bool) -> str:
        from lab.guest.linux import kmod
        return kmod.apply(m, kmod.ModuleRequest(name, params, reload=reload, unload=unload))

    def trace(self, m: Machine, *, kprobes: bool = True) -> GuestTrace:
        from lab.guest.linux.trace import LinuxTrace
        return LinuxTrace(m, self.image, kprobes=kprobes)

    # ---- the rebalance triggers' guest half ---------------------------------------------
    def triggers(self) -> TriggerHalves:
        from lab.guest.linux.triggers import LinuxTriggers
        return LinuxTriggers()
