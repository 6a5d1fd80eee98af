"""QEMU's own trace log: the hardware's view of BAR mappings and decode changes.

Debian's QEMU uses the ``log`` trace backend; with ``-D FILE`` each enabled event is a
line ``PID@SECONDS.MICROS:event args`` stamped with host wall-clock time. We enable
``pci_update_mappings_add/_del`` (every BAR (un)mapping, with address and size) and
``pci_cfg_write`` (config writes: the command register's memory/IO decode bits), and,
with audio captured, ``hda_audio_overrun`` (QEMU's HDA codec dropped its whole stream
buffer because the audio backend did not drain it: a host too slow, not the guest) and
``audio_timer_delayed`` (QEMU's audio timer ran late: QEMU itself did not run);
the file is parsed incrementally, so the lab can read what happened during one
operation without rereading the whole file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lab.events import DeviceId, Event, Kind, Source

_LINE_RE = re.compile(r"^(\d+)@(\d+)\.(\d{1,9}):(\w+) (.*)$")
_MAP_RE = re.compile(r"^(\S+) ([0-9a-f]{2}):([0-9a-f]{2})\.([0-7]) (\d+),0x([0-9a-f]+)\+0x([0-9a-f]+)$")
_OVERRUN_RE = re.compile(r"^st (\S+)$")
_DELAYED_RE = re.compile(r"^interval (\d{1,9}) ms$")
_CFG_RE = re.compile(r"^(\S+) ([0-9a-f]{2}):([0-9a-f]{2})\.([0-7]) @0x([0-9a-f]+) <- 0x([0-9a-f]+)$")
PCI_COMMAND = 0x4
CMD_IO, CMD_MEM = 0x1, 0x2


def _bdf(bus: str, slot: str, fn: str) -> str:
    return f"0000:{bus}:{slot}.{fn}"


@dataclass
class QemuTraceParser:
    """Stateful parser: remembers each device's command register to see decode edges."""

    command: dict[str, int] = field(default_factory=dict)
    unparsed: int = 0

    def _args(self, pattern: re.Pattern[str], args: str) -> re.Match[str] | None:
        """An event's arguments in the format its trace-events line prints, or None and
        the line counted as not understood."""
        a = pattern.match(args)
        if a is None:
            self.unparsed += 1
        return a

    def parse_line(self, line: str) -> list[Event]:
        m = _LINE_RE.match(line.strip())
        if not m:
            if line.strip():
                self.unparsed += 1
            return []
        usec = m[3].ljust(6, "0")[:6]
        t = int(m[2]) * 1_000_000_000 + int(usec) * 1000
        name, args = m[4], m[5]
        raw = {"trace": name, "args": args, "pid": int(m[1])}
        if name in ("pci_update_mappings_add", "pci_update_mappings_del"):
            a = self._args(_MAP_RE, args)
            if a is None:
                return []
            bdf = _bdf(a[2], a[3], a[4])
            kind = Kind.BAR_MAPPED if name.endswith("add") else Kind.BAR_UNMAPPED
            return [Event(t, Source.HOST_TRACE, kind, DeviceId(bdf=bdf),
                          data={**raw, "qemu_name": a[1], "bar": int(a[5]),
                                "addr": int(a[6], 16), "size": int(a[7], 16)})]
        if name == "hda_audio_overrun":
            # hw/audio/trace-events: hda_audio_overrun(const char *stream) "st %s"; the
            # codec's stream is named, not its PCI function: the audio lane's device
            # (one player per capture) is the one it concerns
            a = self._args(_OVERRUN_RE, args)
            if a is None:
                return []
            return [Event(t, Source.HOST_TRACE, Kind.AUDIO_OVERRUN, None,
                          data={**raw, "stream": a[1]})]
        if name == "audio_timer_delayed":
            # audio/trace-events: audio_timer_delayed(int interval) "interval %d ms": the
            # audio timer ran this long after its last run (over 1.5 periods): QEMU did
            # not run meanwhile, so neither did what it plays
            a = self._args(_DELAYED_RE, args)
            if a is None:
                return []
            return [Event(t, Source.HOST_TRACE, Kind.AUDIO_TIMER_LATE, None,
                          int(a[1]) * 1_000_000, data={**raw, "interval_ms": int(a[1])})]
        if name == "pci_cfg_write":
            a = self._args(_CFG_RE, args)
            if a is None:
                return []
            bdf = _bdf(a[2], a[3], a[4])
            offset, val = int(a[5], 16), int(a[6], 16)
            events = [Event(t, Source.HOST_TRACE, Kind.CONFIG_WRITE, DeviceId(bdf=bdf),
                            data={**raw, "qemu_name": a[1], "offset": offset, "value": val})]
            if offset == PCI_COMMAND:
                # key by QEMU's device name too: a BDF is reused after unplug/replug
                key = f"{a[1]}@{bdf}"
                old = self.command.get(key, 0)
                self.command[key] = val
                old_on, new_on = old & (CMD_IO | CMD_MEM), val & (CMD_IO | CMD_MEM)
                if not old_on and new_on:
                    events.append(Event(t, Source.HOST_TRACE, Kind.DECODE_ON, DeviceId(bdf=bdf),
                                        data={"qemu_name": a[1], "command": val,
                                              "mem": bool(val & CMD_MEM), "io": bool(val & CMD_IO)}))
                elif old_on and not new_on:
                    events.append(Event(t, Source.HOST_TRACE, Kind.DECODE_OFF, DeviceId(bdf=bdf),
                                        data={"qemu_name": a[1], "command": val}))
            return events
        return []


class QemuTraceTail:
    """Reads only what was appended to the trace file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.parser = QemuTraceParser()
        self._partial = ""

    def read_new(self) -> list[Event]:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                f.seek(self.offset)
                chunk = f.read()
                self.offset = f.tell()
        except FileNotFoundError:
            return []
        text = self._partial + chunk
        lines = text.split("\n")
        self._partial = lines.pop()   # an incomplete last line waits for the next call
        out: list[Event] = []
        for line in lines:
            out.extend(self.parser.parse_line(line))
        return out
