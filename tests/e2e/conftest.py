"""End-to-end fixtures: real QEMU, the real built guest image, artifacts kept per test.

A missing QEMU or image is a test *failure* naming the reason, never a skip: CI must
not go green on a machine that ran none of these.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.errors import LabError
from lab.image import GuestImage
from lab.machine import Machine
from lab.rundir import RunDir
from vdevice.presets import default_topology
from vdevice.topology import HotplugMode

ARTIFACTS = Path(os.environ.get("REBALAB_TEST_ARTIFACTS", "runs/tests"))


@pytest.fixture(scope="session")
def image() -> GuestImage:
    if not shutil.which("qemu-system-x86_64") and not os.environ.get("REBALAB_QEMU"):
        pytest.fail("qemu-system-x86_64 is not installed: run `make setup` (end-to-end tests "
                    "never pass without QEMU)")
    try:
        return GuestImage.load()
    except LabError as exc:
        pytest.fail(f"the guest image is not usable: {exc}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]


@pytest.fixture
def run_dir(request: pytest.FixtureRequest) -> Iterator[RunDir]:
    run = RunDir(ARTIFACTS, _safe(request.node.name))
    yield run
    run.close()


def boot(image: GuestImage, run: RunDir, mode: HotplugMode = HotplugMode.ACPI,
         **kw: object) -> Machine:
    m = Machine(kw.pop("topology", None) or default_topology(mode), run,  # type: ignore[arg-type]
                image=image, **kw)  # type: ignore[arg-type]
    m.start()
    return m


@pytest.fixture(scope="module", params=[HotplugMode.ACPI, HotplugMode.NATIVE],
                ids=lambda m: m.value)
def machine(request: pytest.FixtureRequest, image: GuestImage) -> Iterator[Machine]:
    """One VM per hot-plug mode, shared by the tests of a module to keep the suite fast."""
    run = RunDir(ARTIFACTS, f"{_safe(request.module.__name__)}-{request.param.value}")
    m = Machine(default_topology(request.param), run, image=image)
    try:
        m.start()
        yield m
    finally:
        m.stop()
        run.close()


def qemu_pids_for(path: Path) -> list[int]:
    """PIDs of QEMU processes whose command line mentions ``path`` (our run's files)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmd and str(path) in cmd:
            pids.append(int(d.name))
    return pids
