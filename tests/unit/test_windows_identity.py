"""Device identity across host and guest (issue 10, point 1): the Windows plug wait's
PnP instance ids (the device's and its HDA function devnode's) ride on the lab's bound
event, the timeline binds them to the lab's name, and the runner's rule context counts
them as the device under test, so a Kernel-PnP problem event keyed only by an instance
id is judged on snd0. Before, the wait's answer was thrown away and such events were
never judged."""

from __future__ import annotations

from types import SimpleNamespace

from lab.events import DeviceId, Event, Kind, Source
from lab.observe import device_bindings
from lab.rules import check_all
from lab.runner import ScenarioRunner
from lab.timeline import Timeline
from lab.guest.windows.pnp_wait import parse_started
from tests.unit.guest_fakes import behaviour
from vdevice.presets import default_topology
from vdevice.topology import HotplugMode

BDF = "0000:01:00.0"
PCI_INST = "PCI\\VEN_8086&DEV_293E&SUBSYS_11001AF4&REV_03\\4&2A8A9F43&0&0010"
FUNC_INST = "HDAUDIO\\FUNC_01&VEN_1AF4&DEV_0022&SUBSYS_1AF40022&REV_1001\\5&1D63F0E&0&0001"


def _events(with_identity: bool) -> list[Event]:
    plug = Event(1_000_000, Source.HOST_LAB, Kind.HOTPLUG_REQUEST, DeviceId(qom="snd0", bdf=BDF),
                 data={"payload": {"driver": "ich9-intel-hda", "id": "snd0", "bus": "rp1"}})
    started = parse_started(f"started {PCI_INST} function {FUNC_INST}")
    assert started is not None and started.function_instance_id == FUNC_INST
    bound = Event(2_000_000, Source.HOST_LAB, Kind.BOUND,
                  DeviceId(qom="snd0", bdf=BDF,
                           instance=started.instance_id if with_identity else None),
                  data={"function_instance": started.function_instance_id}
                  if with_identity else {})
    # Kernel-PnP 411 for the function devnode: a problem code, keyed by instance id only
    problem = Event(3_000_000, Source.GUEST_ETW, Kind.PROBLEM,
                    DeviceId(instance=FUNC_INST.lower()), data={"code": 10, "event_id": 411})
    return [plug, bound, problem]


def _violations(with_identity: bool) -> list[tuple[str, str]]:
    evs = _events(with_identity)
    tl = Timeline.build(evs, devices=device_bindings(evs))
    runner = SimpleNamespace(topology=default_topology(HotplugMode.ACPI),
                             scenario=SimpleNamespace(limits={}), guest=behaviour("windows"))
    ctx = ScenarioRunner._context(runner, tl)                   # type: ignore[arg-type]
    return [(v.rule, v.device) for v in check_all(tl, ctx, ["windows-pnp"])]


def test_a_problem_on_the_function_devnode_is_judged_on_the_device_under_test() -> None:
    assert ("pnp.problem-at-end", "snd0") in _violations(True)


def test_without_the_waits_identity_it_was_not() -> None:
    assert not any(dev == "snd0" for _, dev in _violations(False))
