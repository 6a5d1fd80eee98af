"""Ed25519 keys for the guest: OpenSSH format, generation, persistence.

Formats written here:
- OpenSSH private key ("openssh-key-v1", unencrypted), readable by the guest's sshd,
  ssh-keygen and paramiko (``Ed25519Key.from_private_key_file``);
- OpenSSH public key line ``ssh-ed25519 AAAA... comment``.

The public key is derived from the 32-byte seed with ``cryptography`` when it is
importable, else with the small RFC 8032 implementation below (slow but exact).
The private key text is written by the code below in both cases; when
``cryptography`` is importable, it also reads the text back as a check
(``check_openssh_text``), so the two implementations vouch for each other.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from . import BuildError

KEY_TYPE = b"ssh-ed25519"

# ---------------------------------------------------------------- RFC 8032 ---
_P = 2**255 - 19
_D = -121665 * pow(121666, _P - 2, _P) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _recover_x(y: int, sign: int) -> int:
    x2 = (y * y - 1) * pow(_D * y * y + 1, _P - 2, _P)
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * _SQRT_M1 % _P
    if (x & 1) != sign:
        x = _P - x
    return x


_GY = 4 * pow(5, _P - 2, _P) % _P
_GX = _recover_x(_GY, 0)
_G = (_GX, _GY, 1, _GX * _GY % _P)


def _add(p: tuple[int, int, int, int], q: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    a = (p[1] - p[0]) * (q[1] - q[0]) % _P
    b = (p[1] + p[0]) * (q[1] + q[0]) % _P
    c = 2 * p[3] * q[3] * _D % _P
    d = 2 * p[2] * q[2] % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


def _public_pure(seed: bytes) -> bytes:
    h = hashlib.sha512(seed).digest()
    s = int.from_bytes(h[:32], "little")
    s &= (1 << 254) - 8
    s |= 1 << 254
    q, p = (0, 1, 1, 0), _G
    while s:
        if s & 1:
            q = _add(q, p)
        p = _add(p, p)
        s >>= 1
    zi = pow(q[2], _P - 2, _P)
    x, y = q[0] * zi % _P, q[1] * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


def public_from_seed(seed: bytes, *, pure: bool = False) -> bytes:
    """Ed25519 public key for a 32-byte private seed."""
    if len(seed) != 32:
        raise ValueError("an Ed25519 seed is 32 bytes")
    if not pure:
        try:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
        except ImportError:
            pass
        else:
            return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return _public_pure(seed)


def crypto_backend() -> str:
    try:
        import cryptography.hazmat.primitives.asymmetric.ed25519  # noqa: F401
    except ImportError:
        return "pure-python"
    return "cryptography"


# ------------------------------------------------------------- wire format ---
def _string(b: bytes) -> bytes:
    return struct.pack(">I", len(b)) + b


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def uint32(self) -> int:
        if self.pos + 4 > len(self.data):
            raise ValueError("truncated key data")
        (v,) = struct.unpack_from(">I", self.data, self.pos)
        self.pos += 4
        return v

    def string(self) -> bytes:
        n = self.uint32()
        if self.pos + n > len(self.data):
            raise ValueError("truncated key data")
        v = self.data[self.pos:self.pos + n]
        self.pos += n
        return v


@dataclass(frozen=True)
class Ed25519Key:
    seed: bytes
    pub: bytes
    comment: str = ""

    def __post_init__(self) -> None:
        if len(self.seed) != 32 or len(self.pub) != 32:
            raise ValueError("Ed25519 seed and public key are 32 bytes each")

    def check(self) -> None:
        """Raise ValueError if the public half does not belong to the seed."""
        if public_from_seed(self.seed) != self.pub:
            raise ValueError("public key does not match private key")

    # public
    def public_blob(self) -> bytes:
        return _string(KEY_TYPE) + _string(self.pub)

    def public_line(self) -> str:
        line = f"ssh-ed25519 {base64.b64encode(self.public_blob()).decode()}"
        return f"{line} {self.comment}" if self.comment else line

    def fingerprint(self) -> str:
        return "SHA256:" + base64.b64encode(hashlib.sha256(self.public_blob()).digest()).decode().rstrip("=")

    # private
    def openssh_private(self) -> str:
        check = os.urandom(4)
        priv = (check + check + _string(KEY_TYPE) + _string(self.pub) + _string(self.seed + self.pub)
                + _string(self.comment.encode()))
        priv += bytes(range(1, 1 + (-len(priv) % 8)))
        blob = (b"openssh-key-v1\0" + _string(b"none") + _string(b"none") + _string(b"")
                + struct.pack(">I", 1) + _string(self.public_blob()) + _string(priv))
        b64 = base64.b64encode(blob).decode()
        body = "\n".join(b64[i:i + 70] for i in range(0, len(b64), 70))
        return f"-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n"


def parse_openssh_private(text: str) -> Ed25519Key:
    lines = [ln.strip() for ln in text.strip().splitlines()]
    if not lines or lines[0] != "-----BEGIN OPENSSH PRIVATE KEY-----" or lines[-1] != "-----END OPENSSH PRIVATE KEY-----":
        raise ValueError("not an OpenSSH private key")
    blob = base64.b64decode("".join(lines[1:-1]))
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic):
        raise ValueError("not an openssh-key-v1 key")
    r = _Reader(blob[len(magic):])
    if r.string() != b"none" or r.string() != b"none":
        raise ValueError("encrypted keys are not supported")
    r.string()
    if r.uint32() != 1:
        raise ValueError("expected exactly one key")
    r.string()
    p = _Reader(r.string())
    if p.uint32() != p.uint32():
        raise ValueError("corrupt private key (check bytes differ)")
    if p.string() != KEY_TYPE:
        raise ValueError("not an ssh-ed25519 key")
    pub = p.string()
    secret = p.string()
    comment = p.string().decode(errors="replace")
    if len(secret) != 64 or secret[32:] != pub:
        raise ValueError("corrupt ed25519 private key")
    return Ed25519Key(secret[:32], pub, comment)


def parse_public_line(line: str) -> bytes:
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise ValueError("not an ssh-ed25519 public key line")
    r = _Reader(base64.b64decode(parts[1]))
    if r.string() != KEY_TYPE:
        raise ValueError("public key blob is not ssh-ed25519")
    return r.string()


# -------------------------------------------------------------- generation ---
def generate_python(comment: str) -> Ed25519Key:
    seed = os.urandom(32)
    return Ed25519Key(seed, public_from_seed(seed), comment)


def generate_sshkeygen(command: list[str], comment: str) -> Ed25519Key:
    """Generate with OpenSSH's ssh-keygen (``command`` is how to run it); the result is
    read back by the Python parser and its public half checked against the seed."""
    with tempfile.TemporaryDirectory(prefix="rebalab-key-") as tmp:
        path = Path(tmp) / "key"
        try:
            proc = subprocess.run([*command, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                                  capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
        except subprocess.TimeoutExpired as exc:
            raise BuildError("ssh-keygen did not finish within 30 s") from exc
        if proc.returncode != 0 or not path.exists():
            raise BuildError(f"ssh-keygen failed ({proc.returncode}): {proc.stderr.strip()}")
        try:
            key = parse_openssh_private(path.read_text())
            if parse_public_line((Path(tmp) / "key.pub").read_text()) != key.pub:
                raise ValueError("key.pub does not match the private key")
            key.check()
        except (ValueError, OSError) as exc:
            raise BuildError(f"ssh-keygen wrote a key the builder cannot use: {exc}") from exc
    return key


def check_openssh_text(text: str, key: Ed25519Key) -> None:
    """Raise ValueError unless ``cryptography`` (when importable) reads ``text`` as ``key``.

    The private key text is the builder's own serialisation: this is the second
    opinion, from an independent OpenSSH-format reader."""
    try:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_ssh_private_key
    except ImportError:
        return
    try:
        loaded = load_ssh_private_key(text.encode(), password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"cryptography cannot read the OpenSSH private key: {exc}") from exc
    if loaded.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) != key.pub:  # type: ignore[union-attr]
        raise ValueError("cryptography reads a different public key from the OpenSSH private key")


def write_private(path: Path, text: str) -> None:
    """Write a private key file with mode 0600 from the start (never briefly readable by others)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass(frozen=True)
