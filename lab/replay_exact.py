"""``rebalab replay RUN_DIR --iteration K --exact``: the same run, instruction for instruction.

The iteration's recording (``iterations/K/record/``, made by ``run --record``) is
replayed by QEMU with ``rr=replay`` on the recorded command line (lab.record): no agent
connects and nothing on the host answers the network (``filter-replay`` injects the
recorded packets and cuts the backend off), the serial ports' input comes from the log.
The lab only listens: the console and the kprobe stream (ttyS2) are captured as the run
captured them, and when QEMU exits (the replay reaches the recorded poweroff or quit)
the replay is compared with the run:

* the console text, line for line (printk timestamps included);
* the kprobe stream, line for line;
* the iteration's timeline: every guest event the run recorded (kernel log, uevents,
  kprobes) must be in the timeline rebuilt from the replay at the same guest time
  (host times differ: the replay runs slower);
* the verdict: the kernel-oops rule runs on the replayed kernel log, and each oops is
  compared by its guest timestamp, header, faulting address and RIP.

Exit 1 when the violation reproduces, 0 when the replay is the same run and no rule
broke, 2 when the replay could not be made or diverged without a violation. Replay has
no pace of its own: its deadline is scaled to the recording's length (measured replay
speed here: PLATFORM.md and the README, "Exact replay").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.console import Console
from lab.errors import ConfigError, DeadlineExceeded, LabError, QemuError
from lab.events import Event
from lab.qemu_process import QemuProcess
from lab.qmp import QmpSession
from lab.record import (RECORD_DIR, RECORD_JSON, RECORDING_FILE, SNAPSHOT_FILE, RecordingInfo,
                        boot_inputs, make_snapshot_image, replay_argv)
from lab.rundir import RunDir

#: the replay's deadline: this much, plus this many times the recording's wall time
#: (replay ran 2.3x and 4.6x slower than real time here; see the README)
REPLAY_BASE_S = 120.0
REPLAY_FACTOR = 10.0
PRIVATE_PREFIX = "rebalab-"
#: an interactive ``--gdb`` session ends after this long unless --timeout says otherwise
GDB_SESSION_S = 4 * 3600.0

_OOPS_ADDR_RE = re.compile(r"(?:unable to handle page fault for address|"
                           r"NULL pointer dereference, address):\s*(\S+)")
_RIP_RE = re.compile(r"\bRIP: [0-9a-f]{4}:(\S+)")
_TS_RE = re.compile(r"^\[\s*(\d+)\.(\d{6})\]")


@dataclass(frozen=True)
class Oops:
    """One crash report on the console: where and when, by the guest's own clock."""

    t_guest_ns: int
    header: str
    address: str | None
    rip: str | None

    def to_json(self) -> dict[str, Any]:
        return {"t_guest_ns": self.t_guest_ns, "t_guest_s": self.t_guest_ns / 1e9,
                "header": self.header, "address": self.address, "rip": self.rip}


@dataclass
class Comparison:
    """The replay against the run, part by part."""

    console_lines: tuple[int, int]                 # (recorded, replayed)
    console_same: bool
    console_first_diff: int | None
    trace_lines: tuple[int, int]
    trace_same: bool
    guest_events: int                              # in the iteration's recorded timeline
    guest_events_matched: int
    missing: list[str] = field(default_factory=list)
    recorded_oops: list[Oops] = field(default_factory=list)
    replayed_oops: list[Oops] = field(default_factory=list)
    violations: list[dict[str, Any]] = field(default_factory=list)   # from the replay
    recorded_signatures: list[str] = field(default_factory=list)

    @property
    def same_run(self) -> bool:
        return (self.console_same and self.trace_same
                and self.guest_events_matched == self.guest_events
                and self.recorded_oops == self.replayed_oops)

    @property
    def reproduced(self) -> bool:
        """The run's violation came back: a kernel report in the replay."""
        return any(str(v["rule"]).startswith("kernel.") for v in self.violations)

    def to_json(self) -> dict[str, Any]:
        return {"same_run": self.same_run, "reproduced": self.reproduced,
                "console": {"recorded_lines": self.console_lines[0],
                            "replayed_lines": self.console_lines[1],
                            "same": self.console_same, "first_diff": self.console_first_diff},
                "kprobe_stream": {"recorded_lines": self.trace_lines[0],
                                  "replayed_lines": self.trace_lines[1],
                                  "same": self.trace_same},
                "timeline": {"recorded_guest_events": self.guest_events,
                             "matched": self.guest_events_matched,
                             "missing": self.missing[:20]},
                "oops": {"recorded": [o.to_json() for o in self.recorded_oops],
                         "replayed": [o.to_json() for o in self.replayed_oops]},
                "violations": self.violations,
                "recorded_signatures": self.recorded_signatures}


