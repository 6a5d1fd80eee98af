"""``rebalab doctor``, the Linux half: boot the built-in guest once and check, through
the same code a run uses, everything a run relies on in it.

One VM with the default topology (``vdevice.presets.default_topology``, ACPI hot-plug,
the audio device planned for ``rp1``), as ``rebalab demo`` boots it. In order:

* ssh: the agent answers; the server's banner (what the guest runs: OpenSSH or
  dropbear, and its version), the round trip, and that the guest runs the kernel
  release the manifest names;
* kprobes: tracefs mounted and ``kprobe_events`` writable (the tracer defines its
  probes there);
* btf: the guest kernel's ``/sys/kernel/btf/vmlinux``, and the offsets of the device
  name that the tracer reads from the image's vmlinux on the host;
* tracer start: ``LinuxTracer`` arms its kprobes and the relay to ttyS2;
* clock: a burst of two-way sync tokens over ttyS1, fitted by ``lab.clock.estimate``:
  the bound every guest event on a timeline carries;
* hot-plug (skipped with ``--quick``): the default audio model is plugged, its Linux
  driver binds, it is unplugged and gone from QEMU and the guest;
* tracer stop: the drain marker comes back through the relay; after a hot-plug the
  stream must hold the probe of the plugged device, so the whole path (kprobe ->
  trace_pipe -> ttyS2 -> host) is shown to work, not just configured;
* shutdown: QEMU gone, the private socket directory removed.

Every guest command is a fixed string or quoted with the agent's shell.
"""

from __future__ import annotations

import socket
import time
from typing import Any

from lab.doctor import Check, Doctor, boot_check, stop_check
from lab.image import GuestImage

#: the model the default topology plans for hot-plug (and the demo plugs first)
DEFAULT_MODEL = "ich9-intel-hda"
#: a bound above this is worth a warning: the serial-console sync normally gives ~1 ms;
#: tens of ms means the host is too loaded to order close guest and host events
CLOCK_WARN_NS = 10_000_000


