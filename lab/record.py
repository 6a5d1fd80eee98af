"""Deterministic recording of iterations: QEMU's record/replay (``-icount rr=record``).

A race that broke once should break again, every time, when it is replayed: QEMU under
TCG with ``-icount shift=auto,rr=record,rrfile=FILE`` logs every non-deterministic input
(clocks, serial input, network packets through ``filter-replay``, audio) and
``rr=replay`` re-executes the guest instruction for instruction from that log. What
QEMU's documentation (QEMU 7.2 ``docs/system/replay.rst``) requires, and what this
module does about it:

* ``-icount`` with ``rr=``: TCG only (KVM cannot record), so ``--record`` refuses KVM
  and the Windows guest (KVM only here). icount runs the vCPUs round-robin on one
  thread; the lab's guest has one vCPU anyway.
* network: "Each backend must have its own instance of the replay filter" and "In
  replay mode packets from the log are injected into the network device. All
  interactions with network backend in replay mode are disabled": a ``filter-replay``
  on the guest's netdev, and the replay's netdev forwards no port (nothing on the host
  answers). Measured here: with QEMU 7.2's ``virtio-net-pci`` the replay stalled at the
  first SSH packet (its transmit path runs in a bottom half the replay log does not
  order); with ``e1000`` (the doc's own examples use a plain NIC) the replay ran to the
  end. So a recorded VM gets ``e1000`` in place of ``virtio-net-pci`` (the guest image
  ships its driver).
* block devices need ``blkreplay``: the built-in guest has no disk (initramfs), so
  nothing to do; a scenario whose topology had a drive would be refused.
* serial ports: "input is recorded and replayed automatically. The command lines for
  recording and replaying must contain identical number of ports": the replay keeps
  the recorded command line (the three serial ports included) and changes only paths.
* audio: recorded automatically, "identical specifications of audio hardware": same.
* randomness: TCG's RDRAND (``-cpu qemu64,+rdrand``) reads the host's RNG through
  ``qemu_guest_getrandom``, whose every value QEMU 7.2 logs (``EVENT_RANDOM`` in log
  version 0xe0200c; 46 of them in a 20 s recording here), so the guest's SSH session
  keys come back in the replay and the replayed (encrypted) packets make sense.
* the guest's boot files: a replay must boot the very kernel and initrd that were
  recorded (a different initrd diverged within the first 76 M instructions here, when
  the image was rebuilt during a recording). Their sha256 is taken before the VM boots
  and again after it stopped; a recording whose files changed meanwhile is not kept,
  and a replay on other files is refused.
* QMP commands that change the guest's hardware (``device_add``/``device_del``,
  ``stop``/``cont``) are not in the log (PLATFORM.md: a ``device_add`` during recording
  stalled the replay where it was made): steps that use them are refused before the
  sweep (``check_recordable``), naming the recordable alternative.
* the log's header is written when QEMU exits cleanly (guest poweroff, QMP ``quit``,
  SIGTERM); a SIGKILLed QEMU leaves an unreplayable file. The lab's shutdown ladder
  tries the clean rungs first.

Record mode wants one recording per QEMU run, from its first instruction: under
``--record`` every iteration runs on a fresh VM, booted under recording, and stopped at
the iteration's end. The recording is kept (``iterations/K/record/``, in the run's 0700
directory) when the iteration failed, or always with ``--record all``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vdevice.errors import SpecError
from vdevice.topology import qemu_opt, qemu_opts

__all__ = ["RECORD_MODES", "RecordSpec", "check_recordable", "not_recordable",
           "parse_record", "rr_args", "recordable_network", "keep_recording", "RECORD_DIR",
           "RECORD_JSON", "RECORDING_FILE", "file_digest"]

#: ``--record`` (failing iterations kept) and ``--record all``
RECORD_MODES = ("failing", "all")
RECORD_DIR = "record"
RECORD_JSON = "record.json"
RECORDING_FILE = "recording.bin"
#: the NIC a recorded VM gets instead of virtio-net-pci (see the module docstring)
REPLAYABLE_NIC = "e1000"
_UNREPLAYABLE_NICS = ("virtio-net-pci",)
FILTER_ID = "rr-net"


def parse_record(value: object) -> str | None:
    """The scenario key / CLI value -> ``None`` (off), ``"failing"`` or ``"all"``."""
    if value is None or value is False or value == "off":
        return None
    if value is True or value == "failing":
        return "failing"
    if value == "all":
        return "all"
    raise SpecError(f"record must be true, false or all, not {value!r}")


# ---- what cannot be recorded ------------------------------------------------------------

def not_recordable(step: Any) -> str | None:
    """Why ``step`` cannot run under recording (None when it can): a step that makes
    QEMU change the guest's hardware through QMP, which the replay log does not hold.
    Each step kind says so itself (``record_refusal``, ``lab.steps``)."""
    why: str | None = getattr(step, "record_refusal", None)
    return why


def check_recordable(scenario: Any, *, flag: str = "record: true") -> None:
    """Refuse, before any VM starts, a scenario that cannot run under recording: the
    first offending step is named at its file:line with the reason and the recordable
    alternative (``SpecError``, exit 2). ``flag`` says what asked for recording."""
    from lab.guest.spec import guest_class
    from lab.scenario.steps import walk

    refusal = guest_class(scenario.guest.os).record_refusal()
    if refusal is not None:
        raise SpecError(f"{flag}: {refusal}", file=scenario.file)

    devices = getattr(scenario.topology, "devices", ())
    sweep = scenario.sweep()
    # step kinds do not vary with parameter values: iteration 0 has them all
    for step in walk(sweep.iteration(0).steps) if len(sweep) else ():
        why = not_recordable(step)
        if why is not None:
            raise SpecError(f"not recordable ({flag}): {why}", file=scenario.file,
                            line=step.line, field=step.path)
    for d in devices:
        if getattr(d, "model", None) in ("virtio-blk-pci", "nvme"):
            raise SpecError(f"not recordable ({flag}): device {d.id} is a disk; record "
                            "mode needs blkreplay on every drive, which the lab does not "
                            "set up", file=scenario.file, field="topology")


# ---- the command line -------------------------------------------------------------------

@dataclass(frozen=True)
class RecordSpec:
    """How one VM is recorded: the log file, and the orphan qcow2 image that holds the
    recording's start snapshot (reverse debugging needs one: lab.record_debug)."""

    file: Path
    snapshots: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file": str(self.file),
                "snapshots": str(self.snapshots) if self.snapshots else None}


