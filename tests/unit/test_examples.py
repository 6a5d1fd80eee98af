"""examples/: every CI engine example parses, and every `rebalab` command in it parses
with the CLI's own parser (lab.cli.build_parser), names a scenario that exists, with
overrides that scenario accepts and a shard that fits its sweep.

An example that drifts from the CLI (a renamed flag, a typo in --set) fails here, not
in a user's pipeline at 3 a.m.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab.cli import UsageError, build_parser
from lab.shard import check_fits, parse_shard

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
YAML_FILES = sorted(p for p in EXAMPLES.rglob("*") if p.suffix in (".yml", ".yaml"))
SHELL_FILES = sorted(EXAMPLES.rglob("*.sbatch"))
#: GitHub Actions expressions, as the runner substitutes them before the shell runs
GH_VALUES = {"matrix.shard": "2"}
_GH_EXPR = re.compile(r"\$\{\{\s*([^}]*?)\s*\}\}")
_CONTROL = {";", "&&", "||", "|", "&", "(", ")", "\n"}
_PREFIXES = {"exec", "srun", "time", "env"}
_MENTION = re.compile(r"(^|[\s/;&|(])rebalab(\s|$)")


#: keys whose values the engines run as shell (GitHub `run`, GitLab `script`, a
#: container's `command`/`args`); everything else (`name:`...) is prose
SHELL_KEYS = {"run", "script", "before_script", "after_script", "command", "args"}


def _strings(node: Any, shell: bool = False) -> Iterator[str]:
    """The shell text in a YAML document."""
    if isinstance(node, str):
        if shell:
            yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, shell or k in SHELL_KEYS)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v, shell)


def _substitute_gh(text: str) -> str:
    def repl(m: re.Match[str]) -> str:
        expr = m.group(1)
        if expr in GH_VALUES:
            return GH_VALUES[expr]
        if expr.startswith("hashFiles("):
            return "0" * 8
        raise AssertionError(f"unknown GitHub expression in a command: {expr}")
    return _GH_EXPR.sub(repl, text)


def rebalab_commands(script: str) -> list[list[str]]:
    """The argv (after `rebalab`) of every rebalab command in a shell script."""
    script = _substitute_gh(script).replace("\\\n", " ")
    out: list[list[str]] = []
    for line in script.splitlines():
        if line.lstrip().startswith("#") or not _MENTION.search(line):
            continue          # prose (a step's name) need not be shell
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lex.whitespace_split = True
        tokens = list(lex)
        at_start = True
        i = 0
        while i < len(tokens):
            tok = tokens[i]
            if tok in _CONTROL:
                at_start = True
            elif at_start and tok in _PREFIXES:
                pass
            elif at_start and Path(tok).name == "rebalab":
                j = i + 1
                while j < len(tokens) and tokens[j] not in _CONTROL:
                    j += 1
                out.append(tokens[i + 1:j])
                i = j
                continue
            else:
                at_start = False
            i += 1
    return out


def _all_commands(path: Path) -> list[list[str]]:
    if path.suffix in (".yml", ".yaml"):
        docs = list(yaml.safe_load_all(path.read_text()))
        return [c for d in docs for s in _strings(d) for c in rebalab_commands(s)]
    return rebalab_commands(path.read_text())


def test_every_engine_has_an_example() -> None:
    names = {p.relative_to(EXAMPLES).parts[0] for p in YAML_FILES + SHELL_FILES}
    assert names == {"github-actions", "gitlab", "kubernetes", "slurm"}


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_yaml_examples_parse(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


@pytest.mark.parametrize("path", SHELL_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_slurm_scripts_parse_with_bash(path: Path) -> None:
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert path.read_text().startswith("#!/bin/bash\n")


def _check_command(argv: list[str], where: Path) -> Any:
    try:
        args = build_parser().parse_args(argv)
    except (UsageError, SystemExit) as exc:
        raise AssertionError(f"{where}: `rebalab {' '.join(argv)}` does not parse: {exc}") from None
    if args.command == "run":
        from lab.runner import load_scenario
        from lab.scenario.overrides import from_args

        scenario = from_args(args).apply(load_scenario(ROOT / args.scenario))
        if args.shard is not None and "$" not in args.shard:
            check_fits(parse_shard(args.shard), len(scenario.sweep()))
    return args


@pytest.mark.parametrize("path", YAML_FILES + SHELL_FILES,
                         ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_rebalab_command_parses_with_the_cli_parser(path: Path) -> None:
    commands = _all_commands(path)
    assert commands, f"{path}: no rebalab command found"
    for argv in commands:
        _check_command(argv, path)


@pytest.mark.parametrize("engine", ["github-actions", "gitlab", "kubernetes", "slurm"])
def test_each_engine_runs_shards_and_merges_them(engine: str) -> None:
    cmds = [a for p in YAML_FILES + SHELL_FILES if p.relative_to(EXAMPLES).parts[0] == engine
            for a in (_check_command(c, p) for c in _all_commands(p))]
    runs = [a for a in cmds if a.command == "run"]
    merges = [a for a in cmds if a.command == "merge"]
    assert runs and merges
    # every shard runs with the same options (merge refuses a mix)
    assert len({(a.scenario, tuple(a.set), a.repeat, a.seed) for a in runs}) == 1
    assert all(m.out for m in merges)


def test_github_matrix_matches_the_shard_total() -> None:
    path = EXAMPLES / "github-actions" / "rebalab-shards.yml"
    doc = yaml.safe_load(path.read_text())
    values = doc["jobs"]["shard"]["strategy"]["matrix"]["shard"]
    (run,) = [a for a in map(build_parser().parse_args, _all_commands(path))
              if a.command == "run"]
    total = parse_shard(run.shard).total
    assert sorted(values) == list(range(1, total + 1))
    for k in values:            # each matrix value gives a valid shard of that total
        assert parse_shard(f"{k}/{total}").index == k
    assert doc["jobs"]["merge"]["needs"] == "shard"


def test_kubernetes_total_matches_completions() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "indexed-job.yaml").read_text()))
    (job,) = [d for d in docs if d.get("kind") == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    env = {e["name"]: e["value"] for e in spec["template"]["spec"]["containers"][0]["env"]}
    assert int(env["REBALAB_SHARD_TOTAL"]) == spec["completions"]
    merge = yaml.safe_load((EXAMPLES / "kubernetes" / "merge-job.yaml").read_text())
    script = merge["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert f"for k in {' '.join(str(i) for i in range(spec['completions']))};" in script


def test_gitlab_parallel_matches_the_merge_glob() -> None:
    doc = yaml.safe_load((EXAMPLES / "gitlab" / "gitlab-ci.yml").read_text())
    n = doc["rebalab-shard"]["parallel"]
    assert doc["rebalab-merge"]["needs"] == ["rebalab-shard"]
    (merge,) = [c for s in doc["rebalab-merge"]["script"] for c in rebalab_commands(s)]
    assert any(arg.endswith(f"-of-{n}") for arg in merge)


def test_slurm_array_is_one_range() -> None:
    text = (EXAMPLES / "slurm" / "rebalab-shards.sbatch").read_text()
    m = re.search(r"^#SBATCH --array=(\d+)-(\d+)$", text, re.M)
    assert m is not None and int(m.group(2)) >= int(m.group(1))


def test_the_command_finder_finds_what_it_should() -> None:
    """The extractor above is what makes the parse test mean something."""
    script = ("echo hi && .venv/bin/rebalab run x.yaml --shard 1/2 || [ $? -eq 1 ]\n"
              "# rebalab not-a-command\n"
              "srun rebalab merge a b \\\n  --out m; rebalab --version\n"
              "echo rebalab run is not at a command position\n")
    assert rebalab_commands(script) == [["run", "x.yaml", "--shard", "1/2"],
                                        ["merge", "a", "b", "--out", "m"], ["--version"]]
    with pytest.raises(AssertionError, match="does not parse"):
        _check_command(["run", "x.yaml", "--shrad", "1/2"], Path("x"))


def _engine_envs() -> dict[str, list[dict[str, str]]]:
    """Every copy's variables, as each engine sets them for the example as written."""
    gl = yaml.safe_load((EXAMPLES / "gitlab" / "gitlab-ci.yml").read_text())
    n = gl["rebalab-shard"]["parallel"]
    gitlab = [{"CI_NODE_INDEX": str(k), "CI_NODE_TOTAL": str(n)} for k in range(1, n + 1)]
    docs = yaml.safe_load_all((EXAMPLES / "kubernetes" / "indexed-job.yaml").read_text())
    (job,) = [d for d in docs if d.get("kind") == "Job"]
    env = {e["name"]: e["value"] for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    k8s = [{"JOB_COMPLETION_INDEX": str(i), **env} for i in range(job["spec"]["completions"])]
    text = (EXAMPLES / "slurm" / "rebalab-shards.sbatch").read_text()
    m = re.search(r"^#SBATCH --array=(\d+)-(\d+)$", text, re.M)
    assert m is not None
    lo, hi = int(m.group(1)), int(m.group(2))
    slurm = [{"SLURM_ARRAY_TASK_ID": str(t), "SLURM_ARRAY_TASK_MIN": str(lo),
              "SLURM_ARRAY_TASK_MAX": str(hi), "SLURM_ARRAY_TASK_COUNT": str(hi - lo + 1)}
             for t in range(lo, hi + 1)]
    return {"gitlab": gitlab, "kubernetes": k8s, "slurm": slurm}


@pytest.mark.parametrize("engine", ["gitlab", "kubernetes", "slurm"])
def test_engine_variables_give_every_shard_once(engine: str) -> None:
    """The examples that pass no --shard: the engine's variables, as it sets them for
    the file as written, name shards 1..N once each, and N fits the sweep."""
    from lab.runner import load_scenario
    from lab.scenario.overrides import from_args
    from lab.shard import resolve

    (run,) = [a for p in YAML_FILES + SHELL_FILES if p.relative_to(EXAMPLES).parts[0] == engine
              for a in map(build_parser().parse_args, _all_commands(p)) if a.command == "run"]
    assert run.shard is None
    size = len(from_args(run).apply(load_scenario(ROOT / run.scenario)).sweep())
    shards = [resolve(None, env).shard for env in _engine_envs()[engine]]
    assert all(s is not None for s in shards)
    total = len(shards)
    assert sorted((s.index, s.total) for s in shards if s) == [(k, total)
                                                               for k in range(1, total + 1)]
    check_fits(shards[0], size)      # type: ignore[arg-type]
