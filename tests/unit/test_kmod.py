"""The guest module step: the shell lines it sends, run by a real sh against fake tools.

``modprobe``/``rmmod`` are stand-ins on PATH that record their argv (one argument per
line) and "load" a module by creating its /sys/module directory under a temporary root,
so each case checks what the guest's shell would really do, hostile values included.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lab.agent.posix import PosixShell
from lab.guest.linux.kmod import ModuleRequest, command

FAKE = """#!/bin/sh
printf '%s\\n' "$(basename "$0")" "$@" >> "$KMOD_LOG"
echo --- >> "$KMOD_LOG"
[ -n "$KMOD_FAIL" ] && [ "$KMOD_FAIL" = "$(basename "$0")" ] && exit 3
case "$(basename "$0")" in
  modprobe) mkdir -p "$KMOD_SYS/$(echo "$1" | tr - _)/parameters" ;;
  rmmod) rm -rf "$KMOD_SYS/$(echo "$1" | tr - _)" ;;
esac
"""


@pytest.fixture()
def guest(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("modprobe", "rmmod"):
        (bin_dir / tool).write_text(FAKE)
        (bin_dir / tool).chmod(0o755)
    sys_root = tmp_path / "sys" / "module"
    sys_root.mkdir(parents=True)
    log = tmp_path / "calls.log"

    def run(req: ModuleRequest, fail: str = "") -> tuple[int, list[list[str]]]:
        req = ModuleRequest(req.name, req.params, req.reload, req.unload, str(sys_root))
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "KMOD_LOG": str(log),
               "KMOD_SYS": str(sys_root), "KMOD_FAIL": fail}
        log.write_text("")
        r = subprocess.run(["sh", "-c", command(req, PosixShell().quote)], env=env,
                           capture_output=True, text=True, timeout=10)
        calls = [c.strip("\n").split("\n") for c in log.read_text().split("---\n") if c.strip()]
        return r.returncode, calls

    run.sys_root = sys_root  # type: ignore[attr-defined]
    return run


def test_load_when_not_loaded(guest) -> None:
    rc, calls = guest(ModuleRequest("rebalab_testdrv", {"bug": "no-drain", "slow_ms": "600"}))
    assert rc == 0
    assert calls == [["modprobe", "rebalab_testdrv", "bug=no-drain", "slow_ms=600"]]


def test_reload_unloads_first(guest) -> None:
    (guest.sys_root / "rebalab_testdrv").mkdir()
    rc, calls = guest(ModuleRequest("rebalab_testdrv", {"bug": "none"}))
    assert rc == 0
    assert calls == [["rmmod", "rebalab_testdrv"], ["modprobe", "rebalab_testdrv", "bug=none"]]


def test_a_failed_unload_stops_before_loading(guest) -> None:
    (guest.sys_root / "rebalab_testdrv").mkdir()
    rc, calls = guest(ModuleRequest("rebalab_testdrv", {"bug": "none"}), fail="rmmod")
    assert rc == 3
    assert [c[0] for c in calls] == ["rmmod"]


def test_no_reload_writes_parameters_of_a_loaded_module(guest) -> None:
    params = guest.sys_root / "rebalab_testdrv" / "parameters"
    params.mkdir(parents=True)
    rc, calls = guest(ModuleRequest("rebalab_testdrv", {"bug": "stale-bar", "slow_ms": "50"},
                                    reload=False))
    assert rc == 0 and calls == []
    assert (params / "bug").read_text() == "stale-bar\n"
    assert (params / "slow_ms").read_text() == "50\n"
    # not loaded: a plain modprobe with the parameters
    rc, calls = guest(ModuleRequest("other-mod", {"x": "1"}, reload=False))
    assert calls == [["modprobe", "other-mod", "x=1"]]


def test_unload(guest) -> None:
    rc, calls = guest(ModuleRequest("rebalab_testdrv", unload=True))
    assert rc == 0 and calls == []          # not loaded: nothing to do
    (guest.sys_root / "rebalab_testdrv").mkdir()
    rc, calls = guest(ModuleRequest("rebalab_testdrv", unload=True))
    assert rc == 0 and calls == [["rmmod", "rebalab_testdrv"]]


@pytest.mark.parametrize("value", ["$(touch /tmp/pwned)", "`id`", "a;b", "it's", "x y", "*"])
def test_hostile_values_arrive_as_one_argument(guest, value: str, tmp_path: Path) -> None:
    rc, calls = guest(ModuleRequest("m", {"p": value}))
    assert rc == 0
    assert calls == [["modprobe", "m", f"p={value}"]]
    params = guest.sys_root / "m" / "parameters"
    rc, _ = guest(ModuleRequest("m", {"p": value}, reload=False))
    assert (params / "p").read_text() == value + "\n"
