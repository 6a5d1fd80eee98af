"""``replay --exact --gdb``: a replay under QEMU's gdb stub, and how to walk it backwards.

The replay starts paused at its first instruction with ``-gdb`` on a unix socket in
the replay's own 0700 directory; gdb attaches, sets breakpoints, and ``continue`` runs
the replay. Reverse execution (``reverse-stepi``, ``reverse-continue``) needs a snapshot
in the replay (QEMU's docs: "usage of the reverse debugging requires at least one
snapshot created"): the ``--gdb`` replay gets an orphan qcow2 image, in which QEMU takes
``start_debugging`` when gdb attaches. Measured here, QEMU 7.2 did not get past the
first interrupt after loading a snapshot in replay (``rrsnapshot=init`` taken at record
start, or gdb's ``start_debugging``): icount stayed at 529158, so reverse-continue never
returned. Forward debugging works: the walk-through stops at remove(), shows the
transfer in flight, and runs on to the oops.

Symbols: the image boots the kernel through its PVH entry, which skips the
decompressor and with it KASLR, so core kernel functions sit at the addresses of the
guest's ``/proc/kallsyms`` in every boot. ``kernel_symbols`` reads them once from a
booted guest (cached per kernel) and the generated gdb script names them. Debian's
image carries no symbol table (its System.map is a stub pointing at the -dbg
package); for source-level debugging fetch ``linux-image-<abi>-amd64-dbg`` on demand
(~860 MB, the command is printed) and load its vmlinux in gdb.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lab.record import RecordingInfo
from vdevice.topology import qemu_opt

#: the functions the walk-through needs
WANTED = ("page_fault_oops", "pci_device_remove", "pci_device_probe", "exc_page_fault")


def gdb_endpoint(out: Path) -> str:
    """QEMU's ``-gdb`` value: a unix socket in the replay's own 0700 directory (nothing
    else on the host can connect to it), through the one QEMU option encoder."""
    return f"unix:{qemu_opt(str(out / 'gdb.sock'))},server=on,wait=off"


def socket_path(endpoint: str) -> str:
    return endpoint.removeprefix("unix:").rsplit(",server=on,wait=off", 1)[0].replace(",,", ",")


def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rebalab"
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def kernel_argv_path(info: RecordingInfo) -> str | None:
    for flag, value in zip(info.argv, info.argv[1:]):
        if flag == "-kernel":
            return value
    return None


def kernel_symbols(info: RecordingInfo, *, runs_root: Path, log=print  # type: ignore[no-untyped-def]
                   ) -> dict[str, int]:
    """Addresses of ``WANTED`` in the recorded kernel, from a booted guest's
    /proc/kallsyms (cached per kernel digest in ~/.cache/rebalab)."""
    digest = info.boot_inputs.get("kernel") or hashlib.sha256(
        str(kernel_argv_path(info)).encode()).hexdigest()
    cache = _cache_dir() / f"kallsyms-{digest[:16]}.txt"
    if not cache.exists():
        from lab.image import GuestImage
        from lab.machine import Machine
        from lab.rundir import RunDir
        from vdevice.presets import default_topology

        log("reading the guest kernel's symbol addresses (one boot, cached in "
            f"{cache})...")
        run = RunDir(runs_root, "kallsyms")
        try:
            with Machine(default_topology(), run, image=GuestImage.load(), accel="tcg") as m:
                assert m.agent is not None
                r = m.agent.run("grep -i ' t ' /proc/kallsyms", timeout=120)
                r.check()
                text = r.stdout
        finally:
            run.close()
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(cache)
    out: dict[str, int] = {}
    for line in cache.read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2] in WANTED and parts[2] not in out:
            addr = int(parts[0], 16)
            if addr:
                out[parts[2]] = addr
    return out


def walkthrough(sock: str, symbols: dict[str, int], fault_address: str | None) -> str:
    """A gdb script: stop at the remove() the oops follows, show the transfer in flight
    (edu's DMA command register, still mapped), then run on to the oops, which faults on
    that very register. Forward only: reverse-continue from the oops back to remove()
    needs QEMU to load a snapshot in replay, which hung QEMU 7.2 here (README, "Exact
    replay"); the script says where it would go."""
    addr = None
    if fault_address:
        addr = fault_address if fault_address.startswith("0x") else "0x" + fault_address
    lines = ["set pagination off", "set confirm off", f"target remote {sock}"]
    for name, value in sorted(symbols.items()):
        lines.append(f"set ${name} = {value:#x}")
    if "pci_device_remove" in symbols:
        lines += ["echo \\n== run to remove() (pci_device_remove: the rescan removes edu0)\\n",
                  "break *$pci_device_remove", "continue", "info registers rip rdi", "delete"]
        if addr:
            lines += ["echo \\n== edu's DMA command register (+0x98): bit 0 set = a transfer "
                      "in flight, and remove() is not waiting for it\\n", f"x/wx {addr}"]
    if "page_fault_oops" in symbols:
        lines += ["echo \\n== run on to the oops (page_fault_oops): rdx is the faulting "
                  "address\\n", "break *$page_fault_oops", "continue",
                  "info registers rip rdx", "delete"]
        if addr:
            # "Cannot access memory" is the point here, and an error would end the script
            lines += ["echo \\n== the same register, now unmapped (remove() unmapped BAR0 "
                      "under the reader)\\n", "python",
                      "try:", f"    gdb.execute('x/wx {addr}')",
                      "except gdb.error as exc:", "    print(exc)", "end"]
    lines += ["echo \\n(reverse-continue would walk back to remove() from here: QEMU 7.2 "
              "hung loading the replay snapshot it needs)\\n", "kill", "quit"]
    return "\n".join(lines) + "\n"


def gdb_instructions(endpoint: str, info: RecordingInfo, script: Path | None = None) -> str:
    """What to type to attach gdb to the replay (printed before it starts)."""
    sock = socket_path(endpoint)
    kernel = kernel_argv_path(info) or "vmlinux"
    text = [
        "gdb stub: the replay waits paused at its first instruction. In another terminal:",
        f"  gdb -q -ex 'target remote {sock}'",
    ]
    if script is not None:
        text.append(f"or run the walk-through (remove() with the transfer in flight -> "
                    f"the oops): gdb -q -batch -x {script}")
    text += ["Source-level symbols (on demand, ~860 MB): apt-get download "
             "linux-image-<release>-dbg (the guest's uname -r); dpkg-deb -x it; in gdb: "
             "file <dir>/usr/lib/debug/boot/vmlinux-<release>",
             f"(the replay boots {kernel}: no symbol table; the script names the "
             "functions it needs by address)"]
    return "\n".join(text)
