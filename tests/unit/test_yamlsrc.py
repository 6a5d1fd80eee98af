"""vdevice.yamlsrc: positions, duplicate keys, syntax errors, pydantic error mapping."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from pydantic import BaseModel, ConfigDict, Strict, field_validator

from vdevice.errors import SpecError
from vdevice.yamlsrc import Located, format_path, load, spec_error, suggest, unknown, validate

TEXT = """\
name: demo
steps:
  - plug: {device: snd0, port: rp1}
  - rebalance:
      trigger: rescna
      device: snd0
limits:
  a: 1
"""


def test_load_gives_plain_data_and_lines() -> None:
    loc = load(TEXT, "x.yaml")
    assert loc.data["steps"][1]["rebalance"]["trigger"] == "rescna"
    assert loc.line_of(("name",)) == 1
    assert loc.line_of(("steps", 0)) == 3
    assert loc.line_of(("steps", 0, "plug", "port")) == 3
    assert loc.line_of(("steps", 1, "rebalance", "trigger")) == 5
    # a mapping value that is a block points at its key's line
    assert loc.line_of(("steps", 1, "rebalance")) == 4
    assert loc.line_of(("limits", "a")) == 8


def test_missing_path_uses_nearest_ancestor() -> None:
    loc = load(TEXT, "x.yaml")
    assert loc.line_of(("steps", 1, "rebalance", "size")) == 4
    assert loc.line_of(("nope", 3, "x")) == 1        # root
    assert not loc.has(("steps", 1, "rebalance", "size"))


def test_error_names_file_line_field() -> None:
    loc = load(TEXT, "scenarios/x.yaml")
    err = loc.error(unknown("trigger", "rescna", ["pressure", "rescan", "resize"]),
                    ("steps", 1, "rebalance", "trigger"))
    assert str(err) == ("scenarios/x.yaml:5: steps[1].rebalance.trigger: unknown trigger "
                        "'rescna'; did you mean 'rescan'? (expected one of: pressure, rescan, "
                        "resize)")
    assert (err.file, err.line, err.field) == ("scenarios/x.yaml", 5, "steps[1].rebalance.trigger")


def test_sub_view_keeps_full_paths() -> None:
    loc = load(TEXT, "x.yaml")
    sub = loc.at(("steps", 1, "rebalance"))
    assert sub.data == {"trigger": "rescna", "device": "snd0"}
    err = sub.error("bad", ("device",))
    assert (err.line, err.field) == (6, "steps[1].rebalance.device")
    assert sub.line_of() == 4


def test_format_path_quotes_odd_keys() -> None:
    assert format_path(("steps", 3, "plug", "device")) == "steps[3].plug.device"
    assert format_path(("limits", "a b")) == "limits['a b']"
    assert format_path(()) == ""
    assert format_path((0, "x")) == "[0].x"


def test_duplicate_key_names_both_lines() -> None:
    with pytest.raises(SpecError) as ei:
        load("name: a\nseed: 1\nsteps: []\nseed: 2\n", "d.yaml")
    e = ei.value
    assert (e.file, e.line, e.field) == ("d.yaml", 4, "seed")
    assert "first at line 2, again at line 4" in e.bare_message


def test_duplicate_key_nested_flow() -> None:
    with pytest.raises(SpecError) as ei:
        load("a:\n  - {x: 1, y: 2, x: 3}\n", "d.yaml")
    assert (ei.value.line, ei.value.field) == (2, "a[0].x")


@pytest.mark.parametrize("text,line,needle", [
    ("a: [1, 2\nb: 3\n", 2, "flow sequence started at line 1"),
    ("a:\n\tb: 1\n", 2, "tabs"),
    ("a: 1\n---\nb: 2\n", 2, "single document"),
    ("a: 'unterminated\n", 2, "quoted scalar"),
    ("a: 1\n b: 2\n", 2, "mapping values are not allowed"),
])
def test_syntax_errors_have_lines(text: str, line: int, needle: str) -> None:
    with pytest.raises(SpecError) as ei:
        load(text, "s.yaml")
    assert ei.value.line == line
    assert ei.value.file == "s.yaml"
    assert needle in str(ei.value)
    assert "YAML syntax error" in str(ei.value)


def test_keys_must_be_plain() -> None:
    with pytest.raises(SpecError, match="plain names"):
        load("? [a, b]\n: 1\n", "k.yaml")
    with pytest.raises(SpecError, match="quote it") as ei:
        load("x: 1\non: 2\n", "k.yaml")
    assert ei.value.line == 2


def test_recursive_alias_is_refused() -> None:
    with pytest.raises(SpecError, match="recursive"):
        load("a: &x [1, *x]\n", "r.yaml")


def test_aliases_and_merge_keys() -> None:
    text = "base: &b {model: AC97, port: rp1}\nplug:\n  <<: *b\n  port: rp2\n  device: s\n"
    loc = load(text, "m.yaml")
    assert loc.data["plug"] == {"port": "rp2", "device": "s", "model": "AC97"}
    assert loc.line_of(("plug", "port")) == 4


def test_empty_document_is_none() -> None:
    loc = load("# only a comment\n", "e.yaml")
    assert loc.data is None
    assert loc.line_of(()) is None


def test_scalar_types_follow_yaml() -> None:
    loc = load("i: 3\nf: 0.5\nb: true\nn: null\ns: '3'\nh: 0x10\n", "t.yaml")
    assert loc.data == {"i": 3, "f": 0.5, "b": True, "n": None, "s": "3", "h": 16}


def test_with_data_keeps_positions() -> None:
    loc = load(TEXT, "x.yaml")
    other = loc.with_data({"name": "other"})
    assert other.data == {"name": "other"}
    assert other.line_of(("steps", 1)) == 4


def test_relocate_fills_only_unknowns() -> None:
    loc = load(TEXT, "x.yaml")
    e = loc.relocate(SpecError("bad size"), ("limits", "a"))
    assert (e.file, e.line, e.field) == ("x.yaml", 8, "limits.a")
    e2 = loc.relocate(SpecError("bad", file="other.yaml", line=3), ("limits",))
    assert (e2.file, e2.line) == ("other.yaml", 3)


def test_suggest_and_unknown() -> None:
    assert suggest("rescna", ["pressure", "rescan"]) == "rescan"
    assert suggest("zzz", ["pressure", "rescan"]) is None
    assert unknown("x", "q", []) == "unknown x 'q' (there are none to choose from)"
    assert "did you mean" not in unknown("x", "zzz", ["a", "b"])


# ---- pydantic mapping ---------------------------------------------------------------------

class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Annotated[str, Strict()]
    count: Annotated[int, Strict()] = 1
    mode: Literal["acpi", "native"] = "acpi"

    @field_validator("count")
    @classmethod
    def _pos(cls, v: int) -> int:
        if v < 1:
            raise ValueError("count must be >= 1")
        return v


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Strict()]
    items: list[Inner] = []
    value: Annotated[int, Strict()] | Annotated[str, Strict()] = 0


DOC = """\
name: demo
items:
  - device: a
  - device: b
    count: 0
