"""A guest OS's behaviour without its boot, for unit tests of the code that asks it.

``behaviour("windows")`` is a real ``WindowsGuest`` (its waits, trace, triggers, rules)
made without ``__init__``, so no image, manifest or KVM is needed; the methods that
boot a VM are never called on it."""

from __future__ import annotations

from typing import Any

from lab.guest import GuestOs, guest_class


def behaviour(os_name: str, **attrs: Any) -> GuestOs:
    cls = guest_class(os_name)
    g = object.__new__(cls)
    defaults: dict[str, Any] = {"image": None} if os_name == "linux" else {"trace_config": None}
    for k, v in {**defaults, **attrs}.items():
        setattr(g, k, v)
    return g
