"""Hostile input is normal input: every command answers bad files and arguments with
exit 2 and one line naming the file (and line), never a traceback, never the file's
content, quickly and in bounded memory. A first part of issue 13's corpus."""

from __future__ import annotations

import json

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.cli import main

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Do-Not-Echo"


def _write(d: Path, name: str, data: str | bytes) -> Path:
    p = d / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def _bomb(levels: int = 8) -> str:
    out = 'l0: &l0 ["x","x","x","x","x","x","x","x","x"]\n'
    for i in range(1, levels):
        out += f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n"
    return "name: t\nsteps:\n  - sleep: 1ms\nlimits:\n  " + out.replace("\n", "\n  ")


SCENARIOS: dict[str, tuple[str | bytes, str]] = {
    "alias bomb": (_bomb(), "aliases are expanded"),
    "deep nesting": ("name: t\nsteps:\n  - sleep: 1ms\nx: " + "[" * 3000 + "]" * 3000 + "\n",
                     "nested more deeply"),
    "NUL byte": ("name: t\x00\nsteps: []\n", "does not allow"),
    "not UTF-8": (b"name: t\xff\xfe\nsteps: []\n", "not UTF-8"),
    "topology outside": ("name: t\ntopology: /etc/passwd.yaml\nsteps:\n  - sleep: 1ms\n",
                         "inside the scenario's directory"),
    "topology escaping": ("name: t\ntopology: ../../../etc/x.yaml\nsteps:\n  - sleep: 1ms\n",
                          "inside the scenario's directory"),
    "romfile": ("name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1, "
                "props: {romfile: /etc/shadow}}\n", "names a host file"),
    "prop with comma": ("name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1, "
                        "props: {'a,romfile': x}}\n", "not one QEMU takes"),
    "huge sweep": ("name: t\nparameters:\n" + "".join(
        f"  p{i}: {{range: [0, 9999]}}\n" for i in range(5)) + "steps:\n"
        + "".join(f"  - sleep: ${{p{i}}}ms\n" for i in range(5)), "at most 1000000"),
    "overflowing range": ("name: t\nparameters:\n  a: {range: [0, 1.0e+308, 1.0e-300]}\n"
                          "steps:\n  - sleep: ${a}ms\n", "too large to count"),
    "huge seed": ("name: t\nseed: " + "9" * 5000 + "\nsteps:\n  - sleep: 1ms\n", "seed"),
    "windows image outside": ('name: t\nguest: "windows:/dev/sda"\nsteps:\n  - sleep: 1ms\n',
                              "inside the scenario's directory"),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_bad_scenarios(name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, why = SCENARIOS[name]
    (tmp_path / "x.yaml").write_text(f"{SECRET}: 1\n")      # a file a topology might name
    f = _write(tmp_path, "s.yaml", text)
    t0 = time.monotonic()
    rc = main(["validate", str(f)])
    out, err = capsys.readouterr()
    assert rc == 2, (name, out, err)
    assert why in err, (name, err)
    assert "Traceback" not in out + err and SECRET not in out + err
    assert time.monotonic() - t0 < 5


def test_special_files_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "s.yaml"
    os.mkfifo(fifo)
    for args in (["validate", str(fifo)], ["validate", "/dev/zero"], ["timeline", str(fifo)],
                 ["replay", str(tmp_path), "--iteration", "0"]):
        rc = main(args)
        out, err = capsys.readouterr()
        assert rc == 2 and err.count("\n") == 1, (args, err)
        assert "Traceback" not in err


@pytest.mark.parametrize("run_json, why", [
    ('{"base_dir": 5}', "not a run record"),
    ("[1, 2]", "not a run record"),
    ("{not json", "not valid JSON"),
])
def test_bad_run_json(run_json: str, why: str, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run.json").write_text(run_json)
    (tmp_path / "scenario.yaml").write_text("name: t\nsteps:\n  - sleep: 1ms\n")
    rc = main(["replay", str(tmp_path), "--iteration", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and "Traceback" not in err


@pytest.mark.parametrize("args, why", [
    (["rebalance", "reconfigure", "--prop", "foo"], "expected KEY=VALUE"),
    (["rebalance", "reconfigure", "--prop", "romfile=/etc/shadow"], "names a host file"),
    (["inspect", "--format", "nope", "x"], "unknown log format"),
])
def test_bad_arguments(args: list[str], why: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and why in err and "Traceback" not in err


def test_an_internal_error_is_one_line_and_a_private_crash_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import lab.cli as cli

    def boom(args: object) -> int:
        raise RuntimeError(f"bug with {SECRET}")
    monkeypatch.setattr(cli, "cmd_models", boom)
    monkeypatch.setenv("REBALAB_RUNS", str(tmp_path / "runs"))
    rc = main(["models"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: internal error: RuntimeError")
    assert SECRET not in err and "Traceback" not in err
    (crash,) = (tmp_path / "runs").glob("crash-*.log")
    assert oct(crash.stat().st_mode & 0o777) == "0o600" and SECRET in crash.read_text()


def test_alias_bomb_stays_small_in_a_child_under_a_memory_limit(tmp_path: Path) -> None:
    f = _write(tmp_path, "bomb.yaml", _bomb(9))
    r = subprocess.run(["prlimit", "--as=1500000000", sys.executable, "-m", "lab.cli",
                        "validate", str(f)], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert r.returncode == 2 and "aliases are expanded" in r.stderr, r.stderr[-500:]


@pytest.mark.parametrize("extra, why", [
    (["--smp", "0"], "--smp 0"), (["--timeout-min", "nan"], "--timeout-min"),
    (["--disk-size=-5G"], "--disk-size '-5G'"), (["--image-index", "0"], "indexes start at 1"),
])
def test_windows_image_arguments_are_checked_before_kvm(
        extra: list[str], why: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Refused for what they are, not only because this host has no KVM."""
    iso = _write(tmp_path, "win.iso", b"\0")
    rc = main(["image", "windows", "--iso", str(iso), "--out", str(tmp_path / "w.qcow2"),
               "--dry-run", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and "KVM" not in err, err


def test_a_missing_windows_image_is_one_line_before_any_progress(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", str(REPO / "scenarios" / "hotplug-cycle.yaml"), "--guest",
               f"windows:{tmp_path / 'missing.qcow2'}", "--runs", str(tmp_path / "runs")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", out
    assert err.count("\n") == 1 and "Windows image not found" in err, err
    assert not (tmp_path / "runs").exists()      # no run directory for a run that never began


def _fake_run(tmp_path: Path, base: Path, scenario_text: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "scenario.yaml").write_text(scenario_text)
    (run / "run.json").write_text(json.dumps({"base_dir": str(base),
                                              "scenario_file": "mine.yaml"}))
    return run


REPLAYED = """name: r
topology: secret.yaml
guest: linux
steps:
  - guest: {run: "true"}
"""


def test_replay_does_not_trust_a_base_dir_that_does_not_hold_the_scenario(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A stranger's run.json names a directory of ours: its files must not become the
    replay's topology (or a Windows disk)."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.yaml").write_text(f"machine: q35\n# {SECRET}\n")
    run = _fake_run(tmp_path, victim, REPLAYED)
    rc = main(["replay", str(run), "--iteration", "0", "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert rc == 2 and SECRET not in err
    assert "no longer holds this run's scenario" in err
    assert str(run / "secret.yaml") in err or "secret.yaml" in err.splitlines()[-1], err


def test_replay_trusts_the_base_dir_that_still_holds_the_scenario(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lab.cli import _replay_base
    import argparse

    home = tmp_path / "home"
    home.mkdir()
    (home / "mine.yaml").write_text(REPLAYED)
    run = _fake_run(tmp_path, home, REPLAYED)
    meta = json.loads((run / "run.json").read_text())
    args = argparse.Namespace(base_dir=None)
    assert _replay_base(args, run, meta, REPLAYED) == home
    (home / "mine.yaml").write_text(REPLAYED + "# edited\n")
    assert _replay_base(args, run, meta, REPLAYED) == run
    assert _replay_base(argparse.Namespace(base_dir=str(home)), run, meta, REPLAYED) == home
