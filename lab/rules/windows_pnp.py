"""Windows PnP rules for a function driver (PortCls audio first), as a state machine.

Each device's PnP IRPs (and PortCls rebalance callbacks) drive one explicit state
machine (``TRANSITIONS``: the table of allowed moves). A move the table marks with
a check id is a driver bug; a move missing from the table is reported as
``pnp.unexpected-irp`` (usually a tracer gap, sometimes a stack that lost an IRP) and
the machine resynchronises to the state the IRP implies.

What the rules rest on (Microsoft's documentation):

- IRP_MN_STOP_DEVICE "On Windows 2000 and later systems, the PnP manager sends this
  IRP only if a prior IRP_MN_QUERY_STOP_DEVICE completed successfully"; "The driver
  must not fail this IRP. If a driver cannot release the device's hardware resources,
  it must fail the preceding query-stop IRP."
  https://learn.microsoft.com/windows-hardware/drivers/kernel/irp-mn-stop-device
- IRP_MN_QUERY_STOP_DEVICE: a driver that cannot stop fails it (STATUS_UNSUCCESSFUL);
  STATUS_RESOURCE_REQUIREMENTS_CHANGED counts as success.
  https://learn.microsoft.com/windows-hardware/drivers/kernel/irp-mn-query-stop-device
- IRP_MN_CANCEL_STOP_DEVICE "A driver must set Irp->IoStatus.Status to STATUS_SUCCESS
  ... If a driver fails this IRP, the device is left in an inconsistent state"; and a
  driver "might receive a spurious cancel-stop request while the device is started
  and active", e.g. after a QUERY_STOP failed higher in the stack: so CANCEL_STOP
  without a preceding (successful) QUERY_STOP is allowed, never flagged.
  https://learn.microsoft.com/en-us/windows-hardware/drivers/kernel/irp-mn-cancel-stop-device
  https://learn.microsoft.com/zh-cn/windows-hardware/drivers/kernel/handling-an-irp-mn-cancel-stop-device-request--windows-2000-and-later-
- PortCls: ``IAdapterPnpManagement::PnpQueryStop``/``PnpCancelStop`` are called with
  the device global lock held, "thus the miniport must execute this call as fast as
  possible"; "It is possible for the Miniport to receive PnpCancelStop even without
  previously receiving a PnpQueryStop notification."
  https://learn.microsoft.com/en-us/windows-hardware/drivers/ddi/portcls/nf-portcls-iadapterpnpmanagement-pnpquerystop
  https://learn.microsoft.com/en-us/windows-hardware/drivers/ddi/portcls/nf-portcls-iadapterpnpmanagement-pnpcancelstop
  https://learn.microsoft.com/en-us/windows-hardware/drivers/audio/implement-pnp-rebalance-for-portcls-audio-drivers
- IRP_MN_START_DEVICE is sent after resources are assigned, also to restart "after
  being stopped for resource rebalancing", and sometimes to an already started device
  with a different resource set (allowed here).
  https://learn.microsoft.com/windows-hardware/drivers/kernel/irp-mn-start-device
- A failed restart makes the system surprise-remove the device (WDTF
  EDTTryStopDeviceFailRestart: "The failed Start IRP, in turn, causes the system to
  surprise remove the device"), and IRP_MN_REMOVE_DEVICE follows SURPRISE_REMOVAL;
  neither may fail.
  https://learn.microsoft.com/en-us/windows-hardware/drivers/ddi/wdtfpnpaction/nf-wdtfpnpaction-iwdtfpnpaction2-edttrystopdevicefailrestart
  https://learn.microsoft.com/en-us/windows-hardware/drivers/kernel/irp-mn-surprise-removal
  https://learn.microsoft.com/windows-hardware/drivers/kernel/irp-mn-remove-device
- "the device must be paused when the IRP_MN_STOP_DEVICE succeeds": no hardware
  access between STOP and the next START.
  https://learn.microsoft.com/en-us/windows-hardware/drivers/kernel/holding-incoming-irps-when-a-device-is-paused

Tracer contract (what this module reads from ``Event.data``):
``status`` (NTSTATUS as int, hex string or ``STATUS_*`` name) or ``ok`` (bool) - a
missing status counts as success; ``duration_ns`` on the event = handler time;
``layer: "portcls"`` (or a ``callback`` key) marks a PortCls notification, used for
durations, and for transitions of each kind the device has no IRP-level events of
(Kernel-PnP ETW reports starts and removals but no query-stop/stop: those come from
the PortCls callbacks; ``PnpQueryStop`` is only called on the way to success);
``resources`` on START / RESOURCES_ASSIGNED (list of ``"0xfe800000+0x4000"``,
``"0xfe800000-0xfe803fff"`` or ``{"start":..,"length"|"end":..}``); ``address`` on
DRIVER_IO; ``code`` (CM_PROB_*, 0 = none) on PROBLEM.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lab.events import Event, Kind
from lab.results import Violation
from lab.rules.base import RuleContext, ms, register, violation
from lab.timeline import Timeline


class State(str, Enum):
    UNKNOWN = "unknown"              # no evidence yet (tracing began with the device up)
    STARTED = "started"
    STOP_PENDING = "stop-pending"    # QUERY_STOP succeeded
    STOPPED = "stopped"
    START_FAILED = "start-failed"
    REMOVE_PENDING = "remove-pending"
    SURPRISE_REMOVED = "surprise-removed"
    REMOVED = "removed"


class Input(str, Enum):
    QS_OK = "query-stop ok"
    QS_FAIL = "query-stop failed"
    STOP_OK = "stop ok"
    STOP_FAIL = "stop failed"
    CS_OK = "cancel-stop ok"
    CS_FAIL = "cancel-stop failed"
    START_OK = "start ok"
    START_FAIL = "start failed"
    QR_OK = "query-remove ok"
    QR_FAIL = "query-remove failed"
    CR = "cancel-remove"
    SR = "surprise-removal"
    REMOVE = "remove"


St, In = State, Input
#: (state, input) -> (next state, check id reported on this move or None).
#: Anything absent is ``pnp.unexpected-irp``. Status checks that hold in every state
#: (STOP, CANCEL_STOP, REMOVE must not fail) are applied outside the table.
TRANSITIONS: Mapping[tuple[State, Input], tuple[State, str | None]] = {
    # no history: accept the first IRP as evidence of where the device was
    (St.UNKNOWN, In.QS_OK): (St.STOP_PENDING, None),
    (St.UNKNOWN, In.QS_FAIL): (St.STARTED, None),
    (St.UNKNOWN, In.CS_OK): (St.STARTED, None),
    (St.UNKNOWN, In.CS_FAIL): (St.STARTED, None),
    (St.UNKNOWN, In.STOP_OK): (St.STOPPED, None),
    (St.UNKNOWN, In.STOP_FAIL): (St.STOPPED, None),
    (St.UNKNOWN, In.START_OK): (St.STARTED, None),
    (St.UNKNOWN, In.START_FAIL): (St.START_FAILED, "pnp.start-failed"),
    (St.UNKNOWN, In.QR_OK): (St.REMOVE_PENDING, None),
    (St.UNKNOWN, In.QR_FAIL): (St.STARTED, None),
    (St.UNKNOWN, In.CR): (St.STARTED, None),
    (St.UNKNOWN, In.SR): (St.SURPRISE_REMOVED, None),
    (St.UNKNOWN, In.REMOVE): (St.REMOVED, None),
    # started
    (St.STARTED, In.QS_OK): (St.STOP_PENDING, None),
    (St.STARTED, In.QS_FAIL): (St.STARTED, None),
    (St.STARTED, In.CS_OK): (St.STARTED, None),            # spurious cancel-stop: allowed
    (St.STARTED, In.CS_FAIL): (St.STARTED, None),
    (St.STARTED, In.STOP_OK): (St.STOPPED, "pnp.stop-without-query-stop"),
    (St.STARTED, In.STOP_FAIL): (St.STOPPED, "pnp.stop-without-query-stop"),
    (St.STARTED, In.START_OK): (St.STARTED, None),         # new resources while started
    (St.STARTED, In.START_FAIL): (St.START_FAILED, "pnp.start-failed"),
    (St.STARTED, In.QR_OK): (St.REMOVE_PENDING, None),
    (St.STARTED, In.QR_FAIL): (St.STARTED, None),
    (St.STARTED, In.CR): (St.STARTED, None),
    (St.STARTED, In.SR): (St.SURPRISE_REMOVED, None),
    (St.STARTED, In.REMOVE): (St.REMOVED, None),
    # stop pending
    (St.STOP_PENDING, In.QS_OK): (St.STOP_PENDING, None),
    (St.STOP_PENDING, In.QS_FAIL): (St.STARTED, None),
    (St.STOP_PENDING, In.CS_OK): (St.STARTED, None),
    (St.STOP_PENDING, In.CS_FAIL): (St.STARTED, None),
    (St.STOP_PENDING, In.STOP_OK): (St.STOPPED, None),
    (St.STOP_PENDING, In.STOP_FAIL): (St.STOPPED, None),
    (St.STOP_PENDING, In.SR): (St.SURPRISE_REMOVED, None),
    (St.STOP_PENDING, In.REMOVE): (St.REMOVED, None),
    # stopped: only a (re)start or removal may follow
    (St.STOPPED, In.START_OK): (St.STARTED, None),
    (St.STOPPED, In.START_FAIL): (St.START_FAILED, "pnp.restart-failed"),
    (St.STOPPED, In.SR): (St.SURPRISE_REMOVED, None),
    (St.STOPPED, In.REMOVE): (St.REMOVED, None),
    # a failed (re)start must end in surprise removal and removal
    (St.START_FAILED, In.SR): (St.SURPRISE_REMOVED, None),
    (St.START_FAILED, In.REMOVE): (St.REMOVED, None),
    (St.START_FAILED, In.START_OK): (St.STARTED, None),
    (St.START_FAILED, In.START_FAIL): (St.START_FAILED, "pnp.start-failed"),
    # orderly removal
    (St.REMOVE_PENDING, In.QR_OK): (St.REMOVE_PENDING, None),
    (St.REMOVE_PENDING, In.CR): (St.STARTED, None),
    (St.REMOVE_PENDING, In.SR): (St.SURPRISE_REMOVED, None),
    (St.REMOVE_PENDING, In.REMOVE): (St.REMOVED, None),
    # surprise removal: REMOVE follows once every handle is closed
    (St.SURPRISE_REMOVED, In.SR): (St.SURPRISE_REMOVED, None),
    (St.SURPRISE_REMOVED, In.REMOVE): (St.REMOVED, None),
    # removed: the same instance may come back (re-plug, re-enumeration)
    (St.REMOVED, In.REMOVE): (St.REMOVED, None),
    (St.REMOVED, In.START_OK): (St.STARTED, None),
    (St.REMOVED, In.START_FAIL): (St.START_FAILED, "pnp.start-failed"),
}

#: where the machine resynchronises after an unexpected IRP
_RESYNC: Mapping[Input, State] = {
    In.QS_OK: St.STOP_PENDING, In.QS_FAIL: St.STARTED, In.STOP_OK: St.STOPPED,
    In.STOP_FAIL: St.STOPPED, In.CS_OK: St.STARTED, In.CS_FAIL: St.STARTED,
    In.START_OK: St.STARTED, In.START_FAIL: St.START_FAILED, In.QR_OK: St.REMOVE_PENDING,
    In.QR_FAIL: St.STARTED, In.CR: St.STARTED, In.SR: St.SURPRISE_REMOVED, In.REMOVE: St.REMOVED,
}

_KIND_INPUT: Mapping[Kind, tuple[Input, Input]] = {
    Kind.QUERY_STOP: (In.QS_OK, In.QS_FAIL),
    Kind.STOP: (In.STOP_OK, In.STOP_FAIL),
    Kind.CANCEL_STOP: (In.CS_OK, In.CS_FAIL),
    Kind.START: (In.START_OK, In.START_FAIL),
    Kind.QUERY_REMOVE: (In.QR_OK, In.QR_FAIL),
    Kind.CANCEL_REMOVE: (In.CR, In.CR),
    Kind.SURPRISE_REMOVAL: (In.SR, In.SR),
    Kind.REMOVE: (In.REMOVE, In.REMOVE),
}

_PNP_KINDS = (*_KIND_INPUT, Kind.PROBLEM, Kind.RESOURCES_ASSIGNED, Kind.DRIVER_IO)


def irp_ok(ev: Event) -> bool | None:
    """Did the driver complete the IRP successfully? None when the tracer doesn't say
    (or the IRP is still pending)."""
    d = ev.data
    if "ok" in d and d["ok"] is not None:
        return bool(d["ok"])
    st = d.get("status", d.get("ntstatus"))
    if st is None or isinstance(st, bool):
        return None if st is None else bool(st)
    if isinstance(st, int):
        return (st & 0xFFFFFFFF) < 0x80000000          # NT_SUCCESS
    s = str(st).strip().upper()
    if s in ("STATUS_SUCCESS", "SUCCESS", "OK"):
        return True
    if s == "STATUS_PENDING":
        return None
    try:
        return (int(s, 0) & 0xFFFFFFFF) < 0x80000000
    except ValueError:
        pass
    if s == "STATUS_RESOURCE_REQUIREMENTS_CHANGED":
        return True
    return False if s.startswith("STATUS_") or s in ("FAILED", "ERROR") else None


def problem_code(ev: Event) -> int | None:
    """The device's CM_PROB_* code from a PROBLEM event (0: no problem)."""
    for k in ("code", "problem_code", "problem", "ConfigManagerErrorCode"):
        if k in ev.data:
            v = ev.data[k]
            if v is None:
                return 0
            if isinstance(v, int):
                return v
            s = str(v).strip()
            if s.upper() in ("", "CM_PROB_NONE", "NONE", "OK"):
                return 0
            try:
                return int(s, 0)
            except ValueError:
                return -1                               # a named problem we can't number
    return None


