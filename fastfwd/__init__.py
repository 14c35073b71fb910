"""fastfwd: TCP/UDP port forwarding with a GIL-free Cython data plane.

The public API is small: :class:`Rule` and :class:`RuleOptions` describe forwards,
:class:`Forwarder` runs them. The forwarder (and with it the compiled engine) is imported on
first use, so the CLI's light commands and the DHCP hook start fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .rules import DEFAULT_LISTEN, Rule, RuleOptions, SpecError

__version__ = "0.1.0"
__all__ = ["Rule", "RuleOptions", "SpecError", "DEFAULT_LISTEN", "Forwarder", "ActiveRule",
           "Counters", "Diff", "Config", "ConfigError", "load_config", "__version__"]

if TYPE_CHECKING:
    from .config import Config, ConfigError, load_config
    from .forwarder import ActiveRule, Counters, Diff, Forwarder

_LAZY = {"Forwarder": "forwarder", "ActiveRule": "forwarder", "Counters": "forwarder",
         "Diff": "forwarder", "Config": "config", "ConfigError": "config", "load_config": "config"}


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'fastfwd' has no attribute {name!r}")
