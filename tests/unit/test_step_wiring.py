"""A step's fields reach the operation that runs it: the pressure device's id is the one
the scenario model names (``<device>-pressure`` by default) and an explicit ``port:``
is used, where the runner once said ``press0`` and dropped the port."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lab import rebalance as rb
from lab.runner import ScenarioRunner, resolve_topology
from lab.scenario import validate_text

TEXT = """name: wiring
topology: default
guest: linux
steps:
  - plug: {device: snd0, model: AC97, port: rp1}
  - rebalance: {trigger: pressure, device: snd0, size: 64M%s}
"""


@pytest.mark.parametrize("extra, want_id, want_port", [
    ("", "snd0-pressure", None),
    (", id: press9", "press9", None),
    (", port: rp3", "snd0-pressure", "rp3"),
])
def test_pressure_step_fields_reach_the_operation(monkeypatch: pytest.MonkeyPatch, extra: str,
                                                  want_id: str, want_port: str | None) -> None:
    sc = validate_text(TEXT % extra, "wiring.yaml", resolve_topology)
    step = sc.sweep().iteration(0).steps[1]
    seen: dict[str, Any] = {}

    def fake(m: Any, dev: str, **kw: Any) -> Any:
        seen.update(kw, device=dev)
        return SimpleNamespace(summary=lambda: "ok")

    monkeypatch.setattr(rb, "pressure", fake)
    ScenarioRunner._dispatch(SimpleNamespace(), None, None, step, since_ns=0)  # type: ignore[arg-type]
    assert seen["device"] == "snd0" and seen["pressure_id"] == want_id
    assert seen["port"] == want_port and seen["size"] == 64 << 20
