"""A guest whose SSH server is not up yet makes paramiko log a failed handshake with
its traceback from its own thread; importing the lab's SSH agent keeps that off the
user's terminal (the connect loop keeps the reason). Run in a child, as the CLI is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

CHILD = r"""
import socket, threading, time
import lab.agent.ssh  # noqa: F401
import paramiko
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(1)
port = srv.getsockname()[1]
def serve():
    c, _ = srv.accept(); c.close()
threading.Thread(target=serve, daemon=True).start()
cl = paramiko.SSHClient(); cl.set_missing_host_key_policy(paramiko.RejectPolicy())
try:
    cl.connect("127.0.0.1", port, username="x", timeout=2, banner_timeout=2,
               allow_agent=False, look_for_keys=False)
except Exception as e:
    print("raised", type(e).__name__)
time.sleep(0.3)
"""


def test_a_failed_handshake_prints_no_traceback() -> None:
    r = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                       cwd=REPO, timeout=60)
    assert "raised SSHException" in r.stdout, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "protocol banner" not in r.stderr, r.stderr
