"""Windows guests behind the ``GuestOs`` interface (``boot``: ``WindowsOs``, shared by
``WindowsGuest`` and the simulated guest), and their tools: unattended image builds, VM
arguments, PnP waits, the ETW trace (``trace/``), WDTF, crash dumps, doctor checks, CLI
wiring.

The Windows path cannot be exercised end to end on the development hosts (no licence,
no working nested KVM), so every piece here is built to be checked without Windows:
pure functions for command lines and answer files, injectable runners for QEMU and the
provisioning media, and formats taken from Microsoft's documentation.
"""
