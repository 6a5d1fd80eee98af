"""Long runs keep flat memory: the console's lines and the run's host events of earlier
iterations leave memory (their files keep them) while cursors keep their meaning.
The console is driven through a real UNIX socket, as QEMU's chardev serves it."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.console import Console
from lab.errors import DeadlineExceeded
from lab.events import Event, Kind, Source
from lab.rundir import RunDir


@pytest.fixture
def console(tmp_path: Path) -> Iterator[tuple[Console, socket.socket]]:
    """A Console connected to a real UNIX socket served here (QEMU's side)."""
    path = tmp_path / "con.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    con = Console(path, tmp_path / "console.log")
    con.connect(5)
    peer, _ = srv.accept()
    try:
        yield con, peer
    finally:
        peer.close()
        srv.close()
        con.close()


def _wait_cursor(con: Console, n: int) -> None:
    end = time.monotonic() + 5
    while con.cursor() < n:
        assert time.monotonic() < end, f"only {con.cursor()} lines arrived"
        time.sleep(0.01)


def test_console_forgets_old_lines_and_cursors_keep_their_meaning(
        tmp_path: Path, console: tuple[Console, socket.socket]) -> None:
    con, peer = console
    peer.sendall(b"".join(f"line {i}\n".encode() for i in range(100)))
    _wait_cursor(con, 100)
    assert con.forget_before(90) == 90
    assert con.cursor() == 100
    assert [ln.text for ln in con.lines(95)] == [f"line {i}" for i in range(95, 100)]
    # a cursor from before the cut sees what is left, not a shifted window
    assert [ln.index for ln in con.lines(10)] == list(range(90, 100))
    peer.sendall(b"line 100\nready\n")
    got = con.wait_for("ready", timeout=5, after=50)
    assert got.index == 101 and got.text == "ready"
    with pytest.raises(DeadlineExceeded):
        con.wait_for("line 5\n", timeout=0.2, after=0)    # forgotten: not found again
    # the file keeps everything
    con.close()
    text = (tmp_path / "console.log").read_text()
    assert "line 0" in text and "line 100" in text


def test_forgetting_more_than_is_there_is_harmless(
        console: tuple[Console, socket.socket]) -> None:
    con, peer = console
    peer.sendall(b"a\nb\n")
    _wait_cursor(con, 2)
    assert con.forget_before(10) == 2 and con.cursor() == 2 and con.lines() == []
    peer.sendall(b"c\n")
    _wait_cursor(con, 3)
    assert [ln.text for ln in con.lines()] == ["c"] and con.lines()[0].index == 2


def test_run_dir_forgets_events_before_a_time_but_the_file_keeps_them(tmp_path: Path) -> None:
    rd = RunDir(tmp_path, "t")
    try:
        for t in range(10):
            rd.record(Event(t_host_ns=t * 1000, source=Source.HOST_LAB, kind=Kind.OPERATION,
                            data={"i": t}))
        assert rd.forget_events_before(7000) == 7
        assert [e.data["i"] for e in rd.events] == [7, 8, 9]
    finally:
        rd.close()
    assert len((rd.path / "events.jsonl").read_text().splitlines()) == 10
