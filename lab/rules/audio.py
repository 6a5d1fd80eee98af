"""Audio continuity, as the host heard it: gaps, glitches, and how long a rebalance
silenced the stream.

Evidence: ``Source.HOST_AUDIO`` events from lab.audio_analysis (QEMU's capture of the
guest's playback of the lab's counter signal). A *gap* is silence inside a stream, a
*discontinuity* a counter that jumped (frames lost) or went back (frames replayed)
inside a stream; an *outage* runs from the last good frame before a stream stopped to
the first good frame after it came back (``AUDIO_RESUMED``, its ``duration_ns``), i.e.
what a listener hears across a rebalance that stopped the device and a player that
reopened it.

Limits (scenario ``limits:``): ``audio_max_gap_ms`` (default 20: a few periods),
``audio_max_discontinuities`` (default 0: the bit-exact path has none), and
``audio_max_outage_ms`` (no default: set it when the stream must come back within a
bound; with it set, a stream that never came back is ``audio.not-resumed``).
A drop QEMU's HDA codec made itself (its whole buffer, with a ``hda_audio_overrun``
trace line beside it: the host fell behind real time) stays on the timeline as
``cause=emulator-overrun`` and is not counted.
"""

from __future__ import annotations

from collections.abc import Mapping

from lab.audio_analysis import EMULATOR_OVERRUN
from lab.events import Event, Kind, Source
from lab.results import Violation
from lab.rules.base import RuleContext, ms, register, violation
from lab.timeline import Timeline

_KINDS = (Kind.AUDIO_GAP, Kind.AUDIO_DISCONTINUITY, Kind.AUDIO_RESUMED, Kind.AUDIO_STOP)


class AudioRules:
    id = "audio"
    description = "audio continuity from the host's capture: gaps, glitches, outages"
    checks: Mapping[str, str] = {
        "audio.gap": "silence inside a stream longer than audio_max_gap_ms",
        "audio.discontinuity": "frames lost or replayed inside a stream (more than "
                               "audio_max_discontinuities)",
        "audio.outage": "the stream came back later than audio_max_outage_ms after it stopped",
        "audio.not-resumed": "the stream stopped and did not come back (audio_max_outage_ms set)",
    }

    def check(self, timeline: Timeline, context: RuleContext) -> list[Violation]:
        lim = context.limits
        out: list[Violation] = []
        glitches: dict[str, list[Event]] = {}
        for ev in timeline.select(kinds=_KINDS, sources=Source.HOST_AUDIO):
            label = context.label(ev.device) if ev.device is not None else "audio"
            phase = context.phase_at(ev.t_host_ns)
            if ev.kind == Kind.AUDIO_GAP and ev.data.get("cause", "silence") == "silence":
                dur = ev.duration_ns or 0
                if dur > lim.audio_max_gap_ms * 1e6:
                    out.append(violation(
                        "audio.gap", label, phase,
                        f"{ms(dur)} of silence inside the stream (limit "
                        f"{lim.audio_max_gap_ms:g} ms)", [ev], gap_ms=round(dur / 1e6, 3)))
            elif ev.kind == Kind.AUDIO_DISCONTINUITY:
                # a buffer QEMU's codec dropped itself (hda_audio_overrun, a host too
                # slow: lab.audio_analysis.excuse_emulator_drops) is no glitch of the guest
                if ev.data.get("cause") != EMULATOR_OVERRUN:
                    glitches.setdefault(label, []).append(ev)
            elif ev.kind == Kind.AUDIO_RESUMED and lim.audio_max_outage_ms is not None:
                dur = ev.duration_ns or 0
                if dur > lim.audio_max_outage_ms * 1e6:
                    out.append(violation(
                        "audio.outage", label, phase,
                        f"the stream was out for {ms(dur)} (limit {lim.audio_max_outage_ms:g} "
                        "ms), from its last good sample to the first after the restart",
                        [ev], outage_ms=round(dur / 1e6, 3)))
            elif ev.kind == Kind.AUDIO_STOP and ev.data.get("resumed") is False \
                    and lim.audio_max_outage_ms is not None:
                out.append(violation(
                    "audio.not-resumed", label, phase,
                    "the stream stopped and did not come back before the iteration ended",
                    [ev]))
        for label, evs in glitches.items():
            if len(evs) > lim.audio_max_discontinuities:
                first = evs[0]
                what = ", ".join(f"{e.data.get('cause', '?')} {e.data.get('ms', '?')} ms"
                                 for e in evs[:3])
                out.append(violation(
                    "audio.discontinuity", label, context.phase_at(first.t_host_ns),
                    f"{len(evs)} discontinuity(ies) inside the stream ({what}"
                    + (", ..." if len(evs) > 3 else "") + "; limit "
                    f"{lim.audio_max_discontinuities:g})", evs[:5], count=len(evs)))
        return out


register(AudioRules())
