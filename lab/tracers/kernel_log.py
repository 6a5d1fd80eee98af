"""The guest kernel log, as it arrives on the serial console.

The console is the most robust guest channel: it needs no network and no agent, and
keeps working while the guest oopses or panics. Each line carries the guest's printk
time and the host's receive time, so it is both a trace and clock evidence.
``rebalab-uevent`` lines are written to /dev/kmsg by the image's hot-plug helper for
PCI and sound uevents (bind, unbind, add, remove), which makes driver-model
transitions visible with kernel timestamps.

Each line is split and classified by ``lab.logs.kernel`` (``split_line``,
``classify_message``), the same code ``rebalab inspect`` runs on a pasted ``dmesg``, so a
message means the same event in a lab run and in a log from a real machine (PCI resource
assignment, pciehp slot events, probe failures, oopses, the lab's uevents).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lab.events import Event
from lab.logs.kernel import OOPS_RE, UEVENT_PREFIX, RECORD, BLANK, classify_message, split_line

__all__ = ["OOPS_RE", "UEVENT_PREFIX", "ConsoleStats", "events_from_console"]


@dataclass
class ConsoleStats:
    """What ``events_from_console`` did with the lines it was given.

    ``unstamped`` counts non-blank lines without a printk stamp (userspace writing to the
    console, login prompts, a line the UART cut): they are not guest kernel events, and a
    large count means the console carried something else than the kernel log.
    """

    lines: int = 0
    events: int = 0
    unstamped: int = 0
    blank: int = 0
    sync: int = 0            # rebalab-sync lines: clock evidence (lab.clock), not events


def events_from_console(lines: Iterable[tuple[int, str]],
                        stats: ConsoleStats | None = None) -> list[Event]:
    """(host receive ns, console line) -> guest events; ``t_host_ns`` is the receive time,
    ``t_guest_ns`` the printk time, ``data["h_recv_ns"]`` the receive time again.

    Only lines with a boot-relative (printk) stamp become events; the others are counted
    in ``stats`` when one is given.
    """
    st = stats if stats is not None else ConsoleStats()
    out: list[Event] = []
    for h_recv, text in lines:
        st.lines += 1
        parts = split_line(text)
        if parts.form == BLANK:
            st.blank += 1
            continue
        if parts.form != RECORD or parts.boot_ns is None:
            st.unstamped += 1
            continue
        info = classify_message(parts.text)
        if info is None:
            st.sync += 1
            continue
        data = dict(info.data)
        if parts.level is not None:
            data["level"] = parts.level
        if parts.caller is not None:
            data["caller"] = parts.caller
        data["h_recv_ns"] = h_recv
        out.append(Event(h_recv, info.source, info.kind, info.device, data=data,
                         t_guest_ns=parts.boot_ns))
    st.events += len(out)
    return out
