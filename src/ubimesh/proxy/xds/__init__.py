"""Envoy v3 configuration in, runtime snapshots out.

The only proxy package that imports protobuf. ``load_bootstrap`` reads a bootstrap file and
returns a ``Snapshot`` or raises ``ConfigErrors`` naming every problem by its field path; the
supported subset of Envoy's API is listed in docs/envoy-compat.md.

The names below are loaded on first use, so that importing ``ubimesh.proxy.xds.errors`` (as the
serving process does) does not pull in protobuf and the generated Envoy classes.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_bootstrap": "ubimesh.proxy.xds.bootstrap",
    "load_bootstrap_dict": "ubimesh.proxy.xds.bootstrap",
    "load_bootstrap_text": "ubimesh.proxy.xds.bootstrap",
    "translate_bootstrap": "ubimesh.proxy.xds.translate",
    "ConfigError": "ubimesh.proxy.xds.errors",
    "ConfigErrors": "ubimesh.proxy.xds.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
