"""Scenario validation: every bad input is a SpecError naming file, line and field."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.scenario import (AssertAudio, AssertCount, AssertNoKind, AssertRule, Guest, Jitter,
                          Parallel, Pause, Plug, RebalanceCpuHotplug, RebalancePressure,
                          RebalanceReconfigure, RebalanceRescan, RebalanceResize, Resume, Sleep,
                          Unplug, WaitEvent, WaitGuest, WaitJob, WaitQmp, validate_file,
                          validate_text, walk)
from lab.scenario.units import Duration
from lab.events import Kind
from vdevice.errors import SpecError
from vdevice.yamlsrc import Located

DATA = Path(__file__).parent / "data" / "scenarios"
REPO = Path(__file__).resolve().parents[2]
FILE = "scenarios/x.yaml"


class FakeTopology:
    """Stands in for the lead's vdevice topology: only the ids matter here."""

    def __init__(self, ports: list[str], devices: list[str]) -> None:
        self.ports, self.devices = ports, devices

    def device_ids(self) -> list[str]:
        return list(self.devices)

    def port_ids(self) -> list[str]:
        return list(self.ports)


class Resolver:
    """Records calls; ``default`` has rp1..rp4; files are read as {ports, devices}."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, Located]] = []

    def __call__(self, ref: str | Path | Mapping[str, Any], located: Located) -> FakeTopology:
        self.calls.append((ref, located))
        if isinstance(ref, Path):
            d = yaml.safe_load(ref.read_text())
            return FakeTopology(d.get("ports", []), d.get("devices", []))
        if isinstance(ref, Mapping):
            if "bad" in ref:
                raise SpecError("nope", field="bad.x")
            if "ports" not in ref:
                raise SpecError("a topology needs ports", field="ports")
            # the topology file's long form ({id: ...} per item) as well as bare ids
            ids = [x["id"] if isinstance(x, Mapping) else x for x in ref.get("devices", [])]
            ports = [x["id"] if isinstance(x, Mapping) else x for x in ref["ports"]]
            return FakeTopology(ports, ids)
        if ref == "default":
            return FakeTopology(["rp1", "rp2", "rp3", "rp4"], [])
        raise SpecError(f"unknown built-in topology {ref!r}")


def check(text: str, **kw: Any) -> Any:
    return validate_text(text, FILE, Resolver(), base_dir=DATA, **kw)


def err(text: str, **kw: Any) -> SpecError:
    with pytest.raises(SpecError) as ei:
        check(text, **kw)
    return ei.value


HEAD = "name: t\nparameters:\n  delay_ms: {range: [0, 400, 100]}\nsteps:\n  - sleep: ${delay_ms}ms\n"
PLUG = "  - plug: {device: snd0, model: AC97, port: rp1}\n"

# (case id, yaml, line, field, message substring)
BAD: list[tuple[str, str, int | None, str | None, str]] = [
    ("unknown step", HEAD + "  - plgu: {device: snd0}\n", 6, "steps[1].plgu",
     "unknown step type 'plgu'; did you mean 'plug'?"),
    ("unknown trigger", HEAD + PLUG + "  - rebalance:\n      trigger: rescna\n      device: snd0\n",
     8, "steps[2].rebalance.trigger", "unknown trigger 'rescna'; did you mean 'rescan'? "
     "(expected one of: pressure, rescan, cpu-hotplug, reconfigure, resize, wdtf)"),
    ("no trigger", HEAD + PLUG + "  - rebalance: {device: snd0}\n", 7, "steps[2].rebalance",
     "rebalance needs a trigger"),
    ("wrong type props", HEAD + "  - plug: {device: snd0, model: AC97, port: rp1, props: {x: [1]}}\n",
     6, "steps[1].plug.props.x", "expected a string, an integer or true or false, got a list"),
    ("wrong type bool", HEAD + "  - guest: {run: ls, background: maybe, name: x}\n", 6,
     "steps[1].guest.background", "expected true or false, got 'maybe'"),
    ("wrong type top", HEAD + "repeat: many\n", 6, "repeat", "expected an integer, got 'many'"),
    ("seed negative", HEAD + "seed: -1\n", 6, "seed", "seed must be 0"),
    ("repeat zero", HEAD + "repeat: 0\n", 6, "repeat", "repeat must be 1 .. 100000"),
    ("missing ref", HEAD + "  - unplug: snd0\n", 6, "steps[1].unplug.device",
     "unknown device 'snd0'; declare it in the topology or plug it in an earlier step"),
    ("ref plugged later", HEAD + "  - unplug: snd0\n" + PLUG, 6, "steps[1].unplug.device",
     "it is plugged only later (line 7)"),
    ("ref suggestion", HEAD + PLUG + "  - wait: {event: bound, device: snd9}\n", 7,
     "steps[2].wait.device", "unknown device 'snd9'; did you mean 'snd0'?"),
    ("count ref", HEAD + "  - assert: {count: {kind: probe-enter, device: x, eq: 1}}\n", 6,
     "steps[1].assert.count.device", "unknown device 'x'"),
    ("unknown port", HEAD + "  - plug: {device: snd0, model: AC97, port: rp9}\n", 6,
     "steps[1].plug.port", "unknown port 'rp9'"),
    ("needs model", HEAD + "  - plug: {device: snd0, port: rp1}\n", 6, "steps[1].plug",
     "device 'snd0' is not in the topology, so plug needs its model"),
    ("double plug", HEAD + PLUG + PLUG, 7, "steps[2].plug.device",
     "device 'snd0' is already plugged (at line 6)"),
    ("unknown param", HEAD + "  - sleep: ${dealy_ms}ms\n", 6, "steps[1].sleep",
     "unknown parameter 'dealy_ms'; did you mean 'delay_ms'?"),
    ("shell var", HEAD + "  - guest: 'echo ${HOME}'\n", 6, "steps[1].guest",
     "write $${HOME} for a literal ${HOME}"),
    ("unclosed", HEAD + "  - guest: 'echo ${delay_ms'\n", 6, "steps[1].guest", "unclosed '${'"),
    ("bad ref syntax", HEAD + "  - guest: 'echo ${1x}'\n", 6, "steps[1].guest",
     "is not a parameter reference"),
    ("param outside steps", HEAD + "limits: {remove_max_ms: '${delay_ms}'}\n", 6,
     "limits.remove_max_ms", "parameters are substituted only inside steps"),
    ("unused param", "name: t\nparameters:\n  x: [1, 2]\nsteps:\n  - sleep: 1s\n", 3,
     "parameters.x", "parameter 'x' is declared but no step uses it"),
    ("duplicate key", "name: t\nseed: 1\nsteps:\n  - sleep: 1s\nseed: 2\n", 5, "seed",
     "duplicate key 'seed' (first at line 2, again at line 5)"),
    ("duration no unit", HEAD + "  - sleep: 250\n", 6, "steps[1].sleep",
     "a duration needs a unit: write 250ms or 250s"),
    ("duration bad unit", HEAD + "  - sleep: 5sec\n", 6, "steps[1].sleep", "unknown unit 'sec'"),
    ("duration negative", HEAD + "  - sleep: -5ms\n", 6, "steps[1].sleep", "is negative"),
    ("duration huge", HEAD + "  - sleep: 2000min\n", 6, "steps[1].sleep", "longer than a day"),
    ("duration garbage", HEAD + "  - wait: {event: bound, timeout: soon}\n", 6,
     "steps[1].wait.timeout", "cannot read duration 'soon'"),
    ("ms twin not number", HEAD + "  - wait: {event: bound, timeout_ms: 5s}\n", 6,
     "steps[1].wait.timeout_ms", "expected a number of milliseconds"),
    ("ms twin and plain", HEAD + "  - wait: {event: bound, timeout: 1s, timeout_ms: 5}\n", 6,
     "steps[1].wait", "give either timeout or timeout_ms, not both"),
    ("size not pow2", HEAD + "  - plug: {device: p, model: pci-testdev, port: rp1, size: 48M}\n",
     6, "steps[1].plug.size", "is not a power of two; PCI BARs are naturally aligned"),
    ("size unit", HEAD + "  - plug: {device: p, model: pci-testdev, port: rp1, size: 48Q}\n", 6,
     "steps[1].plug.size", "cannot read size '48Q'"),
    ("size too big", HEAD + PLUG + "  - rebalance: {trigger: resize, device: snd0, size: 4T}\n",
     7, "steps[2].rebalance.size", "larger than the guest's"),
    ("model unknown", HEAD + "  - plug: {device: c, model: AC98, port: rp1}\n", 6,
     "steps[1].plug.model", "unknown device model 'AC98' (did you mean 'AC97'?)"),
    ("codec hotplug", HEAD + "  - plug: {device: c, model: hda-duplex, port: rp1}\n", 6,
     "steps[1].plug.model", "cannot be hot-plugged"),
    ("extra field", HEAD + "  - plug: {device: snd0, model: AC97, port: rp1, devcie: x}\n", 6,
     "steps[1].plug.devcie", "unknown field 'devcie'; did you mean 'device'?"),
    ("top extra", HEAD + "repaet: 3\n", 6, "repaet", "unknown field 'repaet'; did you mean 'repeat'?"),
    ("missing top", "steps:\n  - sleep: 1s\n", 1, "name", "required field is missing"),
    ("missing field", HEAD + PLUG + "  - rebalance:\n      trigger: resize\n      device: snd0\n",
     7, "steps[2].rebalance.size", "required field is missing"),
    ("bad kind", HEAD + "  - wait: {event: boudn}\n", 6, "steps[1].wait.event",
     "unknown event kind 'boudn'; did you mean 'bound'?"),
    ("bad source", HEAD + "  - wait: {event: bound, source: guest.kernle}\n", 6,
     "steps[1].wait.source", "did you mean 'guest.kernel'?"),
    ("bad qmp", HEAD + "  - wait: {qmp: device_deleted}\n", 6, "steps[1].wait.qmp",
     "is not a QMP event name"),
    ("wait none", HEAD + "  - wait: {timeout: 1s}\n", 6, "steps[1].wait",
     "wait needs one of: event, qmp, guest, job"),
    ("wait typo", HEAD + "  - wait: {evnt: bound}\n", 6, "steps[1].wait.evnt",
     "unknown wait kind 'evnt'; did you mean 'event'?"),
    ("wait two", HEAD + "  - wait: {event: bound, qmp: DEVICE_DELETED}\n", 6,
     "steps[1].wait.qmp", "found event and qmp"),
    ("assert two", HEAD + "  - assert: {rule: a, no_kind: kernel-oops}\n", 6,
     "steps[1].assert.no_kind", "assert takes one of"),
    ("count bounds", HEAD + "  - assert: {count: {kind: probe-enter, min: 3, max: 1}}\n", 6,
     "steps[1].assert.count", "count min 3 is above max 1"),
    ("count none", HEAD + "  - assert: {count: {kind: probe-enter}}\n", 6,
     "steps[1].assert.count", "count needs eq, or min and/or max"),
    ("audio empty", HEAD + "  - assert: {audio: {}}\n", 6, "steps[1].assert.audio",
     "audio needs max_gap"),
    ("indentation", HEAD + "  - plug:\n    device: snd0\n", 7, "steps[1].device",
     "are the fields of 'plug' indented under it?"),
    ("two types", HEAD + "  - {sleep: 1s, pause: {}}\n", 6, "steps[1].pause",
     "put each step in its own '- ' item"),
    ("step not mapping", HEAD + "  - sleep\n", 6, "steps[1]", "a step is a mapping with one key"),
    ("steps empty", "name: t\nsteps: []\n", 2, "steps", "at least one step"),
    ("pause args", HEAD + "  - pause: {for: 1s}\n", 6, "steps[1].pause", "pause takes no arguments"),
    ("guest both", HEAD + "  - guest: {run: ls, argv: [ls]}\n", 6, "steps[1].guest",
     "exactly one of run"),
    ("bg no name", HEAD + "  - guest: {run: ls, background: true}\n", 6, "steps[1].guest",
     "a background command needs a name"),
    ("job before start", HEAD + "  - wait: {job: play}\n", 6, "steps[1].wait.job",
     "no background command 'play' has been started"),
    ("job dup", HEAD + "  - guest: {run: a, background: true, name: j}\n"
     "  - guest: {run: b, background: true, name: j}\n", 7, "steps[2].guest.name",
     "name 'j' is already used"),
    ("jitter delay given", HEAD + "  - jitter: {max: 5ms, delay: 1ms}\n", 6,
     "steps[1].jitter.delay", "drawn from the iteration seed"),
    ("jitter bounds", HEAD + "  - jitter: {min: 5ms, max: 1ms}\n", 6, "steps[1].jitter",
     "jitter min 5ms is above max 1ms"),
    ("parallel one", HEAD + "  - parallel: {a: [{sleep: 1s}]}\n", 6, "steps[1].parallel",
     "at least two branches"),
    ("parallel conflict", HEAD + "  - parallel:\n      a:\n        - plug: {device: snd0, model: "
     "AC97, port: rp1}\n      b:\n        - plug: {device: snd0, model: AC97, port: rp2}\n", 6,
     "steps[1].parallel", "branches 'a' and 'b' both plug or unplug device 'snd0'"),
    ("parallel cross-branch", HEAD + "  - parallel:\n      - - plug: {device: snd0, model: AC97, "
     "port: rp1}\n      - - unplug: snd0\n", 8, "steps[1].parallel[1][0].unplug.device",
     "unknown device 'snd0'"),
    ("parallel branch type", HEAD + "  - parallel: [{sleep: 1s}, {sleep: 2s}]\n", 6,
     "steps[1].parallel[0]", "each parallel branch is a list of steps"),
    ("pressure placement+port", HEAD + PLUG + "  - rebalance: {trigger: pressure, device: snd0, "
     "placement: root, port: rp2}\n", 7, "steps[2].rebalance", "give placement or port"),
    ("pressure id clash", HEAD + PLUG + "  - plug: {device: p0, model: AC97, port: rp2}\n"
     "  - rebalance: {trigger: pressure, device: snd0, id: p0}\n", 8, "steps[3].rebalance.id",
     "device 'p0' is already plugged"),
    ("reconfigure nothing", HEAD + PLUG + "  - rebalance: {trigger: reconfigure, device: snd0}\n",
     7, "steps[2].rebalance", "needs a new model or props"),
    ("cpu count", HEAD + "  - rebalance: {trigger: cpu-hotplug, count: 100}\n", 6,
     "steps[1].rebalance.count", "count must be 1..64"),
    ("wait text regex", HEAD + "  - wait: {event: kernel-log, text: '(unclosed'}\n", 6,
     "steps[1].wait.text", "not a valid regular expression"),
    ("module name", HEAD + "  - module: {name: 'rm -rf /'}\n", 6, "steps[1].module.name",
     "is not a kernel module name"),
    ("module param name", HEAD + "  - module: {name: m, params: {'a b': 1}}\n", 6,
     "steps[1].module.params", "not a module parameter name"),
    ("module param value", HEAD + "  - module: {name: m, params: {a: [1]}}\n", 6,
     "steps[1].module.params.a", ""),
    ("module unload params", HEAD + "  - module: {name: m, unload: true, params: {a: 1}}\n", 6,
     "steps[1].module", "unload takes no params"),
    ("module typo", HEAD + "  - module: {name: m, relaod: false}\n", 6,
     "steps[1].module.relaod", "did you mean 'reload'"),
    ("bad id", HEAD + "  - plug: {device: 0snd, model: AC97, port: rp1}\n", 6,
     "steps[1].plug.device", "not a valid QEMU id"),
    ("bad name", "name: My Scenario\nsteps:\n  - sleep: 1s\n", 1, "name", "is not a valid name"),
    ("hotplug mode", HEAD + "hotplug_mode: natvie\n", 6, "hotplug_mode",
     "unknown value 'natvie'; did you mean 'native'?"),
    ("reset", HEAD + "reset: rebot\n", 6, "reset", "did you mean 'reboot'?"),
    ("until", HEAD + "until: forever\n", 6, "until", "until takes 'fail' or {failures: N}"),
    ("until zero", HEAD + "until: {failures: 0}\n", 6, "until.failures", "failures must be >= 1"),
    ("guest windows no image", HEAD + "guest: windows\n", 6, "guest",
     "a Windows guest needs an image"),
    ("guest linux winrm", HEAD + "guest: {os: linux, agent: winrm}\n", 6, "guest",
     "reached over ssh"),
    ("guest os", HEAD + "guest: {os: macos}\n", 6, "guest.os", "unknown value 'macos'"),
    ("limits typo", HEAD + "limits: {query_stop_max: 5}\n", 6, "limits.query_stop_max",
     "did you mean 'query_stop_max_ms'?"),
    ("limits negative", HEAD + "limits: {remove_max_ms: -1}\n", 6, "limits.remove_max_ms",
     "must be >= 0"),
    ("limits duration", HEAD + "limits: {remove_max_ms: 5 sec}\n", 6, "limits.remove_max_ms",
     "unknown unit 'sec'"),
    ("limits key", HEAD + "limits: {Remove: 1}\n", 6, "limits.Remove", "lower_case"),
    ("param bad name", "name: t\nparameters:\n  1x: [1]\nsteps:\n  - sleep: 1s\n", 3,
     "parameters['1x']", "parameter name '1x'"),
    ("param empty list", "name: t\nparameters:\n  x: []\nsteps:\n  - sleep: ${x}s\n", 3,
     "parameters.x", "needs a non-empty list"),
    ("param dup value", "name: t\nparameters:\n  x: [1, 2, 1]\nsteps:\n  - sleep: ${x}s\n", 3,
     "parameters.x[2]", "value 1 is listed twice"),
    ("param mapping value", "name: t\nparameters:\n  x: [{a: 1}]\nsteps:\n  - sleep: ${x}s\n", 3,
     "parameters.x[0]", "plain values"),
    ("range step", "name: t\nparameters:\n  x: {range: [0, 10, 0]}\nsteps:\n  - sleep: ${x}s\n",
     3, "parameters.x.range[2]", "step must be > 0"),
    ("range reversed", "name: t\nparameters:\n  x: {range: [10, 0, 1]}\nsteps:\n  - sleep: ${x}s\n",
     3, "parameters.x.range[1]", "below start"),
    ("range text", "name: t\nparameters:\n  x: {range: [0, 10ms, 1]}\nsteps:\n  - sleep: ${x}s\n",
     3, "parameters.x.range[1]", "units belong in the steps"),
    ("range huge", "name: t\nparameters:\n  x: {range: [0, 1000000]}\nsteps:\n  - sleep: ${x}s\n",
     3, "parameters.x.range", "surely a mistake"),
    ("random shape", "name: t\nparameters:\n  x: {random: [1]}\nsteps:\n  - sleep: ${x}s\n", 3,
     "parameters.x.random", "random is [low, high]"),
    ("random reversed", "name: t\nparameters:\n  x: {random: [5, 1]}\nsteps:\n  - sleep: ${x}s\n",
     3, "parameters.x.random[1]", "below low"),
    ("param kind", "name: t\nparameters:\n  x: {rnage: [0, 1]}\nsteps:\n  - sleep: ${x}s\n", 3,
     "parameters.x.rnage", "did you mean 'range'?"),
    ("value makes step invalid", "name: t\nparameters:\n  d: [10, -5]\nsteps:\n  - sleep: ${d}ms\n",
     5, "steps[0].sleep", "duration '-5ms' is negative; durations are >= 0 (with d=-5)"),
    ("value makes ref invalid", "name: t\nparameters:\n  dev: [snd0, snd1]\nsteps:\n" + PLUG +
     "  - unplug: ${dev}\n", 6, "steps[1].unplug.device", "unknown device 'snd1'; did you mean "
     "'snd0'? (expected one of: snd0); declare it in the topology or plug it in an earlier step "
     "(with dev=snd1)"),
    ("random bound invalid", "name: t\nparameters:\n  n: {random: [1, 70]}\nsteps:\n"
     "  - rebalance: {trigger: cpu-hotplug, count: '${n}'}\n", 5, "steps[0].rebalance.count",
     "count must be 1..64, got 70 (with n=70)"),
    ("topology missing file", "name: t\ntopology: topologies/nope.yaml\nsteps:\n  - sleep: 1s\n",
     2, "topology", "topology file 'topologies/nope.yaml' not found"),
    ("topology resolver error", "name: t\ntopology: nosuch\nsteps:\n  - sleep: 1s\n", 2,
     "topology", "unknown built-in topology 'nosuch'"),
    ("topology inline error", "name: t\ntopology:\n  devices: [a]\nsteps:\n  - sleep: 1s\n", 2,
     "topology.ports", "a topology needs ports"),
    ("topology inline error deep", "name: t\ntopology:\n  ports: [rp1]\n  devices: [a]\n"
     "  bad: {x: 1}\nsteps:\n  - sleep: 1s\n", 5, "topology.bad.x", "nope"),
    ("topology type", "name: t\ntopology: [a]\nsteps:\n  - sleep: 1s\n", 2, "topology",
     "expected a string or a mapping"),
    ("yaml syntax", HEAD + "  - sleep: [1s\n", 7, None, "YAML syntax error"),
    ("not a mapping", "- a\n", 1, None, "a scenario file is a mapping"),
]


@pytest.mark.parametrize("text,line,field,needle", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_is_located(text: str, line: int | None, field: str | None, needle: str) -> None:
    e = err(text)
    assert e.file == FILE
    assert e.line == line, str(e)
    assert e.field == field, str(e)
    assert needle in e.bare_message, str(e)
    assert str(e).startswith(f"{FILE}:{line}: " + (f"{field}: " if field else ""))


def test_unknown_rule_when_rules_are_known() -> None:
    e = err(HEAD + "  - assert: {rule: linux-drvier}\n", known_rules=["linux-driver", "timing"])
    assert (e.line, e.field) == (6, "steps[1].assert.rule")
    assert "did you mean 'linux-driver'?" in e.bare_message
    e = err(HEAD + "rules: [timing, kernel-ops]\n", known_rules=["kernel-oops", "timing"])
    assert (e.line, e.field) == (6, "rules[1]")
    check(HEAD + "  - assert: {rule: anything}\n", known_rules=None)   # None: unchecked


def test_rules_and_limits_default_to_the_rules_engine() -> None:
    from lab.rules.base import Limits, known_ids
    assert "linux-driver" in known_ids() and "remove_max_ms" in Limits.__dataclass_fields__
    sc = check(HEAD + "rules: [linux-driver, 'pnp.*', kernel-oops]\n"
               "limits: {remove_max_ms: 250ms, query_stop_max_ms: 50}\n"
               "  # comment\n")
    assert sc.rules == ("linux-driver", "pnp.*", "kernel-oops")
    assert sc.limits == {"remove_max_ms": 250.0, "query_stop_max_ms": 50.0}
    e = err(HEAD + "rules: ['pnp.nothing*']\n")
    assert (e.line, e.field) == (6, "rules[0]") and "unknown rule 'pnp.nothing*'" in e.bare_message
    e = err(HEAD + "  - assert: {rule: linux-drvier}\n")
    assert e.field == "steps[1].assert.rule" and "did you mean 'linux-driver'?" in e.bare_message
    e = err(HEAD + "limits: {audio_gap_max_ms: 300}\n")
    assert (e.line, e.field) == (6, "limits.audio_gap_max_ms")
    assert "unknown limit 'audio_gap_max_ms'" in e.bare_message
    e = err(HEAD + "rules: [Linux Driver]\n")
    assert e.field == "rules[0]" and "is not a rule id or pattern" in e.bare_message


def test_limits_typo_guard_without_the_rules_engine() -> None:
    sc = check(HEAD + "limits: {custom_count: 3, queue_max_ms: 5ms}\n", known_limits=None)
    assert sc.limits == {"custom_count": 3.0, "queue_max_ms": 5.0}
    e = err(HEAD + "limits: {remove_max: 3}\n", known_limits=None)
    assert "did you mean 'remove_max_ms'?" in e.bare_message


# ---- files --------------------------------------------------------------------------------

BAD_FILES = sorted((DATA / "bad").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD_FILES, ids=[p.stem for p in BAD_FILES])
def test_bad_files(path: Path) -> None:
    first = path.read_text().splitlines()[0]
    m = re.match(r"# expect: (\d+) (\S+): (.*)$", first)
    assert m, f"{path.name} needs an '# expect: LINE FIELD: message' first line"
    with pytest.raises(SpecError) as ei:
        validate_file(path, Resolver())
    e = ei.value
    assert e.file == str(path)
    assert (e.line, e.field) == (int(m[1]), m[2]), str(e)
    assert m[3] in e.bare_message, str(e)


WINDOWS = ("name: w\ntopology: default\nguest: {os: windows, image: images/win.qcow2, "
           "agent: ssh}\nsteps:\n  - plug: {device: snd0, model: AC97, port: rp1}\n")


def test_windows_guest_long_form_resolves_the_image() -> None:
    sc = validate_text(WINDOWS + "  - sleep: 1ms\n", str(DATA / "w.yaml"),
                       Resolver(), base_dir=DATA)
    assert sc.guest.os == "windows" and sc.guest.agent_kind == "ssh"
    assert sc.guest.image == str((DATA / "images" / "win.qcow2").resolve())


@pytest.mark.parametrize("field,value", [
    ("topology", "../topologies/x.yaml"), ("topology", "/etc/passwd.yaml"),
    ("guest", "windows:../../images/win.qcow2"), ("guest", "windows:/dev/sda"),
])
def test_scenario_paths_stay_inside_its_directory(field: str, value: str) -> None:
    """A scenario from someone else cannot make the lab read a host file (a topology
    whose content would reach an error) or hand one to QEMU (an image)."""
    text = f"name: t\n{field}: \"{value}\"\nsteps:\n  - sleep: 1ms\n"
    with pytest.raises(SpecError, match="must be inside the scenario's directory") as ei:
        validate_text(text, str(DATA / "t.yaml"), Resolver(), base_dir=DATA)
    assert ei.value.line == 2 and "root:" not in str(ei.value)


def test_a_symlink_out_of_the_scenario_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "topo.yaml").symlink_to("/etc/passwd")
    with pytest.raises(SpecError, match="must be inside the scenario's directory"):
        validate_text("name: t\ntopology: topo.yaml\nsteps:\n  - sleep: 1ms\n",
                      str(tmp_path / "t.yaml"), Resolver(), base_dir=tmp_path)


@pytest.mark.parametrize("step,needle", [
    ("  - rebalance: {trigger: rescan, device: snd0}\n", "trigger: wdtf"),
    ("  - module: {name: rebalab_testdrv}\n", "rebalab image windows --driver"),
    ("  - parallel:\n      a: [{sleep: 1ms}]\n      b: [{module: m}]\n", "Linux kernel module"),
])
def test_linux_only_steps_are_refused_for_windows_with_their_line(step: str, needle: str) -> None:
    with pytest.raises(SpecError) as e:
        validate_text(WINDOWS + step, FILE, Resolver(), base_dir=DATA)
    assert e.value.line == (8 if "parallel" in step else 6), str(e.value)
    assert "not for a windows guest" in str(e.value) and needle in str(e.value)
    assert str(e.value).startswith(f"{FILE}:{e.value.line}: steps[1]")


def test_full_file_every_step_kind() -> None:
    res = Resolver()
    sc = validate_file(DATA / "full.yaml", res)
    ref, located = res.calls[0]
    assert ref == (DATA / "topologies" / "small.yaml").resolve()
    assert located.line_of() == 4 and located.field() == "topology"
    assert sc.guest.os == "linux" and sc.guest.agent_kind == "ssh"
    assert sc.hotplug_mode == "native" and sc.reset == "replug" and sc.until is not None
    assert sc.until.failures == 2
    assert sc.limits == {"query_stop_max_ms": 50.0, "remove_max_ms": 1000.0,
                         "cancel_stop_max_ms": 20.0}
    assert sc.rules == ("linux-driver",)
    it = sc.sweep().iteration(0)
    kinds = [type(s) for s in walk(it.steps)]
    for cls in (Plug, Unplug, RebalancePressure, RebalanceRescan, RebalanceCpuHotplug,
                RebalanceReconfigure, RebalanceResize, Guest, Sleep, Jitter, Pause, Resume,
                WaitEvent, WaitQmp, WaitGuest, WaitJob, AssertRule, AssertNoKind, AssertAudio,
                AssertCount, Parallel):
        assert cls in kinds, cls
    json.dumps(sc.to_json())
    json.dumps([s.to_yaml() for s in it.steps])


def test_concrete_step_values() -> None:
    sc = validate_file(DATA / "full.yaml", Resolver())
    it = sc.sweep().iteration(1)        # delay_ms=0, model=ES1370
    steps = it.steps
    plug = steps[0]
    assert isinstance(plug, Plug) and plug.model == "ES1370"
    assert plug.port in ("rp1", "rp2") and plug.port == it.parameters["port"]
    assert plug.line == 19 and plug.path == "steps[0]" and plug.where.endswith("full.yaml:19")
    assert isinstance(steps[1], Plug) and steps[1].device == "cold0" and steps[1].model is None
    w = steps[2]
    assert isinstance(w, WaitEvent) and w.event is Kind.BOUND and w.timeout == Duration(10 * 10**9)
    q = steps[3]
    assert isinstance(q, WaitQmp) and q.timeout is not None and q.timeout.ms == 2500
    g = steps[5]
    assert isinstance(g, Guest) and g.run == "echo ${HOME} 0" and g.background
    assert isinstance(steps[6], Guest) and steps[6].argv == ("/bin/true",)
    assert isinstance(steps[8], Sleep) and steps[8].duration.ms == 5
    j = steps[10]
    assert isinstance(j, Jitter) and j.delay is not None and 0 <= j.delay.ms <= 20
    assert isinstance(steps[11], Jitter) and steps[11].max.ms == 3
    p = steps[15]
    assert isinstance(p, RebalancePressure) and p.size == 64 << 20 and p.pressure_id == "press0"
    par = steps[19]
    assert isinstance(par, Parallel) and [b.name for b in par.branches] == ["yank", "watch"]
    assert par.branches[0].steps[0].path == "steps[19].parallel.yank[0]"
    par2 = steps[20]
    assert isinstance(par2, Parallel) and [b.name for b in par2.branches] == ["b1", "b2"]
    a = steps[-2]
    assert isinstance(a, AssertAudio) and a.audio.max_gap == Duration(300 * 10**6)
    c = steps[-1]
    assert isinstance(c, AssertCount) and c.count.accepts(2) and not c.count.accepts(4)


def test_typed_whole_value_substitution_and_escape() -> None:
    sc = check("name: t\nparameters:\n  n: [2]\n  flag: [true]\nsteps:\n"
               "  - rebalance: {trigger: cpu-hotplug, count: '${n}'}\n"
               "  - guest: {run: 'echo $$HOME $${x} ${n}', check: '${flag}'}\n")
    steps = sc.sweep().iteration(0).steps
    assert isinstance(steps[0], RebalanceCpuHotplug) and steps[0].count == 2
    assert isinstance(steps[1], Guest) and steps[1].run == "echo $HOME ${x} 2"
    assert steps[1].check is True


def test_topology_forms() -> None:
    res = Resolver()
    validate_text("name: t\nsteps:\n  - sleep: 1s\n", FILE, res)
    assert res.calls[0][0] == "default"                    # the default when omitted
    res = Resolver()
    sc = validate_text("name: t\ntopology:\n  ports: [p1]\n  devices: [d1]\nsteps:\n"
                       "  - unplug: d1\n", FILE, res)
    ref, located = res.calls[0]
    assert ref == {"ports": ["p1"], "devices": ["d1"]}
    assert located.line_of(("ports",)) == 3 and located.field(("ports",)) == "topology.ports"
    assert sc.topology.device_ids() == ["d1"]


def test_topology_devices_may_be_used_without_plug() -> None:
    text = ("name: t\ntopology:\n  ports: [rp1]\n  devices: [snd0]\nsteps:\n"
            "  - rebalance: {trigger: rescan, device: snd0}\n  - unplug: snd0\n"
            "  - wait: {event: device-deleted, device: snd0}\n  - plug: snd0\n")
    sc = check(text)
    assert len(sc.sweep().iteration(0).steps) == 4


def test_missing_scenario_file() -> None:
    with pytest.raises(SpecError, match="scenario file not found") as ei:
        validate_file(DATA / "nope.yaml", Resolver())
    assert ei.value.file is not None and ei.value.file.endswith("nope.yaml")


SHIPPED = sorted((REPO / "scenarios").glob("*.yaml"))


def test_shipped_scenarios_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"hotplug-cycle.yaml", "rebalance-rescan.yaml", "rebalance-pressure.yaml",
            "unplug-during-stream.yaml", "sweep-rebalance-delay.yaml",
            "race-planted.yaml", "audio-across-rebalance.yaml",
            "audio-planted-glitch.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenarios_validate(path: Path) -> None:
    res = Resolver()
    sc = validate_file(path, res)
    # the audio scenarios place their controllers cold (codecs can't be hot-plugged), the
    # recordable race its edu device (a QMP hot-plug cannot be recorded)
    assert res.calls[0][0] == "default" or (
        path.stem.startswith(("audio-", "race-planted-recorded"))
        and isinstance(res.calls[0][0], Mapping))
    assert sc.name == path.stem
    sweep = sc.sweep()
    # modest: a few minutes under TCG; the race hunt sweeps 4 bugs x 8 delays, and is
    # run one bug at a time (--set bug=...), 8 iterations
    assert 1 <= len(sweep) <= (32 if sc.name.startswith("race-planted") else 12)
    for it in sweep:
        assert it.steps


def test_sweep_rebalance_delay_shape() -> None:
    sc = validate_file(REPO / "scenarios" / "sweep-rebalance-delay.yaml", Resolver())
    sweep = sc.sweep()
    assert len(sweep) == 10
    assert [it.parameters["delay_ms"] for it in sweep] == [0, 100, 200, 300, 400] * 2


@pytest.mark.parametrize("step, why", [
    ("  - plug: {device: snd0, model: AC97, port: rp1, props: {romfile: /etc/shadow}}\n",
     "property 'romfile' is refused: it names a host file"),
    ("  - plug: {device: snd0, model: AC97, port: rp1, props: {drive: x}}\n",
     "property 'drive' is refused"),
    ("  - plug: {device: snd0, model: AC97, port: rp1, props: {bogus: 1}}\n",
     "not one the lab lets you set on AC97"),
    ("  - plug: {device: snd0, model: AC97, port: rp1, props: {'a,romfile': 1}}\n",
     "not one QEMU takes"),
    ("  - plug: {device: snd0, model: ich9-intel-hda, port: rp1, props: {msi: 'off'}}\n"
     "  - rebalance: {trigger: reconfigure, device: snd0, props: {romfile: x}}\n",
     "property 'romfile' is refused"),
])
def test_device_properties_come_from_an_allow_list(step: str, why: str) -> None:
    """A scenario must not make QEMU read a host file through a device property."""
    with pytest.raises(SpecError, match=re.escape(why)):
        check(HEAD + step)


def test_allowed_device_properties_pass() -> None:
    sc = check(HEAD + "  - plug: {device: snd0, model: ich9-intel-hda, port: rp1, "
                      "props: {msi: 'off', rombar: 0}}\n")
    plug = sc.sweep().iteration(0).steps[-1]
    assert plug.props == {"msi": "off", "rombar": 0}
