"""Guest operating systems: the ``GuestOs`` interface (``lab.guest.base``) and its two
implementations, ``lab.guest.linux`` (the built-in image) and ``lab.guest.windows``.

Everything that differs between guest OSes lives under this package; the operations,
rebalance triggers, observations, the runner, the machine and the scenario loader ask
the interface and hold no OS branch (tests/unit/test_guest_os.py keeps it so).
"""

from lab.guest.base import (
    AGENTS,
    KEEP_DISK_CHOICES,
    BootFiles,
    DeviceWait,
    GuestArgs,
    GuestOs,
    GuestPanicked,
    GuestTrace,
    MachineView,
    Seen,
    ShutdownStep,
    Unsupported,
    check_machine,
)
from lab.guest.linux import LinuxGuest
from lab.guest.windows.boot import (PowerShellSshAgent, WindowsGuest, hv_unsupported,
                                    probe_hyperv)
from lab.guest.spec import GUESTS, builtin_guest, for_scenario, guest_class, parse_guest_spec

__all__ = ["GuestOs", "GuestTrace", "DeviceWait", "Seen", "Unsupported", "LinuxGuest",
           "WindowsGuest", "GuestPanicked", "GuestArgs", "BootFiles", "MachineView",
           "ShutdownStep", "PowerShellSshAgent", "parse_guest_spec", "for_scenario", "builtin_guest",
           "guest_class", "GUESTS", "probe_hyperv", "hv_unsupported", "check_machine",
           "KEEP_DISK_CHOICES", "AGENTS"]
