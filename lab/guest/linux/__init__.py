"""The built-in Linux guest (``LinuxGuest``): boot, SSH agent, sysfs device waits,
kprobe tracing, the guest half of the rebalance triggers, and its doctor checks.

Only ``boot`` is imported here; the rest is imported where it is used, so that
``lab.machine`` can import the guest package without a cycle."""

from lab.guest.linux.boot import LinuxGuest

__all__ = ["LinuxGuest"]
