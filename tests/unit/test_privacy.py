"""Private by default: run directories and files, child environments, log redaction."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lab import privacy
from lab.agent.winrm import REDACTOR, WinRmCredentials
from lab.qemu_process import QemuProcess
from lab.rundir import RunDir

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "Tr0ub4dor&3-unit-test"


def test_child_env_has_no_secrets() -> None:
    env = {"PATH": "/usr/bin", "HOME": "/root", "REBALAB_WINRM_PASSWORD": "x",
           "REBALAB_WINDOWS_PRODUCT_KEY": "k", "GITHUB_TOKEN": "t", "AWS_SECRET_ACCESS_KEY": "s",
           "CI_JOB_TOKEN": "j", "REBALAB_WINRM_USER": "rebalab", "REBALAB_RUNS": "runs"}
    assert privacy.child_env(env) == {"PATH": "/usr/bin", "HOME": "/root",
                                      "REBALAB_WINRM_USER": "rebalab", "REBALAB_RUNS": "runs"}


def test_a_qemu_child_does_not_inherit_the_password(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBALAB_WINRM_PASSWORD", PASSWORD)
    out = tmp_path / "env.txt"
    p = QemuProcess(["sh", "-c", f"env > {out}"], stderr_path=tmp_path / "err", log=lambda m: None)
    p.start()
    assert p._proc is not None and p._proc.wait(timeout=10) == 0
    text = out.read_text()
    assert "PATH=" in text and PASSWORD not in text and "REBALAB_WINRM_PASSWORD" not in text


def test_run_directory_is_private_and_its_log_redacted(tmp_path: Path) -> None:
    WinRmCredentials("rebalab", PASSWORD, source="test")
    run = RunDir(tmp_path, "r")
    try:
        assert stat.S_IMODE(run.path.stat().st_mode) == 0o700
        run.log(f"agent failed: password={PASSWORD}")
    finally:
        run.close()
    assert PASSWORD not in (run.path / "lab.log").read_text()


def test_every_record_is_redacted_even_on_handlers_made_later(tmp_path: Path) -> None:
    WinRmCredentials("rebalab", PASSWORD, source="test")
    privacy.redact_all_records()
    # a logger and a handler that exist only after the redaction was installed
    log_file = tmp_path / "late.log"
    h = logging.FileHandler(log_file)
    lg = logging.getLogger("some.library.made.later")
    lg.propagate = False
    lg.addHandler(h)
    try:
        import base64
        token = base64.b64encode(f"rebalab:{PASSWORD}".encode()).decode()
        lg.warning("Authorization: Basic %s", token)
        lg.error("login with %s failed", PASSWORD)
        try:
            raise RuntimeError(f"bad password {PASSWORD}")
        except RuntimeError:
            lg.exception("boom")
    finally:
        lg.removeHandler(h)
        h.close()
    text = log_file.read_text()
    assert PASSWORD not in text and token not in text and text.count(REDACTOR.MASK) >= 3


def test_inherited_ignored_signals_are_noted_in_the_run_log(tmp_path: Path) -> None:
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        notes = privacy.inherited_signal_notes()
    finally:
        signal.signal(signal.SIGINT, old)
    assert notes == ["SIGINT was inherited as ignored: this run cannot be interrupted by it"]
    privacy.STARTUP_NOTES[:] = notes
    try:
        run = RunDir(tmp_path, "r")
        run.close()
    finally:
        privacy.STARTUP_NOTES.clear()
    assert notes[0] in (run.path / "lab.log").read_text()


def test_cli_writes_private_files(tmp_path: Path) -> None:
    """The CLI's umask: what a command writes is 0600 in 0700 directories."""
    data = REPO / "tests" / "unit" / "data" / "logs" / "kernel" / "dmesg_grep_prompt_nanopi.txt"
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "lab.cli", "inspect", str(data), "--report", str(out)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 1, r.stderr
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), \
        {p.name: oct(p.stat().st_mode) for p in files}
    assert stat.S_IMODE(out.stat().st_mode) == 0o700

