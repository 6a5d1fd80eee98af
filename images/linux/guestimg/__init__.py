"""Helpers for images/linux/build.py: the rebalab Linux guest image builder.

Everything here uses the Python standard library only (``cryptography`` is used
for key derivation when importable, with a pure-Python fallback).  The builder
never installs anything on the host: Debian packages are fetched with
``apt-get download`` into a cache and unpacked with ``dpkg-deb -x``.
"""

#: Bump when the builder's output changes for identical inputs (part of the input hash).
BUILDER_VERSION = "2"


class BuildError(Exception):
    """A build step failed; the message says what to do about it."""
