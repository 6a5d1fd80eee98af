"""lab.merge: shard run directories back into one run, and every refusal.

The shards are made the way real ones are: lab.report writes their summaries from
IterationResults (lab.report.sample's realistic sweep with failures and a lab
error), each shard holding the iterations its rule gives it, with a shard record
from lab.shard. The merged summary is compared with the unsharded one built from
the same results.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.cli import main
from lab.merge import MergeRefused, merge
from lab.report import build_summary, load_summary, write_summary
from lab.report.sample import sample_run
from lab.results import Status
from lab.scenario.overrides import Overrides
from lab.shard import Shard, scenario_sha256

SCENARIO_TEXT = "name: sweep-rebalance-delay\n# (the shards' scenario file)\n"
SIZE = 10          # lab.report.sample's sweep


def make_shard(root: Path, k: int, n: int, *, seed: int = 1234, text: str = SCENARIO_TEXT,
               overrides: Overrides | None = None, sweep_size: int = SIZE,
               drop: int | None = None) -> Path:
    """A shard's run directory: the sample run's iterations k-1, k-1+n, ... only."""
    d = root / f"shard-{k}-of-{n}"
    d.mkdir(parents=True)
    info, results = sample_run(d)
    shard = Shard(k, n)
    mine = [r for r in results if shard.owns(r.index) and r.index != drop]
    for it_dir in (d / "iterations").iterdir():
        if not shard.owns(int(it_dir.name)):
            shutil.rmtree(it_dir)
    rec = shard.to_json(sweep_size, scenario=info.scenario, scenario_sha256=scenario_sha256(text),
                        seed=seed, overrides=(overrides or Overrides()).to_json())
    from dataclasses import replace
    info = replace(info, shard=rec, seed=seed,
                   started_at=f"2024-11-22T05:40:{k:02d}+00:00",
                   ended_at=f"2024-11-22T05:50:{k:02d}+00:00")
    write_summary(d, info, mine)
    (d / "run.json").write_text(json.dumps({"command": "run", "shard": rec,
                                            "scenario": {"name": info.scenario, "until": None},
                                            "iterations": shard.indices(sweep_size)}))
    (d / "scenario.yaml").write_text(text)
    (d / "lab.log").write_text(f"shard {k}/{n} log\n")
    (d / "vm1").mkdir()
    (d / "vm1" / "console.log").write_text("console\n")
    return d


def unsharded(root: Path) -> Any:
    d = root / "whole"
    d.mkdir()
    info, results = sample_run(d)
    return build_summary(info, results)


def comparable(summary: Any) -> dict[str, Any]:
    """What must match between a merged run and the unsharded run (timing may not)."""
    doc = summary.to_json()
    return {"status": doc["status"], "exit_code": doc["exit_code"], "counts": doc["counts"],
            "signatures": doc["signatures"], "by_parameter": doc["by_parameter"],
            "by_combination": doc["by_combination"],
            "iterations": [{k: it[k] for k in ("index", "parameters", "seed", "status",
                                                 "violations", "error")}
                           for it in doc["iterations"]]}


@pytest.mark.parametrize("n", [1, 2, 3, 10])
def test_merged_shards_equal_the_unsharded_run(n: int, tmp_path: Path) -> None:
    shards = [make_shard(tmp_path, k, n) for k in range(1, n + 1)]
    out = tmp_path / "merged"
    result = merge(list(reversed(shards)), out)          # any order
    whole = unsharded(tmp_path)
    assert comparable(result.summary) == comparable(whole)
    # the reproduction rates are over all iterations that ran, not per shard
    sig = result.summary.signatures[0]
    assert sig.ran == whole.ran == 10 and sig.count == whole.signatures[0].count
    # written and readable again, by the same functions a run uses
    assert comparable(load_summary(out)) == comparable(whole)
    assert result.summary.exit_code == 1                 # failures outrank the lab error
    cases = ET.parse(out / "junit.xml").getroot().findall(".//testcase")
    assert len(cases) == SIZE
    html = (out / "report.html").read_text()
    assert "sweep-rebalance-delay" in html and "no timeline file" not in html
    # artifacts copied: each iteration where a run puts it, the rest per shard
    for k in range(SIZE):
        assert (out / "iterations" / str(k) / "timeline.jsonl").is_file()
    for k in range(1, n + 1):
        assert (out / "shards" / f"{k}-of-{n}" / "lab.log").read_text() == f"shard {k}/{n} log\n"
        assert (out / "shards" / f"{k}-of-{n}" / "vm1" / "console.log").is_file()
        assert not (out / "shards" / f"{k}-of-{n}" / "iterations").exists()
    merged = json.loads((out / "MERGED.json").read_text())
    assert merged["artifacts"] == "copied" and merged["total"] == n
    assert [s["shard"] for s in merged["sources"]] == [f"{k}/{n}" for k in range(1, n + 1)]
    assert sum(s["iterations"] for s in merged["sources"]) == SIZE
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == list(range(SIZE)) and run["shard"]["merged"] is True
    assert (out / "scenario.yaml").read_text() == SCENARIO_TEXT
    info = load_summary(out).run
    assert info.shard is not None and info.shard["total"] == n and info.shard["merged"]
    assert info.started_at == "2024-11-22T05:40:01+00:00"      # the first shard's start
    assert info.ended_at == f"2024-11-22T05:50:{n:02d}+00:00"     # the last one's end


def test_a_merge_that_differs_from_the_whole_run_is_detected(tmp_path: Path) -> None:
    """The comparison above can fail: two shards of 1/2 stitched as 1/2 + 2/2 would
    not pass the checks, and a merged run missing an iteration differs."""
    shards = [make_shard(tmp_path, k, 2) for k in (1, 2)]
    result = merge(shards, tmp_path / "m")
    whole = comparable(unsharded(tmp_path))
    got = comparable(result.summary)
    got["iterations"] = got["iterations"][1:]
    assert got != whole


def _refusal(paths: list[Path], out: Path) -> str:
    with pytest.raises(MergeRefused) as exc:
        merge(paths, out)
    msg = str(exc.value)
    assert "\n" not in msg
    assert not out.exists()           # refused before anything was written
    return msg


def test_a_missing_shard_is_named(tmp_path: Path) -> None:
    s = [make_shard(tmp_path, k, 4) for k in (1, 2, 4)]
    msg = _refusal(s, tmp_path / "out")
    assert "shard 3/4 is missing" in msg and str(s[0]) in msg and "--shard K/4" in msg


def test_a_shard_given_twice_is_named(tmp_path: Path) -> None:
    a = make_shard(tmp_path / "a", 1, 2)
    b = make_shard(tmp_path / "b", 1, 2)
    c = make_shard(tmp_path / "c", 2, 2)
    msg = _refusal([a, c, b], tmp_path / "out")
    assert "shard 1/2 is given twice" in msg and str(a) in msg and str(b) in msg
    msg = _refusal([a, a, c], tmp_path / "out")
    assert "the same directory" in msg


@pytest.mark.parametrize("change,needle", [
    ({"seed": 99}, "seeds differ (1234 and 99)"),
    ({"text": "name: another\n"}, "scenario files differ"),
    ({"overrides": Overrides(sets=("delay_ms=100",))}, "overrides"),
])
def test_shards_of_different_runs_are_refused(change: dict[str, Any], needle: str,
                                              tmp_path: Path) -> None:
    a = make_shard(tmp_path / "a", 1, 2)
    b = make_shard(tmp_path / "b", 2, 2, **change)
    msg = _refusal([a, b], tmp_path / "out")
    assert needle in msg and str(a) in msg and str(b) in msg and "not shards of one run" in msg


def test_different_shard_totals_are_named_as_such(tmp_path: Path) -> None:
    a = make_shard(tmp_path / "a", 1, 2)
    b = make_shard(tmp_path / "b", 2, 3)
    assert "shard totals differ (2 and 3)" in _refusal([a, b], tmp_path / "out")


def test_directories_that_are_not_run_directories_are_refused(tmp_path: Path) -> None:
    good = make_shard(tmp_path, 1, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "not a run directory (no summary.json)" in _refusal([empty], tmp_path / "out")
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert "not a run directory (not a directory)" in _refusal([f], tmp_path / "out")
    # a summary that is not rebalab's: named, its content not quoted
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    (bad / "summary.json").write_text('{"schema": "rebalab.summary/1", "run": "SECRET"}')
    msg = _refusal([bad], tmp_path / "out")
    assert "not a rebalab summary" in msg and "SECRET" not in msg
    (bad / "summary.json").write_text("SECRET not json")
    msg = _refusal([bad], tmp_path / "out")
    assert "not valid JSON" in msg and "SECRET" not in msg
    # a FIFO where summary.json should be is refused, not read (it would hang)
    (bad / "summary.json").unlink()
    os.mkfifo(bad / "summary.json")
    assert "not a regular file" in _refusal([bad], tmp_path / "out")


def test_an_unsharded_run_and_a_merged_run_are_not_shards(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    d.mkdir()
    info, results = sample_run(d)
    write_summary(d, info, results)
    (d / "run.json").write_text(json.dumps({"command": "run"}))
    (d / "scenario.yaml").write_text(SCENARIO_TEXT)
    assert "not a shard" in _refusal([d], tmp_path / "out")
    merged = merge([make_shard(tmp_path, 1, 1)], tmp_path / "m").out
    assert "already a merged run" in _refusal([merged], tmp_path / "out")


def test_edited_shards_are_refused(tmp_path: Path) -> None:
    # a result that is not the shard's, or one missing: the rate would be wrong
    a = make_shard(tmp_path / "a", 1, 2, drop=4)
    b = make_shard(tmp_path / "b", 2, 2)
    assert "lacks iteration 4" in _refusal([a, b], tmp_path / "out")
    c = make_shard(tmp_path / "c", 1, 2)
    doc = json.loads((c / "summary.json").read_text())
    doc["iterations"][0]["index"] = 1
    (c / "summary.json").write_text(json.dumps(doc))
    assert "iteration 1 is not shard 1/2's" in _refusal([c, b], tmp_path / "out")
    # scenario.yaml swapped after the run
    d = make_shard(tmp_path / "d", 1, 2)
    (d / "scenario.yaml").write_text("name: other\n")
    assert "does not match the scenario hash" in _refusal([d, b], tmp_path / "out")
    # fields of the wrong type are named, not a crash
    f = make_shard(tmp_path / "f", 1, 2)
    doc = json.loads((f / "summary.json").read_text())
    doc["iterations"][0]["parameters"] = 5
    doc["run"]["accelerator"] = 7
    (f / "summary.json").write_text(json.dumps(doc))
    assert "parameters or seed are not what rebalab writes" in _refusal([f, b], tmp_path / "out")
    # a shard record that is not one
    e = make_shard(tmp_path / "e", 1, 2)
    doc = json.loads((e / "summary.json").read_text())
    doc["run"]["shard"]["total"] = "two"
    (e / "summary.json").write_text(json.dumps(doc))
    assert "no valid 'total'" in _refusal([e, b], tmp_path / "out")
    # a sweep larger than any run may have (it would be listed in memory)
    g = make_shard(tmp_path / "g", 1, 2)
    doc = json.loads((g / "summary.json").read_text())
    doc["run"]["shard"]["sweep_size"] = 10**15
    (g / "summary.json").write_text(json.dumps(doc))
    (g / "run.json").write_text(json.dumps({"shard": doc["run"]["shard"]}))
    assert "impossible shard" in _refusal([g, b], tmp_path / "out")
    # run.json and summary.json disagree
    h = make_shard(tmp_path / "h", 1, 2)
    meta = json.loads((h / "run.json").read_text())
    meta["shard"]["index"] = 2
    (h / "run.json").write_text(json.dumps(meta))
    assert "name different shards" in _refusal([h, b], tmp_path / "out")


def test_out_must_be_new_and_apart_from_the_shards(tmp_path: Path) -> None:
    s = make_shard(tmp_path, 1, 1)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep me")
    with pytest.raises(MergeRefused, match="not empty"):
        merge([s], busy)
    assert (busy / "x").read_text() == "keep me"
    with pytest.raises(MergeRefused, match="overlaps the shard directory"):
        merge([s], s / "merged")
    with pytest.raises(MergeRefused, match="overlaps"):
        merge([s], s)
    empty = tmp_path / "empty-out"
    empty.mkdir()
    assert merge([s], empty).summary.counts["total"] == SIZE


def test_symlinks_and_fifos_in_a_shard_are_not_copied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret")
    s = make_shard(tmp_path / "s", 1, 1)
    (s / "iterations" / "0" / "leak.txt").symlink_to(secret)
    (s / "iterations" / "0" / "rel-leak.txt").symlink_to("../../../../secret.txt")
    (s / "vm1" / "leakdir").symlink_to(tmp_path)
    os.mkfifo(s / "iterations" / "1" / "pipe")
    # what a run makes: a link from the iteration to its VM's log, inside the shard
    (s / "iterations" / "2" / "vm").mkdir()
    (s / "iterations" / "2" / "vm" / "console.log").symlink_to("../../../vm1/console.log")
    result = merge([s], tmp_path / "out")
    out = tmp_path / "out"
    for gone in ("iterations/0/leak.txt", "iterations/0/rel-leak.txt",
                 "shards/1-of-1/vm1/leakdir", "iterations/1/pipe"):
        assert not os.path.lexists(out / gone), gone
    assert result.left_out == 4
    kept = out / "iterations" / "2" / "vm" / "console.log"
    assert kept.is_symlink() and kept.read_text() == "console\n"
    assert kept.resolve() == (out / "shards" / "1-of-1" / "vm1" / "console.log").resolve()
    merged = json.loads((out / "MERGED.json").read_text())
    src = merged["sources"][0]
    assert src["left_out"] == 4 and src["symlinks_remade"] == 1
    assert any("not copied" in n for n in merged["notes"])
    assert "host secret" not in "".join(p.read_text(errors="replace")
                                        for p in out.rglob("*") if p.is_file())


def test_interrupted_and_failed_shards_merge_to_the_worst_status(tmp_path: Path) -> None:
    a = make_shard(tmp_path, 1, 2)
    b = make_shard(tmp_path, 2, 2)
    doc = json.loads((b / "summary.json").read_text())
    doc["run"]["status"] = "interrupted"
    doc["run"]["stopped_at"] = "interrupted: Ctrl-C"
    (b / "summary.json").write_text(json.dumps(doc))
    result = merge([a, b], tmp_path / "out")
    assert result.summary.status == Status.INTERRUPTED and result.summary.exit_code == 130
    assert result.summary.run.stopped_at == "shard 2/2: interrupted: Ctrl-C"


def test_cli_merge_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = [make_shard(tmp_path, k, 2) for k in (1, 2)]
    out = tmp_path / "merged"
    assert main(["merge", *map(str, shards), "--out", str(out)]) == 1     # the sample fails
    text = capsys.readouterr().out
    assert f"run directory: {out}" in text and "merged 2 shards" in text
    assert main(["merge", str(shards[0]), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "shard 2/2 is missing" in err and err.count("\n") == 1
    assert main(["merge", str(shards[0])]) == 2                          # --out is required
    assert "--out" in capsys.readouterr().err


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=2)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=2), max_leaves=4)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_edited_summary_is_refused_or_merged_never_a_crash(data: st.DataObject,
                                                               tmp_path: Path) -> None:
    """Shard directories are someone else's files: any one value of summary.json
    replaced by any JSON value gives a merge or a MergeRefused, nothing else."""
    root = Path(tempfile.mkdtemp(dir=tmp_path))
    a, b = make_shard(root, 1, 2), make_shard(root, 2, 2)
    doc = json.loads((a / "summary.json").read_text())
    path = data.draw(st.sampled_from(_paths(doc)))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = data.draw(_JSON)
    (a / "summary.json").write_text(json.dumps(doc))
    try:
        merge([a, b], root / "out")
    except MergeRefused as exc:
        assert "\n" not in str(exc)
        assert not (root / "out").exists()
    assert not list(root.glob(".out-*"))         # no half-built directory either way


def test_a_write_that_fails_half_way_leaves_nothing(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import lab.report
    from lab.errors import LabError

    shards = [make_shard(tmp_path, k, 2) for k in (1, 2)]

    def full(*a: object, **k: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lab.report, "write_junit", full)
    with pytest.raises(LabError, match="No space left on device.*nothing was left there"):
        merge(shards, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))
