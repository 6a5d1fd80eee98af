"""The guest test driver (images/linux/testdrv/: rebalab_testdrv for QEMU's edu device).

Offline checks of the sources (the names the lab's kprobe tracer and scenarios rely on),
then checks of the built image (images/build/linux) when one exists: the module is in
the initramfs, built for the image's kernel, carries its parameters and the functions the
tracer probes, and the image never loads it by alias.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "images" / "linux"
SRC_DIR = IMAGE_DIR / "testdrv"
SOURCE = SRC_DIR / "rebalab_testdrv.c"
BLACKLIST = IMAGE_DIR / "rootfs" / "etc" / "modprobe.d" / "rebalab-testdrv.conf"
BUILT = REPO / "images" / "build" / "linux"
sys.path.insert(0, str(IMAGE_DIR))

from guestimg import cpio, testdrv  # noqa: E402

BUG_MODES = ("none", "no-drain", "slow-remove", "stale-bar")
TRACED = ("rebalab_testdrv_probe", "rebalab_testdrv_remove")  # lab/guest/linux/kprobes.py DRIVER_FUNCS


def _src() -> str:
    return SOURCE.read_text()


# ------------------------------------------------------------------ sources ---
def test_builder_sees_the_driver():
    assert testdrv.present(SRC_DIR)
    files = testdrv.source_files(SRC_DIR)
    assert {"rebalab_testdrv.c", "Kbuild", "Makefile"} <= set(files)
    assert re.search(r"(?m)^obj-m\s*:?=\s*rebalab_testdrv\.o\s*$", (SRC_DIR / "Kbuild").read_text())


@pytest.mark.parametrize("func", TRACED)
def test_traced_functions_are_named_and_out_of_line(func):
    src = _src()
    # defined with noinline (kprobes look them up by name: no inlining, no renaming)
    assert re.search(rf"\bnoinline\b[^;{{]*\b{func}\s*\(\s*struct pci_dev \*", src), func
    # and are the driver's callbacks, so the kprobe's first argument (%di) is the pci_dev
    assert re.search(rf"\.(probe|remove)\s*=\s*{func}\s*,", src), func


def test_four_bug_modes_and_parameters():
    src = _src()
    for mode in BUG_MODES:
        assert f'"{mode}"' in src, mode
    assert re.search(r"module_param_cb\(\s*bug\s*,", src)
    assert re.search(r"module_param\(\s*slow_ms\s*,\s*int\s*,", src)
    assert re.search(r"static int slow_ms = 200;", src)
    assert re.search(r"static int bug_mode = BUG_NONE;", src)


def test_edu_registers_match_qemu():
    src = _src()
    expect = {"EDU_REG_IDENT": 0x00, "EDU_REG_LIVENESS": 0x04, "EDU_REG_STATUS": 0x20,
              "EDU_REG_IRQ_STATUS": 0x24, "EDU_REG_IRQ_RAISE": 0x60, "EDU_REG_IRQ_ACK": 0x64,
              "EDU_REG_DMA_SRC": 0x80, "EDU_REG_DMA_DST": 0x88, "EDU_REG_DMA_CNT": 0x90,
              "EDU_REG_DMA_CMD": 0x98, "EDU_IDENT": 0x010000ED, "EDU_DMA_BUF": 0x40000,
              "EDU_IRQ_DMA": 0x100, "EDU_DMA_MASK_BITS": 28}
    for name, value in expect.items():
        m = re.search(rf"(?m)^#define\s+{name}\s+(0x[0-9a-fA-F]+|\d+)\b", src)
        assert m and int(m.group(1), 0) == value, name
    assert "PCI_DEVICE(EDU_VENDOR, EDU_DEVICE)" in src and "0x11e8" in src


def test_teardown_uses_explicit_iomap_not_devres():
    """devm/pcim mappings go away after remove() returns: the no-drain bug needs an explicit unmap."""
    src = _src()
    assert "pcim_" not in src and "devm_" not in src
    assert "pci_iounmap(" in src and "free_irq(" in src


def test_blacklist_stops_alias_loading_only():
    lines = [ln.split() for ln in BLACKLIST.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert ["blacklist", "rebalab_testdrv"] in lines
    assert not any(ln[0] in ("install", "alias") for ln in lines)  # explicit modprobe keeps working


# -------------------------------------------------------------- built image ---
built = pytest.mark.skipif(not (BUILT / "manifest.json").exists(), reason="no built image (run images/linux/build.py)")


def _manifest() -> dict:
    return json.loads((BUILT / "manifest.json").read_text())


def _initramfs() -> dict[str, bytes]:
    return {n.lstrip("/"): data for n, _, data, _ in
            cpio.read_newc(gzip.decompress((BUILT / "initramfs.cpio.gz").read_bytes()))}


def _modinfo_fields(ko: bytes) -> list[tuple[str, str]]:
    """key=value strings of the .modinfo section (what modinfo prints)."""
    off, size, _, _ = _elf_sections(ko)[".modinfo"]
    return [tuple(s.decode().split("=", 1)) for s in ko[off:off + size].split(b"\0") if b"=" in s]


def _elf_section_list(ko: bytes) -> list[tuple[str, int, int, int, int]]:
    """(name, offset, size, link, type) of every section of an ELF64 little-endian object, by index."""
    assert ko[:4] == b"\x7fELF" and ko[4] == 2 and ko[5] == 1
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", ko, shoff + i * shentsize) for i in range(shnum)]
    names_off = hdrs[shstrndx][4]
    out = []
    for h in hdrs:
        start = names_off + h[0]
        out.append((ko[start:ko.index(b"\0", start)].decode(), h[4], h[5], h[6], h[1]))
    return out


def _elf_sections(ko: bytes) -> dict[str, tuple[int, int, int, int]]:
    return {name: rest for name, *rest in _elf_section_list(ko)}


def _function_symbols(ko: bytes) -> set[str]:
    secs = _elf_section_list(ko)
    _, off, size, link, _ = next(s for s in secs if s[4] == 2)  # SHT_SYMTAB
    str_off = secs[link][1]
    names = set()
    for i in range(0, size, 24):
        st_name, st_info = struct.unpack_from("<IB", ko, off + i)
        if st_info & 0xF == 2:  # STT_FUNC
            start = str_off + st_name
            names.add(ko[start:ko.index(b"\0", start)].decode())
    return names


@built
def test_built_image_carries_the_module():
    m = _manifest()
    if not m.get("testdrv"):
        pytest.skip("image built without testdrv")
    assert "extra/rebalab_testdrv.ko" in m["modules"]["extra"]
    img = _initramfs()
    rel = m["kernel_release"]
    ko = img[f"lib/modules/{rel}/extra/rebalab_testdrv.ko"]
    info = _modinfo_fields(ko)
    keys = {k for k, _ in info}
    assert {"license", "vermagic", "alias", "parm"} <= keys
    assert dict(info)["vermagic"].split()[0] == rel
    parms = [v for k, v in info if k == "parm"]
    assert any(p.startswith("bug:") for p in parms), parms
    assert any(p.startswith("slow_ms:") for p in parms), parms
    assert any(v.startswith("pci:v00001234d000011E8") for k, v in info if k == "alias")
    assert set(TRACED) <= _function_symbols(ko)
    # the alias is in modules.alias (so the blacklist is what keeps autoload off) ...
    assert "rebalab_testdrv" in img[f"lib/modules/{rel}/modules.alias"].decode()
    # ... and the blacklist is in the image
    assert b"blacklist rebalab_testdrv" in img["etc/modprobe.d/rebalab-testdrv.conf"]


@built
@pytest.mark.skipif(not shutil.which("modinfo"), reason="modinfo (kmod) not installed")
def test_built_module_modinfo_lists_bug_parameter(tmp_path):
    m = _manifest()
    if not m.get("testdrv"):
        pytest.skip("image built without testdrv")
    ko = tmp_path / "rebalab_testdrv.ko"
    ko.write_bytes(_initramfs()[f"lib/modules/{m['kernel_release']}/extra/rebalab_testdrv.ko"])
    out = subprocess.run(["modinfo", str(ko)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"(?m)^parm:\s+bug:", out), out
    assert re.search(r"(?m)^parm:\s+slow_ms:", out), out
