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
           "Counters", "Diff", "__version__"]

if TYPE_CHECKING:
    from .forwarder import ActiveRule, Counters, Diff, Forwarder

_LAZY = {"Forwarder", "ActiveRule", "Counters", "Diff"}


def __getattr__(name: str):
    if name in _LAZY:
        from . import forwarder
        return getattr(forwarder, name)
    raise AttributeError(f"module 'fastfwd' has no attribute {name!r}")
