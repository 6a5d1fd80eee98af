"""Benchmark: reading big logs (``rebalab inspect``'s parsers).

For each format it builds a file of ``--size`` MB from the real samples of the test
corpus (tests/unit/data/logs/<format>/, repeated until the size is reached), then
measures in a fresh child process, so figures don't mix:
- parse: every line through the parser, events counted and dropped (the parser's own
  speed and memory: streaming, so memory must not grow with the file);
- inspect: the whole ``rebalab inspect`` path (parse, keep, timeline, rules).
It prints MB/s, wall time, the child's peak RSS, and each figure's ratio to the
target (100 MB in 10 s; peak RSS 300 MB). Run with `make bench-logs`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "unit" / "data" / "logs"
#: format name -> corpus folder
FORMATS = {"setupapi": "setupapi", "kernel-log": "kernel", "event-xml": "winevent",
           "pnputil": "pnputil"}
SUFFIX = {"event-xml": ".xml"}
TARGET_S_PER_100MB = 10.0
TARGET_RSS_MB = 300.0


def build_input(fmt: str, folder: Path, size: int, out: Path) -> Path | None:
    """Concatenate the format's samples (those its parser detects) until ``size`` bytes."""
    from lab import logs
    from lab.logs.base import LogInput

    parser = logs.get(fmt)
    samples = []
    for p in sorted(folder.glob("*")):
        if not p.is_file() or p.name.upper().startswith("PROVENANCE") or p.suffix == ".md":
            continue
        try:
            if logs.detect(LogInput(p)).name == fmt:
                raw = p.read_bytes()
                if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw.startswith(b"\xef\xbb\xbf"):
                    continue          # the repeated file is plain UTF-8
                samples.append(raw.rstrip(b"\r\n") + b"\n")
        except Exception:      # noqa: BLE001 - a sample another parser owns
            continue
    if not samples:
        return None
    if fmt == "event-xml":
        # one well-formed document: the events of the samples, repeated, under <Events>
        import re
        body = b"".join(re.findall(rb"<Event[ >].*?</Event>", b"\n".join(samples), re.S))
        samples = [body + b"\n"] if body else []
        if not samples:
            return None
    target = out / f"big-{fmt}{SUFFIX.get(fmt, '.log')}"
    with target.open("wb") as f:
        if fmt == "event-xml":
            f.write(b"<Events>\n")
        n = 0
        while n < size:
            for s in samples:
                f.write(s)
                n += len(s)
        if fmt == "event-xml":
            f.write(b"</Events>\n")
    return target


def child(mode: str, fmt: str, path: str) -> None:
    """Runs in the child: one measurement, printed as JSON."""
    from lab import logs
    from lab.logs.base import LogInput, Tally

    t0 = time.perf_counter()
    if mode == "parse":
        inp = LogInput(path)
        tally = Tally(path=path, format=fmt)
        n = 0
        for _ in logs.get(fmt).parse(inp, tally):
            n += 1
        out = {"events": n, "lines": tally.lines, "not_understood": tally.not_understood}
    else:
        from lab.inspect import inspect_files
        res = inspect_files([path], fmt=fmt)
        out = {"events": len(res.timeline), "violations": len(res.violations),
               "left_out": sum(f.left_out for f in res.files)}
    out["seconds"] = time.perf_counter() - t0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec (the parent's peak)
    hwm = [ln for ln in Path("/proc/self/status").read_text().splitlines()
           if ln.startswith("VmHWM:")]
    out["rss_mb"] = (int(hwm[0].split()[1]) / 1024 if hwm
                     else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100, help="MB per generated file (default 100)")
    ap.add_argument("--format", action="append", choices=sorted(FORMATS),
                    help="only these formats (default: all)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    from rich.console import Console
    from rich.table import Table

    from lab.report.console import PLAIN_WIDTH

    con = Console(highlight=False)
    if not con.is_terminal:
        con.width = PLAIN_WIDTH
    table = Table(title=f"log parsers on {args.size} MB inputs (targets: 100 MB in "
                        f"{TARGET_S_PER_100MB:g} s, peak RSS {TARGET_RSS_MB:g} MB)")
    for col in ("format", "mode", "lines", "events", "seconds", "MB/s", "time ratio",
                "peak RSS MB", "RSS ratio"):
        table.add_column(col, justify="left" if col in ("format", "mode") else "right")
    with tempfile.TemporaryDirectory(prefix="rebalab-bench-logs-") as tmp:
        for fmt in args.format or sorted(FORMATS):
            path = build_input(fmt, CORPUS / FORMATS[fmt], args.size * 1_000_000, Path(tmp))
            if path is None:
                con.print(f"{fmt}: no corpus sample detected as {fmt}; skipped")
                continue
            mb = path.stat().st_size / 1e6
            for mode in ("parse", "inspect"):
                proc = subprocess.run([sys.executable, __file__, "--child", mode, fmt, str(path)],
                                      capture_output=True, text=True, timeout=1800,
                                      env={k: v for k, v in os.environ.items()
                                           if not k.startswith("REBALAB_")})
                if proc.returncode != 0:
                    con.print(f"{fmt} {mode}: failed (exit {proc.returncode}): "
                              f"{proc.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                target_s = TARGET_S_PER_100MB * mb / 100
                table.add_row(fmt, mode, str(r.get("lines", "-")), str(r["events"]),
                              f"{r['seconds']:.2f}", f"{mb / r['seconds']:.1f}",
                              f"{r['seconds'] / target_s:.2f}", f"{r['rss_mb']:.0f}",
                              f"{r['rss_mb'] / TARGET_RSS_MB:.2f}")
            path.unlink()
    con.print(table)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
