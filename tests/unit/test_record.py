"""QEMU record/replay (lab.record): what cannot be recorded is refused before any VM, at
the step's line; the record and replay command lines differ only where they must."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from lab import cli
from lab.record import (RECORD_DIR, RECORD_JSON, RECORDING_FILE, RecordingInfo, boot_inputs,
                        check_recordable, keep_recording, last_guest_time, netdev_id,
                        parse_record, recordable_network, replay_argv, rr_args)
from lab.runner import resolve_topology
from lab.scenario import validate_text
from vdevice.errors import SpecError

REPO = Path(__file__).resolve().parents[2]
SCEN = REPO / "scenarios"

HEAD = """\
name: rec
topology:
  ports: [{id: rp1, chassis: 1, slot: 1}, {id: rp2, chassis: 2, slot: 2}]
  devices: [{id: edu0, model: edu, port: rp1, placement: cold}]
record: true
steps:
  - module: {name: rebalab_testdrv, params: {bug: none}}
"""

# each step QEMU's replay log cannot hold, and a word of the alternative the error names
REFUSED = [
    ("  - plug: {device: snd0, model: AC97, port: rp2}\n", "plug", "placement: cold"),
    ("  - unplug: {device: edu0}\n", "unplug", "remove"),
    ("  - rebalance: {trigger: pressure, device: edu0}\n", "pressure", "cold"),
    ("  - rebalance: {trigger: reconfigure, device: edu0, model: AC97}\n", "reconfigure",
     "cold"),
    ("  - rebalance: {trigger: cpu-hotplug}\n", "cpu-hotplug", "cold"),
    ("  - pause: {}\n", "pause", "guest-side delay"),
    ("  - resume: {}\n", "resume", "guest-side delay"),
]


def _validate(text: str, name: str = "scenarios/rec.yaml"):  # type: ignore[no-untyped-def]
    return validate_text(text, name, resolve_topology, base_dir=SCEN)


@pytest.mark.parametrize("step,what,alternative", REFUSED, ids=[r[1] for r in REFUSED])
def test_a_step_that_cannot_be_recorded_is_refused_at_its_line(step: str, what: str,
                                                               alternative: str) -> None:
    text = HEAD + "  - sleep: 10ms\n" + step
    with pytest.raises(SpecError) as err:
        _validate(text)
    msg = str(err.value)
    line = HEAD.count("\n") + 2           # the offending step's own line
    assert msg.startswith(f"scenarios/rec.yaml:{line}: steps[2]: not recordable (record: true)"), msg
    assert what in msg and alternative in msg, msg
    # the same file without `record:` is a valid scenario: only recording refuses it
    if what != "plug":
        _validate(text.replace("record: true\n", ""))


def test_recordable_steps_pass_and_record_all_is_kept() -> None:
    sc = _validate(HEAD.replace("record: true", "record: all")
                   + "  - rebalance: {trigger: rescan, device: edu0}\n"
                   + "  - guest: {run: 'echo 1 > /sys/bus/pci/rescan'}\n")
    assert sc.record == "all"
    assert sc.to_json()["record"] == "all"
    assert _validate(HEAD).record == "failing"
    assert _validate(HEAD.replace("record: true\n", "")).record is None


def test_record_takes_true_false_or_all() -> None:
    with pytest.raises(SpecError) as err:
        _validate(HEAD.replace("record: true", "record: sometimes"))
    assert "scenarios/rec.yaml:5" in str(err.value) and "record" in str(err.value)
    assert parse_record(False) is None and parse_record(True) == "failing"
    with pytest.raises(SpecError):
        parse_record("often")


def test_the_shipped_scenarios(capsys: pytest.CaptureFixture[str]) -> None:
    """race-planted-recorded is recordable; race-planted (QMP hot-plug) is refused under
    --record before anything starts, naming the plug step's line and the alternative."""
    check_recordable(_validate((SCEN / "race-planted-recorded.yaml").read_text(),
                               "scenarios/race-planted-recorded.yaml"), flag="--record")
    text = (SCEN / "race-planted.yaml").read_text()
    plug_line = next(i for i, ln in enumerate(text.splitlines(), 1) if "- plug:" in ln)
    rc = cli.main(["run", str(SCEN / "race-planted.yaml"), "--record", "--runs",
                   "/nonexistent/never-made"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"race-planted.yaml:{plug_line}: " in err and "not recordable (--record)" in err, err
    assert "placement: cold" in err and "rescan" in err, err
    assert len(err.strip().splitlines()) == 1
    assert not Path("/nonexistent/never-made").exists()
    rc = cli.main(["run", str(SCEN / "race-planted-recorded.yaml"), "--record", "--accel",
                   "kvm"])
    assert rc == 2 and "TCG" in capsys.readouterr().err


def test_replay_exact_without_a_recording_says_how_to_make_one(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "iterations" / "3").mkdir(parents=True)
    rc = cli.main(["replay", str(tmp_path), "--iteration", "3", "--exact"])
    err = capsys.readouterr().err
    assert rc == 2 and "no recording" in err and "--record" in err, err
    rc = cli.main(["replay", str(tmp_path), "--iteration", "3", "--exact", "--attempts", "3"])
    assert rc == 2 and "--exact" in capsys.readouterr().err


# ---- command lines -------------------------------------------------------------------

NETWORK = ("-netdev", "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:4242-:22",
           "-device", "virtio-net-pci,netdev=n0,bus=pcie.0")


def test_recorded_network_uses_a_nic_whose_traffic_replays() -> None:
    net = recordable_network(NETWORK)
    assert net[3] == "e1000,netdev=n0,bus=pcie.0"
    assert net[:3] == NETWORK[:3]
    assert netdev_id(NETWORK) == "n0"
    args = rr_args("record", Path("/r,un/x.bin"), netdev="n0")
    # the one encoder: a comma in the path is doubled, it cannot add an option
    assert args == ["-icount", "shift=auto,rr=record,rrfile=/r,,un/x.bin",
                    "-object", "filter-replay,id=rr-net,netdev=n0"]
    with pytest.raises(ValueError):
        rr_args("rewind", Path("x"))


def test_replay_argv_changes_only_host_side_paths_and_the_rr_mode() -> None:
    priv, art = Path("/tmp/rebalab-abc"), Path("/runs/r,1/vm1")
    recorded = ["qemu", "-S", "-chardev", f"file,id=con0,path={priv}/console.fifo",
                "-chardev", f"socket,id=qmp0,path={priv}/qmp.sock,server=on,wait=off",
                *recordable_network(NETWORK), "-device", "edu,id=edu0,bus=rp1",
                "-D", f"{art}/qemu-trace.log",
                *rr_args("record", art / "recording.bin")]
    new_priv, new_art = Path("/tmp/rebalab-new"), Path("/runs/x")
    got = replay_argv(recorded, rrfile=Path("/runs/r/iterations/3/record/recording.bin"),
                      old_private=priv, new_private=new_priv, old_artifacts=art,
                      new_artifacts=new_art)
    assert got.count("-icount") == 1 and got.count("-object") == 1
    assert "shift=auto,rr=replay,rrfile=/runs/r/iterations/3/record/recording.bin" in got
    assert f"file,id=con0,path={new_priv}/console.fifo" in got
    assert f"{new_art}/qemu-trace.log" in got
    assert "user,id=n0,restrict=on" in got            # nothing forwarded: nothing answers
    assert not any(str(priv) in a or "hostfwd" in a for a in got), got
    # what the guest sees is the same, in the same order (host paths and the netdev's
    # host side aside)
    def visible(args: list[str]) -> list[str]:
        return [a for a in args if "/" not in a and not a.startswith("user,")]
    assert visible(got) == visible(recorded)


def test_a_recording_is_kept_or_deleted(tmp_path: Path) -> None:
    rr = tmp_path / "vm1" / RECORDING_FILE
    rr.parent.mkdir()
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"k" * 100)
    argv = ("qemu", "-kernel", str(kernel))
    info = RecordingInfo(iteration="3", status="failed", mode="failing", argv=argv,
                         private_dir="/tmp/rebalab-x", artifacts_dir=str(rr.parent),
                         boot_inputs=boot_inputs(argv), size_bytes=5, wall_s=17.4, boot_s=9.1,
                         guest_s=16.2)
    rr.write_bytes(b"log..")
    it = tmp_path / "iterations" / "3"
    dest = keep_recording(info, rr, it, keep=True)
    assert dest == it / RECORD_DIR and (dest / RECORDING_FILE).read_bytes() == b"log.."
    assert not rr.exists() and (dest.stat().st_mode & 0o777) == 0o700
    again = RecordingInfo.read(dest / RECORD_JSON)
    assert again == info and again.boot_inputs["kernel"] == boot_inputs(argv)["kernel"]
    rr.write_bytes(b"other")
    assert keep_recording(info, rr, tmp_path / "iterations" / "4", keep=False) is None
    assert not rr.exists() and not (tmp_path / "iterations" / "4").exists()
    (dest / RECORD_JSON).write_text(json.dumps({"iteration": "3"}))
    with pytest.raises(SpecError):
        RecordingInfo.read(dest / RECORD_JSON)


def test_last_guest_time() -> None:
    assert last_guest_time(["[    1.5] a", "no stamp", "[   16.067322] pci", ""]) == 16.067322
    assert last_guest_time(["boot"]) is None


def test_the_cmdline_file_round_trips() -> None:
    """The replay reads the recorded argv from record.json, not the shell-quoted file."""
    argv = ["qemu", "-append", "console=ttyS0 quiet", "-chardev", "file,id=c,path=/a,,b"]
    assert shlex.split(" ".join(shlex.quote(a) for a in argv)) == argv


# ---- the serial relay, the comparison, gdb -------------------------------------------

def test_fifo_relay_forwards_everything_to_the_console_socket(tmp_path: Path) -> None:
    """One-byte writes (as QEMU's UART makes them) far beyond a unix socket's few hundred
    unread bytes never block the writer, and all of them reach the reader, in order."""
    import os
    import socket

    from lab.record_io import FifoRelay

    relay = FifoRelay(tmp_path / "console.fifo", tmp_path / "console.sock").start()
    try:
        payload = b"".join(f"[ {i:5d}.000000] line {i}\n".encode() for i in range(2000))
        fd = os.open(tmp_path / "console.fifo", os.O_WRONLY | os.O_NONBLOCK)
        for i in range(len(payload)):
            assert os.write(fd, payload[i:i + 1]) == 1      # never EAGAIN: nobody reads yet
        os.close(fd)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(tmp_path / "console.sock"))
        s.settimeout(10)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            assert chunk, len(got)
            got += chunk
        assert got == payload
        s.close()
    finally:
        relay.stop()
    assert stat_mode(tmp_path / "console.fifo") == 0o600


