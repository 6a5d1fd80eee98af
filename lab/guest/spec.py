"""Which guest to run, from the CLI's ``--guest`` or a scenario's ``guest:``: the one
place that maps an OS name to its ``GuestOs`` implementation."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.errors import ConfigError
from lab.guest.base import AGENTS, GuestOs
from lab.guest.linux import LinuxGuest
from lab.guest.windows.boot import WindowsGuest
from lab.image import GuestImage

if TYPE_CHECKING:
    from lab.scenario.model import GuestSpec
    from lab.scenario.steps import Step

#: OS name -> its implementation
GUESTS: dict[str, type[GuestOs]] = {"linux": LinuxGuest, "windows": WindowsGuest}


def guest_class(os_name: str) -> type[GuestOs]:
    """The implementation for a validated OS name (the scenario model checked it)."""
    try:
        return GUESTS[os_name]
    except KeyError:
        raise ConfigError(f"unknown guest OS {os_name!r}; choose one of: "
                          f"{', '.join(sorted(GUESTS))}") from None


def builtin_guest(image: GuestImage | None = None) -> GuestOs:
    """The guest a Machine boots when none is given: the lab's own image (built by
    ``make image``), or ``image`` when given."""
    return LinuxGuest(image or GuestImage.load())


def for_scenario(spec: GuestSpec, steps: Iterable[Step], *, image: GuestImage | None,
                 accel: str | None) -> GuestOs:
    """A scenario's guest, checked before any run directory or VM exists.

    A guest is refused here when it cannot run on this host (a Windows guest without
    KVM), or when the scenario needs what its agent cannot do (``check_scenario``), so
    nothing half-runs. ``image`` is the built-in Linux image (also what the KVM probe
    boots).
    """
    from lab import qemu_caps

    if spec.os == "linux":
        return LinuxGuest(image or GuestImage.load())
    from lab.guest.windows.trace.config import from_spec

    assert spec.image is not None    # the GuestSpec validator ensures it
    trace = spec.trace
    guest = WindowsGuest(spec.image, spec.agent_kind, probe_image=image,
                         trace_config=from_spec(trace, device=trace.device if trace else None))
    guest.check_scenario(steps)
    guest.choose_accel(qemu_caps.find_binary(), accel)   # KVM or a clear refusal
    return guest


def parse_guest_spec(spec: str, agent: str | None = None, *, image: GuestImage | None = None,
                     **windows_options: Any) -> GuestOs:
    """``"linux"`` or ``"windows:<image path>"`` (plus an optional agent) as a GuestOs.

    ``agent`` defaults to ssh for Linux and winrm for Windows. ``image`` is the Linux
    image to use (default: ``GuestImage.load()``); for Windows it is the image the KVM
    probe boots, when the verdict is not cached yet. ``windows_options`` go to
    ``WindowsGuest`` (keep_disk, memory_mb, smp, ssh_key, winrm, ...). Errors are
    ConfigError naming what to write instead.
    """
    text = (spec or "").strip()
    os_name, sep, rest = text.partition(":")
    os_name = os_name.strip().lower()
    if agent is not None and not isinstance(agent, str):
        raise ConfigError(f"agent must be a name, not {agent!r}")
    agent_name = agent.strip().lower() if agent else None
    if os_name not in AGENTS:
        raise ConfigError(f"unknown guest {text!r}: write 'linux' or 'windows:<path to image.qcow2>'")
    if agent_name is not None and agent_name not in AGENTS[os_name]:
        known = sorted({a for v in AGENTS.values() for a in v})
        if agent_name not in known:
            raise ConfigError(f"unknown agent {agent!r}; choose one of: {', '.join(known)}")
        raise ConfigError(f"a {os_name} guest is reached over {' or '.join(AGENTS[os_name])}, "
                          f"not {agent_name}")
    if os_name == "linux":
        if sep and rest.strip():
            raise ConfigError(f"guest {text!r}: the Linux guest is the built-in image; point "
                              "REBALAB_IMAGE at another build of it instead of 'linux:<path>'")
        if windows_options:
            raise ConfigError(f"options {sorted(windows_options)} apply to Windows guests only")
        return LinuxGuest(image or GuestImage.load())
    path = rest.strip()
    if not path:
        raise ConfigError("a Windows guest needs its image: 'windows:<path to image.qcow2>'")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"Windows image not found: {p}" + ("" if p.is_absolute() else
                                                            f" (relative to {Path.cwd()})"))
    if image is not None:
        windows_options.setdefault("probe_image", image)   # what the KVM probe boots
    return WindowsGuest(p, agent_name or "winrm", **windows_options)


__all__ = ["GUESTS", "builtin_guest", "guest_class", "for_scenario", "parse_guest_spec"]
