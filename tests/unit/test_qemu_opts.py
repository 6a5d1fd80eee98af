"""Every value the lab puts into a QEMU option string goes through one encoder
(vdevice.topology.qemu_opts), so a hostile path cannot add an option: an ISO named
``win,snapshot=on,file=x.iso`` or a $TMPDIR with a comma stays one value."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.accel import Accel
from lab.machine import Machine
from lab.rundir import RunDir
from lab.guest.windows import image as winimage
from lab.guest.windows import vmconfig
from vdevice.presets import default_topology
from vdevice.topology import qemu_opts

HOSTILE = "x,snapshot=on,file=/etc/shadow,,y=z"


def split_opts(s: str, head: bool | None = None) -> tuple[str | None, dict[str, str]]:
    """QEMU's own reading of ``head,k=v,...`` (",," is a literal comma)."""
    parts: list[str] = []
    cur, i = "", 0
    while i < len(s):
        if s[i] == ",":
            if s[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += s[i]
        i += 1
    parts.append(cur)
    first = parts.pop(0) if (head if head is not None else "=" not in parts[0]) else None
    out: dict[str, str] = {}
    for p in parts:
        k, _, v = p.partition("=")
        assert k not in out, f"option {k!r} given twice in {s!r}"
        out[k] = v
    return first, out


def test_the_encoder_doubles_commas_and_refuses_bad_keys() -> None:
    s = qemu_opts({"id": "a", "path": Path("/tmp/" + HOSTILE), "server": True}, "socket")
    assert split_opts(s) == ("socket", {"id": "a", "path": "/tmp/" + HOSTILE, "server": "on"})
    for bad in ("", "a,b", "a=b"):
        with pytest.raises(ValueError):
            qemu_opts({bad: 1})


def _opts(argv: list[str], opt: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == opt]


def test_machine_sockets_and_capture_keep_hostile_paths_whole(tmp_path: Path) -> None:
    run = RunDir(tmp_path, "r", path=tmp_path / f"runs{HOSTILE}")
    try:
        m = Machine(default_topology(), run, binary="/usr/bin/qemu-system-x86_64",
                    audio_capture=True)
        m.accel = Accel("tcg", "test")
        m.ssh_port = 40022
        m.private = tmp_path / f"priv{HOSTILE}"
        argv = m.argv()
    finally:
        run.close()
    chardevs = [split_opts(c) for c in _opts(argv, "-chardev")]
    assert [h for h, _ in chardevs] == ["socket"] * 4
    assert {o["path"] for _, o in chardevs} == {str(m.private / n) for n in
                                                ("qmp.sock", "console.sock", "sync.sock", "trace.sock")}
    (audio,) = [split_opts(a) for a in _opts(argv, "-audiodev")]
    assert audio == ("wav", {"id": "audio0", "path": str(m.audio_path)})


def test_windows_install_drives_keep_hostile_paths_whole(tmp_path: Path) -> None:
    ovmf = vmconfig.OvmfPaths(code=tmp_path / f"code{HOSTILE}.fd",
                              vars_template=tmp_path / "vars.fd")
    spec = winimage.WindowsImageSpec(iso=tmp_path / f"win{HOSTILE}.iso",
                                     out=tmp_path / f"out{HOSTILE}" / "w.qcow2",
                                     virtio_win=tmp_path / f"virtio{HOSTILE}.iso", ovmf=ovmf)
    paths = winimage.InstallPaths(prov_image=tmp_path / f"prov{HOSTILE}.img",
                                  qmp_socket=tmp_path / f"q{HOSTILE}.sock")
    argv = winimage.install_argv(spec, "/usr/bin/qemu-system-x86_64", paths)
    drives = [split_opts(d)[1] for d in _opts(argv, "-drive")]
    files = {d["file"] for d in drives}
    assert {str(spec.iso), str(spec.virtio_win), str(paths.prov_image), str(ovmf.code)} <= files
    assert all("snapshot" not in d for d in drives)
    (qmp,) = _opts(argv, "-qmp")
    head, opts = split_opts(qmp, head=True)
    assert head == f"unix:{paths.qmp_socket}" and opts == {"server": "on", "wait": "off"}


def test_windows_run_disk_keeps_its_path_whole(tmp_path: Path) -> None:
    disk = tmp_path / f"overlay{HOSTILE}.qcow2"
    drive, device = vmconfig.disk_args(disk, "virtio")[1::2]
    assert split_opts(drive)[1]["file"] == str(disk)
    assert split_opts(device)[0] == "virtio-blk-pci"
