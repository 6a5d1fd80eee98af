"""``--jobs N``: several VMs on one host, iterations handed out from one queue.

A worker is the runner with a VM slot of its own (machine, restore point, signal
files) and a view of the run directory whose host events are its own: a live wait on
one VM must not see another VM's plug. Iteration K has the same parameters and seed
whichever VM runs it (the sweep decides them), so the results, signatures and rates
equal those of ``--jobs 1`` with the same seed; only timing and which VM ran what
differ. Everything else is shared: the run directory, the iterations' artifacts, the
console, the summary the runner writes at the end.

Ctrl-C reaches the main thread only: it stops every worker's VM (which ends the step
each was in), waits for the workers, and the run ends as interrupted with nothing left.
"""

from __future__ import annotations

import copy
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lab.errors import ConfigError, LabError
from lab.events import Event
from lab.rundir import RunDir, events_since

if TYPE_CHECKING:
    from lab.results import IterationResult
    from lab.runner import ScenarioRunner

#: the most VMs one run starts (each is a QEMU with 512 MiB or more)
MAX_JOBS = 64
#: what one VM of the built-in guest needs besides its RAM (QEMU, TCG's code buffer)
VM_OVERHEAD_MB = 400


def parse_jobs(value: str) -> int | str:
    """``--jobs N`` or ``auto``; a clear error for anything else."""
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"--jobs {value[:20]!r}: a number of VMs (1..{MAX_JOBS}) or auto") \
            from None
    if not 1 <= n <= MAX_JOBS:
        raise ConfigError(f"--jobs {n}: between 1 and {MAX_JOBS}")
    return n


def auto_jobs(accel: str, vm_memory_mb: int, *, cpus: int | None = None,
              mem_available_mb: int | None = None) -> int:
    """What this host can run at once. TCG: one core per VM (a vCPU thread keeps one
    core busy). KVM: the cores, and the memory each VM takes."""
    if cpus is None:
        cpus = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else (os.cpu_count() or 1))
    mem = mem_available_mb if mem_available_mb is not None else _mem_available_mb()
    by_mem = max(1, mem // (vm_memory_mb + VM_OVERHEAD_MB)) if mem else MAX_JOBS
    # under both accelerators a VM of the built-in guest keeps about one core busy
    # (one vCPU; TCG translates on it, KVM runs it); ``accel`` is kept for the log
    del accel
    return max(1, min(MAX_JOBS, cpus, by_mem))


def _mem_available_mb() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class RunView:
    """A worker's window on the run directory: the same directory and files, its own
    in-memory host events (what live waits and observations read), its lines in lab.log
    marked with its name."""

    def __init__(self, run: RunDir, name: str) -> None:
        self._run = run
        self.name = name
        self.path = run.path
        self.events: list[Event] = []
        self._lock = threading.Lock()

    @property
    def write_failures(self) -> int:
        return self._run.write_failures

    def log(self, message: str) -> None:
        self._run.log(f"[{self.name}] {message}")

    def record(self, event: Event) -> Event:
        with self._lock:
            self.events.append(event)
        self._run.record(event, keep=False)
        return event

    def forget_events_before(self, t_ns: int) -> int:
        with self._lock:
            self.events, n = events_since(self.events, t_ns)
            return n

    def write_json(self, rel: str, data: Any) -> Path:
        return self._run.write_json(rel, data)

    def write_text(self, rel: str, text: str) -> Path:
        return self._run.write_text(rel, text)

    def close(self) -> None:
        """The run directory is the runner's to close."""


def worker(runner: ScenarioRunner, j: int) -> ScenarioRunner:
    """The runner with a VM slot of its own (see the module docstring)."""
    w = copy.copy(runner)
    w.run = RunView(runner.run, f"job{j}")           # type: ignore[assignment]
    w.vm_prefix = f"job{j}-vm"
    w.machine = None
    w.machine_count = 0
    w.restore_point = None
    w._snapshot_dir = None
    w._snapshot_vm = None
    w._signals = {}
    return w


def run_parallel(runner: ScenarioRunner, items: list[tuple[int, int | None]], jobs: int,
                 done: set[int]) -> str | None:
    """Run ``items`` on ``jobs`` VMs; append results to ``runner.results`` and indices to
    ``done``. Returns why the run stopped early (``until``), or None."""
    q: queue.Queue[tuple[int, int | None]] = queue.Queue()
    for item in items:
        q.put(item)
    stop = threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []
    why: list[str] = []
    workers = [worker(runner, j + 1) for j in range(jobs)]
    runner.run.log(f"{jobs} VMs, {len(items)} iteration(s) from one queue")

    def body(w: ScenarioRunner) -> None:
        try:
            while not stop.is_set():
                try:
                    k, attempt = q.get_nowait()
                except queue.Empty:
                    return
                result: IterationResult = w._run_item(k, attempt, lock=lock)
                with lock:
                    runner.results.append(result)
                    done.add(k)
                    reason = runner._stop_reason(result, attempt)
                    if reason and not why:
                        why.append(reason)
                        stop.set()
        except BaseException as exc:              # noqa: BLE001 - handed to the main thread
            with lock:
                errors.append(exc)
            stop.set()
        finally:
            try:
                w._stop_machine()
            finally:
                w._drop_snapshot()

    threads = [threading.Thread(target=body, args=(w,), name=f"job{j + 1}", daemon=True)
               for j, w in enumerate(workers)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(0.2)
    except BaseException:
        # Ctrl-C (main thread only): stop every VM, which ends the step each worker is
        # in; the workers then finish their iteration as interrupted and leave
        stop.set()
        for w in workers:
            m = w.machine
            if m is not None:
                try:
                    m.stop(discard=True)
                except Exception as exc:          # noqa: BLE001 - keep stopping the others
                    runner.run.log(f"stopping {w.run.name}'s VM failed: {exc!r}")  # type: ignore[attr-defined]
        for t in threads:
            t.join(30)
        raise
    if errors:
        from lab.runner import _Lost
        first = errors[0]
        if isinstance(first, (LabError, KeyboardInterrupt, _Lost)):
            raise first
        raise LabError(f"a worker failed: {type(first).__name__}: {first}") from first
    return why[0] if why else None
