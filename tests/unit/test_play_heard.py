"""``play`` ends when the host hears the stream: a ``sleep`` after it is time into the
stream, however slowly the guest's player started (the audio test once rebalanced
before a slow first ``aplay`` was heard, and measured one stream instead of two)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lab.agent.base import CommandResult
from lab.audio_capture import FRAME_BYTES, WAV_HEADER_BYTES
from lab.steps import StepFailed
from lab.steps.audio import Play
from lab.steps.base import Job
from tests.unit.test_step_kinds import scenario


class FakeAgent:
    """The two calls the wait makes: whether the player ended, and its result."""

    def __init__(self, ends_after: float | None = None, exit_status: int = 0,
                 stderr: str = "") -> None:
        self.t0 = time.monotonic()
        self.ends_after = ends_after
        self.exit_status, self.stderr = exit_status, stderr
        self.collected = 0

    def finished(self, handle: Any) -> bool:
        return self.ends_after is not None and time.monotonic() - self.t0 >= self.ends_after

    def collect(self, handle: Any, command: str, timeout: float) -> CommandResult:
        self.collected += 1
        return CommandResult(command, self.exit_status, "", self.stderr, 0.0)


def ctx_for(path: Path, agent: FakeAgent) -> Any:
    logs: list[str] = []
    return SimpleNamespace(machine=SimpleNamespace(agent=agent, audio_path=path),
                           jobs={}, players=set(), guest_log=logs.append, logs=logs)


def wav(path: Path, frames: int) -> None:
    path.write_bytes(b"\0" * (WAV_HEADER_BYTES + frames * FRAME_BYTES))


def grow_later(path: Path, delay: float, frames: int) -> threading.Thread:
    def grow() -> None:
        time.sleep(delay)
        with path.open("ab") as f:
            f.write(b"\1" * frames * FRAME_BYTES)
    t = threading.Thread(target=grow)
    t.start()
    return t


def play(extra: str = "") -> Play:
    sc = scenario(f"  - play: {{device: snd0{extra}}}\n")
    (step,) = sc.sweep().iteration(0).steps
    assert isinstance(step, Play)
    return step


def test_the_defaults_wait_to_hear_the_stream_and_can_be_turned_off() -> None:
    assert play().wait_heard is True and play().heard_timeout.seconds == 10.0
    step = play(", wait_heard: false, heard_timeout: 3s")
    assert step.wait_heard is False and step.heard_timeout.seconds == 3.0


@pytest.mark.parametrize("bad", ["heard_timeout: 0s", "heard_timeout: 5m"])
def test_a_heard_timeout_out_of_bounds_is_refused(bad: str) -> None:
    from vdevice.errors import SpecError
    with pytest.raises(SpecError, match="heard_timeout"):
        play(", " + bad)


def test_the_step_returns_only_once_the_capture_grew(tmp_path: Path) -> None:
    path = tmp_path / "audio.wav"
    wav(path, 1000)                       # an earlier stream's frames are not this one's
    ctx = ctx_for(path, FakeAgent())
    job = Job("player", "aplay ...", object(), False, 0)
    t = grow_later(path, 0.3, 64)
    t0 = time.monotonic()
    ms = play()._await_heard(ctx, job, 1000)
    t.join()
    assert time.monotonic() - t0 >= 0.29 and 280 <= ms < 5000


def test_a_silent_player_fails_the_step_at_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "audio.wav"
    wav(path, 10)
    step = play(", heard_timeout: 200ms")
    with pytest.raises(StepFailed) as exc:
        step._await_heard(ctx_for(path, FakeAgent()), Job("player", "x", object(), False, 0), 10)
    v = exc.value.violation
    assert v.rule == "wait.timeout" and v.device == "snd0" and "heard nothing" in v.message


def test_a_player_that_ends_unheard_fails_with_what_it_said(tmp_path: Path) -> None:
    path = tmp_path / "audio.wav"
    wav(path, 0)
    agent = FakeAgent(ends_after=0.05, exit_status=1, stderr="aplay: main:831: audio open error: No such device")
    ctx = ctx_for(path, agent)
    ctx.jobs["player"] = job = Job("player", "aplay ...", object(), False, 0)
    ctx.players.add("player")
    with pytest.raises(StepFailed) as exc:
        play()._await_heard(ctx, job, 0)
    v = exc.value.violation
    assert v.rule == "guest.command" and "exit 1" in v.message and "No such device" in v.message
    assert agent.collected == 1 and "player" not in ctx.jobs and "player" not in ctx.players
    assert "[exit 1]" in ctx.logs[0]


def test_frames_already_there_when_the_player_ended_count_as_heard(tmp_path: Path) -> None:
    # a short stream that was written and ended between two polls was heard
    path = tmp_path / "audio.wav"
    wav(path, 50)
    agent = FakeAgent(ends_after=0.0)
    assert play()._await_heard(ctx_for(path, agent), Job("p", "x", object(), False, 0), 10) >= 0
    assert agent.collected == 0