#: the snapshot QEMU takes when recording starts and loads when a replay starts
#: (``rrsnapshot``), in an orphan qcow2 image no guest device uses (QEMU's docs: "When
#: you need to use snapshots with diskless virtual machine, it must be started with
#: 'orphan' qcow2 image")
SNAPSHOT = "init"
SNAPSHOT_FILE = "snapshots.qcow2"
SNAPSHOT_DRIVE = "rr-snapshots"


def rr_args(mode: str, rrfile: Path, *, netdev: str = "n0", snapshots: Path | None = None,
            load_snapshot: bool = True) -> list[str]:
    """``-icount ...,rr=MODE,rrfile=FILE`` + the network filter (+ the snapshot image):
    identical in record and replay but for ``rr=`` (QEMU's docs: "The only difference
    with recording is changing the rr option"). ``load_snapshot=False``: a replay that
    starts from the beginning instead of the start snapshot (no reverse debugging)."""
    if mode not in ("record", "replay"):
        raise ValueError(f"rr mode is record or replay, not {mode!r}")
    icount: dict[str, object] = {"shift": "auto", "rr": mode, "rrfile": rrfile}
    if snapshots is not None and (mode == "record" or load_snapshot):
        icount["rrsnapshot"] = SNAPSHOT
    args = ["-icount", qemu_opts(icount),
            "-object", qemu_opts({"id": FILTER_ID, "netdev": netdev}, "filter-replay")]
    if snapshots is not None:
        args += ["-drive", qemu_opts({"file": snapshots, "if": "none", "id": SNAPSHOT_DRIVE,
                                      "format": "qcow2"})]
    return args


def make_snapshot_image(path: Path, qemu_img: str = "qemu-img") -> Path:
    """An empty qcow2 image (1 MiB, no device uses it) for the recording's snapshots."""
    import subprocess

    from lab.errors import EnvironmentProblem
    from lab.privacy import child_env

    try:
        r = subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", str(path), "1M"],
                           capture_output=True, text=True, timeout=30, env=child_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EnvironmentProblem(f"qemu-img could not create {path}: {exc} (install "
                                 "qemu-utils)") from None
    if r.returncode != 0:
        raise EnvironmentProblem(f"qemu-img create {path} failed: {r.stderr.strip()[-300:]}")
    path.chmod(0o600)
    return path


def netdev_id(network: Sequence[str]) -> str:
    """The id of the (single) ``-netdev`` in a guest's network arguments."""
    for flag, value in zip(network, network[1:]):
        if flag == "-netdev":
            m = re.search(r"(?:^|,)id=([^,]+)", value)
            if m:
                return m.group(1)
    raise ValueError("the guest's network arguments have no -netdev with an id")


