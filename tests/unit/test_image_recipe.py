"""Unit tests for the Linux guest image recipe (images/linux/).

Fast and offline: no package download, no QEMU.  The last group checks a built
image (images/build/linux) when one exists and is skipped otherwise.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
IMAGE_DIR = REPO / "images" / "linux"
BUILT = REPO / "images" / "build" / "linux"
sys.path.insert(0, str(IMAGE_DIR))

from guestimg import BuildError, cpio, elf, keys, kernel, testdrv, userland  # noqa: E402
from guestimg.apt import Apt, parse_depends  # noqa: E402

import recipe  # noqa: E402


def _load_build():
    spec = importlib.util.spec_from_file_location("rebalab_image_build", IMAGE_DIR / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build = _load_build()


# ------------------------------------------------------------------- cpio ---
def _sample_tree() -> cpio.Tree:
    t = cpio.Tree()
    t.add_file("/usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755)
    t.add_file("/etc/shadow", "root:*:1::::::\n", 0o600)
    t.add_symlink("/bin/sh", "busybox")
    t.add_node("/dev/console", "c", 5, 1, 0o600)
    t.mkdir("/root", 0o700)
    return t


def test_cpio_round_trip_parents_first_and_root_owned():
    raw = io.BytesIO()
    _sample_tree().write_newc(raw)
    entries = list(cpio.read_newc(raw.getvalue()))
    names = [n for n, *_ in entries]
    assert names[0] == "."
    for i, name in enumerate(names):  # every parent directory comes before its children
        parent = os.path.dirname(name)
        if parent:
            assert parent in names[:i], name
    by = {n: (mode, data, rdev) for n, mode, data, rdev in entries}
    assert by["usr/bin/tool"][1] == b"#!/bin/sh\necho hi\n"
    assert stat.S_IMODE(by["usr/bin/tool"][0]) == 0o755
    assert stat.S_IMODE(by["etc/shadow"][0]) == 0o600
    assert stat.S_ISLNK(by["bin/sh"][0]) and by["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(by["dev/console"][0]) and by["dev/console"][2] == (5, 1)
    assert stat.S_IMODE(by["root"][0]) == 0o700
    # uid/gid fields are zero: header fields 3 and 4
    blob = raw.getvalue()
    assert blob[6 + 8 * 2:6 + 8 * 4] == b"0" * 16


def test_cpio_is_reproducible(tmp_path):
    a, b = tmp_path / "a.gz", tmp_path / "b.gz"
    _sample_tree().write_gzip(a)
    _sample_tree().write_gzip(b)
    assert a.read_bytes() == b.read_bytes()
    assert list(cpio.read_newc(gzip.decompress(a.read_bytes())))


@pytest.mark.skipif(not shutil.which("cpio"), reason="host cpio not installed")
def test_cpio_readable_by_gnu_cpio(tmp_path):
    raw = io.BytesIO()
    _sample_tree().write_newc(raw)
    out = subprocess.run(["cpio", "-t", "--quiet"], input=raw.getvalue(), capture_output=True, check=True)
    listed = out.stdout.decode().split()
    assert "usr/bin/tool" in listed and "dev/console" in listed


def test_cpio_rejects_conflicting_duplicates():
    t = cpio.Tree()
    t.add_file("/a", b"one")
    t.add_file("/a", b"one")  # identical: fine
    with pytest.raises(BuildError):
        t.add_file("/a", b"two")
    t.add_file("/a", b"two", replace=True)
    with pytest.raises(BuildError):
        t.add_file("/x/../etc", b"")


# ------------------------------------------------------------------- keys ---
RFC8032_SECRET = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")


def test_ed25519_public_key_matches_rfc8032_vector():
    assert keys.public_from_seed(RFC8032_SECRET, pure=True) == RFC8032_PUBLIC
    assert keys.public_from_seed(RFC8032_SECRET) == RFC8032_PUBLIC


def test_openssh_private_key_round_trip_and_paramiko(tmp_path):
    k = keys.Ed25519Key(RFC8032_SECRET, RFC8032_PUBLIC, "rebalab-test")
    text = k.openssh_private()
    assert keys.parse_openssh_private(text) == k
    assert keys.parse_public_line(k.public_line()) == RFC8032_PUBLIC
    paramiko = pytest.importorskip("paramiko")
    p = tmp_path / "id"
    keys.write_private(p, text)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    pk = paramiko.Ed25519Key.from_private_key_file(str(p))
    assert pk.get_base64() == k.public_line().split()[1]


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="ssh-keygen not installed")
def test_openssh_private_key_accepted_by_ssh_keygen(tmp_path):
    k = keys.generate_python("kg")
    p = tmp_path / "id"
    keys.write_private(p, k.openssh_private())
    out = subprocess.run(["ssh-keygen", "-y", "-f", str(p)], capture_output=True, text=True, check=True)
    assert out.stdout.split()[:2] == k.public_line().split()[:2]


def test_openssh_private_key_second_opinion_from_cryptography():
    pytest.importorskip("cryptography")
    k = keys.Ed25519Key(RFC8032_SECRET, RFC8032_PUBLIC, "rebalab-test")
    keys.check_openssh_text(k.openssh_private(), k)
    other = keys.generate_python("other")
    with pytest.raises(ValueError, match="different public key"):
        keys.check_openssh_text(other.openssh_private(), k)
    with pytest.raises(ValueError, match="cannot read"):
        keys.check_openssh_text(k.openssh_private().replace("A", "B", 3), k)


def test_pure_python_keys_without_cryptography(tmp_path, monkeypatch):
    # the fallback when cryptography is not importable: same public key, key files made and reused
    monkeypatch.setitem(sys.modules, "cryptography", None)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.ed25519", None)
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.serialization", None)
    assert keys.crypto_backend() == "pure-python"
    assert keys.public_from_seed(RFC8032_SECRET) == RFC8032_PUBLIC
    a = keys.load_or_create(tmp_path, "host_key", "h", False, keys.generate_python)
    b = keys.load_or_create(tmp_path, "host_key", "h", False, keys.generate_python)
    assert a.created and not b.created and a.key == b.key


@pytest.mark.skipif(not shutil.which("ssh-keygen"), reason="ssh-keygen not installed")
def test_sshkeygen_generator_is_cross_checked():
    made = keys.generate_sshkeygen(["ssh-keygen"], "rebalab-c")
    made.check()
    assert made.comment == "rebalab-c"


def test_sshkeygen_generator_failure_is_a_build_error(tmp_path):
    with pytest.raises(BuildError, match="ssh-keygen failed"):
        keys.generate_sshkeygen(["false"], "c")


def test_keys_are_kept_across_builds_and_replaced_with_force(tmp_path):
    a = keys.load_or_create(tmp_path, "id_ed25519", "c", False, keys.generate_python)
    b = keys.load_or_create(tmp_path, "id_ed25519", "c", False, keys.generate_python)
    assert a.created and not b.created and a.key == b.key
    c = keys.load_or_create(tmp_path, "id_ed25519", "c", True, keys.generate_python)
    assert c.created and c.key != a.key
    assert stat.S_IMODE((tmp_path / "id_ed25519").stat().st_mode) == 0o600
    (tmp_path / "id_ed25519.pub").write_text(keys.generate_python("x").public_line() + "\n")
    with pytest.raises(BuildError):  # halves that do not match are an error, not silently replaced
        keys.load_or_create(tmp_path, "id_ed25519", "c", False, keys.generate_python)


# -------------------------------------------------------------------- ELF ---
def _elf_with_note(name: bytes, ntype: int, desc: bytes) -> bytes:
    """A minimal ELF64 x86-64 file with one PT_NOTE segment."""
    note = struct.pack("<III", len(name) + 1, len(desc), ntype) + name + b"\0"
    note += b"\0" * (-len(note) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:16] = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    struct.pack_into("<HHIQQQIHHHHHH", ehdr, 16, 2, elf.EM_X86_64, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", elf.PT_NOTE, 4, 120, 0, 0, len(note), len(note), 4)
    return bytes(ehdr) + phdr + note


def test_elf_pvh_note():
    info = elf.parse(_elf_with_note(b"Xen", elf.XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", 0x1000850)))
    assert info.machine == elf.EM_X86_64
    assert info.pvh_entry() == 0x1000850
    assert elf.parse(_elf_with_note(b"GNU", 3, b"abcd")).pvh_entry() is None


@pytest.mark.skipif(not Path("/bin/ls").exists() or os.uname().machine != "x86_64", reason="needs an x86-64 host")
def test_elf_needed_of_a_host_binary():
    info = elf.read(Path(os.path.realpath("/bin/ls")))
    assert info.interp and info.interp.endswith("ld-linux-x86-64.so.2")
    assert "libc.so.6" in info.needed


# ------------------------------------------------------------------ kernel ---
def _fake_bzimage(payload: bytes, with_offsets: bool, version: str = "6.1.0-99-amd64 (test) #1") -> bytes:
    setup_sects = 1
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, 0x20F if with_offsets else 0x207)
    kver = 0x300
    struct.pack_into("<H", img, 0x20E, kver - 0x200)
    img[kver:kver + len(version) + 1] = version.encode() + b"\0"
    prefix = b"\0" * 64  # decompressor code before the payload
    if with_offsets:
        struct.pack_into("<II", img, 0x248, len(prefix), len(payload))
    return bytes(img) + prefix + payload + b"\0" * 100


def test_extract_vmlinux_xz_from_boot_header():
    vm = _elf_with_note(b"Xen", 18, struct.pack("<I", 0x1234))
    image = _fake_bzimage(lzma.compress(vm, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), True)
    hdr = kernel.read_header(image)
    assert hdr.release == "6.1.0-99-amd64" and hdr.protocol == "2.15"
    out = kernel.extract_vmlinux(image)
    assert (out.data, out.compression, out.method, out.pvh_entry) == (vm, "xz", "boot-header", 0x1234)


def test_extract_vmlinux_gzip_by_magic_scan():
    vm = _elf_with_note(b"Xen", 18, struct.pack("<I", 0x1234))
    out = kernel.extract_vmlinux(_fake_bzimage(gzip.compress(vm, mtime=0), False))
    assert (out.compression, out.method) == ("gzip", "magic-scan")


def test_extract_vmlinux_failure_is_a_build_error():
    with pytest.raises(BuildError):
        kernel.extract_vmlinux(_fake_bzimage(b"not compressed at all", True))
    with pytest.raises(BuildError):
        kernel.read_header(b"\0" * 1024)


# ---------------------------------------------------------- package logic ---
def test_parse_depends():
    assert parse_depends("libc6 (>= 2.34), zlib1g (>= 1:1.1.4) | libz-ng, foo:any") == (
        ("libc6",), ("zlib1g", "libz-ng"), ("foo",))


@pytest.mark.parametrize("soname,good,bad", [
    ("libc.so.6", "libc6", "libcrypt1"),
    ("libz.so.1", "zlib1g", "libzstd1"),
    ("libasound.so.2", "libasound2", "kmod"),
    ("libm.so.6", "libc6", "kmod"),  # a blind guess must not beat nothing: both are 3, order decides
])
def test_soname_guess_prefers_debian_naming(soname, good, bad):
    assert userland._soname_score(soname, good) <= userland._soname_score(soname, bad)


@pytest.mark.parametrize("soname,good,bad", [
    ("libpam.so.0", "libpam0g", "libpam-modules"),  # both in openssh-server's Depends, -modules first
    ("libkrb5.so.3", "libkrb5-3", "libkrb5support0"),
    ("libz.so.1", "zlib1g", "adduser"),
])
def test_soname_guess_strictly_better(soname, good, bad):
    assert userland._soname_score(soname, good) < userland._soname_score(soname, bad)


def test_header_package_names():
    assert testdrv.header_packages("6.1.0-56-amd64") == [
        "linux-headers-6.1.0-56-amd64", "linux-headers-6.1.0-56-common", "linux-kbuild-6.1"]
    with pytest.raises(BuildError):
        testdrv.header_packages("weird")


def test_testdrv_sources_ignore_build_artefacts(tmp_path):
    assert not testdrv.present(tmp_path)
    (tmp_path / "Kbuild").write_text("obj-m += x.o\n")
    (tmp_path / "x.c").write_text("int x;\n")
    for junk in ("x.o", "x.ko", "x.mod.c", ".x.o.cmd", "modules.order", "Module.symvers"):
        (tmp_path / junk).write_text("junk")
    assert testdrv.present(tmp_path)
    assert sorted(testdrv.source_files(tmp_path)) == ["Kbuild", "x.c"]


@pytest.mark.skipif(not shutil.which("apt-cache"), reason="not a Debian host")
def test_missing_apt_lists_names_the_fix(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    (lists / "partial").mkdir(parents=True)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # as a user: no automatic apt-get update
    apt = Apt(tmp_path / "cache")
    apt.opts += ["-o", f"Dir::State::Lists={lists}"]
    with pytest.raises(BuildError, match="apt-get update"):
        apt.depends_of("linux-image-amd64")


# ------------------------------------------------------- recipe and init ---
def test_recipe_contract_values():
    for opt in ("console=ttyS0", "panic=-1", "printk.devkmsg=on"):
        assert opt in recipe.CMDLINE
    assert recipe.READY_MARKER and recipe.READY_MARKER != recipe.FAILED_MARKER
    for m in ("virtio_pci", "virtio_net", "e1000", "snd_hda_intel", "snd_hda_codec_generic",
              "snd_intel8x0", "snd_ens1370"):
        assert m in recipe.MODULES
    lines = (IMAGE_DIR / "host-packages.txt").read_text().split()
    assert {"apt", "dpkg", "kmod"} <= set(lines)
    assert "busybox-static" not in lines and "openssh-server" not in lines  # guest binaries come from downloads
    assert ("openssh-server", "/usr/sbin/sshd") in recipe.PROGRAMS
    assert not any(pkg.startswith("dropbear") for pkg, _ in recipe.PROGRAMS + recipe.DATA)


def _sshd_config() -> dict[str, list[str]]:
    conf: dict[str, list[str]] = {}
    for ln in (IMAGE_DIR / "rootfs/etc/ssh/sshd_config").read_text().splitlines():
        if ln.strip() and not ln.lstrip().startswith("#"):
            key, _, value = ln.strip().partition(" ")
            conf.setdefault(key.lower(), []).append(value.strip())
    return conf


def test_sshd_config_fits_the_image():
    conf = _sshd_config()
    assert conf["hostkey"] == [build.HOST_KEY_GUEST_PATH]  # the file the builder writes
    assert conf["usepam"] == ["no"] and conf["usedns"] == ["no"]  # no PAM stack, no resolver
    assert conf["passwordauthentication"] == ["no"] and conf["kbdinteractiveauthentication"] == ["no"]
    assert conf["permitrootlogin"] == ["prohibit-password"]
    sftp = conf["subsystem"][0].split()
    assert sftp[0] == "sftp" and ("openssh-sftp-server", sftp[1]) in recipe.PROGRAMS
    assert int(conf["maxsessions"][0]) >= 32 and int(conf["maxstartups"][0].split(":")[0]) >= 32
    # the privilege-separation user, and init making its directory on the fresh /run
    users = [ln.split(":")[0] for ln in (IMAGE_DIR / "rootfs/etc/passwd").read_text().splitlines()]
    assert "sshd" in users
    init = (IMAGE_DIR / "rootfs/init").read_text()
    assert "mkdir -m 0755 /run/sshd" in init
    assert "/usr/sbin/sshd -D -r -E /run/sshd.log" in init  # the log lab/guest/ collects


def _shell() -> list[str] | None:
    for cand in (["busybox", "sh"], ["dash"], ["sh"]):
        if shutil.which(cand[0]):
            return cand
    return None


@pytest.mark.skipif(_shell() is None, reason="no POSIX shell")
def test_init_script_syntax_and_image_conf():
    init = IMAGE_DIR / "rootfs" / "init"
    assert os.access(init, os.X_OK)
    subprocess.run([*_shell(), "-n", str(init)], check=True)
    conf = build._image_conf("6.1.0-56-amd64", "abc", True)
    out = subprocess.run([*_shell(), "-c", conf + 'echo "$REBALAB_MARKER $REBALAB_IP/$REBALAB_PREFIX $REBALAB_SSH_PORT"'],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == f"{recipe.READY_MARKER} {recipe.GUEST_IP}/{recipe.GUEST_PREFIX} {recipe.SSH_PORT}"


def test_mdev_rule_loads_drivers_by_modalias():
    rules = [ln for ln in (IMAGE_DIR / "rootfs/etc/mdev.conf").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert any(ln.startswith("$MODALIAS=") and "modprobe" in ln for ln in rules)


def test_input_hash_follows_inputs():
    digest = build.recipe_files()
    assert "build.py" in digest and "rootfs/init" in digest and "README.md" not in digest
    h = build.input_hash(digest, None, {"a": "1"})
    assert h == build.input_hash(dict(digest), None, {"a": "1"})
    assert h != build.input_hash(digest, None, {"a": "2"})
    assert h != build.input_hash(digest, {"sources": {"x.c": "0"}}, {"a": "1"})


# --------------------------------------------------------- a built image ---
built = pytest.mark.skipif(not (BUILT / "manifest.json").exists(), reason="no built image (run images/linux/build.py)")


@built
def test_built_manifest_contract():
    m = json.loads((BUILT / "manifest.json").read_text())
    for field in ("kernel_release", "packages", "files", "boot", "cmdline", "ready_marker", "ssh",
                  "guest_ip", "input_hash", "built_at"):
        assert field in m, field
    assert m["boot"]["fallback"] == "bzImage" and m["boot"]["preferred"] in ("vmlinux", "bzImage")
    assert m["ssh"] == {**m["ssh"], "user": "root", "key": "id_ed25519", "host_key": "host_key.pub", "port": 22}
    for name, digest in m["files"].items():
        assert build.sha256_file(BUILT / name) == digest, name
    for name in ("id_ed25519", "host_key"):
        assert stat.S_IMODE((BUILT / name).stat().st_mode) & 0o077 == 0, name
    assert build.outputs_intact(BUILT, m) is None


@built
def test_built_keys_match_initramfs():
    img = {n: (mode, data) for n, mode, data, _ in
           cpio.read_newc(gzip.decompress((BUILT / "initramfs.cpio.gz").read_bytes()))}
    client = keys.parse_openssh_private((BUILT / "id_ed25519").read_text())
    assert img["root/.ssh/authorized_keys"][1].decode().split()[:2] == client.public_line().split()[:2]
    host = keys.parse_openssh_private(img[build.HOST_KEY_GUEST_PATH.lstrip("/")][1].decode())
    assert keys.parse_public_line((BUILT / "host_key.pub").read_text()) == host.pub
    assert stat.S_IMODE(img[build.HOST_KEY_GUEST_PATH.lstrip("/")][0]) == 0o600
    for path in ("init", "bin/busybox", "usr/sbin/sshd", "etc/ssh/sshd_config", "usr/lib/openssh/sftp-server",
                 "usr/bin/aplay", "etc/mdev.conf", "dev/console"):
        assert path in img, path
