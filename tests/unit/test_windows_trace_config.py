"""The driver's trace, configured: ``guest.trace`` and ``--trace-provider`` validated at
file:line, the config reaching WindowsTracer (sessions, uploads, attribution), and
PortCls-style messages turned into events the Windows PnP rules judge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lab import clock
from lab.errors import ConfigError
from lab.events import DeviceId, Kind, Source
from lab.rules import RuleContext, check_all
from lab.scenario import validate_text
from lab.scenario.overrides import Overrides
from lab.timeline import Timeline
from lab.guest.windows.trace import wpp
from lab.guest.windows.trace.config import GUEST_TMF, from_spec
from lab.guest.windows.trace.tracer import WindowsTracer
from lab.guest.windows.scripted_agent import ScriptedAgent, structured_stdout
from tests.unit.guest_fakes import behaviour
from vdevice.errors import SpecError
from vdevice.presets import default_topology
from vdevice.topology import HotplugMode

SYSVAD_LIKE = "1945C417-844C-48C6-9BCE-3AA2113A2B69"   # a WPP control GUID as in Trace.h


class Resolver:
    def __call__(self, ref: Any, located: Any) -> Any:
        return default_topology(HotplugMode.NATIVE, model="AC97")


def _text(trace: str, *, os_name: str = "windows", steps: str = "") -> str:
    return ("name: t\n"
            f"guest:\n  os: {os_name}\n" + ("  image: win.qcow2\n" if os_name == "windows" else "")
            + "  trace:\n" + "".join(f"    {line}\n" for line in trace.strip("\n").split("\n"))
            + "steps:\n" + (steps or "  - plug: {device: snd0, model: AC97, port: rp1}\n"))


GOOD = f"""providers:
  - {{guid: {SYSVAD_LIKE}, flags: 0x8, level: 5, name: sysvad}}
tmf: trace/driver.tmf
tracefmt: 'C:\\rebalab\\driver\\tracefmt.exe'"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "win.qcow2").write_bytes(b"")
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "driver.tmf").write_text("// tmf\n")
    (tmp_path / "driver.pdb").write_bytes(b"pdb")
    return tmp_path


def _validate(base: Path, text: str) -> Any:
    return validate_text(text, str(base / "t.yaml"), Resolver(), base_dir=base)


def _error(base: Path, text: str) -> SpecError:
    with pytest.raises(SpecError) as ei:
        _validate(base, text)
    return ei.value


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), start=1) if needle in line)


@pytest.mark.parametrize("trace,needle,field,message", [
    (GOOD.replace(SYSVAD_LIKE, "1945C417-844C-48C6-9BCE"), "guid:", "guest.trace.providers[0].guid",
     "not a provider GUID"),
    (GOOD.replace("level: 5", "level: 300"), "guid:", "guest.trace.providers[0].level",
     "level must be 0 .. 255"),
    (GOOD.replace("flags: 0x8", "flags: '0xZZ'"), "guid:", "guest.trace.providers[0].flags",
     "flags must be a number or hex"),
    (GOOD.replace("flags: 0x8", "flags: -1"), "guid:", "guest.trace.providers[0].flags",
     "flags must be 0 .. 0xFFFFFFFFFFFFFFFF"),
    (GOOD.replace("tmf: trace/driver.tmf\n", ""), "trace:", "guest.trace",
     "needs the driver's tmf or pdb"),
    (GOOD + "\npdb: driver.pdb", "trace:", "guest.trace", "give tmf or pdb, not both"),
    (GOOD.replace("tracefmt: 'C:\\rebalab\\driver\\tracefmt.exe'", "tracefmt: tracefmt.exe"),
     "tracefmt:", "guest.trace.tracefmt", "not a usable guest path"),
    (GOOD.replace("tmf: trace/driver.tmf", "tmf: ../secret.tmf"), "tmf:", "guest.trace.tmf",
     "must be inside the scenario's directory"),
    (GOOD.replace("tmf: trace/driver.tmf", "tmf: trace/missing.tmf"), "tmf:", "guest.trace.tmf",
     "not found"),
    (GOOD.replace("tmf: trace/driver.tmf", "pdb: driver.pdb"), "trace:", "guest.trace",
     "pdb needs tracepdb"),
    (GOOD + "\ndevice: snd9", "device:", "guest.trace.device", "unknown device 'snd9'"),
    (GOOD + "\npatterns: [{regex: 'PnpStop(', kind: stop}]", "patterns:",
     "guest.trace.patterns[0].regex", "not a valid regular expression"),
    (GOOD + "\npatterns: [{regex: 'x', kind: bugcheck}]", "patterns:",
     "guest.trace.patterns[0].kind", "query-stop"),
])
def test_bad_trace_settings_are_refused_at_file_line(base: Path, trace: str, needle: str,
                                                     field: str, message: str) -> None:
    text = _text(trace)
    e = _error(base, text)
    assert e.file == str(base / "t.yaml")
    assert (e.line, e.field) == (_line_of(text, needle), field), str(e)
    assert message in str(e), str(e)