_RANGE_RE = re.compile(r"(0x[0-9a-fA-F]+|\d+)\s*([+-])\s*(0x[0-9a-fA-F]+|\d+)")


def parse_ranges(obj: Any) -> list[tuple[int, int]]:
    """Memory/IO ranges ``[start, end)`` from the forms tracers write."""
    out: list[tuple[int, int]] = []
    items = obj if isinstance(obj, (list, tuple)) else [obj]
    for it in items:
        if isinstance(it, Mapping):
            start = it.get("start", it.get("addr"))
            if start is None:
                continue
            start = int(start, 0) if isinstance(start, str) else int(start)
            if "end" in it:
                end = it["end"]
                out.append((start, (int(end, 0) if isinstance(end, str) else int(end)) + 1))
            elif "length" in it or "size" in it:
                ln = it.get("length", it.get("size"))
                out.append((start, start + (int(ln, 0) if isinstance(ln, str) else int(ln))))
        elif isinstance(it, str):
            for m in _RANGE_RE.finditer(it):
                a, b = int(m[1], 0), int(m[3], 0)
                out.append((a, a + b) if m[2] == "+" else (a, b + 1))
    return out


def _norm_resources(obj: Any) -> str:
    ranges = parse_ranges(obj)
    if ranges:
        return json.dumps(sorted(ranges))
    return json.dumps(obj, sort_keys=True, default=str)


