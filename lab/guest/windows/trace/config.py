"""The driver's trace as a scenario configures it (``guest.trace``) -> ``WindowsTraceConfig``.

Kernel-PnP ETW logs starts, removals and problem codes but no IRP_MN_QUERY_STOP_DEVICE,
IRP_MN_STOP_DEVICE or IRP_MN_CANCEL_STOP_DEVICE: a rebalance is visible only in the
driver's own trace (WPP or TraceLogging), so without this the Windows PnP rules cannot
check the STOP contract at all.

* WPP providers are recorded in their own session (``logman ... -p GUID FLAGS LEVEL``)
  and formatted in the guest with the WDK's tracefmt, from the driver's TMF file or
  from TMFs that tracepdb makes out of its PDB (``lab.guest.windows.trace.wpp``). The TMF/
  PDB are host files next to the scenario (confined to its folder by the loader) and
  are copied into the guest's trace work directory under fixed names, so no host file
  name reaches a guest command line.
* TraceLogging providers describe their events themselves; they join the Kernel-PnP
  session and are decoded with ``Get-WinEvent``.
* ``device`` names the device whose driver writes the trace: WPP messages carry no
  device, and the rules judge per device, so every message is attributed to it.

Example (Microsoft's sysvad sample, Windows-driver-samples ``audio/sysvad``): sysvad
itself has no WPP control GUID and no TraceLogging provider - it prints with
``_DbgPrintF`` (``audio/sysvad/sysvad.h``: ``#define DPF _DbgPrintF``), visible only in
a kernel debugger. To trace it, add a WPP control GUID in the style of the ACX samples'
``audio/Acx/Samples/Shared/Trace.h`` (``WPP_DEFINE_CONTROL_GUID(..., WPP_DEFINE_BIT(...)
FLAG_PNP = 0x8 ...)``) and trace in ``PnpHandler`` (``audio/sysvad/adapter.cpp``, the
``IRP_MJ_PNP`` dispatch routine that sees IRP_MN_STOP_DEVICE before ``PcDispatchIrp``):
the built-in patterns recognise ``IRP_MN_*`` names and PortCls callback names
(``PnpQueryStop``/``PnpCancelStop``/``PnpStop``, ``StartDevice ... resources: ...``).
README.md ("The driver's trace") shows the scenario keys for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lab.errors import ConfigError
from lab.events import DeviceId, Kind
from lab.guest.windows.trace import etw, wpp
from lab.guest.windows.trace.tracer import WindowsTraceConfig

if TYPE_CHECKING:
    from lab.scenario.model import TraceProviderSpec, TraceSpec

#: guest names of the uploaded formatting inputs (inside the trace work directory)
GUEST_TMF = "driver.tmf"
GUEST_PDB = "driver.pdb"


def _provider(p: TraceProviderSpec) -> etw.EtwProvider:
    return etw.EtwProvider(p.guid, p.flags_hex, p.level, p.name)


def from_spec(spec: TraceSpec | None, *, device: str | None = None,
              base: WindowsTraceConfig | None = None) -> WindowsTraceConfig:
    """``WindowsTraceConfig`` for a scenario's ``guest.trace`` (None: the default config).

    ``spec.tmf``/``spec.pdb`` must already be absolute host paths (the loader resolves
    them inside the scenario's folder). ``device`` is the QEMU id the trace is
    attributed to (the loader defaults it to the only audio device). ConfigError when a file is missing.
    """
    cfg = base or WindowsTraceConfig()
    if spec is None:
        return cfg
    uploads: list[tuple[str, str]] = []
    fmt: wpp.WppFormatting | None = None
    for host, name in ((spec.tmf, GUEST_TMF), (spec.pdb, GUEST_PDB)):
        if host is None:
            continue
        if not Path(host).is_file():
            raise ConfigError(f"guest.trace: {host} is not a file")
        uploads.append((str(host), cfg.workdir + "\\" + name))
    if spec.tmf is not None:
        fmt = wpp.WppFormatting(tracefmt=spec.tracefmt or "", tmf_file=uploads[0][1])
    elif spec.pdb is not None:
        fmt = wpp.WppFormatting(tracefmt=spec.tracefmt or "", pdb=uploads[0][1],
                                tracepdb=spec.tracepdb)
    patterns = tuple(wpp.WppPattern(p.regex, Kind(p.kind), p.phase, p.name or p.kind)
                     for p in spec.patterns) + cfg.wpp_patterns
    return WindowsTraceConfig(
        workdir=cfg.workdir, session=cfg.session, wpp_session=cfg.wpp_session,
        tracelogging_providers=cfg.tracelogging_providers, wpp_providers=cfg.wpp_providers,
        wpp_flags=cfg.wpp_flags, wpp_level=cfg.wpp_level, wpp_format=fmt or cfg.wpp_format,
        wpp_patterns=patterns, setupapi_log=cfg.setupapi_log, instance_ids=cfg.instance_ids,
        device_classes=cfg.device_classes, include_messages=cfg.include_messages,
        event_map=cfg.event_map,
        driver_wpp=tuple(_provider(p) for p in spec.providers if p.kind == "wpp"),
        driver_tracelogging=tuple(_provider(p) for p in spec.providers if p.kind == "tracelogging"),
        device=DeviceId(qom=device) if device else None, uploads=tuple(uploads))


__all__ = ["GUEST_PDB", "GUEST_TMF", "from_spec"]