# ---- reading the lab's own files ----------------------------------------------------------

def _stamped_lines(path: Path) -> list[tuple[int, str]]:
    """A Console log (``ISO-TIME text`` per line) -> (host ns, text); the host time is
    only an order here, the guest's own timestamps are what is compared."""
    from datetime import datetime

    out: list[tuple[int, str]] = []
    try:
        raw = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for ln in raw:
        stamp, _, text = ln.partition(" ")
        try:
            t = int(datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() * 1e9)
        except ValueError:
            t, text = 0, ln
        out.append((t, text))
    return out


def oopses(lines: list[str]) -> list[Oops]:
    """Crash reports on a console: the first line of each (``BUG:``, ``Oops:``,
    ``general protection fault``...), its faulting address and RIP (the kernel-oops
    rule's own start pattern)."""
    from lab.rules.kernel_oops import _END_RE, _STARTS, strip_prefix

    found: list[Oops] = []
    cur: dict[str, Any] | None = None
    for text in lines:
        body = strip_prefix(text)
        ts = _TS_RE.match(text)
        starts = any(rx.search(body) for _, rx in _STARTS)
        if starts and (cur is None or cur.get("closed")):
            if cur is not None:
                found.append(_oops(cur))
            t = int(ts.group(1)) * 1_000_000_000 + int(ts.group(2)) * 1000 if ts else -1
            cur = {"t": t, "header": body, "address": None, "rip": None}
        if cur is None:
            continue
        m = _OOPS_ADDR_RE.search(body)
        if m and cur["address"] is None:
            cur["address"] = m.group(1)
        m = _RIP_RE.search(body)
        if m and cur["rip"] is None:
            cur["rip"] = m.group(1)
        if _END_RE.search(body):
            cur["closed"] = True
    if cur is not None:
        found.append(_oops(cur))
    return found


def _oops(d: dict[str, Any]) -> Oops:
    return Oops(d["t"], d["header"], d["address"], d["rip"])


def guest_events(console: list[tuple[int, str]], trace: list[tuple[int, str]]) -> list[Event]:
    """The guest's side of a timeline, from the console and the kprobe stream: the
    parsers the run's observation uses (kernel log and uevents; kprobes)."""
    from lab.tracers.kernel_log import events_from_console
    from lab.guest.linux.kprobes import ALL_SPECS, TraceParser

    parser = TraceParser(ALL_SPECS)
    kprobes = [ev for t, text in trace if (ev := parser.parse(text, t)) is not None]
    return events_from_console(console) + kprobes


def _key(ev: Event) -> tuple[str, str, int | None]:
    return (ev.source.value, ev.kind.value, ev.t_guest_ns)