def _address(ev: Event) -> int | None:
    v = ev.data.get("address", ev.data.get("addr"))
    if v is None:
        return None
    try:
        return int(v, 0) if isinstance(v, str) else int(v)
    except ValueError:
        return None


def _in(addr: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a <= addr < b for a, b in ranges)


@dataclass
class _Device:
    label: str
    state: State = State.UNKNOWN
    last_qs: Event | None = None
    last_qs_ok: bool | None = None
    failed_start: Event | None = None
    surprise: Event | None = None
    stop: Event | None = None
    problem: Event | None = None
    assigned: Any = None                    # latest RESOURCES_ASSIGNED resources
    assigned_since_stop: Any = None
    current: list[tuple[int, int]] = field(default_factory=list)
    previous: list[tuple[int, int]] = field(default_factory=list)
    io_flagged: State | None = None
    stale_io_flagged: bool = False
    last_event: Event | None = None


class WindowsPnpRule:
    id = "windows-pnp"
    description = ("Windows PnP stop/start/remove sequencing and PortCls rebalance "
                   "callbacks, per device, as a state machine")
    checks: Mapping[str, str] = {
        "pnp.stop-without-query-stop": "STOP arrived with no successful QUERY_STOP before it",
        "pnp.stop-after-failed-query-stop": "STOP arrived although the driver failed QUERY_STOP",
        "pnp.stop-failed": "the driver failed IRP_MN_STOP_DEVICE (it must fail QUERY_STOP instead)",
        "pnp.cancel-stop-failed": "the driver failed IRP_MN_CANCEL_STOP_DEVICE (must succeed)",
        "pnp.remove-failed": "the driver failed REMOVE or SURPRISE_REMOVAL (must succeed)",
        "pnp.start-failed": "the driver failed IRP_MN_START_DEVICE",
        "pnp.restart-failed": "START after a rebalance STOP failed",
        "pnp.failed-start-not-removed": "after a failed start no SURPRISE_REMOVAL/REMOVE followed",
        "pnp.surprise-removal-without-remove": "SURPRISE_REMOVAL was never followed by REMOVE",
        "pnp.stopped-at-end": "the device was left stopped (never restarted)",
        "pnp.incomplete": "the run was cut off while the device was mid-transition",
        "pnp.start-stale-resources": "START used resources other than those assigned after STOP",
        "pnp.io-while-stopped": "driver I/O between STOP (or a failed start) and a "
                                "successful START",
        "pnp.io-after-removal": "driver I/O after SURPRISE_REMOVAL or REMOVE",
        "pnp.io-stale-resources": "driver I/O to the pre-rebalance resources after the restart",
        "pnp.query-stop-slow": "QUERY_STOP handler exceeded query_stop_max_ms",
        "pnp.cancel-stop-slow": "CANCEL_STOP handler exceeded cancel_stop_max_ms",
        "pnp.problem-at-end": "the device ended the run with a problem code",
        "pnp.driver-load-failed": "a driver of the device's stack failed to load "
                                  "(Kernel-PnP event 219)",
        "pnp.unexpected-irp": "an IRP the PnP state machine does not allow in the current state",
    }

    def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        by_dev: dict[str, list[Event]] = {}
        for ev in timeline.select(kinds=_PNP_KINDS):
            if ev.device is None or not context.under_test(ev.device):
                continue
            by_dev.setdefault(context.label(ev.device), []).append(ev)
        for label, evs in by_dev.items():
            out.extend(self._device(label, evs, timeline, context))
        return out

    # ---- one device -------------------------------------------------------------
    def _device(self, label: str, evs: list[Event], timeline: Timeline,
                ctx: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        dev = _Device(label)
        # per kind: IRP-level evidence wins; PortCls callbacks stand in where it is absent
        # (Kernel-PnP ETW sees starts and removals, only PortCls sees query-stop/stop)
        irp_kinds = {e.kind for e in evs if e.kind in _KIND_INPUT and not _is_callback(e)}
        lim = ctx.limits
        for ev in evs:
            dev.last_event = ev
            # handler durations: IRPs and PortCls callbacks alike
            if ev.kind == Kind.QUERY_STOP and ev.duration_ns is not None \
                    and ev.duration_ns > lim.query_stop_max_ms * 1e6:
                out.append(violation(
                    "pnp.query-stop-slow", label, ctx.phase_at(ev.t_host_ns),
                    f"QUERY_STOP handling took {ms(ev.duration_ns)} (limit "
                    f"{lim.query_stop_max_ms:g} ms); PortCls holds the device global lock "
                    "during PnpQueryStop, blocking every create meanwhile.",
                    [ev], duration_ns=ev.duration_ns, limit_ms=lim.query_stop_max_ms))
            if ev.kind == Kind.CANCEL_STOP and ev.duration_ns is not None \
                    and ev.duration_ns > lim.cancel_stop_max_ms * 1e6:
                out.append(violation(
                    "pnp.cancel-stop-slow", label, ctx.phase_at(ev.t_host_ns),
                    f"CANCEL_STOP handling took {ms(ev.duration_ns)} (limit "
                    f"{lim.cancel_stop_max_ms:g} ms); PortCls holds the device global lock "
                    "during PnpCancelStop.",
                    [ev], duration_ns=ev.duration_ns, limit_ms=lim.cancel_stop_max_ms))
            if ev.kind == Kind.PROBLEM and ev.data.get("name") == "DriverLoadFailed":
                # Kernel-PnP 219: the device's driver (or a filter) was not loaded at all
                out.append(violation(
                    "pnp.driver-load-failed", label, ctx.phase_at(ev.t_host_ns),
                    f"the driver {ev.data.get('driver') or '?'} failed to load for the device"
                    + (f" (status {ev.data['status']})" if ev.data.get("status") else ""),
                    [ev], driver=ev.data.get("driver"), status=ev.data.get("status")))
                continue
            if ev.kind == Kind.PROBLEM:
                code = problem_code(ev)
                dev.problem = ev if code else None
                if code and dev.state == State.STOPPED:
                    # the restart failed as Device Manager sees it
                    dev.failed_start = ev
                    out.append(violation(
                        "pnp.restart-failed", label, ctx.phase_at(ev.t_host_ns),
                        f"the device reported problem code {code} while stopped for a "
                        "rebalance: its restart failed.", [dev.stop, ev], code=code))
                    dev.state = State.START_FAILED
                continue
            if ev.kind == Kind.RESOURCES_ASSIGNED:
                res = ev.data.get("resources")
                dev.assigned = res
                if dev.state in (State.STOPPED, State.STOP_PENDING, State.START_FAILED):
                    dev.assigned_since_stop = res
                elif dev.state in (State.STARTED, State.UNKNOWN):
                    dev.current = parse_ranges(res)
                continue
            if ev.kind == Kind.DRIVER_IO:
                out.extend(self._io(dev, ev, ctx))
                continue
            if _is_callback(ev) and ev.kind in irp_kinds:
                continue
            out.extend(self._transition(dev, ev, ctx))
        out.extend(self._at_end(dev, ctx))
        return out

    def _transition(self, dev: _Device, ev: Event, ctx: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        ok = irp_ok(ev)
        good, bad = _KIND_INPUT[ev.kind]
        inp = bad if ok is False else good
        phase = ctx.phase_at(ev.t_host_ns)
        label = dev.label
        # status rules that hold in every state
        if inp == In.STOP_FAIL:
            out.append(violation(
                "pnp.stop-failed", label, phase,
                "the driver failed IRP_MN_STOP_DEVICE; a driver that cannot release its "
                "resources must fail the QUERY_STOP instead.", [ev],
                status=ev.data.get("status")))
        if inp == In.CS_FAIL:
            out.append(violation(
                "pnp.cancel-stop-failed", label, phase,
                "the driver failed IRP_MN_CANCEL_STOP_DEVICE, which must succeed; the "
                "device is left in an inconsistent state.", [dev.last_qs, ev],
                status=ev.data.get("status")))
        if ev.kind in (Kind.REMOVE, Kind.SURPRISE_REMOVAL) and ok is False:
            out.append(violation(
                "pnp.remove-failed", label, phase,
                f"the driver failed {ev.kind.value.upper()}, which drivers must not fail.",
                [ev], status=ev.data.get("status")))

        key = (dev.state, inp)
        if key in TRANSITIONS:
            nxt, check = TRANSITIONS[key]
            if check == "pnp.stop-without-query-stop" and dev.last_qs_ok is False:
                out.append(violation(
                    "pnp.stop-after-failed-query-stop", label, phase,
                    "STOP arrived although the driver failed the preceding QUERY_STOP; "
                    "the PnP manager only stops a device whose query-stop succeeded.",
                    [dev.last_qs, ev], query_stop_status=(dev.last_qs.data.get("status")
                                                          if dev.last_qs else None)))
            elif check == "pnp.stop-without-query-stop":
                out.append(violation(
                    check, label, phase,
                    "STOP arrived with no successful QUERY_STOP before it (Windows 2000 "
                    "and later only stop a device whose query-stop succeeded).", [ev]))
            elif check is not None:
                what = ("its restart after the rebalance STOP" if check == "pnp.restart-failed"
                        else "IRP_MN_START_DEVICE")
                out.append(violation(
                    check, label, phase,
                    f"the driver failed {what} (status {ev.data.get('status')}); the system "
                    "will surprise-remove the device.", [dev.stop, ev],
                    status=ev.data.get("status")))
        else:
            nxt = _RESYNC[inp]
            out.append(violation(
                "pnp.unexpected-irp", label, phase,
                f"{inp.value} while the device was {dev.state.value}: the PnP state "
                "machine does not allow this (a lost IRP or a tracer gap).", [ev],
                state=dev.state.value, input=inp.value))

        # bookkeeping per input
        if ev.kind == Kind.QUERY_STOP:
            dev.last_qs, dev.last_qs_ok = ev, ok is not False
        if inp in (In.STOP_OK, In.STOP_FAIL):
            dev.stop = ev
            dev.previous = list(dev.current)
            dev.assigned_since_stop = None
        if inp == In.START_OK:
            restart = dev.state in (State.STOPPED, State.START_FAILED)
            if restart:
                out.extend(self._restart_resources(dev, ev, ctx))
            res = ev.data.get("resources")
            if res is None:
                res = dev.assigned_since_stop if restart else dev.assigned
            if res is not None:
                dev.current = parse_ranges(res)
            dev.failed_start = None
        if inp == In.START_FAIL:
            dev.failed_start = ev
        if inp == In.SR:
            dev.surprise = ev
        if nxt in (State.STARTED, State.STOP_PENDING):
            dev.io_flagged = None
        if nxt == State.STARTED and ev.kind != Kind.QUERY_STOP:
            dev.last_qs_ok = None           # a later STOP needs a new query-stop
        if nxt == State.REMOVED:
            dev.problem = None
        dev.state = nxt
        return out

    def _restart_resources(self, dev: _Device, ev: Event, ctx: RuleContext) -> list[Violation]:
        used = ev.data.get("resources")
        assigned = dev.assigned_since_stop
        if used is None or assigned is None:
            return []
        if _norm_resources(used) == _norm_resources(assigned):
            return []
        return [violation(
            "pnp.start-stale-resources", dev.label, ctx.phase_at(ev.t_host_ns),
            "the driver restarted with resources other than those assigned after the "
            f"STOP (used {used}, assigned {assigned}).", [dev.stop, ev],
            used=used, assigned=assigned)]

    def _io(self, dev: _Device, ev: Event, ctx: RuleContext) -> list[Violation]:
        phase = ctx.phase_at(ev.t_host_ns)
        if dev.state in (State.STOPPED, State.START_FAILED):
            if dev.io_flagged == dev.state:
                return []
            dev.io_flagged = dev.state
            return [violation(
                "pnp.io-while-stopped", dev.label, phase,
                "the driver accessed the device while it was stopped for a rebalance "
                "(after STOP, before a successful START): its resources may be moving.",
                [dev.stop, ev], state=dev.state.value)]
        if dev.state in (State.SURPRISE_REMOVED, State.REMOVED):
            if dev.io_flagged == dev.state:
                return []
            dev.io_flagged = dev.state
            return [violation(
                "pnp.io-after-removal", dev.label, phase,
                f"the driver accessed the device after {dev.state.value.replace('-', ' ')}.",
                [dev.surprise, ev], state=dev.state.value)]
        addr = _address(ev)
        if (addr is not None and dev.previous and dev.current and not dev.stale_io_flagged
                and _in(addr, dev.previous) and not _in(addr, dev.current)):
            dev.stale_io_flagged = True
            return [violation(
                "pnp.io-stale-resources", dev.label, phase,
                f"after the restart the driver accessed {addr:#x}, inside its pre-rebalance "
                "resources and outside the new ones: it kept a stale mapping.", [ev],
                address=addr)]
        return []

    def _at_end(self, dev: _Device, ctx: RuleContext) -> list[Violation]:
        last = dev.last_event
        if last is None:
            return []
        t = ctx.end_ns if ctx.end_ns is not None else last.t_host_ns
        phase = ctx.phase_at(t)
        out: list[Violation] = []
        transitional = {State.STOP_PENDING: ("pnp.stopped-at-end", dev.stop or dev.last_qs),
                        State.STOPPED: ("pnp.stopped-at-end", dev.stop),
                        State.START_FAILED: ("pnp.failed-start-not-removed", dev.failed_start),
                        State.SURPRISE_REMOVED: ("pnp.surprise-removal-without-remove",
                                                 dev.surprise)}
        if dev.state in transitional:
            rule, ev = transitional[dev.state]
            if not ctx.complete:
                out.append(violation(
                    "pnp.incomplete", dev.label, phase,
                    f"the run was cut off while the device was {dev.state.value}; its PnP "
                    "sequence could not be checked to the end.", [ev], state=dev.state.value))
            else:
                msg = {
                    "pnp.stopped-at-end": "the device was left stopped: no START (or removal) "
                                          "followed the rebalance stop.",
                    "pnp.failed-start-not-removed": "the device's start failed and no "
                                                    "SURPRISE_REMOVAL/REMOVE followed by the "
                                                    "end of the run.",
                    "pnp.surprise-removal-without-remove": "SURPRISE_REMOVAL was never "
                        "followed by REMOVE: something still holds a handle to the device.",
                }[rule]
                out.append(violation(rule, dev.label, phase, msg, [ev], state=dev.state.value))
        if dev.problem is not None and dev.state not in (State.REMOVED, State.SURPRISE_REMOVED):
            code = problem_code(dev.problem)
            if code and code not in ctx.allowed_problem_codes:
                out.append(violation(
                    "pnp.problem-at-end", dev.label, phase,
                    f"the device ended the run with problem code {code}.", [dev.problem],
                    code=code))
        return out


def _is_callback(ev: Event) -> bool:
    return ev.data.get("layer") == "portcls" or "callback" in ev.data


register(WindowsPnpRule())
