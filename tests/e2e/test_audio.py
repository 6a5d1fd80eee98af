"""Hear the rebalance: the shipped audio scenarios through the CLI, as a user runs them.

The guest plays the lab's counter signal with aplay, a rescan rebalance stops the
device mid-stream, the player is reopened when the PCM is back, and the host's
analysis of QEMU's capture gives the outage on every iteration; the planted glitch
must be caught with its own signature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lab.events import Kind, Source
from lab.image import GuestImage
from lab.timeline import Timeline
from tests.e2e.test_scenarios import SCENARIOS, rebalab, run_dir_of

# serial: the guest plays in real time and the capture must have no gap over 20 ms and no
# discontinuity but the planted one; a guest starved of CPU by another VM underruns
pytestmark = pytest.mark.serial


def _summary(run: Path) -> dict[str, Any]:
    return json.loads((run / "summary.json").read_text())


def test_outage_is_measured_on_every_iteration(image: GuestImage, tmp_path: Path) -> None:
    r = rebalab("run", str(SCENARIOS / "audio-across-rebalance.yaml"), "--repeat", "1",
                "--runs", str(tmp_path))
    out = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, out
    run = run_dir_of(r.stdout)
    s = _summary(run)
    its = s["iterations"]
    assert len(its) == 4 and all(it["status"] == "passed" for it in its), out
    for it in its:
        m = it["measurements"]
        # one stream before the rebalance, one after the reopen; the outage is a number
        assert m["audio_streams"] == 2, (it["index"], m)
        assert 0 < m["audio_outage_ms"] < 5000, (it["index"], m)
        assert m["audio_discontinuities"] == 0 and m["audio_longest_gap_ms"] <= 20, m
        audio = json.loads((run / it["artifacts"]["audio"]).read_text())["summary"]
        assert audio["signal"] == "counter" and audio["resumed"] is True
        # on the timeline: the stream stops after the driver's remove began, and is
        # heard again after the driver was bound again
        tl = Timeline.read(run / "iterations" / str(it["index"]) / "timeline.jsonl")
        dev = it["parameters"]["device"]
        kinds = [e.kind for e in tl.select(sources=Source.HOST_AUDIO)]
        assert kinds[0] == Kind.AUDIO_START and Kind.AUDIO_STOP in kinds, kinds
        resumed = tl.last(Kind.AUDIO_RESUMED)
        stop = tl.first(Kind.AUDIO_STOP)
        assert resumed is not None and stop is not None and resumed.device is not None
        assert resumed.device.qom == dev
        assert abs(resumed.duration_ns / 1e6 - m["audio_outage_ms"]) < 0.01
        removed = tl.first(Kind.REMOVE_ENTER, device=dev)
        bound = tl.last(Kind.PROBE_EXIT, device=dev)
        assert removed is not None and bound is not None
        assert stop.t_host_ns < bound.t_host_ns < resumed.t_host_ns
    # the outage per device and per delay, in the summary and the console tables
    for name in ("device", "delay_ms"):
        for g in s["by_parameter"][name]:
            assert g["measurements"]["audio_outage_ms"]["n"] == 2
    assert "audio_outage_ms" in r.stdout and "measured: median, max" in r.stdout
    html = (run / "report.html").read_text()
    assert "audio_outage_ms" in html and ">audio<" in html
    # `rebalab timeline` shows the audio lane's events next to the driver's
    rt = rebalab("timeline", str(run), "--iteration", "0", "--source", "host.audio")
    assert rt.returncode == 0 and "audio-resumed" in rt.stdout, rt.stdout[-2000:]


def test_planted_glitch_is_caught_with_its_signature(image: GuestImage, tmp_path: Path) -> None:
    r = rebalab("run", str(SCENARIOS / "audio-planted-glitch.yaml"), "--runs", str(tmp_path))
    out = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 1, out
    run = run_dir_of(r.stdout)
    s = _summary(run)
    its = s["iterations"]
    assert [it["status"] for it in its] == ["failed", "failed"], out
    jumps = {"drop-100ms": 4410, "repeat-buffer": -1024}
    for it in its:
        viol = [v for v in it["violations"] if v["rule"] == "audio.discontinuity"]
        assert len(viol) == 1 and viol[0]["device"] == "snd0", it["violations"]
        assert viol[0]["phase"].startswith("after:rebalance"), viol[0]
        # nothing else: the restart itself is no glitch, the outage is within its limit
        assert {v["rule"] for v in it["violations"]} == {"audio.discontinuity"}, it["violations"]
        tl = Timeline.read(run / "iterations" / str(it["index"]) / "timeline.jsonl")
        (glitch,) = tl.select(kinds=Kind.AUDIO_DISCONTINUITY)
        assert glitch.data["jump"] == jumps[it["parameters"]["fault"]], glitch.data
        assert it["measurements"]["audio_streams"] == 2
    sigs = {x["signature"]: x for x in s["signatures"]}
    assert sigs["audio.discontinuity@snd0/after:rebalance"]["count"] == 2
