"""Topologies written in YAML (a file, or inline in a scenario), with line-accurate errors.

```yaml
hotplug_mode: native          # acpi | native
memory_mb: 512
cpus: 1
max_cpus: 2                   # > cpus allows vCPU hot-plug
kernel_args: [pci=realloc]
ports:
  - {id: rp1, chassis: 1, slot: 1, reserve: {mem-reserve: 4M, io-reserve: 0}}
switches:
  - {id: sw1, port: rp2, downstream: [{id: sw1p1, chassis: 3, slot: 1}]}
devices:
  - {id: snd0, model: ich9-intel-hda, port: sw1p1, placement: cold, codec: hda-duplex}
  - {id: press0, model: pci-testdev, port: rp3, size: 64M}
```

Every error names the file, the line and the field (``topo.yaml:7: ports[1].slot: ...``),
both for shape errors found here and for the semantic checks of ``topology.validate``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from vdevice.errors import SpecError
from vdevice.inventory import QemuInventory
from vdevice.presets import PRESETS
from vdevice.sizes import parse_size
from vdevice.topology import (Device, HotplugMode, Placement, Port, Switch, Topology,
                              parse_reserve, validate)
from vdevice.yamlsrc import Located, PathElem, load, unknown

TOP_KEYS = ("machine", "hotplug_mode", "memory_mb", "cpus", "max_cpus", "kernel_args", "ports",
            "switches", "devices", "preset")
PORT_KEYS = ("id", "chassis", "slot", "reserve")
DEVICE_KEYS = ("id", "model", "port", "placement", "props", "codec", "size")


def _path(field: str) -> tuple[PathElem, ...]:
    """``ports[1].reserve.mem-reserve`` -> ("ports", 1, "reserve", "mem-reserve")."""
    out: list[PathElem] = []
    for part in field.split("."):
        m = re.fullmatch(r"([^\[]+)((?:\[\d+\])*)", part)
        if not m:
            out.append(part)
            continue
        out.append(m[1])
        out.extend(int(i) for i in re.findall(r"\[(\d+)\]", m[2]))
    return tuple(out)


def _keys(loc: Located, path: tuple[PathElem, ...], allowed: tuple[str, ...]) -> dict[str, Any]:
    data = loc.get(path) if path else loc.data
    if not isinstance(data, Mapping):
        raise loc.error(f"expected a mapping, got {type(data).__name__}", path)
    for k in data:
        if k not in allowed:
            msg = unknown("key", k, allowed)
            if repr(k) in msg:
                raise loc.error(msg, path + (k,))
            # a key unknown() would not repeat is not named in the field either: the
            # line of it, the field path of its mapping
            raise SpecError(msg, file=loc.filename, line=loc.line_of(path + (k,)),
                            field=loc.field(path) or None)
    return dict(data)


def _int(loc: Located, path: tuple[PathElem, ...], value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise loc.error(f"expected a whole number, got {value!r}", path)
    return value


def _str(loc: Located, path: tuple[PathElem, ...], value: Any) -> str:
    if not isinstance(value, str):
        raise loc.error(f"expected text, got {value!r}", path)
    return value


def _list(loc: Located, path: tuple[PathElem, ...], value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise loc.error(f"expected a list, got {type(value).__name__}", path)
    return value


def _port(loc: Located, path: tuple[PathElem, ...], switch: str | None = None) -> Port:
    d = _keys(loc, path, PORT_KEYS)
    for req in ("id", "chassis", "slot"):
        if req not in d:
            raise loc.error(f"a port needs {req!r}", path)
    reserve_raw = d.get("reserve") or {}
    if not isinstance(reserve_raw, Mapping):
        raise loc.error("reserve must be a mapping of reservation: size", path + ("reserve",))
    try:
        reserve = parse_reserve(reserve_raw, "reserve")
    except SpecError as e:
        raise loc.relocate(e, path + _path(e.field or "reserve")) from None
    return Port(_str(loc, path + ("id",), d["id"]), _int(loc, path + ("chassis",), d["chassis"]),
                _int(loc, path + ("slot",), d["slot"]), reserve, switch)


def from_located(loc: Located) -> Topology:
    """A validated-for-shape Topology from YAML data (semantic checks: ``check``)."""
    if isinstance(loc.data, str):
        return preset(loc.data, loc)
    d = _keys(loc, (), TOP_KEYS)
    base = preset(d["preset"], loc.at(("preset",))) if "preset" in d else Topology()
    kw: dict[str, Any] = {}
    if "machine" in d:
        kw["machine"] = _str(loc, ("machine",), d["machine"])
    if "hotplug_mode" in d:
        try:
            kw["hotplug_mode"] = HotplugMode(d["hotplug_mode"])
        except ValueError:
            raise loc.error(unknown("hot-plug mode", d["hotplug_mode"], ["acpi", "native"]),
                            ("hotplug_mode",)) from None
    for k in ("memory_mb", "cpus", "max_cpus"):
        if k in d:
            kw[k] = _int(loc, (k,), d[k])
    if "max_cpus" not in d and "cpus" in d:
        kw["max_cpus"] = max(kw["cpus"], base.max_cpus)
    if "kernel_args" in d:
        kw["kernel_args"] = tuple(_str(loc, ("kernel_args", i), a)
                                  for i, a in enumerate(_list(loc, ("kernel_args",), d["kernel_args"])))
    if "ports" in d:
        kw["ports"] = tuple(_port(loc, ("ports", i))
                            for i in range(len(_list(loc, ("ports",), d["ports"]))))
    if "switches" in d:
        sws = []
        for i, _ in enumerate(_list(loc, ("switches",), d["switches"])):
            sd = _keys(loc, ("switches", i), ("id", "port", "downstream"))
            for req in ("id", "port", "downstream"):
                if req not in sd:
                    raise loc.error(f"a switch needs {req!r}", ("switches", i))
            sid = _str(loc, ("switches", i, "id"), sd["id"])
            down = tuple(_port(loc, ("switches", i, "downstream", j), sid) for j in
                         range(len(_list(loc, ("switches", i, "downstream"), sd["downstream"]))))
            sws.append(Switch(sid, _str(loc, ("switches", i, "port"), sd["port"]), down))
        kw["switches"] = tuple(sws)
    if "devices" in d:
        devs = []
        for i, _ in enumerate(_list(loc, ("devices",), d["devices"])):
            p = ("devices", i)
            dd = _keys(loc, p, DEVICE_KEYS)
            for req in ("id", "model", "port"):
                if req not in dd:
                    raise loc.error(f"a device needs {req!r}", p)
            try:
                placement = Placement(dd.get("placement", "hot"))
            except ValueError:
                raise loc.error(unknown("placement", dd["placement"], ["cold", "hot"]),
                                p + ("placement",)) from None
            props = dd.get("props") or {}
            if not isinstance(props, Mapping):
                raise loc.error("props must be a mapping", p + ("props",))
            size = None
            if "size" in dd:
                try:
                    size = parse_size(dd["size"], field="size")
                except SpecError as e:
                    raise loc.relocate(e, p + ("size",)) from None
            devs.append(Device(_str(loc, p + ("id",), dd["id"]), _str(loc, p + ("model",), dd["model"]),
                               _str(loc, p + ("port",), dd["port"]), placement,
                               {str(k): str(v) for k, v in props.items()},
                               dd.get("codec"), size))
        kw["devices"] = tuple(devs)
    from dataclasses import replace
    return replace(base, **kw)


def preset(name: Any, loc: Located) -> Topology:
    if not isinstance(name, str) or name not in PRESETS:
        raise loc.error(unknown("built-in topology", name, sorted(PRESETS)))
    return PRESETS[name]()


def check(topo: Topology, loc: Located, inventory: QemuInventory | None = None) -> Topology:
    """``topology.validate`` with its field paths turned into file:line."""
    try:
        validate(topo, inventory)
    except SpecError as e:
        raise loc.relocate(e, _path(e.field) if e.field else ()) from None
    return topo


def load_text(text: str, filename: str, inventory: QemuInventory | None = None) -> Topology:
    loc = load(text, filename)
    return check(from_located(loc), loc, inventory)