def test_trace_on_a_linux_guest_is_refused(base: Path) -> None:
    e = _error(base, _text(GOOD, os_name="linux"))
    assert e.line == 2 and "Linux guest traces with kprobes" in str(e)


def test_the_device_must_be_named_when_there_are_two_audio_devices(base: Path) -> None:
    steps = ("  - plug: {device: snd0, model: AC97, port: rp1}\n"
             "  - plug: {device: snd1, model: ES1370, port: rp2}\n")
    text = _text(GOOD, steps=steps)
    e = _error(base, text)
    assert e.line == _line_of(text, "trace:") and "name the device" in str(e)
    assert "snd0, snd1" in str(e)
    sc = _validate(base, _text(GOOD + "\ndevice: snd1", steps=steps))
    assert sc.guest.trace.device == "snd1"


def test_a_valid_trace_resolves_paths_and_the_device(base: Path) -> None:
    sc = _validate(base, _text(GOOD))
    t = sc.guest.trace
    assert t.tmf == str((base / "trace" / "driver.tmf").resolve())
    assert t.device == "snd0"                       # the only audio device
    assert t.providers[0].guid == "{" + SYSVAD_LIKE + "}" and t.providers[0].flags == 8


def test_config_reaches_the_tracer(base: Path) -> None:
    t = _validate(base, _text(GOOD)).guest.trace
    cfg = from_spec(t, device=t.device)
    assert cfg.device == DeviceId(qom="snd0")
    assert cfg.uploads == ((t.tmf, "C:\\rebalab\\trace\\" + GUEST_TMF),)
    assert cfg.wpp_format == wpp.WppFormatting(tracefmt="C:\\rebalab\\driver\\tracefmt.exe",
                                               tmf_file="C:\\rebalab\\trace\\driver.tmf")
    create = [gs for gs in WindowsTracer(cfg).start_scripts()
              if gs.label.startswith("etw: create session rebalab-wpp")]
    assert len(create) == 1
    assert {k: create[0].params[k] for k in ("Provider", "Keywords", "Level")} == {
        "Provider": "{" + SYSVAD_LIKE + "}", "Keywords": "0x8", "Level": "0x5"}
    # and into the guest: the TMF is copied after the work directory exists
    order: list[str] = []

    class Agent(ScriptedAgent):
        def put(self, local: Path, remote: str) -> None:
            order.append(f"put {local} {remote}")

    def answer(script: str, params: dict[str, str]) -> str:
        order.append(script.strip().splitlines()[-1][:40])
        if "GuestUtcFileTime" in script:
            return structured_stdout([{"Length": 0, "GuestUtcFileTime": 133_500_000_000_000_000,
                                       "UtcOffsetMinutes": 0}])
        return ""
    agent = Agent().on("", answer)
    WindowsTracer(cfg, log=lambda s: None, clock_rounds=1).start(agent)
    puts = [i for i, o in enumerate(order) if o.startswith("put ")]
    assert puts == [1] and order[1] == f"put {t.tmf} C:\\rebalab\\trace\\driver.tmf"


def test_a_tracelogging_provider_joins_the_kernel_pnp_session(base: Path) -> None:
    trace = f"providers: [{{guid: {SYSVAD_LIKE}, kind: tracelogging, level: 4}}]"
    t = _validate(base, _text(trace)).guest.trace
    cfg = from_spec(t, device=t.device)
    assert cfg.wpp_etw_session() is None and cfg.uploads == ()
    provs = cfg.pnp_session().providers
    assert provs[-1].guid == "{" + SYSVAD_LIKE + "}" and provs[-1].level == 4


