"""lab.shard: the partition of a sweep, ``--shard K/N`` and the engines' variables.

The partition is what makes merged shards equal the unsharded run, so it is checked
for any sweep size and shard count (hypothesis): disjoint, covering, stable, and
balanced. The variables are those GitLab, Kubernetes and Slurm really set (see the
module docstring for the documents they come from).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import shard as sh
from lab.cli import main
from lab.errors import ConfigError
from lab.report.summary import RunInfo

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"


@st.composite
def sizes_and_totals(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(min_value=1, max_value=3000))
    return size, draw(st.integers(min_value=1, max_value=min(size, 64)))


@settings(max_examples=200, deadline=None)
@given(sizes_and_totals())
def test_shards_are_disjoint_cover_the_sweep_and_are_balanced(case: tuple[int, int]) -> None:
    size, total = case
    parts = list(sh.partition(size, total))
    assert len(parts) == total
    flat = [k for p in parts for k in p]
    assert sorted(flat) == list(range(size))          # covering, and disjoint (no repeats)
    assert len(set(flat)) == len(flat)
    assert max(map(len, parts)) - min(map(len, parts)) <= 1   # no shard idles while others work
    for k, part in enumerate(parts, start=1):
        shard = sh.Shard(k, total)
        assert part == sorted(part)                    # run order is sweep order
        assert all(shard.owns(i) for i in part)
        mine = set(part)
        assert not any(shard.owns(i) for i in range(size) if i not in mine)
        assert part == sh.Shard(k, total, "elsewhere").indices(size)   # stable


@settings(max_examples=100, deadline=None)
@given(sizes_and_totals(), st.integers(min_value=1, max_value=200))
def test_a_shard_keeps_its_iterations_when_the_sweep_grows(case: tuple[int, int],
                                                            more: int) -> None:
    """--repeat more rounds: a shard's earlier iterations stay its own (same index, so
    the same parameters and seed), which keeps reruns of one shard comparable."""
    size, total = case
    for k in range(1, total + 1):
        small = sh.Shard(k, total).indices(size)
        big = sh.Shard(k, total).indices(size + more)
        assert big[:len(small)] == small


def test_shard_indices_name_the_same_iterations_as_the_unsharded_sweep() -> None:
    from lab.runner import load_scenario

    sweep = load_scenario(SCENARIOS / "sweep-rebalance-delay.yaml").sweep()
    whole = {k: (sweep.iteration(k).parameters, sweep.iteration(k).seed)
             for k in range(len(sweep))}
    for part in sh.partition(len(sweep), 3):
        for k in part:
            it = sweep.iteration(k)
            assert (it.parameters, it.seed) == whole[k]
    # iterations differ between themselves, so the comparison above can fail
    assert len({seed for _, seed in whole.values()}) == len(whole)


@pytest.mark.parametrize("text,expected", [("1/2", (1, 2)), ("2/2", (2, 2)),
                                           (" 3 / 8 ", (3, 8)), ("1/1", (1, 1))])
def test_parse_shard_accepts_k_of_n(text: str, expected: tuple[int, int]) -> None:
    s = sh.parse_shard(text)
    assert (s.index, s.total) == expected and str(s) == f"{expected[0]}/{expected[1]}"


@pytest.mark.parametrize("text,needle", [
    ("0/2", "does not exist"), ("3/2", "does not exist"), ("a/b", "expected K/N"),
    ("1/0", "total must be"), ("", "expected K/N"), ("1/2/3", "expected K/N"),
    ("-1/2", "expected K/N"), ("2", "expected K/N"), ("1/99999", "total must be")])
def test_parse_shard_refuses_with_one_line(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        sh.parse_shard(text)
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg and "--shard" in msg


# ---- the engines' variables ------------------------------------------------------------------

def test_no_variables_no_shard() -> None:
    assert sh.from_env({}) is None
    assert sh.from_env({"HOME": "/root"}) is None


def test_gitlab_parallel_is_one_based() -> None:
    s = sh.from_env({"CI_NODE_INDEX": "3", "CI_NODE_TOTAL": "4"})
    assert s is not None and (s.index, s.total) == (3, 4) and "GitLab" in s.source


def test_gitlab_job_without_parallel_is_not_sharded() -> None:
    # GitLab sets CI_NODE_TOTAL=1 and no CI_NODE_INDEX on every job without parallel:
    assert sh.from_env({"CI_NODE_TOTAL": "1"}) is None
    with pytest.raises(ConfigError, match="CI_NODE_INDEX is not set"):
        sh.from_env({"CI_NODE_TOTAL": "3"})
    with pytest.raises(ConfigError, match="CI_NODE_TOTAL is not"):
        sh.from_env({"CI_NODE_INDEX": "1"})


def test_kubernetes_index_is_zero_based_and_needs_a_total() -> None:
    s = sh.from_env({"JOB_COMPLETION_INDEX": "0", "REBALAB_SHARD_TOTAL": "3"})
    assert s is not None and (s.index, s.total) == (1, 3)
    s = sh.from_env({"JOB_COMPLETION_INDEX": "2", "REBALAB_SHARD_TOTAL": "3"})
    assert s is not None and (s.index, s.total) == (3, 3)
    with pytest.raises(ConfigError, match="REBALAB_SHARD_TOTAL"):
        sh.from_env({"JOB_COMPLETION_INDEX": "0"})
    with pytest.raises(ConfigError, match="does not exist"):
        sh.from_env({"JOB_COMPLETION_INDEX": "3", "REBALAB_SHARD_TOTAL": "3"})


@pytest.mark.parametrize("low", [0, 1, 7])
def test_slurm_array_counts_from_its_lowest_task_id(low: int) -> None:
    for pos in range(4):
        env = {"SLURM_ARRAY_TASK_ID": str(low + pos), "SLURM_ARRAY_TASK_MIN": str(low),
               "SLURM_ARRAY_TASK_MAX": str(low + 3), "SLURM_ARRAY_TASK_COUNT": "4",
               "SLURM_ARRAY_TASK_STEP": "1"}
        s = sh.from_env(env)
        assert s is not None and (s.index, s.total) == (pos + 1, 4) and "Slurm" in s.source


def test_slurm_array_that_is_not_one_range_is_refused() -> None:
    # --array=1,3,5,7 (count 4, ids 1..7) and --array=0-15:4 (step 4)
    with pytest.raises(ConfigError, match="contiguous"):
        sh.from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1",
                     "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(ConfigError, match="contiguous"):
        sh.from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0",
                     "SLURM_ARRAY_TASK_MAX": "12", "SLURM_ARRAY_TASK_COUNT": "4",
                     "SLURM_ARRAY_TASK_STEP": "4"})
    with pytest.raises(ConfigError, match="SLURM_ARRAY_TASK_COUNT"):
        sh.from_env({"SLURM_ARRAY_TASK_ID": "1"})


def test_malformed_variable_is_named_not_echoed() -> None:
    with pytest.raises(ConfigError) as exc:
        sh.from_env({"CI_NODE_INDEX": "secret-ish", "CI_NODE_TOTAL": "2"})
    assert "CI_NODE_INDEX" in str(exc.value) and "secret-ish" not in str(exc.value)


def test_engines_that_disagree_are_an_error_and_agreeing_ones_are_named() -> None:
    gitlab = {"CI_NODE_INDEX": "1", "CI_NODE_TOTAL": "2"}
    k8s_other = {"JOB_COMPLETION_INDEX": "1", "REBALAB_SHARD_TOTAL": "2"}    # shard 2/2
    with pytest.raises(ConfigError, match="two different shards: 1/2 .* 2/2"):
        sh.from_env(gitlab | k8s_other)
    k8s_same = {"JOB_COMPLETION_INDEX": "0", "REBALAB_SHARD_TOTAL": "2"}     # shard 1/2
    s = sh.from_env(gitlab | k8s_same)
    assert s is not None and (s.index, s.total) == (1, 2)
    assert "GitLab" in s.source and "Kubernetes" in s.source


def test_resolve_prefers_the_flag_and_logs_what_the_environment_said() -> None:
    env = {"CI_NODE_INDEX": "2", "CI_NODE_TOTAL": "2"}
    r = sh.resolve("1/2", env)
    assert r.shard is not None and str(r.shard) == "1/2"
    assert any("would give shard 2/2" in n for n in r.notes)
    r = sh.resolve(None, env)
    assert r.shard is not None and str(r.shard) == "2/2"
    assert any("CI_NODE_INDEX" in n for n in r.notes)
    # --iteration chooses the indices itself: the environment is not read
    r = sh.resolve(None, env, explicit_iterations=True)
    assert r.shard is None and r.notes
    with pytest.raises(ConfigError, match="--iteration"):
        sh.resolve("1/2", env, explicit_iterations=True)
    assert sh.resolve(None, {}) == sh.Resolved(None, ())


def test_check_fits_refuses_shards_with_no_work() -> None:
    sh.check_fits(sh.Shard(3, 3), 3)
    with pytest.raises(ConfigError, match="at most 3 shards"):
        sh.check_fits(sh.Shard(1, 4), 3)


def test_record_carries_what_merge_compares() -> None:
    from lab.runner import load_scenario
    from lab.scenario.overrides import Overrides

    ov = Overrides(repeat=1, seed=99)
    scenario = ov.apply(load_scenario(SCENARIOS / "sweep-rebalance-delay.yaml"))
    rec = sh.record(sh.Shard(2, 3, "--shard"), scenario, ov)
    text = (SCENARIOS / "sweep-rebalance-delay.yaml").read_text()
    assert rec["index"] == 2 and rec["total"] == 3 and rec["rule"] == sh.RULE
    assert rec["sweep_size"] == 5 and rec["iterations"] == 2      # indices 1 and 4
    assert rec["seed"] == 99 and rec["overrides"]["repeat"] == 1
    assert rec["scenario_sha256"] == sh.scenario_sha256(text) and len(rec["scenario_sha256"]) == 64


def test_old_summaries_without_a_shard_still_load() -> None:
    old = {"scenario": "x", "accelerator": "tcg", "seed": 3}
    info = RunInfo.from_json(old)
    assert info.shard is None
    new = RunInfo.from_json(info.to_json() | {"shard": {"index": 1, "total": 2}})
    assert new.shard == {"index": 1, "total": 2}


# ---- the command line: refused before any VM ------------------------------------------------

@pytest.mark.parametrize("argv,env,needle", [
    (["--shard", "0/2"], {}, "shard 0/2 does not exist"),
    (["--shard", "3/2"], {}, "shard 3/2 does not exist"),
    (["--shard", "a/b"], {}, "expected K/N"),
    (["--shard", "7/7"], {}, "at most 6 shards"),
    (["--shard", "1/2", "--iteration", "0"], {}, "--shard and --iteration"),
    ([], {"CI_NODE_INDEX": "1", "CI_NODE_TOTAL": "2", "JOB_COMPLETION_INDEX": "1",
          "REBALAB_SHARD_TOTAL": "2"}, "two different shards"),
    ([], {"JOB_COMPLETION_INDEX": "0"}, "REBALAB_SHARD_TOTAL"),
])
def test_run_refuses_bad_shards_with_one_line(argv: list[str], env: dict[str, str], needle: str,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    for name in sh.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    rc = main(["run", str(SCENARIOS / "hotplug-cycle.yaml"), *argv, "--runs", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []       # no run directory: nothing started