def compare(it_dir: Path, replay_dir: Path, recorded_signatures: list[str]) -> Comparison:
    """The replay's captures (``replay_dir``) against the iteration's (``it_dir``)."""
    from lab.rules import check_all
    from lab.rules.base import Limits, RuleContext
    from lab.timeline import Timeline

    rec_con = _stamped_lines(it_dir / "vm" / "console.log")
    rep_con = _stamped_lines(replay_dir / "console.log")
    rec_tr = _stamped_lines(it_dir / "vm" / "guest-trace.txt")
    rep_tr = _stamped_lines(replay_dir / "guest-trace.txt")
    a, b = [t for _, t in rec_con], [t for _, t in rep_con]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                 None if len(a) == len(b) else min(len(a), len(b)))
    replayed = guest_events(rep_con, rep_tr)
    tl = Timeline.build({"replay": replayed}, meta={"replay": "exact"})
    tl.write(replay_dir / "timeline.jsonl")
    ctx = RuleContext.from_timeline(tl, devices=(), limits=Limits.from_mapping(None),
                                    bound_at_start=None)
    violations = check_all(tl, ctx, ["kernel-oops"])
    # every guest event of the iteration's recorded timeline, at the same guest time
    have = Counter(_key(e) for e in replayed)
    want: list[Event] = []
    tl_path = it_dir / "timeline.jsonl"
    if tl_path.exists():
        want = [e for e in Timeline.read(tl_path).events
                if e.source.value.startswith("guest.") and e.t_guest_ns is not None]
    missing: list[str] = []
    matched = 0
    for e in want:
        k = _key(e)
        if have[k] > 0:
            have[k] -= 1
            matched += 1
        else:
            missing.append(f"{e.source.value} {e.kind.value} at guest "
                           f"{(e.t_guest_ns or 0) / 1e9:.6f}")
    return Comparison(
        console_lines=(len(a), len(b)), console_same=a == b, console_first_diff=first,
        trace_lines=(len(rec_tr), len(rep_tr)),
        trace_same=[t for _, t in rec_tr] == [t for _, t in rep_tr],
        guest_events=len(want), guest_events_matched=matched, missing=missing,
        recorded_oops=oopses(a), replayed_oops=oopses(b),
        violations=[v.to_json() for v in violations],
        recorded_signatures=recorded_signatures)


# ---- running the replay -------------------------------------------------------------------

def locate(run_dir: Path, k: int) -> tuple[Path, RecordingInfo]:
    """The iteration's directory and its recording; ConfigError says how to get one."""
    it_dir = run_dir / "iterations" / str(k)
    rec = it_dir / RECORD_DIR / RECORD_JSON
    if not rec.is_file() or not (it_dir / RECORD_DIR / RECORDING_FILE).is_file():
        raise ConfigError(f"{run_dir}: iteration {k} has no recording ({rec} is missing). "
                          "Recordings are made by `rebalab run --record` (kept for failing "
                          "iterations) or `--record all` (every iteration)")
    return it_dir, RecordingInfo.read(rec)


def check_inputs(info: RecordingInfo) -> None:
    """The kernel and initrd must be the recorded ones: another guest is another run."""
    now = boot_inputs(info.argv)
    for name, digest in info.boot_inputs.items():
        if now.get(name) != digest:
            raise ConfigError(f"the guest's {name} changed since the recording (sha256 "
                              f"{digest[:12]}..., now {str(now.get(name, 'missing'))[:12]}...): "
                              "the replay would run another guest. Replay with the image the "
                              "run used (rebuild it at that commit)")


def default_timeout(info: RecordingInfo) -> float:
    return REPLAY_BASE_S + REPLAY_FACTOR * max(info.wall_s, info.guest_s or 0.0)


@dataclass
class ReplayRun:
    wall_s: float
    exit_status: int | None
    icount: int | None