def ssh_banner(port: int, timeout: float = 5.0) -> str:
    """The SSH server's identification line (RFC 4253 4.2), read from the forward."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = b""
        end = time.monotonic() + timeout
        while b"\n" not in data and len(data) < 512 and time.monotonic() < end:
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
    for line in data.decode("ascii", "replace").splitlines():
        if line.startswith("SSH-"):
            return line.strip()
    raise OSError(f"no SSH identification line from 127.0.0.1:{port} (got {data[:80]!r})")


def check_ssh(m: Any, image: GuestImage) -> Check:
    banner = ssh_banner(m.ssh_port)
    software = banner.split("-", 2)[2] if banner.count("-") >= 2 else banner
    t0 = time.monotonic()
    r = m.agent.run("uname -r", timeout=15)
    rtt_ms = (time.monotonic() - t0) * 1e3
    r.check()
    release = r.stdout.strip()
    text = f"{software}, `uname -r` round trip {rtt_ms:.0f} ms"
    if release != image.kernel_release:
        return Check("ssh", False, f"{text}; the guest runs {release}, the manifest says "
                     f"{image.kernel_release}", "rebuild the image (`make image`): the "
                     "manifest does not describe what boots")
    return Check("ssh", True, f"{text}, kernel {release}")


def check_kprobes(m: Any) -> Check:
    from lab.guest.linux.kprobes import TRACEFS

    sh = m.agent.shell
    ev = sh.quote(f"{TRACEFS}/kprobe_events")
    r = m.agent.run(f"grep -q ' {sh.quote(TRACEFS)} tracefs ' /proc/mounts || {{ echo no-tracefs; exit 0; }}; "
                    f"[ -w {ev} ] && echo writable || echo read-only; "
                    f"wc -l < {sh.quote(TRACEFS + '/kprobe_events')}", timeout=15)
    r.check()
    out = r.stdout.split()
    if "no-tracefs" in out:
        return Check("kprobes", False, f"tracefs is not mounted at {TRACEFS}",
                     "the image's init mounts it (images/linux/rootfs/init): rebuild the image")
    if "writable" not in out:
        return Check("kprobes", False, f"{TRACEFS}/kprobe_events is not writable",
                     "the guest kernel needs CONFIG_KPROBE_EVENTS and the agent must be root")
    defined = out[-1] if out and out[-1].isdigit() else "?"
    return Check("kprobes", True, f"{TRACEFS}/kprobe_events writable ({defined} defined)")


def check_btf(m: Any, image: GuestImage) -> Check:
    from lab.guest.linux.btf import BtfError, DeviceNameOffsets

    r = m.agent.run("stat -c %s /sys/kernel/btf/vmlinux 2>/dev/null || echo missing", timeout=15)
    size = r.stdout.strip()
    if not size.isdigit():
        return Check("btf", False, "/sys/kernel/btf/vmlinux is missing in the guest",
                     "a kernel built with CONFIG_DEBUG_INFO_BTF (Debian's is)")
    vmlinux = image.file("vmlinux")
    try:
        off = DeviceNameOffsets.from_vmlinux(vmlinux)
    except (OSError, BtfError) as exc:
        return Check("btf", True, f"guest BTF {int(size) / 2**20:.1f} MiB; but the host cannot read "
                     f"{vmlinux}'s BTF ({exc}): kprobe events will not name their device",
                     "rebuild the image (`make image`) so that vmlinux is extracted", warn=True)
    return Check("btf", True, f"guest BTF {int(size) / 2**20:.1f} MiB; device name at "
                 f"struct device +{off.device_name}, struct pci_dev +{off.pci_dev_name}")


def check_tracer_start(m: Any, image: GuestImage, holder: dict[str, Any]) -> Check:
    from lab.guest.linux.kprobes import LinuxTracer

    tracer = LinuxTracer(m, image).start()
    holder["tracer"] = tracer
    missing = f"; not in this kernel: {', '.join(tracer.missing)}" if tracer.missing else ""
    return Check("tracer start", True, f"{len(tracer.active)} of {len(tracer.wanted)} functions "
                 f"probed, relay on ttyS2{missing}")


def check_tracer_stop(tracer: Any, plugged_bdf: str | None) -> Check:
    from lab.events import Kind

    events = tracer.stop()
    if plugged_bdf is None:
        return Check("tracer stop", True, f"stopped; {len(events)} events received")
    every = [e for e in events if e.kind in (Kind.PROBE_ENTER, Kind.PROBE_EXIT)]
    probes = [e for e in every if e.device is not None and e.device.bdf == plugged_bdf]
    if every and not probes and all(e.device is None for e in every):
        return Check("tracer stop", True, f"drained; {len(events)} events received, {len(every)} "
                     "of them PCI probes, without device names (no BTF offsets: see the btf check)",
                     "rebuild the image (`make image`) so that vmlinux is extracted", warn=True)
    if not probes:
        kinds = sorted({e.kind.value for e in events})
        return Check("tracer stop", False, f"{len(events)} events received, none a probe of "
                     f"{plugged_bdf} (kinds: {', '.join(kinds) or 'none'})",
                     "the kprobe stream over ttyS2 lost events: see guest-trace.txt and lab.log "
                     "in the doctor's run directory")
    return Check("tracer stop", True, f"drained; {len(events)} events received, "
                 f"{len(probes)} of them the probe of {plugged_bdf}")


def check_clock(m: Any, tokens: int = 24) -> Check:
    from lab import clock
    from lab.guest.linux.trace import ClockSync

    assert m.console is not None
    cursor = m.console.cursor()
    sync = ClockSync(m)
    got = sync.burst(tokens)
    lines = [(ln.t_host_ns, ln.text) for ln in m.console.lines(cursor)]
    alignment = clock.estimate(sync.samples(lines))
    bound = alignment.bound_ns
    if got == 0 or bound is None:
        return Check("clock", False, f"{got} of {tokens} sync tokens came back over ttyS1; "
                     "no alignment", "the guest's sync loop (ttyS1 -> /dev/kmsg) is not running: "
                     "see console.log in the doctor's run directory")
    text = (f"guest clock aligned ±{bound / 1e6:.3f} ms ({got} two-way samples, "
            f"{alignment.method})")
    if bound > CLOCK_WARN_NS:
        return Check("clock", True, text, "a loaded host widens the bound: run with fewer VMs "
                     "at once; close guest and host events may be misordered", warn=True)
    return Check("clock", True, text)


def check_hotplug(m: Any, model: str, holder: dict[str, Any]) -> Check:
    from lab import operations as ops
    from vdevice.catalog import get_model
    from vdevice.topology import Device, Placement

    dev = Device("snd0", model, "rp1", Placement.HOT)
    plug = ops.plug(m, dev)
    bdf = str(plug.details["bdf"])
    holder["bdf"] = bdf
    unplug = ops.unplug(m, dev.id)
    driver = get_model(model).linux_driver
    gone = unplug.durations_ms.get("guest_gone", unplug.durations_ms.get("qemu_gone", 0.0))
    return Check("hot-plug", True, f"{model} at {bdf}: {driver} bound {plug.durations_ms['bound']:.0f} ms "
                 f"after device_add; unplugged, gone in {gone:.0f} ms "
                 f"({unplug.details.get('qemu_evidence', 'QEMU')})")


def guest_checks(doc: Doctor, image: GuestImage, *, model: str = DEFAULT_MODEL) -> None:
    """Boot, check, stop: the machine is stopped whatever happens (the finally)."""
    from lab.machine import Machine
    from lab.rundir import RunDir
    from vdevice.presets import default_topology
    from vdevice.topology import HotplugMode

    run = RunDir(doc.runs, "doctor")
    doc.run_dir = run.path
    where = f"see lab.log and console.log in {run.path}"
    m: Machine | None = None
    holder: dict[str, Any] = {}
    try:
        m = Machine(default_topology(HotplugMode.ACPI, model=model), run, image=image,
                    accel=doc.accel)
        vm = m
        if not doc.check("boot", lambda: boot_check(vm), fix=where).ok:
            return
        doc.check("ssh", lambda: check_ssh(vm, image), fix=f"the guest's SSH server: {where}")
        doc.check("kprobes", lambda: check_kprobes(vm), fix=where)
        doc.check("btf", lambda: check_btf(vm, image), fix=where)
        doc.check("tracer start", lambda: check_tracer_start(vm, image, holder),
                  fix=f"read the error above and {where}")
        doc.check("clock", lambda: check_clock(vm), fix=where)
        if doc.quick:
            doc.add(Check("hot-plug", True, "skipped (--quick)", warn=True))
        else:
            doc.check("hot-plug", lambda: check_hotplug(vm, model, holder),
                      fix=f"{model}'s driver did not bind or the device did not go: {where}")
        tracer = holder.get("tracer")
        if tracer is not None:
            doc.check("tracer stop", lambda: check_tracer_stop(tracer, holder.get("bdf")),
                      fix=where)
    finally:
        if m is not None:
            vm = m
            doc.check("shutdown", lambda: stop_check(vm), fix=where)
        run.close()
