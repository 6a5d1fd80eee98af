"""Windows PnP state machine: hand-built IRP sequences, violating and clean."""

from __future__ import annotations

import pytest

from lab.events import DeviceId, Event, Kind, Source
from lab.rules import Limits, RuleContext, check_all
from lab.rules.windows_pnp import TRANSITIONS, Input, State, irp_ok, parse_ranges, problem_code
from lab.timeline import Timeline

SND = DeviceId(qom="snd0", bdf="0000:01:00.0", instance="PCI\\VEN_8086&DEV_2668\\3&1&0&18")
OTHER = DeviceId(qom="net0", bdf="0000:02:00.0")
OLD = ["0xfe800000+0x4000"]
NEW = ["0x20000000+0x4000"]


def ev(t_ms: float, kind: Kind, dev: DeviceId | None = SND, dur_ms: float | None = None,
       src: Source = Source.GUEST_PNP, **data: object) -> Event:
    return Event(int(t_ms * 1e6), src, kind, dev,
                 None if dur_ms is None else int(dur_ms * 1e6), data=dict(data))


def run(*evs: Event, **ctx: object) -> list[str]:
    tl = Timeline.build(list(evs), devices=[SND, OTHER])
    context = RuleContext.from_timeline(tl, devices=(SND,), **ctx)   # type: ignore[arg-type]
    return [v.rule for v in check_all(tl, context, ["windows-pnp"])]


def rebalance(start_res: object = NEW, assigned: object = NEW) -> list[Event]:
    return [ev(0, Kind.START, resources=OLD, status=0),
            ev(10, Kind.QUERY_STOP, dur_ms=2, status="STATUS_SUCCESS"),
            ev(20, Kind.STOP, status=0),
            ev(25, Kind.RESOURCES_ASSIGNED, resources=assigned),
            ev(30, Kind.START, resources=start_res, status=0)]


def test_clean_rebalance_passes() -> None:
    assert run(*rebalance()) == []


@pytest.mark.parametrize("seq", [
    # spurious cancel-stop on a started device (PortCls: PnpCancelStop w/o PnpQueryStop)
    [ev(0, Kind.START), ev(5, Kind.CANCEL_STOP, status=0)],
    # no history at all: the first thing seen is a cancel-stop
    [ev(5, Kind.CANCEL_STOP)],
    # a query-stop failed (here or higher in the stack), then the cancel-stop
    [ev(0, Kind.START), ev(5, Kind.QUERY_STOP, status="0xC0000001"), ev(6, Kind.CANCEL_STOP)],
    # query-stop succeeded, then cancelled: back to started, stop later needs a new query
    [ev(0, Kind.START), ev(5, Kind.QUERY_STOP), ev(6, Kind.CANCEL_STOP),
     ev(7, Kind.QUERY_STOP), ev(8, Kind.STOP), ev(9, Kind.START)],
])
def test_cancel_stop_without_query_stop_is_allowed(seq: list[Event]) -> None:
    assert run(*seq) == []


def test_stop_after_failed_query_stop() -> None:
    assert run(ev(0, Kind.START), ev(5, Kind.QUERY_STOP, status="STATUS_UNSUCCESSFUL"),
               ev(6, Kind.STOP), ev(7, Kind.START)) == ["pnp.stop-after-failed-query-stop"]


def test_stop_without_query_stop() -> None:
    assert run(ev(0, Kind.START), ev(6, Kind.STOP), ev(7, Kind.START)) == \
        ["pnp.stop-without-query-stop"]


def test_cancel_stop_must_succeed() -> None:
    assert run(ev(0, Kind.START), ev(5, Kind.QUERY_STOP),
               ev(6, Kind.CANCEL_STOP, status=0xC0000001)) == ["pnp.cancel-stop-failed"]


def test_stop_must_not_fail() -> None:
    assert run(ev(0, Kind.START), ev(5, Kind.QUERY_STOP), ev(6, Kind.STOP, ok=False),
               ev(7, Kind.START)) == ["pnp.stop-failed"]


def test_failed_restart_followed_by_surprise_removal_and_remove() -> None:
    seq = rebalance()[:4] + [ev(30, Kind.START, status="0xC000009A"),
                             ev(40, Kind.SURPRISE_REMOVAL), ev(50, Kind.REMOVE)]
    assert run(*seq) == ["pnp.restart-failed"]


