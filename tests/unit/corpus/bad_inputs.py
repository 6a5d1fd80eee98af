"""The bad-input corpus: (name, argv, files) cases for every command and file kind.

Each case is run in one child process under prlimit (tests/unit/test_bad_input_corpus.py)
through ``lab.cli.main``: it must exit 2 with one line on stderr, no traceback, no
echoed file content, within the time limit. ``files`` are written into the case's own
directory; ``{d}`` in argv stands for it. SECRET is planted in files whose content must
never come back.
"""

from __future__ import annotations

SECRET = "Zq9-SECRET-CANARY-7Hk"

Case = tuple[str, list[str], dict[str, "str | bytes"]]

GOOD_STEPS = "steps:\n  - sleep: 1ms\n"

_SCENARIO_BODIES: list[tuple[str, str]] = [
    ("empty file", ""),
    ("only a comment", "# nothing\n"),
    ("a list", "- a\n- b\n"),
    ("a scalar", "just text\n"),
    ("no name", GOOD_STEPS),
    ("name a number", "name: 5\n" + GOOD_STEPS),
    ("name with slash", "name: a/b\n" + GOOD_STEPS),
    ("name too long", "name: " + "a" * 300 + "\n" + GOOD_STEPS),
    ("no steps", "name: t\n"),
    ("steps a map", "name: t\nsteps: {sleep: 1ms}\n"),
    ("steps empty", "name: t\nsteps: []\n"),
    ("step two keys", "name: t\nsteps:\n  - sleep: 1ms\n    plug: x\n"),
    ("unknown step", "name: t\nsteps:\n  - plgu: {device: x}\n"),
    ("sleep without unit", "name: t\nsteps:\n  - sleep: 250\n"),
    ("sleep bad unit", "name: t\nsteps:\n  - sleep: 5sec\n"),
    ("sleep negative", "name: t\nsteps:\n  - sleep: -5ms\n"),
    ("sleep huge", "name: t\nsteps:\n  - sleep: 99999999999999999999999h\n"),
    ("sleep nan", "name: t\nsteps:\n  - sleep: nanms\n"),
    ("jitter inverted", "name: t\nsteps:\n  - jitter: {min: 5ms, max: 1ms}\n"),
    ("seed negative", "name: t\nseed: -1\n" + GOOD_STEPS),
    ("seed huge", "name: t\nseed: " + "9" * 5000 + "\n" + GOOD_STEPS),
    ("seed float", "name: t\nseed: 1.5\n" + GOOD_STEPS),
    ("seed 2^64", "name: t\nseed: 18446744073709551616\n" + GOOD_STEPS),
    ("repeat zero", "name: t\nrepeat: 0\n" + GOOD_STEPS),
    ("repeat huge", "name: t\nrepeat: 10000000000\n" + GOOD_STEPS),
    ("repeat text", "name: t\nrepeat: many\n" + GOOD_STEPS),
    ("until bad", "name: t\nuntil: never\n" + GOOD_STEPS),
    ("reset bad", "name: t\nreset: sometimes\n" + GOOD_STEPS),
    ("limits a list", "name: t\nlimits: [1, 2]\n" + GOOD_STEPS),
    ("limit typo", "name: t\nlimits: {query_stop_max: 5}\n" + GOOD_STEPS),
    ("limit nan", "name: t\nlimits: {query_stop_max_ms: .nan}\n" + GOOD_STEPS),
    ("limit text", "name: t\nlimits: {query_stop_max_ms: fast}\n" + GOOD_STEPS),
    ("rules unknown", "name: t\nrules: [nope]\n" + GOOD_STEPS),
    ("rules a string", "name: t\nrules: 5\n" + GOOD_STEPS),
    ("param unused", "name: t\nparameters: {a: [1]}\n" + GOOD_STEPS),
    ("param unknown ref", "name: t\nsteps:\n  - sleep: ${nope}ms\n"),
    ("param empty list", "name: t\nparameters: {a: []}\nsteps:\n  - sleep: ${a}ms\n"),
    ("range bad shape", "name: t\nparameters: {a: {range: [1]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("range step zero", "name: t\nparameters: {a: {range: [0, 5, 0]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("range inverted", "name: t\nparameters: {a: {range: [5, 0]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("range overflow", "name: t\nparameters: {a: {range: [0, 1.0e+308, 1.0e-300]}}\n"
                       "steps:\n  - sleep: ${a}ms\n"),
    ("range too many", "name: t\nparameters: {a: {range: [0, 100000]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("random inverted", "name: t\nparameters: {a: {random: [5, 1]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("random inf", "name: t\nparameters: {a: {random: [0, .inf]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("param kind unknown", "name: t\nparameters: {a: {ragne: [0, 1]}}\nsteps:\n  - sleep: ${a}ms\n"),
    ("sweep too big", "name: t\nparameters:\n" + "".join(
        f"  p{i}: {{range: [0, 9999]}}\n" for i in range(5)) + "steps:\n"
        + "".join(f"  - sleep: ${{p{i}}}ms\n" for i in range(5))),
    ("plug unknown model", "name: t\nsteps:\n  - plug: {device: s, model: AC79, port: rp1}\n"),
    ("plug codec", "name: t\nsteps:\n  - plug: {device: s, model: hda-duplex, port: rp1}\n"),
    ("plug unknown port", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp9}\n"),
    ("plug twice", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1}\n"
                   "  - plug: {device: s, model: AC97, port: rp2}\n"),
    ("plug bad id", "name: t\nsteps:\n  - plug: {device: '9 x', model: AC97, port: rp1}\n"),
    ("plug romfile", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1, "
                     "props: {romfile: /etc/shadow}}\n"),
    ("plug chardev", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1, "
                     "props: {chardev: c0}}\n"),
    ("plug prop comma", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1, "
                        "props: {'a,romfile': x}}\n"),
    ("plug prop list", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1, "
                       "props: {msi: [1]}}\n"),
    ("plug bar not pow2", "name: t\nsteps:\n  - plug: {device: p, model: pci-testdev, port: rp1, "
                          "size: 48M}\n"),
    ("plug size huge", "name: t\nsteps:\n  - plug: {device: p, model: pci-testdev, port: rp1, "
                       "size: 99999999T}\n"),
    ("unplug unknown", "name: t\nsteps:\n  - unplug: snd9\n"),
    ("rebalance no trigger", "name: t\nsteps:\n  - rebalance: {device: x}\n"),
    ("rebalance bad trigger", "name: t\nsteps:\n  - rebalance: {trigger: rescna, device: x}\n"),
    ("reconfigure romfile", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1}\n"
                            "  - rebalance: {trigger: reconfigure, device: s, "
                            "props: {romfile: x}}\n"),
    ("module dash", "name: t\nsteps:\n  - module: {name: -r}\n"),
    ("module newline", "name: t\nsteps:\n  - module: {name: \"a\\nb\"}\n"),
    ("module param comma", "name: t\nsteps:\n  - module: {name: m, params: {'a,b': 1}}\n"),
    ("guest run and argv", "name: t\nsteps:\n  - guest: {run: a, argv: [b]}\n"),
    ("guest background no name", "name: t\nsteps:\n  - guest: {run: a, background: true}\n"),
    ("wait nothing", "name: t\nsteps:\n  - wait: {}\n"),
    ("wait unknown kind", "name: t\nsteps:\n  - wait: {event: nope}\n"),
    ("wait unknown job", "name: t\nsteps:\n  - wait: {job: j}\n"),
    ("wait pcm unknown", "name: t\nsteps:\n  - wait: {pcm: nope}\n"),
    ("assert unknown rule", "name: t\nsteps:\n  - assert: {rule: nope}\n"),
    ("assert count empty", "name: t\nsteps:\n  - assert: {count: {kind: bound}}\n"),
    ("assert audio empty", "name: t\nsteps:\n  - assert: {audio: {}}\n"),
    ("play unknown device", "name: t\nsteps:\n  - play: {device: nope}\n"),
    ("play fault unknown", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1}\n"
                           "  - play: {device: s, fault: loud}\n"),
    ("play too long", "name: t\nsteps:\n  - plug: {device: s, model: AC97, port: rp1}\n"
                      "  - play: {device: s, seconds: 2h}\n"),
    ("parallel one branch", "name: t\nsteps:\n  - parallel: {a: [{sleep: 1ms}]}\n"),
    ("pause with args", "name: t\nsteps:\n  - pause: {x: 1}\n"),
    ("guest unknown os", "name: t\nguest: beos\n" + GOOD_STEPS),
    ("guest windows colon only", 'name: t\nguest: "windows:"\n' + GOOD_STEPS),
    ("guest windows outside", 'name: t\nguest: "windows:/dev/sda"\n' + GOOD_STEPS),
    ("guest windows yaml", 'name: t\nguest: "windows:ok.yaml"\n' + GOOD_STEPS),
    ("guest bad agent", "name: t\nguest: {os: linux, agent: telnet}\n" + GOOD_STEPS),
    ("hotplug mode bad", "name: t\nhotplug_mode: magic\n" + GOOD_STEPS),
    ("topology unknown preset", "name: t\ntopology: nope\n" + GOOD_STEPS),
    ("topology outside", "name: t\ntopology: /etc/passwd.yaml\n" + GOOD_STEPS),
    ("topology escaping", "name: t\ntopology: ../../x.yaml\n" + GOOD_STEPS),
    ("topology missing", "name: t\ntopology: missing.yaml\n" + GOOD_STEPS),
    ("topology secret file", "name: t\ntopology: secret.yaml\n" + GOOD_STEPS),
    ("inline topology bad", "name: t\ntopology: {ports: [{id: rp1, chassis: x}]}\n" + GOOD_STEPS),
    ("inline topology dup slot", "name: t\ntopology: {ports: [{id: a, chassis: 1, slot: 1}, "
                                 "{id: b, chassis: 1, slot: 1}]}\n" + GOOD_STEPS),
    ("inline topology deep", "name: t\ntopology: " + "{a: " * 80 + "1" + "}" * 80 + "\n" + GOOD_STEPS),
    ("duplicate key", "name: t\nname: u\n" + GOOD_STEPS),
    ("tab indentation", "name: t\nsteps:\n\t- sleep: 1ms\n"),
    ("yaml syntax", "name: [t\n" + GOOD_STEPS),
    ("two documents", "name: t\n" + GOOD_STEPS + "---\nname: u\n"),
    ("anchor recursion", "name: &a t\nsteps: &s [*s]\n"),
    ("alias bomb", "name: t\n" + GOOD_STEPS + "limits:\n  l0: &l0 [x,x,x,x,x,x,x,x,x]\n"
     + "".join(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]\n" for i in range(1, 9))),
    ("deep nesting", "name: t\n" + GOOD_STEPS + "x: " + "[" * 5000 + "]" * 5000 + "\n"),
    ("many keys", "name: t\n" + GOOD_STEPS + "".join(f"k{i}: 1\n" for i in range(300_000))),
    ("python tag", "name: !!python/object/apply:os.system ['true']\n" + GOOD_STEPS),
    ("binary tag", "name: !!binary aGVsbG8=\n" + GOOD_STEPS),
    ("timestamp name", "name: 2024-01-01\n" + GOOD_STEPS),
]

_RAW_SCENARIOS: list[tuple[str, bytes]] = [
    ("NUL byte", b"name: t\x00\n" + GOOD_STEPS.encode()),
    ("not UTF-8", b"name: t\xff\xfe\n" + GOOD_STEPS.encode()),
    ("UTF-16 BOM", "name: t\n".encode("utf-16")),
    ("control char", b"name: t\x07\n" + GOOD_STEPS.encode()),
    ("too big", b"name: t\n" + GOOD_STEPS.encode() + b"#" * (5 * 1024 * 1024)),
]

_RUN_JSON: list[tuple[str, str]] = [
    ("run.json not json", "{"),
    ("run.json a list", "[]"),
    ("run.json base_dir int", '{"base_dir": 5}'),
    ("run.json scenario_file number", '{"scenario_file": 5}'),
    ("run.json overrides wrong", '{"overrides": "x"}'),
    ("run.json deep", "[" * 100000 + "]" * 100000),
]

_TIMELINES: list[tuple[str, str]] = [
    ("timeline garbage", "this is not json\nnor this\n"),
    ("timeline header only bad version", '{"type": "header", "version": 999}\n'),
    ("timeline event wrong types", '{"type": "header"}\n{"t_host_ns": "x", "source": 1, "kind": 2}\n'
                                   '{"t_host_ns": 1}\n'),
    ("timeline unknown kind", '{"type": "header"}\n{"t_host_ns": 1, "source": "host.lab", '
                              '"kind": "nope"}\n{"t_host_ns": 2}\n'),
]

_LOGS: list[tuple[str, "str | bytes", str]] = [
    ("log prose", f"password {SECRET}\nnothing here\n", "auto"),
    ("log prose as setupapi", f"{SECRET}\n", "setupapi"),
    ("log prose as pnputil", f"{SECRET}\n", "pnputil"),
    ("log prose as event-json", f"{SECRET}\n", "event-json"),
    ("log prose as event-xml", f"{SECRET}\n", "event-xml"),
    ("log prose as evtx", f"{SECRET}\n", "evtx"),
    ("log prose as qmp", f"{SECRET}\n", "qmp-log"),
    ("log prose as timeline", f"{SECRET}\n", "timeline"),
    ("log binary", bytes(range(256)) * 20, "auto"),
    ("log empty", b"", "auto"),
    ("xml entity bomb", '<?xml version="1.0"?><!DOCTYPE e [<!ENTITY a "aaaa">'
                        '<!ENTITY b "&a;&a;&a;&a;&a;&a;">]><Events><Event xmlns='
                        '"http://schemas.microsoft.com/win/2004/08/events/event">&b;</Event>'
                        '</Events>', "event-xml"),
    ("xml external entity", '<?xml version="1.0"?><!DOCTYPE e [<!ENTITY x SYSTEM '
                            '"file:///etc/shadow">]><Event xmlns="http://schemas.microsoft.com/'
                            'win/2004/08/events/event">&x;</Event>', "event-xml"),
    ("json truncated", '[{"Id": 410, "ProviderName": "Microsoft-Windows-Kernel-PnP", "TimeCre',
     "event-json"),
    ("evtx header only", b"ElfFile\x00" + bytes(120), "evtx"),
]


def cases() -> list[Case]:
    out: list[Case] = []
    secret_topo = {"secret.yaml": f"{SECRET}: 1\n"}
    for name, body in _SCENARIO_BODIES:
        out.append((f"validate: {name}", ["validate", "{d}/s.yaml"], {"s.yaml": body, **secret_topo}))
    for name, raw in _RAW_SCENARIOS:
        out.append((f"validate: {name}", ["validate", "{d}/s.yaml"], {"s.yaml": raw}))
    # the same files through `run`: refused before any VM
    for name, body in _SCENARIO_BODIES[:12]:
        out.append((f"run: {name}", ["run", "{d}/s.yaml", "--runs", "{d}/runs"], {"s.yaml": body}))
    for name, text in _RUN_JSON:
        out.append((f"replay: {name}", ["replay", "{d}", "--iteration", "0", "--runs", "{d}/runs"],
                    {"run.json": text, "scenario.yaml": "name: t\n" + GOOD_STEPS}))
    for name, text in _TIMELINES:
        out.append((f"timeline: {name}", ["timeline", "{d}/timeline.jsonl"],
                    {"timeline.jsonl": text}))
    for name, data, fmt in _LOGS:
        out.append((f"inspect: {name}", ["inspect", "{d}/in.log", "--format", fmt],
                    {"in.log": data}))
    ok_log = "[    1.000000] pci 0000:00:01.0: BAR 0: no space for [mem size 0x1000]\n"
    argvs: list[tuple[str, list[str]]] = [
        ("no command", []),
        ("unknown command", ["frobnicate"]),
        ("validate no file", ["validate"]),
        ("validate missing", ["validate", "{d}/missing.yaml"]),
        ("validate a directory", ["validate", "{d}"]),
        ("validate /dev/zero", ["validate", "/dev/zero"]),
        ("validate /dev/null", ["validate", "/dev/null"]),
        ("run --seed text", ["run", "{d}/s.yaml", "--seed", "x"]),
        ("run --seed negative", ["run", "{d}/s.yaml", "--seed", "-1"]),
        ("run --repeat 0", ["run", "{d}/s.yaml", "--repeat", "0"]),
        ("run --set unknown", ["run", "{d}/s.yaml", "--set", "nope=1"]),
        ("run --set no =", ["run", "{d}/s.yaml", "--set", "nope"]),
        ("run --reset bad", ["run", "{d}/s.yaml", "--reset", "sometimes"]),
        ("run --guest bad", ["run", "{d}/s.yaml", "--guest", "beos"]),
        ("run --iteration out of range", ["run", "{d}/s.yaml", "--iteration", "99"]),
        ("run --until-fail 0", ["run", "{d}/s.yaml", "--until-fail", "0"]),
        ("replay missing dir", ["replay", "{d}/nope", "--iteration", "0"]),
        ("replay --attempts 0", ["replay", "{d}", "--iteration", "0", "--attempts", "0"]),
        ("timeline missing", ["timeline", "{d}/nope"]),
        ("timeline empty dir", ["timeline", "{d}"]),
        ("timeline --kind unknown", ["timeline", "{d}/t.jsonl", "--kind", "nope"]),
        ("timeline --source unknown", ["timeline", "{d}/t.jsonl", "--source", "nope"]),
        ("inspect no file", ["inspect"]),
        ("inspect directory", ["inspect", "{d}"]),
        ("inspect fifo-like /dev/zero", ["inspect", "/dev/zero"]),
        ("inspect --device no =", ["inspect", "{d}/k.log", "--device", "snd0"]),
        ("inspect --device bad name", ["inspect", "{d}/k.log", "--device", "a b=0000:00:01.0"]),
        ("inspect --limit bad", ["inspect", "{d}/k.log", "--limit", "query_stop_max_ms=x"]),
        ("inspect --limit unknown", ["inspect", "{d}/k.log", "--limit", "nope_ms=5"]),
        ("inspect --rules unknown", ["inspect", "{d}/k.log", "--rules", "nope"]),
        ("inspect --max-events -1", ["inspect", "{d}/k.log", "--max-events", "-1"]),
        ("demo --model empty", ["demo", "--model", ","]),
        ("demo --model unknown", ["demo", "--model", "AC79"]),
        ("demo --mode bad", ["demo", "--mode", "sideways"]),
        ("demo --cycles text", ["demo", "--cycles", "x"]),
        ("rebalance unknown trigger", ["rebalance", "teleport"]),
        ("rebalance --prop no =", ["rebalance", "reconfigure", "--prop", "foo"]),
        ("rebalance --prop romfile", ["rebalance", "reconfigure", "--prop", "romfile=/etc/shadow"]),
        ("rebalance --size bad", ["rebalance", "pressure", "--size", "48M"]),
        ("rebalance --model unknown", ["rebalance", "rescan", "--model", "AC79"]),
        ("rebalance two modes", ["rebalance", "rescan", "--mode", "both"]),
        ("image windows no iso", ["image", "windows", "--out", "{d}/w.qcow2", "--dry-run"]),
        ("image windows missing iso", ["image", "windows", "--iso", "{d}/none.iso", "--out",
                                       "{d}/w.qcow2", "--dry-run"]),
        ("image windows smp 0", ["image", "windows", "--iso", "{d}/s.yaml", "--out", "{d}/w.qcow2",
                                 "--smp", "0", "--dry-run"]),
        ("image windows timeout nan", ["image", "windows", "--iso", "{d}/s.yaml", "--out",
                                       "{d}/w.qcow2", "--timeout-min", "nan", "--dry-run"]),
        ("image windows disk negative", ["image", "windows", "--iso", "{d}/s.yaml", "--out",
                                         "{d}/w.qcow2", "--disk-size=-5G", "--dry-run"]),
        ("image windows index 0", ["image", "windows", "--iso", "{d}/s.yaml", "--out",
                                   "{d}/w.qcow2", "--image-index", "0", "--dry-run"]),
        ("collect-dump missing", ["collect-dump", "{d}/nope"]),
    ]
    for name, argv in argvs:
        out.append((f"argv: {name}", argv, {"s.yaml": "name: t\n" + GOOD_STEPS, "k.log": ok_log,
                                             "t.jsonl": '{"type": "header"}\n'}))
    return out
