"""report.html: self-contained (no scripts, no network), violations visible and linked."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lab.events import DeviceId, Event, Kind, Source
from lab.report.html import (choose_iterations, layout_timeline, read_timeline, render_report,
                             safe_href, write_report)
from lab.report.sample import sample_run
from lab.report.summary import RunInfo, build_summary, write_summary
from lab.results import EventRef, IterationResult, Status, StepTiming, Violation


class Page(HTMLParser):
    """Collects what matters for self-containment and for the content checks."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.ids: set[str] = set()
        self.styles: list[str] = []
        self.titles: list[str] = []
        self._in: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self._in.append(tag)
        for k, v in attrs:
            self.attrs.append((tag, k, v or ""))
            if k == "id" and v:
                self.ids.add(v)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        self._in.pop()

    def handle_endtag(self, tag: str) -> None:
        while self._in and self._in.pop() != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._in and self._in[-1] == "style":
            self.styles.append(data)
        if self._in and self._in[-1] == "title":
            self.titles.append(data)
        self.text.append(data)


def parse(html: str) -> Page:
    p = Page()
    p.feed(html)
    p.close()
    return p


EXTERNAL = re.compile(r"^\s*(https?:|//|ftp:|data:text/html|javascript:)", re.I)


def assert_self_contained(page: Page, html: str) -> None:
    for bad in ("script", "link", "iframe", "object", "embed", "img", "base", "use"):
        assert bad not in page.tags, f"<{bad}> present"
    for tag, key, val in page.attrs:
        assert not key.startswith("on"), f"event handler {key} on <{tag}>"
        if key in ("href", "src", "xlink:href", "action", "srcset", "poster"):
            assert not EXTERNAL.match(val), f"external reference {tag}.{key}={val}"
            assert not val.startswith("/"), f"absolute path {val}"
        if key == "style":
            assert "url(" not in val
    css = "\n".join(page.styles)
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"<[^>]*\ssrc\s*=", html)          # no src= inside any tag


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    info, results = sample_run(tmp_path)
    write_summary(tmp_path, info, results)
    return tmp_path


