"""rebalab orchestration: QEMU process, QMP, guest agents, tracers, timeline, rules, reports."""

__version__ = "0.1.0"
