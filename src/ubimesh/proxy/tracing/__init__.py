"""Tracing in the proxy: trace context propagation, spans with Envoy's semantics, export.

Only ``local`` (the node record) is loaded by every proxy; the rest is imported by HCMs that
have a ``tracing`` block (``HcmRuntime`` imports ``span`` lazily).
"""
