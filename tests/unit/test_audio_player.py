"""The guest half of the audio check: the signal files (and their planted faults) and
the commands each guest runs, quoted for its shell."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from lab import audio_analysis as aa
from lab.guest.audio_player import (FAULT_FRAMES, LinuxAudioPlayer, WindowsAudioPlayer, player_for,
                              signal_name, signal_pcm, write_signal_file)


def counters(pcm: bytes) -> list[int]:
    return [pcm[i + 2] | (pcm[i + 3] << 8) for i in range(0, len(pcm), aa.FRAME_BYTES)]


def test_clean_signal_is_the_counter() -> None:
    pcm = signal_pcm(0.5)
    c = counters(pcm)
    assert len(c) == round(0.5 * aa.RATE) and c[:3] == [0, 1, 2] and c[-1] == len(c) - 1


def test_drop_fault_skips_4410_frames_at_the_given_time() -> None:
    pcm = signal_pcm(2.0, "drop-100ms", 1.0)
    c = counters(pcm)
    at = aa.RATE
    assert len(c) == 2 * aa.RATE
    assert c[at - 1] == at - 1 and c[at] == at + FAULT_FRAMES["drop-100ms"]


def test_repeat_fault_replays_one_buffer() -> None:
    pcm = signal_pcm(2.0, "repeat-buffer", 1.0)
    c = counters(pcm)
    at, n = aa.RATE, FAULT_FRAMES["repeat-buffer"]
    assert len(c) == 2 * aa.RATE
    assert c[at - 1] == at - 1 and c[at:at + n] == list(range(at - n, at)) and c[at + n] == at


def test_signal_file_is_a_wav_the_analysis_reads(tmp_path: Path) -> None:
    p = write_signal_file(tmp_path / signal_name(1.0, "drop-100ms", 0.5), 1.0, "drop-100ms", 0.5)
    assert p.name == "signal-1000ms-drop-100ms-at500ms.wav"
    a = aa.analyze(p)
    assert a.summary.signal == "counter" and a.summary.discontinuities == 1
    assert a.summary.dropped_frames == FAULT_FRAMES["drop-100ms"]


# ---- Linux: POSIX shell, run by busybox sh in the guest (checked here with dash/sh) ----

def test_linux_commands_quote_and_select_the_devices_own_card() -> None:
    pl = LinuxAudioPlayer(directory="/tmp/rebalab audio")
    play = pl.play_command("player", "/tmp/rebalab audio/signal x.wav", "0000:01:00.0")
    assert "/sys/bus/pci/devices/0000:01:00.0/sound/card*/pcmC*D0p" in play
    assert "'/tmp/rebalab audio/signal x.wav'" in play and "'/tmp/rebalab audio/player.pid'" in play
    assert 'exec aplay -q -D "hw:$c,0" -t wav' in play
    for cmd in (play, pl.pcm_ready_command("0000:01:00.0"), pl.pcm_ready_command(None),
                pl.stop_command(["player", "p2"]), pl.prepare_command()):
        # every command is one valid POSIX shell program
        subprocess.run(["sh", "-n", "-c", cmd], check=True)
    with pytest.raises(ValueError):
        pl.play_command("player; reboot", "/x.wav", None)
    with pytest.raises(ValueError):
        pl.pcm_ready_command("0000:01:00.0; reboot")


def test_linux_pcm_ready_and_stop_run_against_a_fake_sysfs(tmp_path: Path) -> None:
    """The commands' shell logic, run for real with /sys and /dev replaced."""
    pl = LinuxAudioPlayer(directory=str(tmp_path / "d"))
    ready = pl.pcm_ready_command("0000:01:00.0")
    sysroot, devroot = tmp_path / "sys", tmp_path / "dev"
    cmd = ready.replace("/sys/", f"{sysroot}/").replace("/dev/", f"{devroot}/")
    assert subprocess.run(["sh", "-c", cmd]).returncode == 1
    (sysroot / "bus/pci/devices/0000:01:00.0/sound/card1/pcmC1D0p").mkdir(parents=True)
    assert subprocess.run(["sh", "-c", cmd]).returncode == 1       # no /dev node yet
    (devroot / "snd").mkdir(parents=True)
    (devroot / "snd" / "pcmC1D0p").touch()
    assert subprocess.run(["sh", "-c", cmd]).returncode == 0
    # stop: kills what the pid file names, removes the pid file, never fails
    subprocess.run(["sh", "-c", pl.prepare_command()], check=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    (tmp_path / "d" / "player.pid").write_text(f"{sleeper.pid}\n")
    subprocess.run(["sh", "-c", pl.stop_command(["player", "other"])], check=True)
    assert sleeper.wait(timeout=5) != 0 and not (tmp_path / "d" / "player.pid").exists()


# ---- Windows: pinned PowerShell, values as literals -------------------------------------

def test_windows_scripts_take_values_as_literals() -> None:
    pl = player_for("windows")
    assert isinstance(pl, WindowsAudioPlayer)
    sig = pl.signal_path("signal-1000ms.wav")
    assert sig == "C:\\rebalab\\audio\\signal-1000ms.wav"
    play = pl.play_command("player", "C:\\x\\it's.wav", None)
    assert "$p.Signal" in play and "'C:\\x\\it''s.wav'" in play
    assert "System.Media.SoundPlayer" in play and "PlaySync()" in play
    ready = pl.pcm_ready_command("0000:01:00.0")
    assert "Get-PnpDevice -Class AudioEndpoint -PresentOnly" in ready and "'OK'" in ready
    stop = pl.stop_command(["player"])
    assert "'C:\\rebalab\\audio\\player.pid'" in stop and "Stop-Process" in stop
    assert "New-Item -ItemType Directory" in pl.prepare_command()
    assert isinstance(player_for("linux"), LinuxAudioPlayer)
