"""Serial output that never pushes back on QEMU, for recorded VMs.

QEMU's 16550 emulation writes one byte per chardev write. On a unix socket every byte
is one socket buffer charged ~1 KiB against the sender's 208 KiB budget, so a few
hundred bytes that the lab has not read yet make the next write fail with EAGAIN;
the serial device then retries from a host-side watch when the socket drains. Under
recording that is fatal: the failed write is in the log, the retry's moment depends on
the host, and the replay stopped with "Missing character write event in the replay
log" at the first such burst (a rescan's kernel messages, measured here).

So a recorded VM's output-only serial ports (the console and the kprobe stream) go to
a FIFO (``-chardev file``), whose 1 MiB pipe merges the one-byte writes; a relay thread
copies the FIFO into the unix socket the lab's ``Console`` connects to, as before. The
replay uses the same relays (QEMU's docs: the serial backends may differ between record
and replay; what matters is that no write comes back short).
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import threading
from pathlib import Path

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20          # /proc/sys/fs/pipe-max-size's default: no privilege needed


class FifoRelay:
    """FIFO ``fifo`` (QEMU writes) -> unix socket ``sock`` (the lab's Console reads)."""

    def __init__(self, fifo: Path, sock: Path) -> None:
        self.fifo = fifo
        self.sock = sock
        self._fd: int | None = None
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.relayed = 0

    def start(self) -> FifoRelay:
        """Before QEMU starts: make the FIFO (0600) and hold its read end open
        (``O_RDWR``, so QEMU's open never blocks and there is no EOF between writers)."""
        os.mkfifo(self.fifo, 0o600)
        self._fd = os.open(self.fifo, os.O_RDWR | os.O_NONBLOCK)
        try:
            fcntl.fcntl(self._fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                      # a lower pipe-max-size: the default 64 KiB still merges
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.sock))
        self._listener.listen(1)
        self._thread = threading.Thread(target=self._run, name=f"relay-{self.sock.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._fd is not None and self._listener is not None
        self._listener.settimeout(0.2)
        conn: socket.socket | None = None
        while not self._stop.is_set() and conn is None:
            try:
                conn, _ = self._listener.accept()
            except (socket.timeout, OSError):
                continue
        if conn is None:
            return
        conn.settimeout(None)
        try:
            while True:
                ready, _, _ = select.select([self._fd], [], [], 0.2)
                if not ready:
                    if self._stop.is_set():
                        break
                    continue
                try:
                    chunk = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    break
                conn.sendall(chunk)
                self.relayed += len(chunk)
        except OSError:
            pass                      # the Console closed its end: nothing left to feed
        finally:
            conn.close()

    def stop(self) -> None:
        """After QEMU exited: forward what is left in the FIFO, then close (the Console
        sees its end of file)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        for closer in (self._listener,):
            if closer is not None:
                closer.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def chardev_file(name: str, fifo: Path) -> str:
    """``-chardev file,id=NAME,path=FIFO`` through the one QEMU option encoder."""
    from vdevice.topology import qemu_opts
    return qemu_opts({"id": name, "path": fifo}, "file")
