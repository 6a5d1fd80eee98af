from __future__ import annotations

import subprocess

import pytest

from lab.agent.posix import PosixShell

HOSTILE = ["plain", "with space", "it's", '"dq"', "$(touch /tmp/pwned)", "`id`", "a;b", "a\nb",
           "--", "-n", "*", "~root", "\\", "ümlaut", ""]


@pytest.mark.parametrize("value", HOSTILE)
def test_posix_quote_round_trips_through_a_real_shell(value: str) -> None:
    """What the guest's sh receives is exactly the value, whatever it contains."""
    sh = PosixShell()
    line = sh.join(["printf", "%s", value])
    out = subprocess.run(["sh", "-c", line], capture_output=True, text=True, check=True)
    assert out.stdout == value


def test_nul_is_refused() -> None:
    with pytest.raises(ValueError):
        PosixShell().quote("a\x00b")
