"""Linux driver-model rules: probe/remove pairing, callbacks after remove, rebinding
after a rebalance, and BAR decode left on with no driver in control.

The kernel guarantees a driver's ``remove`` follows a successful ``probe`` and that
no callback runs after ``remove`` returns; a driver that leaves work queued, a timer
armed or an IRQ handler registered breaks that, and a rebalance (remove the port,
rescan, re-probe at new addresses) is where it shows. The decode rule is the one
only the merged timeline can check: QEMU's trace says when the device's BARs decode
(host clock), the guest's kprobes say when a driver is bound (guest clock); decode on
with nobody bound means the device answers at addresses no driver owns.

Tracer contract: PROBE_*/REMOVE_* events carry the device (the ``pci_dev`` argument)
and optionally ``func`` and ``pid``; exits carry ``ret`` (int, or the raw u64/u32 a
kretprobe prints). Events without a device are attributed through
``RuleContext.drivers`` when they carry ``data["driver"]``. Nested enters for one
device (``pci_device_probe`` around ``azx_probe``) are counted, so only the outermost
pair changes the device's state.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lab.events import Event, Kind
from lab.results import Violation
from lab.rules.base import RuleContext, ms, register, violation
from lab.timeline import Span, Timeline

EPROBE_DEFER = -517

_DRIVER_KINDS = (Kind.PROBE_ENTER, Kind.PROBE_EXIT, Kind.REMOVE_ENTER, Kind.REMOVE_EXIT,
                 Kind.CALL_ENTER, Kind.DRIVER_IO, Kind.BOUND, Kind.UNBOUND, Kind.UEVENT)
_DECODE_KINDS = (Kind.DECODE_ON, Kind.DECODE_OFF, Kind.BAR_MAPPED, Kind.BAR_UNMAPPED,
                 Kind.DEVICE_DELETED)
#: the kernel taking devices off its bus (sysfs remove, hot-unplug) and putting them back
_BUS_REMOVE = "pci_stop_and_remove_bus_device_locked"


def ret_value(ev: Event) -> int | None:
    """The handler's return value as a signed int (kretprobes print raw registers)."""
    v = ev.data.get("ret", ev.data.get("retval", ev.data.get("rc")))
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int):
        x = v
    else:
        try:
            x = int(str(v).strip(), 0)
        except ValueError:
            return None
    if x >= 1 << 63:
        x -= 1 << 64
    elif (1 << 31) <= x < (1 << 32):
        x -= 1 << 32
    return x


def _ok(ev: Event) -> bool:
    r = ret_value(ev)
    return r is None or r == 0


@dataclass
class _State:
    bound: bool | None
    probe_depth: int = 0
    remove_depth: int = 0
    removed_at: Event | None = None
    late_calls: int = 0
    late_first: Event | None = None
    late_last: Event | None = None


