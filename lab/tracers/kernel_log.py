"""The guest kernel log, as it arrives on the serial console.

The console is the most robust guest channel: it needs no network and no agent, and
keeps working while the guest oopses or panics. Each line carries the guest's printk
time and the host's receive time, so it is both a trace and clock evidence.
``rebalab-uevent`` lines are written to /dev/kmsg by the image's hot-plug helper for
PCI and sound uevents (bind, unbind, add, remove), which makes driver-model
transitions visible with kernel timestamps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lab.clock import SYNC_RE, parse_printk
from lab.events import DeviceId, Event, Kind, Source

UEVENT_PREFIX = "rebalab-uevent "
_KV_RE = re.compile(r"(\w+)=(\S*)")
_BDF_RE = re.compile(r"\b([0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7])\b")
OOPS_RE = re.compile(r"(Oops|BUG:|WARNING:|general protection fault|Unable to handle kernel|"
                     r"kernel NULL pointer dereference|Kernel panic|Call Trace:)")


def events_from_console(lines: Iterable[tuple[int, str]]) -> list[Event]:
    """(host receive ns, console line) -> KERNEL_LOG / UEVENT events (guest-clocked)."""
    out: list[Event] = []
    for h_recv, text in lines:
        parsed = parse_printk(text)
        if parsed is None:
            continue
        g_ns, msg = parsed
        if SYNC_RE.search(msg):
            continue   # clock evidence, not a guest event
        if msg.startswith(UEVENT_PREFIX):
            kv = dict(_KV_RE.findall(msg[len(UEVENT_PREFIX):]))
            path = kv.get("DEVPATH", "")
            bdf = next(iter(_BDF_RE.findall(path.rsplit("/", 1)[-1])), None) \
                if kv.get("SUBSYSTEM") == "pci" else None
            out.append(Event(h_recv, Source.GUEST_UEVENT, Kind.UEVENT,
                             DeviceId(bdf=bdf) if bdf else None,
                             data={"action": kv.get("ACTION"), **kv, "h_recv_ns": h_recv},
                             t_guest_ns=g_ns))
            continue
        m = _BDF_RE.search(msg)
        kind = Kind.KERNEL_OOPS if OOPS_RE.search(msg) else Kind.KERNEL_LOG
        out.append(Event(h_recv, Source.GUEST_KERNEL, kind, DeviceId(bdf=m[1]) if m else None,
                         data={"text": msg, "h_recv_ns": h_recv}, t_guest_ns=g_ns))
    return out