def test_failed_restart_not_removed() -> None:
    seq = rebalance()[:4] + [ev(30, Kind.START, status="0xC000009A")]
    assert run(*seq) == ["pnp.restart-failed", "pnp.failed-start-not-removed"]


def test_problem_code_after_stop_counts_as_failed_restart() -> None:
    seq = rebalance()[:4] + [ev(30, Kind.PROBLEM, code=10)]
    assert run(*seq) == ["pnp.restart-failed", "pnp.failed-start-not-removed",
                         "pnp.problem-at-end"]


def test_surprise_removal_without_remove() -> None:
    assert run(ev(0, Kind.START), ev(10, Kind.SURPRISE_REMOVAL)) == \
        ["pnp.surprise-removal-without-remove"]


def test_remove_and_surprise_removal_must_not_fail() -> None:
    assert run(ev(0, Kind.START), ev(10, Kind.SURPRISE_REMOVAL, status="0xC0000001"),
               ev(20, Kind.REMOVE)) == ["pnp.remove-failed"]


def test_driver_io_while_stopped_is_flagged_once() -> None:
    seq = rebalance()
    seq[3:3] = [ev(21, Kind.DRIVER_IO), ev(22, Kind.DRIVER_IO)]
    seq.append(ev(40, Kind.DRIVER_IO))
    assert run(*seq) == ["pnp.io-while-stopped"]


def test_driver_io_after_removal() -> None:
    assert run(ev(0, Kind.START), ev(10, Kind.QUERY_REMOVE), ev(20, Kind.REMOVE),
               ev(30, Kind.DRIVER_IO)) == ["pnp.io-after-removal"]


def test_handler_durations_against_limits() -> None:
    seq = [ev(0, Kind.START), ev(10, Kind.QUERY_STOP, dur_ms=150),
           ev(200, Kind.CANCEL_STOP, dur_ms=120),
           ev(400, Kind.QUERY_STOP, dur_ms=20, callback="PnpQueryStop", layer="portcls"),
           ev(400.5, Kind.QUERY_STOP, dur_ms=1), ev(401, Kind.CANCEL_STOP, dur_ms=1)]
    assert run(*seq) == ["pnp.query-stop-slow", "pnp.cancel-stop-slow"]
    assert run(*seq, limits=Limits(query_stop_max_ms=10, cancel_stop_max_ms=500)) == \
        ["pnp.query-stop-slow", "pnp.query-stop-slow"]


def test_problem_code_at_end() -> None:
    assert run(ev(0, Kind.START), ev(10, Kind.PROBLEM, code=28)) == ["pnp.problem-at-end"]
    assert run(ev(0, Kind.START), ev(10, Kind.PROBLEM, code=28),
               ev(20, Kind.PROBLEM, code="CM_PROB_NONE")) == []
    assert run(ev(0, Kind.START), ev(10, Kind.PROBLEM, code=22),
               allowed_problem_codes=frozenset({22})) == []
    # a removed device's problem code (phantom, code 24) is not held against it
    assert run(ev(0, Kind.START), ev(10, Kind.PROBLEM, code=24), ev(20, Kind.QUERY_REMOVE),
               ev(30, Kind.REMOVE)) == []


def test_left_stopped_and_cut_off_runs() -> None:
    seq = rebalance()[:3]
    assert run(*seq) == ["pnp.stopped-at-end"]
    assert run(*seq, complete=False) == ["pnp.incomplete"]


def test_restart_with_stale_resources() -> None:
    assert run(*rebalance(start_res=OLD, assigned=NEW)) == ["pnp.start-stale-resources"]


def test_io_to_the_old_bar_after_restart() -> None:
    seq = rebalance() + [ev(40, Kind.DRIVER_IO, address=0x20000010),
                         ev(41, Kind.DRIVER_IO, address="0xfe800010"),
                         ev(42, Kind.DRIVER_IO, address=0xfe800020)]
    assert run(*seq) == ["pnp.io-stale-resources"]


def test_unexpected_irp_resyncs() -> None:
    seq = rebalance()[:3] + [ev(25, Kind.CANCEL_STOP), ev(30, Kind.QUERY_STOP),
                             ev(31, Kind.STOP), ev(32, Kind.START)]
    assert run(*seq) == ["pnp.unexpected-irp"]


