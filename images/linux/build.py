#!/usr/bin/env python3
"""Build the rebalab Linux guest image from Debian packages, without installing them.

    python3 images/linux/build.py [--out images/build/linux] [--force] [--python-keys]

Outputs (in --out): bzImage, vmlinux, initramfs.cpio.gz, id_ed25519(.pub), host_key(.pub),
initramfs.txt (content listing) and manifest.json.  The contract the lab relies on is
described in images/linux/README.md.  Nothing is installed on the host: packages go
through ``apt-get download`` into a cache and are unpacked with ``dpkg-deb -x``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import recipe  # noqa: E402
from guestimg import BUILDER_VERSION, BuildError, cpio, elf, kernel, keys, testdrv, userland  # noqa: E402
from guestimg.apt import Apt, sha256_file  # noqa: E402

REPO = HERE.parent.parent
DEFAULT_OUT = REPO / "images" / "build" / "linux"
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
HOST_KEY_GUEST_PATH = "/etc/ssh/ssh_host_ed25519_key"  # sshd_config: HostKey
#: Outputs whose sha256 the manifest records (private keys are listed, never hashed).
PUBLIC_OUTPUTS = ("bzImage", "vmlinux", "initramfs.cpio.gz", "initramfs.txt", "id_ed25519.pub", "host_key.pub")
PRIVATE_OUTPUTS = ("id_ed25519", "host_key")


# ------------------------------------------------------------------ progress ---
class Progress:
    """One line per step: elapsed total, step name, what it did, how long it took."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, step: str, msg: str) -> None:
        print(f"[{self.elapsed():6.2f}s] {step:<10} {msg}", flush=True)

    def note(self, msg: str) -> None:
        print(f"[{self.elapsed():6.2f}s] {'':<10} {msg}", flush=True)

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, str]]:
        info = {"msg": ""}
        t = time.monotonic()
        yield info
        self.say(name, f"{info['msg']} ({time.monotonic() - t:.2f}s)")


