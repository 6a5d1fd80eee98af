"""The bad-input corpus (tests/unit/corpus/bad_inputs.py): every case through the CLI in
one child process under prlimit (address space 3 GB), each with a 5 s alarm. Each must
exit 2 with one line on stderr, no traceback, no echoed file content (a canary planted
in the files), in under 5 s; the child's peak RSS must stay under 300 MB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.unit.corpus.bad_inputs import SECRET, cases

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    # crash logs and any run directory go to a private temporary place, not the checkout
    env = {**os.environ, "REBALAB_RUNS": str(tmp_path_factory.mktemp("corpus-runs"))}
    r = subprocess.run(["prlimit", "--as=3000000000", sys.executable, "-m",
                        "tests.unit.corpus.run_cases"], capture_output=True, text=True,
                       cwd=REPO, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    return {x["name"]: x for x in recs}


def test_the_corpus_is_large_and_covers_every_command_and_file_kind(
        results: dict[str, dict[str, Any]]) -> None:
    names = [c[0] for c in cases()]
    assert len(names) >= 150 and len(set(names)) == len(names)
    assert set(results) == set(names)
    kinds = {n.split(":", 1)[0] for n in names}
    assert {"validate", "run", "replay", "timeline", "inspect", "argv"} <= kinds
    commands = {c[1][0] for c in cases() if c[1]}
    assert {"validate", "run", "replay", "timeline", "inspect", "demo", "rebalance", "image",
            "collect-dump"} <= commands
    top = max(results.values(), key=lambda x: x["maxrss_mb"])
    # RSS only grows: the first case that reached the peak is the one to look at
    first = next(x for x in results.values() if x["maxrss_mb"] == top["maxrss_mb"])
    assert top["maxrss_mb"] < 300, first


@pytest.mark.parametrize("name", [c[0] for c in cases()])
def test_case(name: str, results: dict[str, dict[str, Any]]) -> None:
    x = results[name]
    assert x["rc"] == 2, x
    assert x["stderr"].count("\n") == 1 and x["stderr"].startswith("error: "), x
    assert "Traceback" not in x["stderr"] + x["stdout"], x
    # bad input is named for what it is, never an "internal error" (a crash log)
    assert "internal error" not in x["stderr"], x
    assert SECRET not in x["stderr"] + x["stdout"], x
    assert x["seconds"] < 5, x
