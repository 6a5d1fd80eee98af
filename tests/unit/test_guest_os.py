"""The guest OS is known in one place (issue 10): ``lab.guest``.

The modules every guest shares ask the ``GuestOs`` interface and hold no OS branch:
no OS name in their code (comments and docstrings may explain), no guest class, no
comparison of ``.os``. Outside ``lab/guest/`` an OS name appears only in data and CLI
parsing, listed below with the reason."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from lab.guest import GUESTS, GuestOs, LinuxGuest, WindowsGuest
from lab.guest.windows.boot import WindowsOs
from lab.guest.windows.simulated import SimulatedWindowsGuest
from tests.unit.guest_fakes import behaviour

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("lab/operations.py", "lab/rebalance.py", "lab/observe.py", "lab/runner.py",
          "lab/machine.py", "lab/scenario/loader.py", "lab/record.py", "lab/record_run.py",
          "lab/parallel.py", "lab/snapshot.py", "lab/steps/base.py", "lab/steps/plug.py",
          "lab/steps/guest.py", "lab/steps/audio.py", "lab/steps/timing.py", "lab/steps/waits.py",
          "lab/steps/vm.py", "lab/steps/parallel.py", "lab/steps/asserts.py")
OS_WORD = re.compile(r"(?i)linux|windows")
#: (module, name) pairs that are not the OS
NOT_THE_OS = {("lab/rebalance.py", "windows"): "PCI bridge windows (vdevice.windows is "
                                               "window arithmetic)"}
#: modules outside lab/guest/ that may name an OS, and why
DATA_AND_CLI = {
    "lab/cli.py": "CLI parsing (--guest linux|windows:IMAGE, `image linux|windows`)",
    "lab/doctor.py": "CLI parsing of --guest and the host tools each guest needs (data)",
    "lab/scenario/model.py": "the scenario schema's guest.os choices",
    "lab/scenario/overrides.py": "CLI parsing of --guest",
    "lab/steps/rebalance.py": "the per-OS description of each trigger (--help text) and the "
                              "wdtf step's instance-id field check",
    "lab/image.py": "the built-in image's folder, images/linux",
    "lab/inspect.py": "a run recorded before rules.json: its summary's guest OS, default linux",
}


def _code_tokens(path: Path) -> list[tokenize.TokenInfo]:
    """NAME and non-docstring STRING tokens (a string alone on its line is a docstring)."""
    toks = list(tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline))
    out: list[tokenize.TokenInfo] = []
    prev = tokenize.NEWLINE
    for t in toks:
        if t.type == tokenize.NAME or (t.type == tokenize.STRING and prev not in
                                       (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT,
                                        tokenize.DEDENT)):
            out.append(t)
        if t.type not in (tokenize.COMMENT,):
            prev = t.type
    return out


@pytest.mark.parametrize("module", SHARED)
def test_shared_modules_hold_no_os_branch(module: str) -> None:
    found = []
    for t in _code_tokens(ROOT / module):
        if t.type == tokenize.NAME and OS_WORD.search(t.string) and \
                (module, t.string) not in NOT_THE_OS:
            found.append(f"{module}:{t.start[0]}: {t.string}")
        if t.type == tokenize.STRING and t.string.strip("'\"rbfu").lower() in ("linux", "windows"):
            found.append(f"{module}:{t.start[0]}: {t.string}")
    assert not found, "an OS branch outside lab/guest/: ask the GuestOs instead\n" + "\n".join(found)


def test_outside_lab_guest_an_os_is_named_only_in_data_and_cli_parsing() -> None:
    branch = re.compile(r"\b(LinuxGuest|WindowsGuest|WindowsOs)\b|\.os\s*[!=]=\s*['\"]"
                        r"|['\"](linux|windows)['\"]\s*[!=]=")
    found = []
    for path in sorted((ROOT / "lab").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("lab/guest/") or rel in DATA_AND_CLI:
            continue
        for t in _code_tokens(path):
            if t.type == tokenize.NAME and t.string in ("LinuxGuest", "WindowsGuest", "WindowsOs"):
                found.append(f"{rel}:{t.start[0]}: {t.string}")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if branch.search(code) and not code.strip().startswith(("\"", "'")):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_allow_lists_are_still_needed() -> None:
    """An entry that no longer names an OS goes (the lists only shrink)."""
    for rel in DATA_AND_CLI:
        text = (ROOT / rel).read_text(encoding="utf-8")
        assert re.search(r"\"(linux|windows)\"|'(linux|windows)'|images/linux|\"linux\b", text), rel
    for (rel, name) in NOT_THE_OS:
        assert any(t.string == name for t in _code_tokens(ROOT / rel)), (rel, name)


def test_every_guest_os_implements_the_whole_interface() -> None:
    for cls in (*GUESTS.values(), SimulatedWindowsGuest):
        assert issubclass(cls, GuestOs)
        assert not getattr(cls, "__abstractmethods__", None), (cls, cls.__abstractmethods__)
        assert cls.default_rules and cls.os in ("linux", "windows")
    assert issubclass(SimulatedWindowsGuest, WindowsOs) and issubclass(WindowsGuest, WindowsOs)
    assert set(GUESTS) == {"linux", "windows"} and GUESTS["linux"] is LinuxGuest


def test_each_guest_refuses_the_others_steps_with_its_reason() -> None:
    from lab.scenario.model import GuestSpec
    from lab.scenario.steps import Module, RebalanceRescan, RebalanceWdtf

    win = GuestSpec(os="windows", image="win.qcow2")
    lin = GuestSpec()
    rescan = RebalanceRescan.model_construct(device="snd0")
    wdtf = RebalanceWdtf.model_construct(device="snd0", action="restart")
    module = Module.model_construct(name="snd_ens1370")
    assert "wdtf" in (WindowsGuest.refused_step(rescan, win) or "")
    assert "driver installed" in (WindowsGuest.refused_step(module, win) or "")
    assert WindowsGuest.refused_step(wdtf, win) is None
    assert "WDTF" in (LinuxGuest.refused_step(wdtf, lin) or "")
    assert LinuxGuest.refused_step(rescan, lin) is None and LinuxGuest.refused_step(module, lin) is None


def test_default_rules_and_record_and_snapshot_per_os() -> None:
    lin, win = behaviour("linux"), behaviour("windows")
    assert "linux-driver" in lin.default_rules and "windows-pnp" in win.default_rules
    assert LinuxGuest.record_refusal() is None and "TCG" in (WindowsGuest.record_refusal() or "")
    assert lin.snapshot_refusal() is None and "reset: snapshot" in (win.snapshot_refusal() or "")