# -------------------------------------------------------------- input hash ---
def recipe_files() -> dict[str, str]:
    """{path relative to images/linux: sha256} of everything that shapes the image."""
    out = {}
    for p in sorted(HERE.rglob("*")):
        rel = p.relative_to(HERE)
        if (not p.is_file() or "__pycache__" in rel.parts or p.suffix in (".pyc", ".md")
                or rel.parts[0] == recipe.TESTDRV_DIR):
            continue
        out[str(rel)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def testdrv_inputs(src: Path) -> dict[str, Any] | None:
    if not testdrv.present(src):
        return None
    cc = subprocess.run(["gcc-12", "--version"], capture_output=True, text=True)
    return {"sources": testdrv.source_files(src),
            "compiler": cc.stdout.splitlines()[0] if cc.returncode == 0 and cc.stdout else "gcc-12 missing"}


def input_hash(recipe_digest: dict[str, str], drv: dict[str, Any] | None, versions: dict[str, str]) -> str:
    doc = {"builder_version": BUILDER_VERSION, "recipe": recipe_digest, "testdrv": drv,
           "packages": dict(sorted(versions.items()))}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def top_level_packages(kernel_pkg: str, release: str, with_testdrv: bool) -> list[str]:
    names = [kernel_pkg, recipe.BUSYBOX_PACKAGE]
    names += [p for p, _ in recipe.PROGRAMS] + [p for p, _ in recipe.DATA] + [recipe.KEYGEN[0]]
    if with_testdrv:
        names += testdrv.header_packages(release)
    return list(dict.fromkeys(names))


def outputs_intact(out: Path, manifest: dict[str, Any]) -> str | None:
    """None if every output named in the manifest is there unchanged; else the reason it is not."""
    for name, digest in manifest.get("files", {}).items():
        p = out / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256_file(p) != digest:
            return f"{name} changed since the build"
    for name in PRIVATE_OUTPUTS:
        if not (out / name).is_file():
            return f"{name} is missing"
    expected = set(PUBLIC_OUTPUTS)
    if not manifest.get("kernel", {}).get("vmlinux", {}).get("extracted"):
        expected.discard("vmlinux")
    if set(manifest.get("files", {})) != expected:
        return "the manifest's file list is incomplete"
    return None


# ------------------------------------------------------------------- build ---
class Builder:
    def __init__(self, out: Path, cache: Path, force: bool, python_keys: bool, testdrv_dir: Path) -> None:
        self.out, self.cache, self.force, self.python_keys = out, cache, force, python_keys
        self.testdrv_dir = testdrv_dir
        self.p = Progress()
        self.apt = Apt(cache, log=lambda m: self.p.note(m))
        self.pool = userland.PackagePool(self.apt)

    # The whole build; returns the process exit status.
    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        os.chmod(self.out, 0o700)  # private keys and an initramfs holding the guest's host key
        with open(self.out / ".build.lock", "w") as lockf:
            try:
                fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.p.note(f"waiting for another build of {self.out} to finish")
                fcntl.flock(lockf, fcntl.LOCK_EX)
            return self._run_locked()

    def _run_locked(self) -> int:
        old = self._old_manifest()
        with self.p.step("resolve") as s:
            kernel_pkg = self.apt.depends_of(recipe.KERNEL_META_PACKAGE)
            if not kernel_pkg.startswith("linux-image-"):
                raise BuildError(f"{recipe.KERNEL_META_PACKAGE} depends on {kernel_pkg}, not a linux-image package")
            release = kernel_pkg[len("linux-image-"):]
            drv = testdrv_inputs(self.testdrv_dir)
            top = top_level_packages(kernel_pkg, release, drv is not None)
            versions = self.apt.candidates(top)
            # Libraries found by the last build: their versions are inputs too (gone ones just drop out).
            extras = [n for n in old.get("packages", {}) if n not in versions]
            if extras:
                versions.update(self.apt.candidates(extras, strict=False))
            if drv is not None:  # headers and kbuild must be exactly the kernel's version
                for n in testdrv.header_packages(release)[1:]:
                    versions[n] = versions[kernel_pkg]
            self.pool.versions.update(versions)
            digest = recipe_files()
            ihash = input_hash(digest, drv, versions)
            s["msg"] = f"kernel {release} ({versions[kernel_pkg]}), {len(versions)} packages, input {ihash[:12]}"
        if not self.force and old.get("input_hash") == ihash:
            problem = outputs_intact(self.out, old)
            if problem is None:
                self.p.say("done", f"up to date ({self.out}); total {self.p.elapsed():.2f}s")
                return 0
            self.p.note(f"rebuilding: {problem}")
        elif old and not self.force:
            self.p.note("rebuilding: inputs changed")

        # An interrupted build must never look up to date: the manifest comes back last.
        (self.out / MANIFEST).unlink(missing_ok=True)
        with tempfile.TemporaryDirectory(prefix="rebalab-image-", dir=self.cache) as tmpname:
            manifest = self._build(Path(tmpname), kernel_pkg, release, versions, digest, drv, top)
        self._write_json(self.out / MANIFEST, manifest)
        pruned = self.apt.prune_superseded([u.info for u in self.pool.pkgs.values()])
        if pruned:
            self.p.note(f"cache: removed {pruned} superseded package files/trees")
        size = (self.out / "initramfs.cpio.gz").stat().st_size
        self.p.say("done", f"{self.out} (initramfs {size / 2**20:.1f} MiB, input {manifest['input_hash'][:12]}); "
                           f"total {self.p.elapsed():.2f}s")
        return 0

    def _old_manifest(self) -> dict[str, Any]:
        try:
            m = json.loads((self.out / MANIFEST).read_text())
            return m if m.get("schema") == MANIFEST_SCHEMA else {}
        except (OSError, ValueError):
            return {}

    @staticmethod
    def _write_json(path: Path, doc: dict[str, Any]) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)

    def _build(self, tmp: Path, kernel_pkg: str, release: str, versions: dict[str, str],
               digest: dict[str, str], drv: dict[str, Any] | None, top: list[str]) -> dict[str, Any]:
        p, pool, out = self.p, self.pool, self.out
        tree = cpio.Tree()

        with p.step("fetch") as s:
            pool.ensure(top, pins={n: versions[n] for n in top})
            s["msg"] = (f"{len(top)} packages ({pool.downloaded} downloaded, "
                        f"{len(top) - pool.downloaded} cached) into {self.apt.debs}")

        # -- kernel ------------------------------------------------------------
        with p.step("kernel") as s:
            kpkg = pool.use(kernel_pkg, "kernel")
            if kernel.release_of(kpkg.root) != release:
                raise BuildError(f"{kernel_pkg} ships modules for {kernel.release_of(kpkg.root)}, expected {release}")
            image = (kpkg.root / "boot" / f"vmlinuz-{release}").read_bytes()
            hdr = kernel.read_header(image)
            if hdr.release != release:
                raise BuildError(f"bzImage says kernel {hdr.release!r}, package says {release!r}")
            _atomic_write(out / "bzImage", image)
            vm_info: dict[str, Any] = {"extracted": False}
            try:
                vm = kernel.extract_vmlinux(image)
                if vm.pvh_entry is None:
                    raise BuildError("the decompressed vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)")
                _atomic_write(out / "vmlinux", vm.data)
                vm_info = {"extracted": True, "compression": vm.compression, "method": vm.method,
                           "pvh_entry": f"{vm.pvh_entry:#x}", "size": len(vm.data)}
                s["msg"] = (f"bzImage {len(image) / 2**20:.1f} MiB, vmlinux {len(vm.data) / 2**20:.1f} MiB "
                            f"({vm.compression}, PVH entry {vm.pvh_entry:#x})")
            except BuildError as exc:
                (out / "vmlinux").unlink(missing_ok=True)
                vm_info = {"extracted": False, "error": str(exc)}
                s["msg"] = f"bzImage {len(image) / 2**20:.1f} MiB; NO vmlinux: {exc} (booting the bzImage instead)"

        # -- out-of-tree modules --------------------------------------------------
        extra: dict[str, Path] = {}
        drv_info: dict[str, Any] | None = None
        if drv is not None:
            with p.step("testdrv") as s:
                hdr_pkgs = testdrv.header_packages(release)
                for n in hdr_pkgs:
                    pool.use(n, "testdrv-headers")
                kdir = testdrv.prepare_headers([pool[n].deb for n in hdr_pkgs], release,
                                               self.cache / "headers" / f"{release}_{versions[kernel_pkg]}")
                kos = testdrv.build(self.testdrv_dir, kdir, release, tmp, p.note)
                extra = {f"extra/{Path(rel).name}": ko for rel, ko in kos.items()}
                drv_info = {"source": str(self.testdrv_dir), "modules": sorted(extra), "headers": kdir.name,
                            "headers_dir": str(kdir), "compiler": drv["compiler"],
                            "sources": drv["sources"]}
                s["msg"] = f"built {', '.join(sorted(Path(k).name for k in extra))} against {kdir.name}"

        # -- kernel modules -------------------------------------------------------
        with p.step("modules") as s:
            kernel.prepare_full_tree(kpkg.root, release)
            files, builtin = kernel.resolve_modules(kpkg.root, release, recipe.MODULES)
            stage = tmp / "modules"
            staged = kernel.stage_modules(kpkg.root, release, files, extra, stage)
            for rel in staged:
                tree.add_file("/" + rel, stage / rel, 0o644, origin="testdrv" if "/extra/" in rel else kernel_pkg)
            size = sum((stage / r).stat().st_size for r in staged if r.endswith(".ko"))
            s["msg"] = (f"{len(files)} modules for {len(recipe.MODULES)} requested"
                        f"{f' + {len(extra)} testdrv' if extra else ''} ({size / 2**20:.1f} MiB)"
                        f"{f'; built in: {builtin}' if builtin else ''}")

        # -- user space --------------------------------------------------------------
        with p.step("userland") as s:
            bb = pool.use(recipe.BUSYBOX_PACKAGE, "busybox")
            napplets, listed = userland.install_busybox(tree, bb)
            libs = userland.install_programs(tree, pool, list(recipe.PROGRAMS), p.note)
            for pkg, path in recipe.DATA:
                userland.copy_path(tree, pool.use(pkg, "data"), path, "data")
            s["msg"] = (f"busybox {bb.info.version} ({napplets} applets), {len(recipe.PROGRAMS)} programs, "
                        f"{len(libs)} libraries from {len({v for v in libs.values()})} packages")

        # -- keys ------------------------------------------------------------------------
        with p.step("keys") as s:
            make, backend = self._key_maker(tree, pool)
            client = keys.load_or_create(out, "id_ed25519", "rebalab-client", self.force, make)
            host = keys.load_or_create(out, "host_key", "rebalab-guest", self.force, make)
            state = "new" if (client.created or host.created) else "kept"
            s["msg"] = f"{state}: client {client.key.fingerprint()}, host {host.key.fingerprint()} ({backend if state == 'new' else 'from earlier build'})"

        # -- overlay, generated files, archive ------------------------------------
        with p.step("initramfs") as s:
            overlay = HERE / "rootfs"
            _add_overlay(tree, overlay)
            ihash = input_hash(digest, drv, {n: pool[n].info.version for n in
                                             sorted(set(top) | set(pool.used()))})
            tree.add_file("/etc/rebalab/image.conf", _image_conf(release, ihash, listed), 0o644)
            # sshd refuses a host key that group or others can read
            tree.add_file(HOST_KEY_GUEST_PATH, host.key.openssh_private(), 0o600)
            tree.mkdir("/root", 0o700, replace=True)
            tree.mkdir("/root/.ssh", 0o700)
            tree.add_file("/root/.ssh/authorized_keys", client.key.public_line() + "\n", 0o600)
            for d in ("/proc", "/sys", "/dev", "/tmp", "/run", "/var", "/var/log", "/mnt"):
                tree.mkdir(d)
            tree.add_symlink("/var/run", "/run")
            tree.add_node("/dev/console", "c", 5, 1, 0o600)
            tree.add_node("/dev/null", "c", 1, 3, 0o666)
            _check_tree(tree)
            tree.write_gzip(out / "initramfs.cpio.gz", mode=0o600)  # it holds the guest's private host key
            listing = "\n".join(tree.listing()) + "\n"
            _atomic_write(out / "initramfs.txt", listing.encode())
            csize = (out / "initramfs.cpio.gz").stat().st_size
            s["msg"] = (f"{len(tree.entries)} entries, {tree.total_size() / 2**20:.1f} MiB -> "
                        f"{csize / 2**20:.1f} MiB gzip")

        # -- manifest ----------------------------------------------------------------
        used = pool.used()
        files = {n: sha256_file(out / n) for n in PUBLIC_OUTPUTS if (out / n).exists()}
        if not vm_info["extracted"]:
            files.pop("vmlinux", None)
        return {
            "schema": MANIFEST_SCHEMA,
            "builder_version": BUILDER_VERSION,
            "input_hash": ihash,
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(self.p.elapsed(), 2),
            "kernel_release": release,
            "kernel": {"package": kernel_pkg, "version": pool[kernel_pkg].info.version,
                       "version_string": hdr.version_string, "boot_protocol": hdr.protocol,
                       "bzImage": "bzImage", "vmlinux": vm_info},
            "boot": {"preferred": "vmlinux" if vm_info["extracted"] else "bzImage", "fallback": "bzImage"},
            "initrd": "initramfs.cpio.gz",
            "cmdline": recipe.CMDLINE,
            "ready_marker": recipe.READY_MARKER,
            "failed_marker": recipe.FAILED_MARKER,
            "guest_ip": recipe.GUEST_IP,
            "guest_prefix": recipe.GUEST_PREFIX,
            "gateway": recipe.GATEWAY,
            "ssh": {"user": recipe.SSH_USER, "key": "id_ed25519", "host_key": "host_key.pub",
                    "port": recipe.SSH_PORT, "host_key_fingerprint": host.key.fingerprint(),
                    "client_key_fingerprint": client.key.fingerprint(), "auth": "publickey only",
                    "server": f"sshd (openssh-server {pool['openssh-server'].info.version})",
                    "log": "/run/sshd.log"},
            "serial": {"console": "ttyS0", "sync": "ttyS1", "sync_prefix": "rebalab-sync ",
                       # each sync token is also written to trace_marker (rootfs/init)
                       "sync_trace_marker": True},
            "kernel_options": {
                "rebalab.modules=a,b": "extra modules to load at boot",
                "rebalab.loglevel=N": f"console log level (default {recipe.CONSOLE_LOGLEVEL}, at least 6)",
                "rebalab.ip=A.B.C.D/N": f"guest address (default {recipe.GUEST_IP}/{recipe.GUEST_PREFIX})",
                "rebalab.gw=A.B.C.D": f"default route (default {recipe.GATEWAY})",
                "rebalab.autoload=0": "do not load drivers for hot-plugged devices",
                "rebalab.sync=0": "no clock-sync responder on ttyS1",
                "rebalab.shell=1": "root shell on the console (debugging)",
            },
            "packages": {n: u.info.version for n, u in used.items()},
            "debs": {n: {"version": u.info.version, "file": u.deb.name, "sha256": u.info.sha256,
                         "roles": sorted(u.roles)} for n, u in used.items()},
            "files": files,
            "private_files": list(PRIVATE_OUTPUTS),
            "initramfs": {"entries": len(tree.entries), "uncompressed_bytes": tree.total_size(),
                          "compressed_bytes": (out / "initramfs.cpio.gz").stat().st_size,
                          "busybox_applets": napplets, "listing": "initramfs.txt"},
            "modules": {"requested": list(recipe.MODULES), "builtin": builtin,
                        "included": [Path(f).stem for f in files_of(tree, release)], "extra": sorted(extra)},
            "libraries": dict(sorted(libs.items())),
            "programs": [path for _, path in recipe.PROGRAMS],
            "testdrv": drv_info,
            "keys": {"client": "id_ed25519", "host": "host_key", "guest_host_key_path": HOST_KEY_GUEST_PATH,
                     "generated_by": backend if (client.created or host.created) else "kept from an earlier build"},
            "host": {"python": platform.python_version(), "system": platform.platform(),
                     "key_crypto": keys.crypto_backend()},
        }

    def _key_maker(self, tree: cpio.Tree, pool: userland.PackagePool):
        """How to make a key: the downloaded ssh-keygen of the guest's OpenSSH (run via the
        guest's own loader and libraries, so the keys come from the same OpenSSH that
        reads them), or Python with --python-keys or when that cannot run on this host.
        Either way the result is checked against the Python key code before use."""
        if not self.python_keys:
            pkg, path = recipe.KEYGEN
            try:
                pool.use(pkg, "keygen")
                cmd = _guest_command(tree, pool, pkg, path)
                keys.generate_sshkeygen(cmd, "rebalab-probe")  # a throwaway key: does it run here?
                return (lambda comment: keys.generate_sshkeygen(cmd, comment)), "ssh-keygen (guest binary)"
            except (OSError, BuildError, subprocess.SubprocessError) as exc:
                self.p.note(f"keys: cannot run the guest's ssh-keygen here ({exc}); using Python")
        return keys.generate_python, f"python ({keys.crypto_backend()})"


