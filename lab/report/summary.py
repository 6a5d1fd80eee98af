"""``summary.json``: the one file every other report is rendered from.

It holds what ran (``RunInfo``), every iteration's result, and the aggregates a driver
engineer asks first: which signatures (rule, device, phase) appeared, how reliably
(reproduction rate: iterations showing it / iterations that ran), and at which
parameter values. It is written once at the end of a run (and may be rewritten after
each iteration for crash safety), and read back by ``load_summary`` so JUnit, HTML
and the console can be re-rendered from a run directory alone.

Overall status and exit code (DESIGN.md): interrupted (130) > failed (1) > error (2) >
passed (0). A violation found is a real finding even if another iteration hit a lab
error, so "failed" outranks "error"; a run in which no iteration ran is an error.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lab.results import IterationResult, Status

SCHEMA = "rebalab.summary/1"
SUMMARY_FILE = "summary.json"
EXIT_CODES: dict[Status, int] = {Status.PASSED: 0, Status.FAILED: 1, Status.ERROR: 2,
                                 Status.INTERRUPTED: 130, Status.SKIPPED: 2}
#: Parameters with more distinct values than this are not aggregated by value
#: (random draws would make one row per iteration).
MAX_GROUP_VALUES = 32


@dataclass(frozen=True)
class RunInfo:
    """What ran: the facts a report header and JUnit properties need.

    ``status`` is set by the executor only for run-level outcomes the iterations
    can't show (``interrupted``; ``error`` when the lab failed outside any
    iteration, with ``error``); otherwise the status follows from the results.
    ``parameters`` are the scenario's parameter specs (``Scenario.to_json()``); they
    say which parameters are swept (aggregated by value) and which are random.
    Times are ISO 8601 strings.
    """

    scenario: str
    accelerator: str = "unknown"
    versions: Mapping[str, str] = field(default_factory=dict)   # qemu, kernel, rebalab...
    topology: Any = None
    seed: int = 0
    started_at: str | None = None
    ended_at: str | None = None
    status: Status | None = None
    stopped_at: str | None = None
    error: str | None = None
    guest: str | None = None
    guest_image_sha256: str | None = None
    alignment_bound_ns: int | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)
    scenario_file: str | None = None
    #: ``--shard K/N`` (lab.shard's record: index, total, rule, scenario hash, seed,
    #: overrides) or, in a merged run, which shards it was rebuilt from; None for an
    #: ordinary run (and in summaries written before shards existed)
    shard: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value if self.status else None
        d["versions"] = dict(self.versions)
        d["parameters"] = dict(self.parameters)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunInfo:
        known = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        if kw.get("status"):
            kw["status"] = Status(kw["status"])
        return cls(**kw)


@dataclass(frozen=True)
class SignatureStats:
    """One signature across the run: in how many iterations, out of how many that ran."""

    signature: str
    rule: str
    device: str
    phase: str
    count: int
    ran: int
    iterations: tuple[int, ...]
    example: str

    @property
    def rate(self) -> float:
        return self.count / self.ran if self.ran else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["iterations"] = list(self.iterations)
        d["rate"] = round(self.rate, 6)
        d["rate_text"] = fmt_rate(self.count, self.ran)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SignatureStats:
        return cls(signature=d["signature"], rule=d["rule"], device=d["device"],
                   phase=d["phase"], count=d["count"], ran=d["ran"],
                   iterations=tuple(d.get("iterations", ())), example=d.get("example", ""))


@dataclass(frozen=True)
class GroupStats:
    """Iterations at one parameter value (or one combination of values)."""

    values: Mapping[str, Any]
    iterations: int
    passed: int
    failed: int
    errors: int
    skipped: int
    interrupted: int
    signatures: Mapping[str, int]
    # per measurement name: n, min, median, max over the group's iterations
    measurements: Mapping[str, Mapping[str, float]] = field(default_factory=dict)

    @property
    def ran(self) -> int:
        return self.passed + self.failed + self.errors

    @property
    def failure_rate(self) -> float:
        return self.failed / self.ran if self.ran else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["values"] = dict(self.values)
        d["signatures"] = dict(self.signatures)
        d["measurements"] = {k: dict(v) for k, v in self.measurements.items()}
        d["ran"] = self.ran
        d["failure_rate"] = round(self.failure_rate, 6)
        d["rate_text"] = fmt_rate(self.failed, self.ran)
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GroupStats:
        return cls(values=dict(d["values"]), iterations=d["iterations"], passed=d["passed"],
                   failed=d["failed"], errors=d["errors"], skipped=d["skipped"],
                   interrupted=d.get("interrupted", 0), signatures=dict(d["signatures"]),
                   measurements={k: dict(v) for k, v in (d.get("measurements") or {}).items()})


@dataclass(frozen=True)
class Summary:
    """Everything in ``summary.json``."""

    run: RunInfo
    results: tuple[IterationResult, ...]
    status: Status
    exit_code: int
    counts: Mapping[str, int]
    signatures: tuple[SignatureStats, ...]
    by_parameter: Mapping[str, tuple[GroupStats, ...]]
    by_combination: tuple[GroupStats, ...]

    @property
    def ran(self) -> int:
        return sum(1 for r in self.results if _ran(r))

    def result(self, key: int | str) -> IterationResult:
        """The result named ``key``: an index, or ``"4.2"`` for a replay's attempt."""
        for r in self.results:
            if r.key == key:
                return r
        raise KeyError(key)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "run": self.run.to_json(),
            "status": self.status.value,
            "exit_code": self.exit_code,
            "counts": dict(self.counts),
            "signatures": [s.to_json() for s in self.signatures],
            "by_parameter": {k: [g.to_json() for g in v] for k, v in self.by_parameter.items()},
            "by_combination": [g.to_json() for g in self.by_combination],
            "iterations": [r.to_json() | {"duration_s": iteration_duration_s(r)}
                           for r in self.results],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Summary:
        schema = d.get("schema")
        if schema != SCHEMA:
            raise ValueError(f"not a rebalab summary (schema {schema!r}, expected {SCHEMA!r})")
        return cls(run=RunInfo.from_json(d["run"]),
                   results=tuple(IterationResult.from_json(r) for r in d["iterations"]),
                   status=Status(d["status"]), exit_code=int(d["exit_code"]),
                   counts=dict(d["counts"]),
                   signatures=tuple(SignatureStats.from_json(s) for s in d["signatures"]),
                   by_parameter={k: tuple(GroupStats.from_json(g) for g in v)
                                 for k, v in d["by_parameter"].items()},
                   by_combination=tuple(GroupStats.from_json(g) for g in d["by_combination"]))


