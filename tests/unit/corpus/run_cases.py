"""Run the bad-input corpus in this process (the test starts it under prlimit) and print
one JSON record per case: exit status, stderr, time, and the peak RSS so far."""

from __future__ import annotations

import contextlib
import io
import json
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASE_SECONDS = 5


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout()


def main() -> int:
    from lab import machine
    from lab.cli import main as cli_main
    from tests.unit.corpus.bad_inputs import cases

    def no_vm(self: Any, *a: Any, **k: Any) -> Any:
        raise AssertionError("a bad input reached a VM start")
    machine.Machine.start = no_vm          # type: ignore[method-assign]
    signal.signal(signal.SIGALRM, _alarm)
    only = set(sys.argv[1:])
    for name, argv, files in cases():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory(prefix="rebalab-corpus-") as tmp:
            d = Path(tmp)
            for fname, data in files.items():
                (d / fname).write_bytes(data if isinstance(data, bytes) else data.encode())
            args = [a.replace("{d}", tmp) for a in argv]
            out, err = io.StringIO(), io.StringIO()
            t0 = time.monotonic()
            signal.alarm(CASE_SECONDS)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    try:
                        rc: Any = cli_main(args)
                    except SystemExit as exc:       # argparse --help and the like
                        rc = exc.code
            except _Timeout:
                rc = "timeout"
            except BaseException as exc:            # noqa: BLE001 - recorded, judged by the test
                rc = f"raised {type(exc).__name__}: {exc}"[:300]
            finally:
                signal.alarm(0)
            rec = {"name": name, "rc": rc, "stderr": err.getvalue()[-2000:],
                   "stdout": out.getvalue()[-2000:], "seconds": round(time.monotonic() - t0, 3),
                   "maxrss_mb": _peak_rss_mb()}
        print(json.dumps(rec), flush=True)
    return 0


def _peak_rss_mb() -> int:
    """This process's own peak RSS. Not getrusage's ru_maxrss: Linux carries that across
    fork and exec, so a child of a 300 MB pytest worker starts at 300 MB (a CI run failed
    on exactly that, with the first, empty-file case "at the peak"). VmHWM belongs to the
    address space exec created."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


if __name__ == "__main__":
    sys.exit(main())
