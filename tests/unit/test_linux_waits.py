"""The Linux guest's device waits: the uevent line on the console is the first evidence
(lab.guest.linux.waits), matched exactly to the function and driver waited for, with
one SSH check when the line does not come."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.console import Console, ConsoleLine
from lab.errors import AgentError
from lab.guest.linux.waits import UeventWait, bound_wait, gone_wait, uevent_line

# lines as the image's uevent.sh prints them (recorded from a run's console.log)
BIND = ("[   10.360219] rebalab-uevent ACTION=bind SUBSYSTEM=pci DEVPATH=/devices/pci0000:00/"
        "0000:00:01.0/0000:01:00.0 DRIVER=snd_hda_intel SEQNUM=682")
REMOVE = ("[   10.075561] rebalab-uevent ACTION=remove SUBSYSTEM=pci DEVPATH=/devices/pci0000:00/"
          "0000:00:01.0/0000:01:00.0 DRIVER=- SEQNUM=691")


def test_the_bind_line_of_that_function_and_driver_only() -> None:
    pat = uevent_line("bind", "0000:01:00.0", "snd_hda_intel")
    assert pat.search(BIND)
    assert not pat.search(BIND.replace("snd_hda_intel", "snd_intel8x0"))
    assert not pat.search(BIND.replace("0000:01:00.0", "0000:01:00.1"))
    assert not pat.search(BIND.replace("0000:01:00.0 ", "0000:01:00.0/0000:02:00.0 "))
    assert not pat.search(BIND.replace("ACTION=bind", "ACTION=add"))
    gone = uevent_line("remove", "0000:01:00.0")
    assert gone.search(REMOVE) and not gone.search(BIND)
    assert not uevent_line("remove", "0000:01:00.0").search(REMOVE.replace("00.0 DRIVER", "00.7 DRIVER"))


class FakeConsole:
    def __init__(self) -> None:
        self.lines_: list[ConsoleLine] = []
        self.cond = threading.Condition()

    def cursor(self) -> int:
        return len(self.lines_)

    def add(self, text: str) -> None:
        with self.cond:
            self.lines_.append(ConsoleLine(time.time_ns(), text, len(self.lines_)))
            self.cond.notify_all()

    def wait_for(self, needle: Any, *, timeout: float, after: int = 0, what: str | None = None,
                 alive: Any = None) -> ConsoleLine:
        # the real Console's matching, over these lines
        c = Console.__new__(Console)
        c._cond, c._lines, c._base, c._eof = self.cond, self.lines_, 0, False
        return Console.wait_for(c, needle, timeout=timeout, after=after, what=what)


class FakeAgent:
    def __init__(self, out: str, status: int) -> None:
        self.out, self.status, self.ran = out, status, []
        self.shell = SimpleNamespace(quote=lambda s: "'" + s + "'")

    def run(self, cmd: str, **kw: Any) -> Any:
        self.ran.append(cmd)
        return SimpleNamespace(exit_status=self.status, stdout=self.out, stderr="")


def _machine(agent: FakeAgent) -> Any:
    logs: list[str] = []
    return SimpleNamespace(console=FakeConsole(), agent=agent, process=None,
                           run=SimpleNamespace(log=logs.append, logs=logs))


def test_the_console_line_is_the_evidence_and_no_ssh_is_spent() -> None:
    m = _machine(FakeAgent("", 3))
    w = bound_wait(m, "snd0", "ich9-intel-hda", "0000:01:00.0", "snd_hda_intel", 5.0)
    assert isinstance(w, UeventWait)
    m.console.add(BIND)                     # before begin: an earlier plug's line
    w.begin()
    threading.Timer(0.05, m.console.add, [BIND]).start()
    seen = w.end()
    assert seen.evidence == "uevent-console" and seen.data == {"driver": "snd_hda_intel"}
    assert m.agent.ran == []


def test_a_missing_line_is_decided_over_ssh_from_the_state_by_then() -> None:
    m = _machine(FakeAgent("bound uevent snd_hda_intel\n", 0))
    w = bound_wait(m, "snd0", "ich9-intel-hda", "0000:01:00.0", "snd_hda_intel", 0.2)
    w.begin()
    seen = w.end()
    assert seen.evidence == "uevent" and len(m.agent.ran) == 1
    assert "no uevent line on the console" in m.run.logs[0]


def test_a_device_that_never_binds_is_an_error_naming_what_the_guest_saw() -> None:
    m = _machine(FakeAgent("not bound (uevent): driver=none\n", 3))
    w = bound_wait(m, "snd0", "ich9-intel-hda", "0000:01:00.0", "snd_hda_intel", 0.1)
    w.begin()
    with pytest.raises(AgentError, match=r"snd0 \(ich9-intel-hda\) at 0000:01:00.0: "
                                         r"snd_hda_intel did not bind within 0.1s "
                                         r"\(not bound \(uevent\): driver=none\)"):
        w.end()


def test_gone_waits_for_the_remove_line() -> None:
    m = _machine(FakeAgent("", 3))
    w = gone_wait(m, "snd0", "0000:01:00.0", 5.0)
    w.begin()
    threading.Timer(0.05, m.console.add, [REMOVE]).start()
    assert w.end().evidence == "uevent-console" and m.agent.ran == []


def test_a_lost_line_costs_a_slice_not_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.guest.linux import waits
    monkeypatch.setattr(waits, "GRACE_S", 0.05)
    m = _machine(FakeAgent("bound uevent snd_hda_intel\n", 0))
    w = bound_wait(m, "snd0", "ich9-intel-hda", "0000:01:00.0", "snd_hda_intel", 30.0)
    w.begin()
    t0 = time.monotonic()
    seen = w.end()
    assert time.monotonic() - t0 < 2.0
    assert seen.evidence == "uevent" and len(m.agent.ran) == 1
    assert "its uevent line was not on the console" in m.run.logs[0]


def test_a_slow_driver_still_gets_the_console_evidence(monkeypatch: pytest.MonkeyPatch) -> None:
    from lab.guest.linux import waits
    monkeypatch.setattr(waits, "GRACE_S", 0.05)
    m = _machine(FakeAgent("not bound (uevent): driver=none\n", 3))   # not yet, each check
    w = bound_wait(m, "snd0", "ich9-intel-hda", "0000:01:00.0", "snd_hda_intel", 30.0)
    w.begin()
    threading.Timer(0.3, m.console.add, [BIND]).start()
    seen = w.end()
    assert seen.evidence == "uevent-console" and len(m.agent.ran) >= 1
