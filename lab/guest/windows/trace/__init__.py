"""Windows guest tracers: Kernel-PnP ETW, device state, setupapi.dev.log and WPP.

Each module has three layers: the pinned guest scripts (fixed PowerShell templates
with literal parameters), pure parsers of what those scripts return (tested against
documented formats without Windows), and Event construction. ``WindowsTracer`` ties
them to an agent.
"""

from lab.guest.windows.trace.tracer import WindowsTraceConfig, WindowsTracer

__all__ = ["WindowsTraceConfig", "WindowsTracer"]