class KeyPair:
    """A key as stored in the output directory: ``<name>`` (private) and ``<name>.pub``."""
    key: Ed25519Key
    created: bool  # generated by this build (False: loaded from an earlier build)


def load_or_create(out: Path, name: str, comment: str, force: bool, make) -> KeyPair:
    """Load ``out/name`` (+ ``.pub``) if both exist and agree, else create them with ``make(comment)``."""
    priv, pub = out / name, out / f"{name}.pub"
    if not force and priv.exists() and pub.exists():
        try:
            key = parse_openssh_private(priv.read_text())
            key.check()
            if parse_public_line(pub.read_text()) != key.pub:
                raise ValueError(f"{pub.name} does not match {priv.name}")
            if os.stat(priv).st_mode & 0o077:
                os.chmod(priv, 0o600)
            return KeyPair(key, created=False)
        except (ValueError, OSError) as exc:
            raise BuildError(f"{priv}: cannot reuse key ({exc}); delete it or rebuild with --force") from exc
    key = make(comment)
    text = key.openssh_private()
    try:
        check_openssh_text(text, key)
    except ValueError as exc:
        raise BuildError(f"{priv}: the new key does not serialise correctly ({exc}); "
                         "rebuild with --python-keys, and report this") from exc
    write_private(priv, text)
    write_public(pub, key.public_line() + "\n")
    return KeyPair(key, created=True)
