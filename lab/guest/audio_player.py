"""The guest half of "hear the rebalance": the signal file, and how each guest plays it.

The host analyses what QEMU captured (lab.audio_analysis), so the guest needs nothing
but a player that sends the lab's counter signal to the device bit-exact: no
resampling, no mixing, no volume. Linux: ALSA ``aplay`` on the device's own ``hw:``
PCM (44.1 kHz s16 stereo, which QEMU's HDA codecs and AC97 take natively).
Windows: the audio engine's shared mode always resamples to the endpoint's mix format
and mixes, so the counter does not survive there; the host then measures gaps and
outages only (``signal: unknown`` in the analysis), which is what an outage test needs.

A player is restarted the way an audio service reopens its stream when the device
comes back after a rebalance: Linux waits for the device's PCM node under its PCI
function in sysfs, Windows for an audio endpoint whose PnP status is OK again
(PortCls's ``PcRebalanceRemoveSubdevices`` unregisters the subdevices on a rebalance
STOP and registers them again on the restart, so open streams are closed and the
endpoint goes away meanwhile: learn.microsoft.com/windows-hardware/drivers/audio/
implement-pnp-rebalance-for-portcls-audio-drivers).

Every guest command is built here with its shell's quoting (POSIX ``shlex``,
PowerShell literals through ``build_script``); values are never pasted into scripts.
"""

from __future__ import annotations

import abc
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from lab import audio_analysis as aa
from lab.agent.powershell import build_script

#: frames a planted fault removes or replays (100 ms at 44.1 kHz; one 1024-frame buffer)
FAULT_FRAMES = {"drop-100ms": 4410, "repeat-buffer": 1024}
_BDF_RE = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def signal_pcm(seconds: float, fault: str = "none", fault_at_s: float = 1.0) -> bytes:
    """The PCM the guest plays: the counter signal, with the planted fault if any.

    ``drop-100ms``: the counter jumps forward by 4410 frames at ``fault_at_s`` (what a
    player or driver that loses a period does); ``repeat-buffer``: 1024 frames before
    ``fault_at_s`` are played again (stale ring-buffer data)."""
    frames = round(seconds * aa.RATE)
    at = round(fault_at_s * aa.RATE)
    if fault == "none":
        return aa.generate_pcm(frames)
    n = FAULT_FRAMES[fault]
    head = aa.generate_pcm(at)
    if fault == "drop-100ms":
        return head + aa.generate_pcm(frames - at, start_counter=at + n)
    return head + aa.generate_pcm(n, start_counter=at - n) + aa.generate_pcm(frames - at - n,
                                                                           start_counter=at)


def write_signal_file(path: Path, seconds: float, fault: str = "none",
                      fault_at_s: float = 1.0) -> Path:
    pcm = signal_pcm(seconds, fault, fault_at_s)
    path.write_bytes(aa._wav_header(aa.RATE, len(pcm)) + pcm)  # the header the analysis reads
    return path


def signal_name(seconds: float, fault: str, fault_at_s: float) -> str:
    """A file name that says what the file holds (so one VM keeps one copy of each)."""
    tag = "" if fault == "none" else f"-{fault}-at{round(fault_at_s * 1000)}ms"
    return f"signal-{round(seconds * 1000)}ms{tag}.wav"


def _check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"not a player name: {name!r}")
    return name


class AudioPlayer(abc.ABC):
    """What a guest OS needs to play the signal on one device and to know its PCM is
    back. ``directory`` is where the signal files go in the guest."""

    directory: str

    def signal_path(self, file_name: str) -> str:
        return f"{self.directory}/{file_name}"

    @abc.abstractmethod
    def prepare_command(self) -> str:
        """Create the guest directory for signal files and pid files."""

    @abc.abstractmethod
    def pcm_ready_command(self, bdf: str | None) -> str:
        """Exit 0 when the device's playback PCM is there (for polling)."""

    @abc.abstractmethod
    def play_command(self, name: str, signal: str, bdf: str | None) -> str:
        """Run in the foreground of a background job: stop an earlier player of that
        name, then play ``signal`` on the device until it ends or the device goes."""

    @abc.abstractmethod
    def stop_command(self, names: list[str]) -> str:
        """Stop the named players (no error when one is gone already)."""