def test_from_spec_refuses_a_vanished_file(base: Path) -> None:
    t = _validate(base, _text(GOOD)).guest.trace
    (base / "trace" / "driver.tmf").unlink()
    with pytest.raises(ConfigError, match="is not a file"):
        from_spec(t, device="snd0")


# ---- --trace-provider ---------------------------------------------------------------------

def test_trace_provider_flag_adds_a_provider(base: Path) -> None:
    sc = _validate(base, _text(GOOD))
    out = Overrides(trace_providers=("11111111-2222-3333-4444-555555555555:0xFF:4",)).apply(sc)
    provs = out.guest.trace.providers
    assert [p.guid for p in provs] == ["{" + SYSVAD_LIKE + "}", "{11111111-2222-3333-4444-555555555555}"]
    assert (provs[1].flags, provs[1].level, provs[1].kind) == (0xFF, 4, "wpp")
    assert Overrides.from_json(Overrides(trace_providers=("a",)).to_json()).trace_providers == ("a",)
    assert "--trace-provider 11111111" in Overrides(trace_providers=("11111111",)).describe()


@pytest.mark.parametrize("value,message", [
    ("nope", "not a provider GUID"), (f"{SYSVAD_LIKE}:0xFF:999", "level must be 0 .. 255"),
    (f"{SYSVAD_LIKE}:zz", "flags must be a number or hex"), (f"{SYSVAD_LIKE}", "listed twice"),
    ("a:b:c:d", "expected GUID[:FLAGS[:LEVEL]]"),
])
def test_trace_provider_flag_errors_name_the_flag(base: Path, value: str, message: str) -> None:
    sc = _validate(base, _text(GOOD))
    with pytest.raises(ConfigError, match=r"^--trace-provider: ") as ei:
        Overrides(trace_providers=(value,)).apply(sc)
    assert message in str(ei.value)


def test_trace_provider_needs_a_windows_guest(base: Path) -> None:
    sc = validate_text("name: t\nsteps:\n  - sleep: 1ms\n", str(base / "t.yaml"), Resolver(),
                       base_dir=base)
    with pytest.raises(ConfigError, match="needs a Windows guest"):
        Overrides(trace_providers=(SYSVAD_LIKE,)).apply(sc)


def test_cli_run_takes_trace_provider() -> None:
    from lab.cli import build_parser
    from lab.scenario.overrides import from_args

    args = build_parser().parse_args(["run", "x.yaml", "--trace-provider", SYSVAD_LIKE,
                                      "--trace-provider", f"{SYSVAD_LIKE}:0x8"])
    assert from_args(args).trace_providers == (SYSVAD_LIKE, f"{SYSVAD_LIKE}:0x8")


# ---- messages -> events -> rules ------------------------------------------------------------

SND = DeviceId(qom="snd0")


def _lines(*msgs: str) -> str:
    return "\n".join(f"01/15/2024-10:00:{i:02d}.0000000 0004.0068 [sysvad]{m}"
                     for i, m in enumerate(msgs, start=1))


def _judge(*msgs: str) -> tuple[list[Any], list[str]]:
    parsed = wpp.parse_lines(_lines(*msgs), received_ns=0, device=SND)
    assert not parsed.problems, parsed.problems
    tl = Timeline.build(parsed.events, alignment=clock.Alignment.fixed(0), devices=[SND])
    ctx = RuleContext.from_timeline(tl, devices=(SND,))
    return parsed.events, [v.rule for v in check_all(tl, ctx, ["windows-pnp"])]


def test_messages_are_attributed_to_the_device_under_test() -> None:
    events, _ = _judge("PnpQueryStop enter", "PnpQueryStop exit status=0x0 took 2 ms")
    assert [e.kind for e in events] == [Kind.CALL_ENTER, Kind.QUERY_STOP]
    assert all(e.device == SND and e.source == Source.GUEST_WPP for e in events)
    assert events[1].duration_ns == 2_000_000 and events[1].data["layer"] == "portcls"


