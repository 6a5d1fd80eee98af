"""Kernel oops/BUG/WARNING/panic detection and attribution; GUEST_PANICKED."""

from __future__ import annotations

from lab.events import DeviceId, Event, Kind, Source
from lab.rules import RuleContext, check_all
from lab.rules.kernel_oops import classify, strip_prefix
from lab.timeline import Timeline

SND = DeviceId(qom="snd0", bdf="0000:01:00.0")

NULL_DEREF = """\
[   45.123456] BUG: kernel NULL pointer dereference, address: 0000000000000008
[   45.123500] #PF: supervisor read access in kernel mode
[   45.123510] #PF: error_code(0x0000) - not-present page
[   45.123520] PGD 0 P4D 0
[   45.123530] Oops: 0000 [#1] PREEMPT SMP NOPTI
[   45.123540] CPU: 0 PID: 123 Comm: kworker/0:2 Not tainted 6.1.0-18-amd64 #1  Debian 6.1.76-1
[   45.123550] Hardware name: QEMU Standard PC (Q35 + ICH9, 2009), BIOS 1.16.2-debian-1.16.2-1
[   45.123560] Workqueue: events azx_probe_work [snd_hda_intel]
[   45.123570] RIP: 0010:azx_probe_continue+0x42/0x3a0 [snd_hda_intel]
[   45.123580] Code: 48 8b 47 08 <48> 8b 40 08
[   45.123590] RSP: 0018:ffffb3c0c03abe38 EFLAGS: 00010246
[   45.123600] Call Trace:
[   45.123610]  <TASK>
[   45.123620]  process_one_work+0x1c7/0x380
[   45.123630]  worker_thread+0x4d/0x380
[   45.123640]  kthread+0xd7/0x100
[   45.123650]  ret_from_fork+0x1f/0x30
[   45.123660]  </TASK>
[   45.123670] Modules linked in: snd_hda_intel snd_intel_dspcfg snd_hda_codec
[   45.123680] CR2: 0000000000000008
[   45.123690] ---[ end trace 0000000000000000 ]---"""

WARN = """\
[   50.000001] ------------[ cut here ]------------
[   50.000002] WARNING: CPU: 0 PID: 1 at drivers/pci/pci.c:2204 pci_disable_device+0x8a/0xa0
[   50.000003] Modules linked in: snd_hda_intel e1000
[   50.000004] RIP: 0010:pci_disable_device+0x8a/0xa0
[   50.000005] Call Trace:
[   50.000006]  e1000_remove+0x60/0x90 [e1000]
[   50.000007] ---[ end trace 0000000000000001 ]---"""


def log_events(text: str, t0_ms: float, src: Source = Source.GUEST_KERNEL) -> list[Event]:
    out = []
    for i, line in enumerate(text.splitlines()):
        t = int((t0_ms + i * 0.01) * 1e6)
        out.append(Event(t, src, Kind.KERNEL_LOG, data={"message": line}, t_guest_ns=t))
    return out


def run(*evs: Event, **ctx: object) -> list:
    tl = Timeline.build(list(evs), devices=[SND])
    ctx.setdefault("devices", (SND,))
    ctx.setdefault("drivers", {"snd_hda_intel": "snd0"})
    return check_all(tl, RuleContext.from_timeline(tl, **ctx),   # type: ignore[arg-type]
                     ["kernel-oops"])


def test_null_dereference_is_one_oops_attributed_to_the_driver() -> None:
    vs = run(*log_events("[   45.000000] snd_hda_intel 0000:01:00.0: enabling device", 0),
             *log_events(NULL_DEREF, 10))
    assert [(v.rule, v.device) for v in vs] == [("kernel.oops", "snd0")]
    lines = vs[0].details["lines"]
    assert len(lines) == 15 and lines[0].startswith("BUG: kernel NULL pointer dereference")
    assert "NULL pointer dereference" in vs[0].message
    assert len(vs[0].events) == 2


def test_warning_in_another_driver_is_the_guests() -> None:
    vs = run(*log_events(WARN, 0))
    assert [(v.rule, v.device) for v in vs] == [("kernel.warning", "guest")]
    assert vs[0].details["lines"][0].startswith("WARNING: CPU: 0 PID: 1")


def test_two_reports_separated_by_end_marker() -> None:
    vs = run(*log_events(WARN, 0), *log_events(NULL_DEREF, 0.5))
    assert [v.rule for v in vs] == ["kernel.warning", "kernel.oops"]


def test_panic_upgrades_the_report_and_bdf_attributes() -> None:
    text = ("[ 1.0] general protection fault, probably for non-canonical address 0xdead: 0000\n"
            "[ 1.1] RIP: 0010:pci_read_config_word+0x1/0x20\n"
            "[ 1.2] snd_hda_intel 0000:01:00.0: something\n"
            "[ 1.3] Kernel panic - not syncing: Fatal exception")
    vs = run(*log_events(text, 0), drivers={})
    assert [(v.rule, v.device) for v in vs] == [("kernel.panic", "snd0")]


def test_prebuilt_oops_event_with_lines() -> None:
    e = Event(5, Source.GUEST_KERNEL, Kind.KERNEL_OOPS,
              data={"lines": ["Unable to handle kernel paging request at ffff", "Call Trace:",
                              " azx_remove+0x1/0x2 [snd_hda_intel]"]})
    vs = run(e)
    assert [(v.rule, v.device) for v in vs] == [("kernel.oops", "snd0")]


def test_benign_lines_are_not_reports() -> None:
    benign = ["ACPI Warning: SystemIO range conflicts", "BUGS: none",
              "pci 0000:00:03.0: BAR 14: no space for [mem size 0x04000000]",
              "snd_hda_intel 0000:01:00.0: no codecs found!", "WARNING: unsupported option"]
    assert [classify(strip_prefix(x)) for x in benign] == [None] * len(benign)
    assert run(*log_events("\n".join(benign), 0)) == []
    # host-side text is never a guest report
    host = Event(0, Source.HOST_LAB, Kind.KERNEL_LOG, data={"message": "BUG: in the host?"})
    assert run(host) == []


def test_hung_task() -> None:
    vs = run(*log_events("[ 240.1] INFO: task kworker/0:1:42 blocked for more than 120 seconds.\n"
                         "[ 240.2]  azx_remove+0x10/0x40 [snd_hda_intel]", 0))
    assert [(v.rule, v.device) for v in vs] == [("kernel.hung-task", "snd0")]


def test_guest_panicked_is_a_bugcheck() -> None:
    e = Event(7, Source.HOST_QMP, Kind.GUEST_PANICKED,
              data={"action": "pause", "info": {"type": "hyper-v", "arg1": 0x9F, "arg2": 3}})
    vs = run(e)
    assert [(v.rule, v.device) for v in vs] == [("bugcheck", "guest")]
    assert "0x9f" in vs[0].message and vs[0].details["info"]["arg1"] == 0x9F


def test_strip_prefix() -> None:
    assert strip_prefix("<4>[   12.5] [  T42] WARNING: x") == "WARNING: x"
    assert strip_prefix("plain") == "plain"