def run_replay(info: RecordingInfo, rrfile: Path, out: RunDir, *, timeout: float,
               gdb: str | None = None, log=print) -> ReplayRun:  # type: ignore[no-untyped-def]
    """QEMU in replay mode until it exits by itself (the recorded shutdown), under
    ``timeout``. The console and the kprobe stream go to ``out``."""
    private = Path(tempfile.mkdtemp(prefix=PRIVATE_PREFIX))
    os.chmod(private, 0o700)
    (private / "owner.pid").write_text(f"{os.getpid()}\n")
    extra: list[str] = []
    if gdb:
        extra = ["-gdb", gdb]
    # under gdb, QEMU takes a snapshot when the debugger attaches ("start_debugging"),
    # which reverse execution starts from: it needs a qcow2 image no device uses
    snap = make_snapshot_image(out.path / SNAPSHOT_FILE) if gdb else None
    argv = replay_argv(info.argv, rrfile=rrfile, snapshots=snap, load_snapshot=False,
                       old_private=Path(info.private_dir), new_private=private,
                       old_artifacts=Path(info.artifacts_dir), new_artifacts=out.path,
                       extra=extra)
    import shlex
    (out.path / "qemu-cmdline.txt").write_text(" ".join(shlex.quote(a) for a in argv) + "\n")
    from lab.record_io import FifoRelay
    relays = [FifoRelay(private / f"{n}.fifo", private / f"{n}.sock").start()
              for n in ("console", "trace") if any(f"{n}.fifo" in a for a in argv)]
    proc = QemuProcess(argv, stderr_path=out.path / "qemu.stderr", log=out.log)
    qmp: QmpSession | None = None
    parts: list[Console] = []
    icount: int | None = None
    t0 = time.monotonic()
    try:
        proc.start()
        end = time.monotonic() + 15.0
        while not (private / "qmp.sock").exists():
            if not proc.alive():
                raise QemuError(f"QEMU did not start the replay: {proc.stderr_tail()} "
                                f"(command line in {out.path / 'qemu-cmdline.txt'})")
            if time.monotonic() > end:
                raise DeadlineExceeded("the replay's QMP socket", 15.0)
            time.sleep(0.01)
        qmp = QmpSession(private / "qmp.sock", out.path / "qmp.jsonl")
        qmp.connect()
        for sock, name in (("console.sock", "console.log"), ("trace.sock", "guest-trace.txt")):
            c = Console(private / sock, out.path / name)
            c.connect(15.0)
            parts.append(c)
        if gdb:
            log(f"replay paused at its first instruction, gdb stub on {gdb}; see the "
                "instructions above. It ends when the replay reaches the recorded shutdown "
                "(or Ctrl-C)")
        if not gdb:
            qmp.execute("cont")     # under gdb, the debugger's `continue` starts it
        deadline = time.monotonic() + timeout
        last_poll = 0.0
        while proc.alive():
            now = time.monotonic()
            if now > deadline:
                raise DeadlineExceeded(
                    f"the replay to reach the recording's end (recorded {info.wall_s:.1f} s "
                    f"wall, {info.guest_s or 0:.1f} s guest)", timeout,
                    f"replayed icount {icount}, last console line "
                    f"{(parts[0].lines()[-1].text if parts[0].lines() else 'none')!r}")
            if now - last_poll > 5.0:
                last_poll = now
                try:
                    icount = int(qmp.execute("query-replay", timeout=5).get("icount", 0))
                except LabError:
                    pass
            time.sleep(0.2)
        return ReplayRun(time.monotonic() - t0, proc.returncode(), icount)
    finally:
        steps = [("qmp-quit", lambda: qmp.execute("quit", timeout=2))] if qmp else []
        proc.stop(steps, step_timeout=5.0)
        for relay in relays:
            relay.stop()
        for c in parts:
            c.close()
        if qmp is not None:
            qmp.close()
        shutil.rmtree(private, ignore_errors=True)


def _recorded_signatures(run_dir: Path, k: int) -> list[str]:
    try:
        s = json.loads((run_dir / "summary.json").read_text())
        it = next(i for i in s["iterations"] if i["index"] == k and not i.get("attempt"))
        return [str(v["signature"]) for v in it.get("violations", [])]
    except (OSError, ValueError, KeyError, StopIteration):
        return []


