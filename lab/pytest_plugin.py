"""pytest plugin: the lab as fixtures, so a driver team writes a rebalance test in a dozen lines.

```python
from vdevice.topology import Device

def test_rescan_rebinds(lab, timeline):
    lab.plug(Device("snd0", "ich9-intel-hda", "rp1"))
    report = lab.rebalance("rescan", "snd0")
    assert report.audio_moved and report.rebound
    tl = timeline()                                   # aligned host+guest events so far
    assert not lab.violations(tl, ["linux-driver", "kernel-oops"])
```

Fixtures: ``lab_machine`` (a booted ``Machine``, one per test), ``lab`` (a small facade
with plug/unplug/rebalance/violations), ``qmp`` (the QMP session), ``guest`` (the
guest agent), ``timeline`` (call it for the aligned timeline so far; written to the
test's run directory at teardown). Options: ``--rebalab-topology`` (preset name or YAML
file), ``--rebalab-mode``, ``--rebalab-accel``, ``--rebalab-image``, ``--rebalab-runs``.
Each test keeps its run directory; its path is attached to the test report
(``user_properties``) and printed on failure. Marker: ``@pytest.mark.rebalab(topology=...,
mode=...)`` overrides the options per test.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lab.machine import Machine
    from lab.observe import Observation
    from lab.results import Violation
    from lab.timeline import Timeline


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("rebalab", "rebalab lab fixtures")
    g.addoption("--rebalab-topology", default="default",
                help="built-in topology name or topology YAML file (default: default)")
    g.addoption("--rebalab-mode", default=None, choices=("acpi", "native"),
                help="hot-plug mode, overriding the topology's")
    g.addoption("--rebalab-accel", default=None, choices=("auto", "kvm", "tcg"))
    g.addoption("--rebalab-image", default=None, help="guest image directory")
    g.addoption("--rebalab-runs", default="runs/pytest", help="where run directories go")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rebalab(topology=None, mode=None): lab settings for "
                            "this test")


def _topology(config: pytest.Config, marker: pytest.Mark | None) -> Any:
    from lab import qemu_caps
    from vdevice import topology_yaml
    from vdevice.presets import PRESETS
    from vdevice.topology import HotplugMode
    from vdevice.yamlsrc import load

    kw = dict(marker.kwargs) if marker else {}
    ref = kw.get("topology") or config.getoption("--rebalab-topology")
    if isinstance(ref, str) and ref in PRESETS:
        topo = PRESETS[ref]()
    else:
        path = Path(str(ref))
        loc = load(path.read_text(), str(path))
        topo = topology_yaml.check(topology_yaml.from_located(loc), loc, qemu_caps.probe())
    mode = kw.get("mode") or config.getoption("--rebalab-mode")
    if mode:
        topo = replace(topo, hotplug_mode=HotplugMode(mode))
    return topo


@pytest.fixture
def lab_machine(request: pytest.FixtureRequest) -> Iterator[Machine]:
    """A booted lab VM for this test; stopped (nothing left running) at teardown."""
    from lab.errors import LabError
    from lab.image import GuestImage
    from lab.machine import Machine
    from lab.rundir import RunDir

    config = request.config
    marker = request.node.get_closest_marker("rebalab")
    image_dir = config.getoption("--rebalab-image")
    try:
        image = GuestImage.load(Path(image_dir) if image_dir else None)
    except LabError as exc:
        pytest.fail(f"rebalab: {exc}")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    run = RunDir(Path(config.getoption("--rebalab-runs")), name)
    request.node.user_properties.append(("rebalab_run_dir", str(run.path)))
    accel = config.getoption("--rebalab-accel")
    m = Machine(_topology(config, marker), run, image=image,
                accel=None if accel in (None, "auto") else accel)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        run.close()


@pytest.fixture
def qmp(lab_machine: Machine) -> Any:
    return lab_machine.qmp


@pytest.fixture
def guest(lab_machine: Machine) -> Any:
    return lab_machine.agent


@pytest.fixture
def _observation(lab_machine: Machine) -> Iterator[Observation]:
    from lab.observe import Observation

    obs = Observation(lab_machine).start()
    yield obs
    try:
        obs.finish()
    except Exception:
        pass   # the machine may be gone; the test's own result is what matters


@pytest.fixture
def timeline(_observation: Observation) -> Callable[[], Timeline]:
    """Call it to get the aligned timeline of everything since the test started."""
    return _observation.snapshot


class Lab:
    """The operations a test needs, bound to one machine."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine

    def plug(self, device: Any, **kw: Any) -> Any:
        from lab import operations as ops
        return ops.plug(self.machine, device, **kw)

    def unplug(self, device_id: str, **kw: Any) -> Any:
        from lab import operations as ops
        return ops.unplug(self.machine, device_id, **kw)

    def rebalance(self, trigger: str, device_id: str, **kw: Any) -> Any:
        from lab import rebalance as rb
        return rb.run_trigger(self.machine, trigger, device_id, **kw)

    def run(self, argv: Sequence[str], timeout: float | None = None) -> Any:
        assert self.machine.agent is not None
        return self.machine.agent.run_argv(argv, timeout=timeout)

    def violations(self, tl: Timeline, rules: Sequence[str] = ("linux-driver", "kernel-oops")
                   ) -> list[Violation]:
        from lab.events import DeviceId
        from lab.rules import RuleContext, check_all

        devices = tuple(DeviceId(qom=d) for d in sorted(self.machine.present))
        return check_all(tl, RuleContext.from_timeline(tl, devices=devices), list(rules))


@pytest.fixture
def lab(lab_machine: Machine, _observation: Observation) -> Lab:
    return Lab(lab_machine)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome: Any = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        for k, v in item.user_properties:
            if k == "rebalab_run_dir":
                rep.sections.append(("rebalab", f"run directory: {v}"))