def test_portcls_callbacks_do_not_double_drive_the_machine() -> None:
    seq = [ev(0, Kind.START),
           ev(10, Kind.QUERY_STOP), ev(10.1, Kind.QUERY_STOP, layer="portcls"),
           ev(20, Kind.STOP), ev(20.1, Kind.STOP, callback="PnpStop"),
           ev(30, Kind.START)]
    assert run(*seq) == []
    # the real mix: ETW sees starts, only PortCls callbacks see query-stop/stop
    etw_and_wpp = [ev(0, Kind.START, src=Source.GUEST_ETW),
                   ev(10, Kind.QUERY_STOP, layer="portcls", callback="PnpQueryStop"),
                   ev(20, Kind.STOP, layer="portcls", callback="PnpStop"),
                   ev(25, Kind.DRIVER_IO),
                   ev(30, Kind.START, src=Source.GUEST_ETW),
                   ev(30.5, Kind.START, src=Source.GUEST_WPP, callback="PnpStart")]
    assert run(*etw_and_wpp) == ["pnp.io-while-stopped"]
    assert run(*[e for e in etw_and_wpp if e.kind != Kind.QUERY_STOP]) == \
        ["pnp.io-while-stopped", "pnp.stop-without-query-stop"]   # same STOP cited: by id
    # a tracer that only sees the PortCls callbacks still drives the machine
    only_cb = [ev(10, Kind.QUERY_STOP, layer="portcls"), ev(20, Kind.STOP, layer="portcls")]
    assert run(*only_cb) == ["pnp.stopped-at-end"]


def test_devices_not_under_test_are_ignored_and_phase_is_named() -> None:
    tl = Timeline.build([
        Event(0, Source.HOST_LAB, Kind.OPERATION, data={"name": "rebalance"},
              duration_ns=100_000_000),
        Event(5_000_000, Source.HOST_LAB, Kind.OPERATION,
              data={"name": "rebalance", "phase": "stop"}, duration_ns=20_000_000),
        ev(0, Kind.START, OTHER), ev(10, Kind.STOP, OTHER),
        ev(0, Kind.START), ev(10, Kind.STOP), ev(50, Kind.START)], devices=[SND, OTHER])
    vs = check_all(tl, RuleContext.from_timeline(tl, devices=(SND,)), ["pnp.*"])
    assert [(v.rule, v.device, v.phase) for v in vs] == \
        [("pnp.stop-without-query-stop", "snd0", "rebalance:stop")]
    assert vs[0].events[0].kind == "stop" and vs[0].events[0].seq > 0
    assert str(vs[0].signature) == "pnp.stop-without-query-stop@snd0/rebalance:stop"


def test_status_and_code_parsing() -> None:
    def e(**d: object) -> Event:
        return Event(0, Source.GUEST_PNP, Kind.STOP, data=dict(d))
    assert irp_ok(e()) is None and irp_ok(e(status=0)) is True
    assert irp_ok(e(status="0xC0000001")) is False and irp_ok(e(status=-1073741823)) is False
    assert irp_ok(e(status="STATUS_RESOURCE_REQUIREMENTS_CHANGED")) is True
    assert irp_ok(e(status="STATUS_PENDING")) is None
    assert irp_ok(e(status="STATUS_DEVICE_BUSY")) is False and irp_ok(e(ok=True)) is True
    assert problem_code(Event(0, Source.GUEST_PNP, Kind.PROBLEM, data={"code": "0xa"})) == 10
    assert parse_ranges(["[mem 0xfe800000-0xfe803fff]", {"start": 16, "length": 4}]) == \
        [(0xFE800000, 0xFE804000), (16, 20)]


def test_transition_table_is_explicit_and_total_for_known_states() -> None:
    # every state has a way out, and every "ok" start from stopped is allowed
    for st in State:
        assert any(k[0] == st for k in TRANSITIONS), st
    assert TRANSITIONS[(State.STARTED, Input.CS_OK)] == (State.STARTED, None)
    assert TRANSITIONS[(State.STOPPED, Input.START_FAIL)][1] == "pnp.restart-failed"
