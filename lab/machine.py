"""One lab VM: the QEMU process, its QMP session, console, sync port and guest agent.

State is explicit (``MachineState``) and moves one way: NEW -> STARTING -> RUNNING ->
STOPPING -> STOPPED (or FAILED from anywhere). ``Machine`` is a context manager: an
exception, a failed test or Ctrl-C inside the ``with`` leaves no QEMU process, no
socket and no temporary file behind, and the run directory keeps everything the
run produced up to that point.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from lab import accel as accel_mod
from lab import qemu_caps
from lab.agent.ssh import SshAgent
from lab.console import Console, SyncPort
from lab.deadline import seconds
from lab.errors import LabError, QemuError
from lab.events import Event, Kind, Source
from lab.image import GuestImage
from lab.qemu_process import QemuProcess
from lab.qmp import QmpSession
from lab.rundir import RunDir
from vdevice import topology as topo_mod
from vdevice.inventory import QemuInventory
from vdevice.topology import Topology

AUDIODEV_ID = "audio0"
# on from the first instruction, so the trace parser knows every device's command
# register (decode on/off) before any operation; a few hundred lines per boot
DEFAULT_TRACE_EVENTS = ("pci_update_mappings_add", "pci_update_mappings_del", "pci_cfg_write")


class MachineState(str, Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


_LIVE: "weakref.WeakSet[Machine]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Last line of defence for interpreter exit paths that skip ``__exit__``."""
    for m in list(_LIVE):
        try:
            m.stop()
        except Exception:
            pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Machine:
    def __init__(self, topology: Topology, run: RunDir, *, image: GuestImage | None = None,
                 accel: str | None = None, inventory: QemuInventory | None = None,
                 binary: str | None = None, audio_capture: bool = False,
                 extra_args: Sequence[str] = (), trace_events: Sequence[str] = DEFAULT_TRACE_EVENTS,
                 subdir: str | None = None) -> None:
        self.binary = binary or qemu_caps.find_binary()
        self.inventory = inventory or qemu_caps.probe(self.binary)
        topo_mod.validate(topology, self.inventory)
        self.topology = topology
        self.run = run
        self.image = image or GuestImage.load()
        self._want_accel = accel
        self.accel: accel_mod.Accel | None = None
        # artifacts of this machine (a run with several machines gives each a subdir)
        self.artifacts = run.path / subdir if subdir else run.path
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.private: Path | None = None   # 0700 socket dir, exists only while running
        self.audio_path: Path | None = self.artifacts / "audio.wav" if audio_capture else None
        self.extra_args = list(extra_args)
        self.trace_events = tuple(trace_events)
        self.state = MachineState.NEW
        # ids of devices in QEMU right now (cold ones from boot; plug/unplug keep it)
        self.present: set[str] = {d.id for d in topology.devices
                                  if d.placement == topo_mod.Placement.COLD}
        self.ssh_port: int | None = None
        self.process: QemuProcess | None = None
        self.qmp: QmpSession | None = None
        self.console: Console | None = None
        self.sync: SyncPort | None = None
        self.trace_port: Console | None = None
        self.agent: SshAgent | None = None
        self.timings: dict[str, float] = {}
        self.stopped_at: str | None = None
        self._lock = threading.Lock()

    # ---- state -----------------------------------------------------------------------
    def _to(self, state: MachineState) -> None:
        allowed = {
            MachineState.NEW: {MachineState.STARTING, MachineState.STOPPED},
            MachineState.STARTING: {MachineState.RUNNING, MachineState.FAILED,
                                    MachineState.STOPPING},
            MachineState.RUNNING: {MachineState.STOPPING, MachineState.FAILED},
            MachineState.FAILED: {MachineState.STOPPING},
            MachineState.STOPPING: {MachineState.STOPPED},
            MachineState.STOPPED: set(),
        }
        if state not in allowed[self.state]:
            raise LabError(f"machine cannot go from {self.state.value} to {state.value}")
        self.run.log(f"machine {self.state.value} -> {state.value}")
        self.state = state

    # ---- command line ------------------------------------------------------------------
    def argv(self) -> list[str]:
        assert self.accel is not None and self.ssh_port is not None and self.private is not None
        art, priv = self.artifacts, self.private
        audio = (f"wav,id={AUDIODEV_ID},path={topo_mod.qemu_opt(self.audio_path)}"
                 if self.audio_path else f"none,id={AUDIODEV_ID}")
        cmdline = " ".join([self.image.cmdline, *self.topology.kernel_args])
        return [
            self.binary, "-name", f"rebalab,debug-threads=on", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-S",
            *self.accel.qemu_args(),
            *topo_mod.machine_args(self.topology, audiodev=AUDIODEV_ID),
            "-kernel", str(self.image.kernel()), "-initrd", str(self.image.initrd),
            "-append", cmdline,
            "-chardev", f"socket,id=qmp0,path={priv / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-chardev", f"socket,id=con0,path={priv / 'console.sock'},server=on,wait=off",
            "-serial", "chardev:con0",
            "-chardev", f"socket,id=sync0,path={priv / 'sync.sock'},server=on,wait=off",
            "-serial", "chardev:sync0",
            # ttyS2: guest trace stream (kprobes), independent of SSH and the network
            "-chardev", f"socket,id=trace0,path={priv / 'trace.sock'},server=on,wait=off",
            "-serial", "chardev:trace0",
            "-netdev", f"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", "virtio-net-pci,netdev=n0,bus=pcie.0",
            "-audiodev", audio,
            "-D", str(art / "qemu-trace.log"), "-msg", "timestamp=on",
            *[a for ev in self.trace_events for a in ("-trace", ev)],
            *self.extra_args,
        ]

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> Machine:
        self._to(MachineState.STARTING)
        _LIVE.add(self)
        self.private = Path(tempfile.mkdtemp(prefix="rebalab-"))
        os.chmod(self.private, 0o700)
        t_start = time.monotonic()
        self.stopped_at = "choosing the accelerator"
        try:
            t = time.monotonic()
            self.accel = accel_mod.choose(self.binary, self.image, want=self._want_accel)
            self.timings["accel_choice_s"] = time.monotonic() - t
            self.run.log(f"accelerator {self.accel.name}: {self.accel.reason}"
                         + (" (cached verdict)" if self.accel.cached else ""))
            for attempt in range(3):
                self.ssh_port = free_port()
                argv = self.argv()
                (self.artifacts / "qemu-cmdline.txt").write_text( " ".join(_shell_quote(a) for a in argv)
                                    + "\n")
                self.stopped_at = "starting QEMU"
                self.process = QemuProcess(argv, stderr_path=self.artifacts / "qemu.stderr",
                                           log=self.run.log)
                t_launch = time.monotonic()
                self.process.start()
                self.stopped_at = "connecting to QMP"
                self.qmp = QmpSession(self.private / "qmp.sock", self.artifacts / "qmp.jsonl")
                try:
                    self._wait_socket(self.private / "qmp.sock")
                    self.qmp.connect()
                    break
                except LabError:
                    tail = self.process.stderr_tail()
                    self.qmp.close()
                    self.qmp = None
                    self.process.stop()
                    if "hostfwd" in tail or "host forwarding" in tail.lower():
                        self.run.log(f"port {self.ssh_port} was taken, retrying: {tail}")
                        continue
                    raise QemuError(f"QEMU did not start: {tail or 'no error output'} "
                                    f"(command line in {self.artifacts / 'qemu-cmdline.txt'})")
            else:
                raise QemuError("could not find a free port for the SSH forward in 3 tries")
            assert self.qmp is not None
            self.qmp.on_event.append(self._on_qmp_event)
            self.console = Console(self.private / "console.sock", self.artifacts / "console.log")
            self.console.connect(seconds("qemu_start"))
            self.sync = SyncPort(self.private / "sync.sock")
            self.sync.connect(seconds("qemu_start"))
            self.trace_port = Console(self.private / "trace.sock",
                                      self.artifacts / "guest-trace.txt")
            self.trace_port.connect(seconds("qemu_start"))
            self.stopped_at = "booting the guest"
            self.qmp.execute("cont")
            t_cont = time.monotonic()
            t_cont_ns = time.time_ns()
            self.console.wait_for(self.image.ready_marker, timeout=seconds("boot_marker"),
                                  what="the guest's ready marker on the serial console",
                                  alive=self.process.alive)
            self.timings["boot_to_marker_s"] = time.monotonic() - t_cont
            self.stopped_at = "connecting the guest agent"
            self.agent = SshAgent("127.0.0.1", self.ssh_port, str(self.image.ssh.get("user", "root")),
                                  self.image.ssh_key, self.image.host_key, log=self.run.log)
            self.agent.wait_ready(seconds("agent_ready"))
            self.timings["boot_to_agent_s"] = time.monotonic() - t_cont
            self.timings["launch_to_agent_s"] = time.monotonic() - t_launch
            self.timings["start_total_s"] = time.monotonic() - t_start
            self.run.record(Event(t_cont_ns, Source.HOST_LAB, Kind.OPERATION,
                                  duration_ns=time.time_ns() - t_cont_ns,
                                  data={"name": "boot",
                                        "boot_to_agent_s": self.timings["boot_to_agent_s"]}))
            self.run.log(f"guest ready: marker {self.timings['boot_to_marker_s']:.2f}s, "
                         f"agent {self.timings['boot_to_agent_s']:.2f}s after cont")
            self.stopped_at = None
            self._to(MachineState.RUNNING)
            return self
        except BaseException:
            self._to(MachineState.FAILED)
            raise

    def _wait_socket(self, path: Path) -> None:
        end = time.monotonic() + seconds("qemu_start")
        while not path.exists():
            if self.process is not None and not self.process.alive():
                raise QemuError(f"QEMU exited at start: {self.process.stderr_tail()}")
            if time.monotonic() > end:
                raise QemuError(f"QEMU did not create {path.name} within {seconds('qemu_start')}s")
            time.sleep(0.01)

    def _on_qmp_event(self, ev: dict[str, Any]) -> None:
        name = ev.get("event", "")
        kind = {"DEVICE_DELETED": Kind.DEVICE_DELETED, "GUEST_PANICKED": Kind.GUEST_PANICKED,
                "STOP": Kind.PAUSE, "RESUME": Kind.RESUME}.get(name, Kind.QMP_EVENT)
        data = ev.get("data") or {}
        dev = data.get("device") if isinstance(data, dict) else None
        from lab.events import DeviceId
        self.run.record(Event(int(ev["t_host_ns"]), Source.HOST_QMP, kind,
                              DeviceId(qom=dev) if dev else None,
                              data={"event": name, **({"data": data} if data else {})}))

    def dmesg(self) -> str | None:
        if self.agent is None:
            return None
        try:
            return self.agent.run("dmesg", timeout=10).stdout
        except LabError:
            return None

    def stop(self) -> str | None:
        """Shut down with the ladder; collect guest dmesg first when the guest answers."""
        with self._lock:
            if self.state in (MachineState.STOPPED,):
                return None
            if self.state == MachineState.NEW:
                self._to(MachineState.STOPPED)
                return None
            self._to(MachineState.STOPPING)
            step: str | None = None
            try:
                if self.process is not None and self.process.alive() and self.agent is not None:
                    text = self.dmesg()
                    if text is not None:
                        (self.artifacts / "dmesg.txt").write_text(text)
                polite: list[tuple[str, Any]] = []
                if self.agent is not None:
                    agent = self.agent
                    polite.append(("guest-poweroff",
                                   lambda: agent.open("poweroff -f") and None))
                if self.qmp is not None:
                    q = self.qmp
                    polite.append(("qmp-quit", lambda: q.execute("quit", timeout=2)))
                if self.process is not None:
                    step = self.process.stop(polite, step_timeout=seconds("shutdown_step"))
                    self.timings_stop = step
            finally:
                for part in (self.agent, self.qmp, self.console, self.sync, self.trace_port):
                    if part is not None:
                        try:
                            part.close()
                        except Exception:
                            pass
                if self.private is not None:
                    shutil.rmtree(self.private, ignore_errors=True)
                self.run.log(f"machine stopped ({step})")
                self.state = MachineState.STOPPED
                _LIVE.discard(self)
            return step

    def __enter__(self) -> Machine:
        return self.start() if self.state == MachineState.NEW else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- helpers for operations ------------------------------------------------------
    def require_running(self) -> None:
        if self.state != MachineState.RUNNING:
            raise LabError(f"machine is {self.state.value}, not running")
        if self.process is None or not self.process.alive():
            raise QemuError(f"QEMU has exited (rc={self.process.returncode() if self.process else '?'}"
                            f"): {self.process.stderr_tail() if self.process else ''}")

    def describe(self) -> dict[str, Any]:
        return {
            "qemu": {"binary": self.binary, "version": self.inventory.version_str},
            "accelerator": self.accel.to_json() if self.accel else None,
            "image": self.image.describe(),
            "topology": self.topology.to_json(),
            "ssh_port": self.ssh_port,
            "timings": self.timings,
            "state": self.state.value,
            "stopped_at": self.stopped_at,
            "pid": self.process.pid if self.process else None,
            "pid_self": os.getpid(),
        }


def _shell_quote(a: str) -> str:
    import shlex
    return shlex.quote(a)