# ---- helpers ---------------------------------------------------------------------------

def fmt_value(value: Any) -> str:
    """A parameter value as written in YAML: ``true``, ``100``, ``0.25``, ``AC97``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    return str(value)


def fmt_params(params: Mapping[str, Any]) -> str:
    """``delay_ms=100 model=AC97`` (file order)."""
    return " ".join(f"{k}={fmt_value(v)}" for k, v in params.items())


def fmt_rate(count: int, total: int) -> str:
    """``3 of 20 (15.0 %)``."""
    pct = 100.0 * count / total if total else 0.0
    return f"{count} of {total} ({pct:.1f} %)"


def _ran(r: IterationResult) -> bool:
    return r.status in (Status.PASSED, Status.FAILED, Status.ERROR)


def iteration_duration_s(r: IterationResult) -> float | None:
    """Wall time of an iteration from its step timings (None when it has none)."""
    if not r.timings:
        return None
    start = min(t.started_ns for t in r.timings)
    end = max(t.started_ns + t.duration_ns for t in r.timings)
    return round((end - start) / 1e9, 6)


def overall_status(results: Sequence[IterationResult], run_status: Status | None = None
                   ) -> Status:
    """The run's status from its iterations (precedence in the module docstring)."""
    statuses = {r.status for r in results}
    if run_status == Status.INTERRUPTED or Status.INTERRUPTED in statuses:
        return Status.INTERRUPTED
    if Status.FAILED in statuses:
        return Status.FAILED
    if run_status == Status.ERROR or Status.ERROR in statuses:
        return Status.ERROR
    if not any(_ran(r) for r in results):
        return Status.ERROR
    return Status.PASSED


def exit_code(status: Status) -> int:
    return EXIT_CODES[status]


