"""QMP traffic as events: the one mapping from a QMP record to an ``Event``.

``Machine`` records QMP events live through ``event_from_qmp``; ``rebalab inspect``
reads the same records back from a run's ``qmp.jsonl`` (written by ``lab.qmp``:
one JSON object a line, ``dir`` = greeting | out | in | error | timeout | event).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lab.events import DeviceId, Event, Kind, Source

_EVENT_KINDS: Mapping[str, Kind] = {
    "DEVICE_DELETED": Kind.DEVICE_DELETED,
    "STOP": Kind.PAUSE,
    "RESUME": Kind.RESUME,
    "GUEST_PANICKED": Kind.GUEST_PANICKED,
}


def event_from_qmp(ev: Mapping[str, Any], t_host_ns: int) -> Event:
    """A QMP asynchronous event (``{"event": NAME, "data": {...}}``) as an Event."""
    name = str(ev.get("event", ""))
    data = ev.get("data") or {}
    dev = data.get("device") if isinstance(data, Mapping) else None
    return Event(t_host_ns, Source.HOST_QMP, _EVENT_KINDS.get(name, Kind.QMP_EVENT),
                 DeviceId(qom=str(dev)) if isinstance(dev, str) and dev else None,
                 data={"event": name, **({"data": dict(data)} if isinstance(data, Mapping) and data
                                         else {})})


def event_from_command(rec: Mapping[str, Any], t_host_ns: int) -> Event | None:
    """A command the lab sent that changes the hardware (``device_add``/``device_del``)
    as the request event the lab recorded for it; other commands give None."""
    cmd = rec.get("execute")
    args = rec.get("arguments") if isinstance(rec.get("arguments"), Mapping) else {}
    assert isinstance(args, Mapping)
    ident = args.get("id")
    if cmd == "device_add" and isinstance(ident, str):
        return Event(t_host_ns, Source.HOST_QMP, Kind.HOTPLUG_REQUEST, DeviceId(qom=ident),
                     data={"payload": dict(args)})
    if cmd == "device_del" and isinstance(args.get("id"), str):
        return Event(t_host_ns, Source.HOST_QMP, Kind.UNPLUG_REQUEST,
                     DeviceId(qom=str(args["id"])), data={})
    return None
