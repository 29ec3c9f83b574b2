"""The control plane's compiler: resources -> per-proxy Envoy v3 xDS resources
(docs/control-plane.md section 3). A pure function: no I/O, no clock, no randomness."""

from ubimesh.control.compiler.compile import compile_all, compile_proxy, empty_set
from ubimesh.control.compiler.model import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    ROUTE_TYPE,
    TYPE_URLS,
    CompileError,
    ProxyRef,
    XdsSet,
    proxy_ref,
)

__all__ = [
    "CLUSTER_TYPE",
    "ENDPOINT_TYPE",
    "LISTENER_TYPE",
    "ROUTE_TYPE",
    "TYPE_URLS",
    "CompileError",
    "ProxyRef",
    "XdsSet",
    "compile_all",
    "compile_proxy",
    "empty_set",
    "proxy_ref",
]