# ------------------------------------------------------------------ helpers ---
def files_of(tree: cpio.Tree, release: str) -> list[str]:
    prefix = f"/lib/modules/{release}/"
    return sorted(e.path for e in tree.entries.values() if e.path.startswith(prefix) and e.path.endswith(".ko"))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _add_overlay(tree: cpio.Tree, root: Path) -> None:
    """images/linux/rootfs/ verbatim, with normalised modes (git keeps only the x bit)."""
    special = {"/etc/shadow": 0o600, "/root": 0o700}
    for p in sorted(root.rglob("*")):
        guest = "/" + str(p.relative_to(root))
        if p.is_dir():
            tree.mkdir(guest, special.get(guest, 0o755), origin="overlay")
        elif p.is_symlink():
            tree.add_symlink(guest, os.readlink(p), origin="overlay", replace=True)
        else:
            mode = special.get(guest, 0o755 if os.access(p, os.X_OK) else 0o644)
            tree.add_file(guest, p, mode, origin="overlay", replace=True)


def _image_conf(release: str, ihash: str, busybox_listed: bool) -> str:
    values = {
        "REBALAB_MARKER": recipe.READY_MARKER,
        "REBALAB_FAILED": recipe.FAILED_MARKER,
        "REBALAB_IP": recipe.GUEST_IP,
        "REBALAB_PREFIX": str(recipe.GUEST_PREFIX),
        "REBALAB_GW": recipe.GATEWAY,
        "REBALAB_SSH_PORT": str(recipe.SSH_PORT),
        "REBALAB_RELEASE": release,
        "REBALAB_LOGLEVEL": str(recipe.CONSOLE_LOGLEVEL),
        "REBALAB_INPUT_HASH": ihash,
        "REBALAB_BUSYBOX_INSTALL": "0" if busybox_listed else "1",
    }
    return "# Generated by images/linux/build.py; read by /init.\n" + "".join(
        f"{k}='{v}'\n" for k, v in values.items())