class LinuxDriverRule:
    id = "linux-driver"
    description = "Linux driver model: probe/remove pairing, no callbacks after remove, " \
                  "rebind after rebalance, no decode while unbound"
    checks: Mapping[str, str] = {
        "linux.probe-unpaired": "a probe entered and never returned",
        "linux.probe-incomplete": "a probe was still running when the run was cut off",
        "linux.probe-failed": "probe returned an error (not -EPROBE_DEFER)",
        "linux.remove-unpaired": "a remove entered and never returned",
        "linux.remove-incomplete": "a remove was still running when the run was cut off",
        "linux.remove-slow": "remove took longer than remove_max_ms",
        "linux.remove-without-probe": "remove called for a device with no successful probe",
        "linux.callback-after-remove": "driver code ran for the device after remove returned",
        "linux.not-rebound": "after a rebalance the driver was not bound again",
        "linux.rebind-incomplete": "the run was cut off before the driver was bound again",
        "linux.decode-unbound": "BAR decode on with no driver bound for longer than "
                                "unbound_decode_max_ms",
    }

    def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        per_dev: dict[str, list[Event]] = {}
        for ev in timeline.select(kinds=_DRIVER_KINDS):
            label = _label(ev, context)
            if label is not None:
                per_dev.setdefault(label, []).append(ev)
        for label, evs in per_dev.items():
            out.extend(self._pairs(label, timeline, context, Kind.PROBE_ENTER, Kind.PROBE_EXIT))
            out.extend(self._pairs(label, timeline, context, Kind.REMOVE_ENTER,
                                   Kind.REMOVE_EXIT))
            out.extend(self._sequence(label, evs, context))
            out.extend(self._rebind(label, evs, context))
        out.extend(self._decode(timeline, context, per_dev))
        return out

    # ---- probe/remove pairing and durations -----------------------------------------
    def _pairs(self, label: str, timeline: Timeline, ctx: RuleContext, enter: Kind,
               exit_: Kind) -> list[Violation]:
        out: list[Violation] = []
        what = "probe" if enter == Kind.PROBE_ENTER else "remove"
        spans = [s for s in timeline.spans(enter, exit_)
                 if (s.enter or s.exit) is not None and _label(s.enter or s.exit, ctx) == label]
        for s in spans:
            if s.enter is not None and s.exit is None:
                if ctx.complete:
                    out.append(violation(
                        f"linux.{what}-unpaired", label, ctx.phase_at(s.start_ns),
                        f"{_func(s)} entered and never returned by the end of the run "
                        f"({ms(ctx.end_of(timeline) - s.start_ns)} later): a hung {what}.",
                        [s.enter], open_ns=ctx.end_of(timeline) - s.start_ns))
                else:
                    out.append(violation(
                        f"linux.{what}-incomplete", label, ctx.phase_at(s.start_ns),
                        f"{_func(s)} was still running when the run was cut off.",
                        [s.enter]))
            if what == "probe" and s.exit is not None and _outermost(s, spans):
                r = ret_value(s.exit)
                if r not in (None, 0, EPROBE_DEFER):
                    out.append(violation(
                        "linux.probe-failed", label, ctx.phase_at(s.exit.t_host_ns),
                        f"{_func(s)} returned {r}: the driver did not bind.",
                        [s.enter, s.exit], ret=r))
            if what == "remove" and s.complete and s.duration_ns is not None \
                    and s.duration_ns > ctx.limits.remove_max_ms * 1e6:
                out.append(violation(
                    "linux.remove-slow", label, ctx.phase_at(s.start_ns),
                    f"{_func(s)} took {ms(s.duration_ns)} (limit "
                    f"{ctx.limits.remove_max_ms:g} ms).", [s.enter, s.exit],
                    duration_ns=s.duration_ns, limit_ms=ctx.limits.remove_max_ms))
        return out

    # ---- remove-without-probe and callbacks after remove -----------------------------
    def _sequence(self, label: str, evs: list[Event], ctx: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        st = _State(bound=None if ctx.bound_at_start is None else label in ctx.bound_at_start)

        def flush() -> None:
            if st.late_calls and st.late_first is not None and st.removed_at is not None:
                out.append(violation(
                    "linux.callback-after-remove", label, ctx.phase_at(st.late_first.t_host_ns),
                    f"{st.late_calls} driver call(s) for the device after remove returned "
                    f"(first {ms(st.late_first.t_host_ns - st.removed_at.t_host_ns)} after "
                    "it): work, timers or an IRQ handler outlived the binding.",
                    [st.removed_at, st.late_first, st.late_last if st.late_calls > 1 else None],
                    count=st.late_calls,
                    first_call=st.late_first.data.get("func") or st.late_first.kind.value))
            st.late_calls, st.late_first, st.late_last = 0, None, None

        for ev in evs:
            k = ev.kind
            if k == Kind.PROBE_ENTER:
                if st.probe_depth == 0:
                    flush()
                    st.removed_at = None
                st.probe_depth += 1
            elif k == Kind.PROBE_EXIT:
                st.probe_depth = max(0, st.probe_depth - 1)
                if st.probe_depth == 0:
                    st.bound = _ok(ev)
            elif k == Kind.REMOVE_ENTER:
                if st.remove_depth == 0 and st.bound is False:
                    out.append(violation(
                        "linux.remove-without-probe", label, ctx.phase_at(ev.t_host_ns),
                        "remove was called for a device with no successful probe before it.",
                        [ev]))
                st.remove_depth += 1
            elif k == Kind.REMOVE_EXIT:
                st.remove_depth = max(0, st.remove_depth - 1)
                if st.remove_depth == 0:
                    flush()
                    st.bound = False
                    st.removed_at = ev
            elif _bind_state(ev) is not None:
                st.bound = _bind_state(ev)
            elif (k in (Kind.CALL_ENTER, Kind.DRIVER_IO) and st.removed_at is not None
                  and st.probe_depth == 0 and st.remove_depth == 0):
                st.late_calls += 1
                st.late_first = st.late_first or ev
                st.late_last = ev
        flush()
        return out

    # ---- rebind after each rebalance ---------------------------------------------------
    def _rebind(self, label: str, evs: list[Event], ctx: RuleContext) -> list[Violation]:
        out: list[Violation] = []
        seen: set[int] = set()
        phases = sorted((p for p in ctx.phases if p.operation == "rebalance"),
                        key=lambda p: (p.start_ns, p.name.count(":")))
        for p in phases:
            removes = [e for e in evs if e.kind == Kind.REMOVE_EXIT and p.contains(e.t_host_ns)]
            if not removes or removes[-1].seq in seen:
                continue
            last = removes[-1]
            seen.add(last.seq)
            later = [e for e in evs if e.seq > last.seq]
            evidence = None
            failed = None
            for e in later:
                if e.kind == Kind.REMOVE_ENTER:
                    break
                if _bind_state(e) is True or (e.kind == Kind.PROBE_EXIT and _ok(e)):
                    evidence = e
                    break
                if e.kind == Kind.PROBE_EXIT:
                    failed = e
            if evidence is not None:
                continue
            if not ctx.complete:
                out.append(violation(
                    "linux.rebind-incomplete", label, ctx.phase_at(last.t_host_ns),
                    f"the run was cut off before the driver was bound again after {p.name}.",
                    [last]))
                continue
            detail = (f"; the probe failed with {ret_value(failed)}" if failed is not None
                      else "; no probe ran")
            out.append(violation(
                "linux.not-rebound", label, ctx.phase_at(last.t_host_ns),
                f"after {p.name} removed the driver, it was never bound again{detail}.",
                [last, failed], phase_name=p.name,
                ret=ret_value(failed) if failed is not None else None))
        return out

    # ---- decode on while unbound ---------------------------------------------------------
    def _decode(self, timeline: Timeline, ctx: RuleContext,
                driver_events: Mapping[str, list[Event]]) -> list[Violation]:
        out: list[Violation] = []
        hw: dict[str, list[Event]] = {}
        for ev in timeline.select(kinds=_DECODE_KINDS):
            if ev.device is not None and ctx.under_test(ev.device):
                hw.setdefault(ctx.label(ev.device), []).append(ev)
        limit_ns = ctx.limits.unbound_decode_max_ms * 1e6
        end = ctx.end_of(timeline)
        bus = [e for e in timeline.select(kinds=(Kind.CALL_ENTER, Kind.CALL_EXIT))
               if e.data.get("func") == _BUS_REMOVE]
        for label, hevs in hw.items():
            use_edges = any(e.kind in (Kind.DECODE_ON, Kind.DECODE_OFF) for e in hevs)
            # (a bus-removal call may also be among the device's own events: once each)
            merged = sorted({id(e): e for e in hevs + driver_events.get(label, []) + bus}
                            .values(), key=lambda e: e.seq)
            decode = False
            mapped: set[object] = set()
            control: bool | None = (None if ctx.bound_at_start is None
                                    else label in ctx.bound_at_start)
            probe_depth = 0
            start: Event | None = None

            def close(at: Event | None, t_end: int, label: str = label) -> None:
                nonlocal start
                if start is None:
                    return
                dur = t_end - start.t_host_ns
                if dur > limit_ns:
                    bound = ctx.alignment_bound_ns
                    out.append(violation(
                        "linux.decode-unbound", label, ctx.phase_at(start.t_host_ns),
                        f"BAR decode on with no driver bound for {ms(dur)} (limit "
                        f"{ctx.limits.unbound_decode_max_ms:g} ms"
                        + (f"; clock alignment ±{ms(bound)}" if bound is not None else
                           "; guest clock not aligned") + ").",
                        [start, at], duration_ns=dur, limit_ms=ctx.limits.unbound_decode_max_ms,
                        alignment_bound_ns=bound))
                start = None

            # Exposure needs both halves of what the hardware does: the command register
            # enabling decode (the edges) and a BAR actually mapped. QEMU unmaps the BARs
            # without a command write when the guest powers the slot off (native
            # unplug), a second or more before it deletes the device.
            edge_on = False
            seen_mapping = False
            # The kernel removing the device from its bus (its remove() called from the
            # bus removal) leaves the command register alone: the device is no longer
            # the OS's, and no driver can own it, until a rescan finds it again. That
            # stretch is the kernel's teardown, not a driver leaving its device exposed,
            # and it lasts as long as the guest is slow (1 s seen with two VMs on two
            # cores, a false alarm on a correct driver).
            bus_removing = 0
            gone = False
            for ev in merged:
                k = ev.kind
                if k in (Kind.CALL_ENTER, Kind.CALL_EXIT):
                    if ev.data.get("func") == _BUS_REMOVE:
                        bus_removing = max(0, bus_removing + (1 if k == Kind.CALL_ENTER else -1))
                    continue
                if k == Kind.UEVENT and ev.data.get("action") == "add":
                    gone = False             # found again (a rescan): exposure counts
                    continue
                if k == Kind.DECODE_ON:
                    edge_on = True
                elif k == Kind.DECODE_OFF:
                    edge_on = False
                elif k == Kind.BAR_MAPPED:
                    mapped.add(ev.data.get("bar", ev.seq))
                    seen_mapping = True
                elif k == Kind.BAR_UNMAPPED:
                    mapped.discard(ev.data.get("bar"))
                    seen_mapping = True
                elif k == Kind.DEVICE_DELETED:
                    edge_on, mapped = False, set()
                elif k == Kind.PROBE_ENTER:
                    probe_depth += 1
                    control = True
                    gone = False
                elif k == Kind.PROBE_EXIT:
                    probe_depth = max(0, probe_depth - 1)
                    if probe_depth == 0:
                        control = _ok(ev)
                elif k == Kind.REMOVE_ENTER:
                    if bus_removing:
                        gone = True
                    continue
                elif k == Kind.REMOVE_EXIT:
                    control = False
                elif _bind_state(ev) is not None:
                    control = _bind_state(ev)
                else:
                    continue
                has_bar = bool(mapped) or (use_edges and not seen_mapping)
                decode = (edge_on if use_edges else True) and has_bar
                exposed = decode and control is False and not gone
                if exposed and start is None:
                    start = ev
                elif not exposed and start is not None:
                    close(ev, ev.t_host_ns)
            close(None, end)
        return out


def _bind_state(ev: Event) -> bool | None:
    """True/False when ``ev`` says the driver is bound/unbound, else None.

    The kernel's own bind/unbind uevent counts like the lab's BOUND/UNBOUND: it is sent
    after probe() returned 0 (or remove() returned), and it reaches the host over the
    console even when the kprobe stream has stopped (a guest that oopsed).
    """
    if ev.kind == Kind.BOUND:
        return True
    if ev.kind == Kind.UNBOUND:
        return False
    if ev.kind == Kind.UEVENT and ev.data.get("SUBSYSTEM", "pci") == "pci":
        action = ev.data.get("action")
        return True if action == "bind" else False if action == "unbind" else None
    return None


def _label(ev: Event | None, ctx: RuleContext) -> str | None:
    if ev is None:
        return None
    if ev.device is not None:
        return ctx.label(ev.device) if ctx.under_test(ev.device) else None
    drv = ev.data.get("driver")
    return ctx.driver_device(str(drv)) if drv else None


def _func(s: Span) -> str:
    ev = s.enter or s.exit
    assert ev is not None
    name = ev.data.get("func") or ev.data.get("function")
    return str(name) if name else ev.kind.value.split("-")[0]


def _outermost(s: Span, spans: list[Span]) -> bool:
    """True unless another complete span of the device strictly contains this one."""
    if s.enter is None or s.exit is None:
        return True
    for o in spans:
        if o is s or o.enter is None or o.exit is None:
            continue
        if o.enter.seq < s.enter.seq and o.exit.seq > s.exit.seq:
            return False
    return True


register(LinuxDriverRule())