def test_a_clean_portcls_rebalance_breaks_no_rule() -> None:
    events, rules = _judge("PnpQueryStop exit status=0x0", "PnpStop exit status=STATUS_SUCCESS",
                           "StartDevice resources: 0x20000000+0x1000, 0x20001000-0x200010ff")
    assert rules == []
    start = events[-1]
    assert start.kind == Kind.START and start.data["resources"] == ["0x20000000+0x1000",
                                                                   "0x20001000-0x200010ff"]


def test_stop_without_query_stop_is_a_violation() -> None:
    _, rules = _judge("StartDevice", "PnpHandler: IRP_MN_STOP_DEVICE", "StartDevice")
    assert rules == ["pnp.stop-without-query-stop"]


def test_cancel_stop_without_query_stop_is_allowed() -> None:
    events, rules = _judge("StartDevice", "PnpCancelStop status=0x0")
    assert [e.kind for e in events] == [Kind.START, Kind.CANCEL_STOP] and rules == []


def test_irp_names_do_not_match_inside_each_other() -> None:
    events, rules = _judge("IRP_MN_QUERY_STOP_DEVICE", "IRP_MN_CANCEL_STOP_DEVICE",
                           "IRP_MN_QUERY_STOP_DEVICE", "IRP_MN_STOP_DEVICE", "IRP_MN_START_DEVICE")
    assert [e.kind for e in events] == [Kind.QUERY_STOP, Kind.CANCEL_STOP, Kind.QUERY_STOP,
                                        Kind.STOP, Kind.START]
    assert rules == []


def test_a_failed_restart_needs_surprise_removal_and_remove() -> None:
    _, rules = _judge("PnpQueryStop", "PnpStop", "StartDevice exit status=0xC0000001",
                      "IRP_MN_SURPRISE_REMOVAL", "IRP_MN_REMOVE_DEVICE")
    assert rules == ["pnp.restart-failed"]
    _, rules = _judge("PnpQueryStop", "PnpStop", "StartDevice exit status=0xC0000001")
    assert rules == ["pnp.restart-failed", "pnp.failed-start-not-removed"]


def test_without_a_device_the_rules_cannot_use_wpp_events() -> None:
    parsed = wpp.parse_lines(_lines("IRP_MN_STOP_DEVICE"), received_ns=0)
    assert parsed.events[0].device is None


def test_scenario_patterns_come_first(base: Path) -> None:
    trace = GOOD + "\npatterns: [{regex: 'HW paused', kind: stop, name: hwpause}]"
    t = _validate(base, _text(trace)).guest.trace
    cfg = from_spec(t, device=t.device)
    parsed = wpp.parse_lines(_lines("HW paused"), received_ns=0, patterns=cfg.wpp_patterns,
                             device=cfg.device)
    assert parsed.events[0].kind == Kind.STOP and parsed.events[0].data["pattern"] == "hwpause"


def test_each_observation_traces_with_the_guests_config(base: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """runner -> WindowsGuest(trace_config=...) -> Observation -> WindowsTracer(config)."""
    import inspect

    from lab import guest as guest_mod
    from lab import observe
    from lab.guest.windows.trace import tracer as tracer_mod

    assert "trace_config" in inspect.signature(guest_mod.WindowsGuest).parameters
    t = _validate(base, _text(GOOD)).guest.trace
    cfg = from_spec(t, device=t.device)
    seen: list[Any] = []

    class Recorder:
        alignment = None
        clock_start = None

        def __init__(self, config: Any = None, out_dir: Any = None, **kw: Any) -> None:
            seen.append(config)

        def start(self, agent: Any) -> None:
            pass

    class Console:
        def cursor(self) -> int:
            return 0

    class Run:
        def log(self, line: str) -> None:
            pass


    class M:
        artifacts = tmp_path
        console = Console()
        agent = object()
        guest = behaviour("windows", trace_config=cfg)
        run = Run()
        qmp = None
        ssh_port = None

    monkeypatch.setattr(tracer_mod, "WindowsTracer", Recorder)
    observe.Observation(M()).start()        # type: ignore[arg-type]
    assert seen == [cfg] and seen[0].device == DeviceId(qom="snd0")
