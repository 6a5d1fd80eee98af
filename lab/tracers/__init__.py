"""Tracers: turn raw records (QEMU trace log, guest kernel, ETW...) into ``Event`` values."""
