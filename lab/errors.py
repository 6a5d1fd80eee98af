"""Exception hierarchy.

The CLI maps these onto exit codes (DESIGN.md): a ``RuleViolation`` is the driver's
fault (1), everything under ``LabError`` is the lab's (2). Every message says what
failed and what to do about it, because the person reading it is usually in CI logs.
"""

from __future__ import annotations


class LabError(Exception):
    """The lab could not do its job (bad input, QEMU or agent failure). Exit status 2."""

    exit_code = 2


class ConfigError(LabError):
    """Bad input found by the lab itself (CLI arguments, missing files).

    Specification errors found while validating YAML come as
    ``vdevice.errors.SpecError``, which the CLI treats the same way (exit 2).
    """


class DeadlineExceeded(LabError):
    """A wait ran out of time. Names what was awaited, for how long and the last thing seen."""

    def __init__(self, what: str, seconds: float, last_seen: str | None = None) -> None:
        self.what = what
        self.seconds = seconds
        self.last_seen = last_seen
        msg = f"timed out after {seconds:.1f}s waiting for {what}"
        if last_seen:
            msg += f" (last seen: {last_seen})"
        super().__init__(msg)


class QemuError(LabError):
    """QEMU refused a command, died, or could not be started."""


class AgentError(LabError):
    """The guest agent could not connect or run a command."""


class ConnectionLost(AgentError):
    """The agent's connection went down while a command ran: whether the command ran,
    and how far, is unknown. Only a command that is safe to run twice may be retried."""


class EnvironmentProblem(LabError):
    """Something the host must provide is missing (QEMU, the guest image, KVM)."""


class Interrupted(LabError):
    """The run was interrupted by a signal; artifacts are kept. Exit status 130."""

    exit_code = 130


#: the errnos that mean "the disk will not take more": full, over quota, over the size
#: limit (RLIMIT_FSIZE)
_DISK_FULL = frozenset({28, 122, 27})     # ENOSPC, EDQUOT, EFBIG


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


class ArtifactsLost(LabError):
    """The run directory refused a write (full disk, quota). A run that cannot keep its
    evidence is stopped: its verdicts could not be checked by anyone later."""

    def __init__(self, what: str, where: str, exc: OSError) -> None:
        self.what = what
        self.where = where
        super().__init__(f"{what} could not be written under {where} ({exc.strerror}); "
                         "the run stopped there. Free space (or pass --runs on a larger "
                         "disk) and run again")