@dataclass
class LinuxAudioPlayer(AudioPlayer):
    """busybox sh + ALSA's aplay (the built-in image ships alsa-utils)."""

    directory: str = "/tmp/rebalab-audio"

    def prepare_command(self) -> str:
        return f"mkdir -p {shlex.quote(self.directory)}"

    @staticmethod
    def _pcm_glob(bdf: str | None) -> str:
        # the device's own card: /sys/bus/pci/devices/<bdf>/sound/cardN/pcmCNDMp
        if bdf is None:
            return "/sys/class/sound/pcmC*D0p"
        if not _BDF_RE.match(bdf):
            raise ValueError(f"not a PCI address: {bdf!r}")
        return f"/sys/bus/pci/devices/{bdf}/sound/card*/pcmC*D0p"

    def pcm_ready_command(self, bdf: str | None) -> str:
        # the sysfs entry and the /dev node mdev makes for it: both, or aplay fails
        return (f"for p in {self._pcm_glob(bdf)}; do "
                '[ -e "$p" ] && [ -e "/dev/snd/${p##*/}" ] && exit 0; done; exit 1')

    def play_command(self, name: str, signal: str, bdf: str | None) -> str:
        pid = shlex.quote(f"{self.directory}/{_check_name(name)}.pid")
        return (f"[ -f {pid} ] && kill $(cat {pid}) 2>/dev/null; "
                f"p=; for x in {self._pcm_glob(bdf)}; do p=${{x##*/}}; break; done; "
                '[ -n "$p" ] && [ -e "/sys/class/sound/$p" ] || { echo "no PCM for the device" >&2; exit 3; }; '
                'c=${p#pcmC}; c=${c%%D*}; '
                # AC97/ES1370: QEMU applies the guest's mixer to the stream; 0 dB, unmuted
                'amixer -q -c "$c" sset Master 100% unmute 2>/dev/null; '
                'amixer -q -c "$c" sset PCM 100% unmute 2>/dev/null; '
                f"echo $$ > {pid}; "
                f'exec aplay -q -D "hw:$c,0" -t wav {shlex.quote(signal)}')

    def stop_command(self, names: list[str]) -> str:
        pids = " ".join(shlex.quote(f"{self.directory}/{_check_name(n)}.pid") for n in names)
        return (f"for f in {pids}; do [ -f \"$f\" ] && kill $(cat \"$f\") 2>/dev/null; "
                'rm -f "$f"; done; true')


_PS_PREPARE = r"""
New-Item -ItemType Directory -Force -Path $p.Dir | Out-Null
"""

_PS_READY = r"""
$ok = @(Get-PnpDevice -Class AudioEndpoint -PresentOnly -ErrorAction SilentlyContinue |
        Where-Object { $_.Status -eq 'OK' }).Count -gt 0
if ($ok) { exit 0 } else { exit 1 }
"""

_PS_PLAY = r"""
if (Test-Path -LiteralPath $p.PidFile) {
    $old = Get-Content -LiteralPath $p.PidFile -ErrorAction SilentlyContinue
    if ($old) { Stop-Process -Id ([int]$old) -Force -ErrorAction SilentlyContinue }
}
Set-Content -LiteralPath $p.PidFile -Value $PID
$player = New-Object System.Media.SoundPlayer $p.Signal
$player.PlaySync()
"""

_PS_STOP = r"""
foreach ($f in $p.PidFiles) {
    if (Test-Path -LiteralPath $f) {
        $old = Get-Content -LiteralPath $f -ErrorAction SilentlyContinue
        if ($old) { Stop-Process -Id ([int]$old) -Force -ErrorAction SilentlyContinue }
        Remove-Item -LiteralPath $f -Force -ErrorAction SilentlyContinue
    }
}
"""


@dataclass
class WindowsAudioPlayer(AudioPlayer):
    """Windows PowerShell 5.1: ``System.Media.SoundPlayer.PlaySync`` on the default
    endpoint (the VM's only audio device), endpoints through ``Get-PnpDevice -Class
    AudioEndpoint`` (PnP status OK = the endpoint is registered and started).

    Not run here (no Windows guest on this host): the scripts are pinned by unit tests.
    """

    directory: str = r"C:\rebalab\audio"

    def signal_path(self, file_name: str) -> str:
        return f"{self.directory}\\{file_name}"

    def prepare_command(self) -> str:
        return build_script(_PS_PREPARE, {"Dir": self.directory})

    def pcm_ready_command(self, bdf: str | None) -> str:
        return build_script(_PS_READY, {})

    def play_command(self, name: str, signal: str, bdf: str | None) -> str:
        return build_script(_PS_PLAY, {"PidFile": f"{self.directory}\\{_check_name(name)}.pid",
                                       "Signal": signal})

    def stop_command(self, names: list[str]) -> str:
        return build_script(_PS_STOP, {"PidFiles": [f"{self.directory}\\{_check_name(n)}.pid"
                                                    for n in names]})


def player_for(os_name: str) -> AudioPlayer:
    return WindowsAudioPlayer() if os_name == "windows" else LinuxAudioPlayer()
