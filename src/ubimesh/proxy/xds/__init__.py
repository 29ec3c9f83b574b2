"""Envoy v3 configuration in, runtime snapshots out.

The only proxy package that imports protobuf. ``load_bootstrap`` reads a bootstrap file and
returns a ``Snapshot`` or raises ``ConfigErrors`` naming every problem by its field path; the
supported subset of Envoy's API is listed in docs/envoy-compat.md.
"""

from ubimesh.proxy.xds.bootstrap import load_bootstrap, load_bootstrap_dict, load_bootstrap_text
from ubimesh.proxy.xds.errors import ConfigError, ConfigErrors
from ubimesh.proxy.xds.translate import translate_bootstrap

__all__ = [
    "ConfigError",
    "ConfigErrors",
    "load_bootstrap",
    "load_bootstrap_dict",
    "load_bootstrap_text",
    "translate_bootstrap",
]
