"""Host-side tracers: QEMU's trace log and the guest kernel's console lines as ``Event`` values
(the guests' own tracers live with their OS under ``lab.guest``)."""