def replay_exact(run_dir: Path, k: int, *, runs_root: Path, timeout: float | None = None,
                 gdb: bool = False) -> int:
    """The CLI command: replay, compare, print, exit status (see the module docstring).
    With ``gdb``: the replay waits for the debugger (lab.record_debug), and the exit
    status is 0 once the session ended (a debugger changes where the replay stops, so
    there is no verdict to compare)."""
    from lab.record_debug import gdb_endpoint, gdb_instructions, kernel_symbols, walkthrough

    it_dir, info = locate(run_dir, k)
    check_inputs(info)
    if timeout is not None and not 0 < timeout < 86400:
        raise ConfigError(f"--timeout {timeout}: must be between 0 and 86400 seconds")
    limit = timeout if timeout is not None else default_timeout(info)
    if gdb and timeout is None:
        limit = GDB_SESSION_S       # a person drives it: a working session's length
    name = "replay"
    try:
        meta = json.loads((run_dir / "run.json").read_text())
        name = str(meta["scenario"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    symbols = kernel_symbols(info, runs_root=runs_root) if gdb else {}
    out = RunDir(runs_root, f"{name}-exact-{k}" + ("-gdb" if gdb else ""))
    endpoint = gdb_endpoint(out.path) if gdb else None
    if endpoint is not None:
        from lab.record_debug import socket_path
        rec = oopses([t for _, t in _stamped_lines(it_dir / "vm" / "console.log")])
        script = out.path / "walkthrough.gdb"
        script.write_text(walkthrough(socket_path(endpoint), symbols,
                                      rec[0].address if rec else None))
        print(gdb_instructions(endpoint, info, script), flush=True)
    print(f"replaying iteration {k} of {run_dir} ({info.size_bytes / 1e6:.1f} MB, recorded "
          f"in {info.wall_s:.1f} s; deadline {limit:.0f} s)")
    try:
        rr = run_replay(info, it_dir / RECORD_DIR / RECORDING_FILE, out, timeout=limit,
                        gdb=endpoint, log=lambda msg: print(msg, flush=True))
        if gdb:
            print(f"gdb session over after {rr.wall_s:.1f} s (QEMU exit status "
                  f"{rr.exit_status}); console in {out.path / 'console.log'}")
            return 0
        cmp = compare(it_dir, out.path, _recorded_signatures(run_dir, k))
        doc = {"run": str(run_dir), "iteration": k, "replay_wall_s": round(rr.wall_s, 2),
               "recorded_wall_s": info.wall_s, "recorded_guest_s": info.guest_s,
               "slowdown": round(rr.wall_s / info.wall_s, 2) if info.wall_s else None,
               "qemu_exit_status": rr.exit_status, "recording_bytes": info.size_bytes,
               **cmp.to_json()}
        out.write_json("replay.json", doc)
    finally:
        out.close()
    _print(doc, cmp, out.path)
    if cmp.reproduced:
        return 1
    return 0 if cmp.same_run else 2


def _print(doc: dict[str, Any], cmp: Comparison, path: Path) -> None:
    def yes(b: bool) -> str:
        return "same" if b else "DIFFERENT"

    print(f"replay took {doc['replay_wall_s']:.1f} s for {doc['recorded_wall_s']:.1f} s "
          f"recorded ({doc['slowdown']}x); QEMU exit status {doc['qemu_exit_status']}")
    print(f"console: {cmp.console_lines[0]} recorded / {cmp.console_lines[1]} replayed lines: "
          f"{yes(cmp.console_same)}" + (f" (first difference at line {cmp.console_first_diff})"
                                        if not cmp.console_same else ""))
    print(f"kprobe stream: {cmp.trace_lines[0]} / {cmp.trace_lines[1]} lines: "
          f"{yes(cmp.trace_same)}")
    print(f"timeline: {cmp.guest_events_matched} of {cmp.guest_events} recorded guest events "
          "at the same guest time in the replay")
    for o in cmp.replayed_oops:
        print(f"oops at guest {o.t_guest_ns / 1e9:.6f} s: {o.header} (address {o.address}, "
              f"RIP {o.rip})")
    print(f"oops: {yes(cmp.recorded_oops == cmp.replayed_oops)} as recorded "
          f"({len(cmp.recorded_oops)} recorded, {len(cmp.replayed_oops)} replayed)")
    for v in cmp.violations:
        print(f"violation: {v['rule']}@{v['device']}: {str(v['message']).splitlines()[0][:160]}")
    if cmp.reproduced:
        print("REPRODUCED: the replay broke the same rule (exit 1)")
    elif cmp.same_run:
        print("same run, no violation (exit 0)")
    else:
        print("the replay DIVERGED from the run (exit 2)")
    print(f"replay directory: {path}")
