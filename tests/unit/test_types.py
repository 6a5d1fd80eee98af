"""The type checker is part of the suite: `lab/` and `vdevice/` type-check clean, so an
interface that lacks what its callers use (the old Agent without open/collect/
idempotent) fails here, not at run time on a guest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_lab_and_vdevice_type_check_clean(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"),
                        "--no-error-summary", "lab", "vdevice"],
                       capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
