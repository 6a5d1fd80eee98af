"""`rebalab` command line.

Exit status (DESIGN.md): 0 passed, 1 the driver/guest broke a rule, 2 the lab could
not do its job (bad input, QEMU or agent failure), 130 interrupted. Bad arguments are
caught here, before any VM starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lab import __version__
from lab.errors import Interrupted, LabError
from lab.signals import graceful
from vdevice.errors import SpecError
from vdevice.topology import HotplugMode

EXIT_OK, EXIT_FAIL, EXIT_LAB, EXIT_INT = 0, 1, 2, 130


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # exit status 2 with our wording, on one line (the usage is one --help away)
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _console(stderr: bool = False):  # type: ignore[no-untyped-def]
    from rich.console import Console

    from lab.report.console import PLAIN_WIDTH
    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal:        # CI logs and pipes: don't fold the tables at 80 columns
        con.width = PLAIN_WIDTH
    return con


def _progress_printer() -> Callable[[str], None]:
    con = _console()
    t0 = time.monotonic()

    def show(msg: str) -> None:
        con.print(f"[dim]{time.monotonic() - t0:7.2f}s[/dim] {msg}")
    return show


def _modes(value: str) -> list[HotplugMode]:
    if value == "both":
        return [HotplugMode.ACPI, HotplugMode.NATIVE]
    try:
        return [HotplugMode(value)]
    except ValueError:
        raise UsageError(f"--mode must be acpi, native or both, not {value!r}") from None


# ---- commands --------------------------------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from lab.demo import run_demo

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if not models:
        raise UsageError("--model names no model (give one or more, comma-separated: "
                         "see `rebalab models`)")
    if args.cycles < 1:
        raise UsageError("--cycles must be at least 1")
    result = run_demo(models, _modes(args.mode), cycles=args.cycles, runs_root=Path(args.runs),
                      accel=args.accel, progress=_progress_printer())
    _print_demo(result)
    return result.exit_code


def _print_demo(result) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    con = _console()
    for m in result.machines:
        acc = m.get("accelerator") or {}
        con.print(f"QEMU {m['qemu']['version']} · accelerator [bold]{acc.get('name')}[/bold] "
                  f"({acc.get('reason')}) · hot-plug mode {m['topology']['hotplug_mode']}")
    table = Table(title="hot-plug cycle")
    for col in ("mode", "step", "model", "result", "host-timed (ms)", "detail"):
        table.add_column(col, justify="right" if "ms" in col else "left")
    for s in result.steps:
        detail = (f"bdf {s['bdf']}, device_add {s['device_add_ms']} ms" if s["step"] == "plug"
                  else f"QEMU gone {s['qemu_ms']} ms via {s['evidence']}" if s["step"] == "unplug"
                  else s.get("accel", ""))
        table.add_row(s["mode"], s["step"], s.get("model", ""),
                      "ok" if s["ok"] else "FAILED", f"{s['ms']:.1f}", detail or "")
    con.print(table)
    style = "green" if result.status == "passed" else "red"
    con.print(f"[{style}]{result.status.upper()}[/{style}]"
              + (f" (stopped at: {result.stopped_at})" if result.stopped_at else ""))
    if result.error:
        con.print(f"[red]error:[/red] {result.error}")
    for t in result.timelines:
        bound = f"±{t['bound_ms']:.3f} ms" if t["bound_ms"] is not None else "unknown"
        con.print(f"timeline ({t['mode']}): {t['events']} events, guest clock aligned {bound} "
                  f"— `rebalab timeline {Path(t['path']).parent}`")
    con.print(f"run directory: {result.run_dir}")


def cmd_boot(args: argparse.Namespace) -> int:
    """Boot and keep the VM until Ctrl-C, printing how to reach it."""
    from lab.image import GuestImage
    from lab.machine import Machine
    from lab.rundir import RunDir
    from vdevice.presets import default_topology

    mode = _modes(args.mode)
    if len(mode) != 1:
        raise UsageError("boot takes one --mode")
    image = GuestImage.load()
    run = RunDir(Path(args.runs), "boot")
    show = _progress_printer()
    machine = Machine(default_topology(mode[0]), run, image=image, accel=args.accel)
    try:
        show("booting the guest…")
        machine.start()
        acc = machine.accel
        show(f"guest ready in {machine.timings['boot_to_agent_s']:.2f}s under "
             f"{acc.name if acc else '?'} ({acc.reason if acc else ''})")
        print(f"\n  ssh -i {image.ssh_key} -p {machine.ssh_port} -o UserKnownHostsFile=/dev/null "
              f"-o StrictHostKeyChecking=no root@127.0.0.1\n"
              f"  (the lab itself pins the guest key from {image.file('host_key.pub')})\n"
              f"  QMP socket: {machine.private / 'qmp.sock' if machine.private else '-'} "
              "(the lab holds the QMP connection)\n"
              f"  artifacts: {run.path}\n\nPress Ctrl-C to stop the VM.")
        while machine.process is not None and machine.process.alive():
            time.sleep(0.5)
        show("QEMU exited")
        return EXIT_OK
    except (KeyboardInterrupt, Interrupted):
        show("stopping…")
        return EXIT_INT
    finally:
        machine.stop()
        run.close()


def _trigger_table() -> str:
    """``rebalab rebalance --help``: per trigger and guest OS, what it does and does not
    exercise (lab.scenario.steps.TRIGGER_EXERCISES, the README's table too)."""
    import textwrap

    from lab.scenario.steps import TRIGGER_EXERCISES

    out = []
    for trig, per_os in TRIGGER_EXERCISES.items():
        out.append(trig)
        for os_name in ("linux", "windows"):
            out.append(textwrap.fill(per_os[os_name], width=88, initial_indent=f"  {os_name:8}",
                                     subsequent_indent=" " * 10))
    out.append("This command runs the built-in Linux guest; for Windows write a scenario and "
               "`rebalab run --guest windows:IMAGE`.")
    return "\n".join(out)


def cmd_rebalance(args: argparse.Namespace) -> int:
    """Boot, place the audio device, run one trigger, print what moved on the host."""
    from dataclasses import replace

    from rich.table import Table

    from lab import operations as ops
    from lab import rebalance as rb
    from lab.image import GuestImage
    from lab.machine import Machine
    from lab.rundir import RunDir, iso
    from vdevice.catalog import check_user_props, get_model
    from vdevice.presets import default_topology
    from vdevice.sizes import bar_size
    from vdevice.topology import Device, Placement

    mode = _modes(args.mode)
    if len(mode) != 1:
        raise UsageError("rebalance takes one --mode")
    get_model(args.model, field="--model")
    if args.to:
        get_model(args.to, field="--to")
    props: dict[str, str] = {}
    for item in args.prop:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--prop {item!r}: expected KEY=VALUE (e.g. msi=off)")
        props[key] = value
    to_model = args.to or ("AC97" if args.model != "AC97" else "ES1370")
    check_user_props(to_model, props, field="--prop")
    size = None if args.size in (None, "auto") else bar_size(args.size, field="--size")
    image = GuestImage.load()
    topo = replace(default_topology(mode[0], model=args.model), max_cpus=2)
    run = RunDir(Path(args.runs), f"rebalance-{args.trigger}")
    show = _progress_printer()
    con = _console()
    status = EXIT_OK
    try:
        with Machine(topo, run, image=image, accel=args.accel) as m:
            show(f"guest ready ({m.accel.name if m.accel else '?'}); plugging {args.model}")
            ops.plug(m, Device("snd0", args.model, "rp1", Placement.HOT))
            show(f"running trigger {args.trigger}")
            kw: dict[str, object] = {}
            if args.trigger == "pressure":
                kw = {"size": size, "placement": args.placement}
            elif args.trigger == "reconfigure":
                kw = {"model": to_model, "props": props}
            try:
                rep = rb.run_trigger(m, args.trigger, "snd0", **kw)
            except rb.Unsupported as exc:
                con.print(f"[yellow]{args.trigger}: {exc}[/yellow]")
                run.write_json("rebalance.json", {"trigger": args.trigger, "supported": False,
                                                  "reason": str(exc)})
                return EXIT_LAB
            run.write_json("rebalance.json", rep.to_json())
            table = Table(title=f"{args.trigger}: what moved (host view, query-pci diff)")
            for c in ("device", "BDF", "what", "before", "after"):
                table.add_column(c)
            for ch in rep.changes:
                table.add_row(ch.device, ch.bdf, ch.what, ch.old or "-", ch.new or "-")
            if not rep.changes:
                table.add_row("-", "-", "nothing moved", "", "")
            con.print(table)
            tt = Table(title="hardware trace of the audio device (QEMU trace log)")
            for c in ("host time", "+ms", "event", "BDF", "detail"):
                tt.add_column(c)
            audio_names = {get_model(args.model).driver, get_model(args.to).driver if args.to
                           else ""}
            shown = _collapse_toggles([e for e in rep.trace if e.kind.value in
                                       ("bar-mapped", "bar-unmapped", "decode-on", "decode-off")
                                       and e.data.get("qemu_name") in audio_names])
            for e in shown[:40]:
                detail = (f"BAR{e.data.get('bar')} {e.data.get('addr', 0):#x}+{e.data.get('size', 0):#x}"
                          if "addr" in e.data else f"command={e.data.get('command', 0):#x}")
                tt.add_row(iso(e.t_host_ns), f"{(e.t_host_ns - rep.started_ns) / 1e6:.1f}",
                           e.kind.value, e.device.bdf if e.device else "",
                           f"{e.data.get('qemu_name', '')} {detail}")
            n_all = sum(1 for e in rep.trace if e.data.get("qemu_name") in audio_names)
            if n_all > len(shown):
                tt.add_row("…", "", f"{n_all - len(shown)} more in rebalance.json "
                           "(BAR sizing toggles)", "", "")
            con.print(tt)
            con.print(f"[bold]{rep.summary()}[/bold]")
            if rep.unmapped_ms is not None:
                con.print(f"BAR unmapped -> mapped again: {rep.unmapped_ms:.1f} ms; decode off -> "
                          f"on: {rep.outage_ms if rep.outage_ms is not None else '-'} ms")
            for n in rep.notes:
                con.print(f"note: {n}")
            con.print("timings: " + ", ".join(f"{k} {v:.1f} ms" for k, v in rep.durations_ms.items()))
            if args.trigger in ("rescan", "reconfigure") and rep.rebound is False:
                status = EXIT_FAIL
    finally:
        run.close()
        con.print(f"run directory: {run.path}")
    return status


def _collapse_toggles(events: list) -> list:  # type: ignore[type-arg]
    """Keep the first and last edges; BAR sizing toggles decode dozens of times."""
    return events if len(events) <= 12 else events[:4] + events[-8:]


def cmd_validate(args: argparse.Namespace) -> int:
    from lab.runner import load_scenario

    for f in args.files:
        sc = load_scenario(Path(f))
        n = len(sc.sweep())
        print(f"{f}: ok: scenario {sc.name!r}, {n} iteration{'s' * (n != 1)}, "
              f"{len(sc.raw_steps)} steps, topology {sc.topology_ref}, "
              f"hot-plug mode {sc.hotplug_mode or sc.topology.hotplug_mode.value}")
    return EXIT_OK


def _run_scenario(scenario, args: argparse.Namespace, only=None, suffix: str = "",  # type: ignore[no-untyped-def]
                  overrides=None, attempts: int = 1,
                  every_attempt: bool = False,
                  record: str | None = None,
                  shard: Any = None) -> int:  # type: ignore[no-untyped-def]
    from lab.report import RunConsole, print_summary
    from lab.runner import ScenarioRunner
    from lab.scenario.overrides import Overrides

    overrides = overrides or Overrides()
    scenario = overrides.apply(scenario)
    total = (len(only) if only is not None else len(scenario.sweep())) * attempts
    # the guest and the run directory are checked and made before any progress is
    # printed: a missing image is one error line, not a "0/6 done" run first
    from lab.parallel import auto_jobs, parse_jobs
    jobs = parse_jobs(str(getattr(args, "jobs", None) or "1"))
    runner = ScenarioRunner(scenario, runs_root=Path(args.runs), accel=args.accel,
                            only=only, name_suffix=suffix, console=None,
                            overrides=overrides, attempts=attempts,
                            every_attempt=every_attempt, record=record,
                            jobs=jobs if isinstance(jobs, int) else 1,
                            **({"shard": shard[0]} if shard and shard[0] else {}))
    if jobs == "auto":
        runner.jobs = auto_jobs(args.accel or "auto", runner.topology.memory_mb)
    runner.jobs = max(1, min(runner.jobs, total))      # no idle VMs
    if runner.jobs > 1:
        runner.run.log(f"--jobs {jobs}: {runner.jobs} VMs")
    for line in shard[1] if shard else ():
        runner.run.log(line)           # which engine variables chose the shard
    with RunConsole(scenario.name + suffix, total) as ui:
        runner.console = ui
        ui.note(f"run directory: {runner.run.path}")
        if not overrides.empty:
            ui.note(f"overrides: {overrides.describe()}")
        if shard and shard[0]:
            ui.note(f"shard {shard[0]['index']}/{shard[0]['total']} "
                    f"({shard[0]['source']}): {len(only or ())} of "
                    f"{shard[0]['sweep_size']} iterations; merge the shards with "
                    "`rebalab merge RUN_DIR... --out DIR`")
        summary = runner.execute()
    print_summary(summary)
    print(f"run directory: {runner.run.path}")
    if runner.unwritten:
        # the results above are the only full copy: say so, once, and fail the run
        print(f"error: not written to {runner.run.path}: {', '.join(runner.unwritten)} "
              "(see lab.log; free space and run again)", file=sys.stderr)
        return EXIT_LAB
    print(f"reports: {runner.run.path / 'report.html'}, {runner.run.path / 'junit.xml'}")
    return int(summary.exit_code)


def cmd_run(args: argparse.Namespace) -> int:
    from lab.runner import load_scenario
    from lab.scenario.overrides import from_args

    scenario = load_scenario(Path(args.scenario))
    overrides = from_args(args)
    only = None
    if args.iteration is not None:
        n = len(overrides.apply(scenario).sweep())
        bad = [k for k in args.iteration if not 0 <= k < n]
        if bad:
            raise UsageError(f"--iteration {bad[0]} does not exist (0..{n - 1})")
        only = args.iteration
    # --shard K/N, else the engine's variables (lab.shard); checked before any VM
    from lab import shard as shard_mod
    resolved = shard_mod.resolve(getattr(args, "shard", None), os.environ,
                                 explicit_iterations=args.iteration is not None)
    # (the shard record for run.json/summary.json or None, the lines for lab.log)
    shard: tuple[dict[str, Any] | None, tuple[str, ...]] | None = None
    suffix = ""
    if resolved.shard is not None:
        effective = overrides.apply(scenario)
        shard_mod.check_fits(resolved.shard, len(effective.sweep()))
        only = resolved.shard.indices(len(effective.sweep()))
        shard = (shard_mod.record(resolved.shard, effective, overrides), resolved.notes)
        suffix = f"-shard-{resolved.shard.index}-of-{resolved.shard.total}"
    elif resolved.notes:
        shard = (None, resolved.notes)     # variables seen but no shard: lab.log says so
    record = args.record or scenario.record
    if record:
        from lab.record import check_recordable
        if args.accel == "kvm":
            raise UsageError("--record needs TCG (QEMU records and replays only under "
                             "-icount); drop --accel kvm")
        # before any VM: a step the replay log cannot hold is refused at its line
        check_recordable(overrides.apply(scenario),
                         flag="--record" + (" all" if args.record == "all" else ""))
        if args.accel is None:
            args.accel = "tcg"
    return _run_scenario(scenario, args, only, suffix, overrides=overrides, record=record,
                         shard=shard)


def cmd_replay(args: argparse.Namespace) -> int:
    """Run exactly iteration K of an earlier run again: same scenario text, same seed,
    the same command-line overrides (from run.json).

    A race does not fail every time its timing comes round (the guest's scheduling is
    not replayed, only the lab's inputs), so ``--attempts N`` runs it up to N times and
    stops at the first failure: exit 1 and "reproduced at attempt j of N", or exit 0
    when no attempt failed. ``--every-attempt`` runs all N, for the reproduction rate."""
    from lab.runner import resolve_topology
    from lab.scenario import validate_text
    from lab.scenario.overrides import Overrides

    if args.exact:
        if args.attempts != 1 or args.every_attempt:
            raise UsageError("--exact replays the recording, which gives the same run every "
                             "time: --attempts/--every-attempt do not apply")
        from lab.replay_exact import replay_exact
        return replay_exact(Path(args.run_dir), args.iteration, runs_root=Path(args.runs),
                            timeout=args.timeout, gdb=args.gdb)
    if args.gdb or args.timeout is not None:
        raise UsageError("--gdb and --timeout go with --exact")
    if args.attempts < 1:
        raise UsageError(f"--attempts {args.attempts}: must be 1 or more")
    if args.every_attempt and args.attempts == 1:
        raise UsageError("--every-attempt needs --attempts N (N > 1)")
    from lab.inputs import read_json, read_text

    run_dir = Path(args.run_dir)
    meta = read_json(run_dir / "run.json", "the run's run.json")
    text = read_text(run_dir / "scenario.yaml", "the run's scenario.yaml")
    if not isinstance(meta, dict) or not isinstance(meta.get("base_dir") or "", str) \
            or not isinstance(meta.get("scenario_file") or "", str):
        raise UsageError(f"{run_dir}/run.json: not a run record (base_dir and scenario_file "
                         "must be text)")
    scenario = validate_text(text, meta.get("scenario_file") or str(run_dir / "scenario.yaml"),
                             resolve_topology, base_dir=_replay_base(args, run_dir, meta, text))
    overrides = Overrides.from_json(meta.get("overrides"))
    n = len(overrides.apply(scenario).sweep())
    if not 0 <= args.iteration < n:
        raise UsageError(f"--iteration {args.iteration} does not exist in {run_dir} (0..{n - 1})")
    return _run_scenario(scenario, args, [args.iteration], suffix=f"-replay-{args.iteration}",
                         overrides=overrides, attempts=args.attempts,
                         every_attempt=args.every_attempt)


def _replay_base(args: argparse.Namespace, run_dir: Path, meta: dict[str, Any],
                 text: str) -> Path:
    """Where the replayed scenario's relative paths (topology, guest image) resolve.

    run.json's ``base_dir`` is only a claim: a run directory may come from someone
    else, and a base of ``/root/.ssh`` would make a "topology" or a Windows "image" of
    any host file. It is believed when it still holds the scenario file the run
    recorded, with the same text (which a stranger's run directory cannot arrange on
    this machine); otherwise the run directory itself is the base. ``--base-dir`` is
    the user's own word and wins.
    """
    if getattr(args, "base_dir", None):
        return Path(args.base_dir)
    base = meta.get("base_dir")
    name = Path(str(meta.get("scenario_file") or "")).name
    if base and name:
        try:
            from lab.inputs import read_text
            if read_text(Path(base) / name, "the recorded scenario file") == text:
                return Path(base)
        except (SpecError, OSError):
            pass
        print(f"note: {base} (run.json's base_dir) no longer holds this run's scenario; "
              f"its relative paths resolve in {run_dir} (--base-dir DIR to choose)",
              file=sys.stderr)
    return run_dir


def cmd_merge(args: argparse.Namespace) -> int:
    """The shard runs of one sweep (``run --shard K/N``) as one run directory (lab.merge);
    exit status that of the merged summary (0/1/2/130), 2 when refused."""
    from lab.merge import merge
    from lab.report import print_summary

    result = merge([Path(p) for p in args.run_dirs], Path(args.out))
    print_summary(result.summary)
    for note in result.notes:
        print(f"note: {note}")
    print(f"merged {len(result.shards)} shards ("
          + ", ".join(f"{r.label}: {r.path}" for r in result.shards)
          + f"); artifacts copied ({result.copied_files} files), sources in "
          f"{result.out / 'MERGED.json'}")
    print(f"run directory: {result.out}")
    print(f"reports: {result.out / 'report.html'}, {result.out / 'junit.xml'}")
    return int(result.summary.exit_code)


def cmd_timeline(args: argparse.Namespace) -> int:
    """Print a run's timeline.jsonl: host and guest interleaved, in order."""
    from lab.timeline import Timeline, render_text

    path = Path(args.run_dir)
    if path.is_dir():
        every = sorted(path.rglob("timeline.jsonl")) if not (path / "timeline.jsonl").exists() \
            else [path / "timeline.jsonl"]
        found = every
        if args.iteration is not None:
            found = [p for p in every if f"iterations/{args.iteration}/" in str(p)]
            if not found:
                tries = sorted({p.parent.name for p in every
                                if p.parent.name.startswith(f"{args.iteration}.")})
                hint = f" (a replay's attempts: {', '.join(tries)})" if tries else ""
                raise UsageError(f"no iterations/{args.iteration}/timeline.jsonl under "
                                 f"{path}{hint}")
        if not found:
            raise UsageError(f"no timeline.jsonl under {path}")
        if len(found) > 1 and args.iteration is None:
            names = ", ".join(str(p.relative_to(path)) for p in found[:8])
            print(f"{len(found)} timelines ({names}); showing the first. Use --iteration K.",
                  file=sys.stderr)
        path = found[0]
    from lab.events import Kind, Source
    for flag, given, enum in (("--kind", args.kind, Kind), ("--source", args.source, Source)):
        known = {m.value for m in enum}
        for value in given or ():
            if value not in known:
                raise UsageError(f"{flag} {value[:40]!r} is not one of: "
                                 f"{', '.join(sorted(known))}")
    tl = Timeline.read(path)
    kinds = [k for k in (args.kind or [])]
    text = render_text(tl, device=args.device, kinds=kinds or None,
                       sources=args.source or None)
    print(text)
    if tl.truncated:
        print("(the timeline file was cut short: the run was interrupted)", file=sys.stderr)
    return EXIT_OK


def _split_list(values: Sequence[str] | None) -> list[str]:
    return [x.strip() for v in values or () for x in v.split(",") if x.strip()]


def cmd_inspect(args: argparse.Namespace) -> int:
    """Logs from real machines: parse, merge, judge, report (lab.inspect)."""
    from lab import inspect as insp_mod
    from lab.timeline import rows

    if args.format == "list":
        from lab import logs
        for name, parser in logs.parsers().items():
            print(f"{name:14} {parser.description}")
        return EXIT_OK
    if args.format != "auto":
        from lab import logs
        logs.get(args.format)          # an unknown format is named before any file is read
    rules = _split_list(args.rules) or None
    limits: dict[str, str] = {}
    for item in args.limit or ():
        k, sep, v = item.partition("=")
        if not sep:
            raise UsageError(f"--limit {item!r}: expected NAME=MS (e.g. query_stop_max_ms=50)")
        try:
            if not 0 < float(v) < 1e9:
                raise ValueError
        except ValueError:
            raise UsageError(f"--limit {k}: {v!r} is not a positive number of ms") from None
        limits[k.strip()] = v
    if args.max_events < 0:
        raise UsageError("--max-events must be >= 0")
    paths = [Path(f) for f in args.files]
    if len(paths) == 1 and insp_mod.is_run_dir(paths[0]):
        if args.device or args.format != "auto" or args.report:
            raise UsageError("a run directory is re-checked as the run recorded it: "
                             "--device, --format and --report apply to log files")
        return _inspect_run(paths[0], rules, args.json)
    for p in paths:
        if p.is_dir():
            raise UsageError(f"{p}: a directory (inspect takes log files, or one run "
                             "directory with a summary.json)")
    devices = [insp_mod.DeviceSpec.parse(d) for d in args.device or ()]
    result = insp_mod.inspect_files(paths, fmt=args.format, devices=devices, rules=rules,
                                    limits={k: float(v) for k, v in limits.items()})
    if args.report:
        out = insp_mod.write_reports(result, args.report)
    if args.json:
        doc = result.to_json()
        if args.report:
            doc["report"] = str(out)
        print(json.dumps(doc, indent=2, default=str))
        return result.exit_code
    con = _console()
    for line in insp_mod.render_files(result.files):
        con.print(line, markup=False, soft_wrap=True)
    body = rows(result.timeline, width=110)
    pairs = list(zip(body, result.timeline))
    significant = [p for p in pairs if not (p[1].kind.value == "kernel-log" and p[1].device is None)]
    shown = pairs if len(pairs) <= args.max_events else significant[:args.max_events]
    con.print(f"\n# {len(shown)} of {len(pairs)} events"
              + ("" if len(shown) == len(pairs) else
                 " (plain log lines and the rest left out: --max-events N, or --report DIR)"),
              markup=False, soft_wrap=True)
    clocks = {f.tally.path: f.tally.clock for f in result.files}
    for r, ev in shown:
        when = insp_mod.event_time(ev, clocks)
        con.print("  ".join((r[0].rjust(6), when, r[3], r[4], r[5], r[6], r[7])), markup=False, soft_wrap=True)
    con.print("", markup=False, soft_wrap=True)
    for line in insp_mod.render_verdicts(result):
        con.print(line, markup=False, soft_wrap=True)
    if args.report:
        con.print(f"report: {out / 'report.html'}", markup=False, soft_wrap=True)
    return result.exit_code


def _inspect_run(run_dir: Path, rules: list[str] | None, as_json: bool) -> int:
    from lab import inspect as insp_mod

    checks = insp_mod.inspect_run(run_dir, rules=rules)
    failed = any(c.recorded or c.rechecked for c in checks)
    if as_json:
        print(json.dumps({"run": str(run_dir), "iterations": [c.to_json() for c in checks],
                          "reproduced": all(c.reproduced for c in checks)}, indent=2))
        return EXIT_FAIL if failed else EXIT_OK
    con = _console()
    for c in checks:
        state = "same verdict" if c.reproduced else "DIFFERENT verdict"
        con.print(f"iteration {c.key}: recorded {len(c.recorded)} violation(s), re-checked "
                  f"{len(c.rechecked)} from the timeline: {state}"
                  + (f" ({c.note})" if c.note else ""), markup=False, soft_wrap=True)
        for v in c.rechecked:
            con.print(f"    {v.signature}: {v.message}", markup=False, soft_wrap=True)
        for v in c.from_steps:
            con.print(f"    (found by the run's steps) {v.signature}: {v.message}", markup=False, soft_wrap=True)
    if not all(c.reproduced for c in checks):
        con.print("the re-check differs from the recorded verdict: the rules changed since "
                  "the run, or the run's files were edited", markup=False, soft_wrap=True)
    return EXIT_FAIL if failed else EXIT_OK


def cmd_image_linux(args: argparse.Namespace) -> int:
    import subprocess

    from lab.image import REPO_ROOT

    cmd = [sys.executable, str(REPO_ROOT / "images" / "linux" / "build.py")]
    if args.force:
        cmd.append("--force")
    return subprocess.call(cmd)


def cmd_models(args: argparse.Namespace) -> int:
    from rich.table import Table

    from lab import qemu_caps
    from vdevice.catalog import MODELS, unavailable_reason

    inv = qemu_caps.probe()
    if args.json:
        print(json.dumps([{**m.to_json(), "available": unavailable_reason(m, inv) is None}
                          for m in MODELS.values()], indent=2))
        return EXIT_OK
    table = Table(title=f"device models (QEMU {inv.version_str})")
    for col in ("QEMU device", "role", "PCI id", "Windows hardware id", "Linux driver",
                "hot-plug", "available"):
        table.add_column(col)
    for m in MODELS.values():
        why = unavailable_reason(m, inv)
        table.add_row(m.driver, m.role.value, m.pci_id or "-", m.windows_hwid or "-",
                      m.linux_driver or "-", "yes" if m.hotpluggable else "no",
                      "yes" if why is None else f"no: {why}")
    _console().print(table)
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check every assumption the lab makes, one line each (lab.doctor); exit 0/1/2."""
    from lab import doctor

    def show(c: doctor.Check) -> None:
        print(c.render(), flush=True)

    if not args.json:
        print(f"rebalab doctor: guest {args.guest}, runs {args.runs}", flush=True)
    doc = doctor.run_doctor(args.guest, runs=Path(args.runs), accel=args.accel,
                            quick=args.quick, emit=(lambda c: None) if args.json else show)
    if args.json:
        print(json.dumps({"guest": args.guest, "exit_code": doc.exit_code,
                          "run_dir": str(doc.run_dir) if doc.run_dir else None,
                          "checks": [c.to_json() for c in doc.checks]}, indent=2))
        return doc.exit_code
    n = {s: sum(1 for c in doc.checks if c.status == s) for s in ("ok", "warn", "fail")}
    print(f"{len(doc.checks)} checks: {n['ok']} ok, {n['warn']} warning{'s' * (n['warn'] != 1)}, "
          f"{n['fail']} failed"
          + (f"; run directory: {doc.run_dir}" if doc.run_dir else ""))
    return doc.exit_code


# ---- parser ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rebalab", description="Reproduce PCI hot-plug and PnP rebalance bugs "
                "of audio drivers on virtual hardware (QEMU + QMP).")
    p.add_argument("--version", action="version", version=f"rebalab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--accel", choices=("auto", "kvm", "tcg"), default=None,
                        help="accelerator (default auto: KVM if a probe boot works, else TCG)")
        sp.add_argument("--runs", default=os.environ.get("REBALAB_RUNS", "runs"),
                        help="where run directories go (default ./runs)")

    d = sub.add_parser("demo", help="boot the built-in guest and run the default hot-plug cycle")
    d.add_argument("--model", default="ich9-intel-hda,AC97",
                   help="comma-separated audio models to cycle (default ich9-intel-hda,AC97)")
    d.add_argument("--mode", default="acpi", help="hot-plug mode: acpi, native or both")
    d.add_argument("--cycles", type=int, default=1, help="plug/unplug cycles per model")
    common(d)
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("boot", help="boot the built-in guest and keep it for interactive use")
    b.add_argument("--mode", default="acpi", help="hot-plug mode: acpi or native")
    common(b)
    b.set_defaults(func=cmd_boot)

    r = sub.add_parser("rebalance", help="boot, plug the audio device, run one rebalance trigger "
                       "and show what moved on the host",
                       description="Boot the built-in Linux guest, plug the audio device, run "
                       "one trigger and show what moved as the host saw it (query-pci diff, "
                       "QEMU's trace). In scenarios every trigger is a step (rebalance: "
                       "{trigger: ...}); what each one exercises differs per guest OS:",
                       epilog=_trigger_table(), formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("trigger", choices=("pressure", "rescan", "cpu-hotplug", "reconfigure", "resize"))
    r.add_argument("--model", default="ich9-intel-hda", help="audio device model")
    r.add_argument("--mode", default="native", help="hot-plug mode: acpi or native")
    r.add_argument("--size", help="pressure: BAR size (power of two, e.g. 64M) or auto")
    r.add_argument("--placement", default="sibling", choices=("sibling", "root"),
                   help="pressure: where the pressure device goes")
    r.add_argument("--to", help="reconfigure: the model to switch to")
    r.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE",
                   help="reconfigure: a property of the new device (repeatable), e.g. msi=off")
    common(r)
    r.set_defaults(func=cmd_rebalance)

    v = sub.add_parser("validate", help="check scenario files without starting anything")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.set_defaults(func=cmd_validate)

    rn = sub.add_parser("run", help="run a scenario: iterations, rules, reports (JUnit, HTML)")
    rn.add_argument("scenario", metavar="SCENARIO.yaml")
    rn.add_argument("--iteration", type=int, action="append",
                    help="run only this iteration (repeatable)")
    rn.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="pin a swept parameter to one of its declared values (repeatable)")
    rn.add_argument("--repeat", type=int, metavar="N",
                    help="rounds over the parameter grid (overrides the scenario's repeat)")
    rn.add_argument("--seed", type=int, metavar="N", help="the scenario seed (0 .. 2^63-1)")
    rn.add_argument("--until-fail", type=int, nargs="?", const=1, metavar="N",
                    help="stop after N failed iterations (default 1)")
    rn.add_argument("--jobs", default="1", metavar="N|auto",
                    help="VMs run at once, iterations handed out from one queue (default "
                    "1; auto: one per core, as memory allows); results equal --jobs 1's")
    rn.add_argument("--reset", choices=("none", "replug", "reboot", "snapshot"),
                    help="what happens between iterations (overrides the scenario's reset); "
                    "snapshot: every iteration starts from the state saved right after "
                    "the first VM was ready, in a fresh QEMU (no reboot, also after an oops)")
    rn.add_argument("--guest", metavar="linux|windows:IMAGE",
                    help="the guest to run on (overrides the scenario's guest; Windows needs KVM)")
    rn.add_argument("--agent", choices=("ssh", "winrm"),
                    help="how to reach the guest (default: ssh for Linux, winrm for Windows)")
    rn.add_argument("--trace-provider", action="append", default=[], metavar="GUID[:FLAGS[:LEVEL]]",
                    help="Windows: enable this WPP/TraceLogging provider of the driver under "
                    "test (repeatable; FLAGS a number or hex, LEVEL 0..255, default "
                    "0xFFFFFFFF:5). WPP when the scenario's guest.trace names a tmf/pdb, "
                    "else TraceLogging")
    rn.add_argument("--record", nargs="?", const="failing", choices=("failing", "all"),
                    help="record every iteration with QEMU record/replay (TCG; a fresh VM "
                    "per iteration) and keep the recordings of failing iterations, or of "
                    "all with --record all; replay one with `replay --exact`")
    rn.add_argument("--shard", metavar="K/N",
                    help="run shard K of N: the iterations with index %% N == K-1 (default: "
                    "from CI_NODE_INDEX/CI_NODE_TOTAL, JOB_COMPLETION_INDEX with "
                    "REBALAB_SHARD_TOTAL, or SLURM_ARRAY_TASK_*); put the shards back "
                    "together with `rebalab merge`")
    common(rn)
    rn.set_defaults(func=cmd_run)

    rp = sub.add_parser("replay", help="run one iteration of an earlier run again, same seed")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    rp.add_argument("--iteration", type=int, required=True, metavar="K")
    rp.add_argument("--attempts", type=int, default=1, metavar="N",
                    help="run it up to N times, stopping at the first failure (a race "
                    "reproduces only some of the time; default 1)")
    rp.add_argument("--every-attempt", action="store_true",
                    help="run all N attempts, to measure how often it reproduces")
    rp.add_argument("--base-dir", metavar="DIR",
                    help="resolve the scenario's relative paths (topology, guest image) "
                    "here (default: the run's recorded directory when it still holds the "
                    "scenario, else the run directory)")
    rp.add_argument("--exact", action="store_true",
                    help="replay the iteration's QEMU recording (run --record) instruction "
                    "for instruction, and compare console, kernel log and oops with the run")
    rp.add_argument("--gdb", action="store_true",
                    help="with --exact: start the replay paused with QEMU's gdb stub and "
                    "print how to attach (reverse execution needs a recording made with "
                    "snapshots)")
    rp.add_argument("--timeout", type=float, metavar="S",
                    help="with --exact: give up after S seconds (default: scaled to the "
                    "recording's length)")
    common(rp)
    rp.set_defaults(func=cmd_replay)

    mg = sub.add_parser("merge", help="merge the shard runs of one sweep (run --shard K/N) "
                        "into one run directory: summary, JUnit, HTML",
                        description="Exit status: that of the merged run (0/1/2/130); 2 "
                        "when the directories are not every shard of one run, once.")
    mg.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="the N shard run "
                    "directories (any order)")
    mg.add_argument("--out", required=True, metavar="DIR",
                    help="the merged run directory (new, or empty)")
    mg.set_defaults(func=cmd_merge)

    t = sub.add_parser("timeline", help="print a run's aligned timeline (host and guest events)")
    t.add_argument("run_dir", metavar="RUN_DIR", help="a run directory or a timeline.jsonl")
    t.add_argument("--iteration", metavar="K",
                   help="the iteration of a scenario run (K, or K.A for attempt A of a replay)")
    t.add_argument("--device", help="only events of this device (QOM id or BDF)")
    t.add_argument("--kind", action="append", help="only this event kind (repeatable)")
    t.add_argument("--source", action="append", help="only this source, e.g. guest.kprobe")
    t.set_defaults(func=cmd_timeline)

    from lab.guest.windows.cli import add_collect_dump_parser, add_windows_image_parser

    ins = sub.add_parser(
        "inspect", help="read logs from real machines (setupapi.dev.log, Kernel-PnP events, "
        "pnputil, dmesg, the lab's own files) and judge them with the PnP rules",
        description="Exit 0: no violation; 1: violations; 2: unreadable input.")
    ins.add_argument("files", nargs="+", metavar="FILE",
                     help="log files (formats detected), or one run directory")
    ins.add_argument("--format", default="auto", metavar="NAME",
                     help="the format of every FILE (default: detected per file); "
                          "`--format list` lists them")
    ins.add_argument("--device", action="append", metavar="NAME=IDENTITY",
                     help="a device to judge, by PCI address, instance id or instance-id glob "
                          "(repeatable); default: every device with evidence")
    ins.add_argument("--rules", action="append", metavar="IDS",
                     help="rule families, check ids or globs (comma-separated; default: all)")
    ins.add_argument("--limit", action="append", metavar="NAME=MS",
                     help="a timing limit, e.g. query_stop_max_ms=50")
    ins.add_argument("--json", action="store_true", help="print one JSON document")
    ins.add_argument("--report", metavar="DIR",
                     help="write timeline.jsonl, summary.json, junit.xml, report.html there")
    ins.add_argument("--max-events", type=int, default=400, metavar="N",
                     help="events printed at most (default 400)")
    ins.set_defaults(func=cmd_inspect)

    img = sub.add_parser("image", help="build guest images (the built-in Linux one, or Windows "
                         "from your ISO)")
    img_sub = img.add_subparsers(dest="image_kind", metavar="KIND", parser_class=_Parser)
    lin = img_sub.add_parser("linux", help="build the built-in Linux guest (cached: rebuilt only "
                             "when its inputs change)")
    lin.add_argument("--force", action="store_true", help="rebuild, with new keys")
    lin.set_defaults(func=cmd_image_linux)
    add_windows_image_parser(img_sub)
    add_collect_dump_parser(sub)

    m = sub.add_parser("models", help="list the device models and what the installed QEMU offers")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models)

    doc = sub.add_parser("doctor", help="check every assumption the lab makes on this machine "
                         "(QEMU, KVM, image, agent, tracer, clock), with the fix for each",
                         description="Exit 0: all checks passed (warnings allowed); 1: a check "
                         "failed; 2: the doctor could not run.")
    doc.add_argument("--guest", default="linux", metavar="linux|windows:IMAGE",
                     help="the guest to check (default linux: boots the built-in image once)")
    doc.add_argument("--quick", action="store_true", help="skip the hot-plug check")
    doc.add_argument("--json", action="store_true", help="print the checks as one JSON document")
    common(doc)
    doc.set_defaults(func=cmd_doctor)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            print("error: name a command (listed above)", file=sys.stderr)
            return EXIT_LAB
        from lab.agent.winrm import install_redaction
        from lab import privacy
        install_redaction()
        privacy.redact_all_records()
        privacy.private_umask()          # run directories 0700, files 0600
        privacy.STARTUP_NOTES[:] = privacy.inherited_signal_notes()
        if getattr(args, "accel", None) == "auto":
            args.accel = None
        with graceful():
            return int(args.func(args))
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LAB
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_LAB
    except (KeyboardInterrupt, Interrupted):
        print("interrupted", file=sys.stderr)
        return EXIT_INT
    except LabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:        # noqa: BLE001 - the one place that catches everything
        # a bug of the lab: exit 2 with one line; the traceback goes to a private crash
        # file, never to the terminal (it may quote input the user did not write)
        where = _crash_file(exc, argv)
        print(f"error: internal error: {type(exc).__name__}"
              + (f" (the traceback is in {where})" if where else ""), file=sys.stderr)
        return EXIT_LAB


def _crash_file(exc: BaseException, argv: Sequence[str] | None) -> Path | None:
    """Write the traceback to runs/crash-<time>-<pid>.log (0600); None if it can't be."""
    import traceback

    root = Path(os.environ.get("REBALAB_RUNS", "runs"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"rebalab {__version__} internal error\nargv: "
                    f"{list(argv) if argv is not None else sys.argv[1:]}\n\n")
            f.write("".join(traceback.format_exception(exc)))
        return path
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
