"""``rebalab merge``: N shard runs (``run --shard K/N``) back into one run directory.

The merged ``summary.json``, ``junit.xml`` and ``report.html`` are rebuilt with the same
functions a run uses (lab.report ``build_summary``, ``write_junit``, ``write_report``)
from the shards' iteration results, so iterations, signatures and reproduction rates
are those of an unsharded run of the same seed: each iteration's parameters and seed
depend only on the scenario and its index (lab.scenario.sweep), and the shards'
indices are disjoint and cover the sweep (lab.shard). Only timing differs.

Nothing is merged silently. Refused, each naming the directories concerned: a
directory that is not a run directory (no readable summary.json / run.json), a run
made without ``--shard``, shards of different runs (another scenario file, seed,
overrides, topology or shard total), a shard given twice, a shard missing, and a
shard whose results are not the iterations its record claims.

Artifacts are **copied**, not referenced: shard directories usually arrive as CI
artifacts that expire, and the merged directory must stay readable without the tool
and without them. ``iterations/<k>/`` of each shard go to ``iterations/<k>/`` (the
report and ``rebalab replay``/``inspect`` find them where a run puts them); the rest
of each shard (lab.log, per-VM logs, its own reports) goes to ``shards/<K>-of-<N>/``;
``MERGED.json`` lists the sources. Shard directories are someone else's files: only
regular files and directories are copied (a FIFO would hang the copy), and a symlink
is never followed (it could pull in any file of this host): one that stays inside the
shard, as a run's ``iterations/K/vm/console.log`` does, is made again pointing at the
copy; what was left out is counted in MERGED.json.
JSON is read through lab.inputs (regular files, size caps, UTF-8) and errors never
quote the files' content.

A scenario with ``until:`` stops each shard at its own failures, so its merged run
can hold more iterations than the unsharded one would have run; MERGED.json says so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lab.errors import ConfigError, LabError
from lab.inputs import read_json, read_text
from lab.report.summary import RunInfo, Summary, build_summary
from lab.results import IterationResult, Status
from lab.scenario.sweep import MAX_ITERATIONS
from lab.shard import MAX_SHARDS, RULE, Shard, scenario_sha256
from vdevice.errors import SpecError

MERGED_FILE = "MERGED.json"
MERGED_SCHEMA = "rebalab.merged/1"
#: directories deeper than this in a shard are not copied (a run makes 3 levels)
MAX_COPY_DEPTH = 16
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class MergeRefused(ConfigError):
    """The directories given cannot be merged into one run (exit 2); the message
    names the directories and what to do."""


@dataclass(frozen=True)
class ShardRun:
    """One shard's run directory, checked: its summary, run.json and shard record."""

    path: Path
    summary: Summary
    meta: dict[str, Any]
    record: dict[str, Any]
    scenario_text: str

    @property
    def shard(self) -> Shard:
        return Shard(self.record["index"], self.record["total"], str(self.path))

    @property
    def label(self) -> str:
        return f"{self.record['index']}/{self.record['total']}"


@dataclass(frozen=True)
class MergeResult:
    out: Path
    summary: Summary
    shards: tuple[ShardRun, ...]
    copied_files: int
    left_out: int
    notes: tuple[str, ...]


# ---- reading one shard ---------------------------------------------------------------------

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_record(path: Path, rec: object) -> dict[str, Any]:
    where = f"{path}/summary.json: its shard record"
    if not isinstance(rec, Mapping):
        raise MergeRefused(f"{where} is not a mapping (the file was edited or is not "
                           "rebalab's)")
    checks: tuple[tuple[str, Any], ...] = (
        ("index", _is_int), ("total", _is_int), ("sweep_size", _is_int), ("seed", _is_int),
        ("rule", lambda v: v == RULE), ("scenario", lambda v: isinstance(v, str)),
        ("scenario_sha256", lambda v: isinstance(v, str) and bool(_SHA_RE.match(v))),
        ("overrides", lambda v: isinstance(v, Mapping)))
    for name, ok in checks:
        if name not in rec or not ok(rec[name]):
            raise MergeRefused(f"{where} has no valid {name!r} (made by another rebalab "
                               "version, or edited)")
    if not 1 <= rec["total"] <= MAX_SHARDS or not 1 <= rec["index"] <= rec["total"] \
            or not rec["total"] <= rec["sweep_size"] <= MAX_ITERATIONS:
        raise MergeRefused(f"{where} names an impossible shard (index, total and sweep "
                           "size out of range)")
    return dict(rec)