def recordable_network(network: Sequence[str]) -> tuple[str, ...]:
    """The guest's network arguments with a NIC whose traffic replays (e1000 for
    virtio-net-pci, same properties)."""
    out = list(network)
    for i in range(len(out) - 1):
        if out[i] == "-device":
            head, _, rest = out[i + 1].partition(",")
            if head in _UNREPLAYABLE_NICS:
                out[i + 1] = REPLAYABLE_NIC + ("," + rest if rest else "")
    return tuple(out)


def replay_argv(recorded: Sequence[str], *, rrfile: Path, old_private: Path,
                new_private: Path, old_artifacts: Path, new_artifacts: Path,
                snapshots: Path | None = None, load_snapshot: bool = False,
                extra: Sequence[str] = ()) -> list[str]:
    """The recorded QEMU command line made into its replay: ``rr=replay`` on the kept
    log, sockets in a new private directory, host-side files (QEMU's trace log, an
    audio capture) in the replay's directory, and no host port forward (in replay the
    network backend is cut off anyway). The guest-visible arguments stay identical."""
    def moved(a: str) -> str:
        for old, new in ((old_private, new_private), (old_artifacts, new_artifacts)):
            a = a.replace(qemu_opt(str(old)) + "/", qemu_opt(str(new)) + "/")
            if a.startswith(str(old) + "/"):
                a = str(new) + a[len(str(old)):]
        return a

    out: list[str] = []
    args = list(recorded)
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-icount" or (a == "-object" and i + 1 < len(args)
                                         and args[i + 1].startswith("filter-replay,")) \
                or (a == "-drive" and i + 1 < len(args)
                    and f"id={SNAPSHOT_DRIVE}" in args[i + 1].split(",")):
            i += 2
            continue
        if a == "-netdev" and i + 1 < len(args):
            out += [a, re.sub(r",hostfwd=[^,]*", "", args[i + 1])]
            i += 2
            continue
        out.append(moved(a))
        i += 1
    net = netdev_id(out)
    return out + rr_args("replay", rrfile, netdev=net, snapshots=snapshots,
                         load_snapshot=load_snapshot) + list(extra)


# ---- keeping a recording ----------------------------------------------------------------

def file_digest(path: Path) -> str:
    """sha256 of a file (the image builder's, one implementation)."""
    from lab.image import sha256
    return sha256(path)


def boot_inputs(argv: Sequence[str]) -> dict[str, str]:
    """sha256 of the files the guest boots from (``-kernel``, ``-initrd``): a replay on
    other files is another machine, and is refused."""
    out: dict[str, str] = {}
    for flag, value in zip(argv, argv[1:]):
        if flag in ("-kernel", "-initrd") and Path(value).is_file():
            out[flag.lstrip("-")] = file_digest(Path(value))
    return out


@dataclass(frozen=True)
class RecordingInfo:
    """``record.json``: what a replay needs, beside the log itself."""

    iteration: str
    status: str
    mode: str
    argv: tuple[str, ...]
    private_dir: str
    artifacts_dir: str
    boot_inputs: dict[str, str]
    size_bytes: int
    wall_s: float          # QEMU launch -> exit, host time
    boot_s: float          # QEMU launch -> guest agent ready
    guest_s: float | None  # the last printk time on the console: guest time recorded

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        return d

    @classmethod
    def read(cls, path: Path) -> RecordingInfo:
        from lab.inputs import read_json

        d = read_json(path, "the recording's record.json")
        if not isinstance(d, dict):
            raise SpecError("not a recording record (a JSON object)", file=str(path))
        try:
            return cls(**{**d, "argv": tuple(str(a) for a in d["argv"])})
        except (TypeError, KeyError) as exc:
            raise SpecError(f"not a recording record: {exc}", file=str(path)) from None


def keep_recording(info: RecordingInfo, rrfile: Path, it_dir: Path, *, keep: bool,
                   snapshots: Path | None = None) -> Path | None:
    """Move the finished log (and its snapshot image) into ``it_dir/record/`` with its
    ``record.json`` (keep), or delete them. Returns the kept directory."""
    if not keep:
        rrfile.unlink(missing_ok=True)
        if snapshots is not None:
            snapshots.unlink(missing_ok=True)
        return None
    dest = it_dir / RECORD_DIR
    dest.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.move(str(rrfile), dest / RECORDING_FILE)
    if snapshots is not None and snapshots.exists():
        shutil.move(str(snapshots), dest / SNAPSHOT_FILE)
    (dest / RECORD_JSON).write_text(json.dumps(info.to_json(), indent=2) + "\n",
                                    encoding="utf-8")
    return dest


def last_guest_time(lines: Iterable[str]) -> float | None:
    """The last printk timestamp (seconds) among console lines."""
    last = None
    for text in lines:
        m = re.match(r"^\[\s*(\d+\.\d+)\]", text)
        if m:
            last = float(m.group(1))
    return last