"""


def _err(text: str) -> SpecError:
    with pytest.raises(SpecError) as ei:
        validate(Outer, load(text, "p.yaml"))
    return ei.value


def test_validate_ok() -> None:
    m = validate(Outer, load("name: x\nitems: [{device: a}]\n", "p.yaml"))
    assert m.items[0].device == "a"


def test_value_error_at_its_line() -> None:
    e = _err(DOC)
    assert (e.line, e.field) == (5, "items[1].count")
    assert e.bare_message == "count must be >= 1"


def test_wrong_type() -> None:
    e = _err("name: 5\n")
    assert (e.line, e.field, e.bare_message) == (1, "name", "expected a string, got 5")


def test_missing_field_points_at_parent() -> None:
    e = _err("name: x\nitems:\n  - count: 2\n")
    assert (e.line, e.field, e.bare_message) == (3, "items[0].device", "required field is missing")


def test_extra_field_suggests() -> None:
    e = _err("name: x\nitems:\n  - device: a\n    cuont: 2\n")
    assert (e.line, e.field) == (4, "items[0].cuont")
    assert "did you mean 'count'?" in e.bare_message


def test_literal_suggests() -> None:
    e = _err("name: x\nitems:\n  - {device: a, mode: natvie}\n")
    assert e.field == "items[0].mode"
    assert "unknown value 'natvie'; did you mean 'native'?" in e.bare_message


def test_union_errors_merge() -> None:
    e = _err("name: x\nvalue: [1]\n")
    assert (e.line, e.field) == (2, "value")
    assert e.bare_message == "expected an integer or a string, got a list"


def test_several_errors_are_listed() -> None:
    e = _err("name: 1\nitems:\n  - {device: 2}\n")
    assert e.line == 1
    assert "also p.yaml:3: items[0].device: expected a string" in e.bare_message


def test_spec_error_direct() -> None:
    from pydantic import ValidationError
    loc = load("name: x\nitems: [{device: a, count: 0}]\n", "q.yaml")
    try:
        Outer.model_validate(loc.data)
    except ValidationError as exc:
        err = spec_error(exc, loc, Outer)
    assert (err.line, err.field) == (2, "items[0].count")


def test_validate_at_path() -> None:
    loc = load("outer:\n  name: x\n  items: [{device: 3}]\n", "q.yaml")
    with pytest.raises(SpecError) as ei:
        validate(Outer, loc, ("outer",))
    assert (ei.value.line, ei.value.field) == (3, "outer.items[0].device")
    assert isinstance(loc.at(("outer",)), Located)