def test_sample_report_is_self_contained_and_shows_violations(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report.html"
    html = out.read_text()
    page = parse(html)
    assert_self_contained(page, html)
    assert "svg" in page.tags and "circle" in page.tags and "rect" in page.tags
    # failing iterations get pictures (2, 7, 8 failed; 9 is a lab error), failures first
    assert {"tl-2", "tl-7", "tl-8", "tl-9"} <= page.ids
    assert "tl-0" not in page.ids
    # violation rows exist and the picture links to them
    assert {"v-2-0", "v-8-0", "v-8-1"} <= page.ids
    links = {v for t, k, v in page.attrs if k == "href"}
    assert {"#v-2-0", "#v-8-1", "#tl-2", "#it-8"} <= links
    text = "".join(page.text)
    assert "linux.callback-after-remove@snd0/rebalance" in text
    assert "3 of 10 (30.0 %)" in text
    assert "±1.40 ms" in text                                # the alignment bound
    assert "tcg" in text and "sweep-rebalance-delay" in text
    assert "guest agent: timed out" in text                  # the lab error is shown
    # tooltips on marks
    assert any("bar-unmapped" in t and "source: host.qemu-trace" in t for t in page.titles)
    assert any(t.startswith("violation 1: linux.callback-after-remove") for t in page.titles)
    # swimlanes per source
    for lane in ("host.qmp", "host.qemu-trace", "host.lab", "guest.kernel", "guest.kprobe"):
        assert lane in text
    # relative artifact links
    assert {"iterations/2/timeline.jsonl", "iterations/2/", "run.json", "qmp.jsonl"} <= links


def test_untrusted_text_is_escaped(tmp_path: Path) -> None:
    evil = "<script>alert(1)</script><img src=//evil.example/x>"
    ev = [Event(t_host_ns=10**9, source=Source.GUEST_KERNEL, kind=Kind.KERNEL_LOG,
                device=DeviceId(qom=evil), data={"msg": evil}, seq=1)]
    v = Violation(evil, evil, evil, evil, (EventRef(1, 10**9, "kernel-log", "guest.kernel", evil),))
    r = IterationResult(index=0, parameters={"p": evil}, seed=0, status=Status.FAILED,
                        violations=(v,), timings=(StepTiming(evil, 10**9, 10**6),),
                        artifacts={"x": "https://evil.example/a", "y": "//evil/b", "z": "/etc/p",
                                   "ok": "iterations/0/a b.log"},
                        error=evil)
    info = RunInfo(scenario=evil, versions={"qemu": evil}, guest=evil)
    html = render_report(build_summary(info, [r]), {0: ev})
    page = parse(html)
    assert_self_contained(page, html)
    assert "<script>" not in html and "&lt;script&gt;" in html
    hrefs = {v for t, k, v in page.attrs if k == "href"}
    assert "iterations/0/a%20b.log" in hrefs
    assert not any("evil" in h for h in hrefs)


def test_passing_run_shows_first_iteration(tmp_path: Path) -> None:
    info, results = sample_run(tmp_path)
    ok = [r for r in results if r.status == Status.PASSED]
    s = build_summary(info, ok)
    assert choose_iterations(s) == [ok[0].index]
    html = write_report(tmp_path, s).read_text()
    page = parse(html)
    assert f"tl-{ok[0].index}" in page.ids
    assert "No rule or assert was violated." in html


def test_choose_iterations_order_and_limit(tmp_path: Path) -> None:
    info, results = sample_run(tmp_path)
    s = build_summary(info, results)
    assert choose_iterations(s) == [2, 7, 8, 9]
    assert choose_iterations(s, limit=2) == [2, 7]


def test_missing_timeline_still_renders(tmp_path: Path) -> None:
    r = IterationResult(index=0, parameters={}, seed=0, status=Status.FAILED,
                        violations=(Violation("r", "d", "p", "m",
                                              (EventRef(4, 2 * 10**9, "stop", "guest.pnp"),)),),
                        timings=(StepTiming("plug d", 10**9, 10**9),))
    s = write_summary(tmp_path, RunInfo(scenario="x"), [r])
    html = write_report(tmp_path, s).read_text()
    assert "no timeline file (iterations/0/timeline.jsonl)" in html
    page = parse(html)
    assert "v-0-0" in page.ids and "tl-0" in page.ids


def test_read_timeline(tmp_path: Path) -> None:
    e = Event(t_host_ns=5, source=Source.HOST_QMP, kind=Kind.QMP_EVENT, seq=1)
    p = tmp_path / "timeline.jsonl"
    p.write_text(json.dumps({"type": "header", "alignment": {"bound_ns": 900_000}}) + "\n"
                 + e.dumps() + "\n\nnot json\n" + json.dumps({"kind": "nope"}) + "\n")
    tl = read_timeline(p)
    assert tl.events == (e,)
    assert tl.alignment_bound_ns == 900_000
    assert tl.bad_lines == 2


def test_layout_places_events_in_lanes_and_time() -> None:
    t0 = 10**12
    evs = [Event(t0, Source.HOST_LAB, Kind.HOTPLUG_REQUEST, seq=1),
           Event(t0 + 50 * 10**6, Source.GUEST_KPROBE, Kind.PROBE_ENTER, duration_ns=10**7, seq=2),
           Event(t0 + 100 * 10**6, Source.HOST_QMP, Kind.DEVICE_DELETED, seq=3)]
    r = IterationResult(index=1, parameters={}, seed=0, status=Status.FAILED,
                        violations=(Violation("r", "d", "p", "m",
                                              (EventRef(2, t0 + 50 * 10**6, "probe-enter",
                                                        "guest.kprobe"),)),))
    view = layout_timeline(r, evs, bound_ns=2_000_000)
    assert [lane.name for lane in view.lanes] == ["host.lab", "host.qmp", "guest.kprobe"]
    assert view.lanes[2].label == "guest.kprobe ±2.0 ms"
    lab, qmp, kprobe = view.marks                   # drawn lane by lane
    assert view.plot_left < lab.x < kprobe.x < qmp.x < view.plot_right
    assert kprobe.x - lab.x == pytest.approx(qmp.x - kprobe.x)      # linear in time
    assert lab.y < qmp.y < kprobe.y
    assert len(view.spans) == 1 and view.spans[0].w > 2
    (vm,) = view.vmarks
    assert vm.href == "#v-1-0" and vm.x == pytest.approx(kprobe.x) and vm.y == kprobe.y
    assert view.ticks and view.ticks[0].label == "0"


def test_many_events_are_thinned() -> None:
    evs = [Event(i * 10**6, Source.GUEST_KPROBE, Kind.CALL_ENTER, seq=i + 1) for i in range(5000)]
    r = IterationResult(index=0, parameters={}, seed=0, status=Status.PASSED)
    view = layout_timeline(r, evs)
    assert len(view.marks) == 1500
    assert "1500 of 5000 events drawn" in view.notes[0]


def test_safe_href() -> None:
    assert safe_href("iterations/3/timeline.jsonl") == "iterations/3/timeline.jsonl"
    assert safe_href("a b#c.log") == "a%20b%23c.log"
    for bad in ("http://x", "https://x", "//x/y", "/abs", "javascript:alert(1)", "C:\\x", ""):
        assert safe_href(bad) is None