def _check_tree(tree: cpio.Tree) -> None:
    """The things without which the guest cannot boot or be reached."""
    need = ["/init", "/bin/sh", "/bin/busybox", "/usr/sbin/sshd", "/etc/ssh/sshd_config", HOST_KEY_GUEST_PATH,
            "/root/.ssh/authorized_keys", "/etc/passwd", "/etc/mdev.conf", "/lib64/ld-linux-x86-64.so.2"]
    missing = [n for n in need if n not in tree]
    if missing:
        raise BuildError(f"initramfs would lack {missing}")
    if not tree.get("/init").mode & 0o100:  # type: ignore[union-attr]
        raise BuildError("/init is not executable")
    # sshd exits at start ("Privilege separation user sshd does not exist") without it
    users = [ln.split(":", 1)[0] for ln in tree.get("/etc/passwd").content().decode().splitlines()]  # type: ignore[union-attr]
    if "sshd" not in users:
        raise BuildError("images/linux/rootfs/etc/passwd has no 'sshd' user (sshd's privilege separation needs it)")
    if tree.get(HOST_KEY_GUEST_PATH).mode & 0o077:  # type: ignore[union-attr]
        raise BuildError(f"{HOST_KEY_GUEST_PATH} is readable by others: sshd would refuse it")


def _guest_command(tree: cpio.Tree, pool: userland.PackagePool, pkg: str, path: str) -> list[str]:
    """Command line running a guest program on this host through the guest's loader and libraries."""
    binary = pool[pkg].root / path.lstrip("/")
    info = elf.read(binary)
    if info.interp is None:
        return [str(binary)]
    libdir = Path(tempfile.mkdtemp(prefix="rebalab-libs-", dir=pool.apt.cache))
    loader = None
    for e in tree.entries.values():
        if e.path.startswith(("/lib/x86_64-linux-gnu/", "/usr/lib/x86_64-linux-gnu/")) and "/" not in e.path.split("x86_64-linux-gnu/", 1)[1]:
            name = libdir / Path(e.path).name
            if e.source is not None:
                os.symlink(e.source, name)
            elif e.target is not None and "/" not in e.target:
                os.symlink(e.target, name)
            if Path(e.path).name == Path(info.interp).name and e.source is not None:
                loader = e.source
    if loader is None:
        raise BuildError(f"the guest's loader {info.interp} is not in the image")
    import atexit
    atexit.register(shutil.rmtree, libdir, True)
    return [str(loader), "--library-path", str(libdir), str(binary)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    ap.add_argument("--cache", type=Path, default=None,
                    help="download/unpack cache (default: 'cache' next to --out's parent, images/build/cache)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date, with NEW keys")
    ap.add_argument("--python-keys", action="store_true",
                    help="generate keys in Python instead of with the downloaded ssh-keygen")
    ap.add_argument("--testdrv", type=Path, default=HERE / recipe.TESTDRV_DIR,
                    help="out-of-tree module sources to build into the image if they have a Makefile or "
                         f"Kbuild (default images/linux/{recipe.TESTDRV_DIR})")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    cache = (args.cache or out.parent / "cache").resolve()
    cache.mkdir(parents=True, exist_ok=True)
    try:
        return Builder(out, cache, args.force, args.python_keys, args.testdrv.resolve()).run()
    except BuildError as exc:
        print(f"build.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