def load_shard(path: Path) -> ShardRun:
    """Read and check one shard's run directory; MergeRefused (one line) otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise MergeRefused(f"{path}: not a run directory (not a directory)")
    for name in ("summary.json", "run.json", "scenario.yaml"):
        if not os.path.lexists(path / name):
            raise MergeRefused(f"{path}: not a run directory (no {name}); a shard's job "
                               "that died before writing its reports is run again, not "
                               "merged")
    try:
        doc = read_json(path / "summary.json", "summary.json")
        meta = read_json(path / "run.json", "run.json")
        text = read_text(path / "scenario.yaml", "scenario.yaml")
    except SpecError as exc:
        raise MergeRefused(f"{path}: not a run directory ({exc.bare_message})") from None
    if not isinstance(meta, dict):
        raise MergeRefused(f"{path}/run.json: not a run record (not a mapping)")
    try:
        summary = Summary.from_json(doc)
    except (KeyError, TypeError, ValueError, AttributeError):
        raise MergeRefused(f"{path}/summary.json: not a rebalab summary (a field is missing "
                           "or has the wrong type)") from None
    rec = summary.run.shard if summary.run.shard is not None else meta.get("shard")
    if rec is None:
        raise MergeRefused(f"{path}: not a shard (run without --shard and without engine "
                           "shard variables); merge takes the N shard runs of one sweep")
    if isinstance(rec, Mapping) and rec.get("merged"):
        raise MergeRefused(f"{path}: already a merged run; merge the shard runs themselves")
    record = _check_record(path, rec)
    if meta.get("shard") is not None and meta.get("shard") != rec:
        raise MergeRefused(f"{path}: run.json and summary.json name different shards "
                           "(one of them was edited)")
    if scenario_sha256(text) != record["scenario_sha256"]:
        raise MergeRefused(f"{path}/scenario.yaml does not match the scenario hash in its "
                           "shard record (the directory was edited)")
    run = ShardRun(path, summary, meta, record, text)
    _check_results(run)
    _check_reportable(run)
    return run


def _check_reportable(run: ShardRun) -> None:
    """The shard's results go through the report functions now, before anything is
    written: a value of a type rebalab never writes (a null duration, a list for a
    message) is refused here, naming the file, instead of failing half-way through
    the merged directory."""
    from lab.report.junit import build_junit

    try:
        shard_summary = build_summary(run.summary.run, run.summary.results)
        json.dumps(shard_summary.to_json(), default=str)
        build_junit(shard_summary)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError, RecursionError):
        raise MergeRefused(f"{run.path}/summary.json: holds values of types rebalab does not "
                           "write (edited, or another tool's file)") from None


def _check_results(run: ShardRun) -> None:
    """The results must be exactly the shard's iterations, once each: a summary with
    fewer (cut) or others (edited, or a replay) would merge into a wrong rate."""
    want = run.shard.indices(run.record["sweep_size"])
    got: list[int] = []
    for r in run.summary.results:
        if not _is_int(r.index) or r.attempt is not None:
            raise MergeRefused(f"{run.path}/summary.json: holds a result that is not one "
                               "iteration of a sweep (a replay's attempt, or edited)")
        if not isinstance(r.parameters, dict) or not _is_int(r.seed):
            raise MergeRefused(f"{run.path}/summary.json: iteration {r.index}'s parameters "
                               "or seed are not what rebalab writes (edited)")
        got.append(r.index)
    if sorted(got) == want:
        return
    extra = sorted(set(got) - set(want))
    missing = sorted(set(want) - set(got))
    if extra:
        raise MergeRefused(f"{run.path}: iteration {extra[0]} is not shard {run.label}'s "
                           f"(its rule is {RULE}); the summary was edited or mixes runs")
    if missing:
        raise MergeRefused(f"{run.path}: shard {run.label} lacks iteration {missing[0]} "
                           f"({len(missing)} of its {len(want)} missing); run the shard again")
    raise MergeRefused(f"{run.path}: shard {run.label} lists an iteration twice")


# ---- the set of shards -----------------------------------------------------------------------

_SAME = (("scenario_sha256", "their scenario files differ"),
         ("seed", "their seeds differ"),
         ("overrides", "their command-line overrides (--set, --repeat, --seed, "
                       "--until-fail, --reset, --guest, --agent) differ"),
         ("total", "their shard totals differ"),
         ("sweep_size", "their sweeps differ in size"))


def check_set(runs: Sequence[ShardRun]) -> None:
    """The runs must be every shard of one sweep, once: MergeRefused naming the
    directories otherwise. Compatibility is checked first, so N/4 beside M/3 reads
    "shard totals differ", not "shard missing"."""
    if not runs:
        raise MergeRefused("merge needs the shard run directories (RUN_DIR...)")
    first = runs[0]
    for other in runs[1:]:
        for key, why in _SAME:
            if other.record[key] != first.record[key]:
                detail = ""
                if key in ("seed", "total", "sweep_size"):
                    detail = f" ({first.record[key]} and {other.record[key]})"
                raise MergeRefused(f"{first.path} and {other.path} are not shards of one "
                                   f"run: {why}{detail}")
        if other.summary.run.topology != first.summary.run.topology:
            raise MergeRefused(f"{first.path} and {other.path} are not shards of one run: "
                               "their topologies differ (the topology file changed between "
                               "the shards' checkouts)")
    by_index: dict[int, ShardRun] = {}
    for r in runs:
        k = r.record["index"]
        if k in by_index:
            same = os.path.realpath(by_index[k].path) == os.path.realpath(r.path)
            raise MergeRefused(f"shard {r.label} is given twice: {by_index[k].path} and "
                               f"{r.path}" + (" (the same directory)" if same else
                                              " (a shard's job ran twice: keep one)"))
        by_index[k] = r
    total = first.record["total"]
    missing = [k for k in range(1, total + 1) if k not in by_index]
    if missing:
        given = ", ".join(f"{r.label} ({r.path})" for r in sorted(
            runs, key=lambda x: x.record["index"]))
        names = ", ".join(f"{k}/{total}" for k in missing[:10]) + \
            (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise MergeRefused(f"shard{'s' * (len(missing) > 1)} {names} "
                           f"{'are' if len(missing) > 1 else 'is'} missing (given: {given}); "
                           f"run {'them' if len(missing) > 1 else 'it'} with `rebalab run "
                           f"SCENARIO --shard K/{total}` and the same options, then merge "
                           "all of them")


# ---- the merged run ----------------------------------------------------------------------------

def _merged_info(runs: Sequence[ShardRun], notes: list[str]) -> RunInfo:
    base = runs[0].summary.run
    infos = [r.summary.run for r in runs]
    accels = sorted({str(i.accelerator) for i in infos})
    for field, what in (("versions", "QEMU/kernel/rebalab versions"),
                        ("guest_image_sha256", "guest images")):
        if len({repr(getattr(i, field)) for i in infos}) > 1:
            notes.append(f"the shards ran with different {what}; the merged header shows "
                         f"shard 1's")
    if len(accels) > 1:
        notes.append(f"the shards ran under different accelerators ({', '.join(accels)})")
    statuses = [i.status for i in infos]
    status = Status.INTERRUPTED if Status.INTERRUPTED in statuses else \
        Status.ERROR if Status.ERROR in statuses else None

    def per_shard(field: str) -> str | None:
        parts = [f"shard {r.label}: {getattr(r.summary.run, field)}" for r in runs
                 if getattr(r.summary.run, field)]
        return "; ".join(parts) or None

    starts = [i.started_at for i in infos if isinstance(i.started_at, str)]
    ends = [i.ended_at for i in infos if isinstance(i.ended_at, str)]
    bounds = [b for i in infos if (b := i.alignment_bound_ns) is not None and _is_int(b)]
    rec = runs[0].record
    return replace(
        base, accelerator=", ".join(accels), started_at=min(starts) if starts else None,
        ended_at=max(ends) if ends else None, status=status,
        stopped_at=per_shard("stopped_at"), error=per_shard("error"),
        alignment_bound_ns=max(bounds) if bounds else None,
        shard={"merged": True, "total": rec["total"], "rule": RULE,
               "sweep_size": rec["sweep_size"], "scenario": rec["scenario"],
               "scenario_sha256": rec["scenario_sha256"], "seed": rec["seed"],
               "overrides": rec["overrides"],
               "shards": [{"index": r.record["index"], "run_dir": str(r.path.resolve())}
                          for r in runs]})


class _Copier:
    """Copies one shard's files into the merged directory: ``iterations/...`` to the
    same place, everything else under ``shards/<K>-of-<N>/``.

    Regular files and directories are copied; FIFOs, sockets and devices are left out
    (counted). A symlink is followed never: a relative one whose target stays inside
    the shard (a run links ``iterations/K/vm/console.log`` to ``../../../vm1/...``) is
    made again, pointing at the copy of its target in the merged directory; any other
    (absolute, or leaving the shard: it could name any file of this host) is left out.
    """

    def __init__(self, root: Path, out: Path, rest: str) -> None:
        self.root, self.out, self.rest = root, out, rest
        self.copied = self.linked = self.left = 0

    def place(self, rel: str) -> Path:
        parts = Path(rel).parts
        return self.out / rel if parts and parts[0] == "iterations" else \
            self.out / self.rest / rel

    def tree(self, rel: str, depth: int = 0) -> None:
        dst = self.place(rel)
        dst.mkdir(parents=True, exist_ok=True)
        if depth > MAX_COPY_DEPTH:
            self.left += 1
            return
        with os.scandir(self.root / rel) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            self.entry(f"{rel}/{e.name}" if rel else e.name, e, depth)

    def entry(self, rel: str, e: os.DirEntry[str], depth: int = 0) -> None:
        if e.is_symlink():
            self.link(rel)
        elif e.is_dir(follow_symlinks=False):
            self.tree(rel, depth + 1)
        elif e.is_file(follow_symlinks=False) and _copy_file(Path(e.path), self.place(rel)):
            self.copied += 1
        else:
            self.left += 1

    def link(self, rel: str) -> None:
        try:
            target = os.readlink(self.root / rel)
        except OSError:
            self.left += 1
            return
        inside = os.path.normpath(os.path.join(os.path.dirname(rel), target))
        if os.path.isabs(target) or inside == ".." or inside.startswith("../") \
                or inside == ".":
            self.left += 1
            return
        dst = self.place(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(self.place(inside), dst.parent), dst)
        self.linked += 1


def _copy_file(src: Path, dst: Path) -> bool:
    """Copy one regular file (checked on the open descriptor: no race with a swap to
    a symlink or FIFO after the directory was listed)."""
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return False
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        dst.parent.mkdir(parents=True, exist_ok=True)
        out_fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(out_fd, "wb") as g:
            shutil.copyfileobj(f, g, 1 << 20)
    return True


def _prepare_out(out: Path, runs: Sequence[ShardRun]) -> None:
    out_real = Path(os.path.realpath(out))
    for r in runs:
        src = Path(os.path.realpath(r.path))
        if out_real == src or src in out_real.parents or out_real in src.parents:
            raise MergeRefused(f"--out {out} overlaps the shard directory {r.path}: choose "
                               "a new directory")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise MergeRefused(f"--out {out} exists and is not a directory: choose a new one")
    if out.is_dir() and any(out.iterdir()):
        raise MergeRefused(f"--out {out} exists and is not empty: choose a new directory "
                           "(merge never mixes its output with other files)")


def merge(paths: Sequence[Path], out: Path) -> MergeResult:
    """Check the shards, copy their artifacts into ``out`` and write the merged
    summary.json, junit.xml, report.html, run.json and MERGED.json.

    Everything is checked before ``out`` is created: a refusal leaves nothing behind.
    """
    runs = sorted((load_shard(Path(p)) for p in paths), key=lambda r: r.record["index"])
    check_set(runs)
    out = Path(out)
    _prepare_out(out, runs)
    # built beside ``out`` and renamed into place at the end: a failure half-way (a
    # full disk) leaves no half-merged directory that looks like a run
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", suffix=".merging",
                                     dir=out.parent))
    except OSError as exc:
        raise LabError(f"cannot create the merged run beside {out} ({exc.strerror or exc}): "
                       "choose --out where you can write") from None
    try:
        result = _write(runs, out, work)
        os.rename(work, out)          # onto a new name, or an empty directory
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise LabError(f"could not write the merged run to {out} "
                           f"({exc.strerror or type(exc).__name__}); nothing was left there: "
                           "free space (or choose --out elsewhere) and merge again") from exc
        raise
    return result


def _write(runs: Sequence[ShardRun], out: Path, work: Path) -> MergeResult:
    """Everything merge writes, into ``work`` (renamed to ``out`` by the caller)."""
    from lab.report import write_junit, write_report
    from lab.report.summary import save_summary
    from lab.atomic import atomic_write

    work.chmod(0o700)
    notes: list[str] = []
    scenario_json = runs[0].meta.get("scenario")
    if (isinstance(scenario_json, Mapping) and scenario_json.get("until")) \
            or runs[0].record["overrides"].get("until_failures"):
        notes.append("the scenario has `until:`: each shard stopped at its own failures, so "
                     "this run may hold iterations an unsharded run would have skipped")
    info = _merged_info(runs, notes)
    results: list[IterationResult] = [r for run in runs for r in run.summary.results]
    summary = build_summary(info, results)
    total = runs[0].record["total"]
    copied = left = 0
    sources = []
    for run in runs:
        cp = _Copier(run.path, work, f"shards/{run.record['index']}-of-{total}")
        (work / cp.rest).mkdir(parents=True, exist_ok=True)
        mine = {str(r.index) for r in run.summary.results}
        if (run.path / "iterations").is_dir() and not (run.path / "iterations").is_symlink():
            with os.scandir(run.path / "iterations") as it:
                for e in sorted(it, key=lambda e: e.name):
                    if e.name in mine:          # only the shard's own iterations
                        cp.entry(f"iterations/{e.name}", e)
        with os.scandir(run.path) as it:
            for e in sorted(it, key=lambda e: e.name):
                if e.name != "iterations":
                    cp.entry(e.name, e)
        copied, left = copied + cp.copied, left + cp.left
        sources.append({"shard": run.label, "run_dir": str(run.path.resolve()),
                        "status": run.summary.status.value,
                        "iterations": len(run.summary.results),
                        "copied_files": cp.copied, "symlinks_remade": cp.linked,
                        "left_out": cp.left, "shard_dir": cp.rest})
    if left:
        notes.append(f"{left} entr{'ies' if left != 1 else 'y'} of the shard directories "
                     "(symlinks leaving the shard, FIFOs, devices) were not copied")
    # run.json and scenario.yaml as a run has them, so `rebalab replay OUT --iteration K`
    # and `rebalab inspect OUT` work on the merged directory
    meta = dict(runs[0].meta)
    meta.update({"iterations": list(range(runs[0].record["sweep_size"])),
                 "shard": info.shard, "command": "merge"})
    atomic_write(work / "run.json", json.dumps(meta, indent=2, sort_keys=True, default=str)
                 + "\n")
    atomic_write(work / "scenario.yaml", runs[0].scenario_text)
    atomic_write(work / MERGED_FILE, json.dumps({
        "schema": MERGED_SCHEMA, "artifacts": "copied",
        "layout": {"iterations/<k>/": "copied from the shard that ran iteration k",
                   "shards/<K>-of-<N>/": "the rest of shard K's run directory"},
        "scenario": runs[0].record["scenario"],
        "scenario_sha256": runs[0].record["scenario_sha256"],
        "seed": runs[0].record["seed"], "overrides": runs[0].record["overrides"],
        "total": total, "rule": RULE, "sweep_size": runs[0].record["sweep_size"],
        "status": summary.status.value, "exit_code": summary.exit_code,
        "sources": sources, "notes": notes}, indent=2, default=str) + "\n")
    save_summary(work, summary)
    write_junit(out, summary, path=work / "junit.xml")     # names ``out``, not ``work``
    try:
        write_report(work, summary)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # as in a run: the summary and JUnit carry the verdict; the page is a view
        notes.append(f"report.html could not be rendered ({type(exc).__name__})")
    return MergeResult(out, summary, tuple(runs), copied, left, tuple(notes))