def stat_mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


OOPS_CONSOLE = """\
2026-12-02T08:13:40.001Z [   17.000100] rebalab_testdrv 0000:01:00.0: remove: bug=no-drain in flight=1: not waiting for it
2026-12-02T08:13:40.002Z [   17.001390] BUG: unable to handle page fault for address: ffffc90000a00098
2026-12-02T08:13:40.003Z [   17.001400] #PF: supervisor read access in kernel mode
2026-12-02T08:13:40.004Z [   17.001500] Oops: 0000 [#1] PREEMPT SMP NOPTI
2026-12-02T08:13:40.005Z [   17.001600] RIP: 0010:ioread32+0x2e/0x60
2026-12-02T08:13:40.006Z [   17.001700]  tdrv_read+0x1a0/0x2c0 [rebalab_testdrv]
2026-12-02T08:13:40.007Z [   17.001800] ---[ end trace 0000000000000000 ]---
2026-12-02T08:13:41.000Z [   18.500000] rebalab-uevent ACTION=bind SUBSYSTEM=pci DEVPATH=/devices/pci0000:00/0000:00:01.0/0000:01:00.0 DRIVER=rebalab_testdrv SEQNUM=696
"""


def test_oops_facts_and_the_comparison(tmp_path: Path) -> None:
    from lab.replay_exact import compare, oopses

    found = oopses([ln.split(" ", 1)[1] for ln in OOPS_CONSOLE.splitlines()])
    assert [(o.t_guest_ns, o.address, o.rip) for o in found] == [
        (17_001_390_000, "ffffc90000a00098", "ioread32+0x2e/0x60")]
    it_dir, rep = tmp_path / "it", tmp_path / "replay"
    (it_dir / "vm").mkdir(parents=True)
    rep.mkdir()
    (it_dir / "vm" / "console.log").write_text(OOPS_CONSOLE)
    # the replay: same guest lines, other host times
    (rep / "console.log").write_text(OOPS_CONSOLE.replace("08:13:4", "08:20:4"))
    for d in (it_dir / "vm", rep):
        (d / "guest-trace.txt").write_text("")
    same = compare(it_dir, rep, ["kernel.oops@guest/race"])
    assert same.same_run and same.reproduced, same.to_json()
    assert (rep / "timeline.jsonl").is_file()
    # one guest timestamp off: not the same run (the oops still reproduces)
    (rep / "console.log").write_text(OOPS_CONSOLE.replace("17.001390", "17.001391"))
    other = compare(it_dir, rep, [])
    assert not other.same_run and other.console_first_diff == 1
    assert other.reproduced and other.replayed_oops != other.recorded_oops


def test_gdb_endpoint_and_walkthrough(tmp_path: Path) -> None:
    from lab.record_debug import gdb_endpoint, socket_path, walkthrough

    ep = gdb_endpoint(tmp_path / "a,b")
    assert ep == f"unix:{tmp_path}/a,,b/gdb.sock,server=on,wait=off"
    assert socket_path(ep) == f"{tmp_path}/a,b/gdb.sock"
    script = walkthrough("/s/gdb.sock", {"pci_device_remove": 0xffffffff815ad750,
                                         "page_fault_oops": 0xffffffff81087240},
                         "ffffc90000a00098")
    lines = script.splitlines()
    assert lines[2] == "target remote /s/gdb.sock"
    assert lines.index("break *$pci_device_remove") < lines.index("break *$page_fault_oops")
    assert "x/wx 0xffffc90000a00098" in lines and lines[-2:] == ["kill", "quit"]
    assert "set $pci_device_remove = 0xffffffff815ad750" in lines
