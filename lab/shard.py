"""Shards: one sweep split over N copies of a job that an engine already runs.

Users past one host already have something that starts N copies of a job and tells
each which one it is: a CI matrix (GitHub Actions ``strategy.matrix``, GitLab
``parallel:``), a Kubernetes Indexed Job, a Slurm job array. ``rebalab run --shard
K/N`` runs the iterations ``index % N == K - 1`` of the sweep; ``rebalab merge``
(lab.merge) puts the N run directories back together.

The rule is round-robin on the iteration index, and nothing else: iteration k has
the same parameters and seed whichever shard runs it (``Sweep.iteration(k)`` is a
pure function of the scenario and k), so shard K runs the same iterations every time
and the merged shards are the unsharded run. Round-robin, not blocks: the sweep puts
rounds outermost, so every shard gets a share of every round and an interrupted
shard has still sampled the whole grid.

When ``--shard`` is not given the engine's own variables are read (``from_env``):

- GitLab ``parallel: N``: ``CI_NODE_INDEX`` (1-based) and ``CI_NODE_TOTAL``. GitLab
  sets ``CI_NODE_TOTAL=1`` and no index on a job without ``parallel:``; that is no
  shard, not an error.
- Kubernetes Indexed Job: ``JOB_COMPLETION_INDEX`` (0-based, set by the control plane
  from the ``batch.kubernetes.io/job-completion-index`` annotation;
  https://kubernetes.io/docs/tasks/job/indexed-parallel-processing-static). Kubernetes
  exposes no total to the pod (``spec.completions`` stays in the Job object), so the
  manifest passes it as ``REBALAB_SHARD_TOTAL``.
- Slurm ``--array``: ``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_MIN``,
  ``_MAX``, ``_COUNT`` (and ``_STEP``). Task ids are whatever ``--array`` said (the
  minimum allowed is 0, so ``0-3`` and ``1-4`` are both common;
  https://slurm.schedmd.com/job_array.html): shard K is ``ID - MIN + 1``, which needs
  a contiguous range (``--array=1-4``, not ``1,3,5`` or ``0-15:4``).
- GitHub Actions has no index variable: the matrix passes ``--shard``.

Two engines' variables that disagree are an error, never a guess; ``--shard`` is the
user's own word and wins over the environment (the disagreement is logged).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lab.errors import ConfigError

#: what a shard record says its rule is (run.json, summary.json); merge checks it
RULE = "index % total == shard - 1"
#: shards at most (a CI matrix of 256 jobs is already large; a typo of 1/20000 is not)
MAX_SHARDS = 10_000

_SHARD_RE = re.compile(r"^\s*(\d{1,6})\s*/\s*(\d{1,6})\s*$")
_INT_RE = re.compile(r"^\s*\d{1,9}\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (1-based) of ``total``; ``source`` says where it came from
    (``--shard``, or the engine variables read), for lab.log and run.json."""

    index: int
    total: int
    source: str = "--shard"

    def __post_init__(self) -> None:
        if not 1 <= self.total <= MAX_SHARDS:
            raise ConfigError(f"{self.source}: the shard total must be 1 .. {MAX_SHARDS}, "
                              f"not {self.total}")
        if not 1 <= self.index <= self.total:
            raise ConfigError(f"{self.source}: shard {self.index}/{self.total} does not "
                              f"exist (shards are numbered 1 .. {self.total})")

    def __str__(self) -> str:
        return f"{self.index}/{self.total}"

    def owns(self, k: int) -> bool:
        """Whether iteration ``k`` is this shard's (the rule in ``RULE``)."""
        return k % self.total == self.index - 1

    def indices(self, sweep_size: int) -> list[int]:
        """This shard's iteration indices of a sweep of ``sweep_size``, in run order."""
        return list(range(self.index - 1, sweep_size, self.total))

    def to_json(self, sweep_size: int, **facts: Any) -> dict[str, Any]:
        """The record run.json and summary.json carry: which shard, by which rule, of
        how big a sweep, plus ``facts`` (scenario hash, seed, overrides) that merge
        compares. The index list is not written out: the rule and the size give it,
        and a million-iteration sweep would make summary.json megabytes longer."""
        return {"index": self.index, "total": self.total, "rule": RULE,
                "sweep_size": sweep_size, "iterations": len(self.indices(sweep_size)),
                "source": self.source, **facts}


