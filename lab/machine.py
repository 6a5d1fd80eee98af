"""One lab VM: the QEMU process, its QMP session, console, sync port and guest agent.

What differs per guest OS (boot arguments, readiness, the agent, the polite shutdown,
per-run disk overlays, the kernel log) comes from its ``lab.guest.GuestOs``; the default is
the built-in image (``lab.guest.builtin_guest``, also what ``image=`` builds). The Machine
keeps what every guest shares: the process, QMP, the serial ports, the 0700 private directory, the
127.0.0.1-only agent forward, the shutdown ladder, and the mapping of QMP events.

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
import stat
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from lab import accel as accel_mod
from lab import qemu_caps
from lab.agent.base import Agent
from lab.agent.ssh import SshAgent
from lab.console import Console, SyncPort
from lab.deadline import seconds
from lab.errors import ConfigError, LabError, QemuError
from lab.events import Event, Kind, Source
from lab.guest import BootFiles, GuestOs, GuestPanicked, builtin_guest
from lab.image import GuestImage
from lab.logs.qmp import event_from_qmp
from lab.qemu_process import QemuProcess
from lab.record import RecordSpec, netdev_id, recordable_network, rr_args
from lab.record_io import FifoRelay, chardev_file
from lab.qmp import QmpSession
from lab import snapshot
from lab.snapshot import RestorePoint
from lab.rundir import RunDir
from lab.guest.panic import panic_event
from vdevice import topology as topo_mod
from vdevice.inventory import QemuInventory
from vdevice.topology import Topology, qemu_opts

__all__ = ["Machine", "MachineState", "GuestPanicked", "free_port", "AUDIODEV_ID",
           "DEFAULT_TRACE_EVENTS", "AUDIO_TRACE_EVENTS"]

AUDIODEV_ID = "audio0"
# on from the first instruction, so the trace parser knows every device's command
# register (decode on/off) before any operation; a few hundred lines per boot
DEFAULT_TRACE_EVENTS = ("pci_update_mappings_add", "pci_update_mappings_del", "pci_cfg_write")
#: with audio captured: QEMU's HDA codec drops its whole 8 KiB stream buffer (46 ms at
#: 44.1 kHz s16 stereo) when the audio backend did not drain it in time (a loaded host:
#: hw/audio/hda-codec.c, hda_audio_output_cb); the trace tells that drop from the guest's
AUDIO_TRACE_EVENTS = ("hda_audio_overrun", "audio_timer_delayed")


PRIVATE_PREFIX = "rebalab-"
OWNER_FILE = "owner.pid"


def reclaim_stale_private_dirs(log: Callable[[str], None] | None = None,
                               tmp: Path | None = None) -> list[Path]:
    """Remove socket directories of labs that died without cleaning up (kill -9): ours
    (same uid, an owner.pid file) whose owner process is gone. Returns what was removed."""
    root = Path(tmp or tempfile.gettempdir())
    removed: list[Path] = []
    try:
        candidates = list(root.glob(PRIVATE_PREFIX + "*"))
    except OSError:
        return removed
    for d in candidates:
        try:
            st = d.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                continue
            owner = int((d / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue                       # not one of ours, or still being made
        if owner == os.getpid() or _alive(owner):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
        if log is not None:
            log(f"removed the socket directory {d} of a lab that died (pid {owner})")
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """One VM. ``guest`` says what boots; ``image=`` (the older form) means the built-in
    guest booting that image (``builtin_guest(image)``)."""

    def __init__(self, topology: Topology, run: RunDir, *, guest: GuestOs | None = None,
                 image: GuestImage | None = None,
                 accel: str | None = None, inventory: QemuInventory | None = None,
                 binary: str | None = None, audio_capture: bool = False,
                 extra_args: Sequence[str] = (), trace_events: Sequence[str] = DEFAULT_TRACE_EVENTS,
                 subdir: str | None = None, record: RecordSpec | None = None,
                 restore: RestorePoint | None = None) -> None:
        if guest is not None and image is not None:
            raise ConfigError("give Machine a guest or an image, not both "
                              "(image=X is short for guest=builtin_guest(X))")
        self.binary = binary or qemu_caps.find_binary()
        self.inventory = inventory or qemu_caps.probe(self.binary)
        self.guest: GuestOs = guest or builtin_guest(image)
        topology = self.guest.adjust_topology(topology)
        topo_mod.validate(topology, self.inventory)
        self.topology = topology
        self.run = run
        self._want_accel = accel
        self.accel: accel_mod.Accel | None = None
        # artifacts of this machine (a run with several machines gives each a subdir)
        self.artifacts = run.path / subdir if subdir else run.path
        self.artifacts.mkdir(parents=True, exist_ok=True)
        self.private: Path | None = None   # 0700 socket dir, exists only while running
        self.audio_path: Path | None = self.artifacts / "audio.wav" if audio_capture else None
        self.extra_args = list(extra_args)
        self.trace_events = tuple(trace_events)
        # under QEMU's record mode (lab.record): the guest's inputs go to this log
        self.record = record
        self._relays: list[FifoRelay] = []
        # reset: snapshot (lab.snapshot): start from this saved state instead of booting
        self.restore = restore
        # the guest's state is thrown away after this iteration (reset: snapshot): what an
        # observation would undo in the guest for the next one (disarming its kprobes) is
        # not owed, only what the host needs (every trace event drained)
        self.disposable = restore is not None
        self.state = MachineState.NEW
        # ids of devices in QEMU right now (cold ones from boot; plug/unplug keep it)
        self.present: set[str] = {d.id for d in topology.devices
                                  if d.placement == topo_mod.Placement.COLD}
        # host port forwarded (on 127.0.0.1 only) to the guest's agent port: 22 or 5986
        self.ssh_port: int | None = None
        self.process: QemuProcess | None = None
        self.qmp: QmpSession | None = None
        self.console: Console | None = None
        self.sync: SyncPort | None = None
        self.trace_port: Console | None = None
        self.agent: Agent | None = None
        self.boot_files: BootFiles | None = None    # the guest's per-machine files
        self.panic: Event | None = None             # the first GUEST_PANICKED, if any
        self.guest_files: dict[str, Any] = {}       # what release() did with them
        self.timings_stop: str | None = None
        self.timings: dict[str, float] = {}
        # facts about this boot of the guest that tracers may keep between observations
        # (which kprobe functions exist, the probes already defined); gone with the VM
        self.guest_cache: dict[str, Any] = {}
        self.stopped_at: str | None = None
        self._lock = threading.Lock()

    @property
    def ssh_agent(self) -> SshAgent:
        """The agent as an SSH agent, for callers that pipeline waits with ``open``/``collect``.

        ``agent`` is typed ``Agent`` since a Windows guest may be reached over WinRM,
        which has no such channels; this says so clearly instead of an AttributeError.
        """
        if isinstance(self.agent, SshAgent):
            return self.agent
        raise LabError(f"this operation needs an SSH agent; the {self.guest.os} guest's agent is "
                       f"{type(self.agent).__name__ if self.agent else 'not connected'}")

    @property
    def agent_port(self) -> int | None:
        """The host end of the agent forward (``ssh_port`` keeps its old name for callers)."""
        return self.ssh_port

    def log(self, message: str) -> None:
        self.run.log(message)

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
        audio = (qemu_opts({"id": AUDIODEV_ID, "path": self.audio_path}, "wav")
                 if self.audio_path else qemu_opts({"id": AUDIODEV_ID}, "none"))

        def sock(name: str, path: Path) -> str:
            return qemu_opts({"id": name, "path": path, "server": True, "wait": False}, "socket")
        guest = self.guest.qemu_args(self, self.boot_files or BootFiles())
        return [
            self.binary, "-name", f"rebalab,debug-threads=on", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-S",
            *self.accel.qemu_args(),
            *topo_mod.machine_args(self.topology, audiodev=AUDIODEV_ID),
            *guest.boot,
            "-chardev", sock("qmp0", priv / "qmp.sock"),
            "-mon", "chardev=qmp0,mode=control",
            # recorded: output ports into FIFOs that never push back (lab.record_io)
            "-chardev", (chardev_file("con0", priv / "console.fifo") if self.record
                         else sock("con0", priv / "console.sock")),
            "-serial", "chardev:con0",
            "-chardev", sock("sync0", priv / "sync.sock"),
            "-serial", "chardev:sync0",
            # ttyS2: guest trace stream (kprobes), independent of SSH and the network
            "-chardev", (chardev_file("trace0", priv / "trace.fifo") if self.record
                         else sock("trace0", priv / "trace.sock")),
            "-serial", "chardev:trace0",
            *(recordable_network(guest.network) if self.record else guest.network),
            "-audiodev", audio,
            "-D", str(art / "qemu-trace.log"), "-msg", "timestamp=on",
            *[a for ev in dict.fromkeys(self.trace_events + (
                AUDIO_TRACE_EVENTS if self.audio_path is not None else ()))
              for a in ("-trace", ev)],
            *self.extra_args,
            *(rr_args("record", self.record.file, netdev=netdev_id(guest.network),
                      snapshots=self.record.snapshots) if self.record else ()),
            *(("-incoming", self.restore.incoming_uri()) if self.restore else ()),
        ]

    # ---- lifecycle ---------------------------------------------------------------------
    def start(self) -> Machine:
        """Boot the guest and connect its agent.

        Order matters: the accelerator and the guest's preflight checks come first, so a
        guest that cannot run here (Windows under TCG) is refused before any directory,
        overlay or process exists.
        """
        self._to(MachineState.STARTING)
        _LIVE.add(self)
        t_start = time.monotonic()
        self.stopped_at = "choosing the accelerator"
        try:
            t = time.monotonic()
            self.accel = self.guest.choose_accel(self.binary, self._want_accel)
            self.timings["accel_choice_s"] = time.monotonic() - t
            self.run.log(f"accelerator {self.accel.name}: {self.accel.reason}"
                         + (" (cached verdict)" if self.accel.cached else ""))
            self.stopped_at = f"checking the {self.guest.os} guest"
            self.guest.preflight(self.binary, self.inventory, self.accel, self.run.log)
            reclaim_stale_private_dirs(self.log)
            self.private = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX))
            os.chmod(self.private, 0o700)
            # whose sockets these are: a lab killed with -9 cannot remove them; the next
            # machine that starts does (reclaim_stale_private_dirs)
            (self.private / OWNER_FILE).write_text(f"{os.getpid()}\n")
            self.stopped_at = f"preparing the {self.guest.os} guest's files"
            self.boot_files = self.guest.prepare(self)
            if self.record is not None:
                self._relays = [FifoRelay(self.private / f"{n}.fifo", self.private / f"{n}.sock")
                                .start() for n in ("console", "trace")]
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
                    rc = self.process.returncode()
                    self.qmp.close()
                    self.qmp = None
                    self.process.stop()
                    if "hostfwd" in tail or "host forwarding" in tail.lower():
                        self.run.log(f"port {self.ssh_port} was taken, retrying: {tail}")
                        continue
                    if rc is not None and rc < 0 and not tail:
                        # killed from outside (kill -9, the OOM killer): say so, not "no output"
                        raise QemuError(f"QEMU exited (killed by signal {-rc}) while starting")
                    raise QemuError(f"QEMU did not start: {tail or 'no error output'} "
                                    f"(command line in {self.artifacts / 'qemu-cmdline.txt'})")
            else:
                raise QemuError(f"could not find a free port for the {self.guest.agent_kind} "
                                "forward in 3 tries")
            assert self.qmp is not None
            self.qmp.on_event.append(self._on_qmp_event)
            self.console = Console(self.private / "console.sock", self.artifacts / "console.log")
            self.console.connect(seconds("qemu_start"))
            self.sync = SyncPort(self.private / "sync.sock")
            self.sync.connect(seconds("qemu_start"))
            self.trace_port = Console(self.private / "trace.sock",
                                      self.artifacts / "guest-trace.txt")
            self.trace_port.connect(seconds("qemu_start"))
            if self.restore is not None:
                self.stopped_at = "restoring the snapshot"
                self.timings["restore_s"] = snapshot.wait_incoming(self, seconds("qemu_start"))
                # what the guest has defined is what it had at the point
                self.guest_cache = dict(self.restore.guest_cache)
            self.stopped_at = "booting the guest"
            self.qmp.execute("cont")
            t_cont = time.monotonic()
            t_cont_ns = time.time_ns()
            if self.restore is None:
                self.guest.wait_boot(self)
            self.stopped_at = "connecting the guest agent"
            self.agent = self.guest.make_agent(self)
            self.guest.wait_agent(self, self.agent)
            self.timings["boot_to_agent_s"] = time.monotonic() - t_cont
            self.timings["launch_to_agent_s"] = time.monotonic() - t_launch
            self.timings["start_total_s"] = time.monotonic() - t_start
            self.run.record(Event(t_cont_ns, Source.HOST_LAB, Kind.OPERATION,
                                  duration_ns=time.time_ns() - t_cont_ns,
                                  data={"name": "boot",
                                        "boot_to_agent_s": self.timings["boot_to_agent_s"]}))
            marker = self.timings.get("boot_to_marker_s")
            self.run.log(("guest restored from the snapshot: " if self.restore else "guest ready: ")
                         + (f"marker {marker:.2f}s, " if marker is not None else "")
                         + f"agent {self.timings['boot_to_agent_s']:.2f}s after cont")
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
        # QEMU binds before it listens: a connect in between is refused (seen once in a
        # sweep of 8 boots: "QEMU did not start: no error output"); wait for the listen
        while not _listening(path) and time.monotonic() < end:
            time.sleep(0.005)

    def _on_qmp_event(self, ev: dict[str, Any]) -> None:
        name = ev.get("event", "")
        if name == "GUEST_PANICKED":
            self._on_panic(ev)
            return
        self.run.record(event_from_qmp(ev, int(ev["t_host_ns"])))

    def _on_panic(self, ev: dict[str, Any]) -> None:
        """GUEST_PANICKED: record it for the ``bugcheck`` check and end waits on the guest.

        The event's data carries QEMU's ``action`` and ``info`` at the top level (what
        the kernel-oops rule reads) and ``bugcheck``, the decoded stop code, name and
        parameters from ``lab.guest.panic`` (with hv-crash; "code unknown" otherwise).
        """
        raw = {k: v for k, v in ev.items() if k != "t_host_ns"}
        data: dict[str, Any] = ev["data"] if isinstance(ev.get("data"), dict) else {}
        described = panic_event(raw, int(ev["t_host_ns"]))
        event = Event(described.t_host_ns, Source.HOST_QMP, Kind.GUEST_PANICKED,
                      data={"event": "GUEST_PANICKED", **({"data": data} if data else {}),
                            "action": data.get("action"), "info": data.get("info") or {},
                            "bugcheck": described.data["bugcheck"]})
        self.run.record(event)
        if self.panic is None:
            self.panic = event
        self.run.log(f"GUEST_PANICKED: {event.data['bugcheck']['description']}")

    def stop(self, *, discard: bool = False) -> str | None:
        """Shut down with the ladder; let the guest collect what it needs first.

        ``discard``: the guest's state is thrown away (snapshot reset: the next
        iteration starts from the restore point), so nothing is collected from it and
        the ladder starts at QMP ``quit``.

        Ladder: the guest's polite steps (Linux: ``poweroff -f``; Windows: wait for the
        crash dump after a bug check, else ``Stop-Computer -Force``, then the ACPI power
        button), QMP ``quit``, then SIGTERM, SIGKILL and a check that QEMU is gone. The
        guest's per-machine files are released only after QEMU is gone.
        """
        with self._lock:
            if self.state in (MachineState.STOPPED,):
                return None
            if self.state == MachineState.NEW:
                self._to(MachineState.STOPPED)
                return None
            self._to(MachineState.STOPPING)
            step: str | None = None
            try:
                if self.process is not None and self.process.alive() and self.agent is not None \
                        and self.panic is None and not self.process.suspended() and not discard:
                    try:
                        self.guest.before_stop(self, self.agent)
                    except Exception as exc:      # noqa: BLE001 - never skip the ladder
                        self.log(f"collecting from the guest before stopping failed: {exc!r}")
                polite = (self.guest.shutdown_steps(self, self.agent)
                          if self.process is None or not self.process.suspended() else [])
                if discard:
                    polite = [p for p in polite if p[0] == "qmp-quit"]
                if self.process is not None:
                    step = self.process.stop(polite, step_timeout=seconds("shutdown_step"))
                    self.timings_stop = step
            finally:
                for relay in self._relays:      # the rest of the output, then its end
                    relay.stop()
                for part in (self.agent, self.qmp, self.console, self.sync, self.trace_port):
                    if part is not None:
                        try:
                            part.close()
                        except Exception:
                            pass
                if self.private is not None:
                    shutil.rmtree(self.private, ignore_errors=True)
                if self.boot_files is not None:
                    try:
                        self.guest_files = self.guest.release(self, self.boot_files)
                    except Exception as exc:   # never mask the stop itself
                        self.run.log(f"releasing the guest's files failed: {exc!r}")
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
        """Raise unless the VM can take an operation; a bug check comes first (it is the cause)."""
        if self.panic is not None:
            raise GuestPanicked(self.panic)
        if self.state != MachineState.RUNNING:
            raise LabError(f"machine is {self.state.value}, not running")
        if self.process is None or not self.process.alive():
            raise QemuError(f"QEMU has exited (rc={self.process.returncode() if self.process else '?'}"
                            f"): {self.process.stderr_tail() if self.process else ''}")

    def describe(self) -> dict[str, Any]:
        return {
            "qemu": {"binary": self.binary, "version": self.inventory.version_str},
            "accelerator": self.accel.to_json() if self.accel else None,
            "image": self.guest.describe_image(),
            "guest": self.guest.describe(),
            "topology": self.topology.to_json(),
            "ssh_port": self.ssh_port,
            "timings": self.timings,
            "state": self.state.value,
            "stopped_at": self.stopped_at,
            "guest_files": self.guest_files,
            "panic": self.panic.data.get("bugcheck") if self.panic else None,
            "pid": self.process.pid if self.process else None,
            "pid_self": os.getpid(),
        }


def _listening(path: Path) -> bool:
    """Whether a unix socket at ``path`` is listening (/proc/net/unix, flag
    __SO_ACCEPTCON); True when that cannot be told, so the caller just connects."""
    try:
        with open("/proc/net/unix", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 8 and parts[7] == str(path):
                    return parts[3] == "00010000"
    except OSError:
        return True
    return False


def _shell_quote(a: str) -> str:
    import shlex
    return shlex.quote(a)