def _value_key(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def group_parameters(info: RunInfo, results: Sequence[IterationResult]) -> list[str]:
    """Parameters aggregated by value: swept ones (list, range, choice) per the scenario
    spec; without a spec, those with at most ``MAX_GROUP_VALUES`` distinct values."""
    names: list[str] = []
    for r in results:
        for k in r.parameters:
            if k not in names:
                names.append(k)
    out = []
    for n in names:
        spec = info.parameters.get(n) if info.parameters else None
        if spec is not None:
            if isinstance(spec, Mapping) and "random" in spec:
                continue
            out.append(n)
            continue
        distinct = {_value_key(r.parameters.get(n)) for r in results if n in r.parameters}
        if len(distinct) <= MAX_GROUP_VALUES:
            out.append(n)
    return out


def measurement_stats(rs: Sequence[IterationResult]) -> dict[str, dict[str, float]]:
    """n, min, median and max of each measurement the iterations carry."""
    values: dict[str, list[float]] = {}
    for r in rs:
        for k, v in r.measurements.items():
            values.setdefault(k, []).append(float(v))
    return {k: {"n": float(len(v)), "min": round(min(v), 3),
                "median": round(statistics.median(v), 3), "max": round(max(v), 3)}
            for k, v in sorted(values.items())}


def _group(values: Mapping[str, Any], rs: Sequence[IterationResult]) -> GroupStats:
    sigs: dict[str, int] = {}
    for r in rs:
        for s in sorted({str(v.signature) for v in r.violations}):
            sigs[s] = sigs.get(s, 0) + 1
    return GroupStats(values=dict(values), iterations=len(rs),
                      passed=sum(r.status == Status.PASSED for r in rs),
                      failed=sum(r.status == Status.FAILED for r in rs),
                      errors=sum(r.status == Status.ERROR for r in rs),
                      skipped=sum(r.status == Status.SKIPPED for r in rs),
                      interrupted=sum(r.status == Status.INTERRUPTED for r in rs),
                      signatures=dict(sorted(sigs.items(), key=lambda kv: (-kv[1], kv[0]))),
                      measurements=measurement_stats(rs))


def build_summary(info: RunInfo, results: Iterable[IterationResult]) -> Summary:
    """Aggregate results (any order; sorted by index) into a ``Summary``."""
    rs = tuple(sorted(results, key=lambda r: (r.index, r.attempt or 0)))
    ran = [r for r in rs if _ran(r)]
    status = overall_status(rs, info.status)
    counts = {s.value: sum(r.status == s for r in rs) for s in Status}
    counts["total"] = len(rs)
    counts["ran"] = len(ran)

    seen: dict[str, list[IterationResult]] = {}
    first: dict[str, Any] = {}
    for r in ran:
        for v in r.violations:
            key = str(v.signature)
            first.setdefault(key, v)
            lst = seen.setdefault(key, [])
            if not lst or lst[-1] is not r:
                lst.append(r)
    sigs = tuple(sorted(
        (SignatureStats(signature=k, rule=first[k].rule, device=first[k].device,
                        phase=first[k].phase, count=len(v), ran=len(ran),
                        iterations=tuple(r.index for r in v), example=first[k].message)
         for k, v in seen.items()),
        key=lambda s: (-s.count, s.signature)))

    names = group_parameters(info, rs)
    by_param: dict[str, tuple[GroupStats, ...]] = {}
    for n in names:
        buckets: dict[str, tuple[Any, list[IterationResult]]] = {}
        for r in rs:
            if n in r.parameters:
                buckets.setdefault(_value_key(r.parameters[n]), (r.parameters[n], []))[1].append(r)
        by_param[n] = tuple(_group({n: val}, lst) for val, lst in buckets.values())
    combos: dict[str, tuple[dict[str, Any], list[IterationResult]]] = {}
    if len(names) > 1:
        for r in rs:
            vals = {n: r.parameters.get(n) for n in names}
            combos.setdefault(_value_key(vals), (vals, []))[1].append(r)
    by_combo = tuple(_group(vals, lst) for vals, lst in combos.values())

    return Summary(run=info, results=rs, status=status, exit_code=exit_code(status),
                   counts=counts, signatures=sigs, by_parameter=by_param,
                   by_combination=by_combo)


def write_summary(run_dir: str | Path, info: RunInfo, results: Iterable[IterationResult]
                  ) -> Summary:
    """Build and write ``run_dir/summary.json`` atomically (a reader never sees half)."""
    summary = build_summary(info, results)
    save_summary(run_dir, summary)
    return summary


def save_summary(run_dir: str | Path, summary: Summary) -> Path:
    from lab.atomic import atomic_write

    return atomic_write(Path(run_dir) / SUMMARY_FILE,
                        json.dumps(summary.to_json(), indent=2, sort_keys=False, default=str)
                        + "\n")


def load_summary(run_dir: str | Path) -> Summary:
    """Read ``run_dir/summary.json`` (or a path to the file itself)."""
    path = Path(run_dir)
    if path.is_dir():
        path = path / SUMMARY_FILE
    with path.open(encoding="utf-8") as f:
        return Summary.from_json(json.load(f))