def parse_shard(text: str, what: str = "--shard") -> Shard:
    """``K/N`` -> Shard; a one-line ConfigError naming ``what`` otherwise."""
    m = _SHARD_RE.match(text or "")
    if not m:
        raise ConfigError(f"{what} {text[:20]!r}: expected K/N with whole numbers, "
                          "1 <= K <= N (e.g. --shard 2/4)")
    return Shard(int(m.group(1)), int(m.group(2)), what)


# ---- the engines' variables ----------------------------------------------------------------

#: every variable ``from_env`` may read (the log names those that were set)
ENV_VARS = ("CI_NODE_INDEX", "CI_NODE_TOTAL", "JOB_COMPLETION_INDEX", "REBALAB_SHARD_TOTAL",
            "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
            "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP")


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    if not _INT_RE.match(value):
        # the value is the environment's, not a secret, but it may be anything: not echoed
        raise ConfigError(f"environment variable {name} is not a whole number "
                          "(unset it, or pass --shard K/N)")
    return int(value)


def _gitlab(env: Mapping[str, str]) -> Shard | None:
    if "CI_NODE_INDEX" not in env:
        if "CI_NODE_TOTAL" in env and _int(env, "CI_NODE_TOTAL") > 1:
            raise ConfigError("CI_NODE_TOTAL is above 1 but CI_NODE_INDEX is not set "
                              "(GitLab sets both for a `parallel:` job): pass --shard K/N")
        return None          # GitLab's CI_NODE_TOTAL=1 on every job without parallel:
    if "CI_NODE_TOTAL" not in env:
        raise ConfigError("CI_NODE_INDEX is set but CI_NODE_TOTAL is not: set both "
                          "(GitLab `parallel:` does), or pass --shard K/N")
    return Shard(_int(env, "CI_NODE_INDEX"), _int(env, "CI_NODE_TOTAL"),
                 "CI_NODE_INDEX/CI_NODE_TOTAL (GitLab parallel)")


def _kubernetes(env: Mapping[str, str]) -> Shard | None:
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    if "REBALAB_SHARD_TOTAL" not in env:
        raise ConfigError("JOB_COMPLETION_INDEX is set (a Kubernetes Indexed Job) but "
                          "REBALAB_SHARD_TOTAL is not: Kubernetes gives the pod no total, "
                          "so set REBALAB_SHARD_TOTAL to the Job's spec.completions in the "
                          "container's env (see examples/kubernetes)")
    return Shard(_int(env, "JOB_COMPLETION_INDEX") + 1, _int(env, "REBALAB_SHARD_TOTAL"),
                 "JOB_COMPLETION_INDEX+1/REBALAB_SHARD_TOTAL (Kubernetes Indexed Job)")


def _slurm(env: Mapping[str, str]) -> Shard | None:
    if "SLURM_ARRAY_TASK_ID" not in env:
        return None
    missing = [n for n in ("SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
                           "SLURM_ARRAY_TASK_MAX") if n not in env]
    if missing:
        raise ConfigError(f"SLURM_ARRAY_TASK_ID is set but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not (sbatch --array sets "
                          "them all): pass --shard K/N")
    tid, count = _int(env, "SLURM_ARRAY_TASK_ID"), _int(env, "SLURM_ARRAY_TASK_COUNT")
    low, high = _int(env, "SLURM_ARRAY_TASK_MIN"), _int(env, "SLURM_ARRAY_TASK_MAX")
    step = _int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
    if step != 1 or high - low + 1 != count:
        raise ConfigError(f"the Slurm array is not one contiguous range (ids {low}..{high}, "
                          f"{count} tasks, step {step}): submit it as --array=1-N (or "
                          "0-(N-1)), or pass --shard K/N")
    if not low <= tid <= high:
        raise ConfigError(f"SLURM_ARRAY_TASK_ID {tid} is outside the array's ids "
                          f"{low}..{high}")
    return Shard(tid - low + 1, count,
                 "SLURM_ARRAY_TASK_ID-SLURM_ARRAY_TASK_MIN+1/SLURM_ARRAY_TASK_COUNT (Slurm array)")


