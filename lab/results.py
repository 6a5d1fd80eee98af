"""Values that cross from rules to reports: violations, signatures, iteration results.

They are JSON-serialisable so that ``summary.json`` is the single source a report is
rendered from, and a run can be re-checked or re-reported from its directory alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


@dataclass(frozen=True)
class EventRef:
    """A pointer into the timeline: the event's sequence number, time and what it was."""

    seq: int
    t_host_ns: int
    kind: str
    source: str
    summary: str = ""


@dataclass(frozen=True)
class Signature:
    """What makes two failures 'the same bug': rule, device and phase."""

    rule: str
    device: str
    phase: str

    def __str__(self) -> str:
        return f"{self.rule}@{self.device}/{self.phase}"


@dataclass(frozen=True)
class Violation:
    rule: str
    device: str
    phase: str
    message: str
    events: tuple[EventRef, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def signature(self) -> Signature:
        return Signature(self.rule, self.device, self.phase)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["events"] = [asdict(e) for e in self.events]
        d["signature"] = str(self.signature)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Violation:
        return cls(rule=d["rule"], device=d["device"], phase=d["phase"], message=d["message"],
                   events=tuple(EventRef(**e) for e in d.get("events", ())),
                   details=dict(d.get("details") or {}))


class Status(str, Enum):
    PASSED = "passed"
    FAILED = "failed"        # the driver or guest broke a rule or an assert (exit 1)
    ERROR = "error"          # the lab could not do its job (exit 2)
    INTERRUPTED = "interrupted"  # exit 130
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StepTiming:
    name: str
    started_ns: int
    duration_ns: int
    ok: bool = True
    detail: str = ""


def result_key(index: int, attempt: int | None) -> int | str:
    """What names a result in a run: the index, or ``"4.2"`` for attempt 2 of a replay
    of iteration 4 (its directory is ``iterations/4.2``)."""
    return index if attempt is None else f"{index}.{attempt}"


def result_label(index: int, attempt: int | None) -> str:
    """``#4`` or ``#4 attempt 2``, for people."""
    return f"#{index}" + (f" attempt {attempt}" if attempt is not None else "")


@dataclass(frozen=True)
class IterationResult:
    index: int
    parameters: dict[str, Any]
    seed: int
    status: Status
    violations: tuple[Violation, ...] = ()
    timings: tuple[StepTiming, ...] = ()
    artifacts: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    stopped_at: str | None = None
    # a replay's attempt number (1..N) when one iteration ran several times, else None
    attempt: int | None = None
    # figures the iteration measured, by name (e.g. audio_outage_ms): numbers a report
    # aggregates per parameter value, not verdicts
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> int | str:
        return result_key(self.index, self.attempt)

    @property
    def label(self) -> str:
        return result_label(self.index, self.attempt)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            **({"attempt": self.attempt} if self.attempt is not None else {}),
            "parameters": self.parameters,
            "seed": self.seed,
            "status": self.status.value,
            "violations": [v.to_json() for v in self.violations],
            "timings": [asdict(t) for t in self.timings],
            "artifacts": self.artifacts,
            "error": self.error,
            "stopped_at": self.stopped_at,
            **({"measurements": dict(self.measurements)} if self.measurements else {}),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IterationResult:
        return cls(index=d["index"], parameters=d.get("parameters", {}), seed=d.get("seed", 0),
                   status=Status(d["status"]),
                   violations=tuple(Violation.from_json(v) for v in d.get("violations", ())),
                   timings=tuple(StepTiming(**t) for t in d.get("timings", ())),
                   artifacts=dict(d.get("artifacts") or {}), error=d.get("error"),
                   stopped_at=d.get("stopped_at"), attempt=d.get("attempt"),
                   measurements={str(k): float(v) for k, v in (d.get("measurements") or {}).items()})
