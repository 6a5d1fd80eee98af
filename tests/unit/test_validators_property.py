"""Property-based tests of the validators (issue 13): whatever text, data, names or
numbers come in, the answer is a value or the validator's own error, never another
exception (a traceback)."""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.errors import ConfigError
from lab.inspect import DeviceSpec
from lab.scenario import validate_text
from lab.scenario.units import Duration
from vdevice.catalog import MODELS, check_user_props
from vdevice.errors import SpecError
from vdevice.sizes import parse_size

from tests.unit.test_scenario_validate import Resolver

CANARY = "Qx7-canary-Zp2"
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=20), st.just(CANARY))
data = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4),
                                                  st.dictionaries(st.text(max_size=8) | st.just(CANARY),
                                                                  c, max_size=4)),
                    max_leaves=20)
STEP_NAMES = ["plug", "unplug", "rebalance", "guest", "module", "play", "sleep", "jitter",
              "wait", "pause", "resume", "parallel", "assert"]


def _validate(text: str) -> None:
    try:
        validate_text(text, "s.yaml", Resolver(), base_dir="/tmp")
    except SpecError:
        return


@SETTINGS
@given(st.text(max_size=400))
def test_any_text_is_a_scenario_or_a_spec_error(text: str) -> None:
    _validate(text)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["name", "topology", "guest", "parameters", "seed",
                                        "repeat", "until", "reset", "limits", "rules",
                                        "hotplug_mode", CANARY]), data, max_size=6),
       st.lists(st.fixed_dictionaries({}, optional={k: data for k in STEP_NAMES}), max_size=4))
def test_any_structure_is_a_scenario_or_a_spec_error(head: dict[str, Any],
                                                       steps: list[dict[str, Any]]) -> None:
    doc = {"name": "t", **head, "steps": steps}
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    _validate(text)


@SETTINGS
@given(st.sampled_from(sorted(MODELS)), st.lists(st.text(max_size=30), max_size=4))
def test_device_properties_are_allowed_or_refused(model: str, keys: list[str]) -> None:
    try:
        check_user_props(model, keys)
    except SpecError:
        pass


@SETTINGS
@given(st.text(max_size=80))
def test_device_specs_parse_or_refuse(text: str) -> None:
    try:
        spec = DeviceSpec.parse(text)
    except ConfigError:
        return
    assert spec.name and spec.identity


@SETTINGS
@given(st.one_of(st.text(max_size=30), st.integers(), st.floats()))
def test_durations_and_sizes_parse_or_refuse(value: Any) -> None:
    for parse in (Duration.parse, parse_size):
        try:
            parse(value)
        except SpecError:
            pass