_ENGINES = (_gitlab, _kubernetes, _slurm)


def from_env(env: Mapping[str, str]) -> Shard | None:
    """The shard the engine's variables name, or None when none are set.

    ConfigError (one line) when a variable is malformed, half of a pair is missing, a
    value is out of range, or two engines' variables name different shards.
    """
    found = [s for s in (engine(env) for engine in _ENGINES) if s is not None]
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        if (other.index, other.total) != (first.index, first.total):
            raise ConfigError(f"the environment names two different shards: {first} from "
                              f"{first.source} and {other} from {other.source}; unset one, "
                              "or pass --shard K/N")
    if len(found) > 1:
        return Shard(first.index, first.total, " and ".join(s.source for s in found))
    return first


@dataclass(frozen=True)
class Resolved:
    """What ``resolve`` decided, and the lines lab.log gets about it."""

    shard: Shard | None
    notes: tuple[str, ...]


def resolve(flag: str | None, env: Mapping[str, str], *, explicit_iterations: bool = False
            ) -> Resolved:
    """The shard of this run: ``--shard`` if given, else the engine's variables.

    ``explicit_iterations`` (``--iteration``) means the user chose the indices
    already: the environment is not consulted (a replay of one iteration inside a CI
    shard job must run that iteration), and ``--shard`` with it is an error.
    """
    seen = [n for n in ENV_VARS if n in env]
    if flag is not None:
        if explicit_iterations:
            raise ConfigError("--shard and --iteration choose the iterations two ways: "
                              "give one of them")
        shard = parse_shard(flag)
        notes = [f"shard {shard} from --shard"]
        try:
            from_engine = from_env(env)
        except ConfigError as exc:
            notes.append(f"the engine variables were not used ({exc})")
        else:
            if from_engine is not None and (from_engine.index, from_engine.total) != \
                    (shard.index, shard.total):
                notes.append(f"note: {from_engine.source} would give shard {from_engine}; "
                             "--shard wins")
        return Resolved(shard, tuple(notes))
    if explicit_iterations:
        return Resolved(None, (f"--iteration given: engine variables not read "
                               f"({', '.join(seen)} set)",) if seen else ())
    found = from_env(env)
    if found is None:
        return Resolved(None, (f"not sharded ({', '.join(seen)} set, naming no shard)",)
                        if seen else ())
    return Resolved(found, (f"shard {found} from {found.source}; variables set: "
                            f"{', '.join(seen)}",))


def check_fits(shard: Shard, sweep_size: int) -> None:
    """A shard with no iteration would boot a VM to run nothing and report an error:
    refuse it before any VM starts, naming the sizes."""
    if shard.total > sweep_size:
        raise ConfigError(f"shard {shard}: the sweep has {sweep_size} iteration"
                          f"{'s' * (sweep_size != 1)}, so at most {sweep_size} shard"
                          f"{'s' * (sweep_size != 1)} have work; use N <= {sweep_size} "
                          "(or --repeat more rounds)")


def partition(sweep_size: int, total: int) -> Iterator[list[int]]:
    """Every shard's indices, shard 1 first (for tests and the examples' docs)."""
    for k in range(1, total + 1):
        yield Shard(k, total).indices(sweep_size)


def scenario_sha256(text: str) -> str:
    """SHA-256 of the scenario file's text: what ``sha256sum scenario.yaml`` prints in
    the run directory, so a person can check two shards ran the same file."""
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def record(shard: Shard, scenario: Any, overrides: Any) -> dict[str, Any]:
    """The shard record for run.json and summary.json of a run of ``scenario`` (the
    overrides already applied) with ``overrides``: everything merge needs to know
    the shards belong together (same file, same effective seed, same overrides, same
    sweep) without trusting directory names."""
    size = len(scenario.sweep())
    return shard.to_json(size, scenario=scenario.name,
                         scenario_sha256=scenario_sha256(scenario.source_text),
                         seed=scenario.seed, overrides=overrides.to_json())
