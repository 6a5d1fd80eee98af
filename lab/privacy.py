"""Private by default: what the lab writes is the user's, and its secrets stay its own.

A run directory holds guest output, QMP traffic and logs that may carry a customer's
data; the lab runs as root on CI machines next to credentials. So:

- files and directories the lab creates are private (umask 077: directories 0700,
  files 0600; the run directory itself is made 0700 whoever creates it);
- child processes (QEMU, qemu-img, mtools) get the lab's environment without its
  secrets: a QEMU never needs the WinRM password or the Windows product key;
- every log record is redacted when it is made, whatever logger or handler it reaches,
  including handlers a library installs later (a record factory, not a handler filter
  attached once: that misses handlers that do not exist yet).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

#: environment variables that hold the lab's secrets, by name
SECRET_ENV = frozenset({"REBALAB_WINRM_PASSWORD", "REBALAB_WINDOWS_PRODUCT_KEY",
                        "REBALAB_WINRM_CREDENTIALS"})
#: and by shape: whatever a CI system injects as a secret usually says so in its name
_SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|PRIVATE_KEY|API_KEY|CREDENTIAL)",
                          re.IGNORECASE)
PRIVATE_UMASK = 0o077


def is_secret_name(name: str) -> bool:
    return name in SECRET_ENV or bool(_SECRET_NAME.search(name))


def child_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child process: the lab's, minus its secrets."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not is_secret_name(k)}


def private_umask() -> int:
    """Make what this process (and its children) create private; returns the old mask."""
    return os.umask(PRIVATE_UMASK)


_installed = False


def redact_all_records() -> None:
    """Redact every log record at creation (lab.agent.winrm.REDACTOR knows the secrets).
    Idempotent."""
    global _installed
    if _installed:
        return
    from lab.agent.winrm import REDACTOR

    make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        REDACTOR.filter(record)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True


def inherited_signal_notes() -> list[str]:
    """Signals this process inherited as ignored (a CI runner or nohup can do that):
    then Ctrl-C or SIGTERM cannot stop a run cleanly, and the run log says so."""
    import signal

    out = []
    for name in ("SIGINT", "SIGTERM"):
        sig = getattr(signal, name)
        if signal.getsignal(sig) is signal.SIG_IGN:
            out.append(f"{name} was inherited as ignored: this run cannot be interrupted by it")
    return out


#: notes the CLI takes at start (before it installs its own signal handlers), for the
#: run log of every run this process makes
STARTUP_NOTES: list[str] = []
